"""Grounding output as data (reference §5.3, §8.1): ``<p>phrase</p> {<x1><y1><x2><y2>}`` boxes on the 0–100 grid,
several joined by ``<delim>``, turned into pixel boxes of the original image, and drawn on request.

Malformed boxes never raise: they are skipped (a box needs four integers in 0..100 with x1 ≤ x2, y1 ≤ y2).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from PIL import Image, ImageDraw

GRID = 100
_BOX = re.compile(r"\{\s*<(-?\d{1,4})>\s*<(-?\d{1,4})>\s*<(-?\d{1,4})>\s*<(-?\d{1,4})>\s*\}")
_PHRASE = re.compile(r"<p>(.*?)</p>", re.S)


@dataclass
class Box:
    x1: float
    y1: float
    x2: float
    y2: float
    label: str | None = None
    grid: tuple[int, int, int, int] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def parse_boxes(text: str, width: int, height: int, grid: int = GRID) -> list[Box]:
    """Every well-formed box in ``text``, in pixels of a ``width × height`` image, with its phrase if any.

    The phrase of a box is the last ``<p>…</p>`` before it and after the previous box (so
    ``<p>a</p> {…}<delim>{…}`` gives both boxes the label ``a``).
    """
    boxes: list[Box] = []
    last_end = 0
    label: str | None = None
    for m in _BOX.finditer(text):
        phrases = _PHRASE.findall(text[last_end:m.start()])
        if phrases:
            label = phrases[-1].strip()
        elif "<delim>" not in text[last_end:m.start()]:
            label = None
        last_end = m.end()
        vals = [int(v) for v in m.groups()]
        x1, y1, x2, y2 = vals
        if not all(0 <= v <= grid for v in vals) or x1 > x2 or y1 > y2:
            continue
        boxes.append(Box(x1 / grid * width, y1 / grid * height, x2 / grid * width, y2 / grid * height, label,
                         (x1, y1, x2, y2)))
    return boxes


def strip_grounding(text: str) -> str:
    """Human-readable text: phrases kept, box and delimiter tokens removed."""
    text = _BOX.sub("", text).replace("<delim>", ", ")
    text = re.sub(r"\s+", " ", _PHRASE.sub(lambda m: m.group(1), text))
    return re.sub(r"\s+([,.;:!?])", r"\1", text).strip(" ,")


COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]


def draw_boxes(image: Image.Image, boxes: list[Box]) -> Image.Image:
    """A copy of ``image`` with the boxes (and labels) drawn."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    width = max(2, round(min(out.size) / 150))
    for i, b in enumerate(boxes):
        colour = COLOURS[i % len(COLOURS)]
        draw.rectangle([b.x1, b.y1, b.x2, b.y2], outline=colour, width=width)
        if b.label:
            draw.text((b.x1 + width + 1, b.y1 + width), b.label, fill=colour)
    return out
