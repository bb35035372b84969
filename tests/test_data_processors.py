"""blip_caption, box text and the instruction pools (reference §4.7, §5.2–5.4)."""

import pytest

from tinygptv.data import processors as P


@pytest.mark.parametrize("raw, expected", [
    ("A Dog, running!  On the beach.", "a dog, running on the beach"),
    ("Sort: b, a. Use commas.", "sort b, a use commas"),
    ('He said "Hi" (twice) * #1 ~ ok;', "he said hi twice 1 ok"),
    # runs of >= 2 whitespace collapse; a single tab or newline survives (upstream regex \s{2,})
    ("Hello  World!\nNew\tline  ~ end;", "hello world new\tline end"),
    ("what's this?", "what's this?"),  # ? ' , - are kept
    ("   \n", ""),
])
def test_blip_caption_golden(raw, expected):
    assert P.blip_caption(raw) == expected


def test_blip_caption_keeps_first_50_words():
    words = [f"w{i}" for i in range(60)]
    assert P.blip_caption(" ".join(words)) == " ".join(words[:50])
    assert P.blip_caption("a b c", max_words=2) == "a b"


@pytest.mark.parametrize("box, size, expected", [
    ([10, 6, 20, 12], (40, 30), "{<25><20><75><60>}"),
    ([0, 0, 40, 30], (40, 30), "{<0><0><100><100>}"),
    # truncation, not rounding: 7.5 -> 7, 23.3 -> 23, 47.5 -> 47, 56.7 -> 56
    ([3, 7, 16, 10], (40, 30), "{<7><23><47><56>}"),
    ([0, 0, 19, 17], (40, 30), "{<0><0><47><56>}"),
    ([33.3, 10.9, 50.2, 70.05], (333, 250), "{<10><4><25><32>}"),
])
def test_box_to_text_golden(box, size, expected):
    assert P.box_to_text(box, size) == expected


def test_boxes_group_and_parsers():
    text = P.boxes_to_text([[10, 6, 20, 12], [0, 0, 40, 30]], (40, 30))
    assert text == "{<25><20><75><60><delim><0><0><100><100>}"
    assert P.parse_boxes(text) == [(25, 20, 75, 60), (0, 0, 100, 100)]
    grounded = "<p>a man</p> {<1><2><3><4>} rides <p>two horses</p> {<5><6><7><8><delim><9><10><11><12>}"
    assert P.parse_grounded(grounded) == [("a man", [(1, 2, 3, 4)]), ("two horses", [(5, 6, 7, 8), (9, 10, 11, 12)])]
    assert P.parse_grounded("{<0><0><10><10>}") == [(None, [(0, 0, 10, 10)])]
    assert P.parse_boxes("no box {<1><2><3>} here") == []
    assert P.text_to_box((25, 20, 75, 60), (40, 30)) == pytest.approx((10, 6, 30, 18))
    with pytest.raises(ValueError):
        P.box_to_text([0, 0, 1, 1], (0, 30))


def test_instruction_pools_counts_and_verbatim():
    assert len(P.CAPTION_PROMPTS) == 17
    assert len(P.VQA_PROMPTS) == 2
    assert len(P.REFER_PROMPTS) == 7
    assert len(P.IDENTIFY_PROMPTS) == 7
    assert len(P.GROUNDING_PROMPTS) == 4
    assert len(P.DETECTION_PROMPTS) == 1
    assert len(P.ALIGNMENT_PROMPTS) == 4
    assert P.CAPTION_PROMPTS[6] == "A photo of "
    assert P.CAPTION_PROMPTS[8] == "Write a short description for the image. "
    assert P.CAPTION_PROMPTS[-1] == "Use a few words to illustrate what is happening in the picture."
    assert P.VQA_PROMPTS[1] == "[vqa] Based on the image, respond to this question with a short answer: {}"
    assert P.REFER_PROMPTS[6] == "[refer] where can I locate the {} ?"
    assert P.IDENTIFY_PROMPTS[5] == "[identify] this {} is"
    assert P.GROUNDING_PROMPTS[3] == "[grounding] give a thorough description of what you see in this image"
    assert P.DETECTION_PROMPTS == ("[detection] {}",)
    assert P.ALIGNMENT_PROMPTS[0] == "<Img><ImageHere></Img> Describe this image in detail."
    assert all("<ImageHere>" in p for p in P.ALIGNMENT_PROMPTS)
    assert all(p.count("{}") == 1 for p in P.VQA_PROMPTS + P.REFER_PROMPTS + P.IDENTIFY_PROMPTS)
