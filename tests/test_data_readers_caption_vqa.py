"""Caption and VQA readers on tiny fixtures in their published layouts: golden Examples, masking, bad input."""

import json
import logging
import random

import pytest

from test_data_common import PickRng, assert_masks_answer, jpeg_bytes, parts, write_image, write_json, write_tar
from tinygptv.data.readers import (AOKVQAReader, CcSbuAlignReader, CocoCaptionReader, DataLayoutError, GQAReader,
                                   OCRVQAReader, TextCapsReader, VQAReader, WebDatasetCaptionReader, expand_braces)

INST = "[INST] <Img><ImageHere></Img> "


# ---------------------------------------------------------------------------------------------- laion / cc_sbu
def _shards(tmp_path):
    cap = lambda c: json.dumps({"caption": c}).encode()  # noqa: E731
    write_tar(tmp_path / "sh" / "00000.tar", [
        ("00000.jpg", jpeg_bytes()), ("00000.json", cap("A Dog, running!  On the beach.")),
        ("00001.jpg", jpeg_bytes()), ("00001.json", cap("Two CATS; sleeping.")),
        ("00002.jpg", jpeg_bytes()), ("00002.json", json.dumps({"url": "x"}).encode()),  # no caption
        ("00003.json", cap("no image member")),
    ])
    write_tar(tmp_path / "sh" / "00001.tar", [
        ("00004.jpg", jpeg_bytes()), ("00004.json", cap("A red Car.")), ("00004.txt", b"ignored"),
        ("00005.jpg", jpeg_bytes()), ("00005.json", b"{not json"),
    ])
    return str(tmp_path / "sh" / "{00000..00001}.tar")


def test_webdataset_reader_golden_and_bad_records(tmp_path, caplog):
    reader = WebDatasetCaptionReader(_shards(tmp_path), name="laion")
    with caplog.at_level(logging.WARNING, logger="tinygptv.data"):
        samples = list(reader.iter_samples())
    assert [s.meta["key"] for s in samples] == ["00000", "00001", "00004"]
    image, example, meta = samples[0]
    assert image == jpeg_bytes()
    assert parts(example) == (None, [("a dog, running on the beach\n", True)], ())
    assert parts(samples[1].example)[1] == [("two cats sleeping\n", True)]
    assert_masks_answer(example, True, "a dog, running on the beach\n")
    assert reader.bad_records == 3
    assert any("00000.tar:00002" in r.message for r in caplog.records)
    assert any("00001.tar:00005" in r.message for r in caplog.records)


def test_webdataset_rank_sharding_and_stream(tmp_path):
    pattern = _shards(tmp_path)
    r = WebDatasetCaptionReader(pattern)
    assert [p.name for p in r.rank_shards(0, 2)] == ["00000.tar"]
    assert [p.name for p in r.rank_shards(1, 2)] == ["00001.tar"]
    stream = r.iterate(random.Random(0), rank=1, world=2)
    keys = [s.meta["key"] for s, _, _ in (next(stream) for _ in range(8)) if s is not None]
    assert set(keys) == {"00004"}


def test_brace_expansion_and_wrong_root(tmp_path):
    assert expand_braces("a/{00008..00011}.tar") == ["a/00008.tar", "a/00009.tar", "a/00010.tar", "a/00011.tar"]
    assert expand_braces("{x,y}-{1..2}") == ["x-1", "x-2", "y-1", "y-2"]
    with pytest.raises(DataLayoutError, match="00000.tar"):
        WebDatasetCaptionReader(str(tmp_path / "nowhere" / "{00000..00002}.tar"))
    with pytest.raises(DataLayoutError, match="matches nothing"):
        WebDatasetCaptionReader(str(tmp_path / "nowhere" / "*.tar"))


# ---------------------------------------------------------------------------------------------- cc_sbu_align
def test_cc_sbu_align_stage3_golden(tmp_path, caplog):
    root = tmp_path / "cc_sbu_align"
    write_json(root / "filter_cap.json", {"annotations": [
        {"image_id": "2", "caption": "The image shows a Cat. It sleeps!"},
        {"image_id": "3"},
        {"image_id": 4, "caption": "A bridge at night."},
        {"image_id": "5", "caption": "   "},
    ]})
    write_image(root / "image" / "2.jpg")
    with caplog.at_level(logging.WARNING, logger="tinygptv.data"):
        reader = CcSbuAlignReader(root)
    assert len(reader) == 2 and reader.bad_records == 2
    assert f"{root / 'filter_cap.json'}: record 1" in caplog.text and "missing field 'caption'" in caplog.text
    assert reader.bad_record_locations == [f"{root / 'filter_cap.json'}: record 1",
                                           f"{root / 'filter_cap.json'}: record 3"]
    rng = PickRng(1)
    prompt = reader.batch_context(rng)
    image, example, meta = reader.get(0, rng, prompt)
    assert image == str(root / "image" / "2.jpg")
    assert parts(example) == (
        "###Human: <Img><ImageHere></Img> Take a look at this image and describe what you notice. ###Assistant: ",
        [("The image shows a Cat. It sleeps!###", True)], ())
    assert_masks_answer(example, True, "The image shows a Cat. It sleeps!###")
    # one prompt per batch: every sample built with the same context shares it
    seeded = random.Random(3)
    ctx = reader.batch_context(seeded)
    conds = {reader.get(i, seeded, ctx).example.condition for i in range(2)}
    assert len(conds) == 1 and ctx in next(iter(conds))
    with pytest.raises(DataLayoutError, match="filter_cap.json"):
        CcSbuAlignReader(tmp_path / "wrong")


# ---------------------------------------------------------------------------------------------- captions
def test_coco_caption_golden(tmp_path):
    ann = write_json(tmp_path / "coco_karpathy_train.json", [
        {"image": "train2014/COCO_train2014_000000000001.jpg", "caption": "Two Dogs on a couch.", "image_id": 1},
        {"image": "val2014/COCO_val2014_000000000002.jpg", "caption": "Filtered (val).", "image_id": 2},
        {"image": "train2014/COCO_train2014_000000000003.jpg", "image_id": 3},
    ])
    (tmp_path / "train2014").mkdir()
    reader = CocoCaptionReader(ann, tmp_path / "train2014")
    assert len(reader) == 1 and reader.filtered == 1 and reader.bad_records == 1
    image, example, meta = reader.get(0, PickRng(6))
    assert image == str(tmp_path / "train2014" / "COCO_train2014_000000000001.jpg")
    assert parts(example) == (INST + "[caption] A photo of   [/INST]", [("two dogs on a couch###", True)], ())
    assert meta["task"] == "[caption]" and meta["dataset"] == "coco_caption"
    assert_masks_answer(example, True, "two dogs on a couch###")
    assert reader.get(0, PickRng(0)).example.condition == INST + "[caption] Briefly describe this image.  [/INST]"


def test_textcaps_golden(tmp_path):
    ann = write_json(tmp_path / "TextCaps_0.1_train.json", {"data": [
        {"image_id": "011e7e629fb9ae7b", "caption_str": "A sign that says STOP."},
        {"image_id": "bad", "caption_str": 7},
    ]})
    (tmp_path / "train_images").mkdir()
    reader = TextCapsReader(ann, tmp_path / "train_images")
    assert len(reader) == 1 and reader.bad_records == 1
    image, example, _ = reader.get(0, PickRng(3))
    assert image.endswith("train_images/011e7e629fb9ae7b.jpg")
    assert parts(example) == (INST + "[caption] Summarize this image in a few words.  [/INST]",
                              [("a sign that says stop###", True)], ())


# ---------------------------------------------------------------------------------------------- VQA
def _coco_images(tmp_path):
    root = tmp_path / "train2014"
    write_image(root / "COCO_train2014_000000000001.jpg")
    return root


def test_coco_vqa_golden_filter_and_weights(tmp_path):
    root = _coco_images(tmp_path)
    train = write_json(tmp_path / "vqa_train.json", [
        {"question_id": 11, "question": "How many Dogs?", "answer": ["Two."] * 10,
         "image": "train2014/COCO_train2014_000000000001.jpg"},
        {"question_id": 12, "question": "Is it sunny?", "answer": ["yes"] * 7 + ["no"] * 3,
         "image": "train2014/COCO_train2014_000000000001.jpg"},
        {"question_id": 13, "question": "Broken", "answer": [],
         "image": "train2014/COCO_train2014_000000000001.jpg"},
    ])
    val = write_json(tmp_path / "vqa_val.json", [
        {"question_id": 21, "question": "Val?", "answer": ["x"] * 10, "image": "val2014/COCO_val2014_000000000009.jpg"},
    ])
    reader = VQAReader([train, val], root)
    assert len(reader) == 2 and reader.filtered == 1 and reader.bad_records == 1
    image, example, meta = reader.get(0, PickRng(1))
    assert parts(example) == (
        INST + "[vqa] Based on the image, respond to this question with a short answer: how many dogs?  [/INST]",
        [("two###", True)], ())
    assert meta["question_id"] == 11 and meta["task"] == "[vqa]"
    assert_masks_answer(example, True, "two###")
    rng = random.Random(0)
    answers = [reader.get(1, rng).example.targets[0][0] for _ in range(2000)]
    assert abs(answers.count("yes###") / 2000 - 0.7) < 0.04
    assert set(answers) == {"yes###", "no###"}
    again = [reader.get(1, random.Random(5)).example for _ in range(3)]
    assert again[0] == again[1] == again[2]


def test_aok_vqa_golden(tmp_path):
    root = _coco_images(tmp_path)
    ann = write_json(tmp_path / "aokvqa_v1p0_train.json", [
        {"image": "train2014/COCO_train2014_000000000001.jpg", "question": "What is the Dog doing?",
         "direct_answers": ["Sleeping."] * 10, "choices": ["sleeping", "eating"], "correct_choice_idx": 0},
        {"image": "COCO_train2014_000000000099.jpg", "question": "Gone?", "direct_answers": ["x"] * 10},
        {"image": "COCO_train2014_000000000001.jpg", "question": "No answers"},
    ])
    reader = AOKVQAReader(ann, root)
    assert len(reader) == 1 and reader.filtered == 1 and reader.bad_records == 1
    example = reader.get(0, PickRng(0)).example
    assert parts(example) == (INST + "[vqa] what is the dog doing?  [/INST]", [("sleeping###", True)], ())


def test_gqa_golden(tmp_path):
    write_image(tmp_path / "images" / "n123.jpg")
    ann = write_json(tmp_path / "train_balanced_questions.json", [
        {"image": "n123.jpg", "question": "Is the cup to the Left or right?", "answer": "Left.", "question_id": "7"},
        {"image": "n124.jpg", "question": "Q", "answer": ["not", "a", "string"]},
    ])
    reader = GQAReader(ann, tmp_path / "images")
    assert len(reader) == 1 and reader.bad_records == 1
    image, example, _ = reader.get(0, PickRng(0))
    assert image == str(tmp_path / "images" / "n123.jpg")
    assert parts(example) == (INST + "[vqa] is the cup to the left or right?  [/INST]", [("left###", True)], ())
    assert_masks_answer(example, True, "left###")


def test_ocrvqa_golden_split_and_bad(tmp_path, caplog):
    ann = write_json(tmp_path / "dataset.json", {
        "b1": {"imageURL": "http://x/b1.jpg", "questions": ["Who wrote this book?", "Is this a comic?"],
               "answers": ["J. Doe", "No"], "title": "T", "genre": "G", "split": 1},
        "b2": {"imageURL": "http://x/b2.jpg", "questions": ["Q"], "answers": ["A"], "split": 2},
        "b3": {"imageURL": "http://x/b3.gif", "questions": ["Q1", "Q2"], "answers": ["A"], "split": 1},
    })
    (tmp_path / "images").mkdir()
    with caplog.at_level(logging.WARNING, logger="tinygptv.data"):
        reader = OCRVQAReader(ann, tmp_path / "images")
    assert len(reader) == 2 and reader.filtered == 1 and reader.bad_records == 1
    assert f"{ann}: record 'b3'" in caplog.text
    image, example, meta = reader.get(0, PickRng(0))
    assert image == str(tmp_path / "images" / "b1.jpg") and meta["image_id"] == "b1"
    assert parts(example) == (INST + "[vqa] who wrote this book?  [/INST]", [("j doe###", True)], ())
    assert reader.get(1, PickRng(0)).example.targets == [("no###", True)]
    assert OCRVQAReader(ann, tmp_path / "images", image_ext=".png").get(0, PickRng(0)).image.endswith("b1.png")


def test_invalid_json_file_fails_with_its_name(tmp_path):
    bad = tmp_path / "gqa.json"
    bad.write_text('[{"image": "a.jpg",\n "question": }]')
    (tmp_path / "images").mkdir()
    with pytest.raises(ValueError, match=r"gqa.json:2: not valid JSON"):
        GQAReader(bad, tmp_path / "images")
