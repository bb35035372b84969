"""Training datasets in the published layouts at the registry's default paths
(:data:`tinygptv.data.registry.DATASETS`): stages 1–2 tar shards, stage 3 ``cc_sbu_align``, and the stage-4
A-OKVQA, GQA, TextCaps, OCR-VQA, Visual Genome, Flickr grounding, Unnatural Instructions and ``custom``
datasets. The COCO-image datasets (captions, VQA, RefCOCO, LLaVA) are in :mod:`tinygptv.synth.writers_coco`.

Sizes (:data:`SIZES`) are image counts at ``scale=1`` (records for the text-only dataset).
"""

from __future__ import annotations

import json
import random

from tinygptv.data.processors import boxes_to_text
from tinygptv.eval.hateful_memes import HM_INSTRUCTION
from tinygptv.eval.vizwiz import VIZWIZ_INSTRUCTION
from tinygptv.eval.vsr import VSR_INSTRUCTION
from tinygptv.synth.context import WorldContext, shard_writer
from tinygptv.synth.dialog import instruction, knowledge, ten_answers
from tinygptv.synth.render import encode, render
from tinygptv.synth.text import (box_text, caption, detail, grounded_caption, indefinite, object_list,
                                 phrases_with_boxes, sample_questions, statements, unanswerable)
from tinygptv.synth.world import COLOURS, SHAPES, Scene, ref_texts

SIZES: dict[str, int] = {"laion": 1200, "cc_sbu": 300, "cc_sbu_align": 200, "coco": 500, "aok_vqa": 200, "gqa": 300,
                         "textcaps": 200, "ocrvqa": 150, "refvg": 200, "flickr": 250, "unnatural_instruction": 600,
                         "custom": 300}
SHARDS: dict[str, int] = {"laion": 6, "cc_sbu": 3}
GQA_QUESTIONS_PER_IMAGE = 3


def write_webdataset(ctx: WorldContext, name: str) -> None:
    """``laion`` / ``cc_sbu``: ``{name}/{name}_dataset/{00000..}.tar`` with ``jpg`` + ``json`` (+ ``txt``)."""
    rng = ctx.rng(name)
    n = ctx.size(SIZES[name])
    shards = min(SHARDS[name], n)
    per = -(-n // shards)
    done = 0
    for s in range(shards):
        with shard_writer(ctx.out / name / f"{name}_dataset" / f"{s:05d}.tar") as add:
            for k in range(min(per, n - done)):
                key = f"{s:05d}{k:04d}"
                scene = ctx.scene(rng, f"{name}-{key}")
                text = caption(scene, rng)
                add(f"{key}.jpg", encode(render(scene)))
                meta = {"caption": text, "key": key, "url": f"synth://{name}/{key}.jpg", "width": scene.width,
                        "height": scene.height}
                add(f"{key}.json", json.dumps(meta).encode())
                add(f"{key}.txt", text.encode())
                ctx.note_scene(scene, f"{name}/{name}_dataset/{s:05d}.tar:{key}", name)
                ctx.text(text)
                done += 1
    ctx.count(name, n, n)


def write_cc_sbu_align(ctx: WorldContext) -> None:
    """Stage 3: ``cc_sbu_align/filter_cap.json`` (``{"annotations": [{image_id, caption}]}``) + ``image/``."""
    rng = ctx.rng("cc_sbu_align")
    anns = []
    for i in range(ctx.size(SIZES["cc_sbu_align"])):
        image_id = str(i + 2)
        scene = ctx.scene(rng, f"align-{image_id}")
        ctx.save_image(scene, f"cc_sbu_align/image/{image_id}.jpg", "cc_sbu_align")
        text = detail(scene)
        anns.append({"image_id": image_id, "caption": text})
        ctx.text(text)
    ctx.write_json("cc_sbu_align/filter_cap.json", {"annotations": anns})
    ctx.count("cc_sbu_align", len(anns), len(anns))


def write_aokvqa(ctx: WorldContext) -> None:
    """A-OKVQA ``aokvqa/aokvqa_v1p0_train.json`` on ``coco/train2017/{id:012}.jpg``."""
    rng = ctx.rng("aok_vqa")
    rows = []
    for i in range(ctx.size(SIZES["aok_vqa"])):
        image_id = 200000 + i
        scene = ctx.scene(rng, f"aok-{image_id}")
        ctx.save_image(scene, f"coco/train2017/{image_id:012}.jpg", "aok_vqa")
        if rng.random() < 0.5:
            question, answers, rationale = knowledge(scene, rng)
        else:
            qa = sample_questions(scene, rng, 1)[0]
            question, answers, rationale = qa.question, ten_answers(qa, rng), f"the answer is {qa.answer}."
        best = max(set(answers), key=lambda a: (answers.count(a), a))
        choices = _choices(best, rng)
        rows.append({"split": "train", "image_id": image_id, "question_id": f"aok{i:06d}",
                     "image": f"train2017/{image_id:012}.jpg", "question": question, "choices": choices,
                     "correct_choice_idx": choices.index(best), "direct_answers": answers,
                     "difficult_direct_answer": False, "rationales": [rationale] * 3})
        ctx.text(f"{question} {best}", rationale)
    ctx.write_json("aokvqa/aokvqa_v1p0_train.json", rows)
    ctx.count("aok_vqa", len(rows), len(rows))


def _choices(answer: str, rng: random.Random) -> list[str]:
    """Four choices of the answer's kind, the answer among them."""
    for pool in (list(COLOURS), list(SHAPES), [str(k) for k in range(6)], ["yes", "no"]):
        if answer in pool:
            break
    else:
        pool = [answer, "apple", "banana", "grape", "lime", "peach"]
    others = [c for c in pool if c != answer]
    choices = [answer, *rng.sample(others, min(3, len(others)))]
    rng.shuffle(choices)
    return choices


def write_gqa(ctx: WorldContext) -> None:
    """GQA (LAVIS) ``gqa/train_balanced_questions.json`` + ``gqa/images/{id}.jpg``."""
    rng = ctx.rng("gqa")
    rows = []
    for i in range(ctx.size(SIZES["gqa"])):
        image = f"{2300000 + i}.jpg"
        scene = ctx.scene(rng, f"gqa-{image[:-4]}")
        ctx.save_image(scene, f"gqa/images/{image}", "gqa")
        for k, qa in enumerate(sample_questions(scene, rng, GQA_QUESTIONS_PER_IMAGE)):
            rows.append({"image": image, "question": qa.question, "answer": qa.answer,
                         "question_id": f"{2300000 + i}{k}", "category": qa.category})
            ctx.text(f"{qa.question} {qa.answer}")
    ctx.write_json("gqa/train_balanced_questions.json", rows)
    ctx.count("gqa", len(rows), ctx.size(SIZES["gqa"]))


def write_textcaps(ctx: WorldContext) -> None:
    """TextCaps ``textcaps/TextCaps_0.1_train.json`` (``{"data": [{image_id, caption_str}]}``), every image
    with a word, two captions per image that name it."""
    rng = ctx.rng("textcaps")
    data = []
    n = ctx.size(SIZES["textcaps"])
    for _ in range(n):
        image_id = f"{rng.getrandbits(64):016x}"
        scene = ctx.scene(rng, f"textcaps-{image_id}", word=True)
        ctx.save_image(scene, f"textcaps/train_images/{image_id}.jpg", "textcaps")
        word = scene.word.text if scene.word else ""
        for text in (f"the word {word} next to {object_list(scene.objects)}.", caption(scene, rng)):
            data.append({"image_id": image_id, "image_name": image_id, "caption_str": text,
                         "image_width": scene.width, "image_height": scene.height})
            ctx.text(text)
    ctx.write_json("textcaps/TextCaps_0.1_train.json", {"dataset_type": "train", "dataset_name": "textcaps",
                                                        "data": data})
    ctx.count("textcaps_caption", len(data), n)


def write_ocrvqa(ctx: WorldContext) -> None:
    """OCR-VQA ``ocrvqa/dataset.json`` (``{key: {imageURL, questions, answers, title, genre, split}}``) on
    ``ocrvqa/images/{key}.jpg``: "covers" with a title word; 10 % of the keys are val/test (split 2/3)."""
    rng = ctx.rng("ocrvqa")
    data, n_questions = {}, 0
    n = ctx.size(SIZES["ocrvqa"])
    for i in range(n):
        key = f"{rng.getrandbits(40):010d}"
        scene = ctx.scene(rng, f"ocrvqa-{key}", word=True)
        ctx.save_image(scene, f"ocrvqa/images/{key}.jpg", "ocrvqa")
        title = scene.word.text if scene.word else ""
        pairs = [("what is the title of this book?", title), ("what word is written on the cover?", title),
                 ("how many objects are on the cover?", str(len(scene.objects)))]
        split = 1 if rng.random() < 0.9 else rng.choice((2, 3))
        data[key] = {"imageURL": f"http://synth.invalid/ocrvqa/{key}.jpg", "title": title, "genre": "Shapes",
                     "authorName": "synth", "questions": [q for q, _ in pairs], "answers": [a for _, a in pairs],
                     "split": split}
        if split == 1:
            n_questions += len(pairs)
            ctx.text(*(f"{q} {a}" for q, a in pairs))
    ctx.write_json("ocrvqa/dataset.json", data)
    ctx.count("ocrvqa", n_questions, n)


def write_refvg(ctx: WorldContext) -> None:
    """Visual Genome ``visual_genome/{region_descriptions,image_data}.json`` + ``VG_100K{,_2}/{id}.jpg``;
    one region per object (a unique phrase) and one for the word."""
    rng = ctx.rng("refvg")
    regions_out, images_out = [], []
    region_id = 1
    for i in range(ctx.size(SIZES["refvg"])):
        image_id = i + 1
        folder = "VG_100K" if i % 2 == 0 else "VG_100K_2"
        scene = ctx.scene(rng, f"vg-{image_id}")
        ctx.save_image(scene, f"visual_genome/{folder}/{image_id}.jpg", "refvg")
        images_out.append({"image_id": image_id, "id": image_id, "width": scene.width, "height": scene.height,
                           "url": f"https://cs.stanford.edu/people/rak248/{folder}/{image_id}.jpg"})
        regions = []
        things = [(rng.choice(ref_texts(scene, j, article="")), o.box) for j, o in enumerate(scene.objects)]
        if scene.word is not None:
            things.append((f"the word {scene.word.text}", scene.word.box))
        for phrase, (x, y, w, h) in things:
            regions.append({"region_id": region_id, "image_id": image_id, "phrase": phrase, "x": x, "y": y,
                            "width": w, "height": h})
            region_id += 1
            ctx.text(phrase)
        regions_out.append({"id": image_id, "regions": regions})
    ctx.write_json("visual_genome/region_descriptions.json", regions_out)
    ctx.write_json("visual_genome/image_data.json", images_out)
    ctx.count("refvg", region_id - 1, len(images_out))


def write_flickr(ctx: WorldContext) -> None:
    """Flickr30k grounding files: ``flickr/{groundedcaption,captiontobbox,phrasetobbox}.json`` +
    ``flickr/flickr30k-images/{image_id}.jpg``."""
    rng = ctx.rng("flickr")
    grounded, cap2box, phrase2box = [], [], []
    n = ctx.size(SIZES["flickr"])
    for i in range(n):
        image_id = str(1000000 + i)
        scene = ctx.scene(rng, f"flickr-{image_id}")
        ctx.save_image(scene, f"flickr/flickr30k-images/{image_id}.jpg", "flickr")
        grounded.append({"image_id": image_id, "grounded_caption": grounded_caption(scene, rng)})
        plain, output = phrases_with_boxes(scene, rng)
        cap2box.append({"image_id": image_id, "caption": plain, "output": output})
        for o in scene.objects:
            phrase2box.append({"image_id": image_id, "phrase": o.name(size=False), "bbox": box_text(scene, o)})
        for shape in sorted({o.shape for o in scene.objects}):
            same = [o.box for o in scene.objects if o.shape == shape]
            if len(same) > 1:
                phrase2box.append({"image_id": image_id, "phrase": shape, "bbox": boxes_to_text(same, scene.size)})
        ctx.text(plain)
    ctx.write_json("flickr/groundedcaption.json", grounded)
    ctx.write_json("flickr/captiontobbox.json", cap2box)
    ctx.write_json("flickr/phrasetobbox.json", phrase2box)
    for name, rows in (("flickr_grounded_caption", grounded), ("flickr_CaptionToPhrase", cap2box),
                       ("flickr_ObjectToPhrase", phrase2box)):
        ctx.count(name, len(rows), n)


def write_unnatural(ctx: WorldContext) -> None:
    """Text-only ``unnatural_instructions/filtered_unnatural_instruction.json``."""
    rng = ctx.rng("unnatural_instruction")
    rows = []
    for _ in range(ctx.size(SIZES["unnatural_instruction"])):
        text, constraints, output = instruction(rng)
        rows.append({"instruction": text, "instances": [{"instruction_with_input": text, "input": "",
                                                         "constraints": constraints, "output": output}]})
        ctx.text(f"{text} {constraints or ''} {output}")
    ctx.write_json("unnatural_instructions/filtered_unnatural_instruction.json", rows)
    ctx.count("unnatural_instruction", len(rows), 0)


def write_custom(ctx: WorldContext) -> None:
    """``custom/train.jsonl`` + ``custom/images/``: the benchmark instruction formats on training scenes
    (VSR true/false statements, Hateful-Memes-style yes/no, VizWiz with ``unanswerable``, refer with
    ``<box:0>``), so a nano model can be trained on the tasks the evaluation asks for."""
    rng = ctx.rng("custom")
    rows = []
    for i in range(ctx.size(SIZES["custom"])):
        scene = ctx.scene(rng, f"custom-{i}")
        image = f"synth_{i:06d}.jpg"
        ctx.save_image(scene, f"custom/images/{image}", "custom")
        task = ("vsr", "hm", "vizwiz", "refer")[i % 4]
        boxes = None
        if task == "vsr" and statements(scene):
            st = rng.choice(statements(scene))
            human, gpt = VSR_INSTRUCTION.format(st.text.capitalize()), "true" if st.label else "false"
        elif task in ("hm", "vsr"):  # single-object scenes have no spatial statement: HM-style instead
            text, label = hm_statement(scene, rng)
            human, gpt = HM_INSTRUCTION.format(text), "yes" if label else "no"
        elif task == "vizwiz":
            qa = unanswerable(scene, rng) if rng.random() < 0.3 else sample_questions(scene, rng, 1)[0]
            human, gpt = VIZWIZ_INSTRUCTION.format(qa.question), qa.answer
        else:
            j = rng.randrange(len(scene.objects))
            human, gpt = f"[refer] give me the location of {rng.choice(ref_texts(scene, j))}", "<box:0>"
            boxes = [list(scene.objects[j].box)]
        row = {"id": f"synth-{i}", "image": image, "conversations": [{"from": "human", "value": f"<image>\n{human}"},
                                                                     {"from": "gpt", "value": gpt}]}
        if boxes:
            row["boxes"] = boxes
        else:
            ctx.text(f"{human} {gpt}")
        rows.append(row)
    ctx.write_jsonl("custom/train.jsonl", rows)
    ctx.count("custom", len(rows), len(rows))


def hm_statement(scene: Scene, rng: random.Random) -> tuple[str, bool]:
    """A claim decidable from the image (``"there is a red circle"``, ``"there are 3 objects"``) and its truth."""
    n_objects = len(scene.objects)
    if rng.random() < 0.25:
        n = n_objects if rng.random() < 0.5 else rng.choice([k for k in range(1, 6) if k != n_objects])
        return f"there {'is 1 object' if n == 1 else f'are {n} objects'}", n == n_objects
    if rng.random() < 0.5:
        o = rng.choice(scene.objects)
        return f"there is {indefinite(o, size=False)}", True
    present = {(o.colour, o.shape) for o in scene.objects}
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    colour, shape = rng.choice(absent)
    return f"there is {'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}", False


__all__ = ["SHARDS", "SIZES", "hm_statement", "write_aokvqa", "write_cc_sbu_align", "write_custom", "write_flickr",
           "write_gqa", "write_ocrvqa", "write_refvg", "write_textcaps", "write_unnatural", "write_webdataset"]
