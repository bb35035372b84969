"""Grounding and conversation readers on tiny fixtures: golden Examples, masking, bad input, safe pickles."""

import logging
import pickle

import pytest

from test_data_common import PickRng, assert_masks_answer, parts, supervised_text, write_image, write_json
from tinygptv.data.readers import (DataLayoutError, FlickrCaptionToPhraseReader, FlickrGroundedCaptionReader,
                                   FlickrObjectToPhraseReader, InvRefCOCOReader, LlavaConversationReader,
                                   LlavaDetailReader, LlavaReasonReader, MultitaskConversationReader,
                                   RefCOCOReader, UnnaturalInstructionReader, VisualGenomeReader,
                                   safe_pickle_load)
from tinygptv.image import ImageError

INST = "[INST] <Img><ImageHere></Img> "


# ---------------------------------------------------------------------------------------------- RefCOCO
def _refcoco(tmp_path, dataset="refcoco", split_by="unc"):
    ann_root = tmp_path / "refcoco_annotations"
    refs = [
        {"ref_id": 1, "ann_id": 10, "image_id": 5, "category_id": 18, "split": "train",
         "sentences": [{"raw": "The Left Dog.", "sent": "the left dog", "tokens": ["the", "left", "dog"],
                        "sent_id": 100}]},
        {"ref_id": 2, "ann_id": 11, "image_id": 5, "category_id": 18, "split": "val",
         "sentences": [{"raw": "val ref", "sent_id": 101}]},
        {"ref_id": 3, "ann_id": 999, "image_id": 5, "category_id": 18, "split": "train",
         "sentences": [{"raw": "dangling annotation", "sent_id": 102}]},
        {"ref_id": 4, "ann_id": 12, "image_id": 6, "category_id": 1, "split": "train",
         "sentences": [{"raw": "Man On Right", "sent_id": 103}, {"raw": "guy", "sent_id": 104}]},
    ]
    (ann_root / dataset).mkdir(parents=True)
    with open(ann_root / dataset / f"refs({split_by}).p", "wb") as f:
        pickle.dump(refs, f)
    write_json(ann_root / dataset / "instances.json", {
        "images": [{"id": 5, "file_name": "COCO_train2014_000000000005.jpg", "width": 40, "height": 30}],
        "annotations": [{"id": 10, "image_id": 5, "bbox": [10, 6, 20, 12], "category_id": 18},
                        {"id": 11, "image_id": 5, "bbox": [0, 0, 5, 5], "category_id": 18},
                        {"id": 12, "image_id": 6, "bbox": [0, 0, 5, 5], "category_id": 1}],
        "categories": [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}]})
    write_image(tmp_path / "train2014" / "COCO_train2014_000000000005.jpg", size=(40, 30))
    return ann_root, tmp_path / "train2014"


def test_refcoco_refer_golden(tmp_path, caplog):
    ann_root, images = _refcoco(tmp_path)
    with caplog.at_level(logging.WARNING, logger="tinygptv.data"):
        reader = RefCOCOReader(ann_root, images, dataset="refcoco", split_by="unc")
    assert len(reader) == 2 and reader.filtered == 1 and reader.bad_records == 1
    assert "refs(unc).p: record 2" in caplog.text and "999" in caplog.text
    image, example, meta = reader.get(0, PickRng(3))
    assert image == str(images / "COCO_train2014_000000000005.jpg") and meta["task"] == "[refer]"
    assert parts(example) == (INST + "[refer] from this image, tell me the location of the left dog  [/INST]",
                              [("{<25><20><75><60>}###", True)], ())
    assert_masks_answer(example, True, "{<25><20><75><60>}###")
    with pytest.raises(ImageError):  # image 6 is missing: counted by the loader as a bad image
        reader.get(1, PickRng(0))


def test_invrefcoco_identify_golden(tmp_path):
    ann_root, images = _refcoco(tmp_path, "refcocog", "umd")
    reader = InvRefCOCOReader(ann_root, images, dataset="refcocog", split_by="umd")
    example = reader.get(0, PickRng(3)).example
    assert parts(example) == (INST + "[identify] what is it in {<25><20><75><60>}  [/INST]",
                              [("the left dog###", True)], ())
    assert_masks_answer(example, True, "the left dog###")
    with pytest.raises(DataLayoutError, match=r"refs\(unc\)\.p"):
        InvRefCOCOReader(ann_root, images, dataset="refcocog", split_by="unc")


def make_marker(path):
    """Would create a file if a pickle could call it."""
    open(path, "w").close()


class Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return make_marker, (self.path,)


def test_restricted_unpickler_refuses_arbitrary_classes(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.p"
    evil.write_bytes(pickle.dumps([{"ref_id": 1, "payload": Evil(str(marker))}]))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        safe_pickle_load(evil)
    assert not marker.exists()
    plain = tmp_path / "plain.p"
    plain.write_bytes(pickle.dumps([{"a": [1, 2.5, "x"]}], protocol=2))
    assert safe_pickle_load(plain) == [{"a": [1, 2.5, "x"]}]
    # the reader refuses the same way
    ann_root, images = _refcoco(tmp_path)
    (ann_root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps([Evil(str(marker))]))
    with pytest.raises(pickle.UnpicklingError):
        RefCOCOReader(ann_root, images)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- Visual Genome
def test_visual_genome_golden(tmp_path):
    vg = tmp_path / "visual_genome"
    write_json(vg / "image_data.json", [
        {"image_id": 1, "url": "https://cs.stanford.edu/people/rak248/VG_100K/1.jpg", "width": 40, "height": 30},
        {"id": 2, "url": "https://cs.stanford.edu/people/rak248/VG_100K_2/2.jpg", "width": 40, "height": 30},
    ])
    write_json(vg / "region_descriptions.json", [
        {"id": 1, "regions": [
            {"region_id": 1, "image_id": 1, "phrase": "A Red Ball.", "x": 4, "y": 3, "width": 8, "height": 6},
            {"region_id": 2, "image_id": 1, "phrase": "too big", "x": 0, "y": 0, "width": 200, "height": 100},
            {"region_id": 3, "image_id": 1, "x": 0, "y": 0, "width": 2, "height": 2},
        ]},
        {"id": 77, "regions": []},
    ])
    write_image(vg / "VG_100K" / "1.jpg", size=(40, 30))
    reader = VisualGenomeReader(vg)
    assert len(reader) == 1 and reader.filtered == 1 and reader.bad_records == 2
    assert any("region 2" in loc for loc in reader.bad_record_locations)
    image, example, _ = reader.get(0, PickRng(0))
    assert image == str(vg / "VG_100K" / "1.jpg")
    assert parts(example) == (INST + "[refer] a red ball  [/INST]", [("{<10><10><30><30>}###", True)], ())
    assert_masks_answer(example, True, "{<10><10><30><30>}###")


# ---------------------------------------------------------------------------------------------- Flickr
def test_flickr_readers_golden(tmp_path):
    imgs = tmp_path / "flickr30k-images"
    imgs.mkdir()
    grounded = write_json(tmp_path / "groundedcaption.json", [
        {"image_id": 1000, "grounded_caption": "<p>A man</p> {<1><2><3><4>} rides."}, {"image_id": 1001}])
    c2p = write_json(tmp_path / "captiontobbox.json", [
        {"image_id": "1000", "caption": "A man rides.", "output": "<p>a man</p> {<1><2><3><4>}"}])
    p2o = write_json(tmp_path / "phrasetobbox.json", [
        {"image_id": 1000, "phrase": "a man", "bbox": "{<1><2><3><4>}"}, {"image_id": 1, "phrase": "x", "bbox": 3}])

    r = FlickrGroundedCaptionReader(grounded, imgs)
    assert len(r) == 1 and r.bad_records == 1
    image, example, meta = r.get(0, PickRng(2))
    assert image == str(imgs / "1000.jpg") and meta["task"] == "[grounding]"
    assert parts(example) == (INST + "[grounding] summarize this image in details  [/INST]",
                              [("<p>A man</p> {<1><2><3><4>} rides.###", True)], ())
    assert_masks_answer(example, True, "<p>A man</p> {<1><2><3><4>} rides.###")

    example = FlickrCaptionToPhraseReader(c2p, imgs).get(0, PickRng(0)).example
    assert parts(example) == (INST + "[detection] A man rides.  [/INST]",
                              [("<p>a man</p> {<1><2><3><4>}###", True)], ())

    r = FlickrObjectToPhraseReader(p2o, imgs)
    assert r.bad_records == 1
    example = r.get(0, PickRng(0)).example
    assert parts(example) == (INST + "[detection] a man  [/INST]", [("<p>a man</p> {<1><2><3><4>}###", True)], ())
    assert_masks_answer(example, True, "<p>a man</p> {<1><2><3><4>}###")


# ---------------------------------------------------------------------------------------------- LLaVA & co
LLAVA = [
    {"id": "000000000009", "image": "000000000009.jpg", "conversations": [
        {"from": "human", "value": "<image>\nDescribe the image: in detail."},
        {"from": "gpt", "value": "A Plate of FOOD.\nIt looks tasty."},
        {"from": "human", "value": "What Color is it?"},
        {"from": "gpt", "value": "Mostly green."}]},
    {"id": "000000000010", "conversations": [
        {"from": "gpt", "value": "wrong order"}, {"from": "human", "value": "?"}]},
    {"id": "000000000011", "conversations": [{"from": "human", "value": "<image>\nOnly a question"}]},
]


@pytest.mark.parametrize("cls", [LlavaDetailReader, LlavaReasonReader])
def test_llava_detail_reason_golden(tmp_path, cls):
    ann = write_json(tmp_path / "detail_23k.json", LLAVA)
    (tmp_path / "train2014").mkdir()
    reader = cls(ann, tmp_path / "train2014")
    assert len(reader) == 1 and reader.bad_records == 2
    image, example, _ = reader.get(0, PickRng(0))
    assert image == str(tmp_path / "train2014" / "COCO_train2014_000000000009.jpg")
    assert parts(example) == (INST + "describe the image in detail  [/INST]",
                              [("A Plate of FOOD.\nIt looks tasty.###", True)], ())
    assert_masks_answer(example, True, "A Plate of FOOD.\nIt looks tasty.###")


@pytest.mark.parametrize("cls", [LlavaConversationReader, MultitaskConversationReader])
def test_multi_turn_conversation_golden(tmp_path, cls):
    ann = write_json(tmp_path / "conversation_58k.json", LLAVA)
    (tmp_path / "train2014").mkdir()
    reader = cls(ann, tmp_path / "train2014")
    example = reader.get(0, PickRng(0)).example
    assert parts(example) == (
        INST + "Describe the image: in detail.  [/INST]",
        [("A Plate of FOOD.\nIt looks tasty.###", True), ("[INST] What Color is it?  [/INST]", False),
         ("Mostly green.###", True)],
        (1,))
    assert supervised_text(example, True) == "A Plate of FOOD.\nIt looks tasty.###Mostly green.###"


def test_unnatural_instruction_text_only_golden(tmp_path):
    ann = write_json(tmp_path / "filtered_unnatural_instruction.json", [
        {"instances": [{"instruction_with_input": "Sort: b, a.", "constraints": "Use commas.", "output": "A, B."}]},
        {"instances": [{"instruction_with_input": "Say HI", "constraints": None, "output": "Hi!"}]},
        {"instances": []},
    ])
    reader = UnnaturalInstructionReader(ann)
    assert len(reader) == 2 and reader.bad_records == 1
    image, example, _ = reader.get(0, PickRng(0))
    assert image is None
    assert parts(example) == ("[INST] sort b, a use commas [/INST]", [("a, b###", True)], ())
    assert_masks_answer(example, False, "a, b###")
    assert parts(reader.get(1, PickRng(0)).example) == ("[INST] say hi [/INST]", [("hi###", True)], ())
