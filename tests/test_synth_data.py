"""The synthetic training datasets: deterministic files, read by the real readers with no bad record, and
templated examples that agree with the scene descriptions."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_synth_support import scene_index, small_world
from test_synth_world import independent_answer

from tinygptv.data.processors import REFER_PROMPTS, box_coords, parse_boxes
from tinygptv.data.registry import DATASETS, UPSTREAM_MIXTURES, build_mixture, build_reader
from tinygptv.synth import generate_world
from tinygptv.synth.world import RefSpec, Scene, referring_expressions, resolve


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return small_world(tmp_path_factory)


def tree_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    kwargs = {"scale": 0.02, "eval_size": 4}
    generate_world(tmp_path / "a", seed=1, **kwargs)
    code = (f"from tinygptv.synth import generate_world; "
            f"generate_world({str(tmp_path / 'b')!r}, seed=1, scale=0.02, eval_size=4)")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # a fresh process with another string-hash seed
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    generate_world(tmp_path / "c", seed=2, **kwargs)
    a, b, c = (tree_hashes(tmp_path / n) for n in "abc")
    assert a == b
    common = set(a) & set(c)
    assert len(common) > 0.8 * len(a)
    assert sum(a[k] != c[k] for k in common) > 0.9 * len(common)


def test_every_registered_dataset_is_read_with_no_bad_record(world):
    for name in DATASETS:
        reader = build_reader(name, world)
        assert reader.bad_records == 0, (name, reader.bad_record_locations)
        samples = list(reader.iter_samples(random.Random(0)))
        assert samples, name
        for s in samples:
            assert isinstance(s.image, bytes) or s.image is None or Path(s.image).is_file(), (name, s.image)
        if name == "unnatural_instruction":
            assert all(s.image is None for s in samples)
    for stage in UPSTREAM_MIXTURES:
        assert {m.name for m in build_mixture(stage, world)} == set(UPSTREAM_MIXTURES[stage])


def _instruction(condition: str) -> str:
    return condition.split("</Img> ", 1)[1].rsplit(" [/INST]", 1)[0].strip()


def _scene_of(index: dict[str, Scene], root: Path, image: str) -> Scene:
    return index[Path(image).relative_to(root).as_posix()]


def _object_at(scene: Scene, grid: tuple[int, int, int, int]) -> int:
    hits = [i for i, o in enumerate(scene.objects) if box_coords(o.box, scene.size) == grid]
    assert len(hits) == 1, (grid, scene)
    return hits[0]


def _denotes(scene: Scene, expression: str, index: int) -> bool:
    specs = [s for i in range(len(scene.objects)) for s in referring_expressions(scene, i) if s.text() == expression]
    return bool(specs) and all(_object_index(scene, s) == index for s in specs)


def _object_index(scene: Scene, spec: RefSpec) -> int:
    (only,) = resolve(scene, spec)
    return only


@pytest.mark.parametrize("name", ["refcoco", "refcocop", "refcocog"])
def test_refer_examples_box_the_unique_referent(world, name):
    index = scene_index(world)
    patterns = sorted(REFER_PROMPTS, key=len, reverse=True)
    reader = build_reader(name, world)
    for s in reader.iter_samples(random.Random(1)):
        scene = _scene_of(index, world, s.image)
        answer = s.example.targets[0][0].removesuffix("###")
        target = _object_at(scene, parse_boxes(answer)[0])
        instruction = _instruction(s.example.condition)
        expressions = [m[1] for p in patterns
                       if (m := re.fullmatch(re.escape(p).replace(r"\{\}", "(.+)"), instruction))]
        assert any(_denotes(scene, e.strip(), target) for e in expressions), (instruction, scene)
    inverse = build_reader("inv" + name, world)
    for s in inverse.iter_samples(random.Random(2)):
        scene = _scene_of(index, world, s.image)
        target = _object_at(scene, parse_boxes(s.example.condition)[0])
        assert _denotes(scene, s.example.targets[0][0].removesuffix("###"), target)


def test_refer_full_name_adds_it_to_refcoco_refs_and_changes_nothing_else(tmp_path, monkeypatch):
    """``REFER_FULL_NAME``: every RefCOCO / RefCOCO+ ref gains the object's full name after its own sentences
    (none gained twice), RefCOCOg and the evaluation sets stay byte-identical, and the images too."""
    import pickle

    from tinygptv.synth import writers_coco

    kwargs = {"scale": 0.02, "eval_size": 4}
    generate_world(tmp_path / "plain", seed=3, **kwargs)
    monkeypatch.setattr(writers_coco, "REFER_FULL_NAME", True)
    generate_world(tmp_path / "full", seed=3, **kwargs)
    plain, full = tree_hashes(tmp_path / "plain"), tree_hashes(tmp_path / "full")
    changed = {k for k in plain if plain[k] != full[k]}
    assert set(plain) == set(full)
    assert changed == {"corpus.txt", "world.json", "refcoco_annotations/refcoco/refs(unc).p",
                       "refcoco_annotations/refcoco+/refs(unc).p"}
    instances = json.loads((tmp_path / "full" / "refcoco_annotations" / "refcoco" / "instances.json").read_text())
    index = scene_index(tmp_path / "full")
    by_ann = {a["id"]: a for a in instances["annotations"]}
    for name in ("refcoco", "refcoco+"):
        before, after = (pickle.loads((tmp_path / w / "refcoco_annotations" / name / "refs(unc).p").read_bytes())
                         for w in ("plain", "full"))
        added = 0
        for a, b in zip(before, after, strict=True):
            old, new = [s["raw"] for s in a["sentences"]], [s["raw"] for s in b["sentences"]]
            scene = index[f"coco/train2014/COCO_train2014_{b['image_id']:012}.jpg"]
            (o,) = [o for o in scene.objects if list(o.box) == by_ann[b["ann_id"]]["bbox"]]
            wanted = f"the {o.size} {o.colour} {o.shape}"
            assert new == (old if wanted in old else old + [wanted]), (name, old, new)
            assert len(set(new)) == len(new) and b["sent_ids"] == [s["sent_id"] for s in b["sentences"]]
            added += len(new) - len(old)
        assert added > 0.3 * len(after), name


def test_vqa_examples_and_annotations_are_correct(world):
    index = scene_index(world)
    checked = 0
    for s in build_reader("gqa", world).iter_samples(random.Random(0)):
        scene = _scene_of(index, world, s.image)
        question = _instruction(s.example.condition).split("] ", 1)[1]
        question = question.removeprefix("Based on the image, respond to this question with a short answer: ")
        expected = independent_answer(scene, question)
        if expected is not None:
            assert s.example.targets[0][0] == expected + "###", (question, scene)
            checked += 1
    for row in json.loads((world / "vqav2" / "vqa_train.json").read_text()):
        scene = index[f"coco/train2014/{Path(row['image']).name}"]
        expected = independent_answer(scene, row["question"])
        majority = max(set(row["answer"]), key=row["answer"].count)
        assert len(row["answer"]) == 10 and row["answer"].count(majority) >= 8
        if expected is not None:
            assert majority == expected
            checked += 1
    assert checked > 30


def test_grounding_and_caption_examples_match_the_scenes(world):
    index = scene_index(world)
    for s in build_reader("flickr_ObjectToPhrase", world).iter_samples(random.Random(0)):
        scene = _scene_of(index, world, s.image)
        phrase = re.fullmatch(r"<p>(.+)</p> .+###", s.example.targets[0][0])[1]
        for grid in parse_boxes(s.example.targets[0][0]):
            assert phrase in scene.objects[_object_at(scene, grid)].name()
    for s in build_reader("flickr_grounded_caption", world).iter_samples(random.Random(0)):
        scene = _scene_of(index, world, s.image)
        boxes = parse_boxes(s.example.targets[0][0])
        assert sorted(_object_at(scene, g) for g in boxes) == list(range(len(scene.objects)))
    for s in build_reader("laion", world).iter_samples():
        scene = index[f"{Path(s.meta['shard']).relative_to(world).as_posix()}:{s.meta['key']}"]
        assert all(f"{o.colour} {o.shape}" in s.example.targets[0][0] for o in scene.objects)
    for s in build_reader("textcaps_caption", world).iter_samples(random.Random(0)):
        scene = _scene_of(index, world, s.image)
        assert scene.word is not None and f"word {scene.word.text}" in s.example.targets[0][0]
    for s in build_reader("custom", world).iter_samples(random.Random(0)):
        if "[refer]" in s.example.condition:
            scene = _scene_of(index, world, s.image)
            target = _object_at(scene, parse_boxes(s.example.targets[0][0])[0])
            expression = _instruction(s.example.condition).removeprefix("[refer] give me the location of ")
            assert _denotes(scene, expression, target)


def test_world_files(world):
    info = json.loads((world / "world.json").read_text())
    assert len(info["shapes"]) == 6 and len(info["colours"]) == 8 and info["training_images"] > 150
    corpus = (world / "corpus.txt").read_text().splitlines()
    assert len(corpus) == len(set(corpus)) == info["corpus_lines"]
    records = [json.loads(line) for line in (world / "scenes.jsonl").read_text().splitlines()]
    assert len(records) == info["training_images"]
    for rec in records:
        assert (world / rec["image"].split(":")[0]).is_file()
