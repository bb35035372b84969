"""Held-out evaluation sets in the benchmark layouts of :mod:`tinygptv.eval` (under ``out/eval``), their
``meta.json`` (gold answer and category per item id) and a per-category breakdown of evaluation answers.

Eval scenes come from their own random streams (``eval:<set>``) and any scene whose signature occurs in the
training data is redrawn, so no training picture is evaluated.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tinygptv.eval.answers import ANSWERS_FILE, read_answers
from tinygptv.eval.refcoco import SPLITS
from tinygptv.eval.registry import BENCHMARKS
from tinygptv.synth.context import WorldContext
from tinygptv.synth.render import encode, render
from tinygptv.synth.text import QA, box_text, questions, statements, unanswerable
from tinygptv.synth.world import COLOURS, SHAPES, RefSpec, Scene, referring_expressions, sample_scene
from tinygptv.synth.writers import hm_statement

EVAL_DIR = "eval"
META_FILE = "meta.json"
Item = dict[str, Any]


class EvalWriter:
    """Renders eval scenes under ``out/eval`` and collects ``meta.json``."""

    def __init__(self, ctx: WorldContext, size: int):
        self.ctx, self.size = ctx, size
        self.root = ctx.out / EVAL_DIR
        self.sets: dict[str, dict[str, Any]] = {}
        self.scene_records: list[dict[str, Any]] = []
        self.signatures: set[str] = set()

    def scene(self, rng: random.Random, scene_id: str, **kwargs: Any) -> Scene:
        """A scene whose signature is in neither the training data nor another eval set."""
        while True:
            scene = sample_scene(rng, scene_id, self.ctx.image_size, **kwargs)
            sig = scene.signature()
            if sig not in self.ctx.signatures and sig not in self.signatures:
                self.signatures.add(sig)
                return scene

    def save(self, scene: Scene, rel: str, set_name: str, fmt: str = "JPEG") -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(render(scene), fmt))
        self.scene_records.append({"dataset": set_name, "image": rel, "scene": scene.to_dict()})

    def add_set(self, name: str, annotation: str, data: Any, items: dict[str, Item], jsonl: bool = False) -> None:
        path = self.root / annotation
        path.parent.mkdir(parents=True, exist_ok=True)
        if jsonl:
            path.write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")
        else:
            path.write_text(json.dumps(data, separators=(",", ":")), encoding="utf-8")
        cats = Counter(item["category"] for item in items.values())
        self.sets[name] = {"benchmark": name, "annotation": annotation, "size": len(items),
                           "categories": dict(sorted(cats.items())), "items": items}

    def finish(self) -> dict[str, Any]:
        meta = {"version": 1, "seed": self.ctx.seed, "image_size": self.ctx.image_size, "sets": self.sets}
        (self.root / META_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        (self.root / "scenes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in self.scene_records))
        return meta


def _pick(rng: random.Random, scene: Scene, category: str) -> QA | None:
    pool = [q for q in questions(scene, rng)[category] if category != "text" or q.answer not in ("yes", "no")]
    return rng.choice(pool) if pool else None


def _question_set(w: EvalWriter, name: str, categories: tuple[str, ...],
                  make: Callable[[int, Scene, QA], tuple[str, Any, Item]],
                  word_for: str = "text") -> tuple[list[Any], dict[str, Item]]:
    """``size`` items, categories round-robin; ``make(i, scene, qa) -> (item id, record, meta item)``."""
    rng = w.ctx.rng(f"eval:{name}")
    rows, items = [], {}
    for i in range(w.size):
        category = categories[i % len(categories)]
        while True:
            scene = w.scene(rng, f"eval-{name}-{i}", word=True if category == word_for else None)
            qa = unanswerable(scene, rng) if category == "unanswerable" else _pick(rng, scene, category)
            if qa is not None:
                break
        item_id, row, item = make(i, scene, qa)
        rows.append(row)
        items[item_id] = {"category": qa.category, "answer": qa.answer, "scene": scene.id, **item}
    return rows, items


def write_gqa(w: EvalWriter) -> None:
    """GQA official-dict layout ``gqa/testdev_balanced_questions.json`` (with ``types``) + ``gqa/images/``."""
    structural = {"exist": "verify"}

    def make(i: int, scene: Scene, qa: QA) -> tuple[str, Any, Item]:
        image_id = f"n{900000 + i}"
        w.save(scene, f"gqa/images/{image_id}.jpg", "gqa")
        qid = f"{900000 + i}"
        row = {"imageId": image_id, "question": qa.question, "answer": qa.answer, "fullAnswer": qa.answer,
               "isBalanced": True, "types": {"structural": structural.get(qa.category, "query"),
                                             "semantic": "attr" if qa.category != "exist" else "obj",
                                             "detailed": qa.category}}
        return qid, (qid, row), {"image": f"gqa/images/{image_id}.jpg", "query": qa.question}

    rows, items = _question_set(w, "gqa", ("colour", "shape", "count", "text", "exist"), make)
    w.add_set("gqa", "gqa/testdev_balanced_questions.json", dict(rows), items)


def write_vizwiz(w: EvalWriter) -> None:
    """VizWiz ``vizwiz/val.json`` (10 answers each; questions about absent things are ``unanswerable``)."""
    types = {"count": "number", "unanswerable": "unanswerable", "exist": "yes/no"}

    def make(i: int, scene: Scene, qa: QA) -> tuple[str, Any, Item]:
        image = f"VizWiz_val_{i:08d}.jpg"
        w.save(scene, f"vizwiz/images/{image}", "vizwiz")
        answers = [{"answer": qa.answer, "answer_confidence": "yes"} for _ in range(10)]
        row = {"image": image, "question": qa.question, "answers": answers,
               "answer_type": types.get(qa.category, "other"), "answerable": int(qa.category != "unanswerable")}
        return image, row, {"image": f"vizwiz/images/{image}", "query": qa.question}

    rows, items = _question_set(w, "vizwiz", ("colour", "shape", "count", "text", "unanswerable"), make)
    w.add_set("vizwiz", "vizwiz/val.json", rows, items)


def write_iconqa(w: EvalWriter) -> None:
    """IconQA ``iconqa/choose_txt_val.json`` (3–5 choices) + ``iconqa/val/choose_txt/{pid}/image.png``."""
    rng = w.ctx.rng("eval:iconqa:choices")
    pools = {"count": [str(k) for k in range(6)], "colour": list(COLOURS), "shape": list(SHAPES)}

    def make(i: int, scene: Scene, qa: QA) -> tuple[str, Any, Item]:
        pid = str(90000 + i)
        rel = f"iconqa/val/choose_txt/{pid}/image.png"
        w.save(scene, rel, "iconqa", fmt="PNG")
        others = [c for c in pools[qa.category] if c != qa.answer]
        choices = [qa.answer, *rng.sample(others, rng.randint(2, 4))]
        rng.shuffle(choices)
        if qa.category == "count":
            choices.sort(key=int)
        row = {"image_id": pid, "question": qa.question, "choices": choices, "answer": choices.index(qa.answer),
               "ques_type": "choose_txt", "grade": "synthetic"}
        return pid, row, {"image": rel, "query": qa.question, "choices": choices,
                          "answer_index": choices.index(qa.answer)}

    rows, items = _question_set(w, "iconqa", ("count", "colour", "shape"), make)
    w.add_set("iconqa", "iconqa/choose_txt_val.json", rows, items)


def write_vsr(w: EvalWriter) -> None:
    """VSR ``vsr/test.jsonl`` (true/false spatial statements, balanced) + ``vsr/images/``."""
    rng = w.ctx.rng("eval:vsr")
    rows, items = [], {}
    for i in range(w.size):
        want = i % 2 == 0
        while True:
            scene = w.scene(rng, f"eval-vsr-{i}", n_objects=rng.randint(2, 4))
            options = [s for s in statements(scene) if s.label == want]
            if options:
                break
        st = rng.choice(options)
        image = f"{910000 + i:012}.jpg"
        w.save(scene, f"vsr/images/{image}", "vsr")
        text = st.text[0].upper() + st.text[1:]
        rows.append({"image": image, "caption": text, "label": int(st.label), "relation": st.relation,
                     "subj": scene.objects[st.subject].shape, "obj": scene.objects[st.anchor].shape})
        items[str(i)] = {"category": "spatial", "answer": "true" if st.label else "false", "label": int(st.label),
                         "scene": scene.id, "image": f"vsr/images/{image}", "query": text}
    w.add_set("vsr", "vsr/test.jsonl", rows, items, jsonl=True)


def write_hm(w: EvalWriter) -> None:
    """Hateful-Memes layout ``hm/dev_seen.jsonl`` + ``hm/img/{id}.png``: ``text`` is a claim about the picture
    (``"there is a red circle"``) and ``label`` 1 iff it is true, so yes/no is decidable from the image."""
    rng = w.ctx.rng("eval:hm")
    rows, items = [], {}
    for i in range(w.size):
        want = i % 2 == 0
        while True:
            scene = w.scene(rng, f"eval-hm-{i}")
            text, label = hm_statement(scene, rng)
            if label == want:
                break
        ident = 92000 + i
        w.save(scene, f"hm/img/{ident}.png", "hm", fmt="PNG")
        rows.append({"id": ident, "img": f"img/{ident}.png", "label": int(label), "text": text})
        items[str(ident)] = {"category": "count" if "object" in text else "exist", "answer": "yes" if label else "no",
                             "label": int(label), "scene": scene.id, "image": f"hm/img/{ident}.png", "query": text}
    w.add_set("hm", "hm/dev_seen.jsonl", rows, items, jsonl=True)


REFER_KINDS: dict[str, dict[str, tuple[str, ...]]] = {
    "refcoco": {"val": ("attribute", "spatial"), "testA": ("attribute",), "testB": ("spatial",)},
    "refcoco+": {"val": ("attribute",), "testA": ("attribute",), "testB": ("attribute",)},
    "refcocog": {"val": ("relation",), "test": ("relation",)},
}


def write_refcoco(w: EvalWriter, dataset: str, split: str, base_id: int) -> None:
    """MiniGPT-v2 eval file ``{dataset}/{dataset}_{split}.json`` (one sentence per row) + ``coco/train2014/``.

    RefCOCO: testA attribute, testB positional expressions; RefCOCO+: attributes only (testA with a colour,
    testB without); RefCOCOg: expressions relating two objects.
    """
    name = f"{dataset}_{split}"
    kinds = REFER_KINDS[dataset][split]
    rng = w.ctx.rng(f"eval:{name}")
    rows, items = [], {}
    image_no = 0
    while len(rows) < w.size:
        scene = w.scene(rng, f"eval-{name}-{image_no}")
        image_id = base_id + image_no
        image_no += 1
        found = 0
        for k in rng.sample(range(len(scene.objects)), len(scene.objects)):
            specs = [s for s in referring_expressions(scene, k, kinds) if _refcocop_split_ok(dataset, split, s)]
            if not specs or len(rows) >= w.size or found == 2:
                continue
            spec = rng.choice(specs)
            o = scene.objects[k]
            img_id = f"COCO_train2014_{image_id:012}_{k}"
            rows.append({"img_id": img_id, "sents": spec.text(), "bbox": list(o.box), "height": scene.height,
                         "width": scene.width})
            items[img_id] = {"category": "refer", "kind": spec.kind, "answer": box_text(scene, o),
                             "bbox": list(o.box), "scene": scene.id, "image": f"coco/train2014/{img_id[:27]}.jpg",
                             "query": spec.text()}
            found += 1
        if found:
            w.save(scene, f"coco/train2014/COCO_train2014_{image_id:012}.jpg", name)
    w.add_set(name, f"{dataset}/{name}.json", rows, items)


def _refcocop_split_ok(dataset: str, split: str, spec: RefSpec) -> bool:
    """RefCOCO+ testA keeps expressions with a colour, testB those without; everything else keeps all."""
    if dataset != "refcoco+" or split == "val":
        return True
    return (split == "testA") == (spec.colour is not None)


def write_eval_sets(ctx: WorldContext, size: int) -> dict[str, Any]:
    """Every eval set under ``out/eval``; returns the ``meta.json`` content."""
    w = EvalWriter(ctx, size)
    for fn in (write_gqa, write_vsr, write_vizwiz, write_hm, write_iconqa):
        fn(w)
    base = 900000
    for dataset, splits in SPLITS.items():
        for split in splits:
            write_refcoco(w, dataset, split, base)
            base += 10000
    return w.finish()


def category_breakdown(meta: dict[str, Any] | str | Path, results_dir: str | Path,
                       mode: str = "standard") -> dict[str, dict[str, dict[str, float]]]:
    """``{set: {category: {"n", "accuracy"}}}`` from ``results_dir/<set>/answers.jsonl`` (as written by
    :func:`tinygptv.eval.run_eval`), scoring each record with its benchmark's ``mode`` rule; items without a
    usable answer count 0."""
    if not isinstance(meta, dict):
        meta = json.loads(Path(meta).read_text(encoding="utf-8"))
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, info in meta["sets"].items():
        path = Path(results_dir) / name / ANSWERS_FILE
        if not path.is_file():
            continue
        records = read_answers(path)
        bench = BENCHMARKS[name]
        sums: dict[str, list[float]] = {}
        for item_id, item in info["items"].items():
            rec = records.get(item_id)
            value = 0.0
            if rec and not rec.get("error"):
                try:
                    value = float(bench.score_record(rec, mode)["accuracy"])
                except KeyError:
                    value = 0.0
            sums.setdefault(item["category"], []).append(value)
        out[name] = {c: {"n": len(v), "accuracy": 100.0 * sum(v) / len(v)} for c, v in sorted(sums.items())}
    return out
