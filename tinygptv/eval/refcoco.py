"""RefCOCO / RefCOCO+ / RefCOCOg referring-expression comprehension (evaluation.md §3.6; reference §7.3).

Layout — the MiniGPT-v2 evaluation files that ``eval_scripts/eval_ref.py`` reads
(``{eval_file_path}/{dataset}/{dataset}_{split}.json``), with ``eval_file_path`` = the data root::

    refcoco/refcoco_{val,testA,testB}.json      lists of {img_id: "COCO_train2014_000000580957_4",
    refcoco+/refcoco+_{val,testA,testB}.json     sents: "man on left", bbox: [x, y, w, h] (pixels),
    refcocog/refcocog_{val,test}.json            height, width}, one sentence per row
    coco/train2014/{img_id[:27]}.jpg            COCO train2014 images

The raw UNC/UMD REFER layout (``refs(unc).p`` pickles + ``instances.json``) is not read: the upstream evaluator
does not read it, the sentence counts of evaluation.md are those of the files above, and unpickling downloaded
files is unsafe. Each row is one sentence; the id is its ``img_id``, suffixed ``#k`` for the k-th repeat
(several sentences of one referred object share an ``img_id``; each counts separately, as upstream).

Paper mode: prompt ``[refer] give me the location of {sents}``; greedy, 20 tokens, no BOS. Quirks kept:

- ``<unk>`` and **all** spaces are removed, then ``\\{<\\d{1,3}><\\d{1,3}><\\d{1,3}><\\d{1,3}>\\}`` must match at the
  *start* (``re.match``: trailing text allowed); otherwise the output is dropped, i.e. scored wrong
  (``n_unmatched``);
- the first four integers of the output, ×width/100 and ×height/100 of the *original* image (from the record);
- IoU with the legacy +1-pixel convention; hit iff IoU **> 0.5** (strict); an empty union (inverted box) raises
  upstream and is scored wrong;
- ``accuracy_resample`` models ``--resample``: with greedy decoding a re-query returns the same text, which
  upstream accepts unconditionally in round 4 and scores from its first four integers (if any).

Standard mode (same prompt and generation): cut at ``###``; tolerant parsing (the first ``<a><b><c><d>`` group,
braces and spaces optional, else the first four integers); rescale to the original size; swap inverted corners
and clip to the image; continuous IoU; hit iff IoU **≥ 0.5** (lmms-eval and VLMEvalKit use ``>=``). Also
``mean_iou`` (×100) and ``n_unparsable``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tinygptv.eval.base import Benchmark, MalformedRecord, Request, Sample, paper_prompt, require, standard_answer, \
    upstream_cleanup
from tinygptv.eval.metrics import (PAPER_BOX_PATTERN, clip_and_order, grid_to_pixels, iou, iou_plus_one,
                                   parse_box_tolerant, xywh_to_xyxy)

REFER_INSTRUCTION = "[refer] give me the location of {}"
GRID_RES = 100.0
SPLITS = {"refcoco": ("val", "testA", "testB"), "refcoco+": ("val", "testA", "testB"), "refcocog": ("val", "test")}
PAPER_TITLES = {"refcoco": "RefCOCO", "refcoco+": "RefCOCO+", "refcocog": "RefCOCOg"}


def paper_refcoco_hit(text: str, bbox_xywh: list[float], width: float, height: float,
                      require_pattern: bool = True) -> tuple[bool, bool]:
    """``(hit, matched)`` for one output under the upstream rules (see the module docstring)."""
    answer = upstream_cleanup(text).replace("<unk>", "").replace(" ", "").strip()
    matched = PAPER_BOX_PATTERN.match(answer) is not None
    if require_pattern and not matched:
        return False, matched
    ints = [int(v) for v in re.findall(r"\d+", answer)]
    if len(ints) < 4:
        return False, matched
    pred = grid_to_pixels(ints[:4], width, height, GRID_RES)
    try:
        return iou_plus_one(pred, xywh_to_xyxy(bbox_xywh)) > 0.5, matched
    except ZeroDivisionError:
        return False, matched


class RefCOCO(Benchmark):
    """One dataset/split pair, e.g. ``RefCOCO("refcoco+", "testA")`` → registry name ``refcoco+_testA``."""

    paper_key = None  # the TinyGPT-V paper reports no REC numbers (issue #16)

    def __init__(self, dataset: str, split: str):
        if split not in SPLITS.get(dataset, ()):
            raise ValueError(f"unknown split {dataset}/{split}; valid: {SPLITS}")
        self.dataset, self.split = dataset, split
        self.name = f"{dataset}_{split}"
        self.title = f"{PAPER_TITLES[dataset]} {split}"
        self.annotation_candidates = (f"{dataset}/{dataset}_{split}.json",)
        self.layout = f"{dataset}/{dataset}_{split}.json + coco/train2014/<img_id[:27]>.jpg"

    def fallback_id(self, index: str, raw: Any) -> str:
        if isinstance(raw, dict) and isinstance(raw.get("img_id"), str):
            return raw["img_id"]
        return f"#{index}"

    def parse(self, index: str, raw: Any, root: Path) -> Sample:
        img_id = require(raw, "img_id", str)
        sents = require(raw, "sents")
        bbox = require(raw, "bbox", list)
        width = require(raw, "width", (int, float))
        height = require(raw, "height", (int, float))
        if len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox):
            raise MalformedRecord(f"bbox must be 4 numbers [x, y, w, h], got {bbox!r}")
        if width <= 0 or height <= 0:
            raise MalformedRecord(f"bad image size {width}x{height}")
        # upstream formats ``sents`` with an f-string whatever its type; keep that text verbatim
        return Sample(id=img_id, image=f"coco/train2014/{img_id[:27]}.jpg", inputs={"sents": f"{sents}"},
                      gt={"bbox": bbox, "width": width, "height": height})

    def requests(self, inputs: dict[str, Any], mode: str) -> list[Request]:
        return [Request("gen", "generate", paper_prompt(REFER_INSTRUCTION.format(inputs["sents"])))]

    def score_record(self, record: dict[str, Any], mode: str) -> dict[str, float]:
        gen = record["outputs"]["gen"]
        gt = record["gt"]
        w, h = gt["width"], gt["height"]
        if mode == "paper":
            hit, matched = paper_refcoco_hit(gen, gt["bbox"], w, h)
            hit_resample, _ = paper_refcoco_hit(gen, gt["bbox"], w, h, require_pattern=False)
            return {"accuracy": float(hit), "accuracy_resample": float(hit_resample), "n_unmatched": float(not matched)}
        grid = parse_box_tolerant(standard_answer(gen))
        if grid is None:
            return {"accuracy": 0.0, "mean_iou": 0.0, "n_unparsable": 1.0}
        pred = clip_and_order(grid_to_pixels(grid, w, h, GRID_RES), w, h)
        value = iou(pred, xywh_to_xyxy(gt["bbox"]))
        return {"accuracy": float(value >= 0.5), "mean_iou": value, "n_unparsable": 0.0}

    def metric_names(self, mode: str) -> tuple[str, ...]:
        return ("accuracy", "accuracy_resample") if mode == "paper" else ("accuracy", "mean_iou")

    def count_names(self, mode: str) -> tuple[str, ...]:
        return ("n_unmatched",) if mode == "paper" else ("n_unparsable",)


def refcoco_benchmarks() -> list[RefCOCO]:
    return [RefCOCO(ds, split) for ds, splits in SPLITS.items() for split in splits]
