"""Image loading and the BLIP-2 processor (reference §4.7): bicubic square resize, no crop, CLIP normalisation."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
MAX_PIXELS = 64_000_000  # refuse decompression bombs well before they exhaust memory

ImageInput = Union[str, Path, bytes, Image.Image]


class ImageError(ValueError):
    """An image could not be read: missing, corrupt, or too large."""


def load_image(source: ImageInput, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open a path, raw bytes or PIL image as RGB, with clear errors for bad input."""
    if isinstance(source, Image.Image):
        img = source
        name = "<PIL image>"
    else:
        name = "<bytes>" if isinstance(source, bytes) else str(source)
        if not isinstance(source, bytes) and not Path(source).is_file():
            raise ImageError(f"image not found: {name}")
        try:
            img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        except (UnidentifiedImageError, OSError) as exc:
            raise ImageError(f"cannot read image {name}: {exc}") from exc
    w, h = img.size
    if w * h > max_pixels:
        raise ImageError(f"image {name} has {w}x{h} = {w * h} pixels, more than the limit {max_pixels}")
    try:
        return img.convert("RGB")
    except (OSError, ValueError) as exc:
        raise ImageError(f"cannot decode image {name}: {exc}") from exc


def preprocess(image: ImageInput, size: int) -> torch.Tensor:
    """``[3, size, size]`` float tensor: bicubic resize to a square, scale to [0,1], normalise."""
    img = load_image(image).resize((size, size), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.float32) / 255.0  # [S,S,3]
    arr = (arr - np.asarray(MEAN, dtype=np.float32)) / np.asarray(STD, dtype=np.float32)
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())
