"""The stage-4 datasets that share the COCO train2014 images (``coco/train2014/COCO_train2014_{id:012}.jpg``):
COCO Karpathy captions, COCO-VQA, OK-VQA, RefCOCO / RefCOCO+ / RefCOCOg (REFER files, also read by the
inverse ``invrefcoco*`` datasets), LLaVA detail / reason / conversation and the multitask conversation.

As in the real data, one image pool is annotated by every dataset.
"""

from __future__ import annotations

import pickle
import random
from typing import Any

from tinygptv.synth.context import WorldContext
from tinygptv.synth.dialog import conversation, knowledge, multitask, reasoning, ten_answers, with_image_tag
from tinygptv.synth.text import caption, detail, sample_questions
from tinygptv.synth.world import SHAPES, RefSpec, Scene, full_name, referring_expressions

COCO_POOL = "coco"
CAPTIONS_PER_IMAGE = 3
VQA_PER_IMAGE = 4
VQA_VAL_FRACTION = 0.1  # vqa_val.json questions on val2014 images (absent; dropped by the reader, as upstream)
REFER_DATASETS: dict[str, tuple[str, tuple[str, ...]]] = {  # name -> (split_by, expression kinds)
    "refcoco": ("unc", ("attribute", "spatial")),
    "refcoco+": ("unc", ("attribute",)),
    "refcocog": ("umd", ("relation", "attribute")),
}
# Whether every RefCOCO / RefCOCO+ ref also carries the object's full name (size, colour, shape) among its sentences
# (drawn after the others, so the rest of the world is unchanged): the inverse tasks then answer ``[identify]`` with
# it about as often as with the shortest expression. Off in the bundled world.
REFER_FULL_NAME = False
DETAIL_PROMPTS = ("Describe the following image.", "What do you see in this image?",
                  "Give a detailed description of the image.", "Explain the contents of the picture in detail.")
CATEGORY_IDS = {shape: k + 1 for k, shape in enumerate(SHAPES)}


def coco_file(image_id: int) -> str:
    return f"COCO_train2014_{image_id:012}.jpg"


def write_coco(ctx: WorldContext, n_images: int) -> list[tuple[int, Scene]]:
    """Render the shared pool and write every COCO-image dataset; returns ``(image_id, scene)`` pairs."""
    rng = ctx.rng(COCO_POOL)
    pool = []
    for i in range(n_images):
        image_id = 100000 + i
        scene = ctx.scene(rng, f"coco-{image_id}")
        ctx.save_image(scene, f"coco/train2014/{coco_file(image_id)}", COCO_POOL)
        pool.append((image_id, scene))
    _captions(ctx, pool)
    _vqa(ctx, pool)
    _okvqa(ctx, pool)
    for name, (split_by, kinds) in REFER_DATASETS.items():
        _refer(ctx, pool, name, split_by, kinds)
    _llava(ctx, pool)
    return pool


def _captions(ctx: WorldContext, pool: list[tuple[int, Scene]]) -> None:
    rng = ctx.rng("coco_caption")
    rows = []
    for image_id, scene in pool:
        for _ in range(CAPTIONS_PER_IMAGE):
            text = caption(scene, rng)
            rows.append({"image": f"train2014/{coco_file(image_id)}", "caption": text, "image_id": f"coco_{image_id}"})
            ctx.text(text)
    ctx.write_json("coco_captions/coco_karpathy_train.json", rows)
    ctx.count("coco_caption", len(rows), len(pool))


def _vqa(ctx: WorldContext, pool: list[tuple[int, Scene]]) -> None:
    rng = ctx.rng("coco_vqa")
    train, val = [], []
    for image_id, scene in pool:
        for k, qa in enumerate(sample_questions(scene, rng, VQA_PER_IMAGE)):
            row = {"question_id": image_id * 10 + k, "question": qa.question, "answer": ten_answers(qa, rng),
                   "image": f"train2014/{coco_file(image_id)}", "dataset": "vqa"}
            if rng.random() < VQA_VAL_FRACTION:
                row["image"] = f"val2014/COCO_val2014_{image_id:012}.jpg"
                val.append(row)
            else:
                train.append(row)
            ctx.text(f"{qa.question} {qa.answer}")
    ctx.write_json("vqav2/vqa_train.json", train)
    ctx.write_json("vqav2/vqa_val.json", val)
    ctx.count("coco_vqa", len(train), len(pool))


def _okvqa(ctx: WorldContext, pool: list[tuple[int, Scene]]) -> None:
    rng = ctx.rng("ok_vqa")
    rows = []
    for image_id, scene in pool:
        question, answers, rationale = knowledge(scene, rng)
        rows.append({"question_id": image_id * 10 + 9, "question": question, "answer": answers,
                     "image": f"train2014/{coco_file(image_id)}", "dataset": "okvqa"})
        ctx.text(f"{question} {max(set(answers), key=lambda a: (answers.count(a), a))}", rationale)
    ctx.write_json("okvqa/okvqa_train.json", rows)
    ctx.count("ok_vqa", len(rows), len(pool))


def refer_specs(scene: Scene, index: int, kinds: tuple[str, ...]) -> list[RefSpec]:
    """Unique expressions of one object for a RefCOCO variant, preferring the first kind listed."""
    specs = referring_expressions(scene, index, kinds)
    return sorted(specs, key=lambda s: kinds.index(s.kind))


def _refer(ctx: WorldContext, pool: list[tuple[int, Scene]], name: str, split_by: str,
           kinds: tuple[str, ...]) -> None:
    """REFER layout: ``refcoco_annotations/{name}/refs({split_by}).p`` (pickle of plain dicts) and
    ``instances.json`` (COCO images / annotations / categories)."""
    rng = ctx.rng(name)
    refs: list[dict[str, Any]] = []
    images, annotations = [], []
    sent_id = 0
    for image_id, scene in pool:
        images.append({"id": image_id, "file_name": coco_file(image_id), "width": scene.width,
                       "height": scene.height})
        for k, o in enumerate(scene.objects):
            ann_id = image_id * 10 + k
            x, y, w, h = o.box
            annotations.append({"id": ann_id, "image_id": image_id, "category_id": CATEGORY_IDS[o.shape],
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0,
                                "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
        objects = list(range(len(scene.objects)))
        rng.shuffle(objects)
        for k in objects[:2]:
            specs = refer_specs(scene, k, kinds)
            if kinds[0] == "relation" and specs[0].kind != "relation":
                specs = specs[-1:]  # refcocog: the long full name when no relation is unique
            chosen = specs[:1] + rng.sample(specs[1:], min(len(specs) - 1, rng.randint(0, 2)))
            full = full_name(scene, k)
            if REFER_FULL_NAME and kinds[0] != "relation" and full not in chosen:
                chosen.append(full)
            sentences = []
            for spec in chosen:
                text = spec.text()
                sentences.append({"raw": text, "sent": text, "tokens": text.split(), "sent_id": sent_id})
                sent_id += 1
                ctx.text(text)
            ann_id = image_id * 10 + k
            refs.append({"ref_id": len(refs), "ann_id": ann_id, "image_id": image_id, "split": "train",
                         "category_id": CATEGORY_IDS[scene.objects[k].shape], "sentences": sentences,
                         "sent_ids": [s["sent_id"] for s in sentences],
                         "file_name": f"COCO_train2014_{image_id:012}_{ann_id}.jpg"})
    folder = ctx.out / "refcoco_annotations" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"refs({split_by}).p").write_bytes(pickle.dumps(refs, protocol=2))
    categories = [{"id": i, "name": s, "supercategory": "shape"} for s, i in CATEGORY_IDS.items()]
    ctx.write_json(f"refcoco_annotations/{name}/instances.json",
                   {"images": images, "annotations": annotations, "categories": categories})
    for task in ("", "inv"):
        ctx.count(f"{task}{name.replace('+', 'p')}", len(refs), len(pool))


def _llava(ctx: WorldContext, pool: list[tuple[int, Scene]]) -> None:
    """LLaVA detail / reason / conversation and the multitask conversation (images ``COCO_train2014_{id}``
    with ``id`` the 12-digit string)."""
    rng = ctx.rng("llava")
    detail_rows, reason_rows, conv_rows, multi_rows = [], [], [], []
    for image_id, scene in pool:
        ident = f"{image_id:012}"
        text = detail(scene)
        detail_rows.append(_llava_row(ident, [(rng.choice(DETAIL_PROMPTS), text)], rng))
        reason_rows.append(_llava_row(ident, [reasoning(scene, rng)], rng))
        conv_rows.append(_llava_row(ident, conversation(scene, rng, rng.randint(2, 4)), rng))
        multi_rows.append(_llava_row(ident, multitask(scene, rng, rng.randint(2, 3)), rng))
        ctx.text(text, *(t["value"] for r in (reason_rows, conv_rows, multi_rows) for t in r[-1]["conversations"]))
    for path, name, rows in (("llava/detail_23k.json", "llava_detail", detail_rows),
                             ("llava/complex_reasoning_77k.json", "llava_reason", reason_rows),
                             ("llava/conversation_58k.json", "llava_conversation", conv_rows),
                             ("multitask_conversation/multitask_conversation.json", "multitask_conversation",
                              multi_rows)):
        ctx.write_json(path, rows)
        ctx.count(name, len(rows), len(pool))


def _llava_row(ident: str, turns: list[tuple[str, str]], rng: random.Random) -> dict[str, Any]:
    conv = []
    for k, (human, gpt) in enumerate(turns):
        conv.append({"from": "human", "value": with_image_tag(human, rng) if k == 0 else human})
        conv.append({"from": "gpt", "value": gpt})
    return {"id": ident, "image": f"{ident}.jpg", "conversations": conv}
