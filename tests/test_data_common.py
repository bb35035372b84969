"""Helpers shared by the data tests (fixture writers, a forcing RNG, the supervised-text check). No tests here."""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from tinygptv.model.sequence import Example, build_batch
from tinygptv.tokenizer import Tokenizer

TOKENIZER = Tokenizer.byte_level()


def write_image(path: Path, size: tuple[int, int] = (40, 30), color: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def jpeg_bytes(size: tuple[int, int] = (12, 10), color: tuple[int, int, int] = (10, 200, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def write_json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def write_tar(path: Path, members: Sequence[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


class PickRng(random.Random):
    """A Random whose ``choice``/``choices`` always take element ``k`` (mod length): readable goldens."""

    def __init__(self, k: int = 0):
        super().__init__(0)
        self.k = k

    def choice(self, seq: Sequence[Any]) -> Any:
        return seq[self.k % len(seq)]

    def choices(self, population: Sequence[Any], weights: Any = None, *, cum_weights: Any = None,
                k: int = 1) -> list[Any]:
        return [population[self.k % len(population)]] * k


def supervised_text(example: Example, with_image: bool) -> str:
    """Decode exactly the label positions ``build_batch`` keeps (byte-level tokenizer, pad = bos = eos)."""
    embed = nn.Embedding(TOKENIZER.vocab_size, 4)
    images = [torch.zeros(1, 2, 4)] if with_image else [None]
    batch = build_batch([example], images, TOKENIZER, embed, TOKENIZER.eos_id, TOKENIZER.eos_id)
    labels = batch.labels[0]
    return TOKENIZER.decode(labels[labels != -100].tolist())


def assert_masks_answer(example: Example, with_image: bool, answer_with_end: str) -> None:
    """Only the answer (+ end symbol) is supervised, and it sits at the end of the real tokens."""
    assert supervised_text(example, with_image) == answer_with_end
    embed = nn.Embedding(TOKENIZER.vocab_size, 4)
    images = [torch.zeros(1, 2, 4)] if with_image else [None]
    batch = build_batch([example], images, TOKENIZER, embed, TOKENIZER.eos_id, TOKENIZER.eos_id)
    sup = (batch.labels[0] != -100).nonzero().flatten().tolist()
    n = len(TOKENIZER.encode(answer_with_end))
    assert len(sup) == n and sup == list(range(sup[0], sup[0] + n))
    assert sup[-1] == int(batch.attention_mask[0].sum()) - 1


def parts(example: Example) -> tuple[str | None, list[tuple[str, bool]], tuple[int, ...]]:
    return example.condition, list(example.targets), tuple(example.bos_before)
