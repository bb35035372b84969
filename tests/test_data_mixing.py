"""MixtureLoader (frequencies, exact resume, bad images) and the dataset registry."""

import copy
import json
import logging

import pytest
import torch

from test_data_common import jpeg_bytes, write_image, write_json, write_tar
from tinygptv.data import (DATASETS, UPSTREAM_MIXTURES, CustomJsonlReader, DataLayoutError, MixtureDataset,
                           MixtureLoader, build_mixture, build_reader, collate)
from tinygptv.data.readers import CcSbuAlignReader, WebDatasetCaptionReader

SIZE = 16


def _text_only(tmp_path, name, n=5):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"conversations": [{"from": "human", "value": f"{name} q{i}"},
                                                           {"from": "gpt", "value": f"{name} a{i}"}]}) + "\n"
                            for i in range(n)))
    return CustomJsonlReader(path, name=name)


def test_frequencies_match_ratios(tmp_path):
    datasets = [MixtureDataset(n, _text_only(tmp_path, n), 1, r) for n, r in (("a", 5), ("b", 3), ("c", 2))]
    loader = MixtureLoader(datasets, image_size=SIZE, seed=7)
    assert loader.probabilities == pytest.approx({"a": 0.5, "b": 0.3, "c": 0.2})
    n = 3000
    names = [next(loader).dataset for _ in range(n)]
    for name, p in loader.probabilities.items():
        assert abs(names.count(name) / n - p) < 0.03
    assert loader.counters["a"]["batches"] == names.count("a")
    # the choice sequence is seeded per rank
    again = MixtureLoader(datasets, image_size=SIZE, seed=7)
    other_rank = MixtureLoader(datasets, image_size=SIZE, seed=7, rank=1, world_size=2)
    first = [next(again).dataset for _ in range(50)]
    assert first == names[:50]
    assert [next(other_rank).dataset for _ in range(50)] != first


def _image_mixture(tmp_path):
    root = tmp_path / "cc_sbu_align"
    write_json(root / "filter_cap.json", {"annotations": [
        {"image_id": str(i), "caption": f"caption number {i}."} for i in range(5)]})
    for i in range(5):
        write_image(root / "image" / f"{i}.jpg", size=(20 + i, 18), color=(40 * i, 10, 200))
    for s in range(2):
        members = []
        for k in range(3):
            key = f"{s}{k:04d}"
            members += [(f"{key}.jpg", jpeg_bytes(color=(50 * k, 100, 20 * s))),
                        (f"{key}.json", json.dumps({"caption": f"Shard {s} sample {k}."}).encode())]
        write_tar(tmp_path / "shards" / f"{s:05d}.tar", members)
    return [MixtureDataset("cc_sbu_align", CcSbuAlignReader(root), 2, 1.0),
            MixtureDataset("laion", WebDatasetCaptionReader(str(tmp_path / "shards" / "{00000..00001}.tar")), 2, 1.0),
            MixtureDataset("chat", _text_only(tmp_path, "chat"), 1, 0.5)]


def _same(a, b):
    assert a.dataset == b.dataset and a.examples == b.examples and a.meta == b.meta
    for x, y in zip(a.pixels, b.pixels):
        assert (x is None and y is None) or torch.equal(x, y)


def test_state_dict_round_trip_continues_identically(tmp_path):
    loader = MixtureLoader(_image_mixture(tmp_path), image_size=SIZE, seed=3, num_workers=2)
    for _ in range(7):
        next(loader)
    state = json.loads(json.dumps(loader.state_dict()))  # plain types only
    expected = [next(loader) for _ in range(9)]
    assert {b.dataset for b in expected} >= {"cc_sbu_align", "laion"}
    resumed = MixtureLoader(_image_mixture(tmp_path), image_size=SIZE, seed=3)
    resumed.load_state_dict(copy.deepcopy(state))
    for want in expected:
        _same(next(resumed), want)
    assert resumed.counters == loader.counters
    with pytest.raises(ValueError, match="seed/rank/world"):
        MixtureLoader(_image_mixture(tmp_path), image_size=SIZE, seed=4).load_state_dict(state)
    loader.close()


def test_batch_layout_matches_model_inputs(tmp_path):
    loader = MixtureLoader(_image_mixture(tmp_path), image_size=SIZE, seed=0)
    seen = {}
    while len(seen) < 3:
        batch = next(loader)
        seen[batch.dataset] = batch
    align = seen["cc_sbu_align"]
    assert len(align.examples) == 2 and all(p.shape == (1, 3, SIZE, SIZE) for p in align.pixels)
    assert len({e.condition for e in align.examples}) == 1  # stage 3: one prompt per batch
    assert seen["laion"].examples[0].condition is None
    assert seen["chat"].pixels == [None]
    examples, pixels = collate([(s, p) for s, p in zip([], [])])
    assert examples == [] and pixels == []


def test_missing_and_corrupt_images_are_skipped_and_counted(tmp_path, caplog):
    root = tmp_path / "cc_sbu_align"
    write_json(root / "filter_cap.json", {"annotations": [
        {"image_id": str(i), "caption": f"c{i}"} for i in range(4)]})
    write_image(root / "image" / "0.jpg")
    write_image(root / "image" / "1.jpg")
    (root / "image" / "2.jpg").write_bytes(b"\xff\xd8 corrupt jpeg")  # 3.jpg is missing
    loader = MixtureLoader([MixtureDataset("cc_sbu_align", CcSbuAlignReader(root), 2)], image_size=SIZE, seed=1)
    with caplog.at_level(logging.WARNING, logger="tinygptv.data"):
        batches = [next(loader) for _ in range(4)]  # 8 good samples = 4 epochs of the two good images
    assert all(len(b.examples) == 2 for b in batches)
    assert {m["image_id"] for b in batches for m in b.meta} == {"0", "1"}
    bad = loader.counters["cc_sbu_align"]["bad_images"]
    assert 6 <= bad <= 8  # both bad images of epochs 0-2, and those of epoch 3 drawn before its last good one
    logged = [r.message for r in caplog.records if "unusable image" in r.message]
    assert len(logged) == bad
    assert any("2.jpg" in m and "cannot" in m for m in logged) and any("not found" in m for m in logged)
    # a dataset with no usable image at all fails clearly instead of spinning forever
    (root / "image" / "0.jpg").unlink()
    (root / "image" / "1.jpg").unlink()
    stuck = MixtureLoader([MixtureDataset("cc_sbu_align", CcSbuAlignReader(root), 2)], image_size=SIZE,
                          max_failures=10)
    with pytest.raises(RuntimeError, match="unusable samples in a row"):
        next(stuck)


def test_registry_names_and_errors(tmp_path):
    names = {"laion", "cc_sbu", "cc_sbu_align", "coco_caption", "coco_vqa", "ok_vqa", "aok_vqa", "gqa", "ocrvqa",
             "textcaps_caption", "refcoco", "refcocop", "refcocog", "invrefcoco", "invrefcocop", "invrefcocog",
             "refvg", "flickr_grounded_caption", "flickr_CaptionToPhrase", "flickr_ObjectToPhrase", "llava_detail",
             "llava_reason", "llava_conversation", "multitask_conversation", "unnatural_instruction", "custom"}
    assert set(DATASETS) == names
    assert DATASETS["invrefcocop"].task == "[identify]" and DATASETS["refvg"].task == "[refer]"
    assert set(UPSTREAM_MIXTURES["stage4"]) <= names and sum(r for _, r in UPSTREAM_MIXTURES["stage4"].values()) == 690
    with pytest.raises(KeyError, match="valid names: laion, cc_sbu"):
        build_reader("coco", tmp_path)
    with pytest.raises(DataLayoutError, match=r"coco_captions/coco_karpathy_train\.json"):
        build_reader("coco_caption", tmp_path / "not_the_root")
    with pytest.raises(ValueError, match="unknown path argument"):
        build_reader("gqa", tmp_path, {"annotations": "x.json"})


def test_registry_builds_from_data_root(tmp_path):
    write_json(tmp_path / "cc_sbu_align" / "filter_cap.json", {"annotations": [{"image_id": "1", "caption": "x"}]})
    (tmp_path / "cc_sbu_align" / "image").mkdir()
    reader = build_reader("cc_sbu_align", tmp_path)
    assert isinstance(reader, CcSbuAlignReader) and reader.name == "cc_sbu_align" and len(reader) == 1
    (tmp_path / "refcoco_annotations" / "refcoco+").mkdir(parents=True)
    with pytest.raises(DataLayoutError, match=r"refcoco\+/refs\(unc\)\.p"):
        build_reader("refcocop", tmp_path)
    jsonl = tmp_path / "mine" / "data.jsonl"
    jsonl.parent.mkdir()
    jsonl.write_text(json.dumps({"conversations": [{"from": "human", "value": "q"},
                                                   {"from": "gpt", "value": "a"}]}) + "\n")
    mix = build_mixture({"mine": {"dataset": "custom", "batch_size": 2, "ratio": 3,
                                  "paths": {"ann_path": str(jsonl), "image_root": "mine"}}}, tmp_path)
    assert mix[0].name == "mine" and mix[0].reader.name == "mine" and mix[0].batch_size == 2


def test_loader_batches_feed_the_model(tmp_path, tiny_model):
    datasets = _image_mixture(tmp_path)
    loader = MixtureLoader(datasets, image_size=tiny_model.image_size, seed=0)
    seen = set()
    while len(seen) < 3:
        batch = next(loader)
        if batch.dataset in seen:
            continue
        seen.add(batch.dataset)
        out = tiny_model(batch.examples, batch.pixels, max_txt_len=64)
        assert out.loss is not None and torch.isfinite(out.loss)
        assert out.labels.shape[0] == len(batch.examples)
