"""Our checkpoint folder and ``tinygptv.load``.

A checkpoint is a folder::

    config.yaml         ModelConfig (typed; unknown keys are an error)
    model.safetensors   every tensor, or only the trainable ones plus ``base:`` (see below)
    tokenizer.json      (optional)
    template.yaml       chat template the model was trained with

Models are built on the ``meta`` device and their tensors assigned from memory-mapped safetensors, so the
full ``tinygptv-phi2`` preset loads in seconds and never runs 3.9 B random initialisers. Loading is strict:
any missing, unexpected or mis-shaped tensor raises, naming it. Writes are atomic (temp folder + rename).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from tinygptv.config import PRESETS, ModelConfig, preset
from tinygptv.model.lora import LoRALinear
from tinygptv.model.phi import RMSNorm
from tinygptv.model.tinygptv import TinyGPTV
from tinygptv.templates import ChatTemplate, get_template
from tinygptv.tokenizer import Tokenizer
from tinygptv.weights.common import ImportReport, WeightImportError, assign_tensors

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
TEMPLATE_FILE = "template.yaml"


def build_empty(cfg: ModelConfig) -> TinyGPTV:
    """The model on the ``meta`` device: no memory, no initialisers (milliseconds even for 3.9 B)."""
    with torch.device("meta"):
        return TinyGPTV(cfg)


@torch.no_grad()
def init_random(model: TinyGPTV, seed: int = 0, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> TinyGPTV:
    """Materialise a meta model with cheap random weights: N(0, 0.02) matrices, zero biases, unit norms.

    LoRA-B starts at zero and the new norms at (1, 0) as in the reference (§2.3, §2.5).
    """
    model.to_empty(device=device)
    model.to(dtype)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (nn.LayerNorm, RMSNorm)):
            module.weight.fill_(1.0)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
            continue
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, LoRALinear) and name == "lora_B":
                p.zero_()
            elif name == "bias" or name.endswith("_bias"):
                p.zero_()
            elif isinstance(module, LoRALinear) and name == "lora_A":
                bound = 1.0 / math.sqrt(p.shape[1])
                p.copy_(torch.empty(p.shape).uniform_(-bound, bound, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(0.02).to(p.dtype))
    return model


def save(model: TinyGPTV, folder: str | Path, tokenizer: Tokenizer | None = None,
         template: ChatTemplate | None = None) -> Path:
    """Write a complete checkpoint folder atomically (unmerged LoRA, unfolded projector)."""
    from safetensors.torch import save_file

    if any(isinstance(m, LoRALinear) and m.merged for m in model.modules()):
        raise RuntimeError("LoRA is merged into the weights; call tinygptv.model.lora.unmerge_lora(model) first")
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.cfg.to_yaml(tmp / CONFIG_FILE)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "tinygptv", "name": model.cfg.name})
        tok = tokenizer or model.tokenizer
        if tok is not None:
            tok.save(tmp)
        (template or model.template).to_yaml(tmp / TEMPLATE_FILE)
        _replace_dir(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("saved checkpoint to %s", folder)
    return folder


def _replace_dir(src: Path, dst: Path) -> None:
    """Atomically put ``src`` at ``dst`` (an existing ``dst`` is moved aside first, then removed)."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def load(path_or_preset: str | Path | ModelConfig, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         tokenizer: str | Path | Tokenizer | None = None, seed: int = 0) -> TinyGPTV:
    """Load a checkpoint folder, or build a named preset (``tiny``, ``small``, ``tinygptv-phi2``…) with random weights.

    Args:
        path_or_preset: a folder written by :func:`save` / ``tinygptv import``, a ``config.yaml``, a preset name,
            or a :class:`ModelConfig` (random weights).
        dtype: cast floating weights (default: as stored; fp32 for random presets).
        tokenizer: a tokenizer folder / object overriding the checkpoint's; random presets without one get the
            byte-level tokenizer when their vocabulary is large enough.
    Returns:
        the model in eval mode, with ``tokenizer`` and ``template`` attached.
    """
    if isinstance(path_or_preset, ModelConfig):
        cfg = path_or_preset
    elif Path(path_or_preset).is_dir():
        cfg = None
        model = _load_folder(Path(path_or_preset), device, dtype)
    elif Path(path_or_preset).suffix in (".yaml", ".yml") and Path(path_or_preset).is_file():
        cfg = ModelConfig.from_yaml(path_or_preset)
    elif str(path_or_preset) in PRESETS:
        cfg = preset(str(path_or_preset))
    else:
        raise FileNotFoundError(f"{path_or_preset!r} is neither a checkpoint folder, a config.yaml, nor a preset "
                                f"({sorted(PRESETS)})")
    if cfg is not None:
        model = init_random(build_empty(cfg), seed, device, dtype or torch.float32)
    if isinstance(tokenizer, Tokenizer):
        model.tokenizer = tokenizer
    elif tokenizer is not None:
        model.tokenizer = Tokenizer.from_folder(tokenizer)
    if model.tokenizer is None:
        model.tokenizer = _default_tokenizer(model.cfg)
    return model.eval()


def _default_tokenizer(cfg: ModelConfig) -> Tokenizer | None:
    eos = cfg.lm.eos_token_id
    if cfg.lm.vocab_size >= 257 and eos <= 256:
        return Tokenizer.byte_level(eos_id=eos)
    log.warning("no tokenizer for this model; pass tokenizer=<Phi-2 folder> to generate text")
    return None


def _load_folder(folder: Path, device, dtype) -> TinyGPTV:
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder}: no {CONFIG_FILE}; is this a tinygptv checkpoint folder?")
    cfg = ModelConfig.from_yaml(cfg_path)
    model = build_empty(cfg)
    tensors = read_weights(folder / WEIGHTS_FILE)
    report = assign_tensors(model, tensors, ImportReport(source=str(folder / WEIGHTS_FILE)))
    report.raise_if_bad()
    model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    if (folder / "tokenizer.json").is_file():
        model.tokenizer = Tokenizer.from_folder(folder)
    if (folder / TEMPLATE_FILE).is_file():
        model.template = ChatTemplate.from_yaml(folder / TEMPLATE_FILE)
    return model


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Memory-mapped safetensors read with a clear error for truncated or foreign files."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"weights not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightImportError(f"{path}: cannot read safetensors ({exc}); the file may be truncated") from exc


__all__ = ["load", "save", "build_empty", "init_random", "get_template"]
