"""Fast decoding (``Engine(fast_decode=True)``, ``--fast-decode``) against the default decode path, back to back.

One process, one full-size ``tinygptv-phi2`` model with random weights (or ``--small``), quantized as ``--quantize``
(default int8); each measurement alternates the two paths on fresh prompts (the machines are noisy, so runs in
separate processes are not comparable). Reports decode tokens/s at batch 1 and 8 for a short and a long prompt
(medians of ``--rounds``), how long compiling the kernel took, and the keys/values' bytes per position.

Usage: ``TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python benchmarks/fast_decode.py [--small] [--quantize int8]``
``[--rounds 3] [--tokens 8]`` (the empty compile cache makes the reported compile time a first compile).
Writes ``benchmarks/results/fast-decode.{md,json}`` (``fast-decode-small`` with ``--small``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import inference  # noqa: E402  (this folder's benchmark: model builder, machine description)

PROMPTS = (64, 512)
COLD = {True: "empty compile cache", False: "compile cache already filled", None: "compile cache state unknown: "
        "set TORCHINDUCTOR_CACHE_DIR to an empty folder to time a first compile"}
BATCHES = (1, 8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="mid-size model: a quick run")
    ap.add_argument("--quantize", default="int8", choices=["fp32", "bf16", "int8", "int4"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=8, help="decode tokens per measurement")
    args = ap.parse_args()

    from tinygptv.infer.generate import GenerationConfig, generate_tokens
    from tinygptv.model.attention import warm_up_decode_attention

    cache_dir = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    cold = None if not cache_dir else not (Path(cache_dir).is_dir() and any(Path(cache_dir).iterdir()))
    torch.manual_seed(0)
    cfg = inference.model_config(args.small)
    engine = inference.build_ours(cfg, args.quantize)
    lm = engine.model.lm
    compile_s = warm_up_decode_attention(lm.cfg.heads, lm.cfg.head_dim, lm.final_layernorm.weight.dtype)
    g = torch.Generator().manual_seed(1)

    def rate(batch: int, length: int, fast: bool, new: int) -> float:
        prompts = [(lm.embed_tokens(torch.randint(0, 256, (length,), generator=g)),
                    torch.ones(length, dtype=torch.long)) for _ in range(batch)]
        stamps = []
        for ev in generate_tokens(lm, prompts, GenerationConfig(max_new_tokens=new + 1), eos_id=-1, pad_id=0,
                                  fast_decode=fast):
            if ev.row == batch - 1:
                stamps.append(time.perf_counter())
        return batch * (len(stamps) - 1) / (stamps[-1] - stamps[0])

    rows = []
    with torch.no_grad():
        for b in BATCHES:  # warm-up: kernel packing, allocator, both paths
            for fast in (False, True):
                rate(b, PROMPTS[0], fast, 2)
        for length in PROMPTS:
            for b in BATCHES:
                runs: dict[bool, list[float]] = {False: [], True: []}
                for _ in range(args.rounds):
                    for fast in (False, True):
                        runs[fast].append(rate(b, length, fast, args.tokens))
                row = {"prompt": length, "batch": b, "default_tok_s": statistics.median(runs[False]),
                       "fast_tok_s": statistics.median(runs[True]), "default_all": runs[False], "fast_all": runs[True]}
                row["speedup"] = row["fast_tok_s"] / row["default_tok_s"]
                rows.append(row)
                print(f"prompt {length} batch {b}: default {row['default_tok_s']:.2f}, fast {row['fast_tok_s']:.2f} "
                      f"tok/s ({row['speedup']:.2f}x)", flush=True)
    kv_bytes = {"default": 2 * lm.cfg.layers * lm.cfg.hidden * (lm.final_layernorm.weight.element_size()),
                "fast": 2 * lm.cfg.layers * lm.cfg.hidden * 2}
    report = {"machine": inference.machine(), "small": args.small, "quantize": args.quantize, "rounds": args.rounds,
              "tokens": args.tokens, "compile_s": compile_s, "compile_cache_cold": cold, "kv_bytes_per_position": kv_bytes, "rows": rows}
    write(report)


def write(report: dict) -> None:
    stem = "fast-decode-small" if report["small"] else "fast-decode"
    inference.RESULTS.mkdir(parents=True, exist_ok=True)
    (inference.RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2))
    m = report["machine"]
    kv = report["kv_bytes_per_position"]
    lines = [f"# Fast decoding vs the default decode path ({'small model' if report['small'] else 'full-size tinygptv-phi2'}, "
             f"{report['quantize']}, random weights)", "",
             f"Machine: {m.get('cpu')}, {m.get('threads')} threads; torch {m.get('torch')}. Same process, the two paths "
             f"alternated; medians of {report['rounds']} rounds of {report['tokens']} greedy tokens. Compiling the "
             f"kernel took {report['compile_s']:.1f} s ({COLD[report['compile_cache_cold']]}). Keys/values per position and row: "
             f"{kv['default'] / 1024:.0f} KiB by default, {kv['fast'] / 1024:.0f} KiB with fast decoding (bf16).", "",
             "| prompt tokens | batch | default tok/s | fast tok/s | fast / default |", "|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['prompt']} | {r['batch']} | {r['default_tok_s']:.2f} | {r['fast_tok_s']:.2f} | "
                     f"{r['speedup']:.2f} |")
    lines += ["", "Reproduce: `TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python benchmarks/fast_decode.py" + (" --small" if report["small"] else "")
              + ("" if report["quantize"] == "int8" else f" --quantize {report['quantize']}") + "`."]
    (inference.RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
