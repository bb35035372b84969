"""One-query attention at decode time: PyTorch's SDPA kernel against the engine's two matrix products.

At each decode step every row attends with one query over its whole key/value cache. For fp32 caches on the CPU the
decoder uses :func:`tinygptv.model.attention.one_query_attention` (two batched matrix products); this script times
it against ``F.scaled_dot_product_attention`` with the same boolean mask, over 32 layers' caches of full-size
Phi-2 heads (32 × 80), at batch 1 and 8 and at 80 and 400 cached positions, alternating the two, medians of
``--repeats``. It also checks that both give the same result (max |difference|).

Usage: ``python benchmarks/decode_attention.py [--repeats 9]``. Writes ``benchmarks/results/decode-attention.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import inference  # noqa: E402  (this folder's benchmark: machine description)

from tinygptv.model.attention import one_query_attention  # noqa: E402

RESULTS = Path(__file__).parent / "results"
HEADS, HEAD_DIM, LAYERS = 32, 80, 32


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    rows = []
    for batch in (1, 8):
        for positions in (80, 400):
            shape = (batch, HEADS, positions, HEAD_DIM)
            ks = [torch.randn(shape, generator=g) for _ in range(LAYERS)]
            vs = [torch.randn(shape, generator=g) for _ in range(LAYERS)]
            q = torch.randn(batch, HEADS, 1, HEAD_DIM, generator=g)
            mask = torch.ones(batch, 1, 1, positions, dtype=torch.bool)
            mask[0, ..., : positions // 4] = False  # one row left-padded
            ways = {"sdpa": lambda k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                    "matmul": lambda k, v: one_query_attention(q, k, v, mask)}
            diff = max((ways["sdpa"](k, v) - ways["matmul"](k, v)).abs().max().item() for k, v in zip(ks, vs))
            times: dict[str, list[float]] = {name: [] for name in ways}
            for _ in range(args.repeats):
                for name, fn in ways.items():
                    t = time.perf_counter()
                    for k, v in zip(ks, vs):
                        fn(k, v)
                    times[name].append(time.perf_counter() - t)
            row = {"batch": batch, "positions": positions, "max_abs_diff": diff,
                   **{f"{name}_ms": 1e3 * statistics.median(ts) for name, ts in times.items()}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    report = {"machine": inference.machine(), "layers": LAYERS, "heads": HEADS, "head_dim": HEAD_DIM,
              "repeats": args.repeats, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "decode-attention.json").write_text(json.dumps(report, indent=2))
    m = report["machine"]
    lines = ["# One-query attention at decode time: SDPA against two matrix products", "",
             f"Machine: {m['cpu']}, {m['threads']} threads; torch {m['torch']}. {LAYERS} layers' fp32 caches, "
             f"{HEADS} heads × {HEAD_DIM}, one row left-padded; medians of {args.repeats}, the two alternating.", "",
             "| batch | cached positions | SDPA ms | matrix products ms | × | max abs difference |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['positions']} | {r['sdpa_ms']:.2f} | {r['matmul_ms']:.2f} | "
                     f"{r['matmul_ms'] / r['sdpa_ms']:.2f} | {r['max_abs_diff']:.1e} |")
    lines += ["", "Reproduce: `python benchmarks/decode_attention.py`."]
    (RESULTS / "decode-attention.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
