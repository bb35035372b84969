"""Text processing, box text and the instruction pools of the reference training data (§4.7, §5.2–5.5).

- :func:`blip_caption` is the ``blip_caption`` text processor used by every stage (lowercase, a fixed set of
  punctuation turned into spaces, runs of whitespace collapsed, first 50 words kept).
- Boxes are written as ``{<x1><y1><x2><y2>}`` on a 0–100 grid relative to the *original* image size, each
  coordinate truncated with ``int()`` (not rounded); several boxes in one group are joined by ``<delim>``.
- The instruction pools are the upstream strings, verbatim (trailing spaces included).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

BOX_GRID = 100
BOX_DELIM = "<delim>"

_PUNCT = re.compile(r"[.!\"()*#:;~]")
_WS_RUN = re.compile(r"\s{2,}")
_BOX_GROUP = re.compile(r"\{((?:<-?\d+>){4}(?:<delim>(?:<-?\d+>){4})*)\}")
_COORDS = re.compile(r"<(-?\d+)>")
_PHRASE_BOX = re.compile(r"<p>(.*?)</p>\s*\{")


def blip_caption(text: str, max_words: int = 50) -> str:
    """The ``blip_caption`` processor (reference §4.7).

    Steps, in order: lowercase; each of ``. ! " ( ) * # : ; ~`` becomes a space; every run of two or more
    whitespace characters becomes one space (a single newline or tab is left as is, as upstream); trailing
    newlines, then leading/trailing spaces are stripped; only the first ``max_words`` space-separated words
    are kept.
    """
    text = _PUNCT.sub(" ", text.lower())
    text = _WS_RUN.sub(" ", text)
    text = text.rstrip("\n").strip(" ")
    words = text.split(" ")
    if len(words) > max_words:
        text = " ".join(words[:max_words])
    return text


def box_coords(box_xywh: Sequence[float], image_size: tuple[int, int],
               grid: int = BOX_GRID) -> tuple[int, int, int, int]:
    """``[x, y, w, h]`` pixels on an image of ``(width, height)`` → truncated grid corners ``(x1, y1, x2, y2)``."""
    x, y, w, h = (float(v) for v in box_xywh)
    width, height = image_size
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {image_size}")
    return (int(x / width * grid), int(y / height * grid),
            int((x + w) / width * grid), int((y + h) / height * grid))


def box_to_text(box_xywh: Sequence[float], image_size: tuple[int, int], grid: int = BOX_GRID) -> str:
    """``[x, y, w, h]`` pixels → ``"{<x1><y1><x2><y2>}"`` on the 0–``grid`` scale (reference §5.3)."""
    return "{" + _corners(box_coords(box_xywh, image_size, grid)) + "}"


def boxes_to_text(boxes_xywh: Sequence[Sequence[float]], image_size: tuple[int, int], grid: int = BOX_GRID) -> str:
    """Several boxes in one group: ``"{<..><..><..><..><delim><..><..><..><..>}"``."""
    if not boxes_xywh:
        raise ValueError("boxes_to_text needs at least one box")
    return "{" + BOX_DELIM.join(_corners(box_coords(b, image_size, grid)) for b in boxes_xywh) + "}"


def _corners(c: tuple[int, int, int, int]) -> str:
    return "".join(f"<{v}>" for v in c)


def parse_boxes(text: str) -> list[tuple[int, int, int, int]]:
    """Every grid box in ``text``, in order (groups with ``<delim>`` give several boxes)."""
    out = []
    for group in _BOX_GROUP.finditer(text):
        for part in group.group(1).split(BOX_DELIM):
            x1, y1, x2, y2 = (int(v) for v in _COORDS.findall(part))
            out.append((x1, y1, x2, y2))
    return out


def parse_grounded(text: str) -> list[tuple[str | None, list[tuple[int, int, int, int]]]]:
    """``<p>phrase</p> {boxes}`` pairs of a grounded answer; a box group without a phrase gives ``None``."""
    out: list[tuple[str | None, list[tuple[int, int, int, int]]]] = []
    phrases = {m.end() - 1: m.group(1) for m in _PHRASE_BOX.finditer(text)}
    for group in _BOX_GROUP.finditer(text):
        boxes = parse_boxes(group.group(0))
        out.append((phrases.get(group.start()), boxes))
    return out


def text_to_box(corners: Sequence[int], image_size: tuple[int, int], grid: int = BOX_GRID) -> tuple[float, ...]:
    """Grid corners back to pixel corners ``(x1, y1, x2, y2)`` on an image of ``(width, height)``."""
    width, height = image_size
    x1, y1, x2, y2 = corners
    return (x1 / grid * width, y1 / grid * height, x2 / grid * width, y2 / grid * height)


# ---------------------------------------------------------------------------------------------- instruction pools
# Stage 3 (MiniGPT-4 prompts/alignment.txt, the 4 lines that contain <ImageHere>).
ALIGNMENT_PROMPTS: tuple[str, ...] = (
    "<Img><ImageHere></Img> Describe this image in detail.",
    "<Img><ImageHere></Img> Take a look at this image and describe what you notice.",
    "<Img><ImageHere></Img> Please provide a detailed description of the picture.",
    "<Img><ImageHere></Img> Could you describe the contents of this image for me?",
)

# COCO caption and TextCaps; used as "[caption] {prompt}".
CAPTION_PROMPTS: tuple[str, ...] = (
    "Briefly describe this image.",
    "Provide a concise depiction of this image.",
    "Present a short description of this image.",
    "Summarize this image in a few words.",
    "A short image caption:",
    "A short image description:",
    "A photo of ",
    "An image that shows ",
    "Write a short description for the image. ",
    "Write a description for the photo.",
    "Provide a description of what is presented in the photo.",
    "Briefly describe the content of the image.",
    "Can you briefly explain what you see in the image?",
    "Could you use a few words to describe what you perceive in the photo?",
    "Please provide a short depiction of the picture.",
    "Using language, provide a short account of the image.",
    "Use a few words to illustrate what is happening in the picture.",
)

# COCO-VQA, OK-VQA, A-OKVQA, GQA, OCR-VQA; {} = processed question.
VQA_PROMPTS: tuple[str, ...] = (
    "[vqa] {}",
    "[vqa] Based on the image, respond to this question with a short answer: {}",
)

# RefCOCO/+/g and Visual Genome; {} = processed referring expression.
REFER_PROMPTS: tuple[str, ...] = (
    "[refer] {}",
    "[refer] give me the location of {}",
    "[refer] where is {} ?",
    "[refer] from this image, tell me the location of {}",
    "[refer] the location of {} is",
    "[refer] could you tell me the location for {} ?",
    "[refer] where can I locate the {} ?",
)

# InvRefCOCO/+/g; {} = box text.
IDENTIFY_PROMPTS: tuple[str, ...] = (
    "[identify] {}",
    "[identify] what object is in this location {}",
    "[identify] identify the object present at this location {}",
    "[identify] what is it in {}",
    "[identify] describe this object in {}",
    "[identify] this {} is",
    "[identify] the object in {} is",
)

# Flickr grounded caption.
GROUNDING_PROMPTS: tuple[str, ...] = (
    "[grounding] please describe this image in details",
    "[grounding] describe this image as detailed as possible",
    "[grounding] summarize this image in details",
    "[grounding] give a thorough description of what you see in this image",
)

# Flickr CaptionToPhrase / ObjectToPhrase; {} = caption or phrase.
DETECTION_PROMPTS: tuple[str, ...] = ("[detection] {}",)
