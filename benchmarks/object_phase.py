"""What the stage-0 LM's object-token phase teaches, by variant: identify (box → object), colour, count, spatial.

The nano model's image tokens are trained to match *object tokens*: per object the sum of the embeddings of its size,
colour, shape and 3 × 3 place words (``tinygptv.nano.stage0.object_vectors``). Identify asks for the object at a
box given as ``{<x1><y1><x2><y2>}`` on the 0–100 grid, so reading it from those tokens needs the box's numbers
mapped to a place word. This script trains the recipe's stage-0 LM (text phase, then the object-token phase) with
``--variant identify``: 30 % of the object-phase questions replaced by identify questions, as stage 4 asks them, or
``--variant identify-numbers``: the same, with each object token also holding the embeddings of its box's four
number tokens (as they appear in ``{<35>…}``), so that identify becomes a lookup keyed by the question's own
tokens, or ``--variant base``: the recipe as it is. It then asks 240 held-out scenes (1–4 objects) identify and colour
questions in the stage-4 template over ideal object tokens, greedy, and scores identify with the evaluator's
``refers_to`` and colour by the right word in the answer.

``--variant count-key-last`` asks count questions with their key last for the first 40 % of the steps, as the
recipe does for colour and shape ("count the crosses", "count the objects that are red"). Count questions (120,
30 per object count) are scored by the first number in the answer.

``--variant spatial`` replaces 35 % of the object-phase questions by yes/no spatial relations (true and opposite
statements, as the VSR-style set asks them), ``spatial-side`` half of those by "is A to the left or right of B?" /
"above or below", ``spatial-where`` by "where is A" (its 3 × 3 place words) and the side questions. Every row is
also scored on 120 scenes of 2–4 objects (40 per object count; relation questions only where a relation holds),
one question of each of these three kinds per scene. ``spatial-curriculum`` asks "where is A" while the phase asks
key-last questions (its first 40 %), then "left or right" and yes/no statements (half each), so that a lookup with
its key last is learnt before questions about two objects. ``spatial-all`` draws from all three kinds (yes/no
statements, "left or right", "where is"), a third each. ``--steps N`` runs the object phase for ``N`` steps
instead of the recipe's (rows of other than 1000 steps are named e.g. ``spatial-where (2500 steps)``).

Usage: ``python benchmarks/object_phase.py --variant VARIANT [--steps N] [--run …]`` (one of the variants above,
or ``base``) (~12 min for the text LM, reused across variants, then ~15 min per variant on 2 cores).
Writes ``benchmarks/results/object-phase.{json,md}`` (one row per variant run so far).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tinygptv.infer.generate import GenerationConfig, generate_tokens
from tinygptv.model.phi import PhiLM
from tinygptv.model.sequence import Example, build_batch
from tinygptv.nano import recipe, stage0
from tinygptv.nano.evaluate import refers_to
from tinygptv.synth.text import box_text, place_questions, shortest_ref
from tinygptv.synth.world import sample_scene
from tinygptv.templates import get_template

RESULTS = Path(__file__).parent / "results"
ROW_STEPS = 1000  # object-phase steps of the rows named without a step count (``recipe.OBJECT_STEPS``)
IDENTIFY_SHARE = 0.3


def with_identify(questions):
    """Wrap ``recipe.object_questions`` so that :data:`IDENTIFY_SHARE` of the questions are identify questions."""
    def ask(scene, rng, k, key_last, grounding=(0, 0.0)):
        out = []
        for qa in questions(scene, rng, k, key_last, grounding):
            if rng.random() < IDENTIFY_SHARE:
                i = rng.randrange(len(scene.objects))
                qa = (f"[identify] what object is in this location {box_text(scene, scene.objects[i])}",
                      shortest_ref(scene, i).text())
            out.append(qa)
        return out
    return ask


SPATIAL_SHARE = 0.35


def side_question(scene, rng: random.Random):
    """``("is the circle to the left or right of the red square?", "left")`` for a random true relation, or None."""
    pool = place_questions(scene)["side"]
    if not pool:
        return None
    qa = rng.choice(pool)
    return qa.question, qa.answer


def where_question(scene, rng: random.Random):
    """``("where is the red circle", "top left")``: an object's place on the 3 × 3 grid, key word last."""
    qa = rng.choice(place_questions(scene)["where"])
    return qa.question, qa.answer


def spatial_question(scene, rng: random.Random):
    """A yes/no spatial question as the object phase asks them (true and opposite statements equally), or None."""
    from tinygptv.synth.text import questions

    pool = questions(scene, rng)["spatial"]
    if not pool:
        return None
    qa = rng.choice(pool)
    return qa.question, qa.answer


def _spatial_share(questions, pick):
    """Wrap ``recipe.object_questions`` so that :data:`SPATIAL_SHARE` of the questions are replaced by one from the
    question maker ``pick(rng, key_last)`` returns (kept when it has none for the scene)."""
    def ask(scene, rng, k, key_last, grounding=(0, 0.0)):
        out = []
        for qa in questions(scene, rng, k, key_last, grounding):
            if rng.random() < SPATIAL_SHARE:
                qa = pick(rng, key_last)(scene, rng) or qa
            out.append(qa)
        return out
    return ask


def with_spatial(questions, kinds: tuple):
    """Spatial questions drawn evenly from ``kinds`` (question makers: yes/no statements, "left or right" /
    "above or below", "where is"), see :func:`_spatial_share`."""
    return _spatial_share(questions, lambda rng, key_last: rng.choice(kinds))


def with_spatial_curriculum(questions):
    """Spatial questions in two phases: while the object phase asks key-last questions (its first 40 %), "where is
    A" (a lookup with its key last, learnt in ``spatial-where``); after that "left or right" / "above or below" and
    yes/no statements about two objects, half each."""
    return _spatial_share(questions, lambda rng, key_last: (
        where_question if key_last else rng.choice((side_question, spatial_question))))


NUMBER = "#"  # an object word "#35": the box number token "35" as it appears inside ``{<35>…}`` (no leading space)


def object_words_with_box(words_fn):
    """Wrap ``recipe.object_words`` so that each object's words also hold its box's four numbers."""
    def words(scene):
        out = words_fn(scene)
        for i, o in enumerate(scene.objects):
            out[i] = out[i] + [NUMBER + n for n in re.findall(r"\d+", box_text(scene, o))]
        return out
    return words


def number_or_word(word: str) -> str:
    """What an object word is tokenized as: a :data:`NUMBER` word the bare number, others as words."""
    return word[1:] if word.startswith(NUMBER) else stage0.as_word(word)


def answer(lm: PhiLM, tok, cfg, scene, question: str, rng: random.Random, g: torch.Generator) -> str:
    """The stage-0 LM's greedy answer to ``question`` (stage-4 template) over the scene's ideal object tokens."""
    table = lm.embed_tokens.weight.detach()
    rms = table.float().pow(2).mean().sqrt()
    slots = stage0.object_slots(stage0.object_vectors(recipe.object_words(scene), table, tok),
                                recipe.ATTRIBUTE_SLOTS, rms, rng, g)
    return answer_over(lm, tok, slots[None], question)


@torch.no_grad()
def answer_over(lm: PhiLM, tok, image_tokens: torch.Tensor, question: str) -> str:
    """Greedy answer (12 tokens at most, cut at ``###`` / ``[``) to ``question`` in the stage-4 template, with
    ``image_tokens [1, Q, C]`` in the image's place."""
    b = build_batch([Example(get_template("stage4").user_turn(question, True), [])], [image_tokens], tok,
                    lm.embed_tokens, 0, 0)
    ids = [ev.token for ev in generate_tokens(lm, [(b.inputs_embeds[0], b.attention_mask[0])],
                                              GenerationConfig(max_new_tokens=12), 0) if ev.token is not None]
    return tok.decode(ids).split("###")[0].split("[")[0]


SPATIAL_KINDS = (("spatial", spatial_question), ("side", side_question), ("where", where_question))


def ask_spatial(scene, rng: random.Random, ask, hits: dict[str, list[bool]]) -> None:
    """One ``[vqa]`` question of each of :data:`SPATIAL_KINDS` about ``scene`` (those it has), answered by
    ``ask(question)``; right when the answer's first words are the expected ones. Appends to ``hits["<kind><n>"]``
    (``n`` objects)."""
    for kind, make in SPATIAL_KINDS:
        qa = make(scene, rng)
        if qa is not None:
            got = re.findall(r"[a-z]+", ask(f"[vqa] {qa[0]}").lower())
            hits.setdefault(f"{kind}{len(scene.objects)}", []).append(got[:len(qa[1].split())] == qa[1].split())


def score(lm: PhiLM, tok, cfg, n: int = 240, seed: int = 1234) -> dict[str, float]:
    """Identify / colour / count accuracy (%) by object count, over ideal object tokens, stage-4 template, greedy:
    ``n`` identify and colour questions, then ``n // 2`` count questions (drawn from the training pool: all
    objects, a shape, a colour; present or not) from their own random stream, so that adding them left the first
    two columns of earlier rows as they were."""
    from tinygptv.synth.text import questions

    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    hits: dict[str, list[bool]] = {}
    for i in range(n):
        objects = 1 + i % 4
        scene = sample_scene(rng, f"identify-{i}", image_size=128, n_objects=objects)
        j = rng.randrange(objects)
        kind = ("identify", "colour")[(i // 4) % 2]
        if kind == "identify":
            q = f"[identify] what object is in this location {box_text(scene, scene.objects[j])}"
        else:
            q = f"[vqa] what color is the {shortest_ref(scene, j).text().removeprefix('the ')}?"
        text = answer(lm, tok, cfg, scene, q, rng, g)
        ok = (refers_to(text, scene.objects) is scene.objects[j] if kind == "identify"
              else scene.objects[j].colour in text)
        hits.setdefault(f"{kind}{objects}", []).append(ok)
    rng, g = random.Random(seed + 1), torch.Generator().manual_seed(seed + 1)
    for i in range(n // 2):
        objects = 1 + i % 4
        scene = sample_scene(rng, f"count-{i}", image_size=128, n_objects=objects)
        qa = rng.choice(questions(scene, rng)["count"])
        got = re.findall(r"\d+", answer(lm, tok, cfg, scene, f"[vqa] {qa.question}", rng, g))
        hits.setdefault(f"count{objects}", []).append(got[:1] == [qa.answer])
    rng, g = random.Random(seed + 2), torch.Generator().manual_seed(seed + 2)
    for i in range(n // 2):
        objects = 2 + i % 3
        scene = sample_scene(rng, f"spatial-{i}", image_size=128, n_objects=objects)
        ask_spatial(scene, rng, lambda q: answer(lm, tok, cfg, scene, q, rng, g), hits)
    return {key: round(100 * sum(v) / len(v), 1) for key, v in sorted(hits.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", required=True, choices=("base", "identify", "identify-numbers", "count-key-last",
                                                         "spatial", "spatial-side", "spatial-where",
                                                         "spatial-curriculum", "spatial-all"))
    ap.add_argument("--steps", type=int, default=recipe.OBJECT_STEPS, help="object-phase steps (the recipe's)")
    ap.add_argument("--run", default="runs/identify-objects", help="working folder (world, tokenizer, LM states)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    from tinygptv.synth.generate import generate_world

    out = Path(args.run)
    out.mkdir(parents=True, exist_ok=True)
    world = out / "world"
    if not (world / "world.json").is_file():
        generate_world(world, seed=0, eval_size=20, force=True)
    lines = (world / "corpus.txt").read_text(encoding="utf-8").splitlines()
    tok = stage0.train_tokenizer(lines, 1024, out / "tokenizer")
    cfg = recipe.nano_config(tok.vocab_size)
    text_file = out / "lm.safetensors"
    if text_file.is_file():
        text_state = load_file(str(text_file))
    else:
        docs = recipe.scene_documents(0, recipe.LM_DOCUMENTS)
        text_state = stage0.pretrain_lm(cfg, tok, lines + docs, steps=recipe.LM_STEPS, seed=0)
        save_file(text_state, str(text_file))
    objects = recipe.scene_objects(0)
    if args.variant.startswith("identify"):
        recipe.object_questions = with_identify(recipe.object_questions)  # scene_objects looks it up per call
    if args.variant == "count-key-last":  # count questions asked with their key last early on, as colour / shape
        recipe.KEY_LAST = ("colour", "shape", "count")
    if args.variant == "spatial-curriculum":
        recipe.object_questions = with_spatial_curriculum(recipe.object_questions)
    elif args.variant.startswith("spatial"):  # a share of spatial questions of the variant's kinds
        kinds = {"spatial": (spatial_question,), "spatial-side": (spatial_question, side_question),
                 "spatial-where": (where_question, side_question),
                 "spatial-all": (where_question, side_question, spatial_question)}[args.variant]
        recipe.object_questions = with_spatial(recipe.object_questions, kinds)
    if args.variant == "identify-numbers":  # object tokens also hold their box's numbers
        recipe.object_words = object_words_with_box(recipe.object_words)
        stage0.object_vectors = partial(stage0.object_vectors, text_of=number_or_word)
    steps = "" if args.steps == ROW_STEPS else str(args.steps)
    name = f"{args.variant} ({steps} steps)" if steps else args.variant
    state_file = out / f"lm-objects-{args.variant}{steps}.safetensors"
    if state_file.is_file():
        state = load_file(str(state_file))
    else:
        state = stage0.pretrain_lm_objects(cfg, tok, text_state, lines, objects, steps=args.steps,
                                           n_slots=recipe.ATTRIBUTE_SLOTS, seed=0)
        save_file(state, str(state_file))
    lm = PhiLM(replace(cfg.lm, qk_norm=False, post_attn_norm=False, resid_dropout=0.0))
    lm.load_state_dict(state)
    result = {"variant": name, **score(lm.eval(), tok, cfg)}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "object-phase.json"
    rows = [r for r in (json.loads(path.read_text()) if path.is_file() else []) if r["variant"] != name]
    rows.append(result)
    path.write_text(json.dumps(rows, indent=2))
    lines_md = ["# Questions over ideal object tokens after the stage-0 LM's object phase", "",
                "Produced by `python benchmarks/object_phase.py --variant …` (see its docstring). Accuracy % by "
                "object count, 30 questions per cell; a guess among the objects present scores 100 / 50 / 33 / 25 % "
                "for identify and colour. Rows without count were measured before the script asked count questions, "
                "rows without the spatial columns before it asked spatial ones (up to 40 questions per cell, 2 / 3 / 4 "
                "objects).",
                "", "| variant | identify 1 / 2 / 3 / 4 | colour 1 / 2 / 3 / 4 | count 1 / 2 / 3 / 4 "
                "| spatial yes/no 2 / 3 / 4 | left-or-right, above-or-below 2 / 3 / 4 | where 2 / 3 / 4 |",
                "|---|---|---|---|---|---|---|"]

    def cells(r: dict, kind: str, counts: range = range(1, 5)) -> str:
        return " / ".join(f"{r[f'{kind}{k}']:.0f}" if f"{kind}{k}" in r else "–" for k in counts)

    for r in rows:
        lines_md.append(f"| {r['variant']} | {cells(r, 'identify')} | {cells(r, 'colour')} | {cells(r, 'count')} | "
                        f"{cells(r, 'spatial', range(2, 5))} | {cells(r, 'side', range(2, 5))} | "
                        f"{cells(r, 'where', range(2, 5))} |")
    (RESULTS / "object-phase.md").write_text("\n".join(lines_md) + "\n")
    print("\n".join(lines_md))


if __name__ == "__main__":
    main()
