"""``python -m tinygptv`` (also what ``torchrun -m tinygptv`` runs)."""

import sys

from tinygptv.cli import main

sys.exit(main())
