"""The held-out synthetic eval sets: loaded by the real benchmark loaders with no failure, ``meta.json`` ids
and categories agree with them, an oracle predictor scores 100 % and a wrong one low through ``run_eval``,
and no eval scene appears in the training data."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from test_synth_support import MetaPredictor, scene_index, small_world

from tinygptv.eval.registry import BENCHMARKS, GROUPS
from tinygptv.eval.runner import run_eval
from tinygptv.synth import category_breakdown
from tinygptv.synth.world import Scene, referring_expressions, resolve


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return small_world(tmp_path_factory)


@pytest.fixture(scope="module")
def meta(world) -> dict:
    return json.loads((world / "eval" / "meta.json").read_text())


def test_every_benchmark_has_a_set_loaded_without_failure(world, meta):
    assert set(meta["sets"]) == set(GROUPS["all"])
    for name, info in meta["sets"].items():
        samples = BENCHMARKS[name].load(world / "eval")
        assert [s.error for s in samples if s.error] == []
        assert {s.id for s in samples} == set(info["items"]) and len(samples) == info["size"] == 16
        assert sum(info["categories"].values()) == info["size"]
        for s in samples:
            assert s.image == info["items"][s.id]["image"]


def test_categories_are_balanced(meta):
    assert meta["sets"]["gqa"]["categories"] == {"colour": 4, "count": 3, "exist": 3, "shape": 3, "text": 3}
    assert set(meta["sets"]["vizwiz"]["categories"]) == {"colour", "count", "shape", "text", "unanswerable"}
    assert meta["sets"]["vsr"]["categories"] == {"spatial": 16}
    labels = [item["label"] for item in meta["sets"]["hm"]["items"].values()]
    assert labels.count(1) == labels.count(0) == 8
    vsr = [item["label"] for item in meta["sets"]["vsr"]["items"].values()]
    assert vsr.count(1) == vsr.count(0)


def test_oracle_scores_100_and_wrong_answers_score_low(world, meta, tmp_path):
    names = list(meta["sets"])
    results = run_eval(MetaPredictor(world / "eval"), names, world / "eval", tmp_path / "oracle", mode="both")
    for name in names:
        scores = results["benchmarks"][name]["scores"]
        for mode in ("standard", "paper"):
            assert scores[mode]["n_failed"] == 0
            assert scores[mode]["metrics"]["accuracy"] == pytest.approx(100.0), (name, mode)
    breakdown = category_breakdown(world / "eval" / "meta.json", tmp_path / "oracle")
    assert set(breakdown) == set(names)
    assert all(v["accuracy"] == 100.0 for cats in breakdown.values() for v in cats.values())
    assert breakdown["gqa"]["colour"]["n"] == 4

    wrong = run_eval(MetaPredictor(world / "eval", wrong=True), names, world / "eval", tmp_path / "wrong",
                     mode="standard")
    for name in names:
        assert wrong["benchmarks"][name]["scores"]["standard"]["metrics"]["accuracy"] <= 10.0, name
    low = category_breakdown(meta, tmp_path / "wrong")
    assert all(v["accuracy"] <= 10.0 for cats in low.values() for v in cats.values())


def test_eval_answers_are_correct_for_their_scenes(world, meta):
    scenes = scene_index(world / "eval")
    for name, info in meta["sets"].items():
        for item in info["items"].values():
            scene = scenes[item["image"]]
            assert scene.id == item["scene"]
            if name.startswith("refcoco"):
                target = [i for i, o in enumerate(scene.objects) if list(o.box) == item["bbox"]]
                specs = [s for i in range(len(scene.objects)) for s in referring_expressions(scene, i)
                         if s.text() == item["query"]]
                assert len(target) == 1 and specs and all(resolve(scene, s) == target for s in specs)
            elif item["category"] == "unanswerable":
                shape = item["query"].removesuffix("?").split()[-1]
                assert scene.count(shape=shape) == 0 or (shape == "written" and scene.word is None)
            elif item["category"] == "text":
                assert scene.word is not None and item["answer"] == scene.word.text


def test_no_eval_scene_or_image_is_in_the_training_data(world):
    train = [json.loads(line) for line in (world / "scenes.jsonl").read_text().splitlines()]
    evals = [json.loads(line) for line in (world / "eval" / "scenes.jsonl").read_text().splitlines()]

    train_sigs = {Scene.from_dict(r["scene"]).signature() for r in train}
    eval_sigs = [Scene.from_dict(r["scene"]).signature() for r in evals]
    assert not train_sigs & set(eval_sigs) and len(set(eval_sigs)) == len(eval_sigs)

    def digests(paths) -> list[str]:
        return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths if p.suffix in (".jpg", ".png")]

    eval_images = digests((world / "eval").rglob("*"))
    train_images = digests(p for p in world.rglob("*") if "eval" not in p.relative_to(world).parts[:1])
    assert len(eval_images) == len(evals) and len(train_images) > 100
    assert not set(eval_images) & set(train_images)
