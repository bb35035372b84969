"""Where along the nano recipe does a skill appear or get lost? Scores every checkpoint of one recipe run.

The stage-0 LM of a grounding recipe answers ``[refer]`` on ideal object tokens at 30–56 % (``lm_grounding.py``),
yet the finished model draws boxes at 2–20 %. This script evaluates each checkpoint a recipe run leaves — the
stage-0 base (the frozen tower and LM, the new norms at their initial values, the projection as the recipe
assembled it; and, when the base inserted them into a plain LM, once more without the paper's new norms, i.e. the
tower and LM as stage 0 trained them), then
each stage's final — on the held-out sets of that run's world, with the evaluation's own
prompts and scoring, so the step that loses (or never learns) a skill shows as a drop between two rows.

Per checkpoint: referring boxes (Acc@0.5, mean IoU, the median distance of the answer box's centre from the true
one in units of the 0–100 grid, distinct first coordinates over the answers), and the GQA-style set per category.
Checkpoints before stage 4 run at their own image size (64 px for the nano recipe).

Usage (from the repository root): ``python benchmarks/nano_chain.py --run runs/nano-phased16 --limit 200 --stem
nano-chain-phased16`` → ``benchmarks/results/<stem>.{md,json}``; the answers go under ``<run>/chain/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import tinygptv
from tinygptv.eval.answers import read_answers
from tinygptv.eval.metrics import parse_box_tolerant
from tinygptv.eval.runner import run_eval
from tinygptv.nano.recipe import stage0_norms
from tinygptv.synth.evalsets import category_breakdown

log = logging.getLogger("nano_chain")
RESULTS = Path(__file__).parent / "results"
CHECKPOINTS = (("base without the new norms", "stage0/base"), ("base", "stage0/base"), ("stage 1", "stage1/final"),
               ("stage 2", "stage2/final"), ("stage 3", "stage3/final"), ("stage 4", "stage4/final"))


def without_new_norms(model):
    """The base as stage 0 trained it: the decoder without the paper's QK-norm and post-attention RMSNorm, which
    the base inserts at the reference's initial values and stages 1-4 train."""
    for block in model.lm.layers:
        block.attn.q_norm = block.attn.k_norm = None
        block.post_attn_norm = None
    return model


def box_stats(answers: Path) -> dict[str, float]:
    """Median centre distance (0–100 grid units) and distinct x1 values of the parsed answer boxes."""
    dists, firsts, parsed = [], set(), 0
    records = read_answers(answers).values()
    for rec in records:
        box = parse_box_tolerant((rec.get("outputs") or {}).get("gen") or "")
        if box is None:
            continue
        parsed += 1
        x, y, w, h = rec["gt"]["bbox"]
        width, height = rec["gt"]["width"], rec["gt"]["height"]
        true_c = (100 * (x + w / 2) / width, 100 * (y + h / 2) / height)
        c = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
        dists.append(((c[0] - true_c[0]) ** 2 + (c[1] - true_c[1]) ** 2) ** 0.5)
        firsts.add(box[0])
    return {"parsed": parsed, "n": len(records), "median_centre_error": statistics.median(dists) if dists else None,
            "distinct_x1": len(firsts)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="output folder of `tinygptv train --recipe nano`")
    ap.add_argument("--limit", type=int, default=200, help="items per set")
    ap.add_argument("--sets", default="refcoco_val,gqa")
    ap.add_argument("--stem", required=True, help="results file name under benchmarks/results/")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    run = Path(args.run)
    eval_root = run / "world" / "eval"
    rows = {}
    for label, rel in CHECKPOINTS:
        ckpt = run / rel
        if not (ckpt / "config.yaml").is_file():
            log.warning("%s: no checkpoint at %s, skipped", label, ckpt)
            continue
        t0 = time.perf_counter()
        model = tinygptv.load(ckpt)
        if label.startswith("base without"):
            if stage0_norms(run) == "pretrained":
                log.info("%s: skipped, the stage-0 LM was pretrained with the new norms", label)
                continue
            model = without_new_norms(model)
        out = run / "chain" / ("stage0-plain" if label.startswith("base without") else rel.split("/")[0])
        res = run_eval(model, args.sets, eval_root, out, limit=args.limit, mode="standard",
                       batch_size=16)
        sets = {k: v["scores"]["standard"]["metrics"] for k, v in res["benchmarks"].items()}
        # only this invocation's sets: the folder may hold answers of other sets from an earlier one
        categories = {k: v for k, v in category_breakdown(eval_root / "meta.json", out).items() if k in sets}
        row = {"checkpoint": str(ckpt), "seconds": round(time.perf_counter() - t0, 1), "sets": sets,
               "categories": categories}
        if "refcoco_val" in sets:
            row["boxes"] = box_stats(out / "refcoco_val" / "answers.jsonl")
        rows[label] = row
        log.info("%s: %s", label, json.dumps(row["sets"]))

    extra = [name for name in args.sets.split(",") if name not in ("refcoco_val", "gqa")]  # their accuracy columns
    header = ["checkpoint", "refer Acc@0.5", "mean IoU", "median centre error", "distinct x1", "colour", "shape",
              "count", "exist", "GQA-style", *extra]
    lines = [f"# Skills along one nano recipe run: `{run.name}`", "",
             f"Produced by `python benchmarks/nano_chain.py --run {args.run} --limit {args.limit} --sets {args.sets} "
             f"--stem {args.stem}`; standard metrics, the evaluation's prompts, {args.limit} items per set "
             "(GQA-style: 40 per category).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def cell(v, fmt="{:.1f}"):
        return "—" if v is None else fmt.format(v)

    for label, row in rows.items():
        ref = row["sets"].get("refcoco_val", {})
        box = row.get("boxes", {})
        cat = row["categories"].get("gqa", {})
        lines.append("| " + " | ".join([
            label, cell(ref.get("accuracy")), cell(ref.get("mean_iou")), cell(box.get("median_centre_error")),
            cell(box.get("distinct_x1"), "{}"),
            *(cell(cat.get(k, {}).get("accuracy")) for k in ("colour", "shape", "count", "exist")),
            cell(row["sets"].get("gqa", {}).get("accuracy")),
            *(cell(row["sets"].get(name, {}).get("accuracy")) for name in extra)]) + " |")
    write_results(args.stem, lines, rows)
    return 0


def write_results(stem: str, lines: list[str], rows: dict) -> None:
    """``benchmarks/results/<stem>.md`` (the table ``lines``) and ``.json`` (``rows``); the table is printed too."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (RESULTS / f"{stem}.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
