"""Can the nano language model learn to bind attributes in its context? (text only, no images)

The nano model's colour / shape answers about scenes of several objects sit near a guess among the attributes
present (``benchmarks/results/nano.md``, measurement 9 in ``nano_diagnostics.py``). This script asks whether the
same happens without any image: the LM reads a scene description (detailed, or a short caption) and then answers
"what color is the cross?" / "what shape is the red object?" about it, the questions the world's generator asks
that the description alone answers (references by size or place are left out: a caption may omit sizes and never
says where things are). Each answer is ranked by likelihood among all colours / shapes and scored by the number of
objects in the scene; a guess among the attributes present scores 100 / 50 / 33 / 25 % for 1–4 objects.

Every configuration trains ``--steps`` steps on such binding documents (batch 32, 128-token windows starting at a
document's start, AdamW with a 30-step warm-up, gradients clipped at 1.0) and is scored every ``--every`` steps:

- ``continue``: the run's stage-0 LM, loss on every token;
- ``continue-answers``: the same, loss on the answer tokens only (the descriptions are unpredictable text that
  could swamp the gradient of the few answer tokens);
- ``gpt2``: ``transformers``' GPT-2 of the same width and depth, trained from scratch (does our Phi decoder learn
  differently from a standard implementation?);
- ``slots``: the run's stage-0 LM reading no description but one input vector per object, as an ideal vision
  tower would hand it over: the sum of the token embeddings of the object's size, colour, shape and place words
  (the rendered word: its embedding plus that of "word"), scaled to the RMS of a token embedding, each in 1–2 of
  16 slots at random, the other slots Gaussian noise at half that RMS (the Q-Former's 16 queries). Trained on the
  same questions after such vectors (loss on the text): is reading attributes *out of* object tokens, with no
  binding left to do in the input, learnt faster than binding in text?
- ``slots-curriculum``: ``slots``, but for the first third of the steps every question ends with the word it is
  keyed by ("what color is the cross", "what shape is the object that is red"), so the lookup can happen at the
  last token; then the questions as asked. (Answering "what color is the cross?" takes two hops: bring "cross" to
  the position after "?", then look it up; neither hop helps the loss until the other exists.)

Usage: ``python benchmarks/lm_binding.py [--run runs/nano] [--steps 400] [--configs continue,gpt2]`` after
``tinygptv train --recipe nano --output runs/nano``; writes ``benchmarks/results/<stem>.{md,json}`` (``--stem``, default ``lm-binding``).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import re
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from nano_diagnostics import answer_from_context
from safetensors.torch import load_file

from tinygptv.model.phi import PhiLM
from tinygptv.model.sequence import IGNORE_INDEX
from tinygptv.nano import stage0
from tinygptv.nano.recipe import nano_config, object_words
from tinygptv.synth.text import QA, caption, detail, keyed_last, questions
from tinygptv.synth.world import COLOURS, SHAPES, Scene, sample_scene
from tinygptv.tokenizer import Tokenizer

RESULTS = Path(__file__).parent / "results"
CONFIGS = ("continue", "continue-answers", "gpt2", "slots", "slots-curriculum")
SLOTS = 16
_NOT_FROM_TEXT = re.compile(r"\b(on the|at the|in the|small|large)\b")  # place / size: a description may not say


def binding_questions(scene: Scene, rng: random.Random, kind: str) -> list[QA]:
    """The scene's ``kind`` ("colour" / "shape") questions that name only a colour or a shape."""
    return [qa for qa in questions(scene, rng)[kind] if not _NOT_FROM_TEXT.search(qa.question)]


def description(scene: Scene, rng: random.Random, detailed: bool) -> str:
    return detail(scene) if detailed else caption(scene, rng)


def binding_documents(n: int, seed: int, k: int = 4) -> list[str]:
    """``n`` documents: a description of a fresh scene, then up to ``k`` binding questions with their answers."""
    rng = random.Random(f"binding-{seed}")
    docs = []
    for i in range(n):
        scene = sample_scene(rng, f"binding-{seed}-{i}")
        pool = binding_questions(scene, rng, "colour") + binding_questions(scene, rng, "shape")
        head = description(scene, rng, rng.random() < 0.5)
        docs.append("\n".join([head] + [f"{qa.question} {qa.answer}" for qa in rng.sample(pool, min(k, len(pool)))]))
    return docs


def object_tokens(scene: Scene, embed: torch.nn.Embedding, tok: Tokenizer, rng: random.Random,
                  g: torch.Generator) -> torch.Tensor:
    """``[SLOTS, C]`` input vectors of the ``slots`` configuration (module docstring)."""
    table = embed.weight.detach()
    rms = table.float().pow(2).mean().sqrt()
    vectors = stage0.object_vectors(object_words(scene), table, tok)
    noise = torch.randn(SLOTS, table.shape[1], generator=g) * rms
    out = noise * 0.5
    free = rng.sample(range(SLOTS), SLOTS)
    for v in vectors:
        for _ in range(rng.choice((1, 1, 2))):
            i = free.pop()
            out[i] = v + 0.1 * noise[i]
    return out


@torch.no_grad()
def binding_accuracy(lm, tok: Tokenizer, n: int = 320, seed: int = 99, slots: bool = False) -> dict[str, float]:
    """Accuracy (%) answering from the context (a description, or with ``slots`` the object tokens), by question
    kind and object count (keys ``colour2`` …)."""
    was_training = lm.training
    lm.eval()
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    hits: dict[str, list[bool]] = {}
    for i in range(n):
        objects, kind = 1 + i % 4, ("colour", "shape")[(i // 4) % 2]
        scene = sample_scene(rng, f"context-{i}", n_objects=objects)
        pool = binding_questions(scene, rng, kind)
        if not pool:
            continue
        qa = rng.choice(pool)
        cands = list(COLOURS) if kind == "colour" else list(SHAPES)
        if slots:
            best = answer_from_context(lm, tok, qa.question, cands, object_tokens(scene, lm.embed_tokens, tok, rng, g))
        else:
            best = answer_from_context(lm, tok, description(scene, rng, i % 8 < 4) + "\n" + qa.question, cands)
        hits.setdefault(f"{kind}{objects}", []).append(best == qa.answer)
    lm.train(was_training)
    return {key: 100 * sum(v) / len(v) for key, v in sorted(hits.items())}


class _GPT2(torch.nn.Module):
    """transformers' GPT-2 with the nano LM's width, depth and heads, returning logits like ``PhiLM``."""

    def __init__(self, vocab: int, hidden: int, layers: int, heads: int, positions: int):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        self.model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=hidden,
                                                n_layer=layers, n_head=heads, resid_pdrop=0.0, embd_pdrop=0.0,
                                                attn_pdrop=0.0, bos_token_id=0, eos_token_id=0))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids).logits


def make_lm(config: str, run: Path, vocab_size: int):
    cfg = replace(nano_config(vocab_size).lm, qk_norm=False, post_attn_norm=False, resid_dropout=0.0)
    if config == "gpt2":
        torch.manual_seed(0)
        return _GPT2(cfg.vocab_size, cfg.hidden, cfg.layers, cfg.heads, cfg.max_position_embeddings)
    lm = PhiLM(cfg)
    lm.load_state_dict(load_file(str(run / "stage0" / "lm.safetensors")))
    return lm


def train_and_score(config: str, run: Path, tok: Tokenizer, steps: int, every: int, lr: float,
                    docs: int) -> list[dict]:
    lm = make_lm(config, run, tok.vocab_size)
    slots = config.startswith("slots")
    rows = [{"config": config, "step": 0, "loss": None, **binding_accuracy(lm, tok, slots=slots)}]
    print(rows[-1], flush=True)
    if not slots:  # text configurations draw windows from a fixed pool of documents; slots draw fresh scenes
        data, starts = stage0.line_windows(tok, binding_documents(docs, 7), 128)
    scenes = random.Random("slots-7")
    question_end = tok.encode("?")[0]
    opt = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(1)
    lm.train()
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, step / 30)
        if slots:
            logits, target = slot_batch(lm, tok, scenes, g, key_last=config == "slots-curriculum" and step <= steps // 3)
        else:
            x = stage0.sample_windows(data, starts, 32, 128, g)
            target = x[:, 1:].clone()
            if config == "continue-answers":  # an answer is the token after "?"
                target[x[:, :-1] != question_end] = IGNORE_INDEX
            logits = lm(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % every == 0 or step == steps:
            rows.append({"config": config, "step": step, "loss": loss.item(), **binding_accuracy(lm, tok, slots=slots)})
            print(rows[-1], flush=True)
    return rows


def slot_batch(lm: PhiLM, tok: Tokenizer, rng: random.Random, g: torch.Generator, batch: int = 32, k: int = 4,
               key_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets of ``batch`` fresh scenes as object tokens, each followed by up to ``k`` binding questions
    with their answers (right-padded; loss on the text); ``key_last``: the questions in :func:`keyed_last` form."""
    seqs, prefixes = [], []
    for _ in range(batch):
        scene = sample_scene(rng, f"slots-{rng.random()}")
        pool = binding_questions(scene, rng, "colour") + binding_questions(scene, rng, "shape")
        asked = [(keyed_last(qa.question) if key_last else qa.question, qa.answer)
                 for qa in rng.sample(pool, min(k, len(pool)))]
        text = "\n".join(f"{q} {a}" for q, a in asked)
        seqs.append(tok.encode(text + "\n"))
        prefixes.append(object_tokens(scene, lm.embed_tokens, tok, rng, g))
    length = max(map(len, seqs))
    ids = torch.tensor([s + [tok.eos_id] * (length - len(s)) for s in seqs])
    keep = torch.tensor([[1] * len(s) + [0] * (length - len(s)) for s in seqs])
    embeds = torch.cat([torch.stack(prefixes), lm.embed_tokens(ids)], 1)
    mask = torch.cat([torch.ones(batch, SLOTS, dtype=torch.long), keep], 1)
    logits = lm(inputs_embeds=embeds, attention_mask=mask)[:, SLOTS - 1:-1]  # the positions predicting the text
    return logits, ids.masked_fill(keep == 0, IGNORE_INDEX)


def experiment_parser(doc: str, steps: int, configs: tuple[str, ...], stem: str) -> argparse.ArgumentParser:
    """The options of the stage-0 LM experiments (this script, ``lm_grounding.py``): a recipe run to start from,
    steps, scoring interval, learning rate, configurations and the results file's name."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--run", default="runs/nano", help="output folder of `tinygptv train --recipe nano`")
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--every", type=int, default=200)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--configs", default=",".join(configs))
    ap.add_argument("--stem", default=stem, help="results file name in benchmarks/results/")
    return ap


def main() -> None:
    ap = experiment_parser(__doc__, 400, CONFIGS, "lm-binding")
    ap.add_argument("--docs", type=int, default=15000, help="binding documents to draw the windows from")
    args = ap.parse_args()
    run = Path(args.run)
    tok = Tokenizer.from_folder(run / "stage0" / "tokenizer")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    rows = [row for config in args.configs.split(",")
            for row in train_and_score(config, run, tok, args.steps, args.every, args.lr, args.docs)]
    keys = [f"{kind}{k}" for kind in ("colour", "shape") for k in range(1, 5)]
    report = {"run": str(run), "args": vars(args), "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "seconds": round(time.perf_counter() - t0), "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.stem}.json").write_text(json.dumps(report, indent=1))
    lines = ["# Binding in the nano LM's context (text, or object tokens with `slots`)", "",
             (f"Stage-0 LM of `{run}`; produced by `python benchmarks/lm_binding.py --run {run} --steps {args.steps} "
              f"--every {args.every} --configs {args.configs} --stem {args.stem}` ({report['seconds']} s). Answers ranked among all colours / shapes; "
              "a guess among the attributes present scores 100 / 50 / 33 / 25 % for 1 / 2 / 3 / 4 objects."), "",
             "| config | step | loss | " + " | ".join(f"{k[:-1]} {k[-1]} obj %" for k in keys) + " |",
             "|---" * (3 + len(keys)) + "|"]
    for r in rows:
        loss = "—" if r["loss"] is None else f"{r['loss']:.3f}"
        lines.append(f"| {r['config']} | {r['step']} | {loss} | "
                     + " | ".join(f"{r[k]:.0f}" if k in r else "—" for k in keys) + " |")
    (RESULTS / f"{args.stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
