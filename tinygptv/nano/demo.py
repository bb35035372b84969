"""``tinygptv demo``: the bundled nano model answers questions about bundled example images.

The examples (``tinygptv/assets/demo/``) are synthetic-world scenes that were never used in training, with
questions whose true answers are stored next to them, so the demo shows both what the model says and
whether it is right. One question asks for a location; its box is drawn on the image and saved as a PNG.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from PIL import Image

DEMO_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo"


def make_demo_assets(dest: Path = DEMO_DIR, seed: int = 20261121, n: int = 3) -> Path:
    """Render ``n`` scenes with 3 questions each (+ one referring question) into ``dest/demo.json``."""
    from tinygptv.synth.render import render
    from tinygptv.synth.text import box_text, questions
    from tinygptv.synth.world import referring_expressions, sample_scene

    rng = random.Random(seed)
    dest.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n):
        scene = sample_scene(rng, f"demo-{i}", image_size=128, n_objects=2 + i % 2, word=False)
        render(scene).save(dest / f"scene{i}.png")
        qs = questions(scene, rng)
        picked = [rng.choice(qs[c]) for c in ("colour", "shape", "count") if qs[c]]
        k = rng.randrange(len(scene.objects))
        spec = referring_expressions(scene, k, ("attribute",))[0]
        items.append({"image": f"scene{i}.png",
                      "questions": [{"q": f"[vqa] {qa.question}", "answer": qa.answer} for qa in picked],
                      "refer": {"q": f"[refer] where is {spec.text()}?", "answer": box_text(scene, scene.objects[k])}})
    (dest / "demo.json").write_text(json.dumps(items, indent=1))
    return dest


def run_demo(model: str = "nano", out: Path = Path("tinygptv-demo.png"), quantize: str | None = None) -> int:
    """Print each question, the model's answer and the true one; draw the located box into ``out``."""
    import tinygptv
    from tinygptv.infer.engine import Engine
    from tinygptv.infer.generate import GenerationConfig
    from tinygptv.infer.grounding import draw_boxes, parse_boxes

    t0 = time.perf_counter()
    engine = Engine(tinygptv.load(model, quantize=quantize, inference=True))
    print(f"model: {engine.model.cfg.name} ({sum(p.numel() for p in engine.model.parameters()) / 1e6:.1f} M "
          f"parameters, loaded in {time.perf_counter() - t0:.1f} s)")
    items = json.loads((DEMO_DIR / "demo.json").read_text())
    cfg = GenerationConfig(max_new_tokens=32)
    right = total = 0
    drawn = None
    for item in items:
        image = Image.open(DEMO_DIR / item["image"]).convert("RGB")
        print(f"\n[{item['image']}]")
        asks = item["questions"] + [item["refer"]]
        t = time.perf_counter()
        results = engine.generate([engine.chat_request(a["q"], [image]) for a in asks], cfg)
        dt = time.perf_counter() - t
        for ask, res in zip(asks, results):
            ok = res.text.strip().lower() == ask["answer"].lower()
            right += ok
            total += 1
            print(f"  Q: {ask['q']}\n  A: {res.text}   ({'right' if ok else 'expected ' + ask['answer']})")
        boxes = parse_boxes(results[-1].text, *image.size)
        if boxes and drawn is None:
            drawn = draw_boxes(image.resize((image.width * 3, image.height * 3)),
                               parse_boxes(results[-1].text, image.width * 3, image.height * 3))
        print(f"  ({len(asks)} answers in {dt:.2f} s, one batch)")
    print(f"\n{right}/{total} answers exactly right")
    if drawn is not None:
        drawn.save(out)
        print(f"grounding answer drawn into {out}")
    return 0
