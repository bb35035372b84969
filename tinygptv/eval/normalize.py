"""VQA answer normalisation, re-implemented from the documented behaviour of the official VQA evaluation code.

Reference: ``shared/reference/evaluation.md`` §2. The pipeline (:func:`normalize_answer`) is, in order:

1. *(EvalAI flavour only, ``evalai=True``)* lowercase, delete ``,`` and ``?``, write ``'s`` as `` 's``, strip.
2. ``\\n`` and ``\\t`` become spaces; strip.
3. :func:`process_punctuation`: each of the 21 marks in :data:`PUNCTUATION` is *deleted* when it touches a space
   anywhere in the input or when the input contains a digit-comma-digit pattern, otherwise *replaced by a
   space*; then periods not followed by a digit are removed. Official quirk, kept: the period regex is applied
   with ``count=32`` (the official code passes ``re.UNICODE`` — whose value is 32 — as the ``count`` argument),
   so at most 32 periods are removed. The official period regex has a typo'd look-behind (``(?!<=\\d)``) that is
   in fact a look-ahead which can never fail at a period; ``\\.(?!\\d)`` is behaviourally identical.
4. :func:`process_digit_article`: lowercase, split on whitespace, map number words ``none``/``zero``…``ten`` to
   digits (quirk kept: ``none`` → ``0``), drop the articles ``a``/``an``/``the``, restore apostrophes of
   contractions (``dont`` → ``don't``), re-join with single spaces.

Decisions (the reference leaves them open):

- The official ``vqaEval`` normalises only when the 10 human answers are not all identical; we always
  normalise both sides (EvalAI / lmms-eval / VLMEvalKit behaviour), as evaluation.md §2.5 recommends.
- The contraction table is *generated* (:func:`_build_contractions`): every spelling of a listed contraction
  with one or more apostrophes missing maps to the full form. This covers the official table's entries that
  can match (its capitalised keys such as ``Im`` never match after lowercasing and are left out, as are
  contractions whose apostrophe-less spelling is a common word: ``shed``, ``well``, ``were``, ``ill``, ``its``,
  ``hell``, ``shell``, ``wed``, ``id``). For double contractions it is a superset (``couldntve`` is mapped too).
  The one documented odd official entry is kept on purpose: ``somebody'd`` → ``somebodyd``.
"""

from __future__ import annotations

import re
from itertools import combinations

PUNCTUATION: tuple[str, ...] = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                                "@", "`", ",", "?", "!")
NUMBER_WORDS: dict[str, str] = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})
MAX_PERIODS_REMOVED = 32  # official quirk: re.UNICODE (== 32) passed as ``count``

_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")

_CONTRACTED_FORMS = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't "
    "he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll let's ma'am mightn't mightn't've might've "
    "mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've she's should've shouldn't "
    "shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's "
    "something'd something'd've something'll that's there'd there'd've there're there's they'd they'd've "
    "they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's where'd "
    "where's where've who'd who'd've who'll who're who's who've why'll why're why's won't would've wouldn't "
    "wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've"
).split()
_CONTRACTION_QUIRKS = {"somebody'd": "somebodyd"}


def _build_contractions() -> dict[str, str]:
    """Every spelling of each contraction with a non-empty subset of its apostrophes removed → full form."""
    table: dict[str, str] = {}
    for full in _CONTRACTED_FORMS:
        positions = [i for i, ch in enumerate(full) if ch == "'"]
        for k in range(1, len(positions) + 1):
            for drop in combinations(positions, k):
                table["".join(ch for i, ch in enumerate(full) if i not in drop)] = full
    table.update(_CONTRACTION_QUIRKS)
    return table


CONTRACTIONS: dict[str, str] = _build_contractions()


def process_punctuation(text: str) -> str:
    """Step 3: delete or space out the 21 punctuation marks, then drop periods not followed by a digit."""
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        if delete_all or (mark + " ") in text or (" " + mark) in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=MAX_PERIODS_REMOVED)


def process_digit_article(text: str) -> str:
    """Step 4: lowercase, number words → digits, drop articles, restore contractions, single spaces."""
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def evalai_tokenize(text: str) -> str:
    """Step 1 of the EvalAI answer processor: lowercase, delete ``,``/``?``, ``'s`` → `` 's``, strip."""
    return text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()


def normalize_answer(text: str, evalai: bool = False) -> str:
    """The full VQA normalisation (official pipeline; ``evalai=True`` adds the EvalAI tokenisation step)."""
    if evalai:
        text = evalai_tokenize(text)
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def vqa_accuracy(prediction: str, human_answers: list[str], evalai: bool = False) -> float:
    """Official VQA / VizWiz accuracy: mean over the 10 leave-one-out subsets of ``min(1, #matches / 3)``.

    Both the prediction and the human answers are normalised (always, see the module docstring). With ``n``
    answers each subset drops one human and counts matches among the other ``n - 1``.
    """
    if not human_answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    pred = normalize_answer(prediction, evalai)
    gts = [normalize_answer(a, evalai) for a in human_answers]
    if len(gts) == 1:
        return float(gts[0] == pred)
    scores = []
    for i in range(len(gts)):
        matches = sum(1 for j, gt in enumerate(gts) if j != i and gt == pred)
        scores.append(min(1.0, matches / 3.0))
    return sum(scores) / len(scores)


__all__ = ["PUNCTUATION", "NUMBER_WORDS", "ARTICLES", "CONTRACTIONS", "process_punctuation", "process_digit_article",
           "evalai_tokenize", "normalize_answer", "vqa_accuracy"]
