"""Where is the place information lost? Spatial questions to one nano recipe run's checkpoints, over real image tokens.

``object_phase.py --variant spatial-all`` showed that the stage-0 LM learns to answer "where is A", "is A to the
left or right of B?" and yes/no spatial statements from ideal object tokens, yet the finished models of the recipe
runs that trained them (``runs/nano-spatial``, ``runs/nano-spall``) judge the VSR-style statements at chance. This
script asks the same three kinds of question (``[vqa]``, the stage-4 template, greedy, scored as ``object_phase.py``
scores them) about rendered held-out scenes of 2–4 objects:

- the stage-0 LM of the run over *ideal* object tokens, as ``object_phase.py`` does, after its object phase (the
  run's ``stage0/lm-objects.safetensors``) and after its grounding phase (the base's decoder without the paper's new
  norms, as stage 0 trained it): what the LM can do after each of stage 0's LM phases;
- the same base over the *real* tower's image tokens at 128 px: what reaches the LM through the frozen tower;
- the base as stage 1 starts from it: the paper's QK LayerNorm and post-attention RMSNorm inserted at their initial
  values (the recipe's default, as the official code does with Phi-2);
- each later checkpoint (stage 1–4 finals) over the real image tokens.

A drop from the ideal-token rows to the base's puts the loss in the tower; between later rows, in the stage that lost
it. The ideal-token rows place their object tokens with draws from the questions' random stream, so they are asked
about other scenes than the real-token rows (the same for both of them, and the same across the real-token rows).

Usage: ``python benchmarks/spatial_probe.py --run runs/nano-spall --stem spatial-probe-spall [--scenes 90]``.
Writes ``benchmarks/results/<stem>.{md,json}``.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
import object_phase  # noqa: E402  (question makers and the ideal-token answer)
from nano_chain import without_new_norms, write_results  # noqa: E402

import tinygptv  # noqa: E402
from tinygptv.model.phi import PhiLM  # noqa: E402
from tinygptv.synth.render import render  # noqa: E402
from tinygptv.synth.world import sample_scene  # noqa: E402

log = logging.getLogger("spatial_probe")
SIZE = 128


def real_answer(model, question: str, image) -> str:
    """The checkpoint's greedy answer to ``question`` (stage-4 template) over the image's tokens from its tower."""
    with torch.no_grad():
        emb = model.encode_images(model.pixel_values([image]))  # [1, Q, C]
    return object_phase.answer_over(model.lm, model.tokenizer, emb, question)


def probe(answer, scenes: int, seed: int = 4321) -> dict[str, float]:
    """Accuracy (%) per question kind and object count; ``answer(scene, question, rng, g)`` → text."""
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    hits: dict[str, list[bool]] = {}
    for i in range(scenes):
        scene = sample_scene(rng, f"probe-{i}", image_size=SIZE, n_objects=2 + i % 3, word=False)
        object_phase.ask_spatial(scene, rng, lambda q: answer(scene, q, rng, g), hits)
    return {key: round(100 * sum(v) / len(v), 1) for key, v in sorted(hits.items())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="output folder of `tinygptv train --recipe nano`")
    ap.add_argument("--scenes", type=int, default=90, help="scenes (2 / 3 / 4 objects in turn)")
    ap.add_argument("--stem", required=True, help="results file name under benchmarks/results/")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run = Path(args.run)
    rows: dict[str, dict[str, float]] = {}
    base = without_new_norms(tinygptv.load(run / "stage0" / "base")).eval()
    base.vision.set_image_size(SIZE)
    objects_file = run / "stage0" / "lm-objects.safetensors"
    if objects_file.is_file():  # the LM between its object phase and its grounding phase
        lm = PhiLM(replace(base.cfg.lm, qk_norm=False, post_attn_norm=False, resid_dropout=0.0))
        lm.load_state_dict(load_file(str(objects_file)))
        rows["stage-0 LM after its object phase, ideal object tokens"] = probe(
            lambda scene, q, rng, g: object_phase.answer(lm.eval(), base.tokenizer, None, scene, q, rng, g),
            args.scenes)
    rows["stage-0 LM after its grounding phase, ideal object tokens"] = probe(
        lambda scene, q, rng, g: object_phase.answer(base.lm, base.tokenizer, None, scene, q, rng, g), args.scenes)
    checkpoints = [("base (stage 0, without the new norms)", base),
                   ("base with the new norms inserted (where stage 1 starts)", run / "stage0" / "base")] + [
        (f"stage {k}", run / f"stage{k}" / "final") for k in range(1, 5)]
    for label, ckpt in checkpoints:
        model = ckpt if not isinstance(ckpt, Path) else tinygptv.load(ckpt).eval()
        model.vision.set_image_size(SIZE)
        rows[label] = probe(lambda scene, q, rng, g: real_answer(model, q, render(scene)), args.scenes)
        log.info("%s: %s", label, rows[label])

    def cells(row: dict, kind: str) -> str:
        return " / ".join(f"{row[f'{kind}{n}']:.0f}" if f"{kind}{n}" in row else "–" for n in (2, 3, 4))

    lines = [f"# Spatial questions along one nano recipe run: `{run.name}`", "",
             f"Produced by `python benchmarks/spatial_probe.py --run {args.run} --scenes {args.scenes} --stem "
             f"{args.stem}` (see its docstring). Accuracy % with 2 / 3 / 4 objects, {args.scenes} rendered scenes "
             f"at {SIZE} px, `[vqa]` questions in the stage-4 template, greedy. A guess scores 50 % on yes/no and on "
             "left-or-right; \"where\" has 9 places.", "",
             "| checkpoint, image tokens | yes/no statements | left-or-right, above-or-below | where |",
             "|---|---|---|---|"]
    lines += [f"| {label} | {cells(row, 'spatial')} | {cells(row, 'side')} | {cells(row, 'where')} |"
              for label, row in rows.items()]
    write_results(args.stem, lines, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
