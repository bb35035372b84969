"""Dataset registry: upstream builder key → reader class, default paths under a data root, task tag.

Default layout under ``--data-root`` (override any path per dataset; absolute overrides are used as is)::

    laion/laion_dataset/*.tar            cc_sbu/cc_sbu_dataset/*.tar        cc_sbu_align/{filter_cap.json,image/}
    coco/train2014/                      coco_captions/coco_karpathy_train.json
    vqav2/{vqa_train,vqa_val}.json       okvqa/okvqa_train.json             aokvqa/aokvqa_v1p0_train.json
    gqa/{train_balanced_questions.json,images/}                            ocrvqa/{dataset.json,images/}
    textcaps/{TextCaps_0.1_train.json,train_images/}
    refcoco_annotations/{refcoco,refcoco+,refcocog}/{instances.json,refs(unc|umd).p}
    visual_genome/{region_descriptions.json,image_data.json,VG_100K/,VG_100K_2/}
    flickr/{groundedcaption.json,captiontobbox.json,phrasetobbox.json,flickr30k-images/}
    llava/{detail_23k,complex_reasoning_77k,conversation_58k}.json
    multitask_conversation/multitask_conversation.json
    unnatural_instructions/filtered_unnatural_instruction.json
    custom/{train.jsonl,images/}
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinygptv.data.custom import CustomJsonlReader
from tinygptv.data.mixing import MixtureDataset
from tinygptv.data.readers import (AOKVQAReader, CcSbuAlignReader, CocoCaptionReader, FlickrCaptionToPhraseReader,
                                   FlickrGroundedCaptionReader, FlickrObjectToPhraseReader, GQAReader,
                                   InvRefCOCOReader, LlavaConversationReader, LlavaDetailReader, LlavaReasonReader,
                                   MultitaskConversationReader, OCRVQAReader, Reader, RefCOCOReader, TextCapsReader,
                                   UnnaturalInstructionReader, VisualGenomeReader, VQAReader,
                                   WebDatasetCaptionReader)

PathSpec = str | tuple[str, ...]


@dataclass(frozen=True)
class DatasetSpec:
    """How to build one dataset: reader class, constructor path arguments (relative to the data root),
    task tag of its instructions (``None`` = no tag), and fixed constructor options."""

    reader: type[Reader]
    paths: Mapping[str, PathSpec]
    task: str | None
    options: Mapping[str, Any] = field(default_factory=dict)


_COCO14 = "coco/train2014"
_REF = "refcoco_annotations"
_FLICKR = "flickr/flickr30k-images"

DATASETS: dict[str, DatasetSpec] = {
    # stages 1-2
    "laion": DatasetSpec(WebDatasetCaptionReader, {"shards": "laion/laion_dataset/*.tar"}, None),
    "cc_sbu": DatasetSpec(WebDatasetCaptionReader, {"shards": "cc_sbu/cc_sbu_dataset/*.tar"}, None),
    # stage 3
    "cc_sbu_align": DatasetSpec(CcSbuAlignReader, {"root": "cc_sbu_align"}, None),
    # stage 4
    "coco_caption": DatasetSpec(CocoCaptionReader, {"ann_path": "coco_captions/coco_karpathy_train.json",
                                                    "image_root": _COCO14}, "[caption]"),
    "coco_vqa": DatasetSpec(VQAReader, {"ann_paths": ("vqav2/vqa_train.json", "vqav2/vqa_val.json"),
                                        "image_root": _COCO14}, "[vqa]"),
    "ok_vqa": DatasetSpec(VQAReader, {"ann_paths": ("okvqa/okvqa_train.json",), "image_root": _COCO14}, "[vqa]"),
    "aok_vqa": DatasetSpec(AOKVQAReader, {"ann_paths": ("aokvqa/aokvqa_v1p0_train.json",),
                                          "image_root": "coco/train2017"}, "[vqa]"),
    "gqa": DatasetSpec(GQAReader, {"ann_paths": ("gqa/train_balanced_questions.json",), "image_root": "gqa/images"},
                       "[vqa]"),
    "ocrvqa": DatasetSpec(OCRVQAReader, {"ann_path": "ocrvqa/dataset.json", "image_root": "ocrvqa/images"}, "[vqa]"),
    "textcaps_caption": DatasetSpec(TextCapsReader, {"ann_path": "textcaps/TextCaps_0.1_train.json",
                                                     "image_root": "textcaps/train_images"}, "[caption]"),
    "refcoco": DatasetSpec(RefCOCOReader, {"ann_root": _REF, "image_root": _COCO14}, "[refer]",
                           {"dataset": "refcoco", "split_by": "unc"}),
    "refcocop": DatasetSpec(RefCOCOReader, {"ann_root": _REF, "image_root": _COCO14}, "[refer]",
                            {"dataset": "refcoco+", "split_by": "unc"}),
    "refcocog": DatasetSpec(RefCOCOReader, {"ann_root": _REF, "image_root": _COCO14}, "[refer]",
                            {"dataset": "refcocog", "split_by": "umd"}),
    "invrefcoco": DatasetSpec(InvRefCOCOReader, {"ann_root": _REF, "image_root": _COCO14}, "[identify]",
                              {"dataset": "refcoco", "split_by": "unc"}),
    "invrefcocop": DatasetSpec(InvRefCOCOReader, {"ann_root": _REF, "image_root": _COCO14}, "[identify]",
                               {"dataset": "refcoco+", "split_by": "unc"}),
    "invrefcocog": DatasetSpec(InvRefCOCOReader, {"ann_root": _REF, "image_root": _COCO14}, "[identify]",
                               {"dataset": "refcocog", "split_by": "umd"}),
    "refvg": DatasetSpec(VisualGenomeReader, {"data_dir": "visual_genome"}, "[refer]"),
    "flickr_grounded_caption": DatasetSpec(FlickrGroundedCaptionReader, {"ann_path": "flickr/groundedcaption.json",
                                                                         "image_root": _FLICKR}, "[grounding]"),
    "flickr_CaptionToPhrase": DatasetSpec(FlickrCaptionToPhraseReader, {"ann_path": "flickr/captiontobbox.json",
                                                                        "image_root": _FLICKR}, "[detection]"),
    "flickr_ObjectToPhrase": DatasetSpec(FlickrObjectToPhraseReader, {"ann_path": "flickr/phrasetobbox.json",
                                                                      "image_root": _FLICKR}, "[detection]"),
    "llava_detail": DatasetSpec(LlavaDetailReader, {"ann_path": "llava/detail_23k.json", "image_root": _COCO14},
                                None),
    "llava_reason": DatasetSpec(LlavaReasonReader, {"ann_path": "llava/complex_reasoning_77k.json",
                                                    "image_root": _COCO14}, None),
    "llava_conversation": DatasetSpec(LlavaConversationReader, {"ann_path": "llava/conversation_58k.json",
                                                                "image_root": _COCO14}, None),
    "multitask_conversation": DatasetSpec(MultitaskConversationReader,
                                          {"ann_path": "multitask_conversation/multitask_conversation.json",
                                           "image_root": _COCO14}, None),
    "unnatural_instruction": DatasetSpec(UnnaturalInstructionReader,
                                         {"ann_path": "unnatural_instructions/filtered_unnatural_instruction.json"},
                                         None),
    "custom": DatasetSpec(CustomJsonlReader, {"ann_path": "custom/train.jsonl", "image_root": "custom/images"}, None),
}

# (batch size per rank, ratio) of the reference configs (§4.4–4.5); stage 4 = tinygptv_stage4.yaml.
UPSTREAM_MIXTURES: dict[str, dict[str, tuple[int, float]]] = {
    "stage1": {"laion": (64, 115), "cc_sbu": (64, 14)},
    "stage2": {"laion": (64, 115), "cc_sbu": (64, 14)},
    "stage3": {"cc_sbu_align": (6, 1)},
    "stage4": {
        "multitask_conversation": (1, 50), "llava_conversation": (1, 30), "unnatural_instruction": (1, 10),
        "refvg": (3, 40), "llava_detail": (2, 20), "llava_reason": (2, 80), "flickr_grounded_caption": (1, 80),
        "flickr_CaptionToPhrase": (1, 80), "flickr_ObjectToPhrase": (1, 80), "textcaps_caption": (3, 30),
        "refcoco": (3, 25), "refcocop": (3, 25), "refcocog": (3, 25), "invrefcoco": (3, 10),
        "invrefcocop": (3, 10), "invrefcocog": (3, 10), "coco_vqa": (3, 15), "ok_vqa": (3, 8), "aok_vqa": (3, 12),
        "gqa": (3, 50),
    },
}


def dataset_spec(name: str) -> DatasetSpec:
    """The spec of a registered dataset; an unknown name fails listing the valid ones."""
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    return DATASETS[name]


def _resolve(root: Path, value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_resolve(root, v) for v in value]
    path = Path(value)
    return str(path if path.is_absolute() else root / path)


def build_reader(name: str, data_root: str | Path, paths: Mapping[str, Any] | None = None, **options: Any) -> Reader:
    """Construct dataset ``name``'s reader with its default paths under ``data_root``.

    ``paths`` overrides path arguments (relative ones resolve under ``data_root``); ``options`` are passed to
    the reader (e.g. ``template=``). The reader checks its layout at once (:class:`DataLayoutError`).
    """
    spec = dataset_spec(name)
    merged = {**spec.paths, **(paths or {})}
    unknown = set(merged) - set(spec.paths)
    if unknown:
        raise ValueError(f"dataset {name!r}: unknown path argument(s) {sorted(unknown)}; valid: {sorted(spec.paths)}")
    root = Path(data_root)
    resolved = {k: _resolve(root, v) for k, v in merged.items()}
    kwargs = {**spec.options, **options}
    kwargs.setdefault("name", name)
    return spec.reader(**resolved, **kwargs)


def build_mixture(config: Mapping[str, Mapping[str, Any]] | str, data_root: str | Path) -> list[MixtureDataset]:
    """Mixture members from ``{name: {batch_size, ratio, paths?, options?, dataset?}}`` or an upstream stage
    name (``"stage1"`` … ``"stage4"``, see :data:`UPSTREAM_MIXTURES`). ``dataset`` names the registry key when
    the mixture name differs (e.g. two ``custom`` files)."""
    if isinstance(config, str):
        if config not in UPSTREAM_MIXTURES:
            raise KeyError(f"unknown stage mixture {config!r}; valid: {sorted(UPSTREAM_MIXTURES)}")
        config = {n: {"batch_size": b, "ratio": r} for n, (b, r) in UPSTREAM_MIXTURES[config].items()}
    out = []
    for name, cfg in config.items():
        reader = build_reader(cfg.get("dataset", name), data_root, cfg.get("paths"), **cfg.get("options", {}))
        reader.name = name
        out.append(MixtureDataset(name, reader, int(cfg["batch_size"]), float(cfg.get("ratio", 1.0))))
    return out
