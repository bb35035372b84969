"""Reading tensor files and strict key accounting shared by every importer.

Every importer consumes a *source* state dict through a :class:`KeyMapper`, which remembers what was
used. At the end, every source key must be consumed or match a known-ignorable pattern, and every
target key must be filled or match a known-absent pattern; anything else is an :class:`ImportError_`
naming the keys. Upstream's ``load_state_dict(strict=False)`` silently produced half-random models;
this module exists so that cannot happen here.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

log = logging.getLogger(__name__)

Tensors = dict[str, torch.Tensor]


class WeightImportError(RuntimeError):
    """Weights could not be imported exactly: missing, unexpected or mis-shaped keys."""


@dataclass
class ImportReport:
    """What an import did with every key. ``ok`` is False when anything is unexplained."""

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    absent_expected: list[str] = field(default_factory=list)
    shape_errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_errors)

    def merge(self, other: "ImportReport") -> "ImportReport":
        out = ImportReport(source=f"{self.source} + {other.source}")
        for name in ("loaded", "missing", "unexpected", "ignored", "absent_expected", "shape_errors"):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        return out

    def summary(self) -> str:
        lines = [f"{self.source}: {len(self.loaded)} tensors loaded, {len(self.ignored)} source keys ignored "
                 f"(known unused), {len(self.absent_expected)} target keys absent as expected"]
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                            ("shape mismatch", self.shape_errors)):
            if keys:
                shown = ", ".join(keys[:20]) + (f", … ({len(keys) - 20} more)" if len(keys) > 20 else "")
                lines.append(f"  {label} ({len(keys)}): {shown}")
        return "\n".join(lines)

    def raise_if_bad(self) -> None:
        if not self.ok:
            raise WeightImportError(self.summary())


class KeyMapper:
    """Wraps a source state dict and records which keys were consumed.

    ``take(key)`` returns the tensor (raising a :class:`WeightImportError` naming the key if absent);
    ``finish(ignore)`` lists every source key that was neither taken nor matched by an ignore regex.
    """

    def __init__(self, source: Tensors, name: str):
        self.source = source
        self.name = name
        self.used: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self.source

    def has_prefix(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.source)

    def take(self, key: str) -> torch.Tensor:
        if key not in self.source:
            raise WeightImportError(f"{self.name}: required key {key!r} is missing")
        self.used.add(key)
        return self.source[key]

    def take_optional(self, key: str) -> torch.Tensor | None:
        return self.take(key) if key in self.source else None

    def finish(self, ignore: Iterable[str] = ()) -> ImportReport:
        patterns = [re.compile(p) for p in ignore]
        report = ImportReport(source=self.name)
        for key in sorted(self.source):
            if key in self.used:
                continue
            if any(p.fullmatch(key) for p in patterns):
                report.ignored.append(key)
            else:
                report.unexpected.append(key)
        return report


def assign_tensors(module: torch.nn.Module, tensors: Tensors, report: ImportReport,
                   absent_ok: Iterable[str] = (), prefix: str = "") -> ImportReport:
    """Copy ``tensors`` (keys relative to ``module``) into ``module`` with full accounting.

    Target keys (parameters and persistent buffers) not in ``tensors`` are ``missing`` unless they
    fully match one of the ``absent_ok`` regexes; keys of ``tensors`` the module lacks are
    ``unexpected``; shape mismatches are recorded. Tensors are cast to the target's dtype. Works with
    modules on the ``meta`` device (parameters are replaced, not copied into).
    """
    patterns = [re.compile(p) for p in absent_ok]
    targets = module.state_dict(keep_vars=True)
    for key in sorted(targets):
        full = prefix + key
        if key not in tensors:
            if any(p.fullmatch(key) for p in patterns):
                report.absent_expected.append(full)
            else:
                report.missing.append(full)
            continue
        src, dst = tensors[key], targets[key]
        if tuple(src.shape) != tuple(dst.shape):
            report.shape_errors.append(f"{full}: file {tuple(src.shape)} vs model {tuple(dst.shape)}")
            continue
        _set_tensor(module, key, src.to(dst.dtype))
        report.loaded.append(full)
    for key in sorted(set(tensors) - set(targets)):
        report.unexpected.append(prefix + key)
    return report


def _set_tensor(module: torch.nn.Module, key: str, value: torch.Tensor) -> None:
    *path, leaf = key.split(".")
    owner = module.get_submodule(".".join(path)) if path else module
    old = getattr(owner, leaf)
    if isinstance(old, torch.nn.Parameter):
        if old.device.type == "meta":
            setattr(owner, leaf, torch.nn.Parameter(value.to(old.device if value.device.type == "meta" else value.device),
                                                    requires_grad=old.requires_grad))
        else:
            with torch.no_grad():
                old.copy_(value)
    else:
        if old is not None and old.device.type != "meta":
            old.copy_(value)
        else:
            owner._buffers[leaf] = value


def unwrap_checkpoint(obj: object, name: str) -> Tensors:
    """Accept a bare state dict or the ``{"model": …}`` / ``{"state_dict": …}`` wrappers (LAVIS, runners)."""
    if isinstance(obj, dict):
        for wrapper in ("model", "state_dict", "module"):
            inner = obj.get(wrapper)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors and len(tensors) == len(obj):
            return tensors
    raise WeightImportError(f"{name}: not a state dict (expected tensors, or a dict with a 'model' state dict)")


def read_tensor_file(path: str | Path) -> Tensors:
    """Load one ``.safetensors`` (memory-mapped) or ``.bin/.pt/.pth`` file (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except (RuntimeError, OSError, ValueError, EOFError) as exc:
        raise WeightImportError(f"{path}: cannot read ({type(exc).__name__}: {exc}); the file may be truncated "
                                f"or not a PyTorch/safetensors checkpoint") from exc
    return unwrap_checkpoint(obj, str(path))


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == b"PK\x03\x04"


def read_hf_folder(folder: str | Path) -> Tensors:
    """All tensors of a HF model folder: sharded (``*.index.json``) or single, safetensors preferred."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            out: Tensors = {}
            for shard in shards:
                out.update(read_tensor_file(folder / shard))
            return out
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return read_tensor_file(folder / single)
    raise WeightImportError(f"{folder}: no model.safetensors, pytorch_model.bin or sharded index found")
