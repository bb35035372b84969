"""Dataset mixing as in the reference runner (§4.6): every step picks ONE dataset with probability
``ratio / sum(ratios)`` and returns one batch of that dataset's batch size; batches never mix datasets.

- Seeding is per rank: the dataset choice and the per-dataset instruction/answer randomness use
  ``random.Random`` streams derived from ``(seed, rank, ...)``; map-style datasets are shuffled each epoch
  with a permutation that is the same on every rank and split ``perm[rank::world]`` (a distributed sampler).
- :meth:`MixtureLoader.state_dict` is the exact data position (RNG states, epoch and cursor of every
  dataset, shard and offset of streamed ones): a loader restored with :meth:`load_state_dict` continues
  with identical batches.
- Images are decoded here; a missing or corrupt image is counted per dataset and the next sample is
  drawn instead. ``num_workers > 0`` decodes a batch's images in a thread pool (order is unchanged).
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from tinygptv.data.readers.base import MapReader, Reader, Sample
from tinygptv.image import ImageError, preprocess
from tinygptv.model.sequence import Example

log = logging.getLogger("tinygptv.data")

MAX_IMAGE_WARNINGS = 20
STATE_VERSION = 1


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any printable parts (stable across runs and platforms)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _rng_state(rng: random.Random) -> list[Any]:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _set_rng_state(rng: random.Random, state: Sequence[Any]) -> None:
    rng.setstate((state[0], tuple(state[1]), state[2]))


def load_pixels(image: str | bytes | None, image_size: int) -> torch.Tensor | None:
    """``[1, 3, S, S]`` preprocessed pixels of a sample's image, or ``None`` for text-only samples."""
    if image is None:
        return None
    return preprocess(image, image_size).unsqueeze(0)


def collate(items: Sequence[tuple[Sample, torch.Tensor | None]]) -> tuple[list[Example], list[torch.Tensor | None]]:
    """``(examples, pixels)`` exactly as :meth:`TinyGPTV.forward` takes them (pixels ``[n, 3, S, S]`` or ``None``)."""
    return [s.example for s, _ in items], [px for _, px in items]


@dataclass
class MixtureDataset:
    """One member of a mixture: a reader, its per-rank batch size and its sampling ratio."""

    name: str
    reader: Reader
    batch_size: int
    ratio: float = 1.0


class MixtureBatch(NamedTuple):
    """One step's batch: which dataset, the examples and pixels for the model, and per-sample metadata."""

    dataset: str
    examples: list[Example]
    pixels: list[torch.Tensor | None]
    meta: list[dict[str, Any]]


class _Source:
    """Per-dataset position, randomness and counters."""

    def __init__(self, spec: MixtureDataset, seed: int, rank: int, world: int):
        self.spec, self.reader, self.name = spec, spec.reader, spec.name
        self.seed, self.rank, self.world = seed, rank, world
        self.rng = random.Random(derive_seed(seed, spec.name, "samples", rank))
        self.bad_images = self.samples = self.batches = 0

    def next_sample(self, batch: Any) -> Sample | None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {"rng": _rng_state(self.rng), "bad_images": self.bad_images, "samples": self.samples,
                "batches": self.batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _set_rng_state(self.rng, state["rng"])
        self.bad_images, self.samples, self.batches = state["bad_images"], state["samples"], state["batches"]


class _MapSource(_Source):
    def __init__(self, spec: MixtureDataset, seed: int, rank: int, world: int):
        super().__init__(spec, seed, rank, world)
        if not isinstance(spec.reader, MapReader):
            raise TypeError(f"dataset {self.name!r}: {type(spec.reader).__name__} is not a map-style reader")
        self.map_reader: MapReader = spec.reader
        if len(self.map_reader) == 0:
            raise ValueError(f"dataset {self.name!r} has no usable records ({self.reader.bad_records} malformed)")
        self.epoch, self.cursor = 0, 0
        self.order = self._order(0)

    def _order(self, epoch: int) -> np.ndarray:
        gen = np.random.default_rng(derive_seed(self.seed, self.name, "order", epoch))
        perm = gen.permutation(len(self.map_reader))
        mine = perm[self.rank::self.world]
        return mine if len(mine) else perm

    def next_sample(self, batch: Any) -> Sample | None:
        if self.cursor >= len(self.order):
            self.epoch, self.cursor = self.epoch + 1, 0
            self.order = self._order(self.epoch)
        index = int(self.order[self.cursor])
        self.cursor += 1
        return self.map_reader.get(index, self.rng, batch)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "kind": "map", "epoch": self.epoch, "cursor": self.cursor,
                "size": len(self.map_reader)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if state["size"] != len(self.map_reader):
            log.warning("%s: dataset size changed since the checkpoint (%d → %d records); data position is "
                        "approximate", self.name, state["size"], len(self.map_reader))
        self.epoch = state["epoch"]
        self.order = self._order(self.epoch)
        self.cursor = min(state["cursor"], len(self.order))


class _StreamSource(_Source):
    def __init__(self, spec: MixtureDataset, seed: int, rank: int, world: int):
        super().__init__(spec, seed, rank, world)
        self.shard: int | None = None
        self.offset = 0
        self._stream = self._open()

    def _open(self) -> Iterator[tuple[Sample | None, int, int]]:
        iterate = getattr(self.reader, "iterate")
        return iterate(self.rng, self.rank, self.world, self.shard, self.offset)

    def next_sample(self, batch: Any) -> Sample | None:
        sample, self.shard, self.offset = next(self._stream)
        return sample

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "kind": "stream", "shard": self.shard, "offset": self.offset,
                "bad_records": self.reader.bad_records}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.shard, self.offset = state["shard"], state["offset"]
        self.reader.bad_records = state["bad_records"]
        self._stream = self._open()


class MixtureLoader:
    """Endless iterator of :class:`MixtureBatch` over a weighted mixture of datasets.

    Args:
        datasets: the members (names must be unique; ratios > 0; batch sizes ≥ 1).
        image_size: square size images are resized to (224 for stages 1–3, 448 for stage 4).
        seed: base seed (upstream uses 42; each rank derives its own streams).
        rank, world_size: this process's data-parallel rank and the number of ranks.
        num_workers: threads decoding images (0 = in the calling thread).
        max_failures: consecutive unusable samples (bad records/images) tolerated within one batch before
            giving up with an error (protects against a dataset whose images are all missing).
    """

    def __init__(self, datasets: Sequence[MixtureDataset], *, image_size: int, seed: int = 42, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, max_failures: int = 1000):
        if not datasets:
            raise ValueError("MixtureLoader needs at least one dataset")
        names = [d.name for d in datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate dataset names in the mixture: {names}")
        for d in datasets:
            if d.batch_size < 1 or not d.ratio > 0:
                raise ValueError(f"dataset {d.name!r}: batch_size must be >= 1 and ratio > 0 "
                                 f"(got {d.batch_size}, {d.ratio})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.image_size, self.seed, self.rank, self.world_size = image_size, seed, rank, world_size
        self.max_failures = max_failures
        self.names = names
        self.ratios = [float(d.ratio) for d in datasets]
        self.rng = random.Random(derive_seed(seed, "mixture", rank))
        self.sources: dict[str, _Source] = {
            d.name: (_StreamSource if d.reader.streaming else _MapSource)(d, seed, rank, world_size) for d in datasets}
        self.steps = 0
        self._pool = ThreadPoolExecutor(num_workers, thread_name_prefix="tinygptv-data") if num_workers > 0 else None

    @property
    def probabilities(self) -> dict[str, float]:
        total = sum(self.ratios)
        return {n: r / total for n, r in zip(self.names, self.ratios)}

    def __iter__(self) -> MixtureLoader:
        return self

    def __next__(self) -> MixtureBatch:
        name = self.rng.choices(self.names, weights=self.ratios, k=1)[0]
        batch = self.next_batch(name)
        self.steps += 1
        return batch

    def next_batch(self, name: str) -> MixtureBatch:
        """One batch of dataset ``name`` (bad records and images are skipped and counted)."""
        src = self.sources[name]
        context = src.reader.batch_context(src.rng)
        items: list[tuple[Sample, torch.Tensor | None]] = []
        misses = 0
        while len(items) < src.spec.batch_size:
            candidates: list[Sample] = []
            while len(candidates) < src.spec.batch_size - len(items):
                try:
                    sample = src.next_sample(context)
                except ImageError as exc:
                    self._bad_image(src, exc)
                    sample = None
                if sample is None:
                    misses = self._miss(src, misses)
                    continue
                candidates.append(sample)
            for sample, pixels in zip(candidates, self._decode(candidates)):
                if isinstance(pixels, BaseException):
                    self._bad_image(src, pixels, sample.meta)
                    misses = self._miss(src, misses)
                    continue
                items.append((sample, pixels))
        src.samples += len(items)
        src.batches += 1
        examples, pixels = collate(items)
        return MixtureBatch(name, examples, pixels, [s.meta for s, _ in items])

    def _decode(self, samples: list[Sample]) -> list[torch.Tensor | None | BaseException]:
        if self._pool is None:
            return [self._load(s) for s in samples]
        return list(self._pool.map(self._load, samples))

    def _load(self, sample: Sample) -> torch.Tensor | None | BaseException:
        try:
            return load_pixels(sample.image, self.image_size)
        except (ImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            return exc

    def _bad_image(self, src: _Source, exc: BaseException, meta: dict[str, Any] | None = None) -> None:
        src.bad_images += 1
        level = logging.WARNING if src.bad_images <= MAX_IMAGE_WARNINGS else logging.DEBUG
        log.log(level, "%s: skipping sample with unusable image (%s)%s", src.name, exc,
                f" {meta}" if meta else "")

    def _miss(self, src: _Source, misses: int) -> int:
        misses += 1
        if misses > self.max_failures:
            raise RuntimeError(f"dataset {src.name!r}: {misses} unusable samples in a row while filling one batch "
                               f"({src.reader.bad_records} bad records, {src.bad_images} bad images so far) — "
                               "check its images and annotations")
        return misses

    # ---------------------------------------------------------------- metrics and resume
    @property
    def counters(self) -> dict[str, dict[str, int]]:
        """Per dataset: batches, samples, bad_records (malformed annotations), bad_images (skipped images)."""
        return {n: {"batches": s.batches, "samples": s.samples, "bad_records": s.reader.bad_records,
                    "bad_images": s.bad_images} for n, s in self.sources.items()}

    def state_dict(self) -> dict[str, Any]:
        """The exact data position (plain Python types; safe for ``torch.save`` and JSON)."""
        return {"version": STATE_VERSION, "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "steps": self.steps, "rng": _rng_state(self.rng),
                "datasets": {n: s.state_dict() for n, s in self.sources.items()}}

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Restore a position saved by :meth:`state_dict` (same datasets; same seed/rank/world when ``strict``)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported data state version {state.get('version')!r}")
        if set(state["datasets"]) != set(self.sources):
            raise ValueError(f"data state has datasets {sorted(state['datasets'])}, loader has {sorted(self.sources)}")
        topology = (state["seed"], state["rank"], state["world_size"])
        if topology != (self.seed, self.rank, self.world_size):
            msg = (f"data state was saved with seed/rank/world {topology}, loader has "
                   f"{(self.seed, self.rank, self.world_size)}")
            if strict:
                raise ValueError(msg + " (pass strict=False to continue from an approximate position)")
            log.warning("%s; continuing from an approximate position", msg)
        _set_rng_state(self.rng, state["rng"])
        self.steps = state["steps"]
        for name, src in self.sources.items():
            src.load_state_dict(state["datasets"][name])

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> MixtureLoader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
