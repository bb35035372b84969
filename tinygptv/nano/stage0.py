"""Stage 0 of the nano model: bootstrap the backbones the paper takes pretrained (EVA ViT, Q-Former, Phi-2).

1. **Tokenizer**: a byte-level BPE trained on the world's text (``<|endoftext|>`` = id 0 = BOS = EOS = pad, as
   Phi-2's 50256 plays all three roles).
2. **Language model**: a plain Phi decoder (no QK-norm, no post-attention RMSNorm, no LoRA — like the public
   Phi-2; ``new_norms`` pretrains it with the two norms in place instead, :func:`stage0_lm`) pretrained as a
   causal LM on the world's text and on scene documents (a description, then questions it answers), so that, like
   Phi-2, it can answer from what precedes a question; then on *object tokens* — one
   input vector per object, the sum of the embeddings of its words (size, colour, shape, place), in 16 slots —
   followed by questions about them or a description (:func:`pretrain_lm_objects`, the attribute phase); then,
   in a grounding phase, on object tokens with four more slots per object holding its box's corner coordinates
   (:func:`object_tokens`), in 32 slots like the Q-Former's queries, with grounding questions added.
   Phi-2 arrives able to look things up in its context; a nano LM trained on text alone does not learn to: it
   answers colour / shape questions about several objects at the level of a guess among the attributes present,
   also from ideal object tokens, unless the questions first end with their key (``benchmarks/lm_binding.py``).
3. **Vision tower**: first the ViT alone on per-patch labels (cheap steps: a from-scratch ViT needs thousands of
   them to tell shapes apart), then ViT + Q-Former (+ the projection) trained BLIP-2-style through the *frozen*
   pretrained LM to generate dense grounded descriptions of scenes, at both training resolutions (the position
   embedding is stored at the stage-1–3 grid and upsampled bicubically for stage-4 images, exactly what
   ``set_image_size`` does later). The caption loss alone lets the Q-Former collapse to an image-independent
   "soft prompt" (measured: equal loss with shuffled images), so, like the supervised pretraining of real vision
   backbones, auxiliary heads (thrown away afterwards) predict what is where: per ViT patch the colour / shape /
   size of the object there and whether a word is; from the Q-Former's queries a coarse grid of colours and
   shapes, the number of objects, the word, and one-hop retrievals ("the star's colour", "the red one's shape").
   In the same loop the projected queries are regressed onto the scene's object tokens (each object matched to
   its nearest query, :func:`object_match_loss`) and the frozen LM answers questions from them, so that the tower
   hands over tokens the LM has learnt to read; a head on each matched query predicts its object's box, so that
   the queries say where things are (:meth:`AuxHeads.box_loss`).
4. **Base checkpoint**: the TinyGPT-V model assembled from these parts exactly as ``tinygptv import`` assembles
   the official files — the new norms at the reference's initial values (§2.3; trained values when the LM was
   pretrained with them), LoRA-B = 0 — then frozen by the paper's stages. One deliberate difference: the
   projections are the ones the vision loop trained the tower through (as the paper describes its first
   projection, taken from a pretrained MiniGPT-4; the official code starts them random, §1.4), so stage 1
   starts from image tokens the frozen LM already reads (measured: referring boxes 8.2 → 16.3 %, count 60 → 75 %
   after stage 4). :func:`assemble_base` without them draws fresh ones, the second from a Gaussian scaled so
   image embeddings have the RMS of the LM's token embeddings: with PyTorch's default init the nano model's image
   tokens come out ~12x larger than text tokens and the LM learns to ignore them (measured: equal loss with
   shuffled images).
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import tinygptv
from tinygptv.config import LMConfig, ModelConfig
from tinygptv.image import preprocess
from tinygptv.model.phi import PhiLM
from tinygptv.model.sequence import Example, build_batch, causal_lm_loss
from tinygptv.model.tinygptv import TinyGPTV
from tinygptv.templates import get_template
from tinygptv.tokenizer import EOS_TOKEN, Tokenizer
from tinygptv.train.loop import rng_state, set_rng_state
from tinygptv.weights.common import ImportReport, assign_tensors
from tinygptv.weights.official import init_missing
from tinygptv.weights.phi import PHI_ABSENT_OK

log = logging.getLogger(__name__)

# (rng, n, grid, text=True) -> [(image, text, dense targets)]; targets: see :func:`dense_targets`
PairFn = Callable[..., list[tuple[Image.Image, str, dict]]]


def train_tokenizer(lines: list[str], vocab_size: int, out: Path) -> Tokenizer:
    """Byte-level BPE on ``lines`` with ``<|endoftext|>`` at id 0; saved as ``out/tokenizer.json``."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(lines, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS_TOKEN],
                            show_progress=False)
    out.mkdir(parents=True, exist_ok=True)
    bpe.save(str(out / "tokenizer.json"))
    tok = Tokenizer.from_folder(out)
    if tok.eos_id != 0:
        raise RuntimeError("tokenizer: <|endoftext|> must be id 0")
    return tok


def _cosine(step: int, total: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


class Progress:
    """Where a stage-0 phase keeps its progress, so that an interrupted recipe resumes it at the step it had
    reached instead of from its start (a phase is up to an hour on a CPU).

    Every ``every_s`` seconds a loop writes the state of its trainable modules, its optimizer, its random streams
    (its own ``random.Random`` / ``torch.Generator`` objects and the global ones) and its step to ``path``, written
    to a temporary file and renamed, so an interruption leaves the previous state whole. A loop that finds a state
    of its own name there continues from it exactly: the weights it returns are those of an uninterrupted run
    (``tests/test_nano.py``; with one thread: with two, the vision loop is not bit-reproducible on CPU even
    uninterrupted). The file is read with ``torch.load(weights_only=True)``. One phase may run
    several loops (the ViT warm-up, then the joint vision loop): :attr:`loop` names the one saved last.
    :meth:`seconds` is the phase's time so far, the earlier processes' saved work included; :meth:`clear`
    removes the file once the phase's result is saved.
    """

    def __init__(self, path: str | Path, every_s: float = 300.0):
        self.path, self.every_s = Path(path), every_s
        self.state = torch.load(self.path, map_location="cpu", weights_only=True) if self.path.is_file() else None
        self.seconds_before = float(self.state["seconds"]) if self.state else 0.0
        self.t0 = time.perf_counter()

    @property
    def loop(self) -> str | None:
        return self.state["loop"] if self.state else None

    def seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.t0

    def resume(self, loop: str, steps: int, modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer,
               rngs: dict[str, random.Random | torch.Generator]) -> int:
        """The step to start ``loop`` at (0 without a saved state of it), with everything restored."""
        if self.loop != loop:
            return 0
        st = self.state
        if st["steps"] != steps:
            raise ValueError(f"{self.path}: saved by a {loop!r} loop of {st['steps']} steps, asked to continue one "
                             f"of {steps}; delete the file to start the phase again")
        for name, module in modules.items():
            module.load_state_dict(st["modules"][name])
        opt.load_state_dict(st["optimizer"])
        for name, r in rngs.items():
            if isinstance(r, torch.Generator):
                r.set_state(st["rngs"][name])
            else:
                r.setstate(tuple(st["rngs"][name]))
        set_rng_state(st["global_rng"])
        log.info("%s: resuming %s at step %d of %d", self.path, loop, st["step"], steps)
        return int(st["step"])

    def save(self, loop: str, step: int, steps: int, modules: dict[str, torch.nn.Module],
             opt: torch.optim.Optimizer, rngs: dict[str, random.Random | torch.Generator]) -> None:
        """Record that ``loop`` has done its steps before ``step``."""
        self.state = {
            "loop": loop, "step": step, "steps": steps, "seconds": self.seconds(),
            "modules": {name: m.state_dict() for name, m in modules.items()}, "optimizer": opt.state_dict(),
            "rngs": {name: r.get_state() if isinstance(r, torch.Generator) else list(r.getstate())
                     for name, r in rngs.items()},
            "global_rng": rng_state()}
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        torch.save(self.state, tmp)
        os.replace(tmp, self.path)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


class _Steps:
    """The optimisation of every stage-0 loop: AdamW, a cosine schedule after a 5 % linear warm-up, gradients
    clipped at 1.0, and a progress bar showing the given values every 50 steps. Iterate for the step numbers.

    With ``progress`` the loop is saved under the name ``loop`` every ``progress.every_s`` seconds (``modules``:
    what it trains; ``rngs``: the random streams its steps draw from) and continues from a saved state of that
    name."""

    def __init__(self, params, steps: int, lr: float, weight_decay: float, desc: str,
                 progress: Progress | None = None, loop: str = "", modules: dict[str, torch.nn.Module] | None = None,
                 rngs: dict[str, random.Random | torch.Generator] | None = None):
        self.params = list(params)
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
        self.steps, self.lr = steps, lr
        self.progress, self.loop, self.modules, self.rngs = progress, loop, modules or {}, rngs or {}
        self.start = progress.resume(loop, steps, self.modules, self.opt, self.rngs) if progress else 0
        self.bar = tqdm(total=steps, initial=self.start, desc=desc, mininterval=2.0)

    def __iter__(self):
        last = time.perf_counter()
        for step in range(self.start, self.steps):
            for group in self.opt.param_groups:
                group["lr"] = _cosine(step, self.steps, self.lr, max(1, self.steps // 20))
            yield step
            self.bar.update(1)
            if self.progress and step + 1 < self.steps and time.perf_counter() - last >= self.progress.every_s:
                self.progress.save(self.loop, step + 1, self.steps, self.modules, self.opt, self.rngs)
                last = time.perf_counter()
        self.bar.close()

    def update(self, objective: torch.Tensor, step: int, **shown) -> None:
        objective.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if step % 50 == 0:
            self.bar.set_postfix({k: f"{v.item():.3f}" if torch.is_tensor(v) else v for k, v in shown.items()})


def stage0_lm_config(cfg: ModelConfig, new_norms: bool = False) -> LMConfig:
    """The stage-0 language model's config: ``cfg.lm`` without dropout, and without TinyGPT-V's new norms (QK
    LayerNorm, post-attention RMSNorm) unless ``new_norms``. Phi-2, which the paper starts from, has none; the
    official code inserts them at LayerNorm(1, 0) / RMSNorm(1) (:func:`tinygptv.model.phi.init_new_norms`)."""
    return replace(cfg.lm, qk_norm=cfg.lm.qk_norm and new_norms, post_attn_norm=cfg.lm.post_attn_norm and new_norms,
                   resid_dropout=0.0)


def stage0_lm(cfg: ModelConfig, new_norms: bool = False) -> PhiLM:
    """The stage-0 language model (:func:`stage0_lm_config`); with ``new_norms`` it is pretrained with the new norms
    in place, their biases frozen at 0 as stages 1–4 keep them (reference §9.10)."""
    lm = PhiLM(stage0_lm_config(cfg, new_norms))
    for name, p in lm.named_parameters():
        if name.endswith(("q_norm.bias", "k_norm.bias")):
            p.requires_grad_(False)
    return lm


def pretrain_lm(cfg: ModelConfig, tok: Tokenizer, lines: list[str], steps: int, batch: int = 32,
                seq_len: int = 128, lr: float = 2e-3, seed: int = 0, amp: str = "auto",
                new_norms: bool = False, progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """Causal-LM pretraining of the Phi decoder on ``lines`` (with TinyGPT-V's new norms if ``new_norms``, see
    :func:`stage0_lm`); returns its state dict. ``progress``: save and resume the loop there (:class:`Progress`).

    The lines are concatenated (each ends with ``<|endoftext|>``) and every training window starts at the start of
    a line, so a scene document is seen whole, description before its questions (windows at random offsets cut
    most documents apart; measured on the same 1000 steps: answering colour questions from the context 38 % →
    61 %, with 128-token instead of 96-token windows too).
    """
    torch.manual_seed(seed)
    lm = stage0_lm(cfg, new_norms)
    _init_(lm, seed)
    data, starts = line_windows(tok, lines, seq_len)
    g = torch.Generator().manual_seed(seed)
    opt = _Steps(lm.parameters(), steps, lr, 0.01, "stage0 LM", progress, "lm", {"lm": lm}, {"g": g})
    lm.train()
    autocast = _autocast(amp)
    for step in opt:
        x = sample_windows(data, starts, batch, seq_len, g)
        with autocast:
            logits = lm(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.update(loss, step, loss=loss)
        if step == steps - 1:
            log.info("stage0 LM: final loss %.3f", loss.item())
    return {k: v.detach().clone() for k, v in lm.state_dict().items()}


def sample_windows(data: torch.Tensor, starts: torch.Tensor, n: int, seq_len: int,
                   g: torch.Generator) -> torch.Tensor:
    """``[n, seq_len + 1]`` token windows of :func:`line_windows`' ``data`` from randomly picked ``starts``."""
    picked = starts[torch.randint(0, len(starts), (n,), generator=g)]
    return torch.stack([data[s:s + seq_len + 1] for s in picked.tolist()])


# (rng, key_last) -> (the words of each object of a fresh scene and of its rendered word, each object's box as
# corners (x1, y1, x2, y2) in 0-1, questions about it with their answers, a description of it); with ``key_last``
# the colour / shape questions end with their key (``tinygptv.synth.text.keyed_last``)
Corners = tuple[float, float, float, float]
ObjectFn = Callable[[random.Random, bool], tuple[list[list[str]], list[Corners], list[tuple[str, str]], str]]
OBJECT_SLOTS_EMPTY = 0.1  # RMS of an empty slot relative to a token embedding (the tower learns to output ~0 there)


def as_word(word: str) -> str:
    """A word as it is tokenized inside a sentence (after a space)."""
    return " " + word


def object_vectors(objects: list[list[str]], table: torch.Tensor, tok: Tokenizer,
                   text_of: Callable[[str], str] = as_word) -> torch.Tensor:
    """``[n, C]``: per object the sum of the token embeddings of its words (a word of several tokens: their mean),
    scaled to the RMS of ``table`` — the image tokens an ideal vision tower would hand to the LM. ``text_of`` gives
    the text each word is tokenized as."""
    rms = table.float().pow(2).mean().sqrt()
    out = []
    for words in objects:
        v = torch.stack([table[tok.encode(text_of(w))].float().mean(0) for w in words]).sum(0)
        out.append(v * rms / v.pow(2).mean().sqrt())
    return torch.stack(out)


CORNER_WORDS = (" left", " top", " right", " bottom")  # x1, y1, x2, y2
# cycles over the image's width / height: coarse, so that the code is nearly a linear function of the coordinate,
# which the tower's queries (trained to carry their object's box linearly, :meth:`AuxHeads.box_loss`) can produce
CORNER_FREQUENCIES = (0.25, 0.5, 1.0)
# weight of the object's own vector in its corner slots (which object a corner belongs to); measured on ideal tokens
# (``benchmarks/lm_grounding.py``, ``lm-grounding-tie.md``): colour 89.9 % with 0.3, 83.5 % with 0.7 after 800
# grounding steps, within the scores' spread, refer 38 / 43 %
CORNER_TIE = 0.3
# weight of the box losses (per matched query, :meth:`AuxHeads.box_loss`; per patch) in the vision loop: an L1
# error of ~0.03 then costs ~0.3
BOX_WEIGHT = 10.0


class CornerCode:
    """A box coordinate (0–1) as a unit-RMS ``[C]`` vector: its sine and cosine at ``frequencies`` (default
    :data:`CORNER_FREQUENCIES`) through a fixed random orthonormal map (drawn from ``seed``) into the LM's
    embedding space.

    Object tokens give every object four *corner slots*, one per coordinate of its box, and the number tokens
    0–100 carry the code of their value (:meth:`code_numbers_`), so that answering ``[refer]`` with
    ``{<x1><y1><x2><y2>}`` is, per number, a lookup of the object's corner slot and a copy. Measured on ideal object
    tokens (``benchmarks/lm_grounding.py``: a recipe run's object-phase LM continued with grounding questions for
    800 steps): refer Acc@0.5 43 % and identify 63 % with these frequencies, 68.5 % / 51.5 % with 0.5–16 cycles; the
    box as one code added to the object's single token reached 11 % after 600 steps.
    """

    def __init__(self, hidden: int, seed: int = 1234, frequencies: tuple[float, ...] = CORNER_FREQUENCIES):
        g = torch.Generator().manual_seed(seed)
        self.freqs = torch.tensor(frequencies)
        self.map = torch.linalg.qr(torch.randn(hidden, 2 * len(frequencies), generator=g))[0]

    def __call__(self, t: float) -> torch.Tensor:
        angle = 2 * math.pi * t * self.freqs
        v = self.map @ torch.cat([angle.sin(), angle.cos()])
        return v / v.pow(2).mean().sqrt()

    @torch.no_grad()
    def code_numbers_(self, lm: PhiLM, tok: Tokenizer) -> None:
        """Add to the input and output embedding rows of every single-token number 0–100 the code of its value
        (value / 100), at the row's own RMS."""
        for n in range(101):
            ids = tok.encode(str(n))
            if len(ids) == 1:
                for table in (lm.embed_tokens.weight, lm.lm_head.weight):
                    table[ids[0]] += self(n / 100).to(table.dtype) * table[ids[0]].float().pow(2).mean().sqrt()


def object_tokens(objects: list[list[str]], boxes: list[Corners], table: torch.Tensor, tok: Tokenizer,
                  code: CornerCode, tie: float = CORNER_TIE) -> torch.Tensor:
    """``[n + 4·len(boxes), C]``: :func:`object_vectors` of ``objects`` (the first ``len(boxes)`` are the boxed
    objects), then per box four corner slots — ``tie`` × the object's vector + the embedding of "left" / "top" /
    "right" / "bottom" + the :class:`CornerCode` of that coordinate — each scaled to the RMS of ``table``."""
    vectors = object_vectors(objects, table, tok)
    rms = table.float().pow(2).mean().sqrt()
    corners = [table[tok.encode(w)].float().mean(0) for w in CORNER_WORDS]
    out = [vectors]
    for v, box in zip(vectors, boxes):
        for word, t in zip(corners, box):
            slot = tie * v / rms + word / word.pow(2).mean().sqrt() + code(t)
            out.append((slot * rms / slot.pow(2).mean().sqrt())[None])
    return torch.cat(out)


def token_boxes(objects: list[list[str]], boxes: list[Corners]) -> list[Corners | None]:
    """The box each of :func:`object_tokens`' tokens belongs to: the boxed objects' own, ``None`` for the other
    things (the rendered word), then each boxed object's box for its four corner slots."""
    return [*boxes, *[None] * (len(objects) - len(boxes)), *[b for b in boxes for _ in CORNER_WORDS]]


def object_slots(vectors: torch.Tensor, n_slots: int, rms: torch.Tensor, rng: random.Random,
                 g: torch.Generator) -> torch.Tensor:
    """``[n_slots, C]``: each object vector, jittered by Gaussian noise of RMS 0.1 × ``rms``, in one random slot; the
    other slots Gaussian noise of RMS :data:`OBJECT_SLOTS_EMPTY` × ``rms``."""
    if len(vectors) > n_slots:
        raise ValueError(f"{len(vectors)} objects do not fit in {n_slots} slots")
    noise = torch.randn(n_slots, vectors.shape[1], generator=g) * rms
    out = noise * OBJECT_SLOTS_EMPTY
    for i, v in zip(rng.sample(range(n_slots), len(vectors)), vectors):
        out[i] = v + 0.1 * noise[i]
    return out


def qa_example(qas: list[tuple[str, str]], rng: random.Random, chat: float) -> Example:
    """The questions after the image: with probability ``chat`` as turns of a random chat template (the layout
    of stages 3–4 and the evaluation, each answer tokenized on its own), else one "question answer" per line."""
    from tinygptv.model.sequence import multi_turn
    from tinygptv.templates import IMAGE_PLACEHOLDER

    if rng.random() < chat:
        template = get_template(rng.choice(("stage3", "stage4", "eval")))
        asked = [q if template.name != "stage4" or q.startswith("[") or rng.random() < 0.5 else f"[vqa] {q}"
                 for q, _ in qas]
        asked[0] = template.instruction(asked[0], True)
        return multi_turn(template, asked, [a for _, a in qas])
    targets = []
    for q, a in qas:
        targets += [(q, False), (f" {a}\n", True)]
    return Example(IMAGE_PLACEHOLDER, targets)


def pretrain_lm_objects(cfg: ModelConfig, tok: Tokenizer, lm_state: dict[str, torch.Tensor], lines: list[str],
                        scenes: ObjectFn, steps: int, batch: int = 24, text_batch: int = 8, lr: float = 2e-3,
                        key_last: float = 0.4, chat: float = 0.5, describe: float = 0.25, boxes: bool = False,
                        n_slots: int | None = None, seed: int = 0, amp: str = "auto",
                        new_norms: bool = False, progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """Continue the stage-0 LM on object tokens (:func:`object_slots`), as it will read them from the vision
    tower: questions about them (:func:`qa_example`), or for ``describe`` of the scenes their description right
    after them (the layout of stage 1, whose captions are all the projection learns from), plus ``text_batch``
    windows of ``lines`` per step so that it keeps its language.

    For the first ``key_last`` of the steps the colour / shape questions end with their key: a LM reading ideal
    object tokens learns to answer them as asked only after that (``benchmarks/lm_binding.py``: 600 steps, colour
    97 / 100 / 95 % and shape 94 / 98 / 90 % with 2 / 3 / 4 objects; without it, a guess among the attributes
    present). With ``boxes`` every object also has four corner slots (:func:`object_tokens`), and the number tokens
    get the :class:`CornerCode` of their value before training, so that ``[refer]`` / ``[identify]`` questions
    about the object tokens can be answered (the recipe's grounding phase, after a phase without). Returns the new
    state dict. ``n_slots``: object-token slots (default: the Q-Former's query count). ``new_norms``: as the
    LM was pretrained (:func:`stage0_lm`). ``progress``: save and resume the loop there (:class:`Progress`).
    """
    torch.manual_seed(seed)
    lm = stage0_lm(cfg, new_norms)
    lm.load_state_dict(lm_state)
    code = CornerCode(lm.cfg.hidden)
    if boxes:
        code.code_numbers_(lm, tok)
    seq_len = 128
    data, starts = line_windows(tok, lines, seq_len)
    rng = random.Random(f"objects-{seed}" + ("-boxes" if boxes else ""))
    g = torch.Generator().manual_seed(seed)
    opt = _Steps(lm.parameters(), steps, lr, 0.01, "stage0 LM " + ("grounding" if boxes else "objects"), progress,
                 "lm-objects", {"lm": lm}, {"rng": rng, "g": g})
    n_slots = n_slots or cfg.qformer.num_queries
    lm.train()
    autocast = _autocast(amp)
    for step in opt:
        table = lm.embed_tokens.weight.detach()
        rms = table.float().pow(2).mean().sqrt()
        items = [scenes(rng, step < key_last * steps) for _ in range(batch)]
        prefixes = [object_slots(object_tokens(objs, corners if boxes else [], table, tok, code), n_slots, rms, rng,
                                 g)[None] for objs, corners, _, _ in items]
        examples = [Example(None, [(text + "\n", True)]) if rng.random() < describe else qa_example(qas, rng, chat)
                    for _, _, qas, text in items]
        b = build_batch(examples, prefixes, tok, lm.embed_tokens, 0, 0, max_txt_len=96)
        x = sample_windows(data, starts, text_batch, seq_len, g)
        with autocast:
            objects = causal_lm_loss(lm(inputs_embeds=b.inputs_embeds, attention_mask=b.attention_mask), b.labels)
            logits = lm(x[:, :-1])
        text = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.update(objects + text, step, objects=objects, text=text)
        if step == steps - 1:
            log.info("stage0 LM on object tokens: final loss %.3f (text %.3f)", objects.item(), text.item())
    return {k: v.detach().clone() for k, v in lm.state_dict().items()}


# Splits a stage-0 line into pieces that are tokenized one by one, as the trainer tokenizes a prompt and its answer
# (``tinygptv.model.sequence.build_batch``): "…###Assistant: " then "cross###" gives the answer token "cross",
# where tokenizing the whole line would give " cross".
SEGMENT = "\x1f"


def line_windows(tok: Tokenizer, lines: list[str], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The lines as one token stream (each followed by ``<|endoftext|>``) and the offsets where a line starts and a
    window of ``seq_len`` + 1 tokens fits. A line's :data:`SEGMENT`-separated pieces are tokenized separately."""
    pieces = [line.split(SEGMENT) for line in lines]
    flat = tok.backend.encode_batch([p for line in pieces for p in line], add_special_tokens=False)
    stream: list[int] = []
    line_starts = []
    i = 0
    for line in pieces:
        line_starts.append(len(stream))
        for enc in flat[i:i + len(line)]:
            stream += enc.ids
        i += len(line)
        stream.append(tok.eos_id)
    starts = [s for s in line_starts if s + seq_len + 1 <= len(stream)]
    if not starts:
        raise ValueError(f"corpus too small for {seq_len}-token windows ({len(stream)} tokens)")
    return torch.tensor(stream), torch.tensor(starts)


class AuxHeads(torch.nn.Module):
    """Stage-0 supervision of the vision tower (discarded after stage 0)."""

    def __init__(self, width: int, q_dim: int, n_queries: int, n: dict[str, int], grid: int):
        super().__init__()
        self.n, self.grid = n, grid
        # per patch: colour / shape / size of the object there, the word or not, and that object's box
        self.patch = torch.nn.Linear(width, n["colour"] + n["shape"] + n["size"] + 2 + 4)
        self.query = torch.nn.Linear(q_dim * n_queries, grid * grid * (n["colour"] + n["shape"]) + 5 + n["word"])
        # retrieval: a key (a colour or a shape) attends over the queries, the pooled query names the other one
        self.bind_key = torch.nn.Embedding(n["colour"] + n["shape"], q_dim)
        self.bind_q = torch.nn.Linear(q_dim, q_dim)
        self.bind_out = torch.nn.Linear(q_dim, n["colour"] + n["shape"])
        self.box = torch.nn.Linear(q_dim, 4)  # a matched query's object box [x1, y1, x2, y2] / image size

    def patch_loss(self, feats: torch.Tensor, targets: list[dict]) -> torch.Tensor:
        """Per ViT patch: colour / shape / size of the object there, whether the word is, and where the object
        there is (its box, L1 in units of the image size, weighted by :data:`BOX_WEIGHT`; patches outside objects
        have none). Without the box the patch features need not say where they are, and the Q-Former, whose
        cross-attention does not see which patch a feature came from, hands the LM no position at all."""
        n = self.n
        out = self.patch(feats[:, 1:].float())  # [B, g², …]
        splits = [n["colour"], n["shape"], n["size"], 2, 4]
        *heads, box = out.split(splits, -1)
        inside = torch.stack([t["patch"]["colour"] for t in targets]) > 0  # [B, g²]
        loss = 0.0
        if inside.any():
            truth = torch.stack([t["patch"]["box"] for t in targets])  # [B, g², 4]
            loss = BOX_WEIGHT * (torch.sigmoid(box[inside]) - truth[inside]).abs().mean()
        for logits, key in zip(heads, ("colour", "shape", "size", "word")):
            tgt = torch.stack([t["patch"][key] for t in targets])  # [B, g²]
            if tgt.shape[1] != logits.shape[1]:  # other resolution: targets are per input patch, recomputed
                raise ValueError("dense targets do not match the patch grid")
            loss = loss + F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1))
        return loss

    def loss(self, feats: torch.Tensor, queries: torch.Tensor, targets: list[dict]) -> torch.Tensor:
        n = self.n
        loss = self.patch_loss(feats, targets)
        q = self.query(queries.float().flatten(1))
        cells = self.grid * self.grid
        grid_c, grid_s, count, word = q.split([cells * n["colour"], cells * n["shape"], 5, n["word"]], -1)
        for logits, key, k in ((grid_c, "grid_colour", n["colour"]), (grid_s, "grid_shape", n["shape"])):
            tgt = torch.stack([t[key] for t in targets]).reshape(-1)
            loss = loss + F.cross_entropy(logits.reshape(-1, k), tgt)
        loss = loss + F.cross_entropy(count, torch.tensor([t["count"] for t in targets]))
        loss = loss + F.cross_entropy(word, torch.tensor([t["word"] for t in targets]))
        return loss + self.bind_loss(queries, targets)

    def bind_loss(self, queries: torch.Tensor, targets: list[dict]) -> torch.Tensor:
        """"What colour is the star?" as one attention hop over the queries — the read an LM attention head
        does — so the queries learn to carry each object's attributes together (the flattened-query head above
        can decode a scene from a representation no single attention hop can read)."""
        off = self.n["colour"]  # shape ids follow the colour ids in the key and label vocabularies
        rows = [(b, key + off * by_shape, label + off * (not by_shape))
                for b, t in enumerate(targets) for by_shape, key, label in t["bind"]]
        if not rows:
            return queries.sum() * 0.0
        b, key, label = (torch.tensor(x) for x in zip(*rows))
        out = queries.float()[b]  # [P, Q, H]
        probe = self.bind_q(self.bind_key(key))  # [P, H]
        attn = torch.softmax(torch.einsum("pqh,ph->pq", out, probe) / out.shape[-1] ** 0.5, dim=-1)
        return F.cross_entropy(self.bind_out(torch.einsum("pq,pqh->ph", attn, out)), label)

    def box_loss(self, queries: torch.Tensor, matches: list[list[tuple[int, int]]],
                 boxes: list[list[Corners | None]]) -> torch.Tensor:
        """Where each object is, read from the query it was matched to (:func:`object_match_loss`): the L1 error of
        its box corners in units of the image's width / height. Without it the queries carry no position at all
        (measured on the bundle of d2a379d, single-object scenes at 128 px: ridge or MLP probes on all 16 queries
        predict the box no better than the mean box, Acc@0.5 2 %, while an MLP on the ViT patches reaches 72 %):
        the Q-Former's cross-attention does not see which patch a feature came from unless the feature says so."""
        rows = [(b, q, bx[i]) for b, (pairs, bx) in enumerate(zip(matches, boxes)) for q, i in pairs
                if bx[i] is not None]
        if not rows:
            return queries.sum() * 0.0
        b, q, box = zip(*rows)
        pred = torch.sigmoid(self.box(queries.float()[torch.tensor(b), torch.tensor(q)]))  # [P, 4]
        return (pred - torch.tensor(box, dtype=pred.dtype)).abs().mean()


def pretrain_vision(cfg: ModelConfig, tok: Tokenizer, lm_state: dict[str, torch.Tensor], pairs: PairFn,
                    steps: int, sizes: tuple[int, ...], batch: int = 16, lr: float = 1e-3,
                    seed: int = 0, vit_steps: int = 0, amp: str = "auto",
                    new_norms: bool = False, lm_every: int = 1, caption_every: int = 1,
                    progress: Progress | None = None) -> tuple[dict, dict, dict]:
    """Train ViT + Q-Former (+ a projection) through the frozen stage-0 LM (``new_norms``: as it was pretrained,
    :func:`stage0_lm`) on (image, text) pairs.

    ``cfg.vision.image_size`` is the stored resolution; batches alternate over ``sizes`` (others interpolated).
    ``vit_steps`` steps of :func:`warm_up_vit` come first. ``lm_every``: the losses through the LM (caption and
    questions, two LM forwards and backwards, most of a step's time) on every ``lm_every``-th step only; the other
    steps train on the auxiliary heads, the object-token match and the query boxes. ``caption_every``: among the
    steps through the LM, the caption loss (one of the two LM forwards) on every ``caption_every``-th only, the
    question loss on all of them. ``progress``: save and resume the warm-up and the loop there (:class:`Progress`;
    a saved loop state skips the warm-up, which it includes). Returns the ViT+``ln_vision``, Q-Former and
    projection state dicts.
    """
    for name, every in (("lm_every", lm_every), ("caption_every", caption_every)):
        if every < 1:
            raise ValueError(f"{name}={every}: the losses through the LM run on every n-th step, n >= 1")
    torch.manual_seed(seed)
    model = TinyGPTV(replace(cfg, lm=stage0_lm_config(cfg, new_norms), lora=replace(cfg.lora, r=0)))
    _init_(model, seed)
    _fan_in_init_(model.qformer, seed)
    model.lm.load_state_dict(lm_state)
    match_embedding_scale(model, seed)
    model.tokenizer = tok
    model.set_trainable(lora=False, norms=False, projector=True, qformer=True, vision=True)
    heads = AuxHeads(cfg.vision.width, cfg.qformer.hidden, cfg.qformer.num_queries, pairs.classes, AUX_GRID)
    rng = random.Random(seed)
    if vit_steps and (progress is None or progress.loop != "vision"):
        warm_up_vit(model.vision, heads, pairs, rng, vit_steps, min(sizes), batch, lr, cfg.vision.patch_size, amp,
                    progress)
    params = [p for p in model.parameters() if p.requires_grad] + list(heads.parameters())
    trained = {"vision": model.vision, "qformer": model.qformer, "projector": model.projector, "heads": heads}
    opt = _Steps(params, steps, lr, 0.05, "stage0 vision", progress, "vision", trained, {"rng": rng})
    model.train()
    model.lm.eval()
    autocast = _autocast(amp)
    table = model.lm.embed_tokens.weight.detach()
    rms = table.float().pow(2).mean().sqrt()
    code = CornerCode(table.shape[1])
    shown: dict = {}
    for step in opt:
        size = sizes[step % len(sizes)]
        items = pairs(rng, batch, size // cfg.vision.patch_size)
        px = torch.stack([preprocess(im, size) for im, _, _ in items])
        through_lm = step % lm_every == 0
        captioned = through_lm and step % (lm_every * caption_every) == 0
        with autocast:
            feats = model.vision(px, interpolate_pos=True)  # [B, 1+g², W]
            queries = model.qformer(feats)  # [B, Q, H]
            emb = model.projector(queries)  # [B, Q, C]
        targets = [t for _, _, t in items]
        loss = heads.loss(feats, queries, targets)
        if captioned:
            examples = [Example(None, [(text + "\n", True)]) for _, text, _ in items]
            b = build_batch(examples, [e[None] for e in emb], tok, model.lm.embed_tokens, 0, 0, max_txt_len=96)
            with autocast:
                logits = model.lm(inputs_embeds=b.inputs_embeds, attention_mask=b.attention_mask)
            caption = causal_lm_loss(logits, b.labels)
            loss = loss + caption
            shown["caption"] = caption.detach()
        if "objects" in targets[0]:  # image tokens as the object tokens the LM was taught to read
            wanted = [object_tokens(t["objects"], t["boxes"], table, tok, code) for t in targets]
            match, matches = object_match_loss(emb, wanted, rms)
            box = heads.box_loss(queries, matches, [token_boxes(t["objects"], t["boxes"]) for t in targets])
            loss = loss + match + BOX_WEIGHT * box
            shown.update(match=match.detach(), box=box.detach())
            if through_lm:
                qa_batch = build_batch([qa_example(t["qas"], rng, chat=0.5) for t in targets],
                                       [e[None] for e in emb], tok, model.lm.embed_tokens, 0, 0)
                with autocast:
                    qa_logits = model.lm(inputs_embeds=qa_batch.inputs_embeds,
                                         attention_mask=qa_batch.attention_mask)
                qa = causal_lm_loss(qa_logits, qa_batch.labels)
                loss = loss + qa
                shown["qa"] = qa.detach()
        opt.update(loss, step, total=loss, size=size, **shown)
    log.info("stage0 vision: final losses %s", {k: round(v.item(), 3) for k, v in shown.items()})
    return ({k: v.detach().clone() for k, v in model.vision.state_dict().items()},
            {k: v.detach().clone() for k, v in model.qformer.state_dict().items()},
            {k: v.detach().clone() for k, v in model.projector.state_dict().items()})


def object_match_loss(emb: torch.Tensor, objects: list[torch.Tensor],
                      rms: torch.Tensor) -> tuple[torch.Tensor, list[list[tuple[int, int]]]]:
    """Regression of the image tokens ``emb [B, Q, C]`` onto each image's object vectors ``[n, C]``
    (:func:`object_vectors`), DETR-style: every object is matched to the query token nearest to it (greedily,
    nearest pair first), the unmatched tokens are pulled towards 0 (an empty slot) with weight 0.1. Mean squared
    errors relative to ``rms``², averaged over the images. Needs fewer objects than tokens per image. Returns the
    loss and, per image, the matched ``(query, object)`` index pairs."""
    total = emb.new_zeros((), dtype=torch.float32)
    pairs: list[list[tuple[int, int]]] = []
    for e, targets in zip(emb.float(), objects):
        if len(targets) >= len(e):
            raise ValueError(f"{len(targets)} objects for {len(e)} image tokens: the matching needs fewer objects")
        cost = (e[:, None] - targets[None]).pow(2).mean(-1) / rms ** 2  # [Q, n]
        free = cost.detach().clone()
        rest = torch.ones(len(e), dtype=torch.bool, device=e.device)
        matched, pairs_here = [], []
        for _ in range(len(targets)):
            q, n = divmod(int(free.argmin()), free.shape[1])
            matched.append(cost[q, n])
            pairs_here.append((q, n))
            free[q, :], free[:, n], rest[q] = float("inf"), float("inf"), False
        pairs.append(pairs_here)
        total = total + torch.stack(matched).mean() + 0.1 * (e[rest].pow(2).mean() / rms ** 2)
    return total / len(objects), pairs


def warm_up_vit(vision: torch.nn.Module, heads: AuxHeads, pairs: PairFn, rng: random.Random, steps: int,
                size: int, batch: int, lr: float, patch_size: int, amp: str = "auto",
                progress: Progress | None = None) -> None:
    """The ViT alone on the per-patch targets, before the Q-Former and the LM join.

    A from-scratch ViT learns shapes slowly (a nano ViT trained only on per-patch shape labels, batch 16: chance
    after 300 steps, 54 % after 1000), and in the joint stage-0 loop, whose steps cost ~5x more (Q-Former, LM), it
    never did (single-object shape read linearly from the trained tower: 28 %, chance 17 %). This phase buys
    those steps cheaply, at the smaller training resolution. ``progress``: save and resume there (:class:`Progress`).
    """
    opt = _Steps(list(vision.parameters()) + list(heads.patch.parameters()), steps, lr, 0.05, "stage0 ViT", progress,
                 "vit", {"vision": vision, "heads": heads}, {"rng": rng})
    vision.train()
    autocast = _autocast(amp)
    for step in opt:
        items = pairs(rng, batch, size // patch_size, text=False)
        px = torch.stack([preprocess(im, size) for im, _, _ in items])
        with autocast:
            feats = vision(px, interpolate_pos=True)
        loss = heads.patch_loss(feats, [t for _, _, t in items])
        opt.update(loss, step, patch=loss)
        if step == steps - 1:
            log.info("stage0 ViT warm-up: final patch loss %.3f", loss.item())


AUX_GRID = 4  # the Q-Former head predicts colours and shapes on a 4x4 grid


def dense_targets(objects: list[tuple[tuple[float, float, float, float], int, int, int]],
                  word_box: tuple[float, float, float, float] | None, word: int, size_wh: tuple[int, int],
                  grid: int) -> dict:
    """Targets of the auxiliary heads for one image.

    Args:
        objects: ``(box [x, y, w, h] in image pixels, colour id, shape id, size id)``, ids from 1 (0 = nothing).
        word_box: the rendered word's box or ``None``; ``word``: its id from 1 (0 = no word).
        size_wh: the image's size in pixels; ``grid``: the model's patch grid side for this input.
    """
    W, H = size_wh

    def at(x: float, y: float) -> tuple[int, int, int, Corners]:
        for (bx, by, bw, bh), c, s, z in objects:
            if bx <= x < bx + bw and by <= y < by + bh:
                return c, s, z, (bx / W, by / H, (bx + bw) / W, (by + bh) / H)
        return 0, 0, 0, (0.0, 0.0, 0.0, 0.0)

    def labels(g: int) -> list[tuple[int, int, int, Corners]]:
        return [at((j + 0.5) * W / g, (i + 0.5) * H / g) for i in range(g) for j in range(g)]

    cells = labels(grid)
    in_word = [0] * (grid * grid)
    if word_box is not None:
        wx, wy, ww, wh = word_box
        in_word = [int(wx <= (j + 0.5) * W / grid < wx + ww and wy <= (i + 0.5) * H / grid < wy + wh)
                   for i in range(grid) for j in range(grid)]
    coarse = labels(AUX_GRID)
    colours, shapes = [c for _, c, _, _ in objects], [sh for _, _, sh, _ in objects]
    # (is the key a shape, key id, label id): "the star is …" → its colour, "the red one is …" → its shape
    bind = [(True, sh, c) for c, sh in zip(colours, shapes) if shapes.count(sh) == 1]
    bind += [(False, c, sh) for c, sh in zip(colours, shapes) if colours.count(c) == 1]
    return {"patch": {"colour": torch.tensor([c[0] for c in cells]), "shape": torch.tensor([c[1] for c in cells]),
                      "size": torch.tensor([c[2] for c in cells]), "word": torch.tensor(in_word),
                      "box": torch.tensor([c[3] for c in cells])},
            "grid_colour": torch.tensor([c[0] for c in coarse]),
            "grid_shape": torch.tensor([c[1] for c in coarse]),
            "count": min(len(objects), 4), "word": word, "bind": bind}


def assemble_base(cfg: ModelConfig, tok: Tokenizer, lm_state: dict, vision_state: dict, qformer_state: dict,
                  out: Path, seed: int = 0, projector_state: dict | None = None) -> Path:
    """The TinyGPT-V base checkpoint from the stage-0 parts, assembled like an official import.

    ``projector_state``: the vision loop's projection (the recipe passes it); without it the projection starts
    random, as the official stage 1 does (reference §1.4).
    """
    with torch.device("meta"):
        model = TinyGPTV(cfg)
    report = ImportReport(source="stage 0")
    assign_tensors(model.vision, vision_state, report, prefix="vision.")
    assign_tensors(model.qformer, qformer_state, report, prefix="qformer.")
    assign_tensors(model.lm, lm_state, report, absent_ok=PHI_ABSENT_OK, prefix="lm.")
    assign_tensors(model.projector, projector_state or {}, report,
                   absent_ok=[] if projector_state else [r".*"], prefix="projector.")
    report.raise_if_bad()
    init_missing(model, seed)
    if not projector_state:
        match_embedding_scale(model, seed)
    model.tokenizer = tok
    model.template = get_template("stage4")
    return tinygptv.save(model, out)


def _autocast(amp: str = "auto"):
    """The training loop's ``run.amp`` on the CPU (``auto``: bf16 matmuls where the CPU has fast bf16 — AMX makes
    them ~3x faster than fp32 — fp32 elsewhere, where they are emulated and ~7x slower; ``none``: fp32; ``bf16``);
    fp32 master weights either way. Decide once per training function and re-enter the returned context every
    step."""
    from tinygptv.train.loop import amp_autocast, resolve_amp

    cpu = torch.device("cpu")
    return amp_autocast(resolve_amp(amp, cpu), cpu)


@torch.no_grad()
def match_embedding_scale(model: TinyGPTV, seed: int = 0) -> float:
    """Re-draw ``proj2`` from a Gaussian so projected unit-variance queries have the RMS of the token embeddings."""
    g = torch.Generator().manual_seed(seed)
    target = model.lm.embed_tokens.weight.float().pow(2).mean().sqrt()
    proj2 = model.projector.proj2
    proj2.weight.copy_(torch.randn(proj2.weight.shape, generator=g))
    proj2.bias.zero_()
    probe = torch.randn(64, model.cfg.qformer.num_queries, model.cfg.qformer.hidden, generator=g)
    rms = model.projector(probe.to(proj2.weight.dtype)).float().pow(2).mean().sqrt()
    proj2.weight.mul_(target / rms)
    return float(target)


@torch.no_grad()
def _fan_in_init_(module: torch.nn.Module, seed: int) -> None:
    """N(0, 1/fan_in) for the matrices: with N(0, 0.02) at width 128 the cross-attention starts uniform and its
    query/key weights get several hundred times smaller gradients than its values; the nano tower then learns
    binding about half as fast (measured, one run each: that retrieval 25 % vs 51 % right after 200 steps)."""
    g = torch.Generator().manual_seed(seed + 1)
    for name, p in module.named_parameters():
        if p.dim() == 2 and "norm" not in name:
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[1] ** -0.5)


@torch.no_grad()
def _init_(module: torch.nn.Module, seed: int) -> None:
    """GPT-style init for training from scratch: N(0, 0.02) weights, zero biases, unit norms."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if "norm" in name or "ln_" in name or "LayerNorm" in name:
            p.fill_(1.0 if leaf == "weight" else 0.0)
        elif leaf == "bias" or leaf.endswith("_bias"):
            p.zero_()
        else:
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
