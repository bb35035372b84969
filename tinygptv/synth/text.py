"""Text about a scene, derived from its description: captions, detail descriptions, grounded captions,
questions with short answers (by category), true/false spatial statements.

Every function reads only the :class:`~tinygptv.synth.world.Scene` and the given :class:`random.Random`, so
the text is correct by construction and fixed by the seed. Answers are short and drawn from the world's small
vocabulary (``"red"``, ``"circle"``, ``"2"``, ``"yes"``, ``"small"``, ``"cat"``).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from tinygptv.data.processors import box_to_text
from tinygptv.synth.world import (COLOURS, OPPOSITE, PLURALS, RELATION_PHRASES, SHAPES, Obj, RefSpec, Scene,
                                  referring_expressions, region, relation_holds, relations, unique_attribute_specs)

CATEGORIES: tuple[str, ...] = ("colour", "shape", "size", "count", "exist", "text", "spatial")


@dataclass(frozen=True)
class QA:
    """A question with its short answer; ``category`` is one of :data:`CATEGORIES` (or ``unanswerable``, or
    ``where`` / ``side`` from :func:`place_questions`)."""

    question: str
    answer: str
    category: str


@dataclass(frozen=True)
class Statement:
    """A spatial statement about objects ``subject`` and ``anchor`` and whether it holds."""

    text: str
    label: bool
    relation: str
    subject: int
    anchor: int


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def indefinite(obj: Obj, size: bool = True, colour: bool = True) -> str:
    """``"a large red circle"`` / ``"an orange star"``."""
    name = obj.name(size, colour)
    return f"{article(name)} {name}"


def object_list(objs: list[Obj] | tuple[Obj, ...], size: bool = True) -> str:
    """``"a red circle, a blue square and a green star"``."""
    names = [indefinite(o, size=size) for o in objs]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def shortest_ref(scene: Scene, index: int) -> RefSpec:
    """The shortest unique attribute expression of an object (``"the circle"`` before ``"the red circle"``)."""
    return unique_attribute_specs(scene, index)[0]


def box_text(scene: Scene, obj: Obj) -> str:
    """The object's box on the 0–100 grid of the image: ``{<x1><y1><x2><y2>}``."""
    return box_to_text(obj.box, scene.size)


# ------------------------------------------------------------------------------------------ captions
def caption(scene: Scene, rng: random.Random) -> str:
    """One short caption, e.g. ``"a large red circle to the left of a small blue square."``."""
    return " ".join(text for text, _ in caption_parts(scene, rng)) + "."


def caption_parts(scene: Scene, rng: random.Random) -> list[tuple[str, int | None]]:
    """A caption as ``(text, object index or None)`` pieces, so it can be written plain or grounded."""
    sizes = rng.random() < 0.7
    order = sorted(range(len(scene.objects)), key=lambda i: scene.objects[i].box[0])
    if rng.random() < 0.3:
        rng.shuffle(order)
    phrase = {i: indefinite(scene.objects[i], size=sizes) for i in order}
    parts: list[tuple[str, int | None]] = []
    if len(order) == 2:
        a, b = order
        rels = [r for r in RELATION_PHRASES if relation_holds(scene.objects[a], scene.objects[b], r)]
        link = RELATION_PHRASES[rng.choice(rels)] if rels else "and"
        parts = [(phrase[a], a), (link, None), (phrase[b], b)]
    else:
        for k, i in enumerate(order):
            if k and k == len(order) - 1:
                parts.append(("and", None))
            parts.append((phrase[i] + ("," if k < len(order) - 2 else ""), i))
    if scene.word is not None:
        parts.append((f"with the word {scene.word.text}", None))
    return parts


def grounded_caption(scene: Scene, rng: random.Random) -> str:
    """``"<p>a large red circle</p> {<..><..><..><..>} to the left of <p>a small blue square</p> {…}."``"""
    out = []
    for text, i in caption_parts(scene, rng):
        if i is None:
            out.append(text)
        else:
            comma = "," if text.endswith(",") else ""
            out.append(f"<p>{text.rstrip(',')}</p> {box_text(scene, scene.objects[i])}{comma}")
    return " ".join(out) + "."


def phrases_with_boxes(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """(plain caption, ``<p>phrase</p> {box}`` list of its objects) for caption-to-phrase detection."""
    parts = caption_parts(scene, rng)
    plain = " ".join(t for t, _ in parts) + "."
    grounded = " ".join(f"<p>{t.rstrip(',')}</p> {box_text(scene, scene.objects[i])}" for t, i in parts
                        if i is not None)
    return plain, grounded


def detail(scene: Scene) -> str:
    """A several-sentence description: count, each object with its place and a relation, the word."""
    n = len(scene.objects)
    lines = [f"The image shows {n} object{'s' if n != 1 else ''} on a light background."]
    rels = relations(scene)
    for i, obj in enumerate(sorted(range(n), key=lambda k: scene.objects[k].box[1])):
        o = scene.objects[obj]
        where = region(scene, o.box)
        where = "in the center" if where == "center" else f"at the {where}"
        sentence = f"{indefinite(o).capitalize()} is {where}"
        rel = next(((r, j) for a, r, j in rels if a == obj and j != obj), None)
        if rel is not None and i:
            sentence += f", {RELATION_PHRASES[rel[0]]} {shortest_ref(scene, rel[1]).text()}"
        lines.append(sentence + ".")
    if scene.word is not None:
        where = region(scene, scene.word.box)
        lines.append(f"The word {scene.word.text} is written "
                     f"{'in the center' if where == 'center' else 'at the ' + where}.")
    return " ".join(lines)


# ------------------------------------------------------------------------------------------ questions
def questions(scene: Scene, rng: random.Random) -> dict[str, list[QA]]:
    """Candidate questions of the scene by category (a category may be empty, e.g. ``text`` without a word)."""
    objs = scene.objects
    out: dict[str, list[QA]] = {c: [] for c in CATEGORIES}
    for i, o in enumerate(objs):
        refs = referring_expressions(scene, i, ("attribute", "spatial"))
        for spec in refs:
            ref = spec.text()
            if spec.colour is None:
                out["colour"].append(QA(f"what color is {ref}?", o.colour, "colour"))
            if spec.shape is None:
                out["shape"].append(QA(f"what shape is {ref}?", o.shape, "shape"))
            if spec.size is None:
                out["size"].append(QA(f"is {ref} small or large?", o.size, "size"))
    shapes = sorted({rng.choice(SHAPES), *(o.shape for o in objs)})
    colours = sorted({rng.choice(list(COLOURS)), *(o.colour for o in objs)})
    out["count"] = [QA("how many objects are there?", str(len(objs)), "count")]
    out["count"] += [QA(f"how many {PLURALS[s]} are there?", str(scene.count(shape=s)), "count") for s in shapes]
    out["count"] += [QA(f"how many {c} objects are there?", str(scene.count(colour=c)), "count") for c in colours]
    out["exist"] = _exist_questions(scene, rng)
    if scene.word is not None:
        out["text"] += [QA("what word is written?", scene.word.text, "text"),
                        QA("what word is written in the image?", scene.word.text, "text"),
                        QA("is there a word in the image?", "yes", "text")]
    else:
        out["text"].append(QA("is there a word in the image?", "no", "text"))
    for st in statements(scene):
        q = f"is {st.text.removesuffix('.').replace(' is ', ' ', 1)}?"
        out["spatial"].append(QA(q, "yes" if st.label else "no", "spatial"))
    return out


def _exist_questions(scene: Scene, rng: random.Random) -> list[QA]:
    present = {(o.colour, o.shape) for o in scene.objects}
    out = []
    for colour, shape in sorted(present):
        out += [QA(f"is there {article(colour)} {colour} {shape}?", "yes", "exist"),
                QA(f"is there {article(shape)} {shape}?", "yes", "exist")]
    for _ in range(len(out)):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        if (colour, shape) not in present:
            out.append(QA(f"is there {article(colour)} {colour} {shape}?", "no", "exist"))
        if shape not in {s for _, s in present}:
            out.append(QA(f"is there {article(shape)} {shape}?", "no", "exist"))
    yes = [q for q in out if q.answer == "yes"]
    no = [q for q in out if q.answer == "no"]
    return yes + no[:len(yes)]


def sample_questions(scene: Scene, rng: random.Random, k: int,
                     categories: tuple[str, ...] = CATEGORIES) -> list[QA]:
    """``k`` distinct questions, each from a category drawn uniformly among the non-empty ones."""
    pool = questions(scene, rng)
    cats = [c for c in categories if pool.get(c)]
    out: list[QA] = []
    for _ in range(k * 4):
        if len(out) == k or not cats:
            break
        qa = rng.choice(pool[rng.choice(cats)])
        if all(q.question != qa.question for q in out):
            out.append(qa)
    return out


def keyed_last(question: str) -> str:
    """The question reworded to end with the words it is keyed by: "what color is the cross?" → "what color is the
    cross", "what shape is the red object?" → "what shape is the object that is red". Only that one-word form of
    the shape question is reordered; the others just lose the "?" (colour questions already end with their key,
    "what color is the cross on the left"; "what shape is the small red object" keeps its keys before "object").
    Count questions become "count the crosses", "count the objects that are red", "count the objects".
    Asked so, the lookup can happen at the last token; as written, answering takes two hops (bring the key to the
    answer position, then look it up) that gradient descent does not start on its own
    (``benchmarks/results/lm-binding-curriculum.md``)."""
    colour_of = re.fullmatch(r"what shape is the (\w+) object\?", question)
    if colour_of:
        return f"what shape is the object that is {colour_of[1]}"
    count = re.fullmatch(r"how many (\w+ )?(\w+) are there\?", question)
    if count:  # "how many red objects are there?" → "count the objects that are red"
        return f"count the {count[2]} that are {count[1].strip()}" if count[1] else f"count the {count[2]}"
    return question.removesuffix("?")


def document(scene: Scene, rng: random.Random, k: int = 4) -> str:
    """A description of the scene followed by ``k`` of its questions with their answers, one per line.

    Text-only pretraining on such documents is where the nano language model learns to answer from its context
    (a pretrained LM like Phi-2 brings that ability; a LM trained on isolated lines has none: measured, it
    answers colour/shape questions about a description in its context at chance).
    """
    head = detail(scene) if rng.random() < 0.5 else caption(scene, rng)
    return "\n".join([head] + [f"{qa.question} {qa.answer}" for qa in sample_questions(scene, rng, k)])


def unanswerable(scene: Scene, rng: random.Random) -> QA:
    """A question about something absent (an absent shape's colour, or the word when there is none)."""
    absent = [s for s in SHAPES if scene.count(shape=s) == 0]
    if scene.word is None and rng.random() < 0.3:
        return QA("what word is written?", "unanswerable", "unanswerable")
    shape = rng.choice(absent)
    return QA(rng.choice((f"what color is the {shape}?", f"how big is the {shape}?")), "unanswerable",
              "unanswerable")


# ------------------------------------------------------------------------------------------ statements
def statements(scene: Scene) -> list[Statement]:
    """For each true relation between two objects: the true statement and its opposite (false) one, with the
    objects named by their shortest unique attribute expressions."""
    out = []
    for i, rel, j in relations(scene):
        a, b = shortest_ref(scene, i).text(), shortest_ref(scene, j).text()
        out.append(Statement(f"{a} is {RELATION_PHRASES[rel]} {b}.", True, rel, i, j))
        out.append(Statement(f"{a} is {RELATION_PHRASES[OPPOSITE[rel]]} {b}.", False, OPPOSITE[rel], i, j))
    return out


def place_questions(scene: Scene) -> dict[str, list[QA]]:
    """Questions about where objects are, for the stage-0 LM's object-token phase (no random draws): ``where``, one
    per object (``"where is the red circle"`` → its 3 × 3 place, ``"top left"``), and ``side``, one per true
    relation, in :func:`~tinygptv.synth.world.relations`' order (``"is the circle to the left or right of the red
    square?"`` → ``"left"``; ``"above or below"`` → ``"above"``)."""
    out: dict[str, list[QA]] = {"where": [], "side": []}
    for i, obj in enumerate(scene.objects):
        out["where"].append(QA(f"where is {shortest_ref(scene, i).text()}", region(scene, obj.box), "where"))
    for i, rel, j in relations(scene):
        a, b = shortest_ref(scene, i).text(), shortest_ref(scene, j).text()
        ask = (f"is {a} to the left or right of {b}?" if rel in ("left of", "right of")
               else f"is {a} above or below {b}?")
        out["side"].append(QA(ask, rel.removesuffix(" of"), "side"))
    return out


def answer_sentence(qa: QA, scene: Scene) -> str:
    """A short full-sentence answer for conversations (``"It is red."``, ``"There are 2."``)."""
    a = qa.answer
    if qa.category in ("colour", "size"):
        return f"It is {a}."
    if qa.category == "shape":
        return f"It is {article(a)} {a}."
    if qa.category == "count":
        return f"There {'is' if a == '1' else 'are'} {a}."
    if qa.category == "text" and a not in ("yes", "no"):
        return f"The word is {a}."
    if qa.category in ("exist", "text"):
        return "Yes, there is." if a == "yes" else "No, there is not."
    if qa.category == "spatial":
        return "Yes, it is." if a == "yes" else "No, it is not."
    return a.capitalize() + "."
