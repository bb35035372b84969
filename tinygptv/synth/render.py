"""Rendering a :class:`~tinygptv.synth.world.Scene` to a PIL image, and encoding it deterministically."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

from tinygptv.synth.font import word_mask
from tinygptv.synth.world import COLOURS, WORD_INK, Scene, shape_polygon

SUPERSAMPLE = 2
JPEG_QUALITY = 92


def render(scene: Scene, size: int | tuple[int, int] | None = None) -> Image.Image:
    """The scene as an RGB image of ``scene.size``: shapes drawn at 2× and downsampled (smooth edges), the
    word pasted crisp, then the optional background grain. ``size`` (a side or ``(width, height)``) resizes
    the result bicubically, e.g. to preview what a model sees; the description's boxes stay in scene pixels."""
    k = SUPERSAMPLE
    img = Image.new("RGB", (scene.width * k, scene.height * k), scene.background)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        x, y, w, h = obj.box
        # the unit polygon stretched onto the tight box, so the drawing fills exactly the described box
        points = shape_polygon(obj.shape, 0.0, 0.0, 1.0)
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        sx, sy = w / (max(xs) - min(xs)), h / (max(ys) - min(ys))
        poly = [((x + (px - min(xs)) * sx) * k, (y + (py - min(ys)) * sy) * k) for px, py in points]
        draw.polygon(poly, fill=COLOURS[obj.colour])
    img = img.resize((scene.width, scene.height), Image.LANCZOS)
    if scene.word is not None:
        mask = word_mask(scene.word.text, scene.word.scale)
        img.paste(Image.new("RGB", mask.size, WORD_INK), scene.word.box[:2], mask)
    if scene.noise > 0:
        rng = np.random.default_rng(scene.noise_seed)
        grain = rng.normal(0.0, scene.noise, size=(scene.height, scene.width, 1))
        arr = np.asarray(img, dtype=np.float32) + grain
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")
    if size is not None:
        img = img.resize((size, size) if isinstance(size, int) else size, Image.BICUBIC)
    return img


def encode(img: Image.Image, fmt: str = "JPEG") -> bytes:
    """Image file bytes (JPEG quality 92 or PNG); identical input gives identical bytes."""
    buf = io.BytesIO()
    if fmt.upper() == "JPEG":
        img.save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=False, progressive=False)
    else:
        img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def contact_sheet(images: list[Image.Image], columns: int = 8, cell: int = 160,
                  labels: list[str] | None = None) -> Image.Image:
    """A grid of images (each letterboxed into ``cell`` px) for eyeballing a world; optional caption lines."""
    rows = (len(images) + columns - 1) // columns
    label_h = 12 if labels else 0
    sheet = Image.new("RGB", (columns * cell, rows * (cell + label_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        thumb = im.copy()
        thumb.thumbnail((cell - 4, cell - 4))
        sheet.paste(thumb, (c * cell + 2, r * (cell + label_h) + 2))
        if labels:
            draw.text((c * cell + 2, r * (cell + label_h) + cell - 2), labels[i][:26], fill=(0, 0, 0))
    return sheet
