"""Words drawn with PIL's built-in bitmap font, cropped to their ink and zoomed by an integer factor
(nearest neighbour), so they stay crisp and legible after the model's downscaling."""

from __future__ import annotations

from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont


@lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont:
    """The classic bitmap font (``load_default_imagefont`` on Pillow ≥ 10.1, where ``load_default`` is a TTF)."""
    loader = getattr(ImageFont, "load_default_imagefont", None)
    return loader() if loader is not None else ImageFont.load_default()


@lru_cache(maxsize=256)
def word_mask(text: str, scale: int) -> Image.Image:
    """An ``L`` mask (255 = ink) of ``text``, cropped to its ink, zoomed ``scale`` times."""
    font = _font()
    left, top, right, bottom = font.getbbox(text)
    canvas = Image.new("L", (right - left + 4, bottom - top + 4), 0)
    ImageDraw.Draw(canvas).text((2 - left, 2 - top), text, fill=255, font=font)
    ink = canvas.getbbox()
    if ink is None:
        raise ValueError(f"the bitmap font draws no ink for {text!r}")
    crop = canvas.crop(ink)
    return crop.resize((crop.width * scale, crop.height * scale), Image.NEAREST)


def word_ink_size(text: str, scale: int) -> tuple[int, int]:
    """``(width, height)`` in pixels of the drawn word."""
    return word_mask(text, scale).size
