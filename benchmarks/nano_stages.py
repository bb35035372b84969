"""Re-run the paper's stages of a nano recipe run with changed settings, and score the result.

The chain of a run (``nano_chain.py``) shows where stage 0's skills are lost; this script tests a remedy at the
stages without redoing stage 0 (about an hour): it trains stages 1–4, or the stages from ``--start`` on (the earlier
ones are the run's own), exactly as the recipe does (``tinygptv.nano.recipe.stage_config``, same data, steps and
precision) except that the ``--stages`` learning rates (warm-up, peak and floor) are multiplied by ``--lr-scale``
and the ``--set`` overrides are applied, then evaluates the final model with the recipe's evaluation
(``tinygptv.nano.evaluate``) and writes the nano report next to it.

Usage (from the repository root): ``python benchmarks/nano_stages.py --run runs/nano-normed --out
runs/nano-normed-lowlr --stages stage1,stage2,stage3 --lr-scale 0.1`` or ``python benchmarks/nano_stages.py --run
runs/nano --out runs/nano-refer3 --start stage4 --set stage4:data.mixture.refcoco.ratio=75`` → ``<out>/nano.md``.
``--init`` starts from another checkpoint and ``--world`` trains on another world: ``--run runs/any --start stage4
--init tinygptv/assets/nano --world runs/world-x --steps-scale 0.5`` continues the bundled model's stage 4 on a
changed world (the run gives only its precision).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import yaml

from tinygptv.nano.evaluate import evaluate
from tinygptv.nano.recipe import losses, stage_config
from tinygptv.nano.report import write_report
from tinygptv.train.loop import train

log = logging.getLogger("nano_stages")
LR_KEYS = ("optim.init_lr", "optim.min_lr", "optim.warmup_lr")
STAGES = ("stage1", "stage2", "stage3", "stage4")


def parse_sets(items: list[str]) -> dict[str, dict]:
    """``["stage4:data.mixture.gqa.ratio=100", ...]`` → ``{"stage4": {"data.mixture.gqa.ratio": 100}}`` (values
    parsed as YAML)."""
    out: dict[str, dict] = {}
    for item in items:
        stage, sep, rest = item.partition(":")
        key, eq, value = rest.partition("=")
        if not sep or not eq or stage not in STAGES or not key:
            raise SystemExit(f"--set {item!r}: expected STAGE:KEY=VALUE with STAGE one of {', '.join(STAGES)}")
        out.setdefault(stage, {})[key] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="output folder of `tinygptv train --recipe nano` (its stage-0 base "
                                                 "and world are reused)")
    ap.add_argument("--out", required=True, help="new output folder for stages 1-4 and the evaluation")
    ap.add_argument("--stages", default="stage1,stage2,stage3", help="stages whose learning rates are scaled")
    ap.add_argument("--lr-scale", type=float, default=1.0)
    ap.add_argument("--start", default="stage1", choices=STAGES,
                    help="first stage to re-run; the stages before it are the run's own")
    ap.add_argument("--set", nargs="+", action="extend", default=[], metavar="STAGE:KEY=VALUE",
                    help="stage config overrides, e.g. stage4:data.mixture.refcoco.ratio=75")
    ap.add_argument("--init", help="checkpoint the first re-run stage starts from (default: the run's own one "
                                   "before --start), e.g. tinygptv/assets/nano to continue the bundle's stage 4")
    ap.add_argument("--world", help="world to train and evaluate on (default: the run's own)")
    ap.add_argument("--steps-scale", type=float, default=1.0, help="multiplies the re-run stages' steps")
    ap.add_argument("--eval-quantize", default="fp32", help="precisions to evaluate at, e.g. fp32,int8")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    run, out = Path(args.run), Path(args.out)
    base, world = run / "stage0" / "base", Path(args.world) if args.world else run / "world"
    if not (base / "config.yaml").is_file() and not args.init:
        raise SystemExit(f"{run}: no stage-0 base (run the nano recipe first)")
    if not (world / "world.json").is_file():
        raise SystemExit(f"{world}: not a generated world (no world.json)")
    amp = json.loads((run / "precision.json").read_text())["amp"]
    scaled = {s for s in args.stages.split(",") if s}
    sets = parse_sets(args.set)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(run / "precision.json", out / "precision.json")
    timings: dict[str, float] = {}
    first = STAGES.index(args.start)
    init = Path(args.init) if args.init else base if first == 0 else run / STAGES[first - 1] / "final"
    if not (init / "config.yaml").is_file():
        raise SystemExit(f"{init}: not there (the run has not finished the stage before {args.start})")
    started = init
    for name in STAGES[first:]:
        cfg = stage_config(name, init, args.steps_scale, amp)
        if name in scaled and args.lr_scale != 1.0:
            cfg = cfg.with_overrides({k: getattr(cfg.optim, k.split(".")[1]) * args.lr_scale for k in LR_KEYS})
        if name in sets:
            cfg = cfg.with_overrides(sets[name])
        t0 = time.perf_counter()
        if not (out / name / "final" / "config.yaml").is_file():
            train(cfg, world, out / name, resume=True)
        timings[name] = round(time.perf_counter() - t0, 1)
        init = out / name / "final"
    summary = {"timings_s": timings, "step_times_s": timings, "final": str(init), "amp": amp,
               "lr_scale": {s: args.lr_scale for s in sorted(scaled)}, "stage0_base": None if args.init else str(base),
               "start": args.start, "init": str(started), "world": str(world), "steps_scale": args.steps_scale,
               "overrides": sets}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    runs = {q: evaluate(init, world, out / f"eval-{q}", quantize=None if q == "fp32" else q)
            for q in args.eval_quantize.split(",") if q}
    given = {"--init": args.init, "--world": args.world, "--steps-scale": args.steps_scale != 1.0 and args.steps_scale}
    command = (f"python benchmarks/nano_stages.py --run {args.run} --out {args.out} --stages {args.stages} "
               f"--lr-scale {args.lr_scale} --start {args.start}"
               + "".join(f" {flag} {value}" for flag, value in given.items() if value)
               + "".join(f" --set {x}" for x in args.set))
    # the run's own losses before --start belong to this chain only when it starts from the run's checkpoint
    earlier = {} if args.init else losses(run)
    stage_losses = {**earlier, **{k: v for k, v in losses(out).items() if v is not None}}
    print(write_report(out / "nano.md", summary, runs, stage_losses, None, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
