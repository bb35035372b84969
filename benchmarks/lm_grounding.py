"""Can the nano language model learn grounding (``[refer]`` boxes, ``[identify]``) from ideal object tokens?

The nano model before the grounding recipe drew referring boxes near a guess (Acc@0.5 about 2 %, centres some 25 units
of the 0–100 grid off) and named the object in a box at a guess among the objects present (``identify`` 33–40 %).
Its stage-0 LM read *object tokens* (``tinygptv.nano.stage0.object_vectors``: one vector per object, the sum of
the embeddings of its size, colour, shape and 3 × 3-grid place words) and never saw a box during stage 0. This
script asks whether it can learn them when object tokens do carry the box, before any vision tower is involved:
it continues a recipe run's stage-0 LM (``lm-objects.safetensors``) as ``pretrain_lm_objects`` does (ideal object
tokens in random slots, the questions half in the chat templates, text windows beside them), with grounding
questions added, and scores them on fresh scenes.

Configurations:

- ``box-code``: each object token also carries its box: the sine / cosine of its four corners' coordinates (0–1) at
  frequencies 0.5–8 cycles, through a fixed random orthonormal map into the embedding space, weighted 0.7 against
  the word vector, then rescaled to the RMS of a token embedding. 16 slots.
- ``box-slots``: object tokens (:func:`object_tokens`): four more slots per object, one per corner
  coordinate (x1, y1, x2, y2): 0.7 × the object's word vector + the embedding of "left" / "top" / "right" /
  "bottom" + a sinusoidal code of the coordinate (:class:`CornerCode`: 0.5–16 cycles through a fixed orthonormal
  map), each rescaled to the RMS of a token embedding; 32 slots (the paper's query count). The single-token numbers
  get the same code added to their input and output embeddings, so emitting a coordinate is a copy and a linear
  read-out.
- ``box-slots-coarse``: the same with the corner code at 0.25–1 cycles only (:data:`COARSE_FREQUENCIES`): nearly
  a linear function of the coordinate, which a vision tower whose queries already carry the box linearly (see
  ``nano-history.md``, "Position in the image tokens") could regress onto.
- ``box-slots-light``: ``box-slots-coarse`` with 0.3 instead of 0.7 × the object's vector in its corner slots
  (:data:`CORNER_TIE`): fewer copies of the attributes beside the object's own token.
- ``plain``: the recipe's object tokens (one per object and the word, no box) in 16 slots, for the colour / shape
  scores of a bundle-like run's object-phase LM (its grounding scores are at chance by construction);
  ``plain-32``: the same in 32 slots.
- ``coded-coarse``: the ``box-slots-coarse`` tokens read by an object-phase LM whose number tokens already carry
  that code: the recipe of commit 1eb6592 (since reverted) trained its object phase on them; ``--steps 0`` scores
  such a run's ``lm-objects.safetensors`` as it is.
- ``coded-light``: the same for the ``box-slots-light`` tokens, which the recipe's grounding phase trains on
  (``--lm lm-grounding.safetensors --steps 0`` scores a run's grounding-phase LM as it is).

``--grounding`` of the scenes get two grounding questions (:func:`grounding_questions`: ``[refer] give me the
location of <a unique attribute or place expression>`` → ``{<x1><y1><x2><y2>}``, or ``[identify] what object is
in this location {box}`` → its shortest attribute expression) and one other; the rest three others. Scoring is
teacher-forced (each answer token predicted after the true ones before it), with the shortest attribute expression:
refer Acc@0.5 (IoU of the predicted box with the true one), the share of the four numbers within 3 of the truth,
and identify (the whole expression right), over all scenes and over scenes of one object; and colour / shape
questions about scenes of two or more objects (the whole answer right).

Usage: ``python benchmarks/lm_grounding.py --run runs/nano [--lm lm-objects.safetensors] [--steps 600]
[--scenes 200] [--configs box-code,box-slots]`` after ``tinygptv train --recipe nano --output runs/nano``; writes
``benchmarks/results/<stem>.{md,json}``. ``--lm`` picks the run's stage-0 LM file, ``--scenes`` the number of fresh
scenes per score (200: some 70–90 colour and shape questions each, whose scores vary by several points between
draws; 600 gives about 250).
"""

from __future__ import annotations

import json
import math
import platform
import random
import re
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_binding import experiment_parser
from safetensors.torch import load_file

from tinygptv.model.phi import PhiLM
from tinygptv.model.sequence import build_batch, causal_lm_loss
from tinygptv.nano import stage0
from tinygptv.nano.evaluate import refers_to
from tinygptv.nano.recipe import (IDENTIFY_ANSWERS, grounding_questions, identify_answer, nano_config, object_boxes,
                                  object_words)
from tinygptv.nano.stage0 import CornerCode, object_tokens
from tinygptv.synth.text import box_text
from tinygptv.synth.world import Scene, referring_expressions, sample_scene
from tinygptv.tokenizer import Tokenizer

RESULTS = Path(__file__).parent / "results"
CORNER_FREQUENCIES = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)  # cycles over the image's width / height (``box-slots``)
COARSE_FREQUENCIES = stage0.CORNER_FREQUENCIES  # 0.25-1 cycles, the recipe's
SLOT_FREQUENCIES = {"box-slots": CORNER_FREQUENCIES, "box-slots-coarse": COARSE_FREQUENCIES,
                    "box-slots-light": COARSE_FREQUENCIES}  # per slot config
# weight of the object's vector in its corner slots (default 0.7)
CORNER_TIE = {"box-slots-light": 0.3, "coded-light": 0.3}


CODED = ("coded-coarse", "coded-light")  # tokens of a run whose object-phase LM already carries the corner code
PLAIN = {"plain": 16, "plain-32": 32}  # the recipe's object tokens without boxes, in this many slots
CONFIGS = ("box-code", *SLOT_FREQUENCIES, *CODED, *PLAIN)


class Coder:
    """The object tokens of one configuration for the LM ``lm``."""

    def __init__(self, config: str, lm: PhiLM, tok: Tokenizer, seed: int = 1234):
        self.config, self.lm, self.tok = config, lm, tok
        hidden = lm.embed_tokens.weight.shape[1]
        self.corner = CornerCode(hidden, seed, COARSE_FREQUENCIES if config in CODED
                                 else SLOT_FREQUENCIES.get(config, CORNER_FREQUENCIES))
        if config in PLAIN or config in CODED:  # no box code / the run's object phase coded the numbers already
            self.slots = PLAIN.get(config, 32)
            return
        if config == "box-code":  # the four coordinates' sines / cosines at 0.5-8 cycles side by side, one map
            g = torch.Generator().manual_seed(seed)
            self.freqs = torch.tensor([0.5, 1, 2, 4, 8])
            self.map = torch.linalg.qr(torch.randn(hidden, 8 * len(self.freqs), generator=g))[0]
            self.slots = 16
        else:
            self.corner.code_numbers_(lm, tok)
            self.slots = 32

    def box_code(self, corners: list[float]) -> torch.Tensor:
        angle = 2 * math.pi * torch.tensor(corners)[:, None] * self.freqs[None]
        v = self.map @ torch.cat([angle.sin(), angle.cos()], -1).reshape(-1)
        return v / v.pow(2).mean().sqrt()

    def tokens(self, scene: Scene, rng: random.Random, g: torch.Generator) -> torch.Tensor:
        """``[slots, C]`` object tokens of ``scene`` in random slots, the rest low noise."""
        table = self.lm.embed_tokens.weight.detach()
        rms = table.float().pow(2).mean().sqrt()
        boxes = object_boxes(scene)
        if self.config not in PLAIN and self.config != "box-code":
            vectors = object_tokens(object_words(scene), boxes, table, self.tok, self.corner,
                                    CORNER_TIE.get(self.config, 0.7))
        else:
            vectors = stage0.object_vectors(object_words(scene), table, self.tok)
            if self.config == "box-code":
                for i, box in enumerate(boxes):
                    v = vectors[i] / rms + 0.7 * self.box_code(list(box))
                    vectors[i] = v * rms / v.pow(2).mean().sqrt()
        return stage0.object_slots(vectors, self.slots, rms, rng, g)


def other_questions(scene: Scene, rng: random.Random, k: int) -> list[tuple[str, str]]:
    """``k`` questions of the object phase's other kinds, weighted as the recipe weights them."""
    from tinygptv.nano.recipe import OBJECT_QUESTIONS
    from tinygptv.synth.text import questions

    pool = questions(scene, rng)
    kinds = [c for c in OBJECT_QUESTIONS if pool.get(c)]
    picked = rng.choices(kinds, [OBJECT_QUESTIONS[c] for c in kinds], k=k)
    return [(qa.question, qa.answer) for qa in (rng.choice(pool[c]) for c in picked)]


def iou(a: list[int], b: list[int]) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix * iy
    return ix * iy / union if union > 0 else 0.0


def teacher_forced(coder: Coder, example, slots: torch.Tensor) -> tuple[list[int], list[int]]:
    """The LM's predicted and the true answer tokens (each predicted after the true ones before it) of one question
    ``example`` (``stage0.qa_example``) about the object tokens ``slots [1, S, C]``."""
    lm = coder.lm
    b = build_batch([example], [slots], coder.tok, lm.embed_tokens, 0, 0)
    pred = lm(inputs_embeds=b.inputs_embeds, attention_mask=b.attention_mask)[0, :-1].argmax(-1)
    target = b.labels[0, 1:]
    supervised = target != -100
    return pred[supervised].tolist(), target[supervised].tolist()


TURN_END = re.compile(r"###|</s>|\n")  # where a greedy answer ends (the templates' end symbols)


def greedy(coder: Coder, example, slots: torch.Tensor, max_new: int = 8) -> str:
    """The LM's greedy answer (text, up to the end of the turn) to the question of ``example``, whose answer is
    ignored but for where it starts."""
    lm = coder.lm
    b = build_batch([example], [slots], coder.tok, lm.embed_tokens, 0, 0)
    start = int((b.labels[0] != -100).nonzero()[0])  # the first answer token
    x, ids = b.inputs_embeds[:, :start], []
    for _ in range(max_new):
        ids.append(int(lm(inputs_embeds=x)[0, -1].argmax()))
        if TURN_END.search(coder.tok.decode(ids)):
            break
        x = torch.cat([x, lm.embed_tokens(torch.tensor([ids[-1:]]))], 1)
    return TURN_END.split(coder.tok.decode(ids))[0]


def attribute_hits(coder: Coder, n: int, seed: int) -> dict[str, list[float]]:
    """Teacher-forced colour and shape questions (the whole answer right) about scenes of two or more objects, with
    a random generator of their own so that the grounding scores stay as they were."""
    from tinygptv.synth.text import questions

    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    hits: dict[str, list[float]] = {"colour": [], "shape": []}
    for k in range(n):
        scene = sample_scene(rng, f"attribute-eval-{k}", image_size=128)
        pool = questions(scene, rng)
        kind = rng.choice(list(hits))
        if len(scene.objects) < 2 or not pool.get(kind):
            continue
        qa = rng.choice(pool[kind])
        example = stage0.qa_example([(qa.question, qa.answer)], rng, chat=1.0)
        got, want = teacher_forced(coder, example, coder.tokens(scene, rng, g)[None])
        n_answer = len(coder.tok.encode(qa.answer))
        hits[kind].append(float(got[:n_answer] == want[:n_answer]))
    return hits


@torch.no_grad()
def score(coder: Coder, n: int = 200, seed: int = 99, identify: str = "shortest") -> dict[str, float]:
    """Teacher-forced scores (the ``identify`` score against answers in the form ``identify``, the one trained),
    and ``identify_greedy`` (``_2`` / ``_3`` / ``_4``: scenes of that many objects): the greedy answer picks out
    exactly the boxed object, as the nano evaluation scores it, whatever its form."""
    lm, tok = coder.lm, coder.tok
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    lm.eval()
    hits: dict[str, list[float]] = {k: [] for k in ("refer_acc50", "refer_numbers", "identify", "refer_acc50_one",
                                                    "identify_one", "identify_greedy", "identify_greedy_2",
                                                    "identify_greedy_3", "identify_greedy_4")}
    for k in range(n):
        scene = sample_scene(rng, f"grounding-eval-{k}", image_size=128)
        i = rng.randrange(len(scene.objects))
        specs = referring_expressions(scene, i, ("attribute",))
        if not specs:
            continue
        slots = coder.tokens(scene, rng, g)[None]
        box = box_text(scene, scene.objects[i])
        for kind, question, answer in (("refer", f"[refer] give me the location of {specs[0].text()}", box),
                                       ("identify", f"[identify] what object is in this location {box}",
                                        identify_answer(scene, i, identify))):
            example = stage0.qa_example([(question, answer)], rng, chat=1.0)
            got, want = teacher_forced(coder, example, slots)
            if kind == "identify":
                named = refers_to(greedy(coder, example, slots), scene.objects)
                hits["identify_greedy"].append(float(named is scene.objects[i]))
                if len(scene.objects) > 1:
                    hits[f"identify_greedy_{min(len(scene.objects), 4)}"].append(hits["identify_greedy"][-1])
                n_answer = len(tok.encode(answer))
                right = float(got[:n_answer] == want[:n_answer])
            else:
                p = [int(v) for v in re.findall(r"\d+", tok.decode(got))[:4]]
                t = [int(v) for v in re.findall(r"\d+", tok.decode(want))[:4]]
                right = float(len(p) == 4 and iou(p, t) >= 0.5)
                hits["refer_numbers"].append(sum(abs(a - c) <= 3 for a, c in zip(p, t)) / 4)
            key = "refer_acc50" if kind == "refer" else "identify"
            hits[key].append(right)
            if len(scene.objects) == 1:
                hits[key + "_one"].append(right)
    hits.update(attribute_hits(coder, n, seed + 1))
    lm.train()
    return {k: round(100 * sum(v) / max(1, len(v)), 1) for k, v in hits.items()}


def train_and_score(config: str, run: Path, steps: int, every: int, lr: float, grounding: float,
                    seed: int = 0, lm_file: str = "lm-objects.safetensors", n: int = 200,
                    identify: str = "shortest") -> list[dict]:
    tok = Tokenizer.from_folder(run / "stage0" / "tokenizer")
    cfg = nano_config(tok.vocab_size)
    lm = PhiLM(replace(cfg.lm, qk_norm=False, post_attn_norm=False, resid_dropout=0.0))
    lm.load_state_dict(load_file(str(run / "stage0" / lm_file)))
    coder = Coder(config, lm, tok)
    rows = [{"step": 0, **score(coder, n, identify=identify)}]
    print(config, rows[-1], flush=True)
    if not steps:
        return rows
    lines = (run / "world" / "corpus.txt").read_text(encoding="utf-8").splitlines()
    data, starts = stage0.line_windows(tok, lines, 128)
    opt = stage0._Steps(lm.parameters(), steps, lr, 0.01, config)
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    autocast = stage0._autocast("auto")
    t0 = time.perf_counter()
    lm.train()
    for step in opt:
        examples, prefixes = [], []
        for _ in range(24):
            scene = sample_scene(rng, f"grounding-{seed}-{step}-{len(examples)}", image_size=128)
            qas = other_questions(scene, rng, 3)
            extra = grounding_questions(scene, rng, identify)
            if extra and rng.random() < grounding:
                qas = rng.sample(extra, min(2, len(extra))) + qas[:1]
            examples.append(stage0.qa_example(qas, rng, 0.5))
            prefixes.append(coder.tokens(scene, rng, g)[None])
        b = build_batch(examples, prefixes, tok, lm.embed_tokens, 0, 0, max_txt_len=96)
        x = stage0.sample_windows(data, starts, 8, 128, g)
        with autocast:
            objects = causal_lm_loss(lm(inputs_embeds=b.inputs_embeds, attention_mask=b.attention_mask), b.labels)
            logits = lm(x[:, :-1])
        text = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))
        opt.update(objects + text, step, objects=objects, text=text)
        if (step + 1) % every == 0 or step + 1 == steps:
            rows.append({"step": step + 1, "seconds": round(time.perf_counter() - t0),
                         **score(coder, n, identify=identify)})
            print(config, rows[-1], flush=True)
    return rows


def main() -> None:
    ap = experiment_parser(__doc__, 600, CONFIGS, "lm-grounding")
    ap.add_argument("--grounding", type=float, default=0.5, help="share of scenes with two grounding questions")
    ap.add_argument("--lm", default="lm-objects.safetensors", help="the run's stage-0 LM file to start from")
    ap.add_argument("--scenes", type=int, default=200, help="fresh scenes per score (grounding, attributes)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the training scenes and slots (scoring: fixed)")
    ap.add_argument("--identify", choices=IDENTIFY_ANSWERS, default="shortest",
                    help="what the [identify] questions answer while training (and teacher-forced scoring)")
    args = ap.parse_args()
    torch.manual_seed(0)
    results = {c: train_and_score(c, Path(args.run), args.steps, args.every, args.lr, args.grounding, lm_file=args.lm,
                                  seed=args.seed, n=args.scenes, identify=args.identify)
               for c in args.configs.split(",")}
    meta = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "run": args.run, "steps": args.steps, "lr": args.lr,
            "grounding": args.grounding, "lm": args.lm, "scenes": args.scenes, "identify": args.identify,
            "seed": args.seed}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    cols = ("refer_acc50", "refer_numbers", "identify", "refer_acc50_one", "identify_one", "identify_greedy",
            "identify_greedy_2", "identify_greedy_3", "identify_greedy_4", "colour", "shape")
    lines = ["# Grounding from ideal object tokens (stage-0 LM)", "",
             f"Produced by `python benchmarks/lm_grounding.py --run {args.run} --lm {args.lm} --steps {args.steps} "
             f"--every {args.every} --lr {args.lr} "
             f"--grounding {args.grounding} --scenes {args.scenes} --configs {args.configs} --identify {args.identify} "
             f"--seed {args.seed} --stem {args.stem}` "
             f"({meta['threads']} threads, torch {meta['torch']}). Teacher-forced scores on {args.scenes} fresh scenes "
             "(colour / shape: those of two or more objects); `_one`: scenes of one object; `identify` against the "
             f"trained answer form ({args.identify}); `identify_greedy`: the greedy answer picks out exactly the boxed "
             "object, as the nano evaluation scores it (`_2` / `_3` / `_4`: scenes of that many objects).", "",
             "| config | step | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for config, rows in results.items():
        lines += [f"| {config} | {r['step']} | " + " | ".join(f"{r[c]:.1f}" for c in cols) + " |" for r in rows]
    (RESULTS / f"{args.stem}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
