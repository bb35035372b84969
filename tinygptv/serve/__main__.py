"""``python -m tinygptv.serve [options]``: same as ``tinygptv serve``."""

import sys

from tinygptv.serve.cli import main

sys.exit(main())
