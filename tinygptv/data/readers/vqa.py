"""VQA datasets of stage 4 (``[vqa]``): COCO-VQA, OK-VQA, A-OKVQA, GQA, OCR-VQA.

Question and answer are both ``blip_caption``-processed; the instruction is one of the two VQA prompts.
COCO-VQA/OK-VQA/A-OKVQA sample one of the annotators' answers with weight = frequency / number of answers.
"""

from __future__ import annotations

import os
import posixpath
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tinygptv.data.processors import VQA_PROMPTS, blip_caption
from tinygptv.data.readers.base import BadRecord, MapReader, PathLike, Sample, field, read_json, records_of_list, text
from tinygptv.model.sequence import Example
from tinygptv.templates import ChatTemplate


def answer_weights(answers: Sequence[str]) -> tuple[list[str], list[float]]:
    """Distinct answers in first-seen order and their weights (each occurrence adds ``1/len(answers)``)."""
    weights: dict[str, float] = {}
    for a in answers:
        weights[a] = weights.get(a, 0.0) + 1 / len(answers)
    return list(weights), list(weights.values())


def _answer_list(rec: Any, key: str) -> list[str]:
    answers = field(rec, key, list)
    if not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        raise BadRecord(f"field {key!r} should be a non-empty list of non-empty strings")
    return answers


class _VQABase(MapReader):
    """Shared layout (annotation file(s) + image folder) and templating."""

    task = "[vqa]"

    def __init__(self, ann_paths: PathLike | Sequence[PathLike], image_root: PathLike, *,
                 template: ChatTemplate | str | None = None, name: str | None = None):
        paths = [ann_paths] if isinstance(ann_paths, (str, Path)) else list(ann_paths)
        self.ann_paths = [Path(p) for p in paths]
        self.image_root = Path(image_root)
        super().__init__(template=template, name=name)

    def layout(self) -> list[tuple[str, Path, str]]:
        return [("annotation file", p, "file") for p in self.ann_paths] + [("image folder", self.image_root, "dir")]

    def vqa_example(self, question: str, answer: str, rng: random.Random) -> Example:
        instruction = rng.choice(VQA_PROMPTS).format(blip_caption(question))
        return self.instruct(instruction, blip_caption(answer))

    def present_images(self) -> set[str]:
        return set(os.listdir(self.image_root))


class VQAReader(_VQABase):
    """COCO-VQA / OK-VQA in the LAVIS layout: a list of ``{question_id, question, answer: [...], image}``.

    Annotations whose image basename is not in ``image_root`` are dropped (with ``image_root`` = train2014,
    the val2014 questions of ``vqa_val.json`` drop out, as upstream).
    """

    default_name = "coco_vqa"
    answer_key = "answer"

    def load(self) -> list[Any]:
        present = self.present_images()

        def parse(r: Any) -> list[Any]:
            image = posixpath.basename(text(r, "image"))
            entry = (image, text(r, "question"), _answer_list(r, self.answer_key), r.get("question_id"))
            if image not in present:
                self.filtered += 1
                return []
            return [entry]

        out: list[Any] = []
        for path in self.ann_paths:
            out += self.collect(records_of_list(path, read_json(path)), parse)
        return out

    def build(self, entry: Any, rng: random.Random, batch: Any) -> Sample:
        image, question, answers, qid = entry
        choices, weights = answer_weights(answers)
        answer = rng.choices(choices, weights=weights, k=1)[0]
        return Sample(str(self.image_root / image), self.vqa_example(question, answer, rng), {"question_id": qid})


class AOKVQAReader(VQAReader):
    """A-OKVQA ``aokvqa_v1p0_train.json``: ``{image, question, direct_answers: [10], ...}``; the answer is
    sampled from ``direct_answers`` like COCO-VQA; images filtered by existence of the basename."""

    default_name = "aok_vqa"
    answer_key = "direct_answers"


class GQAReader(_VQABase):
    """GQA (LAVIS ``train_balanced_questions.json``): a list of ``{image, question, answer}``; image
    ``image_root/{image}``."""

    default_name = "gqa"

    def load(self) -> list[Any]:
        def parse(r: Any) -> list[Any]:
            return [(text(r, "image"), text(r, "question"), text(r, "answer"), r.get("question_id"))]

        out: list[Any] = []
        for path in self.ann_paths:
            out += self.collect(records_of_list(path, read_json(path)), parse)
        return out

    def build(self, entry: Any, rng: random.Random, batch: Any) -> Sample:
        image, question, answer, qid = entry
        return Sample(str(self.image_root / image), self.vqa_example(question, answer, rng), {"question_id": qid})


class OCRVQAReader(_VQABase):
    """OCR-VQA ``dataset.json``: ``{image_key: {imageURL, questions, answers, split, ...}}``; only ``split == 1``
    (train); one sample per question; image ``{image_key}{extension of imageURL}`` (``image_ext`` overrides the
    extension, e.g. ``".jpg"`` for the MiniGPT-v2 download that saved every image as JPEG)."""

    default_name = "ocrvqa"

    def __init__(self, ann_path: PathLike, image_root: PathLike, *, image_ext: str | None = None,
                 template: ChatTemplate | str | None = None, name: str | None = None):
        self.image_ext = image_ext
        super().__init__(ann_path, image_root, template=template, name=name)

    def load(self) -> list[Any]:
        path = self.ann_paths[0]
        data = read_json(path)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object keyed by image id, got {type(data).__name__}")

        def parse(item: tuple[str, Any]) -> list[Any]:
            key, r = item
            split = field(r, "split", int)
            ext = self.image_ext if self.image_ext is not None else os.path.splitext(text(r, "imageURL"))[1]
            qs, ans = field(r, "questions", list), field(r, "answers", list)
            if len(qs) != len(ans):
                raise BadRecord(f"{len(qs)} questions but {len(ans)} answers")
            if not all(isinstance(t, str) and t.strip() for t in qs + ans):
                raise BadRecord("questions and answers should be non-empty strings")
            if split != 1:
                self.filtered += 1
                return []
            return [(f"{key}{ext}", q, a, key) for q, a in zip(qs, ans)]

        return self.collect(((f"{path}: record {k!r}", (k, r)) for k, r in data.items()), parse)

    def build(self, entry: Any, rng: random.Random, batch: Any) -> Sample:
        image, question, answer, key = entry
        return Sample(str(self.image_root / image), self.vqa_example(question, answer, rng), {"image_id": key})


__all__ = ["AOKVQAReader", "GQAReader", "OCRVQAReader", "VQAReader", "answer_weights"]
