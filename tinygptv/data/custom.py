"""The custom JSONL format for your own instruction data (full description: ``tinygptv/data/FORMAT.md``).

One JSON object per line (blank lines are ignored)::

    {"id": "ex-1", "image": "cats/001.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhere is the cat?"},
                       {"from": "gpt", "value": "On the sofa <box:0>."}],
     "boxes": [[12, 30, 200, 150]]}

- ``image``: path relative to the image root (default: the JSONL file's folder) or absolute; ``null`` or
  absent for a text-only record.
- ``conversations``: human/gpt turns alternating, starting with human and ending with gpt, non-empty values.
  ``<image>`` may appear in the first human turn only and is removed: the image always precedes the first
  question, as in every upstream dataset.
- ``boxes`` (optional, needs an image): ``[x, y, w, h]`` pixel boxes of the original image; ``<box:k>`` in any
  turn is replaced by box ``k`` as grid text ``{<x1><y1><x2><y2>}`` (0–100, truncated).
- Text is used as written (no lowercasing), like the upstream conversation datasets; every answer ends with
  the template's end symbol; a record with several pairs becomes a multi-turn example (reference §5.6).
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Any

import numpy as np

from tinygptv.data.processors import box_to_text
from tinygptv.data.readers.base import BadRecord, MapReader, PathLike, Sample, image_size, number_list
from tinygptv.image import ImageError
from tinygptv.model.sequence import Example, multi_turn
from tinygptv.templates import ChatTemplate, get_template
from tinygptv.tokenizer import Tokenizer

log = logging.getLogger("tinygptv.data")

IMAGE_TAG = "<image>"
BOX_REF = re.compile(r"<box:(\d+)>")
ROLES = ("human", "gpt")
ERROR_KINDS = ("json", "schema", "role", "empty", "image_tag", "image_missing", "image_unreadable", "box")
BOX_TOLERANCE = 1.0  # pixels a box may exceed the image border before check_jsonl reports it


class RecordError(BadRecord):
    """A custom-format violation of a given ``kind`` (one of :data:`ERROR_KINDS`)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass
class CustomRecord:
    """A validated record: image path (or ``None``), turn values (``<image>`` removed), pixel boxes."""

    image: str | None
    turns: list[str]
    boxes: list[list[float]]
    id: Any = None


def strip_image_tag(value: str) -> str:
    """Remove ``<image>`` together with the newline that usually separates it from the text."""
    return value.replace(IMAGE_TAG + "\n", "").replace("\n" + IMAGE_TAG, "").replace(IMAGE_TAG, "").strip()


def parse_record(obj: Any, image_root: Path) -> tuple[CustomRecord | None, list[RecordError]]:
    """Validate one decoded line; returns the record (``None`` if unusable) and every problem found."""
    errors: list[RecordError] = []
    if not isinstance(obj, dict):
        return None, [RecordError("schema", f"line is a JSON {type(obj).__name__}, not an object")]
    image = obj.get("image")
    if image is not None and (not isinstance(image, str) or not image.strip()):
        errors.append(RecordError("schema", f"'image' should be a path string or null, got {image!r}"))
        image = None
    conv = obj.get("conversations")
    if not isinstance(conv, list) or not conv:
        return None, errors + [RecordError("schema", "'conversations' should be a non-empty list of turns")]
    turns: list[str] = []
    for i, turn in enumerate(conv):
        want = ROLES[i % 2]
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            errors.append(RecordError("schema", f"turn {i} should be an object with a string 'value'"))
            continue
        if turn.get("from") != want:
            errors.append(RecordError("role", f"turn {i} has role {turn.get('from')!r}, expected {want!r}"))
        value = turn["value"]
        if IMAGE_TAG in value and (i != 0 or image is None):
            where = "a record without image" if image is None else f"turn {i} (only the first human turn may)"
            errors.append(RecordError("image_tag", f"{IMAGE_TAG} in {where}"))
        value = strip_image_tag(value) if i == 0 else value
        if not value.strip():
            errors.append(RecordError("empty", f"turn {i} ({want}) is empty"))
        turns.append(value)
    if len(conv) % 2:
        errors.append(RecordError("role", f"{len(conv)} turns: the conversation must end with a gpt turn"))
    boxes = _parse_boxes(obj.get("boxes"), image, turns, errors)
    if errors:
        return None, errors
    path = None if image is None else str(Path(image) if Path(image).is_absolute() else image_root / image)
    return CustomRecord(path, turns, boxes, obj.get("id")), []


def _parse_boxes(raw: Any, image: Any, turns: list[str], errors: list[RecordError]) -> list[list[float]]:
    boxes: list[list[float]] = []
    if raw is not None:
        if image is None:
            errors.append(RecordError("box", "'boxes' given for a record without image"))
        if not isinstance(raw, list):
            errors.append(RecordError("box", "'boxes' should be a list of [x, y, w, h]"))
            raw = []
        for k, b in enumerate(raw):
            try:
                x, y, w, h = number_list(b, 4, f"box {k}")
            except BadRecord as exc:
                errors.append(RecordError("box", str(exc)))
                continue
            if w <= 0 or h <= 0 or x < 0 or y < 0:
                errors.append(RecordError("box", f"box {k} {b!r}: need x, y >= 0 and w, h > 0"))
            boxes.append([x, y, w, h])
    for t in turns:
        for ref in BOX_REF.findall(t):
            if int(ref) >= len(boxes):
                errors.append(RecordError("box", f"<box:{ref}> but only {len(boxes)} box(es) given"))
    return boxes


def iter_jsonl(path: Path) -> Iterator[tuple[int, Any | RecordError]]:
    """``(line number, decoded object or RecordError("json"))`` for every non-blank line."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                yield lineno, RecordError("json", f"invalid JSON: {exc.msg} (column {exc.colno})")


def record_example(rec: CustomRecord, template: ChatTemplate) -> Example:
    """The templated example of a record (box references resolved with the image's real size)."""
    turns = rec.turns
    if rec.boxes and rec.image is not None and any(BOX_REF.search(t) for t in turns):
        size = image_size(rec.image)
        turns = [BOX_REF.sub(lambda m: box_to_text(rec.boxes[int(m.group(1))], size), t) for t in turns]
    questions = [template.instruction(turns[0], rec.image is not None)] + [q + " " for q in turns[2::2]]
    return multi_turn(template, questions, turns[1::2])


class CustomJsonlReader(MapReader):
    """Reader of the custom JSONL format; bad lines are skipped and logged as ``file:line``.

    Args:
        ann_path: the ``.jsonl`` file.
        image_root: folder relative image paths resolve against (default: the file's folder).
    """

    default_name = "custom"

    def __init__(self, ann_path: PathLike, image_root: PathLike | None = None, *,
                 template: ChatTemplate | str | None = None, name: str | None = None):
        self.ann_path = Path(ann_path)
        self.image_root = Path(image_root) if image_root is not None else self.ann_path.parent
        super().__init__(template=template, name=name)

    def layout(self) -> list[tuple[str, Path, str]]:
        return [("JSONL file", self.ann_path, "file"), ("image folder", self.image_root, "dir")]

    def load(self) -> list[Any]:
        out = []
        for lineno, obj in iter_jsonl(self.ann_path):
            rec, errors = (None, [obj]) if isinstance(obj, RecordError) else parse_record(obj, self.image_root)
            if rec is None:
                self.record_bad(f"{self.ann_path}:{lineno}", "; ".join(f"{e.kind}: {e}" for e in errors))
                continue
            out.append((lineno, rec))
        return out

    def build(self, entry: Any, rng: random.Random, batch: Any) -> Sample:
        lineno, rec = entry
        return Sample(rec.image, record_example(rec, self.template), {"line": lineno, "id": rec.id})


# ------------------------------------------------------------------------------------------ checking
@dataclass
class Issue:
    """One problem of a JSONL file, printable as ``file:line: kind: message``."""

    path: str
    line: int
    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.kind}: {self.message}"


@dataclass
class JsonlReport:
    """Result of :func:`check_jsonl`: every issue plus statistics of the valid records."""

    path: str
    errors: list[Issue] = dc_field(default_factory=list)
    records: int = 0
    valid: int = 0
    turns: int = 0
    images: int = 0
    distinct_images: int = 0
    text_only: int = 0
    token_lengths: dict[str, float] | None = None

    @property
    def ok(self) -> bool:
        return not self.errors

    def kinds(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.errors:
            out[e.kind] = out.get(e.kind, 0) + 1
        return out

    def summary(self, max_errors: int = 50) -> str:
        lines = [str(e) for e in self.errors[:max_errors]]
        if len(self.errors) > max_errors:
            lines.append(f"... {len(self.errors) - max_errors} more")
        lines.append(f"{self.path}: {self.records} records, {self.valid} valid, {self.turns} turns, "
                     f"{self.images} with image ({self.distinct_images} distinct), {self.text_only} text-only, "
                     f"{len(self.errors)} error(s) {self.kinds()}")
        if self.token_lengths:
            lines.append("text tokens per record: " + ", ".join(f"{k} {v:g}" for k, v in self.token_lengths.items()))
        return "\n".join(lines)


def check_jsonl(path: PathLike, image_root: PathLike | None = None, tokenizer: Tokenizer | None = None, *,
                template: ChatTemplate | str = "stage4", check_images: bool = True) -> JsonlReport:
    """Validate a custom JSONL file and gather statistics.

    Reports ``file:line`` for bad JSON, schema errors, wrong roles, empty turns, misplaced ``<image>`` tags,
    missing or unreadable images (``check_images``) and bad boxes (malformed, non-positive, dangling
    ``<box:k>``, or outside the image by more than :data:`BOX_TOLERANCE` px). With a ``tokenizer`` the report
    has percentiles (p50/p90/p99/max) of text tokens per record as the model sees them (template applied,
    image embeddings not counted).
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    tpl = get_template(template) if isinstance(template, str) else template
    report = JsonlReport(str(path))
    lengths: list[int] = []
    images: set[str] = set()
    for lineno, obj in iter_jsonl(path):
        report.records += 1
        rec, errors = (None, [obj]) if isinstance(obj, RecordError) else parse_record(obj, root)
        if rec is not None and check_images and rec.image is not None:
            errors = _check_image(rec)
        report.errors += [Issue(str(path), lineno, e.kind, str(e)) for e in errors]
        if rec is None or errors:
            continue
        report.valid += 1
        report.turns += len(rec.turns)
        if rec.image is None:
            report.text_only += 1
        else:
            report.images += 1
            images.add(rec.image)
        if tokenizer is not None:
            try:
                ex = record_example(rec, tpl)
            except ImageError:
                ex = record_example(CustomRecord(rec.image, rec.turns, []), tpl)
            lengths.append(sum(len(tokenizer.encode(s)) for s in [ex.condition or ""] + [t for t, _ in ex.targets]))
    report.distinct_images = len(images)
    if lengths:
        arr = np.asarray(lengths)
        report.token_lengths = {"p50": float(np.percentile(arr, 50)), "p90": float(np.percentile(arr, 90)),
                                "p99": float(np.percentile(arr, 99)), "max": float(arr.max())}
    return report


def _check_image(rec: CustomRecord) -> list[RecordError]:
    if rec.image is None:
        return []
    if not Path(rec.image).is_file():
        return [RecordError("image_missing", f"image not found: {rec.image}")]
    try:
        width, height = image_size(rec.image)
    except ImageError as exc:
        return [RecordError("image_unreadable", str(exc))]
    errors = []
    for k, (x, y, w, h) in enumerate(rec.boxes):
        if x + w > width + BOX_TOLERANCE or y + h > height + BOX_TOLERANCE:
            errors.append(RecordError("box", f"box {k} [{x:g}, {y:g}, {w:g}, {h:g}] exceeds the "
                                             f"{width}x{height} image"))
    return errors


# ------------------------------------------------------------------------------------------ conversion
@dataclass
class ConvertResult:
    written: int
    skipped: int


def convert_llava_json(src: PathLike, dst: PathLike) -> ConvertResult:
    """Convert LLaVA-format JSON (``[{id, image, conversations: [{from, value}]}]``) to the custom JSONL.

    ``image`` is copied as is (resolve it later with the reader's ``image_root``); ``<image>`` tags are removed
    from the first human turn; records that break the format are skipped and logged with their index.
    """
    src, dst = Path(src), Path(dst)
    data = json.loads(src.read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise ValueError(f"{src}: expected a JSON list of LLaVA records, got {type(data).__name__}")
    written = skipped = 0
    with open(dst, "w", encoding="utf-8") as out:
        for i, rec in enumerate(data):
            line = _llava_to_custom(rec)
            if line is None:
                errors = [RecordError("schema", "not an object with a 'conversations' list")]
            else:
                errors = parse_record(line, Path("."))[1]
            if errors:
                skipped += 1
                log.warning("%s: record %d not converted: %s", src, i, "; ".join(f"{e.kind}: {e}" for e in errors))
                continue
            out.write(json.dumps(line, ensure_ascii=False) + "\n")
            written += 1
    return ConvertResult(written, skipped)


def _llava_to_custom(rec: Any) -> dict[str, Any] | None:
    if not isinstance(rec, dict) or not isinstance(rec.get("conversations"), list):
        return None
    turns = []
    for i, t in enumerate(rec["conversations"]):
        if not isinstance(t, dict):
            return None
        value = t.get("value")
        if i == 0 and isinstance(value, str):
            value = strip_image_tag(value)
        turns.append({"from": t.get("from"), "value": value})
    line: dict[str, Any] = {}
    if "id" in rec:
        line["id"] = rec["id"]
    line["image"] = rec.get("image")
    line["conversations"] = turns
    return line


def export_llava_json(src: PathLike, dst: PathLike) -> int:
    """The inverse of :func:`convert_llava_json` for valid records: ``<image>\\n`` prefixes the first human turn
    of records with an image. Returns the number of records written."""
    src = Path(src)
    out = []
    for lineno, obj in iter_jsonl(src):
        rec, errors = (None, [obj]) if isinstance(obj, RecordError) else parse_record(obj, Path("."))
        if rec is None:
            log.warning("%s:%d not exported: %s", src, lineno, "; ".join(str(e) for e in errors))
            continue
        conv = [{"from": ROLES[i % 2], "value": v} for i, v in enumerate(rec.turns)]
        if obj.get("image") is not None:
            conv[0]["value"] = IMAGE_TAG + "\n" + conv[0]["value"]
        item: dict[str, Any] = {"id": obj["id"]} if "id" in obj else {}
        if obj.get("image") is not None:
            item["image"] = obj["image"]
        item["conversations"] = conv
        out.append(item)
    Path(dst).write_text(json.dumps(out, ensure_ascii=False, indent=1), encoding="utf-8")
    return len(out)
