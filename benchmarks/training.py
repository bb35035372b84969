"""Training throughput: samples/s and achieved FLOP/s of the real training step vs this machine's matmul peak.

A mid-size model (ViT 6×384, Q-Former 2×384, LM 8×1024 with LoRA r 64 on qkv+dense, stage-2 trainable set)
trains on synthetic batches (random images, fixed-length answers) through the same `TinyGPTV.forward` and
AdamW step the trainer uses. FLOPs per step are counted analytically:

- frozen ViT + Q-Former: forward only, 2·params·tokens (+ attention 4·tokens²·width per layer);
- LM: forward 2·params·tokens, backward ≈ 2× forward for activations (input gradients must flow through every
  layer down to the projector) plus weight gradients only for the trainable matrices (LoRA, projector);
  attention 4·L²·hidden per layer forward, ×2 backward.

The matmul peak is measured in the same run: the best of fp32 and bf16 square GEMMs (2048³).
Writes ``benchmarks/results/training.{md,json}``. Usage: ``python benchmarks/training.py [--steps N] [--amp bf16]``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import tinygptv
from tinygptv.model.sequence import single_turn

RESULTS = Path(__file__).parent / "results"


def config():
    return tinygptv.preset("tinygptv-phi2").replace(**{
        "vision.width": 384, "vision.depth": 6, "vision.heads": 6, "vision.mlp_dim": 1536,
        "qformer.hidden": 384, "qformer.layers": 2, "qformer.heads": 6, "qformer.mlp_dim": 1536,
        "projector.hidden": 1024, "lm.hidden": 1024, "lm.layers": 8, "lm.heads": 16, "lm.mlp_dim": 4096,
        "lm.partial_rotary_factor": 0.5, "lm.vocab_size": 512, "lm.bos_token_id": 0, "lm.eos_token_id": 0, "lm.pad_token_id": 0})


def matmul_peak() -> dict:
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
        a @ b
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
        out[str(dtype).replace("torch.", "")] = 2 * 2048**3 / best
    return out


def step_flops(model, batch: int, seq: int) -> float:
    cfg = model.cfg
    vis_params = sum(p.numel() for p in model.vision.parameters())
    n_img = cfg.vision.num_tokens
    vis = 2 * vis_params * n_img * batch + cfg.vision.depth * 4 * n_img**2 * cfg.vision.width * batch
    qf_params = sum(p.numel() for p in model.qformer.parameters())
    qf = 2 * qf_params * cfg.qformer.num_queries * batch
    lm_params = sum(p.numel() for n, p in model.lm.named_parameters() if "lora_" not in n)
    lora_params = sum(p.numel() for n, p in model.lm.named_parameters() if "lora_" in n)
    tokens = batch * seq
    lm_fwd = 2 * (lm_params + lora_params) * tokens + cfg.lm.layers * 4 * seq**2 * cfg.lm.hidden * batch
    lm_bwd = 2 * lm_fwd + 2 * lora_params * tokens
    proj = sum(p.numel() for p in model.projector.parameters()) * cfg.qformer.num_queries * batch * 2 * 3
    return vis + qf + lm_fwd + lm_bwd + proj


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--amp", choices=["none", "bf16"], default="bf16")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = tinygptv.load(config())
    model.set_trainable(lora=True, norms=True, projector=True)
    model.train()
    model.vision.eval()
    model.qformer.eval()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    size = model.image_size
    answer = "a large red circle to the left of a small blue square and a green triangle."
    examples = [single_turn("<Img><ImageHere></Img> Describe this image in detail.", answer, "###")] * args.batch
    pixels = [torch.randn(1, 3, size, size) for _ in range(args.batch)]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if args.amp == "bf16" else torch.autocast("cpu", enabled=False)

    def step():
        with autocast:
            out = model(examples, pixels, 160)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out

    out = step()
    seq = out.logits.shape[1]
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    dt = (time.perf_counter() - t) / args.steps
    flops = step_flops(model, args.batch, seq)
    peak = matmul_peak()
    ref = peak["bfloat16" if args.amp == "bf16" else "float32"]
    res = {"batch": args.batch, "seq_len": seq, "amp": args.amp, "step_s": dt, "samples_per_s": args.batch / dt,
           "flops_per_step": flops, "achieved_flops": flops / dt, "matmul_peak_flops": peak,
           "fraction_of_peak": flops / dt / ref, "threads": torch.get_num_threads(), "torch": torch.__version__,
           "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
           "params": sum(p.numel() for p in model.parameters())}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "training.json").write_text(json.dumps(res, indent=2))
    md = [f"# Training throughput (mid-size model, {res['params'] / 1e6:.0f} M parameters, "
          f"{res['trainable'] / 1e6:.1f} M trainable, stage-2 set)", "",
          f"{res['threads']} threads, torch {res['torch']}, batch {args.batch}, sequence {seq}, amp {args.amp}.", "",
          "| samples/s | step s | achieved GFLOP/s | matmul peak GFLOP/s (fp32 / bf16) | % of peak |", "|---|---|---|---|---|",
          f"| {res['samples_per_s']:.2f} | {dt:.3f} | {res['achieved_flops'] / 1e9:.1f} | "
          f"{peak['float32'] / 1e9:.1f} / {peak['bfloat16'] / 1e9:.1f} | {100 * res['fraction_of_peak']:.0f} |", "",
          "Reproduce: `python benchmarks/training.py` (FLOPs counted analytically, see the script's docstring)."]
    (RESULTS / "training.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
