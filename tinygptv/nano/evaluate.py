"""Evaluate a nano model on the synthetic world's held-out sets.

- The benchmark-format sets (GQA-, VSR-, VizWiz-, HM-, IconQA-, RefCOCO-style) go through the real evaluators
  (``tinygptv.eval.run_eval``, both scoring modes) plus a per-category breakdown (colour / shape / count / …).
- Two checks the benchmarks do not cover, on the RefCOCO-style val scenes:
  *identify* (box → object; the training answers are referring expressions such as "the red circle" or "the
  square on the left", so an answer is correct when the object it describes is exactly the boxed one) and *captions*
  (``[caption]``: recall of the scene's shapes and colours among the words of the caption, and how many
  named shapes are not in the scene).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import tinygptv
from tinygptv.infer.engine import Engine
from tinygptv.infer.generate import GenerationConfig

SETS = "gqa,vsr,vizwiz,hm,iconqa,refcoco_val,refcoco_testA,refcoco_testB"
IDENTIFY_INSTRUCTION = "[identify] what object is in this location {}"  # as stage 4 asks it (box text)


def _scenes(eval_root: Path) -> dict[str, dict]:
    rows = [json.loads(x) for x in (eval_root / "scenes.jsonl").read_text().splitlines() if x]
    return {r["scene"]["id"]: r for r in rows}


def refers_to(text: str, objects) -> object | None:
    """The single object a referring expression picks out (attributes, then an extreme position), else None."""
    words = re.findall(r"[a-z]+", text.lower())
    cands = [o for o in objects if all(w in (o.colour, o.shape, o.size) or w not in _ATTRIBUTES for w in words)]
    if not any(w in _ATTRIBUTES for w in words):
        cands = list(objects) if any(w in _EXTREMES for w in words) else []
    for w in words:
        if w in _EXTREMES and cands:
            key, sign = _EXTREMES[w]
            cands = [max(cands, key=lambda o: sign * o.centre[key])]
    return cands[0] if len(cands) == 1 else None


def _name(obj) -> str:
    x, y = obj.centre
    return f"{obj.size} {obj.colour} {obj.shape} at ({x:.0f}, {y:.0f})"


def _vocab():
    from tinygptv.synth.world import COLOURS, SHAPES, SIZES

    return set(COLOURS) | set(SHAPES) | set(SIZES)


_ATTRIBUTES = _vocab()
_EXTREMES = {"left": (0, -1), "right": (0, 1), "top": (1, -1), "bottom": (1, 1)}


def identify_and_caption(engine: Engine, eval_root: Path, limit: int | None = None, batch: int = 16,
                         out: Path | None = None) -> dict[str, Any]:
    """Identify accuracy and caption object recall / hallucination on the RefCOCO-style val items; with ``out``,
    every answer is also written to ``out/identify.jsonl`` (the boxed object, the object the answer refers to or
    ``null``, whether they agree) and ``out/captions.jsonl`` (the caption, the scene's objects, the words found)."""
    from tinygptv.synth.text import box_text
    from tinygptv.synth.world import SHAPES, Scene

    meta = json.loads((eval_root / "meta.json").read_text())
    items = list(meta["sets"]["refcoco_val"]["items"].values())[:limit]
    scenes = _scenes(eval_root)
    cfg = GenerationConfig(max_new_tokens=24)
    identified: list[dict] = []
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        reqs, gold = [], []
        for it in chunk:
            scene = Scene.from_dict(scenes[it["scene"]]["scene"])
            obj = next(o for o in scene.objects if list(o.box) == it["bbox"])
            q = IDENTIFY_INSTRUCTION.format(box_text(scene, obj))
            reqs.append(engine.chat_request(q, [eval_root / it["image"]]))
            gold.append((obj, scene))
        for res, (obj, scene), it in zip(engine.generate(reqs, cfg), gold, chunk):
            named = refers_to(res.text, scene.objects)
            identified.append({"scene": it["scene"], "answer": res.text, "object": _name(obj),
                               "named": None if named is None else _name(named), "correct": named == obj,
                               "n_objects": len(scene.objects)})
    seen = set()
    cap_reqs, cap_scenes, captions = [], [], []
    for it in items:
        if it["scene"] in seen:
            continue
        seen.add(it["scene"])
        cap_reqs.append(engine.chat_request("[caption] Briefly describe this image.", [eval_root / it["image"]]))
        cap_scenes.append(Scene.from_dict(scenes[it["scene"]]["scene"]))
    for start in range(0, len(cap_reqs), batch):
        results = engine.generate(cap_reqs[start:start + batch], GenerationConfig(max_new_tokens=48))
        for res, scene in zip(results, cap_scenes[start:start + batch]):
            words = set(re.findall(r"[a-z]+", res.text.lower()))
            invented = sorted({s for s in SHAPES if s in words} - {o.shape for o in scene.objects})
            captions.append({"scene": scene.id, "caption": res.text, "objects": [_name(o) for o in scene.objects],
                             "words_found": sum((o.shape in words) + (o.colour in words) for o in scene.objects),
                             "words_wanted": 2 * len(scene.objects), "invented_shapes": invented})
    if out is not None:
        for name, rows in (("identify", identified), ("captions", captions)):
            (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"identify_accuracy": 100.0 * sum(r["correct"] for r in identified) / max(1, len(items)),
            "identify_n": len(items),
            "caption_object_recall": 100.0 * sum(c["words_found"] for c in captions)
            / max(1, sum(c["words_wanted"] for c in captions)),
            "caption_hallucinated_shapes_per_caption": sum(len(c["invented_shapes"]) for c in captions)
            / max(1, len(captions)), "caption_n": len(captions)}


def evaluate(model: str | Path | tinygptv.TinyGPTV, world: str | Path, out: str | Path, limit: int | None = None,
             quantize: str | None = None, sets: str = SETS) -> dict[str, Any]:
    """All nano metrics for ``model`` → ``out/summary.json`` (and the evaluators' results files)."""
    from tinygptv.eval.runner import run_eval
    from tinygptv.synth.evalsets import category_breakdown

    world, out = Path(world), Path(out)
    if not isinstance(model, tinygptv.TinyGPTV):
        model = tinygptv.load(model, quantize=quantize)
    eval_root = world / "eval"
    results = run_eval(model, sets, eval_root, out, limit=limit, mode="both", batch_size=16)
    breakdown = category_breakdown(eval_root / "meta.json", out)
    extra = identify_and_caption(Engine(model), eval_root, limit, out=out)
    summary = {"results": results, "categories": breakdown, **extra, "quantize": quantize or "none"}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary
