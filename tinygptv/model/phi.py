"""Phi decoder with the TinyGPT-V additions (reference §1.6, §2.1–2.3).

One layer, input ``x [B,T,C]``::

    h = input_layernorm(x)                         # LayerNorm(C), shared by both branches
    q, k, v = split(qkv(h))                        # fused, per-head interleaved rows [H,(q,k,v),D]
    q, k = q_norm(q), k_norm(k)                    # TinyGPT-V: LayerNorm(D) per head, *before* RoPE
    q, k = rope(q), rope(k)                        # partial rotary: first rotary_dim dims of each head
    a = dense(softmax(q kᵀ/√D + mask) v)
    a = post_attn_norm(a)                          # TinyGPT-V: RMSNorm(C, eps 1e-6), attention branch only
    m = fc2(gelu_tanh(fc1(h)))
    out = x + dropout(a) + dropout(m)              # parallel block

QK-norm and the post-attention RMSNorm are switchable (``LMConfig.qk_norm`` / ``post_attn_norm``);
with both off and LoRA off the decoder is stock Phi (``transformers.PhiForCausalLM``).
The fused ``qkv`` weight uses the transformers-4.36 ``query_key_value`` row order (head-major,
then q/k/v), so LoRA-B rows of the official checkpoints load without permutation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tinygptv.config import LMConfig, LoRAConfig
from tinygptv.model.attention import attention, decode_attention, one_query_attention
from tinygptv.model.lora import LoRALinear


class RMSNorm(nn.Module):
    """``LlamaRMSNorm`` of the patched ``modeling_phi.py``: weight only, statistics in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            xf = xf.to(self.weight.dtype)
        return (self.weight * xf).to(in_dtype)


class KVCache:
    """Preallocated per-layer key/value buffers ``[B, H, max_len, D]`` written by position.

    ``fused_decode``: one-token steps attend with :func:`decode_attention` (a compiled kernel that reads the
    keys/values once); the buffers may then be stored in a lower precision than the model's (``dtype``)."""

    def __init__(self, batch: int, max_len: int, cfg: LMConfig, dtype: torch.dtype, device: torch.device | str,
                 fused_decode: bool = False):
        shape = (batch, cfg.heads, max_len, cfg.head_dim)
        self.fused_decode = fused_decode
        # uninitialised: only positions below ``length`` are ever read, and pages never written stay out of the
        # resident set (a request that stops early does not pay for its unused ``max_new_tokens``)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.layers)]
        self.length = 0  # number of positions already stored
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v [B,H,T,D]`` at ``[length, length+T)``; return all keys/values so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def select(self, index: torch.Tensor) -> None:
        """Reorder/choose batch rows (beam search)."""
        self.k = [t.index_select(0, index) for t in self.k]
        self.v = [t.index_select(0, index) for t in self.v]


def rope_cos_sin(position_ids: torch.Tensor, rotary_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin ``[B,1,T,rotary_dim]`` for integer ``position_ids [B,T]`` (rotate-half convention)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, device=position_ids.device).float() / rotary_dim))
    freqs = position_ids.float()[..., None] * inv_freq  # [B,T,rotary_dim/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B,1,T,rotary_dim]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``rotary_dim`` dims of each head of ``x [B,H,T,D]``; the rest pass through."""
    rd = cos.shape[-1]
    rot, rest = x[..., :rd], x[..., rd:]
    half = rd // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    return torch.cat([rot * cos + rotated * sin, rest], dim=-1)


class PhiAttention(nn.Module):
    def __init__(self, cfg: LMConfig, lora: LoRAConfig):
        super().__init__()
        self.cfg = cfg
        c, d = cfg.hidden, cfg.head_dim
        self.qkv = _linear(c, 3 * c, "qkv", lora)
        self.dense = _linear(c, c, "dense", lora)
        self.q_norm = nn.LayerNorm(d, eps=cfg.ln_eps) if cfg.qk_norm else None
        self.k_norm = nn.LayerNorm(d, eps=cfg.ln_eps) if cfg.qk_norm else None

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, C = h.shape
        H, D = self.cfg.heads, self.cfg.head_dim
        qkv = self.qkv(h).view(B, T, H, 3, D)  # per-head interleaved rows
        q, k, v = qkv.unbind(dim=3)  # each [B,T,H,D]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B,H,T,D]
        q, k = apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin)
        if cache is None:
            y = attention(q, k, v, attn_mask=mask)  # [B,H,T,D]
        else:
            k, v = cache.update(layer, k, v)  # [B,H,S,D], S = past + T
            if cache.fused_decode and T == 1:
                y = decode_attention(q, k, v, mask).to(h.dtype)
            elif T == 1 and q.device.type == "cpu" and k.dtype == q.dtype == torch.float32:
                y = one_query_attention(q, k, v, mask)
            else:  # no copy unless the cache stores another precision
                y = attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask)
        return self.dense(y.transpose(1, 2).reshape(B, T, C))


class PhiMLP(nn.Module):
    def __init__(self, cfg: LMConfig, lora: LoRAConfig):
        super().__init__()
        self.fc1 = _linear(cfg.hidden, cfg.mlp_dim, "fc1", lora)
        self.fc2 = _linear(cfg.mlp_dim, cfg.hidden, "fc2", lora)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(h), approximate="tanh"))  # gelu_new


class PhiBlock(nn.Module):
    def __init__(self, cfg: LMConfig, lora: LoRAConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden, eps=cfg.ln_eps)
        self.attn = PhiAttention(cfg, lora)
        self.post_attn_norm = RMSNorm(cfg.hidden, eps=cfg.rms_eps) if cfg.post_attn_norm else None
        self.mlp = PhiMLP(cfg, lora)
        self.resid_dropout = nn.Dropout(cfg.resid_dropout)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        h = self.input_layernorm(x)
        a = self.attn(h, cos, sin, mask, cache, layer)
        if self.post_attn_norm is not None:
            a = self.post_attn_norm(a)
        return x + self.resid_dropout(a) + self.resid_dropout(self.mlp(h))


class PhiLM(nn.Module):
    """Phi causal LM. ``forward`` takes token ids or embeddings and returns fp32 logits ``[B,T,V]``."""

    def __init__(self, cfg: LMConfig, lora: LoRAConfig | None = None):
        super().__init__()
        lora = lora or LoRAConfig(r=0)
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.embd_dropout = nn.Dropout(cfg.embd_dropout)
        self.layers = nn.ModuleList(PhiBlock(cfg, lora) for _ in range(cfg.layers))
        self.final_layernorm = nn.LayerNorm(cfg.hidden, eps=cfg.ln_eps)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=True)
        self.gradient_checkpointing = False

    def forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                logits_slice: slice | None = None) -> torch.Tensor:
        """Run the decoder.

        Args:
            input_ids: ``[B,T]`` token ids, or
            inputs_embeds: ``[B,T,C]`` embeddings (multimodal sequences).
            attention_mask: ``[B, past+T]`` 1 for real tokens, 0 for padding (left or right). Positions
                are ``cumsum(mask) - 1`` so left padding gets correct RoPE positions. ``None`` = all ones.
            cache: a :class:`KVCache`; ``cache.length`` is advanced by ``T``.
            logits_slice: compute logits only for these positions (e.g. ``slice(-1, None)`` when decoding).
        Returns:
            logits ``[B,T',V]`` in fp32.
        """
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, _ = x.shape
        past = cache.length if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, past + T, dtype=torch.long, device=x.device)
        if attention_mask.shape != (B, past + T):
            raise ValueError(f"attention_mask must be [B, past+T] = {(B, past + T)}, got {tuple(attention_mask.shape)}")
        keep = attention_mask.bool()
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # [B,T]
        cos, sin = rope_cos_sin(position_ids, self.cfg.rotary_dim, self.cfg.rope_theta, x.dtype)
        mask = causal_mask(keep, T, past)
        x = self.embd_dropout(x)
        for i, block in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, cos, sin, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache, i)
        if cache is not None:
            cache.length += T
        x = self.final_layernorm(x)
        if logits_slice is not None:
            x = x[:, logits_slice]
        return self.lm_head(x).float()


def causal_mask(keep: torch.Tensor, T: int, past: int) -> torch.Tensor:
    """Boolean attention mask ``[B,1,T,past+T]``: causal ∧ key-not-padding, diagonal always allowed.

    Allowing the diagonal keeps rows of padding queries finite (their outputs are never used).
    """
    S = past + T
    q_pos = torch.arange(past, S, device=keep.device)[:, None]  # [T,1]
    k_pos = torch.arange(S, device=keep.device)[None, :]  # [1,S]
    causal = k_pos <= q_pos  # [T,S]
    mask = causal[None] & keep[:, None, :]  # [B,T,S]
    mask = mask | (k_pos == q_pos)[None]
    return mask[:, None]


def _linear(n_in: int, n_out: int, name: str, lora: LoRAConfig) -> LoRALinear:
    r = lora.r if name in lora.targets else 0
    return LoRALinear(n_in, n_out, bias=True, r=r, alpha=lora.alpha, dropout=lora.dropout)


def init_new_norms(lm: PhiLM) -> None:
    """Reference §2.3: the added norms start at LayerNorm(w=1, b=0) and RMSNorm(w=1)."""
    with torch.no_grad():
        for block in lm.layers:
            if block.attn.q_norm is not None:
                for norm in (block.attn.q_norm, block.attn.k_norm):
                    norm.weight.fill_(1.0)
                    norm.bias.zero_()
            if block.post_attn_norm is not None:
                block.post_attn_norm.weight.fill_(1.0)


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


__all__ = ["PhiLM", "KVCache", "RMSNorm", "causal_mask", "init_new_norms", "count_params"]
