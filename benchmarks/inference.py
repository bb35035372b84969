"""Inference benchmark: tinygptv (bf16 / int8 / int4) vs transformers (bf16) on the same model, same run.

Builds the full-size ``tinygptv-phi2`` architecture with random weights (no download) — or, with ``--small``, a
mid-size one for a quick run — and measures, each configuration in its own subprocess (so peak RSS is its own):

- decode tokens/s at batch 1 and batch 8 (greedy, EOS disabled so every run decodes the same count);
- time to first token (TTFT) for an image question at 224 px and 448 px, and with a cached image (ours);
- peak RSS of the process (``ru_maxrss``): for one user (after loading, answering at 224 and 448 px and decoding at
  batch 1) and for the whole run (batch-8 decoding comes last);
- the memory-bandwidth roofline: read bandwidth ÷ bytes of LM weights read per token, with the bandwidth sampled
  in the same process right before each batch-1 decode measurement (medians of 3 rounds; the machines are noisy).

The transformers side is ``PhiForCausalLM`` + ``Blip2VisionModel`` + ``Blip2QFormerModel`` in bf16 with the same
dims (its ViT has 39 layers and applies its post-layernorm, i.e. ``ln_vision``), plus the two projections.

Usage: ``python benchmarks/inference.py [--small] [--tokens N] [--configs ours-int8,hf-bf16,...] [--stem NAME]``.
Writes ``benchmarks/results/inference{,-small}.{md,json}`` (or ``NAME.{md,json}``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
CONFIGS = ["hf-bf16", "ours-bf16", "ours-int8", "ours-int4"]
PROMPT_TOKENS = 32  # decode runs: text tokens after the 32 image tokens
QUESTIONS = ("What is shown in the image here?", "Which colours are in the image?!")  # TTFT, then its follow-up
# How Phi-2's tokenizer (GPT-2's byte-level BPE; its extra whitespace tokens do not occur here) splits the TTFT
# prompts' text (stage-4 template, the image between): GPT-2's merge ranks applied with tiktoken (ranks from
# openai-whisper's gpt2.tiktoken; "Hello world" → 15496, 995 as in GPT-2). The random model gets a tokenizer that
# splits exactly so (:func:`phi2_split_tokenizer`), and transformers is given as many tokens, so both prefill the
# prompt's real length: 1 + 7 + 32 + 16 tokens. Runs before 2026-12 used 256 single-byte tokens (1 + 13 + 32 + 47).
GPT2_SPLIT = {
    "[INST] <Img>": ["[", "INST", "]", " <", "Im", "g", ">"],
    f"</Img> {QUESTIONS[0]}  [/INST]": ["</", "Im", "g", ">", " What", " is", " shown", " in", " the", " image", " here",
                                        "?", " ", " [/", "INST", "]"],
    f"</Img> {QUESTIONS[1]}  [/INST]": ["</", "Im", "g", ">", " Which", " colours", " are", " in", " the", " image",
                                        "?!", " ", " [/", "INST", "]"],
}


def model_config(small: bool):
    from tinygptv.config import preset

    cfg = preset("tinygptv-phi2")
    if small:
        cfg = cfg.replace(**{"vision.width": 256, "vision.depth": 4, "vision.heads": 4, "vision.mlp_dim": 1024,
                             "qformer.hidden": 256, "qformer.layers": 2, "qformer.heads": 4, "qformer.mlp_dim": 1024,
                             "projector.hidden": 512, "lm.hidden": 1280, "lm.layers": 8, "lm.heads": 16,
                             "lm.mlp_dim": 5120})
    return cfg


class TiledRandom:
    """Random-looking weights without drawing billions of random numbers: views of one random pool.
    Matmul speed does not depend on the values; norms get 1/0 so activations stay finite."""

    name = "tiled random"

    def __init__(self, n: int = 1 << 22):
        self.pool = torch.randn(n, generator=torch.Generator().manual_seed(0)).mul_(0.02)

    def tensor(self, shape, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """A fresh tensor of ``shape`` (bf16 by default, like a published half-precision checkpoint)."""
        out = torch.empty(shape, dtype=dtype)
        flat, k = out.view(-1), self.pool.numel()
        for start in range(0, flat.numel(), k):
            piece = flat[start:start + k]
            piece.copy_(self.pool[:piece.numel()])
        return out

    def take(self, key, like, module):
        from torch import nn

        from tinygptv.model.phi import RMSNorm

        if isinstance(module, (nn.LayerNorm, RMSNorm)):
            return torch.ones(like.shape) if key.endswith("weight") else torch.zeros(like.shape)
        if key.endswith(("bias", "lora_B")):
            return torch.zeros(like.shape)
        return self.tensor(like.shape, like.dtype if like.dtype != torch.float32 else torch.bfloat16)

    def unused(self):
        return []


def fill_(module: torch.nn.Module, src: TiledRandom) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name.lower() or "layernorm" in name.lower():
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                p.copy_(src.tensor(p.shape).to(p.dtype))


# ----------------------------------------------------------------------------------------------- workers
def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux → GB


def build_ours(cfg, mode: str, fast_decode: bool = False):
    from tinygptv.checkpoint import materialize
    from tinygptv.infer.engine import Engine
    from tinygptv.infer.quantize import QuantConfig

    quant = None if mode == "fp32" else QuantConfig(mode=mode)
    model = materialize(cfg, TiledRandom(), quant).eval()
    model.tokenizer = phi2_split_tokenizer()
    return Engine(model, fast_decode=fast_decode)


def phi2_split_tokenizer():
    """A byte-level BPE that splits the TTFT prompts' text into exactly Phi-2's tokens (:data:`GPT2_SPLIT`): GPT-2's
    pre-tokenizer, the 256 byte symbols, and each of those tokens built up one byte at a time; checked on every
    template piece, so a template change fails here instead of silently changing the prompt length."""
    from tinygptv.templates import IMAGE_PLACEHOLDER, get_template
    from tinygptv.tokenizer import Tokenizer, bytes_to_unicode

    byte = bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(byte.values())}
    merges = []
    for token in dict.fromkeys(t for split in GPT2_SPLIT.values() for t in split):
        sym = "".join(byte[b] for b in token.encode())
        for k in range(2, len(sym) + 1):
            if sym[:k] not in vocab:
                vocab[sym[:k]] = len(vocab)
                merges.append((sym[:k - 1], sym[k - 1]))
    tok = Tokenizer.byte_bpe(vocab, merges)
    for q in QUESTIONS:
        for piece in get_template("stage4").user_turn(q, True).split(IMAGE_PLACEHOLDER):
            got = [tok.decode([i]) for i in tok.encode(piece)]
            if got != GPT2_SPLIT[piece]:
                raise AssertionError(f"{piece!r} splits into {got}, Phi-2 into {GPT2_SPLIT[piece]}")
    return tok


def bench_ours(cfg, mode: str, tokens: int) -> dict:
    """``mode``: fp32, bf16, int8, int4, optionally with ``-fast`` (the engine's ``fast_decode``)."""
    from PIL import Image

    from tinygptv.infer.generate import GenerationConfig, generate_tokens

    t = time.perf_counter()
    mode, _, fast = mode.partition("-")
    engine = build_ours(cfg, mode, fast == "fast")
    out = {"build_s": time.perf_counter() - t}
    model = engine.model
    lm = model.lm
    g = torch.Generator().manual_seed(1)

    def prompt(n: int):
        e = lm.embed_tokens(torch.randint(0, 256, (n,), generator=g))
        return e, torch.ones(n, dtype=torch.long)

    def decode_rate(batch: int, new: int = tokens) -> float:
        prompts = [prompt(32 + PROMPT_TOKENS) for _ in range(batch)]
        gcfg = GenerationConfig(max_new_tokens=new + 1)
        stamps = []
        for ev in generate_tokens(lm, prompts, gcfg, eos_id=-1, pad_id=0, fast_decode=engine.fast_decode):
            if ev.row == batch - 1:
                stamps.append(time.perf_counter())
        return batch * (len(stamps) - 1) / (stamps[-1] - stamps[0])

    decode_rate(1)  # warm-up (kernel packing, allocator)
    if engine.fast_decode:  # compile the decode kernel for batches > 1 too (batch 1 has its own graph)
        decode_rate(8, 2)
    out.update(decode_vs_bandwidth(decode_rate, lm.embed_tokens.state_dict()))
    img = Image.new("RGB", (640, 480), (120, 30, 200))
    # warm-up, like HF's: one small request through the engine (its caches are cleared below). A bare
    # encode_images() outside no_grad kept ~0.9 GB of autograd activations and inflated the peak RSS we reported.
    warm = engine.chat_request(QUESTIONS[0], [Image.new("RGB", (64, 64))])
    engine.generate([warm], GenerationConfig(max_new_tokens=1))
    for size in (224, 448):
        model.vision.set_image_size(size)
        engine.cache.items.clear()
        engine.prefixes.clear()
        req = engine.chat_request(QUESTIONS[0], [img])
        t = time.perf_counter()
        engine.generate([req], GenerationConfig(max_new_tokens=1))
        out[f"ttft_s_{size}"] = time.perf_counter() - t
        out["ttft_prompt_tokens"] = engine.prompt_embeddings(req)[0].shape[0]  # (image cached by now)
        if size == 224:  # a different follow-up question about the same image
            follow = engine.chat_request(QUESTIONS[1], [img])
            t = time.perf_counter()
            engine.generate([follow], GenerationConfig(max_new_tokens=1))
            out["ttft_s_224_cached"] = time.perf_counter() - t
            out["cached_prompt_tokens_reused"] = engine.prefixes.reused_tokens
    out["peak_rss_single_gb"] = rss_gb()  # one user: load, answer at 224 and 448 px, decode at batch 1
    out["decode_tok_s_b8"] = decode_rate(8)
    from tinygptv.infer.quantize import quantized_bytes

    out["lm_weight_bytes"] = quantized_bytes(lm) - _embedding_bytes(lm)
    out["model_bytes"] = quantized_bytes(model)
    return out


ROUNDS = 3  # batch-1 decode measurements, each next to a bandwidth sample


def decode_vs_bandwidth(decode_rate, table: dict) -> dict:
    """Batch-1 decode rate and the memory read bandwidth available to this process at the same moments.

    The machines we share are noisy (the same kernel has read anywhere from 20 to 40 GB/s a few minutes apart), so
    :data:`ROUNDS` rounds each sample the bandwidth, by streaming the model's own embedding table (131–262 MB,
    far beyond the caches, read with the fastest reduction), right before a decode measurement. The decode rate
    and the bandwidth reported are the medians of the rounds; the roofline uses that bandwidth."""
    big = max(table.values(), key=lambda t: t.numel() * t.element_size())
    raw = big.contiguous().view(-1).view(torch.int8)
    rates, bws = [], []
    for _ in range(ROUNDS):
        raw.max()
        reads = []
        for _ in range(5):
            t = time.perf_counter()
            raw.max()
            reads.append(raw.numel() / (time.perf_counter() - t) / 1e9)
        bws.append(statistics.median(reads))
        rates.append(decode_rate(1))
    return {"decode_tok_s_b1": statistics.median(rates), "decode_tok_s_b1_rounds": rates,
            "bandwidth_gbs": statistics.median(bws), "bandwidth_gbs_rounds": bws}


def _embedding_bytes(lm) -> int:
    return sum(t.numel() * t.element_size() for t in lm.embed_tokens.state_dict().values())


def bench_hf(cfg, tokens: int) -> dict:
    from transformers import (Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionConfig, Blip2VisionModel,
                              PhiConfig, PhiForCausalLM)

    t = time.perf_counter()
    src = TiledRandom()
    dt = torch.bfloat16
    pc = PhiConfig(vocab_size=cfg.lm.vocab_size, hidden_size=cfg.lm.hidden, intermediate_size=cfg.lm.mlp_dim,
                   num_hidden_layers=cfg.lm.layers, num_attention_heads=cfg.lm.heads,
                   partial_rotary_factor=cfg.lm.partial_rotary_factor, max_position_embeddings=2048)
    with torch.device("meta"):
        phi = PhiForCausalLM(pc)
    phi = phi.to_empty(device="cpu").to(dt)
    phi.model.rotary_emb = type(phi.model.rotary_emb)(config=pc)
    fill_(phi, src)
    vc = Blip2VisionConfig(hidden_size=cfg.vision.width, intermediate_size=cfg.vision.mlp_dim,
                           num_hidden_layers=cfg.vision.depth, num_attention_heads=cfg.vision.heads,
                           image_size=224, patch_size=cfg.vision.patch_size)
    qc = Blip2QFormerConfig(hidden_size=cfg.qformer.hidden, num_hidden_layers=cfg.qformer.layers,
                            num_attention_heads=cfg.qformer.heads, intermediate_size=cfg.qformer.mlp_dim,
                            encoder_hidden_size=cfg.vision.width)
    with torch.device("meta"):
        vision, qformer = Blip2VisionModel(vc), Blip2QFormerModel(qc)
    vision, qformer = vision.to_empty(device="cpu").to(dt), qformer.to_empty(device="cpu").to(dt)
    fill_(vision, src)
    fill_(qformer, src)
    proj = torch.nn.Sequential(torch.nn.Linear(cfg.qformer.hidden, cfg.projector.hidden),
                               torch.nn.Linear(cfg.projector.hidden, cfg.lm.hidden)).to(dt)
    query = src.tensor((1, cfg.qformer.num_queries, cfg.qformer.hidden)).to(dt)
    phi.eval(), vision.eval(), qformer.eval()
    out = {"build_s": time.perf_counter() - t}
    g = torch.Generator().manual_seed(1)
    emb = phi.get_input_embeddings()

    def run(batch: int, new: int) -> float:
        ids = torch.randint(0, 256, (batch, 32 + PROMPT_TOKENS), generator=g)
        t0 = time.perf_counter()
        with torch.no_grad():
            phi.generate(inputs_embeds=emb(ids), attention_mask=torch.ones_like(ids), max_new_tokens=new,
                         min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
        return time.perf_counter() - t0

    def decode_rate(batch: int) -> float:
        return batch * tokens / (run(batch, tokens + 1) - run(batch, 1))

    decode_rate(1)
    out.update(decode_vs_bandwidth(decode_rate, emb.state_dict()))
    from PIL import Image

    from tinygptv.image import preprocess

    img = Image.new("RGB", (640, 480), (120, 30, 200))
    with torch.no_grad():  # warm-up, as for ours
        qformer(query_embeds=query, encoder_hidden_states=vision(pixel_values=preprocess(img, 224)[None].to(dt)).last_hidden_state)
    for size in (224, 448):
        t0 = time.perf_counter()
        with torch.no_grad():
            px = preprocess(img, size)[None].to(dt)
            feats = vision(pixel_values=px, interpolate_pos_encoding=size != 224).last_hidden_state
            q = qformer(query_embeds=query, encoder_hidden_states=feats).last_hidden_state
            img_emb = proj(q)
            before, after = (torch.randint(0, 256, (1, n), generator=g) for n in ttft_layout())
            embeds = torch.cat([emb(before), img_emb, emb(after)], 1)
            phi.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                         max_new_tokens=1, do_sample=False, pad_token_id=0)
        out[f"ttft_s_{size}"] = time.perf_counter() - t0
    out["peak_rss_single_gb"] = rss_gb()
    out["decode_tok_s_b8"] = decode_rate(8)
    out["ttft_prompt_tokens"] = sum(ttft_layout()) + cfg.qformer.num_queries
    out["lm_weight_bytes"] = sum(p.numel() * p.element_size() for p in phi.parameters()) - emb.weight.numel() * 2
    return out


def ttft_layout() -> tuple[int, int]:
    """Text tokens before and after the image in our TTFT prompt (BOS + stage-4 template + question, Phi-2's
    tokens); the transformers side is given exactly as many, so both prefill the same sequence length."""
    from tinygptv.templates import IMAGE_PLACEHOLDER, get_template

    tok = phi2_split_tokenizer()
    before, after = get_template("stage4").user_turn(QUESTIONS[0], True).split(IMAGE_PLACEHOLDER)
    return 1 + len(tok.encode(before)), len(tok.encode(after))


def read_bandwidth_gbs() -> float:
    """Sustained read bandwidth of 1 GiB buffers (far beyond the caches), best of two streaming reductions
    (int8 max, fp32 sum: the fastest vectorised read kernels in torch on this CPU), best of 3 runs each."""
    best = 0.0
    for dtype, op in ((torch.int8, lambda x: x.max()), (torch.float32, lambda x: x.sum())):
        x = torch.ones((1 << 30) // torch.tensor([], dtype=dtype).element_size(), dtype=dtype)
        op(x)
        for _ in range(3):
            t = time.perf_counter()
            op(x)
            best = max(best, (1 << 30) / (time.perf_counter() - t) / 1e9)
        del x
    return best


def worker(args) -> None:
    torch.manual_seed(0)
    cfg = model_config(args.small)
    name = args.worker
    out = bench_hf(cfg, args.tokens) if name.startswith("hf") else bench_ours(cfg, name.split("-", 1)[1], args.tokens)
    out["peak_rss_gb"] = rss_gb()
    print("RESULT " + json.dumps(out), flush=True)


# ----------------------------------------------------------------------------------------------- driver
def machine() -> dict:
    from tinygptv.system import cpu_name

    info = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": cpu_name(), "os": platform.platform()}
    try:
        info["mem_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)
    except (OSError, ValueError):
        pass
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="mid-size model: a quick run")
    ap.add_argument("--tokens", type=int, default=16, help="decode tokens per measurement")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--stem", help="results file name without extension (default: inference, inference-small)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    results = {}
    for name in args.configs.split(","):
        cmd = [sys.executable, __file__, "--worker", name, "--tokens", str(args.tokens)] + (["--small"] if args.small else [])
        print(f"running {name} …", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            results[name] = {"error": (proc.stderr or proc.stdout)[-2000:]}
            print(f"  {name} failed:\n{results[name]['error']}", flush=True)
            continue
        results[name] = json.loads(line[len("RESULT "):])
        print(f"  {json.dumps(results[name])}", flush=True)
    bw = read_bandwidth_gbs()
    report = {"machine": machine(), "small": args.small, "tokens": args.tokens, "read_bandwidth_gbs": bw,
              "results": results, "stem": args.stem or ("inference-small" if args.small else "inference")}
    for name, r in results.items():
        if "lm_weight_bytes" in r:
            r["roofline_tok_s_b1"] = r.get("bandwidth_gbs", bw) * 1e9 / r["lm_weight_bytes"]
            r["roofline_fraction_b1"] = r["decode_tok_s_b1"] / r["roofline_tok_s_b1"]
    write(report)


def target_lines(res: dict) -> list[str]:
    """The inference issue's targets, judged from this run's numbers."""
    hf, i8, i4 = res.get("hf-bf16", {}), res.get("ours-int8", {}), res.get("ours-int4", {})
    out = ["Targets (this run):", ""]

    def check(label: str, value: float | None, ok: bool | None, fmt: str) -> None:
        if value is None:
            out.append(f"- {label}: not measured")
        else:
            out.append(f"- {label}: {fmt.format(value)} — **{'met' if ok else 'not met'}**")

    def ratio(a: dict, key_a: str, b: dict, key_b: str) -> float | None:
        return a[key_a] / b[key_b] if key_a in a and key_b in b else None

    r = ratio(i8, "decode_tok_s_b1", hf, "decode_tok_s_b1")
    check("int8 decode ≥ 2.0× transformers bf16", r, r is not None and r >= 2.0, "{:.2f}×")
    f = i8.get("roofline_fraction_b1")
    check("int8 decode ≥ 80 % of its roofline", None if f is None else 100 * f, f is not None and f >= 0.8, "{:.0f} %")
    r = ratio(i4, "decode_tok_s_b1", hf, "decode_tok_s_b1")
    check("int4 decode ≥ 3.0× transformers bf16", r, r is not None and r >= 3.0, "{:.2f}×")
    rss = i8.get("peak_rss_single_gb")
    check("peak RSS at int8 ≤ 4.5 GB, one user (load, answers at 224 and 448 px, batch-1 decode)", rss,
          rss is not None and rss <= 4.5, "{:.2f} GB")
    rss = i8.get("peak_rss_gb")
    check("peak RSS at int8 ≤ 4.5 GB, whole run (also batch-8 decode: its keys/values add ~0.5 GB)", rss,
          rss is not None and rss <= 4.5, "{:.2f} GB")
    for name in [n for n in res if n.startswith("ours-")]:
        r = ratio(res.get(name, {}), "ttft_s_224", hf, "ttft_s_224")
        check(f"{name}: TTFT at 224 px ≤ transformers'", r, r is not None and r <= 1.0, "{:.2f}× transformers'")
        r = ratio(res.get(name, {}), "ttft_s_224_cached", res.get(name, {}), "ttft_s_224")
        check(f"{name}: TTFT with a cached image ≤ 0.25× uncached", r, r is not None and r <= 0.25, "{:.2f}×")
        r = ratio(res.get(name, {}), "decode_tok_s_b8", res.get(name, {}), "decode_tok_s_b1")
        check(f"{name}: batch-8 aggregate ≥ 5× batch 1", r, r is not None and r >= 5.0, "{:.2f}×")
    return out


def write(report: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = report["stem"]
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2))
    res = report["results"]
    ref = res.get("hf-bf16", {})
    m = report["machine"]
    lines = [f"# Inference benchmark ({'small model' if report['small'] else 'full-size tinygptv-phi2, random weights'})",
             "", f"Machine: {m.get('cpu')}, {m.get('threads')} threads, {m.get('mem_gb')} GB; torch {m.get('torch')}, "
             f"transformers {m.get('transformers')}. Read bandwidth of 1 GiB buffers after the runs "
             f"{report['read_bandwidth_gbs']:.1f} GB/s; each configuration's roofline uses the bandwidth sampled next "
             f"to its decode runs (column bw). "
             f"Decode: {report['tokens']} greedy tokens after a {32 + PROMPT_TOKENS}-token prompt.", "",
             "| config | decode tok/s b1 | ×HF | decode tok/s b8 | b8/b1 | TTFT 224 s | TTFT 448 s | TTFT cached s "
             "| peak RSS GB 1 user | peak RSS GB | bw GB/s | roofline tok/s | % roofline |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in res.items():
        if "error" in r:
            lines.append(f"| {name} | failed: see JSON |" + " |" * 11)
            continue
        x = r["decode_tok_s_b1"] / ref["decode_tok_s_b1"] if ref.get("decode_tok_s_b1") else float("nan")
        lines.append(
            f"| {name} | {r['decode_tok_s_b1']:.2f} | {x:.2f} | {r['decode_tok_s_b8']:.2f} | "
            f"{r['decode_tok_s_b8'] / r['decode_tok_s_b1']:.2f} | {r['ttft_s_224']:.2f} | {r['ttft_s_448']:.2f} | "
            f"{r.get('ttft_s_224_cached', float('nan')):.2f} | {r.get('peak_rss_single_gb', float('nan')):.2f} | "
            f"{r['peak_rss_gb']:.2f} | {r.get('bandwidth_gbs', float('nan')):.1f} | "
            f"{r.get('roofline_tok_s_b1', float('nan')):.2f} | {100 * r.get('roofline_fraction_b1', float('nan')):.0f} |")
    lines += ["", "TTFT cached: a different follow-up question about the same image (its image embeddings and the "
              "prompt's keys/values up to the question are reused).", "", *target_lines(res),
              "", "Reproduce: `python benchmarks/inference.py" + (" --small" if report["small"] else "")
              + ("" if set(res) == set(CONFIGS) else f" --configs {','.join(res)}")
              + ("" if stem in ("inference", "inference-small") else f" --stem {stem}") + "`."]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
