"""Import and export of Phi decoder weights (reference §1.6, §2.1–2.3, §3.1).

Three on-disk layouts are read into :class:`tinygptv.model.phi.PhiLM`:

``fused``
    transformers-4.36 ``PhiForCausalLM`` (what upstream TinyGPT-V loads, §3.1):
    ``model.layers.N.self_attn.query_key_value.*`` with per-head interleaved rows
    (row = head·3D + t·D + d, t ∈ {q,k,v}) — exactly our ``attn.qkv`` order, copied as is.
    The TinyGPT-V patched variant (§2.1) adds ``self_attn.{q,k}_layernorm.*`` and ``post_layernorm.weight``.
``split``
    current transformers (≥ 4.37) ``q_proj / k_proj / v_proj``; fused here as
    ``stack([q, k, v] each viewed [H, D, C], dim=1).reshape(3C, C)`` (§3.1). ``qk_layernorm=True``
    files carry ``self_attn.{q,k}_layernorm.*``.
``msft``
    Microsoft remote code ("phi-msft"): ``transformer.h.N.mixer.Wqkv`` with block rows
    ``[all q; all k; all v]`` (re-ordered to per-head), ``mixer.out_proj``, ``ln``, ``lm_head.ln`` /
    ``lm_head.linear``.

The public Phi files lack the TinyGPT-V additions (per-head QK LayerNorm, post-attention RMSNorm) and
LoRA; :data:`PHI_ABSENT_OK` lists those target keys for :func:`~tinygptv.weights.common.assign_tensors`
(they keep their §2.3 initial values). Conversion is strict: every source key is consumed or known to be
ignorable (rotary caches), every expected key must exist, every shape must match — otherwise a
:class:`~tinygptv.weights.common.WeightImportError` names the keys.

:func:`export_hf_phi` writes the inverse (LoRA merged into copies of the weights) either as the current
``split`` layout, loadable by ``transformers.PhiForCausalLM.from_pretrained`` when the model has no
post-attention RMSNorm, or as the ``fused`` TinyGPT-V-patched 4.36 layout.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import torch

from tinygptv.config import LMConfig
from tinygptv.model.lora import LoRALinear
from tinygptv.model.phi import PhiLM
from tinygptv.weights.common import (
    ImportReport,
    KeyMapper,
    Tensors,
    WeightImportError,
    read_hf_folder,
)

log = logging.getLogger(__name__)

Layout = Literal["fused", "split", "msft"]

#: Target keys of :class:`PhiLM` (relative to it) that public Phi checkpoints do not contain: the
#: TinyGPT-V QK LayerNorms and post-attention RMSNorm (reference §2.3) and LoRA adapters (§2.5).
PHI_ABSENT_OK: tuple[str, ...] = (
    r"layers\.\d+\.attn\.[qk]_norm\.(weight|bias)",
    r"layers\.\d+\.post_attn_norm\.weight",
    r"layers\.\d+\.(attn\.(qkv|dense)|mlp\.fc[12])\.lora_[AB]",
)

#: Source keys that carry no learned information: rotary caches saved by transformers ≤ 4.36 ``.bin``
#: files and by the Microsoft remote code.
PHI_IGNORABLE: tuple[str, ...] = (
    r"(model\.layers|transformer\.h)\.\d+\.(self_attn|mixer)\.rotary_emb\."
    r"(inv_freq|cos_cached|sin_cached|_cos_cached|_sin_cached)",
    r"model\.rotary_emb\.inv_freq",
)

_LAYOUT_MARKERS: dict[str, re.Pattern[str]] = {
    "fused": re.compile(r"model\.layers\.\d+\.self_attn\.query_key_value\.weight"),
    "split": re.compile(r"model\.layers\.\d+\.self_attn\.q_proj\.weight"),
    "msft": re.compile(r"transformer\.h\.\d+\.mixer\.Wqkv\.weight"),
}

_SUPPORTED_ACTS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def phi_absent_ok(prefix: str = "") -> list[str]:
    """:data:`PHI_ABSENT_OK` with ``prefix`` (e.g. ``"lm."`` when assigning into the whole model)."""
    return [re.escape(prefix) + p for p in PHI_ABSENT_OK]


def detect_phi_layout(keys: Iterable[str]) -> Layout:
    """Which Phi checkpoint layout ``keys`` use: ``"fused"``, ``"split"`` or ``"msft"`` (module docstring)."""
    keys = list(keys)
    found = [name for name, pat in _LAYOUT_MARKERS.items() if any(pat.fullmatch(k) for k in keys)]
    if len(found) == 1:
        return found[0]  # type: ignore[return-value]
    shown = ", ".join(sorted(keys)[:8]) + (", …" if len(keys) > 8 else "")
    if len(found) > 1:
        raise WeightImportError(f"ambiguous Phi checkpoint: keys of several layouts {found} present (e.g. {shown})")
    hint = ""
    if any(k.startswith("llama_model.") for k in keys):
        hint = " — this looks like a TinyGPT-V stage checkpoint; use tinygptv.weights.stage"
    elif any(re.fullmatch(r"layers\.\d+\.mixer\.Wqkv\.weight", k) for k in keys):
        hint = " — this is the early MixFormer-sequential phi format, which is not supported"
    raise WeightImportError(
        f"unrecognised Phi checkpoint layout ({len(keys)} keys, e.g. {shown}); expected transformers-4.36 "
        f"'query_key_value', current 'q_proj/k_proj/v_proj' or Microsoft 'transformer.h.N.mixer.Wqkv' keys{hint}"
    )


# ----------------------------------------------------------------------------------------------- config


def lm_config_from_hf(config_json: dict[str, Any], qk_norm: bool = True, post_attn_norm: bool = True) -> LMConfig:
    """Build an :class:`LMConfig` from a HF ``PhiConfig`` or Microsoft "phi-msft" ``config.json`` dict.

    ``qk_norm`` / ``post_attn_norm`` (the TinyGPT-V additions, §2.1) are the caller's choice; a
    ``qk_layernorm: true`` config (whose weights include trained QK norms) requires ``qk_norm=True``.
    Raises :class:`WeightImportError` for other architectures or Phi variants this decoder cannot express.
    """
    model_type = config_json.get("model_type")
    if "n_embd" in config_json and model_type in (None, "phi", "phi-msft"):
        cfg = _msft_fields(config_json)
    elif "hidden_size" in config_json and model_type in (None, "phi"):
        cfg = _hf_fields(config_json)
        if config_json.get("qk_layernorm") and not qk_norm:
            raise WeightImportError("config.json has qk_layernorm=true (weights include QK LayerNorms) but "
                                    "qk_norm=False was requested; the imported model would differ")
    else:
        arch = config_json.get("architectures")
        raise WeightImportError(f"config.json describes model_type={model_type!r} architectures={arch!r}; "
                                f"expected a Phi config ('phi' with hidden_size… or 'phi-msft' with n_embd…)")
    return LMConfig(**cfg, qk_norm=qk_norm, post_attn_norm=post_attn_norm)


def _require(config_json: dict[str, Any], *names: str) -> list[Any]:
    missing = [n for n in names if config_json.get(n) is None]
    if missing:
        raise WeightImportError(f"config.json lacks required field(s) {missing}")
    return [config_json[n] for n in names]


def _hf_fields(c: dict[str, Any]) -> dict[str, Any]:
    vocab, hidden, layers, heads, inter = _require(
        c, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    kv = c.get("num_key_value_heads")
    if kv is not None and kv != heads:
        raise WeightImportError(f"config.json num_key_value_heads={kv} != num_attention_heads={heads}: "
                                f"grouped-query attention is not supported")
    head_dim = c.get("head_dim")
    if head_dim is not None and head_dim * heads != hidden:
        raise WeightImportError(f"config.json head_dim={head_dim} is not hidden_size/num_attention_heads")
    _check_act(c.get("hidden_act", "gelu_new"), "hidden_act")
    if c.get("tie_word_embeddings"):
        raise WeightImportError("config.json has tie_word_embeddings=true; Phi's lm_head is a separate Linear")
    rope = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if scaling or rope_type != "default":
        raise WeightImportError(f"config.json uses RoPE scaling ({scaling or rope}); only plain RoPE is supported")
    out = _common_fields(c, vocab, hidden, layers, heads, inter)
    out["partial_rotary_factor"] = float(rope.get("partial_rotary_factor", c.get("partial_rotary_factor", 0.5)))
    out["rope_theta"] = float(rope.get("rope_theta", c.get("rope_theta", 10000.0)))
    out["max_position_embeddings"] = int(c.get("max_position_embeddings", 2048))
    out["ln_eps"] = float(c.get("layer_norm_eps", 1e-5))
    return out


def _msft_fields(c: dict[str, Any]) -> dict[str, Any]:
    vocab, hidden, layers, heads = _require(c, "vocab_size", "n_embd", "n_layer", "n_head")
    inter = c.get("n_inner") or 4 * hidden
    kv = c.get("n_head_kv")
    if kv is not None and kv != heads:
        raise WeightImportError(f"config.json n_head_kv={kv} != n_head={heads}: "
                                f"grouped-query attention is not supported")
    _check_act(c.get("activation_function", "gelu_new"), "activation_function")
    if c.get("tie_word_embeddings"):
        raise WeightImportError("config.json has tie_word_embeddings=true; Phi's lm_head is a separate Linear")
    out = _common_fields(c, vocab, hidden, layers, heads, inter)
    head_dim = hidden // heads
    out["partial_rotary_factor"] = int(c.get("rotary_dim", 32)) / head_dim
    out["rope_theta"] = float(c.get("rope_theta", 10000.0))
    out["max_position_embeddings"] = int(c.get("n_positions", 2048))
    out["ln_eps"] = float(c.get("layer_norm_epsilon", 1e-5))
    return out


def _common_fields(c: dict[str, Any], vocab: int, hidden: int, layers: int, heads: int, inter: int) -> dict[str, Any]:
    out: dict[str, Any] = dict(vocab_size=int(vocab), hidden=int(hidden), layers=int(layers), heads=int(heads),
                               mlp_dim=int(inter), resid_dropout=float(c.get("resid_pdrop", 0.0)),
                               embd_dropout=float(c.get("embd_pdrop", 0.0)))
    for ours, theirs in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
        if isinstance(c.get(theirs), int):
            out[ours] = c[theirs]
    pad = c.get("pad_token_id")
    if isinstance(pad, int):
        out["pad_token_id"] = pad
    elif "eos_token_id" in out:
        out["pad_token_id"] = out["eos_token_id"]  # TinyGPT-V: pad = eos (§1.6)
    return out


def _check_act(act: str, field: str) -> None:
    if act not in _SUPPORTED_ACTS:
        raise WeightImportError(f"config.json {field}={act!r}; this decoder implements tanh-GELU ({_SUPPORTED_ACTS})")


def _check_cfg_matches(cfg: LMConfig, file_cfg: LMConfig, folder: Path) -> None:
    fields = ("vocab_size", "hidden", "layers", "heads", "mlp_dim", "partial_rotary_factor")
    diff = [f"{f}: config {getattr(cfg, f)} vs {folder}/config.json {getattr(file_cfg, f)}"
            for f in fields if getattr(cfg, f) != getattr(file_cfg, f)]
    if diff:
        raise WeightImportError("LM config does not match the checkpoint's config.json: " + "; ".join(diff))


# ----------------------------------------------------------------------------------------------- import


def _target_shapes(cfg: LMConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        lm = PhiLM(cfg)
    return {k: tuple(v.shape) for k, v in lm.state_dict().items()}


def fuse_split_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """``q_proj/k_proj/v_proj`` weights ``[C,in]`` (or biases ``[C]``) → per-head interleaved ``[3C,…]`` (§3.1)."""
    d = q.shape[0] // heads
    rest = q.shape[1:]
    return torch.stack([t.reshape(heads, d, *rest) for t in (q, k, v)], dim=1).reshape(3 * q.shape[0], *rest)


def split_fused_qkv(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_split_qkv`."""
    c = qkv.shape[0] // 3
    per_head = qkv.reshape(heads, 3, c // heads, *qkv.shape[1:])
    q, k, v = (per_head[:, t].reshape(c, *qkv.shape[1:]).contiguous() for t in range(3))
    return q, k, v


def block_to_head_qkv(wqkv: torch.Tensor, heads: int) -> torch.Tensor:
    """Microsoft ``Wqkv`` rows ``[all q; all k; all v]`` → per-head interleaved rows."""
    c = wqkv.shape[0] // 3
    return wqkv.reshape(3, heads, c // heads, *wqkv.shape[1:]).transpose(0, 1).reshape(wqkv.shape)


class _Converter:
    """Pulls source tensors through a :class:`KeyMapper`, collecting missing keys and shape errors."""

    def __init__(self, km: KeyMapper, cfg: LMConfig):
        self.km = km
        self.cfg = cfg
        self.shapes = _target_shapes(cfg)
        self.out: Tensors = {}
        self.missing: list[str] = []
        self.shape_errors: list[str] = []

    def get(self, key: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        if key not in self.km:
            self.missing.append(key)
            return None
        t = self.km.take(key)
        if tuple(t.shape) != tuple(shape):
            self.shape_errors.append(f"{key}: file {tuple(t.shape)} vs expected {tuple(shape)}")
            return None
        return t

    def copy(self, src: str, dst: str) -> None:
        t = self.get(src, self.shapes[dst])
        if t is not None:
            self.out[dst] = t

    def combine(self, srcs: list[str], dst: str, shapes: list[tuple[int, ...]],
                fn: Callable[..., torch.Tensor]) -> None:
        ts = [self.get(s, sh) for s, sh in zip(srcs, shapes)]
        if all(t is not None for t in ts):
            self.out[dst] = fn(*ts)


def _has_any(keys: Iterable[str], pattern: str) -> bool:
    pat = re.compile(pattern)
    return any(pat.fullmatch(k) for k in keys)


def convert_phi(sd: Tensors, cfg: LMConfig, name: str = "phi checkpoint") -> tuple[Tensors, ImportReport]:
    """Convert a Phi state dict of any supported layout to :class:`PhiLM` keys.

    Returns ``(tensors, report)``; ``report`` lists ignored source keys (rotary caches). Raises
    :class:`WeightImportError` naming every missing, unexpected or mis-shaped source key. QK LayerNorms
    (``self_attn.{q,k}_layernorm``) and ``post_layernorm`` are imported when the file has them; when
    ``cfg`` lacks the matching module they are reported as unexpected.
    """
    layout = detect_phi_layout(sd)
    km = KeyMapper(sd, f"{name} ({layout} layout)")
    conv = _Converter(km, cfg)
    C, H = cfg.hidden, cfg.heads
    hints: list[str] = []
    if layout == "msft":
        _convert_msft(conv)
    else:
        hints = _convert_hf(conv, sd, layout)
    report = km.finish(PHI_IGNORABLE)
    report.missing.extend(conv.missing)
    report.shape_errors.extend(conv.shape_errors)
    if not report.ok:
        lines = [f"{km.name}: cannot convert"]
        for label, keys in (("missing", report.missing), ("unexpected", report.unexpected),
                            ("shape mismatch", report.shape_errors)):
            if keys:
                lines.append(f"  {label} ({len(keys)}): " + ", ".join(keys[:20]) + (" …" if len(keys) > 20 else ""))
        raise WeightImportError("\n".join([*lines, *hints]))
    log.info("%s: %d tensors converted (%s layout, %d heads × %d), %d source keys ignored",
             name, len(conv.out), layout, H, C // H, len(report.ignored))
    return conv.out, report


def _convert_hf(conv: _Converter, sd: Tensors, layout: str) -> list[str]:
    cfg = conv.cfg
    C, H = cfg.hidden, cfg.heads
    hints = []
    has_qk = _has_any(sd, r"model\.layers\.\d+\.self_attn\.[qk]_layernorm\.(weight|bias)")
    has_post = _has_any(sd, r"model\.layers\.\d+\.post_layernorm\.weight")
    if has_qk and not cfg.qk_norm:
        hints.append("hint: the file carries QK LayerNorms (self_attn.q_layernorm/k_layernorm) but lm.qk_norm is off")
    if has_post and not cfg.post_attn_norm:
        hints.append("hint: the file carries post_layernorm (TinyGPT-V RMSNorm) but lm.post_attn_norm is off")
    conv.copy("model.embed_tokens.weight", "embed_tokens.weight")
    for i in range(cfg.layers):
        s, d = f"model.layers.{i}.", f"layers.{i}."
        for wb in ("weight", "bias"):
            conv.copy(f"{s}input_layernorm.{wb}", f"{d}input_layernorm.{wb}")
            if layout == "fused":
                conv.copy(f"{s}self_attn.query_key_value.{wb}", f"{d}attn.qkv.{wb}")
            else:
                shape = (C, C) if wb == "weight" else (C,)
                conv.combine([f"{s}self_attn.{p}_proj.{wb}" for p in "qkv"], f"{d}attn.qkv.{wb}", [shape] * 3,
                             lambda q, k, v: fuse_split_qkv(q, k, v, H))
            conv.copy(f"{s}self_attn.dense.{wb}", f"{d}attn.dense.{wb}")
            conv.copy(f"{s}mlp.fc1.{wb}", f"{d}mlp.fc1.{wb}")
            conv.copy(f"{s}mlp.fc2.{wb}", f"{d}mlp.fc2.{wb}")
            if has_qk and cfg.qk_norm:
                conv.copy(f"{s}self_attn.q_layernorm.{wb}", f"{d}attn.q_norm.{wb}")
                conv.copy(f"{s}self_attn.k_layernorm.{wb}", f"{d}attn.k_norm.{wb}")
        if has_post and cfg.post_attn_norm:
            conv.copy(f"{s}post_layernorm.weight", f"{d}post_attn_norm.weight")
    for wb in ("weight", "bias"):
        conv.copy(f"model.final_layernorm.{wb}", f"final_layernorm.{wb}")
        conv.copy(f"lm_head.{wb}", f"lm_head.{wb}")
    return hints


def _convert_msft(conv: _Converter) -> None:
    cfg = conv.cfg
    H = cfg.heads
    conv.copy("transformer.embd.wte.weight", "embed_tokens.weight")
    for i in range(cfg.layers):
        s, d = f"transformer.h.{i}.", f"layers.{i}."
        for wb in ("weight", "bias"):
            conv.copy(f"{s}ln.{wb}", f"{d}input_layernorm.{wb}")
            conv.combine([f"{s}mixer.Wqkv.{wb}"], f"{d}attn.qkv.{wb}", [conv.shapes[f"{d}attn.qkv.{wb}"]],
                         lambda w: block_to_head_qkv(w, H))
            conv.copy(f"{s}mixer.out_proj.{wb}", f"{d}attn.dense.{wb}")
            conv.copy(f"{s}mlp.fc1.{wb}", f"{d}mlp.fc1.{wb}")
            conv.copy(f"{s}mlp.fc2.{wb}", f"{d}mlp.fc2.{wb}")
    for wb in ("weight", "bias"):
        conv.copy(f"lm_head.ln.{wb}", f"final_layernorm.{wb}")
        conv.copy(f"lm_head.linear.{wb}", f"lm_head.{wb}")


def load_phi_folder(folder: str | Path, cfg: LMConfig | None = None, qk_norm: bool = True,
                    post_attn_norm: bool = True) -> tuple[LMConfig, Tensors, ImportReport]:
    """Read a HF Phi folder (``config.json`` + single/sharded safetensors or ``.bin``) for :class:`PhiLM`.

    Without ``cfg`` the config is derived from ``config.json`` (:func:`lm_config_from_hf` with
    ``qk_norm`` / ``post_attn_norm``); with ``cfg`` it is checked against ``config.json`` when present.
    Assign the result with ``assign_tensors(lm, tensors, report, absent_ok=PHI_ABSENT_OK)``.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    file_cfg = None
    if config_path.is_file():
        file_cfg = lm_config_from_hf(json.loads(config_path.read_text()), qk_norm=qk_norm,
                                     post_attn_norm=post_attn_norm)
    if cfg is None:
        if file_cfg is None:
            raise WeightImportError(f"{folder}: no config.json and no LM config given")
        cfg = file_cfg
    elif file_cfg is not None:
        _check_cfg_matches(cfg, file_cfg, folder)
    tensors, report = convert_phi(read_hf_folder(folder), cfg, name=str(folder))
    return cfg, tensors, report


# ----------------------------------------------------------------------------------------------- export


def merged_lm_state_dict(lm: PhiLM) -> Tensors:
    """Detached copies of ``lm``'s weights with every LoRA adapter folded in; LoRA keys dropped.

    The live model is not modified (its ``merged`` flags and weights are untouched).
    """
    out: Tensors = {}
    with torch.no_grad():
        lora_weights = {f"{name}.weight": m for name, m in lm.named_modules() if isinstance(m, LoRALinear) and m.r > 0}
        for key, value in lm.state_dict().items():
            if re.search(r"\.lora_[AB]$", key):
                continue
            layer = lora_weights.get(key)
            if layer is not None and not layer.merged:
                value = (value.float() + layer.delta_weight()).to(value.dtype)
            out[key] = value.detach().clone()
    return out


def hf_phi_config(cfg: LMConfig, layout: Literal["split", "fused"] = "split",
                  dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """``config.json`` content for :func:`export_hf_phi` (``model_type: phi``, all dims, ``qk_layernorm``)."""
    out: dict[str, Any] = {
        "architectures": ["PhiForCausalLM"],
        "model_type": "phi",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "num_key_value_heads": cfg.heads,
        "hidden_act": "gelu_new",
        "max_position_embeddings": cfg.max_position_embeddings,
        "layer_norm_eps": cfg.ln_eps,
        "resid_pdrop": cfg.resid_dropout,
        "embd_pdrop": cfg.embd_dropout,
        "attention_dropout": 0.0,
        "partial_rotary_factor": cfg.partial_rotary_factor,
        "rope_theta": cfg.rope_theta,
        "qk_layernorm": cfg.qk_norm,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": None,  # as published for Phi-2; HF would make it the Embedding padding_idx (frozen row)
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if layout == "split":
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.rope_theta,
                                  "partial_rotary_factor": cfg.partial_rotary_factor}
    else:
        out["rope_scaling"] = None
    return out


def export_hf_phi(lm: PhiLM, folder: str | Path, layout: Literal["split", "fused"] = "split",
                  dtype: torch.dtype | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` for ``lm`` with LoRA merged (on copies).

    ``layout="split"``: current transformers layout (``q_proj/k_proj/v_proj``, ``q_layernorm`` /
    ``k_layernorm`` when ``lm.cfg.qk_norm``), loadable by ``PhiForCausalLM.from_pretrained``. HF Phi has
    no post-attention RMSNorm, so this requires ``lm.cfg.post_attn_norm`` off.
    ``layout="fused"``: transformers-4.36 ``query_key_value`` layout plus the TinyGPT-V additions
    ``q_layernorm``, ``k_layernorm``, ``post_layernorm`` (reference §2.1) — what upstream's patched
    ``modeling_phi.py`` loads (with post_attn_norm off it is plain 4.36 ``PhiForCausalLM``).
    ``dtype`` casts floating tensors (default: keep). Returns the folder.
    """
    cfg = lm.cfg
    if layout not in ("split", "fused"):
        raise ValueError(f"layout must be 'split' or 'fused', got {layout!r}")
    if layout == "split" and cfg.post_attn_norm:
        raise ValueError("cannot export layout='split': transformers' PhiForCausalLM has no post-attention RMSNorm "
                         "(TinyGPT-V post_layernorm, reference §2.1) and it cannot be folded into other weights; "
                         "export layout='fused' (for the TinyGPT-V patched modeling_phi.py) or use a model with "
                         "lm.post_attn_norm off")
    if layout == "fused" and cfg.post_attn_norm and not cfg.qk_norm:
        raise ValueError("cannot export layout='fused' with post_attn_norm on and qk_norm off: the TinyGPT-V patched "
                         "modeling_phi.py always creates q/k LayerNorms, which would be freshly initialised there")
    if cfg.post_attn_norm and cfg.rms_eps != 1e-6:
        log.warning("lm.rms_eps=%g but the patched modeling_phi.py hard-codes RMSNorm eps 1e-6", cfg.rms_eps)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stale = [p.name for p in (folder / "model.safetensors.index.json", folder / "pytorch_model.bin",
                              folder / "pytorch_model.bin.index.json") if p.exists()]
    if stale:
        raise FileExistsError(f"{folder} already holds {stale}, which loaders would prefer over the exported "
                              f"model.safetensors; export into an empty folder")
    ours = merged_lm_state_dict(lm)
    if dtype is not None:
        ours = {k: v.to(dtype) if v.is_floating_point() else v for k, v in ours.items()}
    out_dtype = dtype or lm.embed_tokens.weight.dtype
    hf = _to_hf_keys(ours, cfg, layout)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in hf.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hf_phi_config(cfg, layout, out_dtype), indent=2) + "\n")
    log.info("exported Phi (%s layout, %d tensors, LoRA merged) to %s", layout, len(hf), folder)
    return folder


def _to_hf_keys(ours: Tensors, cfg: LMConfig, layout: str) -> Tensors:
    hf: Tensors = {"model.embed_tokens.weight": ours["embed_tokens.weight"]}
    for i in range(cfg.layers):
        s, d = f"model.layers.{i}.", f"layers.{i}."
        for wb in ("weight", "bias"):
            hf[f"{s}input_layernorm.{wb}"] = ours[f"{d}input_layernorm.{wb}"]
            qkv = ours[f"{d}attn.qkv.{wb}"]
            if layout == "fused":
                hf[f"{s}self_attn.query_key_value.{wb}"] = qkv
            else:
                for p, t in zip("qkv", split_fused_qkv(qkv, cfg.heads)):
                    hf[f"{s}self_attn.{p}_proj.{wb}"] = t
            hf[f"{s}self_attn.dense.{wb}"] = ours[f"{d}attn.dense.{wb}"]
            hf[f"{s}mlp.fc1.{wb}"] = ours[f"{d}mlp.fc1.{wb}"]
            hf[f"{s}mlp.fc2.{wb}"] = ours[f"{d}mlp.fc2.{wb}"]
            if cfg.qk_norm:
                hf[f"{s}self_attn.q_layernorm.{wb}"] = ours[f"{d}attn.q_norm.{wb}"]
                hf[f"{s}self_attn.k_layernorm.{wb}"] = ours[f"{d}attn.k_norm.{wb}"]
        if cfg.post_attn_norm:
            hf[f"{s}post_layernorm.weight"] = ours[f"{d}post_attn_norm.weight"]
    for wb in ("weight", "bias"):
        hf[f"model.final_layernorm.{wb}"] = ours[f"final_layernorm.{wb}"]
        hf[f"lm_head.{wb}"] = ours[f"lm_head.{wb}"]
    return hf


_FUSED_RENAMES: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(p), r) for p, r in (
    (r"model\.embed_tokens\.weight", "embed_tokens.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.(weight|bias)", r"layers.\1.input_layernorm.\2"),
    (r"model\.layers\.(\d+)\.self_attn\.query_key_value\.(weight|bias)", r"layers.\1.attn.qkv.\2"),
    (r"model\.layers\.(\d+)\.self_attn\.dense\.(weight|bias)", r"layers.\1.attn.dense.\2"),
    (r"model\.layers\.(\d+)\.self_attn\.([qk])_layernorm\.(weight|bias)", r"layers.\1.attn.\2_norm.\3"),
    (r"model\.layers\.(\d+)\.post_layernorm\.weight", r"layers.\1.post_attn_norm.weight"),
    (r"model\.layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"layers.\1.mlp.\2.\3"),
    (r"model\.final_layernorm\.(weight|bias)", r"final_layernorm.\1"),
    (r"lm_head\.(weight|bias)", r"lm_head.\1"),
))


def rename_fused_key(key: str) -> str | None:
    """One transformers-4.36 / TinyGPT-V-patched Phi key → :class:`PhiLM` key, or ``None`` if not one."""
    for pat, repl in _FUSED_RENAMES:
        if pat.fullmatch(key):
            return pat.sub(repl, key)
    return None


__all__ = [
    "PHI_ABSENT_OK", "PHI_IGNORABLE", "phi_absent_ok", "detect_phi_layout", "lm_config_from_hf", "convert_phi",
    "load_phi_folder", "export_hf_phi", "hf_phi_config", "merged_lm_state_dict", "fuse_split_qkv",
    "split_fused_qkv", "block_to_head_qkv", "rename_fused_key",
]
