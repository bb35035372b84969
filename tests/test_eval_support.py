"""Shared helpers for the evaluation tests: 5-record fixtures in each benchmark's published layout, written
with tiny PIL images, and a scripted predictor whose answers are chosen per question.

Imported by the other ``test_eval_*`` modules; it holds no tests itself.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image


class ScriptedPredictor:
    """A fake :class:`tinygptv.eval.Predictor`.

    ``generations`` maps a marker (a substring unique to one prompt, e.g. the question) to the text returned;
    ``logprobs`` maps ``(marker, continuation)`` to the summed log-probability. ``count_tokens`` counts
    characters, so mean NLLs are easy to compute by hand. Every call is logged in ``calls``.
    """

    def __init__(self, generations: dict[str, str] | None = None,
                 logprobs: dict[tuple[str, str], float] | None = None, default_generation: str | None = None):
        self.generations = generations or {}
        self.logprobs = logprobs or {}
        self.default_generation = default_generation
        self.calls: list[tuple[str, str, str | None]] = []

    def _marker(self, prompt: str, keys) -> str:
        hits = [k for k in keys if k in prompt]
        if len(hits) != 1:
            raise KeyError(f"prompt matches {len(hits)} scripted markers: {prompt!r}")
        return hits[0]

    def generate(self, images, prompts, max_new_tokens):
        assert len(images) == len(prompts) and max_new_tokens == 20
        out = []
        for prompt in prompts:
            self.calls.append(("generate", prompt, None))
            if self.default_generation is not None and not any(k in prompt for k in self.generations):
                out.append(self.default_generation)
            else:
                out.append(self.generations[self._marker(prompt, self.generations)])
        return out

    def loglikelihood(self, items):
        out = []
        for _image, prompt, continuation in items:
            self.calls.append(("loglikelihood", prompt, continuation))
            markers = {m for m, _ in self.logprobs}
            out.append(self.logprobs[(self._marker(prompt, markers), continuation)])
        return out

    def count_tokens(self, texts):
        return [len(t) for t in texts]

    def n_calls(self, kind: str) -> int:
        return sum(1 for c in self.calls if c[0] == kind)


def image(path: Path, size=(32, 24), color=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def write_jsonl(path: Path, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


# --------------------------------------------------------------------------------------------------- GQA
GQA_ROWS = [  # (question_id, question, label, scripted generation)
    ("q1", "What color is the car?", "red", "red"),  # exact hit
    ("q2", "Is the sky blue?", "yes", "Yes."),  # case + trailing period
    ("q3", "How many dogs are there?", "2", "two"),  # number word
    ("q4", "Where is the cup?", "table", "the table"),  # article
    ("q5", "Is there a cat?", "no", "Nothing.###Human: Is it no?###Assistant: no"),  # substring + hallucinated turn
]


def make_gqa(root: Path) -> ScriptedPredictor:
    rows = [{"image": f"n{i}.jpg", "question": q, "answer": a, "question_id": qid}
            for i, (qid, q, a, _) in enumerate(GQA_ROWS, 1)]
    write_json(root / "gqa" / "testdev_balanced_questions.json", rows)
    for i in range(1, 6):
        image(root / "gqa" / "images" / f"n{i}.jpg")
    return ScriptedPredictor({q: g for _, q, _, g in GQA_ROWS})


# --------------------------------------------------------------------------------------------------- VSR
VSR_ROWS = [  # (caption, label, generation, folder)
    ("The cat is on the table.", 1, "True", "train2017"),
    ("The dog is under the bed.", 1, "yes", "train2017"),
    ("The car is left of the man.", 1, "not true", "train2017"),
    ("The cup is behind the laptop.", 0, "false", "train2017"),
    ("The bird is above the tree.", 0, "I cannot tell", "val2017"),  # val2017 fallback
]


def make_vsr(root: Path) -> ScriptedPredictor:
    rows = []
    for i, (caption, label, _, folder) in enumerate(VSR_ROWS):
        name = f"00000000000{i}.jpg"
        rows.append({"image": name, "image_link": f"http://images.cocodataset.org/{folder}/{name}",
                     "caption": caption, "label": label, "relation": "x", "subj": "a", "obj": "b"})
        image(root / "vsr" / "images" / folder / name)
    write_jsonl(root / "vsr" / "test.jsonl", rows)
    return ScriptedPredictor({c: g for c, _, g, _ in VSR_ROWS})


# --------------------------------------------------------------------------------------------------- IconQA
ICONQA_ROWS = [  # (pid, question, choices, gold)
    ("101", "Is the shape a circle?", ["yes", "no"], 0),
    ("102", "How many stars are there?", ["1", "2", "3"], 2),
    ("103", "Which letter comes next?", ["a", "b", "c", "d", "e"], 4),
    ("104", "Which vehicle is shown?", ["red_car", "blue"], 1),
    ("105", "Which animal is shown?", ["cat", "dog"], 1),
]
ICONQA_LOGPROBS = {  # summed log-probabilities; count_tokens = characters
    ("circle", "yes\n"): -2.0, ("circle", "no\n"): -3.0,
    ("circle", "yes###"): -4.8, ("circle", "no###"): -4.5,
    ("stars", "1\n"): -4.0, ("stars", "2\n"): -2.0, ("stars", "3\n"): -1.0,
    ("stars", "1###"): -8.0, ("stars", "2###"): -4.0, ("stars", "3###"): -2.0,
    **{("letter", f"{c}\n"): -4.0 for c in "abcd"}, ("letter", "e\n"): -1.0,
    **{("letter", f"{c}###"): -4.0 for c in "abcd"}, ("letter", "e###"): -2.0,
    ("vehicle", "red\n"): -4.0, ("vehicle", "car\n"): -8.0, ("vehicle", "blue\n"): -0.5,
    ("vehicle", "red_car###"): -20.0, ("vehicle", "blue###"): -3.5,
    ("animal", "cat\n"): -4.0, ("animal", "dog\n"): -4.0, ("animal", "cat###"): -6.0, ("animal", "dog###"): -6.0,
}


def make_iconqa(root: Path) -> ScriptedPredictor:
    write_json(root / "iconqa" / "choose_txt_val.json",
               [{"image_id": pid, "question": q, "choices": c, "answer": a} for pid, q, c, a in ICONQA_ROWS])
    for pid, *_ in ICONQA_ROWS:
        image(root / "iconqa" / "val" / "choose_txt" / pid / "image.png")
    return ScriptedPredictor(logprobs=ICONQA_LOGPROBS)


# --------------------------------------------------------------------------------------------------- VizWiz
VIZWIZ_ROWS = [  # (question, answers, answerable, generation)
    ("What color is this shirt?", ["red"] * 10, 1, "red"),
    ("What color is the mug?", ["blue"] * 3 + ["green"] * 7, 1, "blue"),
    ("What is written here?", ["unanswerable"] * 6 + ["blurry"] * 4, 0, "Unanswerable###Human: What now?"),
    ("What drink is this?", ["coca cola"] * 2 + ["coke"] * 8, 1, "Coca-Cola"),
    ("What is on the screen?", ["unanswerable"] * 5 + ["no idea"] * 5, 0, ""),
]


def make_vizwiz(root: Path) -> ScriptedPredictor:
    rows = []
    for i, (q, answers, answerable, _) in enumerate(VIZWIZ_ROWS):
        name = f"VizWiz_val_0000000{i}.jpg"
        rows.append({"image": name, "question": q,
                     "answers": [{"answer": a, "answer_confidence": "yes"} for a in answers],
                     "answer_type": "other" if answerable else "unanswerable", "answerable": answerable})
        image(root / "vizwiz" / "images" / name)
    write_json(root / "vizwiz" / "val.json", rows)
    return ScriptedPredictor({q: g for q, _, _, g in VIZWIZ_ROWS})


# --------------------------------------------------------------------------------------------------- Hateful Memes
HM_ROWS = [  # (id, text, label, generation, lp_yes, lp_no)
    (11, "you are all wonderful", 1, "Yes", -0.5, -1.5),
    (12, "have a nice day", 0, "No", -2.0, -1.0),
    (13, "look at this cat", 0, "not hateful", -1.0, -1.0),
    (14, "what a time to be alive", 1, "I don't know", -1.0, -2.0),
    (15, "sunny weather again", 1, "Maybe", -1.0, -1.0),
]


def make_hm(root: Path) -> ScriptedPredictor:
    write_jsonl(root / "hm" / "dev_seen.jsonl",
                [{"id": i, "img": f"img/{i}.png", "label": label, "text": text} for i, text, label, *_ in HM_ROWS])
    for i, *_ in HM_ROWS:
        image(root / "hm" / "img" / f"{i}.png")
    logprobs = {}
    for _, text, _, _, lp_yes, lp_no in HM_ROWS:
        logprobs[(text, "yes")] = lp_yes
        logprobs[(text, "no")] = lp_no
    return ScriptedPredictor({text: g for _, text, _, g, *_ in HM_ROWS}, logprobs)


# --------------------------------------------------------------------------------------------------- RefCOCO
REFCOCO_ROWS = [  # (img_id, sentence, bbox xywh, generation); images are 200 x 100
    ("COCO_train2014_000000000001_1", "left dog", [20, 10, 60, 40], "{<10><10><40><50>}###Human: and the cat?"),
    ("COCO_train2014_000000000001_2", "big box", [0, 0, 49, 49], "{<0><0><12><49>}"),
    ("COCO_train2014_000000000002_1", "right box", [0, 0, 100, 50], "{<0> <0> <25> <50>}"),
    ("COCO_train2014_000000000002_2", "the cup", [10, 10, 20, 20], "<10><20><30>"),
    ("COCO_train2014_000000000001_1", "dog on the left", [20, 10, 60, 40], "<10><10><40><50>"),
]


def make_refcoco(root: Path, dataset: str = "refcoco", split: str = "val") -> ScriptedPredictor:
    write_json(root / dataset / f"{dataset}_{split}.json",
               [{"img_id": i, "sents": s, "bbox": b, "height": 100, "width": 200} for i, s, b, _ in REFCOCO_ROWS])
    for name in ("COCO_train2014_000000000001", "COCO_train2014_000000000002"):
        image(root / "coco" / "train2014" / f"{name}.jpg", size=(200, 100))
    return ScriptedPredictor({f"location of {s}###": g for _, s, _, g in REFCOCO_ROWS})


MAKERS = {"gqa": make_gqa, "vsr": make_vsr, "iconqa": make_iconqa, "vizwiz": make_vizwiz, "hm": make_hm,
          "refcoco_val": make_refcoco}
