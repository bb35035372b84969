"""Import of TinyGPT-V stage checkpoints (``TinyGPT-V_for_Stage{1..4}.pth``, reference §2.4, §3.2–3.4).

A stage checkpoint is a ``torch.save`` dict whose ``"model"`` entry holds only the *trainable* parameters
(plus persistent buffers) of upstream's model; ``optimizer`` / ``config`` / ``scaler`` / ``epoch`` are not
weights and are ignored. It is applied on top of already-loaded base weights (Phi-2, EVA ViT, BLIP-2).

Key spellings accepted (§2.4, §2.5, §3.4)::

    llama_model.base_model.model.model.layers.N.self_attn.query_key_value.lora_A.weight          peft 0.2.0
    llama_model.base_model.model.model.layers.N.self_attn.query_key_value.lora_A.default.weight  peft ≥ 0.3
    llama_model.model.layers.N.input_layernorm.weight                                            lora_r = 0
    ...self_attn.{q,k}_layernorm.{weight,bias}  ...post_layernorm.weight  ...model.final_layernorm.*
    llama_proj.{weight,bias} → projector.proj1.*      llama_proj2.{weight,bias} → projector.proj2.*

v0 stage-4 files also carry the trainable Q-Former (``Qformer.bert.*``, ``query_tokens``, §0.3); those
are returned untouched, with their LAVIS names, for the BLIP-2 converter. Upstream loaded these files
with ``strict=False`` and silently dropped LoRA when the key spelling or the rank did not match; here a
LoRA model fed a LoRA-less, partial-LoRA or different-rank file is a :class:`WeightImportError`.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Sequence

import torch

from tinygptv.weights.common import ImportReport, KeyMapper, Tensors, WeightImportError, read_tensor_file
from tinygptv.weights.phi import rename_fused_key

log = logging.getLogger(__name__)

_LM_PREFIXES = (("llama_model.base_model.model.", "peft"), ("llama_model.", "plain"))

_LORA = re.compile(
    r"model\.layers\.(\d+)\.(self_attn\.query_key_value|self_attn\.dense|mlp\.fc1|mlp\.fc2)"
    r"\.lora_([AB])(\.default)?\.weight"
)
_BASE_LAYER = re.compile(
    r"(model\.layers\.\d+\.(?:self_attn\.(?:query_key_value|dense)|mlp\.fc[12]))\.base_layer\.(weight|bias)"
)
_LAYER_INDEX = re.compile(r"model\.layers\.(\d+)\.")
_TARGET_NAMES = {"self_attn.query_key_value": "qkv", "self_attn.dense": "dense", "mlp.fc1": "fc1", "mlp.fc2": "fc2"}
_TARGET_PATHS = {"qkv": "attn.qkv", "dense": "attn.dense", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
_PROJECTOR = {"llama_proj.weight": "projector.proj1.weight", "llama_proj.bias": "projector.proj1.bias",
              "llama_proj2.weight": "projector.proj2.weight", "llama_proj2.bias": "projector.proj2.bias"}
_QFORMER = re.compile(r"Qformer\..+|query_tokens")
_QFORMER_BUFFERS = re.compile(r"Qformer\.bert\.embeddings\.position_ids")

#: Source keys that are persistent buffers or caches, not learned weights.
STAGE_IGNORABLE: tuple[str, ...] = (
    _QFORMER_BUFFERS.pattern,
    r"llama_model\.(base_model\.model\.)?model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",
)


def convert_stage_checkpoint(sd: Tensors, lora_r_expected: int, *, num_layers: int | None = None,
                             lora_targets: Sequence[str] | None = None,
                             name: str = "stage checkpoint") -> tuple[Tensors, Tensors, dict[str, Any], ImportReport]:
    """Map a stage checkpoint's ``"model"`` state dict to our model's keys.

    Args:
        sd: the ``"model"`` dict (a leading DDP ``module.`` is stripped).
        lora_r_expected: the LoRA rank of the model being loaded (0 = no LoRA).
        num_layers, lora_targets: when given, LoRA must cover exactly these layers / targets (names of
            :data:`tinygptv.config.LORA_TARGETS`); otherwise the layers and targets seen in the file.
    Returns:
        ``(tensors, qformer_raw, info, report)``: ``tensors`` keyed relative to the whole model
        (``lm.…``, ``projector.…``); ``qformer_raw`` the ``Qformer.*`` / ``query_tokens`` entries with
        their LAVIS names (empty unless the file trained the Q-Former, v0 stage 4); ``info`` with
        ``lora_r`` (inferred, 0 if none), ``lora_targets``, ``key_style``, ``layers``, ``has_qformer``.
    Raises:
        WeightImportError: unrecognised keys, two keys for one target, the model has LoRA but the file has
        none, LoRA missing for some layers/targets, or a rank differing from ``lora_r_expected``.
    """
    sd = _strip_module(sd)
    km = KeyMapper(sd, name)
    tensors: Tensors = {}
    origin: dict[str, str] = {}
    duplicates: list[str] = []
    lora: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    prefixes: set[str] = set()
    lora_styles: set[str] = set()
    layers_seen: set[int] = set()

    def put(src: str, dst: str, value: torch.Tensor) -> None:
        if dst in tensors:
            duplicates.append(f"{origin[dst]} and {src} → {dst}")
            return
        tensors[dst] = value
        origin[dst] = src

    for key in sorted(sd):
        if key in _PROJECTOR:
            put(key, _PROJECTOR[key], km.take(key))
            continue
        lm_key, style = _strip_lm_prefix(key)
        if lm_key is None:
            continue
        prefixes.add(style)
        m = _LORA.fullmatch(lm_key)
        if m is not None:
            layer, target = int(m.group(1)), _TARGET_NAMES[m.group(2)]
            lora_styles.add("peft-default" if m.group(4) else "peft-0.2")
            value = km.take(key)
            put(key, f"lm.layers.{layer}.{_TARGET_PATHS[target]}.lora_{m.group(3)}", value)
            lora.setdefault((layer, target), {})[m.group(3)] = value
            layers_seen.add(layer)
            continue
        base = _BASE_LAYER.fullmatch(lm_key)
        ours = rename_fused_key(f"{base.group(1)}.{base.group(2)}" if base else lm_key)
        if ours is None:
            continue
        put(key, f"lm.{ours}", km.take(key))
        idx = _LAYER_INDEX.match(lm_key)
        if idx:
            layers_seen.add(int(idx.group(1)))

    qformer_raw = _take_qformer(km, sd)
    report = km.finish(STAGE_IGNORABLE)
    problems: list[str] = []
    if report.unexpected:
        more = " …" if len(report.unexpected) > 20 else ""
        problems.append(f"unrecognised key(s) {report.unexpected[:20]}{more}")
    if len(prefixes) > 1:
        problems.append("keys mix the LoRA-wrapped prefix 'llama_model.base_model.model.' and the plain prefix "
                        "'llama_model.' (not a single upstream model's state dict)")
    if duplicates:
        problems.append("several source keys for one target: " + "; ".join(duplicates))
    lora_r, lora_problems = _check_lora(lora, lora_r_expected, prefixes, num_layers, lora_targets, layers_seen)
    problems.extend(lora_problems)
    if problems:
        raise WeightImportError(f"{name}: cannot import\n" + "\n".join(f"  - {p}" for p in problems))
    info: dict[str, Any] = {
        "lora_r": lora_r,
        "lora_targets": sorted({t for _, t in lora}),
        "key_style": _key_style(prefixes, lora_styles),
        "layers": len(layers_seen),
        "has_qformer": bool(qformer_raw),
        "num_tensors": len(tensors),
    }
    log.info("%s: %d tensors (LoRA r=%d on %s, key style %s), %d Q-Former tensors, %d ignored",
             name, len(tensors), lora_r, info["lora_targets"], info["key_style"], len(qformer_raw), len(report.ignored))
    return tensors, qformer_raw, info, report


def load_stage_checkpoint(path: str | Path, lora_r_expected: int, *, num_layers: int | None = None,
                          lora_targets: Sequence[str] | None = None
                          ) -> tuple[Tensors, Tensors, dict[str, Any], ImportReport]:
    """Read a ``TinyGPT-V_for_Stage*.pth`` (``weights_only`` load, ``"model"`` entry) and convert it."""
    sd = read_tensor_file(path)
    return convert_stage_checkpoint(sd, lora_r_expected, num_layers=num_layers, lora_targets=lora_targets,
                                    name=str(path))


def _strip_module(sd: Tensors) -> Tensors:
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _strip_lm_prefix(key: str) -> tuple[str | None, str]:
    for prefix, style in _LM_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):], style
    return None, ""


def _key_style(prefixes: set[str], lora_styles: set[str]) -> str:
    if lora_styles:
        return "+".join(sorted(lora_styles))
    if "plain" in prefixes:
        return "no-lora"
    return "peft-no-adapters" if prefixes else "no-lm"


def _take_qformer(km: KeyMapper, sd: Tensors) -> Tensors:
    keys = [k for k in sd if _QFORMER.fullmatch(k)]
    if not any(not _QFORMER_BUFFERS.fullmatch(k) for k in keys):
        return {}  # only persistent buffers: nothing was trained (v1), they are ignorable
    return {k: km.take(k) for k in sorted(keys)}


def _check_lora(lora: dict[tuple[int, str], dict[str, torch.Tensor]], r_expected: int, prefixes: set[str],
                num_layers: int | None, targets: Sequence[str] | None, layers_seen: set[int]) -> tuple[int, list[str]]:
    problems: list[str] = []
    if not lora:
        if r_expected > 0:
            why = ("its keys use the non-LoRA prefix 'llama_model.model.' (trained with lora_r=0)"
                   if "plain" in prefixes else "no lora_A/lora_B keys were found")
            problems.append(f"the model has LoRA (r={r_expected}) but the checkpoint has none: {why}; loading it would "
                            f"leave the adapters at their initial values")
        return 0, problems
    ranks: dict[int, list[str]] = {}
    for (layer, target), ab in sorted(lora.items()):
        if "A" in ab:
            ranks.setdefault(int(ab["A"].shape[0]), []).append(f"layers.{layer}.{target}.lora_A")
        if "B" in ab:
            ranks.setdefault(int(ab["B"].shape[-1]), []).append(f"layers.{layer}.{target}.lora_B")
    if len(ranks) > 1:
        detail = "; ".join(f"r={r}: {names[:4]}" for r, names in sorted(ranks.items()))
        problems.append(f"LoRA ranks differ between tensors ({detail})")
    r = max(ranks, key=lambda k: len(ranks[k]))
    if r != r_expected:
        problems.append(f"LoRA rank in the checkpoint is {r} but the model's is {r_expected}"
                        if r_expected else f"the checkpoint has LoRA (r={r}) but the model has none (lora.r=0)")
    want_layers = range(num_layers) if num_layers is not None else sorted(layers_seen | {la for la, _ in lora})
    want_targets = list(targets) if targets is not None else sorted({t for _, t in lora})
    absent = [f"layers.{la}.{t}.lora_{ab}" for la in want_layers for t in want_targets
              for ab in "AB" if ab not in lora.get((la, t), {})]
    if absent:
        problems.append(f"LoRA only partially present: missing {len(absent)} tensor(s): {absent[:20]}"
                        + (" …" if len(absent) > 20 else ""))
    extra = sorted(f"layers.{la}.{t}" for la, t in lora
                   if t not in want_targets or la not in want_layers)
    if extra:
        problems.append(f"LoRA present for module(s) the model does not adapt: {extra[:20]}")
    return r, problems


__all__ = ["convert_stage_checkpoint", "load_stage_checkpoint", "STAGE_IGNORABLE"]
