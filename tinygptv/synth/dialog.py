"""Longer text about scenes (multi-turn conversations, reasoning answers, multitask conversations with task
tags, knowledge questions with 10 annotator answers) and text-only instructions with their answers."""

from __future__ import annotations

import random

from tinygptv.data.processors import CAPTION_PROMPTS, GROUNDING_PROMPTS
from tinygptv.synth.text import (QA, answer_sentence, article, box_text, caption, grounded_caption, sample_questions,
                                 shortest_ref)
from tinygptv.synth.world import COLOURS, PLURALS, SHAPES, SIZES, WORDS, Scene, referring_expressions

MIXES: dict[frozenset[str], str] = {frozenset({"red", "yellow"}): "orange", frozenset({"blue", "yellow"}): "green",
                                    frozenset({"red", "blue"}): "purple", frozenset({"red", "white"}): "pink"}
FRUITS: dict[str, tuple[str, str]] = {"red": ("apple", "strawberry"), "yellow": ("banana", "lemon"),
                                      "orange": ("orange", "tangerine"), "green": ("lime", "kiwi"),
                                      "purple": ("grape", "plum"), "blue": ("blueberry", "bilberry"),
                                      "pink": ("peach", "guava"), "brown": ("coconut", "date")}
CORNERS: dict[str, int] = {"triangle": 3, "square": 4, "diamond": 4}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
Turns = list[tuple[str, str]]


def ten_answers(qa: QA, rng: random.Random) -> list[str]:
    """Ten annotator answers: the answer at least 8 times; sometimes a number word or a disagreeing answer."""
    answers = [qa.answer] * 10
    if qa.category == "count" and rng.random() < 0.3 and int(qa.answer) < len(NUMBER_WORDS):
        answers[9] = NUMBER_WORDS[int(qa.answer)]
    if rng.random() < 0.15:
        pool = {"colour": list(COLOURS), "shape": list(SHAPES), "size": list(SIZES), "count": ["1", "2", "3"],
                "text": list(WORDS)}.get(qa.category, ["yes", "no"])
        answers[8] = rng.choice(pool)
    return answers


def with_image_tag(question: str, rng: random.Random) -> str:
    """The first human turn of a LLaVA record: ``<image>`` before or after the question."""
    return f"<image>\n{question}" if rng.random() < 0.5 else f"{question}\n<image>"


def conversation(scene: Scene, rng: random.Random, n_turns: int) -> Turns:
    """``n_turns`` question/answer pairs with sentence answers (``"What color is the star?"``, ``"It is red."``)."""
    return [(qa.question[0].upper() + qa.question[1:], answer_sentence(qa, scene))
            for qa in sample_questions(scene, rng, n_turns)]


def reasoning(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """One question needing a small inference, with a short justified answer."""
    objs, n = scene.objects, len(scene.objects)
    ref = [shortest_ref(scene, i).text() for i in range(n)]
    options = []
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    for i, j in pairs:
        if objs[i].size == "large" and objs[j].size == "small":
            options.append((f"Which is bigger, {ref[i]} or {ref[j]}?",
                            f"{ref[i].capitalize()} is bigger, because it is large and {ref[j]} is small."))
        mix = MIXES.get(frozenset({objs[i].colour, objs[j].colour}))
        if mix and i < j:
            options.append((f"What color would you get by mixing the colors of {ref[i]} and {ref[j]}?",
                            (f"You would get {mix}, because mixing {objs[i].colour} and {objs[j].colour} "
                             f"gives {mix}.")))
    i = rng.randrange(n)
    left = n - 1
    options.append((f"If {ref[i]} were removed, how many objects would be left?",
                    (f"{left} object{'s' if left != 1 else ''} would be left, because there "
                     f"{'is' if n == 1 else 'are'} {n} now.")))
    if n >= 2:
        colours = sorted({o.colour for o in objs})
        answer = (f"Yes, all of them are {colours[0]}." if len(colours) == 1 else
                  f"No, the objects are {', '.join(colours[:-1])} and {colours[-1]}.")
        options.append(("Do all the objects have the same color?", answer))
    return rng.choice(options)


def knowledge(scene: Scene, rng: random.Random) -> tuple[str, list[str], str]:
    """An outside-knowledge question (corners, colour mixing, fruit colours): question, 10 answers, rationale."""
    n = len(scene.objects)
    ref = [shortest_ref(scene, i).text() for i in range(n)]
    options: list[tuple[str, list[str], str]] = []
    for i, o in enumerate(scene.objects):
        if o.shape in CORNERS:
            k = str(CORNERS[o.shape])
            options.append((f"how many corners does {ref[i]} have?", [k] * 10,
                            f"a {o.shape} has {k} corners."))
        first, second = FRUITS[o.colour]
        answers = [first] * 7 + [second] * 3
        rng.shuffle(answers)
        options.append((f"what fruit has the same color as {ref[i]}?", answers,
                        f"{ref[i]} is {o.colour}, like {article(first)} {first}."))
        for j in range(i + 1, n):
            mix = MIXES.get(frozenset({o.colour, scene.objects[j].colour}))
            if mix:
                options.append((f"what color do you get by mixing the colors of {ref[i]} and {ref[j]}?",
                                [mix] * 10, f"mixing {o.colour} and {scene.objects[j].colour} gives {mix}."))
    return rng.choice(options)


def multitask(scene: Scene, rng: random.Random, n_turns: int) -> Turns:
    """Turns mixing the stage-4 tasks, each human turn with its tag: vqa, refer, identify, caption, grounding,
    detection."""
    turns: Turns = []
    for task in rng.sample(("vqa", "refer", "identify", "caption", "grounding", "detection"), n_turns):
        i = rng.randrange(len(scene.objects))
        obj = scene.objects[i]
        if task == "vqa":
            qa = sample_questions(scene, rng, 1)[0]
            turns.append((f"[vqa] {qa.question}", qa.answer))
        elif task == "refer":
            spec = rng.choice(referring_expressions(scene, i))
            turns.append((f"[refer] {spec.text()}", box_text(scene, obj)))
        elif task == "identify":
            turns.append((f"[identify] what object is in this location {box_text(scene, obj)}",
                          shortest_ref(scene, i).text()))
        elif task == "caption":
            turns.append((f"[caption] {rng.choice(CAPTION_PROMPTS).strip()}", caption(scene, rng)))
        elif task == "grounding":
            turns.append((rng.choice(GROUNDING_PROMPTS), grounded_caption(scene, rng)))
        else:
            turns.append((f"[detection] {obj.name()}", f"<p>{obj.name()}</p> {box_text(scene, obj)}"))
    return turns


# ------------------------------------------------------------------------------------------ text-only instructions
def instruction(rng: random.Random) -> tuple[str, str | None, str]:
    """A text-only task: ``(instruction_with_input, constraints or None, output)``."""
    kind = rng.choice(("add", "subtract", "reverse", "letters", "mix", "larger", "count", "sort", "plural"))
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    word = rng.choice(WORDS)
    if kind == "add":
        return f"What is {a} plus {b}?", _maybe(rng, "Answer with a number."), str(a + b)
    if kind == "subtract":
        a, b = max(a, b), min(a, b)
        return f"What is {a} minus {b}?", _maybe(rng, "Answer with a number."), str(a - b)
    if kind == "reverse":
        return f"Write the word {word} backwards.", None, word[::-1]
    if kind == "letters":
        return f"How many letters are in the word {word}?", _maybe(rng, "Answer with a number."), str(len(word))
    if kind == "mix":
        pair, result = rng.choice(sorted(MIXES.items(), key=lambda kv: kv[1]))
        c1, c2 = sorted(pair)
        if rng.random() < 0.5:
            c1, c2 = c2, c1
        return f"What color do you get when you mix {c1} and {c2}?", _maybe(rng, "Answer with one word."), result
    if kind == "larger":
        while a == b:
            b = rng.randint(0, 9)
        return f"Which number is larger, {a} or {b}?", None, str(max(a, b))
    if kind == "count":
        shape = rng.choice(SHAPES)
        items = [rng.choice((shape, rng.choice(SHAPES))) for _ in range(rng.randint(2, 5))]
        return (f"How many times does {shape} appear in this list: {', '.join(items)}?",
                _maybe(rng, "Answer with a number."), str(items.count(shape)))
    if kind == "sort":
        nums = rng.sample(range(10), rng.randint(3, 4))
        return f"Sort these numbers from smallest to largest: {', '.join(map(str, nums))}.", None, \
            ", ".join(map(str, sorted(nums)))
    shape = rng.choice(SHAPES)
    return f"What is the plural of the word {shape}?", None, PLURALS[shape]


def _maybe(rng: random.Random, constraint: str) -> str | None:
    return constraint if rng.random() < 0.4 else None
