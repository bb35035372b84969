"""``tinygptv ablate``: the paper's Table 4 at nano scale.

Variants (each runs stages 1→4 from the same stage-0 backbones and synthetic world as the nano recipe):

- ``full`` — the method as is;
- ``no_lora`` — no LoRA adapters at all (LoRA r = 0);
- ``no_input_norm`` — the input LayerNorm weights are not trained (frozen at the pretrained LM's values);
- ``no_rmsnorm`` — no post-attention RMSNorm;
- ``no_qknorm`` — no per-head QK LayerNorm.

The variants share the recipe run's stage-0 base. With the recipe's default ``--stage0-norms inserted`` that is the
paper's setting: a plain LM into which the full method inserts the new norms and the ``no_rmsnorm`` / ``no_qknorm``
variants do not. After ``--stage0-norms pretrained`` the frozen LM was trained with them, so those two variants take
trained layers out of it: their losses then also measure that, not only training without the norms.

For every stage it records the final loss, the number of non-finite losses and the number of logged steps
whose gradient norm vanished (< 1e-6), and draws all loss curves into one PNG.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

import tinygptv
from tinygptv.nano.recipe import stage0_norms, stage_config

log = logging.getLogger(__name__)

VARIANTS: dict[str, dict[str, Any]] = {
    "full": {},
    "no_lora": {"model": {"lora.r": 0}},
    "no_input_norm": {"stage": {"trainable.input_norm": False}},
    "no_rmsnorm": {"model": {"lm.post_attn_norm": False}},
    "no_qknorm": {"model": {"lm.qk_norm": False}},
}
STAGES = ("stage1", "stage2", "stage3", "stage4")
VANISHED = 1e-6
TAIL = 5  # the reported loss of a stage: mean over its last 1/TAIL logged steps


def variant_base(base: Path, overrides: dict[str, Any], dest: Path) -> Path:
    """The stage-0 base checkpoint with modules removed as the variant asks (same weights otherwise)."""
    if (dest / "config.yaml").is_file():
        return dest
    src = tinygptv.load(base)
    if not overrides:
        return base
    model = tinygptv.load(src.cfg.replace(**overrides))
    state = src.state_dict()
    missing = model.load_state_dict({k: v for k, v in state.items() if k in model.state_dict()}, strict=False)
    if missing.missing_keys:
        raise RuntimeError(f"variant base lacks {missing.missing_keys[:5]}")
    model.tokenizer, model.template = src.tokenizer, src.template
    return tinygptv.save(model, dest)


def stage_stats(out: Path) -> dict[str, Any]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    finite = [r["loss"] for r in rows if r.get("loss") is not None and math.isfinite(r["loss"])]
    norms = [r.get("grad_norm") for r in rows if r.get("grad_norm") is not None]
    tail = finite[-max(1, len(finite) // TAIL):]  # one logged step is one batch: too noisy to compare variants
    return {"final_loss": sum(tail) / len(tail) if tail else None,
            "nonfinite": rows[-1].get("nonfinite_total", 0) if rows else 0,
            "vanished_steps": sum(1 for n in norms if n < VANISHED), "logged_steps": len(rows),
            "curve": [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]}


def ablate(nano_out: str | Path, out: str | Path, steps_scale: float = 0.3,
           variants: list[str] | None = None) -> dict[str, Any]:
    from tinygptv.train.loop import TrainingStopped, train

    nano_out, out = Path(nano_out), Path(out)
    if not (nano_out / "stage0" / "base" / "config.yaml").is_file():
        raise FileNotFoundError(f"{nano_out}: no stage-0 base; run `tinygptv train --recipe nano --output "
                                f"{nano_out}` first (the ablation reuses its world and backbones)")
    world, base = nano_out / "world", nano_out / "stage0" / "base"
    precision = nano_out / "precision.json"  # the recipe's training precision, so that the variants compare alike
    amp = json.loads(precision.read_text())["amp"] if precision.is_file() else "auto"
    table: dict[str, Any] = {}
    for name in variants or list(VARIANTS):
        spec = VARIANTS[name]
        if name in ("no_rmsnorm", "no_qknorm") and stage0_norms(nano_out) == "pretrained":
            log.warning("%s: %s's stage-0 LM was pretrained with the new norms, so this variant takes trained "
                        "layers out of it; the paper's setting is a recipe run with --stage0-norms inserted (the "
                        "default)", name, nano_out)
        init: Path = variant_base(base, spec.get("model", {}), out / name / "base")
        table[name] = {}
        for stage in STAGES:
            cfg = stage_config(stage, init, steps_scale, amp).with_overrides(spec.get("stage", {}))
            if name == "no_lora":
                cfg = cfg.with_overrides({"trainable.lora": False})
            stage_out = out / name / stage
            try:
                if not (stage_out / "final" / "config.yaml").is_file():
                    train(cfg, world, stage_out, resume=True)
                table[name][stage] = stage_stats(stage_out)
                init = stage_out / "final"
            except TrainingStopped as exc:
                table[name][stage] = {**stage_stats(stage_out), "stopped": str(exc)}
                break
    (out / "ablation.json").write_text(json.dumps(table, indent=1))
    return table


def markdown(table: dict[str, Any], command: str) -> str:
    lines = ["# Ablation at nano scale (the paper's Table 4)", "",
             (f"Training loss per stage, the mean over the last 1/{TAIL} of its logged steps (each logs one batch); "
              "`NaN×k` = k non-finite losses, `vanish×k` = k logged steps with "
              f"gradient norm < {VANISHED:g}; `stopped` = training halted."), "",
             "| variant | " + " | ".join(STAGES) + " |", "|---|" + "---|" * len(STAGES)]
    for name, stages in table.items():
        cells = []
        for s in STAGES:
            st = stages.get(s)
            if st is None:
                cells.append("—")
                continue
            cell = "—" if st["final_loss"] is None else f"{st['final_loss']:.3f}"
            if st["nonfinite"]:
                cell += f" NaN×{st['nonfinite']}"
            if st["vanished_steps"]:
                cell += f" vanish×{st['vanished_steps']}"
            if "stopped" in st:
                cell += " stopped"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"Reproduce: `{command}`. Loss curves: `ablation.png`."]
    return "\n".join(lines) + "\n"


def plot(table: dict[str, Any], path: Path, size: tuple[int, int] = (1000, 420)) -> None:
    """All variants' loss curves, stages side by side (x), one colour per variant."""
    W, H = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189)]
    losses = [v for st in table.values() for s in st.values() for _, v in s["curve"] if math.isfinite(v)]
    if not losses:
        img.save(path)
        return
    lo, hi = min(losses), max(losses)
    panel = (W - 40) // len(STAGES)
    for j, stage in enumerate(STAGES):
        x0 = 20 + j * panel
        d.rectangle([x0, 30, x0 + panel - 10, H - 30], outline=(160, 160, 160))
        d.text((x0 + 4, 34), stage, fill=(0, 0, 0))
        for k, (name, st) in enumerate(table.items()):
            curve = st.get(stage, {}).get("curve", [])
            if len(curve) < 2:
                continue
            n = curve[-1][0] or 1
            pts = [(x0 + (s / n) * (panel - 12), H - 32 - (v - lo) / (hi - lo + 1e-9) * (H - 70))
                   for s, v in curve if math.isfinite(v)]
            d.line(pts, fill=colours[k % len(colours)], width=2)
    for k, name in enumerate(table):
        d.text((20 + k * 150, 10), name, fill=colours[k % len(colours)])
    d.text((W - 200, H - 22), f"loss {lo:.2f} .. {hi:.2f}", fill=(0, 0, 0))
    img.save(path)


__all__ = ["VARIANTS", "ablate", "markdown", "plot"]
