"""Caption datasets: LAION / CC+SBU tar shards (stages 1–2), cc_sbu_align (stage 3), COCO caption and
TextCaps (stage 4 ``[caption]``)."""

from __future__ import annotations

import glob
import json
import posixpath
import random
import re
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tinygptv.data.processors import ALIGNMENT_PROMPTS, CAPTION_PROMPTS, blip_caption
from tinygptv.data.readers.base import (AnnotatedImageReader, BadRecord, MapReader, PathLike, Reader, Sample, field, ident, log,
                                        read_json, records_of_list, text)
from tinygptv.model.sequence import Example
from tinygptv.templates import ChatTemplate

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{00000..00012}`` (zero-padded to the width of the first bound) and ``{a,b}`` groups."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    rng = _RANGE.match(body)
    if rng:
        lo, hi = int(rng.group(1)), int(rng.group(2))
        width = len(rng.group(1))
        step = 1 if hi >= lo else -1
        choices = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    else:
        choices = body.split(",")
    head, tail = pattern[:m.start()], pattern[m.end():]
    return [head + c + rest for c in choices for rest in expand_braces(tail)]


def expand_shards(spec: PathLike | Sequence[PathLike]) -> list[Path]:
    """Shard paths from a brace pattern, a glob (sorted), a single path, or a list of those."""
    if isinstance(spec, (str, Path)):
        out: list[Path] = []
        for item in expand_braces(str(spec)):
            if any(ch in item for ch in "*?["):
                out.extend(Path(p) for p in sorted(glob.glob(item)))
            else:
                out.append(Path(item))
        return out
    return [p for s in spec for p in expand_shards(s)]


def _tar_groups(shard: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """WebDataset grouping: consecutive members sharing the name up to the first dot of the basename."""
    with tarfile.open(shard, mode="r|*") as tf:
        key: str | None = None
        files: dict[str, bytes] = {}
        for member in tf:
            if not member.isfile():
                continue
            base = posixpath.basename(member.name)
            if base.startswith(("__", ".")) or "." not in base:
                continue
            stem, ext = base.split(".", 1)
            member_key = posixpath.join(posixpath.dirname(member.name), stem)
            handle = tf.extractfile(member)
            data = handle.read() if handle is not None else b""
            if member_key != key:
                if key is not None:
                    yield key, files
                key, files = member_key, {}
            files[ext.lower()] = data
        if key is not None:
            yield key, files


class WebDatasetCaptionReader(Reader):
    """LAION / CC+SBU image–caption pairs in WebDataset tar shards (``jpg`` + ``json`` with ``caption``).

    Stage 1–2 example: ``Example(None, [(blip_caption(caption) + "\\n", True)])`` (image tokens only as the
    condition). Shards are read with :mod:`tarfile`; rank ``r`` of ``w`` reads shards ``i`` with
    ``i % w == r``, drawing the next shard at random with replacement (as upstream's ``ResampledShards``);
    within a shard samples come in file order (upstream's 1000-sample shuffle buffer is not reproduced).

    Args:
        shards: brace pattern (``.../{00000..01255}.tar``), glob, single path, or a list of those.
    """

    default_name = "laion"
    default_template = "pretrain"
    streaming = True
    IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")

    def __init__(self, shards: PathLike | Sequence[PathLike], *, template: ChatTemplate | str | None = None,
                 name: str | None = None):
        super().__init__(template=template, name=name)
        self.shard_spec = shards
        self.shards = expand_shards(shards)
        self.check_layout()

    def layout(self) -> list[tuple[str, Path, str]]:
        if not self.shards:
            return [("tar shards (pattern matches nothing)", Path(str(self.shard_spec)), "file")]
        return [("tar shard", p, "file") for p in self.shards]

    def rank_shards(self, rank: int, world: int) -> list[Path]:
        """Shard ``i`` belongs to rank ``i % world``; with fewer shards than ranks every rank reads all."""
        mine = self.shards[rank::world]
        if not mine:
            log.warning("%s: %d shard(s) for %d ranks; rank %d reads all shards", self.name, len(self.shards),
                        world, rank)
            return list(self.shards)
        return mine

    def make_sample(self, shard: Path, key: str, files: dict[str, bytes]) -> Sample:
        image = next((files[e] for e in self.IMAGE_EXTS if e in files), None)
        if image is None:
            raise BadRecord(f"no image member (have {sorted(files)})")
        if "json" not in files:
            raise BadRecord(f"no json member (have {sorted(files)})")
        try:
            meta = json.loads(files["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadRecord(f"json member is not valid JSON: {exc}") from exc
        caption = field(meta, "caption", str)
        example = Example(None, [(blip_caption(caption) + self.template.end_sym, True)])
        return Sample(image, example, {"dataset": self.name, "shard": str(shard), "key": key})

    def _read_shard(self, shard: Path, skip: int) -> Iterator[tuple[Sample | None, int]]:
        """``(sample or None for a bad record, groups consumed so far)`` from ``shard``, after ``skip`` groups."""
        n = 0
        try:
            for key, files in _tar_groups(shard):
                n += 1
                if n <= skip:
                    continue
                try:
                    yield self.make_sample(shard, key, files), n
                except BadRecord as exc:
                    self.record_bad(f"{shard}:{key}", exc)
                    yield None, n
        except (tarfile.TarError, OSError, EOFError) as exc:
            self.record_bad(f"{shard}", f"unreadable tar shard after {n} sample(s): {exc}")
            yield None, n

    def iterate(self, rng: random.Random, rank: int = 0, world: int = 1, shard: int | None = None,
                offset: int = 0) -> Iterator[tuple[Sample | None, int, int]]:
        """Endless stream of ``(sample or None, shard index, groups consumed in that shard)``.

        ``shard``/``offset`` resume inside a shard (indices into :meth:`rank_shards`); the next shard is
        ``rng.choice`` so restoring ``rng``'s state restores the stream exactly.
        """
        mine = self.rank_shards(rank, world)
        current, skip = shard, offset
        while True:
            if current is None:
                current, skip = rng.randrange(len(mine)), 0
            empty = True
            for sample, n in self._read_shard(mine[current], skip):
                empty = False
                yield sample, current, n
            if empty:  # nothing left in this shard: report progress so callers can bound their retries
                yield None, current, skip
            current = None

    def iter_samples(self, rng: random.Random | None = None) -> Iterator[Sample]:
        """One sequential pass over all shards in order (for inspection and tests)."""
        for shard in self.shards:
            for sample, _ in self._read_shard(shard, 0):
                if sample is not None:
                    yield sample


class CcSbuAlignReader(MapReader):
    """Stage 3: ``<root>/filter_cap.json`` (``{"annotations": [{image_id, caption}]}``) + ``<root>/image/``.

    Example: ``###Human: <Img><ImageHere></Img> {alignment prompt} ###Assistant: `` → raw caption + ``###``;
    one alignment prompt is drawn per batch (:meth:`batch_context`) and shared by its samples.
    """

    default_name = "cc_sbu_align"
    default_template = "stage3"

    def __init__(self, root: PathLike, *, template: ChatTemplate | str | None = None, name: str | None = None):
        self.root = Path(root)
        super().__init__(template=template, name=name)

    def layout(self) -> list[tuple[str, Path, str]]:
        return [("annotation file", self.root / "filter_cap.json", "file"),
                ("image folder", self.root / "image", "dir")]

    def load(self) -> list[Any]:
        path = self.root / "filter_cap.json"
        return self.collect(records_of_list(path, read_json(path), "annotations"),
                            lambda r: [(ident(r, "image_id"), text(r, "caption"))])

    def batch_context(self, rng: random.Random) -> str:
        return rng.choice(ALIGNMENT_PROMPTS)

    def build(self, entry: Any, rng: random.Random, batch: Any) -> Sample:
        image_id, caption = entry
        prompt = batch if batch is not None else self.batch_context(rng)
        example = Example(self.template.user_format.format(prompt), [(caption + self.template.end_sym, True)])
        return Sample(str(self.root / "image" / f"{image_id}.jpg"), example, {"image_id": image_id})


class _CaptionInstructReader(AnnotatedImageReader):
    """Stage-4 captioning: ``[caption] {random caption prompt}`` → blip-processed caption."""

    task = "[caption]"

    def build(self, entry: Any, rng: random.Random, batch: Any) -> Sample:
        file_name, caption, image_id = entry
        prompt = rng.choice(CAPTION_PROMPTS)
        example = self.instruct(f"[caption] {prompt}", blip_caption(caption))
        return Sample(str(self.image_root / file_name), example, {"image_id": image_id})


class CocoCaptionReader(_CaptionInstructReader):
    """COCO Karpathy train json (``[{image: "train2014/...jpg", caption, image_id}]``); only entries whose
    ``image`` contains ``"train"`` are kept; the image is the basename under ``image_root``."""

    default_name = "coco_caption"

    def load(self) -> list[Any]:
        def parse(r: Any) -> list[Any]:
            image = text(r, "image")
            entry = (posixpath.basename(image), text(r, "caption"), r.get("image_id"))
            if "train" not in image:
                self.filtered += 1
                return []
            return [entry]

        return self.collect(records_of_list(self.ann_path, read_json(self.ann_path)), parse)


class TextCapsReader(_CaptionInstructReader):
    """TextCaps ``TextCaps_0.1_train.json`` (``{"data": [{image_id, caption_str}]}``); image ``{image_id}.jpg``."""

    default_name = "textcaps_caption"

    def load(self) -> list[Any]:
        def parse(r: Any) -> list[Any]:
            image_id = ident(r, "image_id")
            return [(f"{image_id}.jpg", text(r, "caption_str"), image_id)]

        return self.collect(records_of_list(self.ann_path, read_json(self.ann_path), "data"), parse)

