"""Importers for the vision tower (EVA ViT-g + ``ln_vision``) and the Q-Former.

Sources (``shared/reference/tinygptv-official.md`` §3.1):

* LAVIS ``eva_vit_g.pth``: plain state dict whose keys equal :class:`~tinygptv.model.vision.EVAViT`'s.
* LAVIS BLIP-2 ``blip2_pretrained_*.pth`` (unwrapped from ``{"model": …}``): ``ln_vision``, ``query_tokens``
  and ``Qformer.bert.*``; optionally the ViT as ``visual_encoder.*``.
* HF ``Blip2ForConditionalGeneration`` / ``Blip2Model`` safetensors (``vision_model.*``, ``qformer.*``,
  ``query_tokens``), or a bare ``Blip2VisionModel`` / ``Blip2QFormerModel``.

Every converter returns tensors keyed relative to one of our modules plus an :class:`ImportReport`.
A required key that is absent raises :class:`WeightImportError` naming it (and any unrecognised keys, which
usually reveal a rename). Unrecognised keys alone end up in ``report.unexpected``; call ``raise_if_bad``.
Key names for vision tensors are relative to :class:`~tinygptv.model.vision.VisionEncoder` (``vit.*``,
``ln_vision.*``) except for :func:`convert_eva_vit_lavis` (relative to ``EVAViT``); Q-Former tensors are
relative to :class:`~tinygptv.model.qformer.QFormer`.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Iterable, Optional

import torch

from tinygptv.config import QFormerConfig, VisionConfig
from tinygptv.model.vision import interpolate_pos_embed
from tinygptv.weights.common import ImportReport, KeyMapper, Tensors, WeightImportError

log = logging.getLogger(__name__)

_WB = ("weight", "bias")

# LAVIS BLIP-2 keys that TinyGPT-V never uses (text branch of the Q-Former, LM heads and projections).
LAVIS_BLIP2_IGNORE = (
    r"Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings)\..*",
    r"Qformer\.bert\.embeddings\.position_ids",
    r"Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\..*",  # text FFN (not *_query)
    r"Qformer\.cls\..*",
    r"(t5_proj|t5_model|opt_proj|opt_model|vision_proj|text_proj|itm_head)\..*",
    r"temp",
)

# HF BLIP-2 keys that TinyGPT-V never uses (language side, retrieval heads, Q-Former text branch).
HF_BLIP2_IGNORE = (
    r"language_model\..*",
    r"language_projection\..*",
    r"embeddings\..*",  # Blip2TextEmbeddings of the retrieval / text-projection models
    r"(vision_projection|text_projection|itm_head)\..*",
    r"qformer\.encoder\.layer\.\d+\.(intermediate|output)\..*",  # text FFN when use_qformer_text_input
)

# Our EVA block names; identical in LAVIS, HF names in the second column.
_EVA_BLOCK_HF = {
    "norm1": "layer_norm1",
    "attn.proj": "self_attn.projection",
    "norm2": "layer_norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


class _Source:
    """A :class:`KeyMapper` that collects missing keys, so that one error can name all of them."""

    def __init__(self, sd: Tensors, name: str):
        self.mapper = KeyMapper(sd, name)
        self.name = name
        self.missing: list[str] = []

    def keys(self) -> Iterable[str]:
        return self.mapper.source.keys()

    def take(self, key: str) -> Optional[torch.Tensor]:
        if key not in self.mapper:
            self.missing.append(key)
            return None
        return self.mapper.take(key)

    def finish(self, ignore: Iterable[str]) -> ImportReport:
        report = self.mapper.finish(ignore)
        if self.missing:
            msg = f"{self.name}: required key(s) missing: {self.missing[:20]}"
            if report.unexpected:
                msg += f"; unrecognised key(s) present (renamed?): {report.unexpected[:20]}"
            raise WeightImportError(msg)
        return report


def _fit_pos_embed(pos: Optional[torch.Tensor], grid: int, key: str) -> Optional[torch.Tensor]:
    """Interpolate a checkpoint's ``pos_embed [1, 1+g², W]`` to ``grid`` if its grid differs."""
    if pos is None:
        return None
    n = pos.shape[1] - 1 if pos.dim() == 3 else -1
    if pos.dim() != 3 or pos.shape[0] != 1 or math.isqrt(n) ** 2 != n:
        raise WeightImportError(f"{key}: expected [1, 1+g², W] with a square grid, got {tuple(pos.shape)}")
    if math.isqrt(n) != grid:
        log.info("%s: interpolating position embedding grid %d -> %d (bicubic)", key, math.isqrt(n), grid)
    return interpolate_pos_embed(pos, grid)


def _extra_block_keys(src: _Source, block_prefix: str, depth: int) -> list[str]:
    """Exact-key ignore patterns for checkpoint blocks ``>= depth`` (EVA-CLIP-g has 40, we build 39)."""
    pattern = re.compile(re.escape(block_prefix) + r"(\d+)\..*")
    out = []
    for key in src.keys():
        m = pattern.fullmatch(key)
        if m and int(m.group(1)) >= depth:
            out.append(re.escape(key))
    return out


def _take_eva_lavis(src: _Source, cfg: VisionConfig, prefix: str) -> tuple[Tensors, list[str]]:
    """LAVIS EVA keys under ``prefix`` → EVAViT tensors, plus ignore patterns for unused blocks/heads."""
    out: Tensors = {
        "cls_token": src.take(prefix + "cls_token"),
        "pos_embed": _fit_pos_embed(src.take(prefix + "pos_embed"), cfg.grid, prefix + "pos_embed"),
    }
    names = [f"patch_embed.proj.{p}" for p in _WB]
    for i in range(cfg.depth):
        block = [f"{ours}.{p}" for ours in _EVA_BLOCK_HF for p in _WB] + ["attn.qkv.weight"]
        if cfg.qkv_bias:
            block += ["attn.q_bias", "attn.v_bias"]
        names += [f"blocks.{i}.{n}" for n in block]
    out.update({n: src.take(prefix + n) for n in names})
    ignore = _extra_block_keys(src, prefix + "blocks.", cfg.depth)
    ignore += [re.escape(prefix) + r"(norm|fc_norm|head)\..*"]  # final norm / classifier of a full EVA
    return out, ignore


def _take_hf_vision(src: _Source, cfg: VisionConfig, prefix: str) -> Tensors:
    """HF ``Blip2VisionModel`` keys under ``prefix`` → VisionEncoder tensors (``vit.*``, ``ln_vision.*``)."""
    emb = prefix + "embeddings."
    out: Tensors = {
        "vit.cls_token": src.take(emb + "class_embedding"),
        "vit.pos_embed": _fit_pos_embed(src.take(emb + "position_embedding"), cfg.grid, emb + "position_embedding"),
    }
    for p in _WB:
        out[f"vit.patch_embed.proj.{p}"] = src.take(f"{emb}patch_embedding.{p}")
        out[f"ln_vision.{p}"] = src.take(f"{prefix}post_layernorm.{p}")
    for i in range(cfg.depth):
        ours, theirs = f"vit.blocks.{i}.", f"{prefix}encoder.layers.{i}."
        for our_name, hf_name in _EVA_BLOCK_HF.items():
            for p in _WB:
                out[f"{ours}{our_name}.{p}"] = src.take(f"{theirs}{hf_name}.{p}")
        out[ours + "attn.qkv.weight"] = src.take(theirs + "self_attn.qkv.weight")
        if cfg.qkv_bias:
            out.update(_split_qkv_bias(src.take(theirs + "self_attn.qkv.bias"), theirs + "self_attn.qkv.bias", ours))
    return out


def _split_qkv_bias(bias: Optional[torch.Tensor], key: str, ours: str) -> Tensors:
    """HF fused ``[3W]`` bias → ``q_bias`` (first W) and ``v_bias`` (last W); the k part must be zero."""
    if bias is None:
        return {}
    if bias.dim() != 1 or bias.shape[0] % 3:
        raise WeightImportError(f"{key}: expected a fused [3W] q/k/v bias, got {tuple(bias.shape)}")
    q, k, v = bias.chunk(3)  # each [W]
    if torch.count_nonzero(k).item():
        raise WeightImportError(f"{key}: the k part of the fused bias is non-zero (max |k| = "
                                f"{k.abs().max().item():.3g}); EVA's k bias is fixed at zero and cannot hold it")
    return {ours + "attn.q_bias": q, ours + "attn.v_bias": v}


def _take_qformer(src: _Source, cfg: QFormerConfig, *, layer_prefix: str, attn_inner: str, embed_ln: str,
                  query_tokens_key: Optional[str]) -> Tensors:
    """BERT-style Q-Former keys → QFormer tensors; LAVIS and HF differ only in the arguments.

    Args:
        layer_prefix: e.g. ``"Qformer.bert.encoder.layer."`` (LAVIS) or ``"qformer.encoder.layer."`` (HF).
        attn_inner: the inner attention module name, ``"self"`` (LAVIS) or ``"attention"`` (HF).
        embed_ln: prefix of the embeddings LayerNorm.
        query_tokens_key: key of ``query_tokens``, or None when the file has none (bare HF Q-Former).
    """
    out: Tensors = {}
    if query_tokens_key is not None:
        out["query_tokens"] = src.take(query_tokens_key)
    for p in _WB:
        out[f"layernorm.{p}"] = src.take(f"{embed_ln}.{p}")
    for i in range(cfg.layers):
        ours, theirs = f"layers.{i}.", f"{layer_prefix}{i}."
        pairs = {"self_attn": "attention"}
        if i % cfg.cross_attention_freq == 0:
            pairs["cross_attn"] = "crossattention"
        names: dict[str, str] = {}
        for our_attn, their_attn in pairs.items():
            for proj in ("query", "key", "value"):
                names[f"{our_attn}.{proj}"] = f"{their_attn}.{attn_inner}.{proj}"
            names[f"{our_attn}.dense"] = f"{their_attn}.output.dense"
            names[f"{our_attn}.norm"] = f"{their_attn}.output.LayerNorm"
        names.update({"ffn.fc1": "intermediate_query.dense", "ffn.fc2": "output_query.dense",
                      "ffn.norm": "output_query.LayerNorm"})
        for our_name, their_name in names.items():
            for p in _WB:
                out[f"{ours}{our_name}.{p}"] = src.take(f"{theirs}{their_name}.{p}")
    return out


def convert_eva_vit_lavis(sd: Tensors, cfg: VisionConfig,
                          name: str = "LAVIS eva_vit_g") -> tuple[Tensors, ImportReport]:
    """LAVIS ``eva_vit_g.pth`` → tensors for :class:`~tinygptv.model.vision.EVAViT` (same keys).

    Blocks with index ``>= cfg.depth`` and a final ``norm``/``fc_norm``/``head`` go to ``report.ignored``;
    ``pos_embed`` is bicubic-interpolated when the file's grid differs from ``cfg.grid``.
    """
    src = _Source(sd, name)
    out, ignore = _take_eva_lavis(src, cfg, "")
    return out, src.finish(ignore)


def convert_blip2_lavis(sd: Tensors, vision_cfg: VisionConfig, qformer_cfg: QFormerConfig, *,
                        include_vit: bool = False,
                        name: str = "LAVIS BLIP-2") -> tuple[Tensors, Tensors, ImportReport]:
    """LAVIS BLIP-2 checkpoint (unwrapped ``["model"]``) → ``(vision_tensors, qformer_tensors, report)``.

    ``vision_tensors`` holds ``ln_vision.*`` and, with ``include_vit``, the ViT as ``vit.*`` (from
    ``visual_encoder.*``; otherwise those keys are ignored). Text-branch keys are ignored (see
    :data:`LAVIS_BLIP2_IGNORE`).
    """
    src = _Source(sd, name)
    vision: Tensors = {f"ln_vision.{p}": src.take(f"ln_vision.{p}") for p in _WB}
    ignore = list(LAVIS_BLIP2_IGNORE)
    if include_vit:
        vit, vit_ignore = _take_eva_lavis(src, vision_cfg, "visual_encoder.")
        vision.update({"vit." + k: v for k, v in vit.items()})
        ignore += vit_ignore
    else:
        ignore.append(r"visual_encoder\..*")
    qformer = _take_qformer(src, qformer_cfg, layer_prefix="Qformer.bert.encoder.layer.", attn_inner="self",
                            embed_ln="Qformer.bert.embeddings.LayerNorm", query_tokens_key="query_tokens")
    return vision, qformer, src.finish(ignore)


def convert_blip2_hf(sd: Tensors, vision_cfg: VisionConfig, qformer_cfg: QFormerConfig,
                     name: str = "HF BLIP-2") -> tuple[Tensors, Tensors, ImportReport]:
    """HF ``Blip2ForConditionalGeneration``/``Blip2Model`` weights → ``(vision_tensors, qformer_tensors, report)``.

    ``vision_model.post_layernorm`` becomes our ``ln_vision`` (HF applies it to every token). The fused
    ``qkv.bias`` is split into ``q_bias``/``v_bias``; a non-zero k part raises. Extra vision layers
    beyond ``vision_cfg.depth`` are *unexpected* here (HF applies ``post_layernorm`` after its last layer).
    """
    src = _Source(sd, name)
    vision = _take_hf_vision(src, vision_cfg, "vision_model.")
    qformer = _take_qformer(src, qformer_cfg, layer_prefix="qformer.encoder.layer.", attn_inner="attention",
                            embed_ln="qformer.layernorm", query_tokens_key="query_tokens")
    return vision, qformer, src.finish(HF_BLIP2_IGNORE)


def convert_hf_vision_model(sd: Tensors, cfg: VisionConfig,
                            name: str = "HF Blip2VisionModel") -> tuple[Tensors, ImportReport]:
    """Bare HF ``Blip2VisionModel`` state dict (``embeddings.*``, ``encoder.layers.*``, ``post_layernorm.*``)."""
    src = _Source(sd, name)
    out = _take_hf_vision(src, cfg, "")
    return out, src.finish(())


def convert_hf_qformer_model(sd: Tensors, cfg: QFormerConfig,
                             name: str = "HF Blip2QFormerModel") -> tuple[Tensors, ImportReport]:
    """Bare HF ``Blip2QFormerModel`` state dict (``layernorm.*``, ``encoder.layer.*``).

    Such a file has no ``query_tokens``; assign with ``absent_ok=["query_tokens"]`` and load them separately.
    """
    src = _Source(sd, name)
    out = _take_qformer(src, cfg, layer_prefix="encoder.layer.", attn_inner="attention", embed_ln="layernorm",
                        query_tokens_key=None)
    return out, src.finish([r"encoder\.layer\.\d+\.(intermediate|output)\..*"])
