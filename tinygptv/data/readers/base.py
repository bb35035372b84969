"""Shared machinery of the dataset readers: the :class:`Sample` record, layout checks, bad-record accounting,
safe pickle loading and the two reader kinds (indexed annotation files, streamed tar shards).

A reader turns a dataset in its published layout into :class:`Sample` records whose :class:`Example` is
already written in the template of its training stage. Readers never load pixels: a sample carries an image
path (or the raw bytes of a tar member) and the dataset wrapper (:mod:`tinygptv.data.mixing`) decodes it,
counting and skipping missing or corrupt images.

Bad input policy:

- a wrong data root fails at construction with :class:`DataLayoutError`, naming every missing path;
- an annotation file that is not valid JSON at all fails with a :class:`ValueError` naming the file;
- a malformed record (missing/ill-typed field, empty text, dangling id) is skipped, counted in
  :attr:`Reader.bad_records` and logged as ``file: record i`` (JSON) or ``file:line`` (JSONL).
"""

from __future__ import annotations

import builtins
import io
import json
import logging
import pickle
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

from PIL import Image, UnidentifiedImageError

from tinygptv.image import ImageError
from tinygptv.model.sequence import Example, single_turn
from tinygptv.templates import ChatTemplate, get_template

log = logging.getLogger("tinygptv.data")

MAX_WARNINGS = 20  # bad records logged at WARNING per reader; the rest at DEBUG
MAX_KEPT_LOCATIONS = 100


class Sample(NamedTuple):
    """One training record: the image (path, raw bytes, or ``None``), the templated example, and metadata."""

    image: str | bytes | None
    example: Example
    meta: dict[str, Any]


class DataLayoutError(FileNotFoundError):
    """A dataset's files are not where its reader expects them (usually a wrong ``--data-root``)."""


class BadRecord(ValueError):
    """A single annotation record is malformed; the reader skips and counts it."""


PathLike = str | Path


# ------------------------------------------------------------------------------------------ safe pickle reading
class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for untrusted files holding only plain containers.

    Only the builtins ``list``, ``dict``, ``str``, ``int`` and ``float`` may be referenced by name (pickles of
    plain data need none of them, but some writers emit them); any other global — i.e. any class or function
    that could run code on load — raises :class:`pickle.UnpicklingError`.
    """

    ALLOWED_NAMES: ClassVar[frozenset[str]] = frozenset({"list", "dict", "str", "int", "float"})

    def find_class(self, module: str, name: str) -> Any:
        if module in ("builtins", "__builtin__") and name in self.ALLOWED_NAMES:
            return getattr(builtins, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from an untrusted pickle")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refusing persistent ids in an untrusted pickle")


def safe_pickle_load(path: PathLike) -> Any:
    """Load a pickle of plain data (lists, dicts, strings, numbers) without executing anything."""
    data = Path(path).read_bytes()
    try:
        return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError as exc:
        raise pickle.UnpicklingError(f"{path}: {exc}") from exc
    except (EOFError, ValueError, TypeError, KeyError, IndexError) as exc:
        raise ValueError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc})") from exc


# ------------------------------------------------------------------------------------------ small helpers
def read_json(path: PathLike) -> Any:
    """Parse a whole JSON file; a broken file fails with its name and the error position."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno})") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc})") from exc


def field(rec: Any, key: str, *types: type) -> Any:
    """``rec[key]`` checked to be one of ``types`` (``bool`` never counts as a number)."""
    if not isinstance(rec, dict):
        raise BadRecord(f"record is a {type(rec).__name__}, not an object")
    if key not in rec:
        raise BadRecord(f"missing field {key!r}")
    value = rec[key]
    if types and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
        names = "/".join(t.__name__ for t in types)
        raise BadRecord(f"field {key!r} should be {names}, got {type(value).__name__}")
    return value


def text(rec: Any, key: str) -> str:
    """A required non-empty string field."""
    value = field(rec, key, str)
    if not value.strip():
        raise BadRecord(f"field {key!r} is empty")
    return value


def ident(rec: Any, key: str) -> str | int:
    """An id field: a non-empty string or an integer."""
    value = field(rec, key, str, int)
    if isinstance(value, str) and not value:
        raise BadRecord(f"field {key!r} is empty")
    return value


def number_list(value: Any, n: int, what: str) -> list[float]:
    """``n`` finite numbers (ints or floats)."""
    if not isinstance(value, (list, tuple)) or len(value) != n:
        raise BadRecord(f"{what} should be a list of {n} numbers, got {value!r}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
            raise BadRecord(f"{what} should be a list of {n} finite numbers, got {value!r}")
        out.append(float(v))
    return out


def image_size(path: PathLike) -> tuple[int, int]:
    """``(width, height)`` from the image header, or :class:`ImageError`."""
    try:
        with Image.open(path) as img:
            return img.size
    except FileNotFoundError as exc:
        raise ImageError(f"image not found: {path}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"cannot read image {path}: {exc}") from exc


# ------------------------------------------------------------------------------------------ readers
class Reader(ABC):
    """Base of every dataset reader.

    Args:
        template: a :class:`ChatTemplate` or a template name; default = the stage the dataset belongs to.
        name: dataset name used in logs and sample metadata (default: the class's registry name).
    """

    default_name: ClassVar[str] = "dataset"
    default_template: ClassVar[str] = "stage4"
    task: ClassVar[str | None] = None
    streaming: ClassVar[bool] = False

    def __init__(self, *, template: ChatTemplate | str | None = None, name: str | None = None):
        self.name = name or self.default_name
        tpl = template if template is not None else self.default_template
        self.template = get_template(tpl) if isinstance(tpl, str) else tpl
        self.bad_records = 0
        self.bad_record_locations: list[str] = []
        self.filtered = 0

    # ---------------------------------------------------------------- layout
    @abstractmethod
    def layout(self) -> list[tuple[str, Path, str]]:
        """``(what, path, kind)`` for every path the reader needs; kind is ``"file"`` or ``"dir"``."""

    def check_layout(self) -> None:
        """Fail fast with every missing path named (called by the constructor before any loading)."""
        missing = []
        for what, path, kind in self.layout():
            ok = path.is_file() if kind == "file" else path.is_dir()
            if not ok:
                state = "is not a directory" if path.exists() else "not found"
                missing.append(f"{what} {state}: {path}")
        if missing:
            raise DataLayoutError(f"dataset {self.name!r} ({type(self).__name__}): " + "; ".join(missing)
                                  + " — check --data-root or this dataset's path overrides")

    # ---------------------------------------------------------------- bad records
    def record_bad(self, where: str, reason: BaseException | str) -> None:
        """Count a skipped record and log ``where`` (``file: record i`` or ``file:line``) with the reason."""
        self.bad_records += 1
        if isinstance(reason, BaseException) and not isinstance(reason, BadRecord):
            reason = f"{type(reason).__name__}: {reason}"
        if len(self.bad_record_locations) < MAX_KEPT_LOCATIONS:
            self.bad_record_locations.append(where)
        level = logging.WARNING if self.bad_records <= MAX_WARNINGS else logging.DEBUG
        log.log(level, "%s: skipping malformed record at %s: %s", self.name, where, reason)

    def collect(self, records: Iterable[tuple[str, Any]], parse: Callable[[Any], list[Any]]) -> list[Any]:
        """Run ``parse`` on each ``(location, record)``; malformed ones are counted and skipped."""
        out: list[Any] = []
        for where, rec in records:
            try:
                out.extend(parse(rec))
            except (BadRecord, KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
                self.record_bad(where, exc)
        return out

    # ---------------------------------------------------------------- templating
    def instruct(self, instruction: str, answer: str, with_image: bool = True) -> Example:
        """Stage-4 single turn: ``[INST] <Img><ImageHere></Img> {instruction}  [/INST]`` → ``answer###``."""
        return single_turn(self.template.user_turn(instruction, with_image), answer, self.template.end_sym)

    def batch_context(self, rng: random.Random) -> Any:
        """Randomness shared by every sample of one batch (stage 3 draws one prompt per batch); default none."""
        return None


class MapReader(Reader):
    """A reader over an in-memory list of validated annotation entries (``len`` + random access)."""

    def __init__(self, *, template: ChatTemplate | str | None = None, name: str | None = None):
        super().__init__(template=template, name=name)
        self.check_layout()
        self.entries: list[Any] = self.load()
        log.info("%s: %d usable records (%d malformed skipped, %d filtered)", self.name, len(self.entries),
                 self.bad_records, self.filtered)

    @abstractmethod
    def load(self) -> list[Any]:
        """Read and validate the annotations; return the usable entries."""

    @abstractmethod
    def build(self, entry: Any, rng: random.Random, batch: Any) -> Sample:
        """The sample of one entry (may raise :class:`ImageError` when it needs the image size)."""

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, index: int, rng: random.Random, batch: Any = None) -> Sample:
        """Sample ``index``; instruction/answer choices come from ``rng``; ``batch`` from :meth:`batch_context`."""
        sample = self.build(self.entries[index], rng, batch)
        sample.meta.setdefault("dataset", self.name)
        sample.meta.setdefault("index", index)
        if self.task is not None:
            sample.meta.setdefault("task", self.task)
        return sample

    def iter_samples(self, rng: random.Random) -> Iterator[Sample]:
        """Every sample in file order (images whose size cannot be read are skipped)."""
        for i in range(len(self)):
            try:
                yield self.get(i, rng, self.batch_context(rng))
            except ImageError as exc:
                log.warning("%s: skipping sample %d: %s", self.name, i, exc)


def records_of_list(path: Path, data: Any, key: str | None = None) -> Iterator[tuple[str, Any]]:
    """``(location, record)`` of a JSON list (optionally under ``data[key]``); a wrong shape fails loudly."""
    if key is not None:
        if not isinstance(data, dict) or key not in data:
            raise ValueError(f"{path}: expected a JSON object with a {key!r} list")
        data = data[key]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    for i, rec in enumerate(data):
        yield f"{path}: record {i}", rec


class AnnotatedImageReader(MapReader):
    """A map reader over one annotation file plus an image folder (the common layout)."""

    def __init__(self, ann_path: PathLike, image_root: PathLike, *, template: ChatTemplate | str | None = None,
                 name: str | None = None):
        self.ann_path, self.image_root = Path(ann_path), Path(image_root)
        super().__init__(template=template, name=name)

    def layout(self) -> list[tuple[str, Path, str]]:
        return [("annotation file", self.ann_path, "file"), ("image folder", self.image_root, "dir")]

