"""Inference engine: one object the CLI, HTTP API and evaluation share.

- Prompts are rendered into embeddings exactly as in training (:func:`tinygptv.model.sequence.build_batch`).
- Image embeddings (ViT + Q-Former + projections: most of the prefill cost) are cached by image content in a
  bounded LRU, so a second question about the same image skips the vision tower.
- The keys/values of recent single-request prompts are kept too (:class:`~tinygptv.infer.generate.PrefixCache`):
  a follow-up question about the same image, or the next turn of a chat, only runs the LM over what is new.
- :meth:`Engine.generate` runs many requests as one left-padded batch; :meth:`Engine.stream` yields text deltas,
  holding back anything that could be the start of a stop string or an incomplete UTF-8 character.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch
from PIL import Image

from tinygptv import system
from tinygptv.image import ImageInput, load_image
from tinygptv.infer.generate import GenerationConfig, PrefixCache, beam_search, generate_tokens
from tinygptv.lru import TensorLRU
from tinygptv.model.attention import warm_up_decode_attention
from tinygptv.model.sequence import Example, build_batch
from tinygptv.model.tinygptv import TinyGPTV
from tinygptv.templates import IMAGE_PROMPT, ChatTemplate

log = logging.getLogger(__name__)


@dataclass
class Request:
    """A verbatim prompt (one ``<ImageHere>`` per image) or an :class:`Example` whose targets are context."""

    prompt: str | Example
    images: list[ImageInput] = field(default_factory=list)


@dataclass
class Result:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "eos" | "length"
    prompt_tokens: int
    timings: dict[str, float] = field(default_factory=dict)


def image_key(image: Image.Image, size: int) -> str:
    h = hashlib.sha256()
    h.update(f"{image.size}{image.mode}{size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


class Engine:
    def __init__(self, model: TinyGPTV, image_cache_size: int = 64, prefix_cache_mb: int = 512,
                 fast_decode: bool = False):
        """``image_cache_size`` images and ``prefix_cache_mb`` MiB of prompt keys/values are kept (0 = off).
        ``fast_decode`` (CPU): bf16 keys/values read by a compiled decode-attention kernel
        (:func:`tinygptv.infer.generate.new_cache`); pays off for long-running processes, batches and long contexts."""
        if model.tokenizer is None:
            raise ValueError("the model has no tokenizer")
        self.model = model.eval()
        self.tokenizer = model.tokenizer
        self.cache = TensorLRU(max_entries=image_cache_size)
        self.prefixes = PrefixCache(prefix_cache_mb * 2**20) if prefix_cache_mb > 0 else None
        self.fast_decode = fast_decode
        if fast_decode and model.device.type == "cpu":
            lm = model.lm
            log.info("fast decoding: compiling the decode-attention kernel (once per process) …")
            secs = warm_up_decode_attention(lm.cfg.heads, lm.cfg.head_dim, lm.final_layernorm.weight.dtype)
            log.info("fast decoding: ready in %.1f s", secs)

    @property
    def template(self) -> ChatTemplate:
        return self.model.template

    # ------------------------------------------------------------------------------------------ prompts
    @torch.no_grad()
    def image_embeddings(self, images: list[ImageInput]) -> torch.Tensor | None:
        """``[n, Q, C]`` for the images, computing only the ones not in the cache (as one batch)."""
        if not images:
            return None
        pil = [load_image(im) for im in images]
        keys = [image_key(im, self.model.image_size) for im in pil]
        found = {k: self.cache.get(k) for k in dict.fromkeys(keys)}
        todo = [k for k, v in found.items() if v is None]
        if todo:
            first = {k: pil[keys.index(k)] for k in todo}
            on_cpu = self.model.device.type == "cpu"
            if on_cpu:  # memory freed since the last request (evicted caches) goes first
                system.release_memory()
            fresh = self.model.encode_images(self.model.pixel_values(list(first.values())))
            if on_cpu:  # hand the vision tower's activations back before the LM runs
                system.release_memory()
            for k, emb in zip(todo, fresh):
                self.cache.put(k, emb)
                found[k] = emb
        return torch.stack([found[k] for k in keys])

    def prompt_embeddings(self, request: Request) -> tuple[torch.Tensor, torch.Tensor]:
        """``([L, C], mask [L])``: the request laid out exactly as the training forward (BOS per ``model.add_bos``;
        inner-turn BOS tokens of a conversation attention-masked as in training)."""
        example = request.prompt if isinstance(request.prompt, Example) else Example(request.prompt, [])
        m = self.model
        batch = build_batch([example], [self.image_embeddings(request.images)], self.tokenizer, m.lm.embed_tokens,
                            m.cfg.lm.pad_token_id, m.cfg.lm.bos_token_id, add_bos=m.add_bos)
        return batch.inputs_embeds[0], batch.attention_mask[0]

    def chat_request(self, question: str, images: list[ImageInput] = ()) -> Request:
        """A single-turn request in the checkpoint's template."""
        return Request(self.template.user_turn(question, bool(images)), list(images))

    # ------------------------------------------------------------------------------------------ generation
    def _stops(self, cfg: GenerationConfig) -> tuple[str, ...]:
        return tuple(dict.fromkeys((*self.template.stop_strings, *cfg.stop)))

    def _finish(self, ids: list[int], stops: tuple[str, ...]) -> str:
        text = self.tokenizer.decode(ids)
        return cut_at_stop(text, stops)[0].strip()

    @torch.no_grad()
    def generate(self, requests: list[Request], cfg: GenerationConfig | None = None) -> list[Result]:
        """Answer every request; all of them run as one batch (greedy results equal running each alone)."""
        cfg = cfg or GenerationConfig()
        stops = self._stops(cfg)
        t0 = time.perf_counter()
        prompts = [self.prompt_embeddings(r) for r in requests]
        t_prompt = time.perf_counter() - t0
        if cfg.num_beams > 1:
            out = []
            for p in prompts:
                ids = beam_search(self.model.lm, p, _with_stops(cfg, stops), self.model.cfg.lm.eos_token_id,
                                  self.tokenizer.decode, prefix_cache=self.prefixes, fast_decode=self.fast_decode)
                out.append(Result(self._finish(ids, stops), ids, "stop", p[0].shape[0]))
            return out
        ids: list[list[int]] = [[] for _ in requests]
        reasons = ["length"] * len(requests)
        first_token_at = None
        for ev in generate_tokens(self.model.lm, prompts, _with_stops(cfg, stops), self.model.cfg.lm.eos_token_id,
                                  self.tokenizer.decode, prefix_cache=self.prefixes,
                                  fast_decode=self.fast_decode):
            if first_token_at is None:
                first_token_at = time.perf_counter() - t0
            if ev.token is not None:
                ids[ev.row].append(ev.token)
            if ev.finished:
                reasons[ev.row] = ev.reason
        total = time.perf_counter() - t0
        n_new = sum(len(i) for i in ids)
        timings = {"prompt_s": t_prompt, "first_token_s": first_token_at or total, "total_s": total,
                   "decode_tokens_per_s": n_new / max(total - (first_token_at or 0), 1e-9)}
        return [Result(self._finish(i, stops), i, r, p[0].shape[0], timings) for i, r, p in zip(ids, reasons, prompts)]

    @torch.no_grad()
    def stream(self, request: Request, cfg: GenerationConfig | None = None) -> Iterator[str]:
        """Yield text deltas of one answer; no partial stop string or broken character is ever emitted."""
        cfg = cfg or GenerationConfig()
        if cfg.num_beams > 1:
            yield self.generate([request], cfg)[0].text
            return
        stops = self._stops(cfg)
        prompt = self.prompt_embeddings(request)
        ids: list[int] = []
        sent = 0
        for ev in generate_tokens(self.model.lm, [prompt], _with_stops(cfg, stops), self.model.cfg.lm.eos_token_id,
                                  self.tokenizer.decode, prefix_cache=self.prefixes,
                                  fast_decode=self.fast_decode):
            if ev.token is not None:
                ids.append(ev.token)
            text, stopped = cut_at_stop(self.tokenizer.decode(ids), stops)
            text = text.lstrip()  # answers are stripped like the non-streamed text (stable as text grows)
            safe = len(text) if (stopped or ev.finished) else safe_prefix_len(text, stops)
            if safe > sent:
                chunk = text[sent:safe]
                if ev.finished or stopped:
                    chunk = chunk.rstrip()
                if chunk:
                    yield chunk
                sent = safe
            if stopped or ev.finished:
                return


def _with_stops(cfg: GenerationConfig, stops: tuple[str, ...]) -> GenerationConfig:
    from dataclasses import replace

    return replace(cfg, stop=stops)


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """Text before the earliest stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def safe_prefix_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of ``text`` that can be emitted: hold back a suffix that may start a stop string, a
    trailing U+FFFD (an incomplete multi-byte character) and trailing whitespace (answers are stripped)."""
    n = len(text)
    for s in stops:
        for k in range(min(len(s) - 1, n), 0, -1):
            if text.endswith(s[:k]):
                n = min(n, len(text) - k)
                break
    while n and (text[n - 1] == "\ufffd" or text[n - 1].isspace()):
        n -= 1
    return n


__all__ = ["Engine", "Request", "Result", "GenerationConfig", "IMAGE_PROMPT", "cut_at_stop",
           "safe_prefix_len"]
