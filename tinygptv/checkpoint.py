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
import zlib
from pathlib import Path

import torch
import yaml
from torch import nn

from tinygptv.config import PRESETS, ModelConfig, preset
from tinygptv.model.lora import LoRALinear, merge_lora
from tinygptv.model.phi import RMSNorm
from tinygptv.model.tinygptv import TinyGPTV
from tinygptv.templates import ChatTemplate, get_template
from tinygptv.tokenizer import Tokenizer
from tinygptv.weights.common import ImportReport, WeightImportError

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
TEMPLATE_FILE = "template.yaml"
BASE_FILE = "base.yaml"  # trainable-only checkpoints: {base: relative path of the checkpoint they modify}
BUNDLED = {"nano": Path(__file__).parent / "assets" / "nano"}  # models shipped inside the package


def build_empty(cfg: ModelConfig) -> TinyGPTV:
    """The model on the ``meta`` device: no memory, no initialisers (milliseconds even for 3.9 B)."""
    with torch.device("meta"):
        return TinyGPTV(cfg)


class RandomSource:
    """Cheap random weights: N(0, 0.02) matrices, zero biases, unit norms; LoRA-B zero and LoRA-A
    Kaiming-uniform, the new norms at (1, 0), as the reference initialises them (§2.3, §2.5)."""

    name = "random init"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def take(self, key: str, like: torch.Tensor, module: nn.Module) -> torch.Tensor:
        """Deterministic per key (independent of the order tensors are requested in)."""
        gen = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + zlib.crc32(key.encode()))
        leaf = key.rsplit(".", 1)[-1]
        if isinstance(module, (nn.LayerNorm, RMSNorm)):
            return torch.ones(like.shape) if leaf == "weight" else torch.zeros(like.shape)
        if leaf == "lora_B" or leaf == "bias" or leaf.endswith("_bias"):
            return torch.zeros(like.shape)
        if leaf == "lora_A":
            bound = 1.0 / math.sqrt(like.shape[1])
            return torch.empty(like.shape).uniform_(-bound, bound, generator=gen)
        return torch.randn(like.shape, generator=gen).mul_(0.02)

    def unused(self) -> list[str]:
        return []


class ChainSource:
    """The first source that has a key wins: a trainable-only checkpoint on top of its base checkpoint."""

    def __init__(self, sources: list):
        self.sources = sources
        self.name = " + ".join(src.name for src in sources)
        self.all = set().union(*(getattr(src, "all", set()) for src in sources))

    def take(self, key: str, like: torch.Tensor, module: nn.Module) -> torch.Tensor:
        for src in self.sources:
            if key in src.all:
                return src.take(key, like, module)
        raise KeyError(key)

    def unused(self) -> list[str]:
        # keys of the top (delta) file must all be used; a base may carry tensors the delta replaced
        top, rest = self.sources[0], self.sources[1:]
        return sorted(set(top.unused()) | {k for src in rest for k in src.unused() if k not in top.all})


def folder_source(folder: Path):
    """The tensors of a checkpoint folder; a ``base.yaml`` makes it a delta over another checkpoint folder."""
    own = FileSource(folder / WEIGHTS_FILE)
    base_file = folder / BASE_FILE
    if not base_file.is_file():
        return own
    base = (folder / yaml.safe_load(base_file.read_text())["base"]).resolve()
    if not (base / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{folder}: its base checkpoint {base} is missing")
    return ChainSource([own, folder_source(base)])


class FileSource:
    """Tensors read one at a time from a safetensors file (so a quantized load never holds the fp model)."""

    def __init__(self, path: Path):
        from safetensors import SafetensorError, safe_open

        if not path.is_file():
            raise FileNotFoundError(f"weights not found: {path}")
        self.name = str(path)
        try:
            self.file = safe_open(str(path), framework="pt")
            self.all = set(self.file.keys())
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightImportError(f"{path}: cannot read safetensors ({exc}); the file may be truncated") from exc
        self.used: set[str] = set()

    def take(self, key: str, like: torch.Tensor, module: nn.Module) -> torch.Tensor:
        if key not in self.all:
            raise KeyError(key)
        self.used.add(key)
        try:
            return self.file.get_tensor(key)
        except Exception as exc:  # safetensors raises its own error types for corrupt data
            raise WeightImportError(f"{self.name}: cannot read tensor {key!r} ({exc}); the file may be "
                                    f"truncated") from exc

    def unused(self) -> list[str]:
        return sorted(self.all - self.used)


@torch.no_grad()
def materialize(cfg: ModelConfig, source, quant=None, dtype: torch.dtype | None = None,
                device: str | torch.device = "cpu") -> TinyGPTV:
    """Build ``cfg`` on ``meta`` and fill every tensor from ``source`` with strict accounting.

    With an ``int8``/``int4`` ``quant`` whose weights are not yet quantized in the source, each linear layer is
    read (LoRA merged), quantized and its floating-point weight dropped before the next one is read, so peak
    memory stays near the quantized size. A source that already holds quantized tensors is read as is.
    """
    from tinygptv.infer.quantize import QuantConfig, quantize_model

    model = build_empty(cfg)
    report = ImportReport(source=source.name)
    missing: list[str] = []

    def take(key: str, like: torch.Tensor, module: nn.Module) -> torch.Tensor | None:
        try:
            value = source.take(key, like, module)
        except KeyError:
            missing.append(key)
            return None
        if tuple(value.shape) != tuple(like.shape):
            report.shape_errors.append(f"{key}: file {tuple(value.shape)} vs model {tuple(like.shape)}")
            return None
        return value

    def fetch(name: str, lin: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        w = take(f"{name}.weight", lin.weight, lin)
        b = take(f"{name}.bias", lin.bias, lin) if getattr(lin, "bias", None) is not None else None
        if w is None:
            return None
        if isinstance(lin, LoRALinear) and lin.r > 0:
            a, bb = take(f"{name}.lora_A", lin.lora_A, lin), take(f"{name}.lora_B", lin.lora_B, lin)
            if a is not None and bb is not None:
                w = (w.float() + (bb.float() @ a.float()) * lin.scaling)
        return w, b

    if quant is not None:
        quant = QuantConfig(mode=quant) if isinstance(quant, str) else quant
        prequantized = any(k.endswith((".qweight", ".packed")) for k in getattr(source, "all", ()))
        quantize_model(model, quant, fetch=None if prequantized else fetch)
    # parameters and buffers as they are (``state_dict()`` would unpack every already-packed quantized weight)
    for key, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.device.type != "meta":
            continue
        *path, leaf = key.split(".")
        owner = model.get_submodule(".".join(path))
        value = take(key, t, owner)
        if value is None:
            continue
        value = value.to(device=device, dtype=t.dtype if not t.is_floating_point() or dtype is None else dtype)
        if isinstance(owner._parameters.get(leaf), nn.Parameter):
            owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
        else:
            owner._buffers[leaf] = value
        report.loaded.append(key)
    report.missing = missing
    report.unexpected = source.unused()
    report.raise_if_bad()
    for p in model.parameters():
        p.requires_grad_(True)
    model = model.to(device)
    if quant is not None and quant.mode in ("int8", "int4") and torch.device(device).type == "cpu":
        from tinygptv.infer.quantize import prepare_kernels

        prepare_kernels(model)
    return model


def init_random(cfg: ModelConfig, seed: int = 0, device: str | torch.device = "cpu",
                dtype: torch.dtype | None = None, quant=None) -> TinyGPTV:
    """A model of ``cfg`` with random weights (see :class:`RandomSource`), built tensor by tensor."""
    return materialize(cfg, RandomSource(seed), quant, dtype, device)


def save(model: TinyGPTV, folder: str | Path, tokenizer: Tokenizer | None = None,
         template: ChatTemplate | None = None, base: str | Path | None = None, include=(), extra=None) -> Path:
    """Write a checkpoint folder atomically (unmerged LoRA, unfolded projector).

    Args:
        base: write only the trainable tensors (``requires_grad``) and record ``base`` — a complete
            checkpoint folder holding the frozen rest — so ``load`` can rebuild the whole model. ``include``
            names further tensors to write (frozen ones that changed, e.g. a resized position embedding).
        extra: ``callable(tmp_folder)`` writing more files into the checkpoint before it is published
            (training state), so they appear atomically with it.
    """
    from safetensors.torch import save_file

    if any(isinstance(m, LoRALinear) and m.merged for m in model.modules()):
        raise RuntimeError("LoRA is merged into the weights; call tinygptv.model.lora.unmerge_lora(model) first")
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.cfg.to_yaml(tmp / CONFIG_FILE)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        if base is not None:
            keep = {n for n, p in model.named_parameters() if p.requires_grad} | set(include)
            state = {k: v for k, v in state.items() if k in keep}
            rel = os.path.relpath(Path(base).resolve(), folder.resolve())
            (tmp / BASE_FILE).write_text(yaml.safe_dump({"base": rel}))
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "tinygptv", "name": model.cfg.name})
        tok = tokenizer or model.tokenizer
        if tok is not None:
            tok.save(tmp)
        (template or model.template).to_yaml(tmp / TEMPLATE_FILE)
        if getattr(model, "quantization", None) is not None:
            model.quantization.save(tmp)
        if extra is not None:
            extra(tmp)
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


def load(path_or_preset: str | Path | ModelConfig = "nano", device: str | torch.device = "cpu",
         dtype: torch.dtype | None = None, tokenizer: str | Path | Tokenizer | None = None, seed: int = 0, quantize=None,
         inference: bool = False) -> TinyGPTV:
    """Load a checkpoint folder, or build a named preset (``tiny``, ``small``, ``tinygptv-phi2``…) with random weights.

    Args:
        path_or_preset: a folder written by :func:`save` / ``tinygptv import``, ``"nano"`` (the model bundled with
            the package, the default), a ``config.yaml``, a preset name, or a :class:`ModelConfig` (random weights).
        dtype: cast floating weights (default: as stored; fp32 for random presets).
        quantize: ``None | "bf16" | "int8" | "int4"`` or a :class:`tinygptv.infer.quantize.QuantConfig`;
            quantized checkpoints (with ``quantization.yaml``) load quantized without it.
        tokenizer: a tokenizer folder / object overriding the checkpoint's; random presets without one get the
            byte-level tokenizer when their vocabulary is large enough.
        inference: merge LoRA into the weights (int8 / int4 always do): each adapted linear then runs one matrix
            product instead of three (bundled nano model, 64 greedy tokens: 82.5 → 73.9 ms, the same tokens; in a
            full-size bf16 decode step the unmerged products took 3 % of the time). The model can then be neither
            trained nor saved until ``tinygptv.model.lora.unmerge_lora``. ``ask``, ``chat``, ``serve`` and
            ``demo`` load so; ``eval`` does not (on the bundled model both give the same scores on every set).
    Returns:
        the model in eval mode, with ``tokenizer`` and ``template`` attached.
    """
    if isinstance(path_or_preset, str) and path_or_preset in BUNDLED:
        if not (BUNDLED[path_or_preset] / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"the bundled {path_or_preset!r} model is missing from this installation "
                                    f"({BUNDLED[path_or_preset]}); train it with `tinygptv train --recipe nano`")
        path_or_preset = BUNDLED[path_or_preset]
    if isinstance(path_or_preset, ModelConfig):
        cfg = path_or_preset
    elif Path(path_or_preset).is_dir():
        cfg = None
        model = _load_folder(Path(path_or_preset), device, dtype, quantize)
    elif Path(path_or_preset).suffix in (".yaml", ".yml") and Path(path_or_preset).is_file():
        cfg = ModelConfig.from_yaml(path_or_preset)
    elif str(path_or_preset) in PRESETS:
        cfg = preset(str(path_or_preset))
    else:
        raise FileNotFoundError(f"{path_or_preset!r} is neither a checkpoint folder, a config.yaml, nor a preset "
                                f"({sorted(PRESETS)})")
    if cfg is not None:
        model = init_random(cfg, seed, device, dtype, quantize)
    if isinstance(tokenizer, Tokenizer):
        model.tokenizer = tokenizer
    elif tokenizer is not None:
        model.tokenizer = Tokenizer.from_folder(tokenizer)
    if model.tokenizer is None:
        model.tokenizer = _default_tokenizer(model.cfg)
    if inference:
        merge_lora(model)
    return model.eval()


def _default_tokenizer(cfg: ModelConfig) -> Tokenizer | None:
    eos = cfg.lm.eos_token_id
    if cfg.lm.vocab_size >= 257 and eos <= 256:
        return Tokenizer.byte_level(eos_id=eos)
    log.warning("no tokenizer for this model; pass tokenizer=<Phi-2 folder> to generate text")
    return None


def _load_folder(folder: Path, device, dtype, quantize=None) -> TinyGPTV:
    from tinygptv.infer.quantize import QuantConfig

    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder}: no {CONFIG_FILE}; is this a tinygptv checkpoint folder?")
    cfg = ModelConfig.from_yaml(cfg_path)
    saved = QuantConfig.load(folder)
    if saved is not None and quantize is not None:
        wanted = QuantConfig(mode=quantize) if isinstance(quantize, str) else quantize
        if wanted != saved:
            raise ValueError(f"{folder} is saved quantized ({saved.mode}); it cannot be loaded as {wanted.mode}")
    model = materialize(cfg, folder_source(folder), saved or quantize, dtype, device)
    if (folder / "tokenizer.json").is_file():
        model.tokenizer = Tokenizer.from_folder(folder)
    if (folder / TEMPLATE_FILE).is_file():
        model.template = ChatTemplate.from_yaml(folder / TEMPLATE_FILE)
    return model


__all__ = ["load", "save", "build_empty", "init_random", "materialize", "get_template"]
