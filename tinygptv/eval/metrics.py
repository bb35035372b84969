"""Metric primitives shared by the benchmarks: AUROC, IoU (both conventions), box parsing, yes/no extraction."""

from __future__ import annotations

import math
import re
from typing import Sequence

from tinygptv.eval.normalize import process_punctuation

Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels

PAPER_BOX_PATTERN = re.compile(r"\{<\d{1,3}><\d{1,3}><\d{1,3}><\d{1,3}>\}")
_TOLERANT_BOX = re.compile(r"<\s*(\d+)\s*>\s*<\s*(\d+)\s*>\s*<\s*(\d+)\s*>\s*<\s*(\d+)\s*>")
_INTEGER = re.compile(r"\d+")


def auroc(scores: Sequence[float], labels: Sequence[int]) -> float | None:
    """Area under the ROC curve as the Mann–Whitney U statistic (a tied positive/negative pair counts 0.5).

    Returns ``None`` when one of the two classes is absent (the AUROC is undefined).
    """
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    if not pos or not neg:
        return None
    wins = 0.0
    for p in pos:
        for n in neg:
            wins += 1.0 if p > n else 0.5 if p == n else 0.0
    return wins / (len(pos) * len(neg))


def p_yes(logprob_yes: float, logprob_no: float) -> float:
    """``softmax([lp_yes, lp_no])[0]``, computed stably."""
    d = logprob_no - logprob_yes
    if d > 0:
        e = math.exp(-d)
        return e / (1.0 + e)
    return 1.0 / (1.0 + math.exp(d))


def iou_plus_one(a: Box, b: Box) -> float:
    """The legacy +1-pixel IoU of MiniGPT-v2's ``computeIoU`` (areas ``(x2-x1+1)(y2-y1+1)``).

    Raises ``ZeroDivisionError`` when the union is 0, as upstream (whose caller then counts the item wrong).
    """
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    inter = ix * iy
    union = (a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1) - inter
    return inter / union


def iou(a: Box, b: Box) -> float:
    """Continuous IoU of two ``x1,y1,x2,y2`` boxes (no +1); 0 when the union is empty."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def parse_box_tolerant(text: str) -> tuple[int, int, int, int] | None:
    """Four grid integers: the first ``<a><b><c><d>`` group (braces and spaces optional), else the first four
    integers of the text; ``None`` when fewer than four integers are present."""
    m = _TOLERANT_BOX.search(text)
    if m:
        return tuple(int(g) for g in m.groups())  # type: ignore[return-value]
    ints = _INTEGER.findall(text)
    if len(ints) < 4:
        return None
    return tuple(int(v) for v in ints[:4])  # type: ignore[return-value]


def grid_to_pixels(grid: Sequence[float], width: float, height: float, res: float = 100.0) -> Box:
    """Grid coordinates (``0..res`` on each axis, relative to the *original* image) → pixels."""
    return (grid[0] / res * width, grid[1] / res * height, grid[2] / res * width, grid[3] / res * height)


def xywh_to_xyxy(bbox: Sequence[float]) -> Box:
    return (bbox[0], bbox[1], bbox[0] + bbox[2], bbox[1] + bbox[3])


def clip_and_order(box: Box, width: float, height: float) -> Box:
    """Swap inverted corners, then clip to the image."""
    x1, x2 = sorted((box[0], box[2]))
    y1, y2 = sorted((box[1], box[3]))
    return (min(max(x1, 0.0), width), min(max(y1, 0.0), height), min(max(x2, 0.0), width), min(max(y2, 0.0), height))


_NEGATORS = frozenset({"not", "never"})


def extract_polarity(text: str, positive: frozenset[str], negative: frozenset[str]) -> int | None:
    """Word-level answer extraction: 1 / 0 / ``None`` (unparsable or ambiguous).

    The text is lowercased, VQA punctuation-processed and split into words. A negator (``not``, ``never`` or a
    word ending in ``n't``) directly before a polar word flips it (``not true`` → negative). The answer is 1
    when only positive words occur, 0 when only negative ones occur, ``None`` when both or neither occur.
    """
    words = process_punctuation(text.lower()).split()
    found: set[int] = set()
    for i, word in enumerate(words):
        if word in positive or word in negative:
            value = 1 if word in positive else 0
            prev = words[i - 1] if i else ""
            if prev in _NEGATORS or prev.endswith("n't"):
                value = 1 - value
            found.add(value)
    return found.pop() if len(found) == 1 else None


YES_WORDS = frozenset({"yes"})
NO_WORDS = frozenset({"no"})
TRUE_WORDS = frozenset({"yes", "true"})
FALSE_WORDS = frozenset({"no", "false"})

__all__ = ["auroc", "p_yes", "iou_plus_one", "iou", "parse_box_tolerant", "grid_to_pixels", "xywh_to_xyxy",
           "clip_and_order", "extract_polarity", "PAPER_BOX_PATTERN", "YES_WORDS", "NO_WORDS", "TRUE_WORDS",
           "FALSE_WORDS"]
