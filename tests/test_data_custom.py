"""Custom JSONL: check_jsonl errors with file:line, statistics, the reader, LLaVA conversion round trip."""

import json
import logging

from test_data_common import TOKENIZER, PickRng, assert_masks_answer, parts, write_image, write_json
from tinygptv.data import CustomJsonlReader, check_jsonl, convert_llava_json, export_llava_json
from tinygptv.data.readers import LlavaConversationReader

INST = "[INST] <Img><ImageHere></Img> "


def _turns(*values):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


def _write_jsonl(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def _fixture(tmp_path):
    write_image(tmp_path / "img" / "a.png", size=(40, 30))
    (tmp_path / "img" / "corrupt.jpg").write_bytes(b"definitely not a jpeg")
    lines = [
        {"id": "ok-box", "image": "img/a.png", "conversations": _turns("<image>\nWhere is the cat?", "Here <box:0>."),
         "boxes": [[10, 6, 20, 12]]},                                                            # 1 valid
        {"image": None, "conversations": _turns("Say hi", "Hi!", "Again", "Hi again!")},         # 2 valid
        '{"image": "img/a.png", "conversations": [',                                             # 3 json
        "",                                                                                       # 4 blank: ignored
        {"image": "img/a.png", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]},
        {"image": "img/a.png", "conversations": _turns("Question?", "   ")},                     # 6 empty
        {"image": "img/missing.png", "conversations": _turns("Q", "A")},                         # 7 image_missing
        {"image": "img/a.png", "conversations": _turns("Q <box:0>", "A"), "boxes": [[5, 5, -1, 3]]},  # 8 box
        {"image": "img/a.png", "conversations": _turns("Q <box:2>", "A"), "boxes": [[1, 1, 2, 2]]},   # 9 box ref
        {"conversations": _turns("<image>\nQ", "A")},                                            # 10 image_tag
        {"image": "img/corrupt.jpg", "conversations": _turns("Q", "A")},                         # 11 unreadable
        {"image": "img/a.png", "conversations": _turns("Q", "A"), "boxes": [[30, 20, 20, 20]]},  # 12 box outside
        ["not", "an", "object"],                                                                 # 13 schema
        {"image": "img/a.png", "conversations": _turns("Q", "A", "dangling question")},          # 14 role
    ]
    return _write_jsonl(tmp_path / "train.jsonl", lines)


def test_check_jsonl_reports_every_error_kind_with_line(tmp_path):
    path = _fixture(tmp_path)
    report = check_jsonl(path, tmp_path, TOKENIZER)
    got = {(e.line, e.kind) for e in report.errors}
    expected = {(3, "json"), (5, "role"), (6, "empty"), (7, "image_missing"), (8, "box"), (9, "box"),
                (10, "image_tag"), (11, "image_unreadable"), (12, "box"), (13, "schema"), (14, "role")}
    assert got == expected
    assert str(report.errors[0]).startswith(f"{path}:3: json: ")
    assert not report.ok
    assert report.records == 13 and report.valid == 2
    assert report.turns == 6 and report.images == 1 and report.distinct_images == 1 and report.text_only == 1
    # token statistics over the two valid records, as the model sees them (template applied, no image tokens)
    ex1 = "[INST] <Img><ImageHere></Img> Where is the cat?  [/INST]" + "Here {<25><20><75><60>}.###"
    ex2 = "[INST] Say hi [/INST]" + "Hi!###" + "[INST] Again  [/INST]" + "Hi again!###"
    lens = sorted(len(TOKENIZER.encode(s)) for s in (ex1, ex2))
    assert report.token_lengths["max"] == lens[1]
    assert report.token_lengths["p50"] == sum(lens) / 2
    assert "13 records, 2 valid" in report.summary()


def test_custom_reader_skips_bad_lines_and_goldens(tmp_path, caplog):
    path = _fixture(tmp_path)
    with caplog.at_level(logging.WARNING, logger="tinygptv.data"):
        reader = CustomJsonlReader(path, tmp_path)
    # the reader validates structure only; image files are checked by the loader when it decodes them
    assert len(reader) == 5 and reader.bad_records == 8
    assert f"{path}:3" in caplog.text and f"{path}:14" in caplog.text
    image, example, meta = reader.get(0, PickRng(0))
    assert image == str(tmp_path / "img" / "a.png") and meta["line"] == 1 and meta["id"] == "ok-box"
    assert parts(example) == (INST + "Where is the cat?  [/INST]", [("Here {<25><20><75><60>}.###", True)], ())
    assert_masks_answer(example, True, "Here {<25><20><75><60>}.###")
    image, example, _ = reader.get(1, PickRng(0))
    assert image is None
    assert parts(example) == ("[INST] Say hi [/INST]",
                              [("Hi!###", True), ("[INST] Again  [/INST]", False), ("Hi again!###", True)], (1,))


def test_llava_conversion_round_trip(tmp_path):
    write_image(tmp_path / "images" / "COCO_train2014_000000000001.jpg")
    llava = [
        {"id": "000000000001", "image": "COCO_train2014_000000000001.jpg",
         "conversations": _turns("<image>\nWhat is shown?", "A red square.", "Is it big?", "No, it is tiny.")},
        {"id": "t1", "conversations": _turns("Tell me a joke", "Why did the chicken cross the road?")},
        {"id": "bad", "image": "x.jpg", "conversations": [{"from": "gpt", "value": "no human"}]},
    ]
    src = write_json(tmp_path / "llava.json", llava)
    dst = tmp_path / "converted.jsonl"
    result = convert_llava_json(src, dst)
    assert (result.written, result.skipped) == (2, 1)
    lines = [json.loads(line) for line in dst.read_text().splitlines()]
    assert lines[0] == {"id": "000000000001", "image": "COCO_train2014_000000000001.jpg",
                        "conversations": _turns("What is shown?", "A red square.", "Is it big?", "No, it is tiny.")}
    assert lines[1]["image"] is None
    assert check_jsonl(dst, tmp_path / "images").ok
    # same examples as the upstream-style conversation reader on the original file
    ours = CustomJsonlReader(dst, tmp_path / "images").get(0, PickRng(0)).example
    theirs = LlavaConversationReader(src, tmp_path / "images").get(0, PickRng(0)).example
    assert ours == theirs
    back = tmp_path / "back.json"
    assert export_llava_json(dst, back) == 2
    assert json.loads(back.read_text()) == llava[:2]
