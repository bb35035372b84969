"""VizWiz-VQA, val split (evaluation.md §3.4; official reference §7.3).

Layout (``DATA_ROOT/vizwiz/``)::

    val.json                         [{image, question, answers: [10 × {answer, answer_confidence}],
                                       answer_type, answerable}]
    images/{image} or val/{image}    e.g. images/VizWiz_val_00000000.jpg

The id of a question is its image name (unique per question in VizWiz).

Paper mode (``eval_scripts/eval_vqa.py``): prompt ``[vqa] The question is '{question}' Based on the image,
answer the question with a single word or phrase. and reply 'unanswerable' when the provided information is
insufficient`` (grammar verbatim). The answer is cut at ``###`` and after ``Assistant:``. Quirks kept:

- the human answers are joined with ``_`` and split on ``_``, so an answer containing ``_`` becomes several;
- each piece scores a hit if equal to, contained in, or containing the answer (lowercased, no normalisation);
  an empty answer is contained in every piece and scores 1.0;
- item accuracy is ``min(hits / 3, 1)`` without the 10-choose-9 averaging.

Standard mode (same prompt and generation): cut at ``###``, official VQA normalisation of prediction and human
answers (always), 10-choose-9 VQA accuracy. ``accuracy_unanswerable`` is the same metric over the questions with
``answerable == 0`` (failures included).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tinygptv.eval.base import (Benchmark, MalformedRecord, Request, Sample, Scored, cut_turn, first_existing,
                                paper_prompt, require, standard_answer, upstream_cleanup)
from tinygptv.eval.normalize import vqa_accuracy

VIZWIZ_INSTRUCTION = ("[vqa] The question is '{}' Based on the image, answer the question with a single word or "
                      "phrase. and reply 'unanswerable' when the provided information is insufficient")


def paper_vizwiz_accuracy(answer: str, human_answers: list[str]) -> float:
    """TinyGPT-V's VizWiz item score (see the module docstring)."""
    a = answer.lower()
    hits = 0
    for gt in "_".join(human_answers).split("_"):
        g = gt.lower()
        if g == a or g in a or a in g:
            hits += 1
    return min(hits / 3.0, 1.0)


class VizWiz(Benchmark):
    name = "vizwiz"
    title = "VizWiz-VQA (val)"
    paper_key = "vizwiz"
    annotation_candidates = ("vizwiz/val.json",)
    layout = "vizwiz/val.json + vizwiz/images/<image> (or vizwiz/val/<image>)"

    def fallback_id(self, index: str, raw: Any) -> str:
        if isinstance(raw, dict) and isinstance(raw.get("image"), str):
            return raw["image"]
        return f"#{index}"

    def parse(self, index: str, raw: Any, root: Path) -> Sample:
        image = require(raw, "image", str)
        question = require(raw, "question", str)
        answers = []
        for item in require(raw, "answers", list):
            value = item.get("answer") if isinstance(item, dict) else item
            if not isinstance(value, str):
                raise MalformedRecord("an entry of 'answers' has no string 'answer'")
            answers.append(value)
        if not answers:
            raise MalformedRecord("'answers' is empty")
        gt = {"answers": answers, "answerable": raw.get("answerable"), "answer_type": raw.get("answer_type")}
        rel = first_existing(root, (f"vizwiz/images/{image}", f"vizwiz/val/{image}"))
        return Sample(id=image, image=rel, inputs={"question": question}, gt=gt)

    def requests(self, inputs: dict[str, Any], mode: str) -> list[Request]:
        return [Request("gen", "generate", paper_prompt(VIZWIZ_INSTRUCTION.format(inputs["question"])))]

    def score_record(self, record: dict[str, Any], mode: str) -> dict[str, float]:
        gen = record["outputs"]["gen"]
        answers = record["gt"]["answers"]
        if mode == "paper":
            return {"accuracy": paper_vizwiz_accuracy(cut_turn(upstream_cleanup(gen)), answers)}
        return {"accuracy": vqa_accuracy(standard_answer(gen), answers)}

    def aggregate(self, scored: Scored, mode: str) -> dict[str, Any]:
        out = super().aggregate(scored, mode)
        if mode == "standard":
            subset = [v["accuracy"] if v else 0.0 for rec, v in scored if (rec.get("gt") or {}).get("answerable") == 0]
            out["n_unanswerable"] = len(subset)
            out["accuracy_unanswerable"] = 100.0 * sum(subset) / len(subset) if subset else None
        return out
