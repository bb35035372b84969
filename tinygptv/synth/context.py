"""The state shared by the dataset writers of one generation run: output folder, seeded random streams,
scene bookkeeping (``scenes.jsonl``, signatures for the train/eval split) and the text corpus."""

from __future__ import annotations

import io
import json
import logging
import random
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinygptv.synth.render import encode, render
from tinygptv.synth.world import Scene, sample_scene

log = logging.getLogger("tinygptv.synth")


@dataclass
class WorldContext:
    """One generation run.

    Args:
        out: output root (the data root of the training readers; eval sets go under ``out/eval``).
        seed: the world seed; every dataset draws from its own stream ``random.Random(f"{seed}:{stream}")`` so
            changing one dataset's size leaves the others unchanged.
        image_size: nominal image side (widths and heights vary in ``[0.875, 1.25] ×`` it).
        scale: multiplies every dataset size.
    """

    out: Path
    seed: int
    image_size: int = 128
    scale: float = 1.0
    scene_records: list[dict[str, Any]] = field(default_factory=list)
    signatures: set[str] = field(default_factory=set)
    corpus: list[str] = field(default_factory=list)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    n_images: int = 0

    def rng(self, stream: str) -> random.Random:
        """The random stream ``stream`` of this seed (string seeds hash deterministically across runs)."""
        return random.Random(f"{self.seed}:{stream}")

    def size(self, base: int) -> int:
        """``base`` scaled, at least 1."""
        return max(1, round(base * self.scale))

    def scene(self, rng: random.Random, scene_id: str, **kwargs: Any) -> Scene:
        """A new scene (kwargs go to :func:`sample_scene`); its signature is remembered."""
        scene = sample_scene(rng, scene_id, self.image_size, **kwargs)
        self.signatures.add(scene.signature())
        return scene

    def save_image(self, scene: Scene, rel: str, dataset: str, fmt: str = "JPEG") -> bytes:
        """Render ``scene`` to ``out/rel`` and log it in ``scenes.jsonl``; returns the file bytes."""
        data = encode(render(scene), fmt)
        path = self.out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.note_scene(scene, rel, dataset)
        return data

    def note_scene(self, scene: Scene, image: str, dataset: str) -> None:
        self.scene_records.append({"dataset": dataset, "image": image, "scene": scene.to_dict()})
        self.n_images += 1

    def write_json(self, rel: str, data: Any) -> Path:
        """Compact UTF-8 JSON at ``out/rel``."""
        path = self.out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
        return path

    def write_jsonl(self, rel: str, rows: list[Any]) -> Path:
        path = self.out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        return path

    def text(self, *lines: str) -> None:
        """Add lines to the text corpus (``corpus.txt``), without ``<image>`` tags and extra whitespace."""
        cleaned = (" ".join(line.replace("<image>", " ").split()) for line in lines)
        self.corpus.extend(line for line in cleaned if line)

    def count(self, dataset: str, records: int, images: int) -> None:
        self.counts[dataset] = {"records": records, "images": images}
        log.info("%s: %d records, %d images", dataset, records, images)


@contextmanager
def shard_writer(path: Path) -> Iterator[Callable[[str, bytes], None]]:
    """A WebDataset tar shard with reproducible headers (mtime 0, no owner names, USTAR format); yields
    ``add(member_name, data)``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
            tar.addfile(info, io.BytesIO(data))

        yield add
