"""GQA test-dev balanced (evaluation.md §3.1; official reference §7.3).

Layout (``DATA_ROOT/gqa/``)::

    testdev_balanced_questions.json   LAVIS list [{image, question, answer, question_id}] (what TinyGPT-V reads)
                                      or the official GQA dict {qid: {imageId, question, answer, types, …}}
    images/{image}                    i.e. images/n161313.jpg

Paper mode (``eval_scripts/eval_vqa.py``): prompt ``[vqa] Based on the image, respond to this question with a
short answer: {question}`` in the eval wrapper; greedy, 20 new tokens, no BOS, no stop criterion. Quirks kept:

- correct iff the label is a *substring* of ``answer.lower()`` (``no`` matches ``not``/``nothing``);
- the generation is **not** trimmed at ``###``, so a hallucinated follow-up turn can contain the label;
- the label itself is not lowercased (GQA labels are lowercase already).

Standard mode (same prompt and generation): cut at ``###``, strip, lowercase, ``rstrip('.')``, VQA-normalise
prediction and label, exact match. With the official dict layout it also reports accuracy per
``types.structural``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from tinygptv.eval.base import (Benchmark, MalformedRecord, Request, Sample, Scored, VQA_SHORT_ANSWER, paper_prompt,
                                require, standard_answer, upstream_cleanup)
from tinygptv.eval.normalize import normalize_answer


class GQA(Benchmark):
    name = "gqa"
    title = "GQA (testdev-balanced)"
    paper_key = "gqa"
    annotation_candidates = ("gqa/testdev_balanced_questions.json",)
    layout = "gqa/testdev_balanced_questions.json (LAVIS list or official dict) + gqa/images/<image>"

    def raw_records(self, path: Path) -> Iterable[tuple[str, Any]]:
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):  # official GQA layout: qid -> question
            return ((str(qid), {**q, "question_id": qid} if isinstance(q, dict) else q) for qid, q in data.items())
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list or object")
        return ((str(i), raw) for i, raw in enumerate(data))

    def fallback_id(self, index: str, raw: Any) -> str:
        if isinstance(raw, dict) and raw.get("question_id") is not None:
            return str(raw["question_id"])
        return f"#{index}"

    def parse(self, index: str, raw: Any, root: Path) -> Sample:
        question = require(raw, "question", str)
        answer = require(raw, "answer", str)
        if "image" in raw:
            image = require(raw, "image", str)
        elif "imageId" in raw:
            image = f"{require(raw, 'imageId', str)}.jpg"
        else:
            raise MalformedRecord("missing field 'image' (LAVIS) / 'imageId' (official)")
        qid = raw.get("question_id")
        gt: dict[str, Any] = {"answer": answer}
        structural = (raw.get("types") or {}).get("structural") if isinstance(raw.get("types"), dict) else None
        if structural:
            gt["structural"] = structural
        return Sample(id=str(qid) if qid is not None else f"#{index}", image=f"gqa/images/{image}",
                      inputs={"question": question}, gt=gt)

    def requests(self, inputs: dict[str, Any], mode: str) -> list[Request]:
        return [Request("gen", "generate", paper_prompt(VQA_SHORT_ANSWER.format(inputs["question"])))]

    def score_record(self, record: dict[str, Any], mode: str) -> dict[str, float]:
        gen = record["outputs"]["gen"]
        label = record["gt"]["answer"]
        if mode == "paper":
            return {"accuracy": float(label in upstream_cleanup(gen).lower())}
        pred = standard_answer(gen).lower().rstrip(".")
        return {"accuracy": float(normalize_answer(pred) == normalize_answer(label))}

    def aggregate(self, scored: Scored, mode: str) -> dict[str, Any]:
        out = super().aggregate(scored, mode)
        if mode == "standard":
            by_type: dict[str, list[float]] = {}
            for rec, values in scored:
                kind = (rec.get("gt") or {}).get("structural")
                if kind:
                    by_type.setdefault(kind, []).append(values["accuracy"] if values else 0.0)
            if by_type:
                out["accuracy_by_structural_type"] = {k: 100.0 * sum(v) / len(v) for k, v in sorted(by_type.items())}
        return out
