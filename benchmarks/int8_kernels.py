"""Which CPU int8 kernel the engine packs its linears for: fbgemm vs oneDNN dynamic-quantized linears.

Both are PyTorch's ``quantized::linear_dynamic`` (int8 per-channel weights, activations quantized on the fly);
the packing decides the kernel, and a model holds one packing (two would double the weights in memory). Each
shape of the full-size Phi-2 layer (qkv 2560→7680, dense 2560→2560, fc1 2560→10240, fc2 10240→2560) is timed
at the row counts the engine sees: 1 (decode), 8 (batch-8 decode), 48 and 93 (prefill of a follow-up question / a whole prompt).
Weights cycle over ``--layers`` distinct packed copies so they stream from memory as in a real forward pass
(a single warm matrix would sit in the last-level cache). Best of 3.

Why the engine packs everything for fbgemm: oneDNN (AMX) is ~2x faster at prefill row counts, but at decode
(1 row), the bandwidth-bound case that sets tokens/s, it is up to 2x slower, and by a margin that varies from
run to run (a first run here had oneDNN's qkv at 0.87x fbgemm at 1 row, the next at 2.06x); a model holds one
packing, so decode wins.

Writes ``benchmarks/results/int8-kernels.{md,json}``. Usage: ``python benchmarks/int8_kernels.py``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from tinygptv.infer.quantize import Int8Linear, reduce_range

RESULTS = Path(__file__).parent / "results"
SHAPES = {"qkv 2560→7680": (2560, 7680), "dense 2560→2560": (2560, 2560), "fc1 2560→10240": (2560, 10240),
          "fc2 10240→2560": (10240, 2560)}
ROWS = (1, 8, 48, 93)
ENGINES = ("fbgemm", "onednn")


def pack(weight: torch.Tensor, engine: str):
    """The engine's packed weight, quantized and packed exactly as :class:`Int8Linear` does it."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        mod = Int8Linear.from_weight(weight, None, "dynamic")
        mod.prepare()
        return mod._packed
    finally:
        torch.backends.quantized.engine = previous


def time_per_layer(x: torch.Tensor, packed: list) -> float:
    for p in packed:
        torch.ops.quantized.linear_dynamic(x, p, reduce_range())
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for p in packed:
            torch.ops.quantized.linear_dynamic(x, p, reduce_range())
        best = min(best, (time.perf_counter() - t) / len(packed))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16, help="distinct packed copies per shape")
    args = ap.parse_args()
    available = [e for e in ENGINES if e in torch.backends.quantized.supported_engines]
    g = torch.Generator().manual_seed(0)
    rows = []
    for name, (k, n) in SHAPES.items():
        base = torch.randn(n, k, generator=g) * 0.02
        for engine in available:
            packed = [pack(base + 1e-3 * i, engine) for i in range(args.layers)]
            for m in ROWS:
                ms = 1e3 * time_per_layer(torch.randn(m, k, generator=g), packed)
                rows.append({"shape": name, "engine": engine, "rows": m, "ms": round(ms, 3)})
                print(rows[-1], flush=True)
            del packed
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "layers": args.layers}
    (RESULTS / "int8-kernels.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    ms = {(r["shape"], r["engine"], r["rows"]): r["ms"] for r in rows}
    lines = ["# int8 CPU kernels: fbgemm vs oneDNN (ms per linear, weights streaming from memory)", "",
             f"{meta['machine']}, {meta['threads']} threads, torch {meta['torch']}. "
             "Produced by `python benchmarks/int8_kernels.py`.", "",
             "| shape | rows | " + " | ".join(available) + " | oneDNN / fbgemm |",
             "|---|---|" + "---|" * (len(available) + 1)]
    for name in SHAPES:
        for m in ROWS:
            vals = [ms[(name, e, m)] for e in available]
            ratio = f"{vals[1] / vals[0]:.2f}" if len(vals) == 2 else "—"
            lines.append(f"| {name} | {m} | " + " | ".join(f"{v:.2f}" for v in vals) + f" | {ratio} |")
    (RESULTS / "int8-kernels.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
