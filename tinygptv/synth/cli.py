"""``tinygptv synth``: write the synthetic world; registered by the main CLI via :func:`add_synth_parser`."""

from __future__ import annotations

import argparse
import logging

from tinygptv.synth.generate import DEFAULT_EVAL_SIZE, generate_world

log = logging.getLogger(__name__)


def add_synth_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``synth`` sub-command to ``subparsers``; its handler is ``args.func`` (= :func:`cmd_synth`)."""
    p = subparsers.add_parser("synth", help="write a synthetic world of shapes and words: every training dataset "
                                            "in its published layout plus held-out eval sets",
                              description=__doc__)
    p.add_argument("--out", required=True, help="output folder (the --data-root of training; eval sets in OUT/eval)")
    p.add_argument("--seed", type=int, default=0, help="world seed (same seed -> identical files)")
    p.add_argument("--scale", type=float, default=1.0, help="multiplies every training dataset size")
    p.add_argument("--eval-size", type=int, default=DEFAULT_EVAL_SIZE, help="items per eval set")
    p.add_argument("--image-size", type=int, default=128, help="nominal image side in pixels (sizes vary ±)")
    p.add_argument("--force", action="store_true", help="replace a previous world in --out")
    p.set_defaults(func=cmd_synth)
    return p


def cmd_synth(args: argparse.Namespace) -> int:
    """Run ``tinygptv synth`` from parsed arguments; prints a summary and returns the exit code."""
    world = generate_world(args.out, seed=args.seed, scale=args.scale, eval_size=args.eval_size,
                           image_size=args.image_size, force=getattr(args, "force", False))
    print(f"wrote the synthetic world (seed {world['seed']}, scale {world['scale']}) to {args.out} "
          f"in {world['seconds']:.1f}s")
    print(f"  training images: {world['training_images']}, corpus lines: {world['corpus_lines']}")
    for name, c in world["datasets"].items():
        print(f"  {name:<26} {c['records']:>6} records {c['images']:>6} images")
    for name, s in world["eval_sets"].items():
        cats = ", ".join(f"{k} {v}" for k, v in s["categories"].items())
        print(f"  eval/{name:<21} {s['size']:>6} items  ({cats})")
    return 0
