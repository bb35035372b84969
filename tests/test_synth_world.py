"""The synthetic world itself: scene sampling, rendering (objects and words where the description says),
unique referring expressions, and text that is correct by construction (checked by independent rules)."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest

from tinygptv.data.processors import box_coords, parse_grounded
from tinygptv.synth.font import word_mask
from tinygptv.synth.render import render
from tinygptv.synth.text import (caption, detail, document, grounded_caption, place_questions, questions,
                                 shortest_ref, statements)
from tinygptv.synth.world import (COLOURS, PLURALS, SHAPES, Obj, Scene, boxes_apart, referring_expressions, resolve,
                                  sample_scene)


def scenes(n: int, seed: str = "t", **kwargs) -> list[Scene]:
    rng = random.Random(seed)
    return [sample_scene(rng, f"s{i}", 128, **kwargs) for i in range(n)]


def test_sampling_is_deterministic_and_valid():
    a, b, c = scenes(40), scenes(40), scenes(40, seed="other")
    assert [s.to_dict() for s in a] == [s.to_dict() for s in b]
    assert [s.signature() for s in a] != [s.signature() for s in c]
    for s in a:
        assert 112 <= s.width <= 160 and 112 <= s.height <= 160 and 1 <= len(s.objects) <= 4
        things = [o.box for o in s.objects] + ([s.word.box] if s.word else [])
        for i, box in enumerate(things):
            x, y, w, h = box
            assert x >= 0 and y >= 0 and x + w <= s.width and y + h <= s.height and w > 0 and h > 0
            assert all(boxes_apart(box, other) for other in things[i + 1:])
        kinds = [(o.shape, o.colour, o.size) for o in s.objects]
        assert len(set(kinds)) == len(kinds)
        assert Scene.from_dict(s.to_dict()) == s


def _within(xs: np.ndarray, ys: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    x, y, w, h = box
    return (xs >= x - 1) & (xs <= x + w) & (ys >= y - 1) & (ys <= y + h)


def test_objects_are_drawn_inside_their_boxes():
    for s in scenes(20):
        arr = np.asarray(render(s), dtype=np.int32)
        assert arr.shape == (s.height, s.width, 3)
        for o in s.objects:
            close = (np.abs(arr - np.array(COLOURS[o.colour])).sum(axis=2) < 40)
            ys, xs = np.nonzero(close)
            assert _within(xs, ys, o.box).sum() > 0.2 * o.box[2] * o.box[3]  # there, filling much of its box
            same = np.any([_within(xs, ys, p.box) for p in s.objects if p.colour == o.colour], axis=0)
            assert same.mean() > 0.99  # pixels of its colour lie in the boxes of objects of that colour


def test_words_are_legible_and_inside_their_box():
    found = 0
    for s in scenes(30, word=True):
        assert s.word is not None
        arr = np.asarray(render(s), dtype=np.int32)
        dark = (arr < 90).all(axis=2)  # the word ink is near black; no object colour is dark on all channels
        x, y, w, h = s.word.box
        outside = dark.copy()
        outside[y:y + h, x:x + w] = False
        assert not outside.any(), "ink outside the word box"
        glyphs = np.asarray(word_mask(s.word.text, s.word.scale)) > 127
        assert (dark[y:y + h, x:x + w] == glyphs).all(), "the word is not drawn exactly as the font's glyphs"
        assert s.word.scale * 64 >= max(s.width, s.height)  # each font pixel is ≥ 1 pixel at a 64 px input
        found += 1
    assert found == 30


def test_referring_expressions_are_unique():
    n = 0
    for s in scenes(80):
        for i in range(len(s.objects)):
            specs = referring_expressions(s, i)
            assert specs, "every object has at least its full name"
            for spec in specs:
                assert resolve(s, spec) == [i]
                n += 1
                if spec.kind == "attribute":  # independent check of plain attribute expressions
                    words = spec.text().split()[1:]
                    match = [o for o in s.objects if all(w in (o.shape, o.colour, o.size, "object") for w in words)
                             and (words[-1] == "object" or words[-1] == o.shape)]
                    assert match == [s.objects[i]], spec.text()
    assert n > 200


def independent_answer(s: Scene, question: str) -> str | None:
    """Answers of the simple question forms, computed without the generator's code (None = not checked)."""
    plural = {p: k for k, p in PLURALS.items()}
    if question == "how many objects are there?":
        return str(len(s.objects))
    if m := re.fullmatch(r"how many (\w+) are there\?", question):
        return str(sum(o.shape == plural[m[1]] for o in s.objects))
    if m := re.fullmatch(r"how many (\w+) objects are there\?", question):
        return str(sum(o.colour == m[1] for o in s.objects))
    if m := re.fullmatch(r"is there an? (\w+) (\w+)\?", question):
        return "yes" if any(o.colour == m[1] and o.shape == m[2] for o in s.objects) else "no"
    if m := re.fullmatch(r"is there an? (\w+)\?", question):
        return "yes" if any(o.shape == m[1] for o in s.objects) else "no"
    if m := re.fullmatch(r"what color is the (\w+)\?", question):
        hits = [o.colour for o in s.objects if o.shape == m[1]]
        return hits[0] if len(hits) == 1 else "AMBIGUOUS"
    if m := re.fullmatch(r"what shape is the (\w+) object\?", question):
        hits = [o.shape for o in s.objects if o.colour == m[1]]
        return hits[0] if len(hits) == 1 else "AMBIGUOUS"
    if question.startswith("what word is written"):
        return s.word.text if s.word else "AMBIGUOUS"
    return None


def test_questions_are_correct_by_construction():
    checked = 0
    for s in scenes(120, word_prob=0.5):
        for qas in questions(s, random.Random(s.id)).values():
            for qa in qas:
                expected = independent_answer(s, qa.question)
                if expected is not None:
                    assert qa.answer == expected, (s.to_dict(), qa)
                    checked += 1
    assert checked > 1000


def test_documents_describe_the_scene_then_ask_questions_it_answers():
    """Stage-0 LM documents: a description, then question lines whose answers are right for that scene."""
    checked = 0
    for s in scenes(60, seed="doc"):
        head, *qa_lines = document(s, random.Random(s.id)).split("\n")
        rng = random.Random(s.id)  # the same draws: detail or caption, then the caption's own
        assert head == (detail(s) if rng.random() < 0.5 else caption(s, rng))
        assert len(qa_lines) == 4
        for line in qa_lines:
            question, answer = line.rsplit(" ", 1)
            expected = independent_answer(s, question)
            if expected is not None:
                assert answer == expected, (s.to_dict(), line)
                checked += 1
    assert checked > 100


def test_spatial_statements_and_captions_match_the_boxes():
    rng = random.Random(0)
    n_statements = 0
    for s in scenes(60, n_objects=3):
        for st in statements(s):
            a, b = s.objects[st.subject], s.objects[st.anchor]
            holds = {"left of": a.box[0] + a.box[2] <= b.box[0], "right of": b.box[0] + b.box[2] <= a.box[0],
                     "above": a.box[1] + a.box[3] <= b.box[1], "below": b.box[1] + b.box[3] <= a.box[1]}
            assert holds[st.relation] == st.label
            n_statements += 1
        text = caption(s, rng)
        assert all(f"{o.colour} {o.shape}" in text for o in s.objects)
        assert f"{len(s.objects)} objects" in detail(s)
        pairs = parse_grounded(grounded_caption(s, rng))
        grid = {box_coords(o.box, s.size): o for o in s.objects}
        assert len(pairs) == len(s.objects)
        for phrase, boxes in pairs:
            o = grid[boxes[0]]
            assert phrase is not None and phrase.endswith(f"{o.colour} {o.shape}")
    assert n_statements > 50


def test_place_questions_match_the_boxes():
    """"where is A" → the 3 × 3 cell of A's centre; "is A to the left or right of B?" → the side A's box is on."""
    n_side = 0
    for s in scenes(60, n_objects=3):
        refs = {shortest_ref(s, i).text(): i for i in range(len(s.objects))}
        place = place_questions(s)
        assert len(place["where"]) == len(s.objects)
        for qa in place["where"]:
            (x, y, w, h) = s.objects[refs[qa.question.removeprefix("where is ")]].box
            col = ("left", "", "right")[min(2, int(3 * (x + w / 2) / s.width))]
            row = ("top", "", "bottom")[min(2, int(3 * (y + h / 2) / s.height))]
            assert qa.answer == (f"{row} {col}".strip() or "center")
        for qa in place["side"]:
            m = re.fullmatch(r"is (.+) (?:to the left or right of|above or below) (.+)\?", qa.question)
            a, b = s.objects[refs[m.group(1)]].box, s.objects[refs[m.group(2)]].box
            side = {"left": a[0] + a[2] <= b[0], "right": b[0] + b[2] <= a[0], "above": a[1] + a[3] <= b[1],
                    "below": b[1] + b[3] <= a[1]}
            assert side[qa.answer] and ("left" in qa.question) == (qa.answer in ("left", "right"))
            n_side += 1
    assert n_side > 50


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_renders(shape):
    s = Scene("one", 128, 128, (240, 240, 240), 0.0, 0, (Obj(shape, "red", "large", (40, 40, 40, 40)),))
    arr = np.asarray(render(s), dtype=np.int32)
    red = (np.abs(arr - np.array(COLOURS["red"])).sum(axis=2) < 40)
    assert red[40:80, 40:80].sum() > 300 and red.sum() == red[39:81, 39:81].sum()
