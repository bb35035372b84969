"""``tinygptv eval``: predict and score benchmarks; registered by the main CLI via :func:`add_eval_parser`."""

from __future__ import annotations

import argparse
import logging

from tinygptv.eval.registry import valid_names
from tinygptv.eval.runner import DEFAULT_BATCH_SIZE, MODE_CHOICES, rescore, run_eval

log = logging.getLogger(__name__)


def add_eval_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``eval`` sub-command to ``subparsers``; its handler is ``args.func`` (= :func:`cmd_eval`)."""
    p = subparsers.add_parser("eval", help="evaluate on GQA, VSR, IconQA, VizWiz, Hateful Memes, RefCOCO(+/g)",
                              description=__doc__)
    from tinygptv.cli import default_model

    p.add_argument("--model", default=default_model(),
                   help="checkpoint folder, 'nano' (bundled, the default), config.yaml, or preset name (random "
                        "weights: tiny, small…), loaded with tinygptv.load")
    p.add_argument("--tokenizer", help="tokenizer folder overriding the checkpoint's")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quantize", choices=["none", "bf16", "int8", "int4"], default=None,
                   help="weight quantization chosen at load time (default: as stored)")
    p.add_argument("--benchmark", required=True,
                   help="comma-separated benchmarks or groups: " + ", ".join(valid_names()))
    p.add_argument("--data-root", help="folder holding <benchmark>/… as documented per benchmark "
                                       "(required unless --score-only)")
    p.add_argument("--limit", type=int, help="only the first N records of each benchmark (a partial run)")
    p.add_argument("--mode", choices=MODE_CHOICES, default="both", help="scoring mode(s) to compute and report")
    p.add_argument("--out", default="eval-results", help="output folder (answers.jsonl per benchmark, results.*)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    p.add_argument("--bos", choices=["none", "training"], default="none",
                   help="generation prompt start: none = upstream's evaluator (no BOS, reference §9.6); training = "
                        "BOS first as in the training layout (recorded in results.json)")
    p.add_argument("--score-only", action="store_true",
                   help="re-score the existing answers files in --out (no model, no data)")
    p.set_defaults(func=cmd_eval)
    return p


def cmd_eval(args: argparse.Namespace) -> int:
    """Run ``tinygptv eval`` from parsed arguments; prints the comparison table and returns the exit code."""
    from tinygptv.eval.report import format_table

    if getattr(args, "score_only", False):
        results = rescore(args.out, args.benchmark, args.mode)
    else:
        if not args.model or not args.data_root:
            raise ValueError("--data-root and a model are required (or use --score-only)")
        import tinygptv

        quant = getattr(args, "quantize", None)
        model = tinygptv.load(args.model, device=getattr(args, "device", "cpu"),
                              tokenizer=getattr(args, "tokenizer", None), quantize=quant)
        from tinygptv.eval.predictor import ModelPredictor

        model = ModelPredictor(model, add_bos=getattr(args, "bos", "none") == "training")
        results = run_eval(model, args.benchmark, args.data_root, args.out, limit=args.limit, mode=args.mode,
                           batch_size=getattr(args, "batch_size", DEFAULT_BATCH_SIZE),
                           model_name=str(args.model) + (f" ({quant})" if quant else ""))
    print(format_table(results))
    if results.get("limit") is not None:
        print(f"--limit {results['limit']}: partial run, not comparable with the paper.")
    print(f"wrote {args.out}/results.json and {args.out}/results.md")
    return 0
