"""``benchmarks/results/nano.md``: what the nano recipe produced — timings, losses, accuracies vs targets."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch

# The targets for the bundled model (held-out synthetic sets, standard metrics).
TARGETS = {"colour": 90.0, "shape": 90.0, "count": 90.0, "spatial": 85.0, "refer": 70.0, "identify": 85.0}


def headline(summary: dict[str, Any]) -> dict[str, float]:
    """Target-aligned numbers from an evaluation summary (``tinygptv.nano.evaluate``)."""
    cats = summary["categories"]
    out: dict[str, float] = {}
    gqa = cats.get("gqa", {})
    for c in ("colour", "shape", "count"):
        if c in gqa:
            out[c] = gqa[c]["accuracy"]
    bench = summary["results"]["benchmarks"]
    if "vsr" in bench:
        out["spatial"] = bench["vsr"]["scores"]["standard"]["metrics"]["accuracy"]
    refs = [bench[n]["scores"]["standard"]["metrics"]["accuracy"] for n in bench if n.startswith("refcoco")]
    if refs:
        out["refer"] = sum(refs) / len(refs)
    out["identify"] = summary["identify_accuracy"]
    out["caption_object_recall"] = summary["caption_object_recall"]
    return out


def write_report(path: Path, recipe: dict[str, Any], runs: dict[str, dict[str, Any]], losses: dict[str, Any],
                 bundle_bytes: int | None, command: str) -> str:
    """``runs``: ``{"bf16": summary, "int8": summary, …}`` (same model, different load-time quantization)."""
    heads = {k: headline(v) for k, v in runs.items()}
    keys = list(TARGETS) + ["caption_object_recall"]
    times = recipe.get("step_times_s") or recipe["timings_s"]  # when each step ran, not a continuation's skip
    from tinygptv.system import cpu_name
    from tinygptv.train.loop import fast_bf16

    amp = recipe.get("amp")
    precision = ({"bf16": "bf16 autocast", "none": "fp32"}.get(amp, amp) if amp else  # older summaries: auto
                 ("bf16 autocast" if fast_bf16(torch.device("cpu")) else "fp32") + " (not recorded: `auto` here)")
    lines = ["# Nano TinyGPT-V: the whole method on a CPU", "",
             (f"Machine: {cpu_name()} ({platform.machine()}), {torch.get_num_threads()} threads, torch "
              f"{torch.__version__}; training precision: {precision}. Produced by `{command}`"
              + ("" if not recipe.get("changed_settings") else " with recipe settings changed from the committed ones: "
                 + ", ".join(f"`{k} = {v!r}`" for k, v in recipe["changed_settings"].items())) + "."), "",
             "## Time per step of the recipe (seconds)", "", "| " + " | ".join(times) + " | total |",
             "|" + "---|" * (len(times) + 1),
             "| " + " | ".join(f"{v:.0f}" for v in times.values()) + f" | {sum(times.values()):.0f} |", "",
             ("## Final training loss per stage (the last logged step: one batch; curves in each stage's "
              "loss_curve.png)"), "", "| " + " | ".join(losses) + " |", "|" + "---|" * len(losses),
             "| " + " | ".join("—" if v is None else f"{v:.3f}" for v in losses.values()) + " |", "",
             "## Held-out synthetic sets (standard metrics)", "",
             "| metric | target | " + " | ".join(heads) + " |", "|---|---|" + "---|" * len(heads)]
    for k in keys:
        target = f"≥ {TARGETS[k]:.0f}" if k in TARGETS else "—"
        lines.append(f"| {k} | {target} | " + " | ".join(f"{h.get(k, float('nan')):.1f}" for h in heads.values()) + " |")
    first = next(iter(runs.values()))
    lines += ["", "## Every set, both scoring modes (first run)", "", "| set | paper | standard |", "|---|---|---|"]
    for name, b in first["results"]["benchmarks"].items():
        sc = b["scores"]
        lines.append(f"| {name} | {sc['paper']['metrics'].get('accuracy', float('nan')):.1f} | "
                     f"{sc['standard']['metrics'].get('accuracy', float('nan')):.1f} |")
    lines += ["", "Per-category accuracy (GQA-style set): "
              + ", ".join(f"{c} {v['accuracy']:.1f} (n={v['n']})" for c, v in first["categories"].get("gqa", {}).items())]
    if bundle_bytes is not None:
        lines += ["", f"Bundled checkpoint: {bundle_bytes / 1e6:.1f} MB (safetensors + config + tokenizer + template)."]
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    (path.with_suffix(".json")).write_text(json.dumps({"recipe": recipe, "losses": losses, "headline": heads},
                                                      indent=1))
    return text
