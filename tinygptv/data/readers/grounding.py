"""Grounding datasets of stage 4: RefCOCO/+/g (``[refer]``) and their inverse (``[identify]``), Visual Genome
regions (``[refer]``), Flickr30k grounded caption (``[grounding]``), CaptionToPhrase and ObjectToPhrase
(``[detection]``).

Boxes are written on the 0–100 grid of the *original* image size (:func:`box_to_text`), so these readers
read the image header when they build a sample; an unreadable image raises :class:`ImageError`, which the
dataset wrapper counts and skips like any bad image.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from tinygptv.data.processors import (DETECTION_PROMPTS, GROUNDING_PROMPTS, IDENTIFY_PROMPTS, REFER_PROMPTS,
                                      blip_caption, box_to_text)
from tinygptv.data.readers.base import (AnnotatedImageReader, BadRecord, MapReader, PathLike, Sample, field, ident, image_size,
                                        number_list, read_json, records_of_list, safe_pickle_load, text)
from tinygptv.templates import ChatTemplate


def _xywh(value: Any, what: str) -> list[float]:
    box = number_list(value, 4, what)
    if box[2] <= 0 or box[3] <= 0:
        raise BadRecord(f"{what} has a non-positive width/height: {value!r}")
    return box


class RefCOCOReader(MapReader):
    """RefCOCO / RefCOCO+ / RefCOCOg through the REFER files.

    Layout: ``<ann_root>/<dataset>/refs(<split_by>).p`` (a pickle of plain dicts: ``ref_id, ann_id, image_id,
    split, sentences[{raw, ...}]``; read with a restricted unpickler) and ``<ann_root>/<dataset>/instances.json``
    (COCO ``annotations`` with ``id`` and ``bbox [x, y, w, h]``); images ``COCO_train2014_{image_id:012}.jpg``
    under ``image_root``. Only refs of ``split`` (``"train"``) are used.

    Refer sample: ``[refer] ...{processed random sentence}...`` → ``{<x1><y1><x2><y2>}``.
    """

    default_name = "refcoco"
    task = "[refer]"
    inverse = False

    def __init__(self, ann_root: PathLike, image_root: PathLike, *, dataset: str = "refcoco", split_by: str = "unc",
                 split: str = "train", template: ChatTemplate | str | None = None, name: str | None = None):
        self.ann_dir = Path(ann_root) / dataset
        self.image_root = Path(image_root)
        self.split_by, self.split = split_by, split
        super().__init__(template=template, name=name)

    @property
    def refs_path(self) -> Path:
        return self.ann_dir / f"refs({self.split_by}).p"

    def layout(self) -> list[tuple[str, Path, str]]:
        return [("REFER refs pickle", self.refs_path, "file"),
                ("REFER instances file", self.ann_dir / "instances.json", "file"),
                ("image folder", self.image_root, "dir")]

    def load(self) -> list[Any]:
        refs = safe_pickle_load(self.refs_path)
        if not isinstance(refs, list):
            raise ValueError(f"{self.refs_path}: expected a list of refs, got {type(refs).__name__}")
        instances_path = self.ann_dir / "instances.json"
        instances = read_json(instances_path)
        if not isinstance(instances, dict) or not isinstance(instances.get("annotations"), list):
            raise ValueError(f"{instances_path}: expected a COCO object with an 'annotations' list")
        anns = {a["id"]: a for a in instances["annotations"] if isinstance(a, dict) and "id" in a}

        def parse(ref: Any) -> list[Any]:
            split = field(ref, "split", str)
            ann_id = field(ref, "ann_id", int, str)
            image_id = ident(ref, "image_id")
            sentences = [text(s, "raw") for s in field(ref, "sentences", list)]
            if not sentences:
                raise BadRecord("no sentences")
            if ann_id not in anns:
                raise BadRecord(f"ann_id {ann_id!r} not found in {instances_path.name}")
            box = _xywh(field(anns[ann_id], "bbox", list), f"bbox of annotation {ann_id!r}")
            if split != self.split:
                self.filtered += 1
                return []
            return [(image_id, sentences, box, ref.get("ref_id"))]

        return self.collect(records_of_list(self.refs_path, refs), parse)

    def build(self, entry: Any, rng: random.Random, batch: Any) -> Sample:
        image_id, sentences, box, ref_id = entry
        path = self.image_root / f"COCO_train2014_{str(image_id):0>12}.jpg"
        expression = blip_caption(rng.choice(sentences))
        box_text = box_to_text(box, image_size(path))
        if self.inverse:
            example = self.instruct(rng.choice(IDENTIFY_PROMPTS).format(box_text), expression)
        else:
            example = self.instruct(rng.choice(REFER_PROMPTS).format(expression), box_text)
        return Sample(str(path), example, {"image_id": image_id, "ref_id": ref_id})


class InvRefCOCOReader(RefCOCOReader):
    """The inverse task on the same files: ``[identify] ...{box}...`` → processed referring expression."""

    default_name = "invrefcoco"
    task = "[identify]"
    inverse = True


class VisualGenomeReader(MapReader):
    """Visual Genome regions as referring expressions (``[refer]``).

    Layout: ``<data_dir>/region_descriptions.json`` (``[{id, regions: [{phrase, x, y, width, height}]}]``),
    ``<data_dir>/image_data.json`` (``[{id|image_id, url}]``); image ``<data_dir>/<last two parts of url>``
    (e.g. ``VG_100K/1.jpg``). Only regions with ``width * height < max_area`` (16384) are used.
    """

    default_name = "refvg"
    task = "[refer]"

    def __init__(self, data_dir: PathLike, *, max_area: float = 16384, template: ChatTemplate | str | None = None,
                 name: str | None = None):
        self.data_dir = Path(data_dir)
        self.max_area = max_area
        super().__init__(template=template, name=name)

    def layout(self) -> list[tuple[str, Path, str]]:
        return [("region descriptions", self.data_dir / "region_descriptions.json", "file"),
                ("image data", self.data_dir / "image_data.json", "file")]

    def load(self) -> list[Any]:
        image_path = self.data_dir / "image_data.json"

        def parse_image(r: Any) -> list[Any]:
            image_id = field(r, "id" if isinstance(r, dict) and "id" in r else "image_id", int, str)
            parts = text(r, "url").rstrip("/").split("/")[-2:]
            return [(image_id, "/".join(parts))]

        images = dict(self.collect(records_of_list(image_path, read_json(image_path)), parse_image))
        regions_path = self.data_dir / "region_descriptions.json"
        out: list[Any] = []
        for where, rec in records_of_list(regions_path, read_json(regions_path)):
            try:
                image_id = field(rec, "id" if isinstance(rec, dict) and "id" in rec else "image_id", int, str)
                regions = field(rec, "regions", list)
                if image_id not in images:
                    raise BadRecord(f"image id {image_id!r} not in {image_path.name}")
            except BadRecord as exc:
                self.record_bad(where, exc)
                continue
            out += self.collect(((f"{where} region {j}", reg) for j, reg in enumerate(regions)),
                                lambda reg, rel=images[image_id], iid=image_id: self._region(reg, rel, iid))
        return out

    def _region(self, reg: Any, rel: str, image_id: Any) -> list[Any]:
        phrase = text(reg, "phrase")
        x, y, w, h = (number_list([field(reg, k) for k in ("x", "y", "width", "height")], 4, "region box"))
        if w * h >= self.max_area:
            self.filtered += 1
            return []
        return [(rel, phrase, (x, y, w, h), image_id)]

    def build(self, entry: Any, rng: random.Random, batch: Any) -> Sample:
        rel, phrase, box, image_id = entry
        path = self.data_dir / rel
        box_text = box_to_text(box, image_size(path))
        example = self.instruct(rng.choice(REFER_PROMPTS).format(blip_caption(phrase)), box_text)
        return Sample(str(path), example, {"image_id": image_id})


class _FlickrReader(AnnotatedImageReader):
    """Flickr30k-derived json lists; image ``{image_id}.jpg`` under ``image_root``; answers are raw text."""

    def load(self) -> list[Any]:
        return self.collect(records_of_list(self.ann_path, read_json(self.ann_path)),
                            lambda r: [(ident(r, "image_id"), *self.fields(r))])

    def fields(self, r: Any) -> tuple[str, ...]:
        raise NotImplementedError

    def image(self, image_id: Any) -> str:
        return str(self.image_root / f"{image_id}.jpg")


class FlickrGroundedCaptionReader(_FlickrReader):
    """``groundedcaption.json``: ``[{image_id, grounded_caption}]`` → ``[grounding] ...`` → grounded caption."""

    default_name = "flickr_grounded_caption"
    task = "[grounding]"

    def fields(self, r: Any) -> tuple[str, ...]:
        return (text(r, "grounded_caption"),)

    def build(self, entry: Any, rng: random.Random, batch: Any) -> Sample:
        image_id, answer = entry
        return Sample(self.image(image_id), self.instruct(rng.choice(GROUNDING_PROMPTS), answer),
                      {"image_id": image_id})


class FlickrCaptionToPhraseReader(_FlickrReader):
    """``captiontobbox.json``: ``[{image_id, caption, output}]`` → ``[detection] {caption}`` → ``output``."""

    default_name = "flickr_CaptionToPhrase"
    task = "[detection]"

    def fields(self, r: Any) -> tuple[str, ...]:
        return text(r, "caption"), text(r, "output")

    def build(self, entry: Any, rng: random.Random, batch: Any) -> Sample:
        image_id, caption, output = entry
        return Sample(self.image(image_id), self.instruct(rng.choice(DETECTION_PROMPTS).format(caption), output),
                      {"image_id": image_id})


class FlickrObjectToPhraseReader(_FlickrReader):
    """``phrasetobbox.json``: ``[{image_id, phrase, bbox}]`` (bbox already grid text) →
    ``[detection] {phrase}`` → ``<p>{phrase}</p> {bbox}``."""

    default_name = "flickr_ObjectToPhrase"
    task = "[detection]"

    def fields(self, r: Any) -> tuple[str, ...]:
        return text(r, "phrase"), text(r, "bbox")

    def build(self, entry: Any, rng: random.Random, batch: Any) -> Sample:
        image_id, phrase, bbox = entry
        answer = "<p>" + phrase + "</p> " + bbox
        return Sample(self.image(image_id), self.instruct(rng.choice(DETECTION_PROMPTS).format(phrase), answer),
                      {"image_id": image_id})
