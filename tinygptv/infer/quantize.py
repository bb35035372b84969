"""Weight quantization for CPU inference: ``none | bf16 | int8 | int4``, chosen at load time.

Measured on the 2-core CI machine (Xeon with AVX-512 VNNI/AMX; ``benchmarks/inference.py``), for one
2560→10240 linear at batch 1: bf16 dense 2.0 ms, int8 dynamic (fbgemm) 0.7 ms, int8 weight-only
(``_weight_int8pack_mm``) 0.95 ms, int4 weight-only (``_weight_int4pack_mm_for_cpu``) 0.85 ms; at batch 8 the
dynamic int8 kernel stays at 0.7 ms while both weight-only kernels triple. Hence:

- ``int8``: per-output-channel symmetric int8 weights. Kernel ``dynamic`` (PyTorch's fbgemm/onednn dynamic
  linear: activations quantized per tensor on the fly, to 8 bits on CPUs with VNNI and 7 elsewhere, see
  :func:`reduce_range`) where available, else ``weight-only`` (bf16 activations).
- ``int4``: asymmetric 4-bit weights in groups of ``group_size`` along the input dimension, bf16 activations.
- Embeddings are stored int8 per row in both modes; norms and biases stay floating point.
- The vision tower and Q-Former are quantized to int8 too (they are 1.1 B of the 3.9 B parameters).

Quantized tensors are ordinary buffers, so a quantized model saves to / loads from safetensors like any
other (``quantization.yaml`` beside it records the mode); kernel-specific packing is rebuilt lazily.
LoRA is merged into the weights before quantization (inference only).
"""

from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from tinygptv.model.lora import LoRALinear, merge_lora
from tinygptv.system import release_memory

log = logging.getLogger(__name__)

MODES = ("none", "bf16", "int8", "int4")
QUANT_FILE = "quantization.yaml"


@dataclass
class QuantConfig:
    mode: str = "int8"
    group_size: int = 32  # int4 only
    vision: bool = True  # also quantize ViT + Q-Former linears to int8
    projector: bool = True  # the two projections to int8 (full size: 55 MB of fp32, 14 MB as int8)
    int8_kernel: str = "auto"  # auto | dynamic | weight-only

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown quantization {self.mode!r}; valid: {list(MODES)}")
        if self.int8_kernel not in ("auto", "dynamic", "weight-only"):
            raise ValueError("int8_kernel must be auto, dynamic or weight-only")

    def save(self, folder: str | Path) -> None:
        (Path(folder) / QUANT_FILE).write_text(yaml.safe_dump(asdict(self), sort_keys=False))

    @classmethod
    def load(cls, folder: str | Path) -> "QuantConfig | None":
        path = Path(folder) / QUANT_FILE
        if not path.is_file():
            return None
        fields = yaml.safe_load(path.read_text())
        fields.setdefault("projector", False)  # written before the projections were quantized too
        return cls(**fields)


CHUNK_ELEMENTS = 1 << 22


def _row_chunks(rows: int, cols: int) -> list[slice]:
    """Row slices of about :data:`CHUNK_ELEMENTS` elements: quantizing a chunk at a time keeps the
    floating-point temporaries small (a whole 51200 × 2560 embedding would need several GB of them)."""
    step = max(1, CHUNK_ELEMENTS // max(1, cols))
    return [slice(i, min(rows, i + step)) for i in range(0, rows, step)]


@torch.no_grad()
def quantize_rows_int8(weight: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> None:
    """Symmetric per-row int8: ``weight ≈ qweight · scale[:, None]``, written into ``qweight`` / ``scale``."""
    for rows in _row_chunks(*weight.shape):
        w = weight[rows].float()
        s = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8)
        qweight[rows] = torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8)
        scale[rows] = s


def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    line = next((x for x in text.splitlines() if x.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


@functools.lru_cache(maxsize=8)
def reduce_range(flags: frozenset[str] | None = None) -> bool:
    """Whether the dynamic int8 kernel must quantize activations to 7 bits instead of 8.

    Without VNNI, fbgemm multiplies uint8 activations by int8 weights with ``vpmaddubsw``, whose 16-bit pairwise sums
    saturate unless activations use 7 bits (PyTorch's default for x86). CPUs with AVX512-VNNI or AVX-VNNI accumulate
    in 32 bits, so the full 8 bits are safe and halve the activations' rounding step. Measured on the bundled nano
    model (7-bit / 8-bit activations, 200 items per set): answers identical to fp32's on 192 / 197 of the GQA-style
    items and 436 / 487 of the 600 referring boxes; colour 87.5 / 90 % and shape 82.5 / 85 % (fp32: 90 / 85 %).
    ``flags``: the CPU's feature flags (default: read from ``/proc/cpuinfo``; unknown → 7 bits)."""
    flags = _cpu_flags() if flags is None else flags
    return not ({"avx512_vnni", "avx_vnni", "amx_int8"} & flags)


def dynamic_int8_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines or "x86" in torch.backends.quantized.supported_engines


class Int8Linear(nn.Module):
    """``y = x Wᵀ + b`` with ``W ≈ qweight · scale[:, None]`` (int8, per output channel)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, kernel: str = "auto", device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=torch.float32, device=device) if bias else None)
        if kernel == "auto":
            kernel = "dynamic" if dynamic_int8_available() else "weight-only"
        self.kernel = kernel
        self._packed = None

    @classmethod
    @torch.no_grad()
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, kernel: str = "auto") -> "Int8Linear":
        mod = cls(weight.shape[1], weight.shape[0], bias is not None, kernel, device=weight.device)
        if weight.device.type != "meta":
            quantize_rows_int8(weight, mod.qweight, mod.scale)
            if bias is not None:
                mod.bias.copy_(bias.float())
        return mod

    def int8_weight(self) -> torch.Tensor:
        """``[out, in]`` int8 weight (unpacked from the kernel's copy after the first forward)."""
        if self.qweight.numel() == 0 and self._packed is not None:
            w, _ = torch.ops.quantized.linear_unpack(self._packed)
            return w.int_repr()
        return self.qweight

    def dequantize(self) -> torch.Tensor:
        return self.int8_weight().float() * self.scale[:, None]

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "qweight"] = self.int8_weight()

    def _prepack(self):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # quantized-tensor creation warns about a future deprecation
            qt = torch._make_per_channel_quantized_tensor(self.qweight, self.scale.double(),
                                                          torch.zeros_like(self.scale, dtype=torch.long), 0)
            return torch.ops.quantized.linear_prepack(qt, self.bias)

    def prepare(self) -> None:
        """Build the kernel's packed weight now (otherwise on the first forward). The kernel keeps its own packed
        copy of the int8 weight, so ours is dropped (halves memory); it is unpacked again only for saving."""
        if self.kernel != "dynamic" or self._packed is not None or self.qweight.device.type == "meta":
            return
        if self.qweight.numel() == 0:
            raise RuntimeError("Int8Linear has no weight")
        self._packed = self._prepack()
        self.qweight = torch.empty(0, dtype=torch.int8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.kernel == "dynamic":
            self.prepare()
            y = torch.ops.quantized.linear_dynamic(x2.float(), self._packed, reduce_range())
        else:
            xb = x2.to(torch.bfloat16)
            y = torch.ops.aten._weight_int8pack_mm(xb, self.qweight, self.scale.to(torch.bfloat16)).float()
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def _load_from_state_dict(self, *args, **kwargs):
        self._packed = None
        return super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 {self.kernel}"


class Int4Linear(nn.Module):
    """Asymmetric 4-bit weights per group of ``group_size`` inputs; ``W ≈ (q − 8)·scale + zero``.

    Stored portably as nibble-packed ``uint8 [out, in/2]`` (high nibble = even column) with ``scales_zeros
    [in/group, out, 2]``; converted lazily to the CPU kernel's packing, after which the portable copy is dropped
    (the int4 weights would otherwise sit in memory twice: full-size int4 model, peak RSS 5.56 GB) and rebuilt
    from the kernel's copy only for saving (:func:`unpack_int4pack`). Shapes the kernel cannot take (``out``
    not a multiple of 16) fall back to dequantize-and-matmul.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int = 32, device=None):
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"int4: in_features {in_features} not a multiple of group_size {group_size}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("packed", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales_zeros", torch.empty(in_features // group_size, out_features, 2,
                                                         dtype=torch.bfloat16, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=torch.bfloat16, device=device) if bias else None)
        self._kernel_weight = None

    @classmethod
    @torch.no_grad()
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int = 32) -> "Int4Linear":
        n, k = weight.shape
        mod = cls(k, n, bias is not None, group_size, device=weight.device)
        if weight.device.type != "meta":
            for rows in _row_chunks(n, k):
                w = weight[rows].float().view(-1, k // group_size, group_size)
                lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
                scale = ((hi - lo) / 15).clamp(min=1e-8)
                q = torch.round((w - lo) / scale).clamp(0, 15).to(torch.uint8).view(-1, k)
                mod.packed[rows] = _pack_nibbles(q)
                zero = lo + 8 * scale  # so that W = (q - 8) * scale + zero
                mod.scales_zeros[:, rows] = torch.stack([scale.flatten(1), zero.flatten(1)], -1).transpose(0, 1)
            if bias is not None:
                mod.bias.copy_(bias)
        return mod

    def unpack(self) -> torch.Tensor:
        """``int32 [out, in]`` values in 0..15."""
        if self.packed.numel() == 0 and self._kernel_weight is not None:
            return unpack_int4pack(self._kernel_weight, self.out_features, self.in_features)
        q = torch.empty(self.out_features, self.in_features, dtype=torch.int32, device=self.packed.device)
        q[:, 0::2] = (self.packed >> 4).to(torch.int32)
        q[:, 1::2] = (self.packed & 15).to(torch.int32)
        return q

    def dequantize(self) -> torch.Tensor:
        sz = self.scales_zeros.float().transpose(0, 1)  # [out, groups, 2]
        q = self.unpack().float().view(self.out_features, -1, self.group_size)
        return ((q - 8) * sz[..., :1] + sz[..., 1:]).view(self.out_features, self.in_features)

    def prepare(self) -> None:
        """Convert to the CPU kernel's packing now (otherwise on the first forward)."""
        if self._kernel_weight is None and self.out_features % 16 == 0 and self.packed.device.type != "meta":
            if self.packed.numel() == 0:
                raise RuntimeError("Int4Linear has no weight")
            self._kernel_weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.unpack(), 1)
            self.packed = torch.empty(0, dtype=torch.uint8, device=self.packed.device)

    def packed_weight(self) -> torch.Tensor:
        """The portable ``uint8 [out, in/2]`` packing (rebuilt from the kernel's copy once that exists)."""
        if self.packed.numel() or self._kernel_weight is None:
            return self.packed
        return _pack_nibbles(self.unpack())

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "packed"] = self.packed_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16).contiguous()
        if self.out_features % 16 == 0:
            self.prepare()
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self._kernel_weight, self.group_size,
                                                            self.scales_zeros)
        else:
            y = F.linear(x2, self.dequantize().to(torch.bfloat16))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def _load_from_state_dict(self, *args, **kwargs):
        if self.packed.numel() == 0:  # dropped by prepare(): loading new weights needs the buffer back
            self.packed = torch.empty(self.out_features, self.in_features // 2, dtype=torch.uint8,
                                      device=self.packed.device)
        self._kernel_weight = None
        return super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int4 group={self.group_size}"


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """``[out, in]`` values in 0..15 → the portable ``uint8 [out, in/2]`` (high nibble = even column)."""
    return ((q[:, 0::2] << 4) | q[:, 1::2]).to(torch.uint8)


_INT4PACK_ROWS = 256  # rows unpacked at a time: a multiple of every CPU kernel's block of output channels


@functools.lru_cache(maxsize=4)
def _int4pack_order(rows: int, cols: int) -> torch.Tensor:
    """Where the CPU kernel puts each weight of a ``[rows, cols]`` block: ``order[r·cols + c]`` is the position of
    weight ``(r, c)`` in the block's nibble stream (low nibble of each byte first).

    The layout depends on the CPU's vector width (PyTorch packs blocks of 32 or 64 output channels differently on
    AVX2 and AVX-512), so it is read off the kernel itself: packing probes whose values are the base-16 digits
    of each weight's index gives, digit by digit, which weight lands in each nibble.
    """
    n = rows * cols
    index = torch.arange(n, dtype=torch.int64)
    source = torch.zeros(n, dtype=torch.int64)  # nibble position -> weight index
    for shift in range(0, max(4, (n - 1).bit_length()), 4):
        probe = ((index >> shift) & 15).to(torch.int32).view(rows, cols)
        source |= _nibbles(torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)).long() << shift
    order = torch.empty(n, dtype=torch.int64)
    order[source] = torch.arange(n, dtype=torch.int64)
    return order.to(torch.int32)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    flat = packed.reshape(-1).view(torch.uint8)
    return torch.stack([flat & 15, flat >> 4], -1).reshape(-1)


def unpack_int4pack(kernel_weight: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """``int32 [out, in]`` weights in 0..15 from ``_convert_weight_to_int4pack_for_cpu``'s packing (its inverse).

    The kernel packs each block of output channels on its own, so ``_INT4PACK_ROWS`` rows at a time are a
    contiguous stretch of its bytes. The result is checked by packing it again (exact).
    """
    nib = _nibbles(kernel_weight)
    out = torch.empty(out_features, in_features, dtype=torch.int32)
    for r0 in range(0, out_features, _INT4PACK_ROWS):
        rows = min(_INT4PACK_ROWS, out_features - r0)
        stretch = nib[r0 * in_features:(r0 + rows) * in_features]
        out[r0:r0 + rows] = stretch[_int4pack_order(rows, in_features).long()].view(rows, in_features)
    if not torch.equal(torch.ops.aten._convert_weight_to_int4pack_for_cpu(out, 1), kernel_weight):
        raise RuntimeError("int4: could not invert this PyTorch's CPU int4 packing; save before the first forward")
    return out


class Int8Embedding(nn.Module):
    """Embedding table stored int8 per row; lookups dequantize only the rows used."""

    def __init__(self, num: int, dim: int, out_dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.out_dtype = num, dim, out_dtype
        self.register_buffer("qweight", torch.empty(num, dim, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(num, dtype=torch.float32, device=device))

    @classmethod
    @torch.no_grad()
    def from_weight(cls, weight: torch.Tensor, out_dtype: torch.dtype) -> "Int8Embedding":
        mod = cls(*weight.shape, out_dtype=out_dtype, device=weight.device)
        if weight.device.type != "meta":
            quantize_rows_int8(weight, mod.qweight, mod.scale)
        return mod

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return (self.qweight[ids].float() * self.scale[ids][..., None]).to(self.out_dtype)


QUANTIZED = (Int8Linear, Int4Linear, Int8Embedding)


@torch.no_grad()
def quantize_model(model: nn.Module, cfg: QuantConfig | str, fetch=None) -> nn.Module:
    """Quantize a :class:`~tinygptv.model.tinygptv.TinyGPTV` in place.

    Args:
        fetch: optional ``fetch(module_name, linear) -> (weight, bias)`` giving each linear's floating-point
            weight (LoRA already merged) from elsewhere, for models still on ``meta``: layers are then read and
            quantized one at a time. Without it the module's own weights are used (``meta`` in, ``meta`` out).
    """
    cfg = QuantConfig(mode=cfg) if isinstance(cfg, str) else cfg
    if cfg.mode == "none":
        return model
    if cfg.mode == "bf16":
        return model.to(torch.bfloat16)
    lm = model.lm
    if fetch is None:
        merge_lora(lm)
    compute = torch.float32 if cfg.mode == "int8" else torch.bfloat16

    def weights(name: str, lin: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        # floating-point layers come and go: the previous one's memory goes back to the OS before the next is read.
        # Trimming after every layer, not every 64 M weights, took the full-size int8 load's peak RSS from ~0.25 GB
        # over the loaded model's to ~0.12 GB, at no measurable cost in load time.
        release_memory()
        got = fetch(name, lin) if fetch is not None else None
        return got if got is not None else (lin.weight, getattr(lin, "bias", None))

    def packed(mod: Int8Linear | Int4Linear) -> nn.Module:
        mod.prepare()  # now, layer by layer: the unpacked copies never pile up
        return mod

    def lm_linear(name: str, lin: nn.Linear) -> nn.Module:
        w, b = weights(name, lin)
        if cfg.mode == "int8":
            return packed(Int8Linear.from_weight(w, b, cfg.int8_kernel))
        return packed(Int4Linear.from_weight(w, b, cfg.group_size))

    def vision_linear(name: str, lin: nn.Linear) -> nn.Module:
        return packed(Int8Linear.from_weight(*weights(name, lin), cfg.int8_kernel))

    _replace_linears(lm, lm_linear, "lm")
    # No local may keep the floating-point table (0.26 GB at full size in bf16) alive while the vision tower is
    # quantized: one did, and it was the whole excess of the load's peak RSS over the loaded model's (measured).
    emb = lm.embed_tokens
    lm.embed_tokens = Int8Embedding.from_weight(weights("lm.embed_tokens", emb)[0] if fetch is not None
                                                else emb.weight, compute)
    del emb
    _cast_float(lm, compute)
    if cfg.vision:
        _replace_linears(model.vision, vision_linear, "vision")
        _replace_linears(model.qformer, vision_linear, "qformer")
    if cfg.projector:
        _replace_linears(model.projector, vision_linear, "projector")
    model.quantization = cfg
    release_memory()
    return model


@torch.no_grad()
def prepare_kernels(model: nn.Module) -> None:
    """Pack every quantized linear for its CPU kernel now (those :func:`quantize_model` made are packed already;
    this is for weights read as quantized tensors), so the first request does not pay for packing and peak
    memory stays near the packed size."""
    for m in model.modules():
        if isinstance(m, (Int8Linear, Int4Linear)):
            m.prepare()
            release_memory()


def _replace_linears(module: nn.Module, make, prefix: str) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, (nn.Linear, LoRALinear)):
            setattr(module, name, make(f"{prefix}.{name}", child))
        else:
            _replace_linears(child, make, f"{prefix}.{name}")


def _cast_float(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast remaining floating parameters (norms) to the compute dtype; quantized buffers keep theirs."""
    for sub in module.modules():
        if isinstance(sub, QUANTIZED):
            continue
        for name, p in list(sub.named_parameters(recurse=False)):
            if p.is_floating_point() and p.dtype != dtype:
                sub._parameters[name] = nn.Parameter(p.to(dtype), requires_grad=False)


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (what the weights occupy in memory), plus the kernels' own packed
    copies: an :class:`Int8Linear` whose int8 weight lives only there counts ``out × in`` bytes, an
    :class:`Int4Linear` its kernel weight."""
    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    for m in model.modules():
        if isinstance(m, Int8Linear) and m.qweight.numel() == 0 and m._packed is not None:
            total += m.out_features * m.in_features
        if isinstance(m, Int4Linear) and m._kernel_weight is not None:
            total += m._kernel_weight.numel() * m._kernel_weight.element_size()
    return total
