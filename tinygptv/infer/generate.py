"""The one generation core: batched prefill, then KV-cached decode, yielding tokens as they come.

Every surface (``model.generate``, the engine, CLI, HTTP API) consumes :func:`generate_tokens`.

- Inputs are per-request embedding sequences of different lengths, **left-padded** into one batch; positions
  come from the attention mask (``cumsum - 1``), so each row sees exactly what it would see alone.
- Greedy by default (reproducible); sampling with temperature / top-k / top-p / repetition penalty and a
  per-call seed; beam search for a single request.
- Stops per row at EOS, at a stop string, or after ``max_new_tokens``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator

import torch

from tinygptv import system
from tinygptv.model.phi import KVCache, PhiLM


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.repetition_penalty <= 0:
            raise ValueError("invalid sampling settings: need temperature >= 0, 0 < top_p <= 1, top_k >= 0, "
                             "repetition_penalty > 0")
        if self.num_beams < 1:
            raise ValueError("num_beams must be >= 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class StepEvent:
    """Token ``token`` was produced for batch row ``row``; ``finished`` marks the row's last event."""

    row: int
    token: int | None
    finished: bool = False
    reason: str | None = None  # "eos" | "length" | "stop"


def apply_repetition_penalty(logits: torch.Tensor, history: list[list[int]], penalty: float) -> torch.Tensor:
    """CTRL-style penalty on tokens already present in each row (``logits [B,V]``)."""
    if penalty == 1.0:
        return logits
    logits = logits.clone()
    for b, ids in enumerate(history):
        if ids:
            idx = torch.tensor(sorted(set(ids)), device=logits.device)
            vals = logits[b, idx]
            logits[b, idx] = torch.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def choose_next(logits: torch.Tensor, cfg: GenerationConfig, history: list[list[int]],
                generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row from ``logits [B,V]`` (fp32): greedy, or sampled with top-k / top-p."""
    logits = apply_repetition_penalty(logits, history, cfg.repetition_penalty)
    if cfg.greedy:
        return logits.argmax(-1)
    logits = logits / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= cfg.top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


Prompt = tuple[torch.Tensor, torch.Tensor]  # embeddings [L, C], attention mask [L]


def left_pad(seqs: list[Prompt], pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``([L_i, C], [L_i])`` prompts → ``([B, L, C], mask [B, L])`` with padding on the left."""
    L = max(s.shape[0] for s, _ in seqs)
    out = pad.expand(len(seqs), L, -1).clone()
    mask = torch.zeros(len(seqs), L, dtype=torch.long, device=pad.device)
    for b, (s, m) in enumerate(seqs):
        out[b, L - s.shape[0]:] = s
        mask[b, L - s.shape[0]:] = m
    return out, mask


@dataclass
class StopMatcher:
    """Per-row stop-string detection over the decoded text of the generated ids."""

    stops: tuple[str, ...]
    decode: object  # Callable[[list[int]], str]

    def hit(self, ids: list[int]) -> bool:
        if not self.stops:
            return False
        tail = self.decode(ids[-16:])  # stop strings are short; a bounded tail keeps this O(1) per step
        return any(s in tail for s in self.stops)


class PrefixCache:
    """Keys/values of recent single-request prompts, reused by a later prompt that starts the same way.

    A second question about the same image shares everything up to (at least) the image tokens; the next turn
    of a chat shares the whole previous prompt. The match is on the prompt's embedding rows and mask (exact
    equality), so nothing about templates or tokens needs to be known here. Bounded by ``max_bytes`` and
    ``max_entries`` (least recently used first out); prefixes shorter than ``min_tokens`` are not worth a copy.
    """

    def __init__(self, max_bytes: int = 512 * 2**20, max_entries: int = 16, min_tokens: int = 8):
        self.max_bytes, self.max_entries, self.min_tokens = max_bytes, max_entries, min_tokens
        self.entries: OrderedDict[int, tuple[torch.Tensor, torch.Tensor, list, list]] = OrderedDict()
        self._next = 0
        self.hits = self.misses = self.reused_tokens = 0

    def lookup(self, embeds: torch.Tensor, mask: torch.Tensor) -> tuple[int, list, list]:
        """Longest reusable prefix ``(n, keys, values)`` of ``embeds [L, C]`` (``n ≤ L - 1``: at least one
        position is left to compute the next-token logits); ``n = 0`` when nothing useful is cached."""
        best, best_key = 0, None
        for key, (emb, msk, _, _) in self.entries.items():
            n = _common_prefix(emb, msk, embeds[:-1], mask[:-1])
            if n >= self.min_tokens and n > best:
                best, best_key = n, key
        if best_key is None:
            self.misses += 1
            return 0, [], []
        self.entries.move_to_end(best_key)
        self.hits += 1
        self.reused_tokens += best
        _, _, ks, vs = self.entries[best_key]
        return best, [k[:, :, :best] for k in ks], [v[:, :, :best] for v in vs]

    def store(self, embeds: torch.Tensor, mask: torch.Tensor, cache: KVCache, consume: bool = False) -> None:
        """Remember the keys/values of the prompt ``embeds [L, C]`` held in ``cache`` (batch 1). ``consume``: the
        request is over, so each layer's buffers are dropped from ``cache`` as soon as they are copied (the copy
        then never coexists with the whole cache: ~60 MB less peak memory per request at full size, fp32)."""
        L = embeds.shape[0]
        ks, vs = [], []
        for i in range(len(cache.k)):
            ks.append(cache.k[i][:, :, :L].clone())
            vs.append(cache.v[i][:, :, :L].clone())
            if consume:
                cache.k[i] = cache.v[i] = None
        entry = (embeds.detach().clone(), mask.clone(), ks, vs)
        if _entry_bytes(entry) > self.max_bytes:
            return
        covered = [key for key, (emb, msk, _, _) in self.entries.items()
                   if _common_prefix(emb, msk, embeds, mask) == emb.shape[0]]
        for key in covered:  # the new prompt extends (or repeats) them: they can never be the longest match
            del self.entries[key]
        self.entries[self._next] = entry
        self._next += 1
        while (len(self.entries) > self.max_entries
               or sum(_entry_bytes(e) for e in self.entries.values()) > self.max_bytes):
            self.entries.popitem(last=False)

    def clear(self) -> None:
        self.entries.clear()


def _common_prefix(emb: torch.Tensor, msk: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor) -> int:
    """Number of leading rows on which ``(emb, msk)`` and ``(embeds, mask)`` agree exactly."""
    n = min(emb.shape[0], embeds.shape[0])
    if emb.dtype != embeds.dtype or emb.shape[1] != embeds.shape[1]:
        return 0
    diff = (emb[:n] != embeds[:n]).any(-1) | (msk[:n] != mask[:n])
    return int(diff.nonzero()[0, 0]) if diff.any() else n


def _entry_bytes(entry) -> int:
    emb, _, ks, vs = entry
    return sum(t.numel() * t.element_size() for t in ks + vs) + emb.numel() * emb.element_size()


def new_cache(lm: PhiLM, batch: int, max_len: int, dtype: torch.dtype, device: torch.device,
              fast_decode: bool = False) -> KVCache:
    """The key/value cache of one request. ``fast_decode`` on the CPU: keys/values stored in bf16 and one-token
    steps attended by the compiled kernel (:func:`tinygptv.model.attention.decode_attention`), which then reads
    half the bytes; logits move by bf16 rounding of the keys/values, so greedy answers can differ on near ties.
    Off by default (compiling takes seconds, once per process); ignored on other devices."""
    fused = fast_decode and torch.device(device).type == "cpu"
    return KVCache(batch, max_len, lm.cfg, torch.bfloat16 if fused else dtype, device, fused_decode=fused)


def prefill(lm: PhiLM, embeds: torch.Tensor, mask: torch.Tensor, cache: KVCache,
            prefix_cache: PrefixCache | None = None) -> torch.Tensor:
    """Run the prompt ``[B, L, C]`` into ``cache``; last-position logits ``[B, V]``. With a ``prefix_cache``
    (batch 1 only) the longest cached prefix is copied instead of recomputed; remembering the prompt
    (:meth:`PrefixCache.store`) is the caller's, when it suits its memory."""
    n = 0
    if prefix_cache is not None and embeds.shape[0] == 1:
        n, ks, vs = prefix_cache.lookup(embeds[0], mask[0])
        for i, (k, v) in enumerate(zip(ks, vs)):
            cache.k[i][:, :, :n] = k
            cache.v[i][:, :, :n] = v
        cache.length = n
    logits = lm(inputs_embeds=embeds[:, n:], attention_mask=mask, cache=cache, logits_slice=slice(-1, None))[:, -1]
    return logits


def generate_tokens(lm: PhiLM, prompts: list[Prompt], cfg: GenerationConfig, eos_id: int,
                    decode=None, pad_id: int | None = None,
                    prefix_cache: PrefixCache | None = None, fast_decode: bool = False) -> Iterator[StepEvent]:
    """Yield :class:`StepEvent` s for a batch of prompts ``([L_i, C], mask [L_i])`` (sampling or greedy).

    ``eos_id`` ends a row (pass -1 to never stop early, as benchmarks do); left padding uses the embedding of
    ``pad_id`` (default ``eos_id``), masked out anyway. ``prefix_cache``: see :class:`PrefixCache` (used for single
    prompts). ``fast_decode`` (CPU): see :func:`new_cache`. On the CPU, the heap memory the request freed (its
    keys/values, activations) is handed back to the OS when it ends: otherwise glibc keeps it and every request's
    peak stacks on the last one's leftovers (measured on the full-size int8 model: one user's peak RSS 4.66
    → 4.47 GB).
    """
    try:
        yield from _generate_tokens(lm, prompts, cfg, eos_id, decode, pad_id, prefix_cache, fast_decode)
    finally:
        if prompts and prompts[0][0].device.type == "cpu":
            system.release_memory()


@torch.no_grad()
def _generate_tokens(lm: PhiLM, prompts: list[Prompt], cfg: GenerationConfig, eos_id: int, decode,
                     pad_id: int | None, prefix_cache: PrefixCache | None,
                     fast_decode: bool) -> Iterator[StepEvent]:
    if cfg.num_beams > 1:
        raise ValueError("use beam_search() for num_beams > 1")
    device = prompts[0][0].device
    pad = lm.embed_tokens(torch.tensor([eos_id if pad_id is None else pad_id], device=device))[0]
    embeds, mask = left_pad(prompts, pad)
    B, L, _ = embeds.shape
    max_new = min(cfg.max_new_tokens, lm.cfg.max_position_embeddings - L)
    if max_new < 1:
        raise ValueError(f"prompt of {L} tokens leaves no room in {lm.cfg.max_position_embeddings} positions")
    cache = new_cache(lm, B, L + max_new, embeds.dtype, device, fast_decode)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed) if cfg.seed is not None else None
    stop = StopMatcher(tuple(cfg.stop), decode) if decode is not None else StopMatcher((), None)
    logits = prefill(lm, embeds, mask, cache, prefix_cache)
    try:
        yield from _decode(lm, logits, mask, cache, cfg, eos_id, gen, stop, max_new)
    finally:  # decoding never writes below position L, so the prompt's keys/values are intact
        if prefix_cache is not None and B == 1:
            prefix_cache.store(embeds[0], mask[0], cache, consume=True)


def _decode(lm: PhiLM, logits: torch.Tensor, mask: torch.Tensor, cache: KVCache, cfg: GenerationConfig,
            eos_id: int, gen: torch.Generator | None, stop: StopMatcher, max_new: int) -> Iterator[StepEvent]:
    B = logits.shape[0]
    device = logits.device
    history: list[list[int]] = [[] for _ in range(B)]
    alive = [True] * B
    for step in range(max_new):
        nxt = choose_next(logits, cfg, history, gen).tolist()
        for b in range(B):
            if not alive[b]:
                continue
            if nxt[b] == eos_id:
                alive[b] = False
                yield StepEvent(b, None, True, "eos")
                continue
            history[b].append(nxt[b])
            if stop.hit(history[b]):
                alive[b] = False
                yield StepEvent(b, nxt[b], True, "stop")
            elif step == max_new - 1:
                alive[b] = False
                yield StepEvent(b, nxt[b], True, "length")
            else:
                yield StepEvent(b, nxt[b])
        if not any(alive):
            return
        feed = torch.tensor([[t] for t in nxt], device=device)
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        logits = lm(input_ids=feed, attention_mask=mask, cache=cache)[:, -1]


@torch.no_grad()
def beam_search(lm: PhiLM, prompt: Prompt, cfg: GenerationConfig, eos_id: int, decode=None,
                prefix_cache: PrefixCache | None = None, fast_decode: bool = False) -> list[int]:
    """Beam search for one prompt ``([L, C], [L])``; returns the best hypothesis' token ids (EOS excluded)."""
    prompt, prompt_mask = prompt
    k = cfg.num_beams
    L = prompt.shape[0]
    max_new = min(cfg.max_new_tokens, lm.cfg.max_position_embeddings - L)
    cache = new_cache(lm, 1, L + max_new, prompt.dtype, prompt.device, fast_decode)
    mask = prompt_mask[None]
    logits = prefill(lm, prompt[None], mask, cache, prefix_cache)
    if prefix_cache is not None:  # now: the beams' reordering below copies the cache anyway
        prefix_cache.store(prompt, prompt_mask, cache)
    cache.select(torch.zeros(k, dtype=torch.long, device=prompt.device))
    beams: list[tuple[float, list[int]]] = [(0.0, [])]
    done: list[tuple[float, list[int]]] = []
    stop = StopMatcher(tuple(cfg.stop), decode) if decode is not None else StopMatcher((), None)
    logp = torch.log_softmax(logits, -1)  # [1, V] then [k, V]
    for step in range(max_new):
        cand = []
        for i, (score, ids) in enumerate(beams):
            row = apply_repetition_penalty(logp[i:i + 1], [ids], cfg.repetition_penalty)[0]
            top = torch.topk(row, k)
            cand += [(score + float(v), ids, int(t), i) for v, t in zip(top.values, top.indices)]
        cand.sort(key=lambda c: c[0], reverse=True)
        beams, origin = [], []
        for score, ids, tok, i in cand:
            if tok == eos_id or stop.hit(ids + [tok]) or step == max_new - 1:
                seq = ids if tok == eos_id else ids + [tok]
                done.append((score / max(len(seq), 1) ** cfg.length_penalty, seq))
            else:
                beams.append((score, ids + [tok]))
                origin.append(i)
            if len(beams) == k:
                break
        if not beams or (len(done) >= k and max(d[0] for d in done) >= beams[0][0] / max(len(beams[0][1]), 1) ** cfg.length_penalty):
            break
        cache.select(torch.tensor(origin, device=prompt.device))
        feed = torch.tensor([[ids[-1]] for _, ids in beams], device=prompt.device)
        mask = torch.cat([mask[:1].expand(len(beams), -1), mask.new_ones(len(beams), 1)], dim=1)
        logp = torch.log_softmax(lm(input_ids=feed, attention_mask=mask, cache=cache)[:, -1], -1)
    if not done:
        done = [(s / max(len(ids), 1) ** cfg.length_penalty, ids) for s, ids in beams]
    return max(done, key=lambda d: d[0])[1]
