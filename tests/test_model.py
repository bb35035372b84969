import pytest
import torch

import tinygptv
from tinygptv.checkpoint import build_empty
from tinygptv.model.phi import KVCache
from tinygptv.model.sequence import single_turn
from tinygptv.weights.common import WeightImportError


def full_and_stepped(lm, cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of 2 rows × 12 tokens (row 1 left-padded by 3) in one uncached forward, and through ``cache``:
    a 7-token prefill then one token at a time."""
    ids = torch.randint(1, 300, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        full = lm(ids, attention_mask=mask)
        parts = [lm(ids[:, :7], attention_mask=mask[:, :7], cache=cache)]
        for t in range(7, 12):
            parts.append(lm(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache))
    return full, torch.cat(parts, dim=1)


def test_kv_cache_matches_full_forward(tiny_model):
    lm = tiny_model.lm
    full, stepped = full_and_stepped(lm, KVCache(2, 12, lm.cfg, torch.float32, "cpu"))
    assert torch.equal(full[0], stepped[0]) or (full[0] - stepped[0]).abs().max() < 1e-5
    assert (full[1, 3:] - stepped[1, 3:]).abs().max() < 1e-5


def test_left_padding_equals_unpadded(tiny_model):
    lm = tiny_model.lm
    ids = torch.randint(1, 300, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        a = lm(ids)
        b = lm(padded, attention_mask=mask)
    assert (a - b[:, 3:]).abs().max() < 1e-5


def test_generate_greedy_matches_argmax_chain(tiny_model, red_image):
    model = tiny_model
    from tinygptv.infer.engine import Engine, GenerationConfig

    engine = Engine(model)
    result = engine.generate([engine.chat_request("colour?", [red_image])], GenerationConfig(max_new_tokens=6))[0]
    ids = result.token_ids
    assert len(ids) == 6 and result.finish_reason == "length"
    prompt = model.format_prompt("colour?", True)
    # recompute greedily without the cache: one full forward per step over prompt + tokens so far
    batch = model.prepare([single_turn(prompt, "", "")], [model.pixel_values([red_image])])
    chain = []
    n_prompt = int(batch.attention_mask.sum())
    embeds = batch.inputs_embeds[:, :n_prompt]
    with torch.no_grad():
        for _ in range(len(ids)):
            logits = model.lm(inputs_embeds=embeds)
            chain.append(int(logits[0, -1].argmax()))
            embeds = torch.cat([embeds, model.lm.embed_tokens(torch.tensor([[chain[-1]]]))], 1)
    assert ids == chain


def test_loglikelihood_matches_training_loss(tiny_model, red_image):
    model = tiny_model
    prompt, cont = "<Img><ImageHere></Img> what?", " red!"
    ll = model.loglikelihood(red_image, prompt, cont)
    out = model([single_turn(prompt, cont, "")], [model.pixel_values([red_image])])
    n = int((out.labels != -100).sum())
    assert ll == pytest.approx(-out.loss.item() * n, rel=1e-5)
    assert model.loglikelihood(None, "what?", cont) != ll


def test_images_change_the_answer_distribution(tiny_model, red_image, blue_image):
    p = "<Img><ImageHere></Img> what?"
    assert tiny_model.loglikelihood(red_image, p, " x") != tiny_model.loglikelihood(blue_image, p, " x")


def test_projector_folding_is_exact(tiny_model):
    proj = tiny_model.projector
    x = torch.randn(3, 4, proj.proj1.in_features)
    with torch.no_grad():
        ref = proj(x)
        proj.fold()
        folded = proj(x)
        proj.unfold()
    assert (ref - folded).abs().max() < 1e-5


def test_paper_parameter_counts_on_meta():
    cfg = tinygptv.preset("tinygptv-phi2")
    model = build_empty(cfg)
    assert all(p.device.type == "meta" for p in model.parameters())
    c, L, V, F = cfg.lm.hidden, cfg.lm.layers, cfg.lm.vocab_size, cfg.lm.mlp_dim
    phi2 = V * c + L * (3 * c * c + 3 * c + c * c + c + 2 * c * F + F + c + 2 * c) + 2 * c + c * V + V
    lm_base = sum(p.numel() for n, p in model.lm.named_parameters()
                  if "lora_" not in n and "q_norm" not in n and "k_norm" not in n and "post_attn_norm" not in n)
    assert lm_base == phi2
    assert round(phi2 / 1e9, 2) == 2.78
    assert model.set_trainable(lora=True, norms=True, projector=True) == 45_266_944  # upstream issue #17 log


def test_save_load_round_trip(tiny_model, tmp_path, red_image):
    tinygptv.save(tiny_model, tmp_path / "ckpt")
    again = tinygptv.load(tmp_path / "ckpt")
    for (k, a), (k2, b) in zip(tiny_model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    p = "<Img><ImageHere></Img> q"
    assert again.loglikelihood(red_image, p, " a") == tiny_model.loglikelihood(red_image, p, " a")
    assert again.template == tiny_model.template


def test_truncated_checkpoint_is_a_clear_error(tiny_model, tmp_path):
    folder = tinygptv.save(tiny_model, tmp_path / "ckpt")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightImportError, match="truncated"):
        tinygptv.load(folder)


def test_missing_tensor_is_named(tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tinygptv.save(tiny_model, tmp_path / "ckpt")
    sd = load_file(str(folder / "model.safetensors"))
    sd.pop("lm.layers.1.attn.q_norm.weight")
    sd["lm.extra"] = torch.zeros(1)
    save_file(sd, str(folder / "model.safetensors"))
    with pytest.raises(WeightImportError, match=r"lm\.layers\.1\.attn\.q_norm\.weight") as err:
        tinygptv.load(folder)
    assert "lm.extra" in str(err.value)


def test_saving_merged_lora_refused(tiny_model, tmp_path):
    from tinygptv.model.lora import merge_lora, unmerge_lora

    merge_lora(tiny_model)
    with pytest.raises(RuntimeError, match="merged"):
        tinygptv.save(tiny_model, tmp_path / "x")
    unmerge_lora(tiny_model)
    tinygptv.save(tiny_model, tmp_path / "x")


def test_load_for_inference_merges_lora(tiny_model, tmp_path):
    from tinygptv.model.lora import lora_layers

    with torch.no_grad():
        for layer in lora_layers(tiny_model):
            layer.lora_B.normal_(0, 0.1)  # a trained adapter (B starts at 0, which merges to nothing)
    folder = tinygptv.save(tiny_model, tmp_path / "ckpt")
    plain, merged = tinygptv.load(folder), tinygptv.load(folder, inference=True)
    assert lora_layers(merged) and all(layer.merged for layer in lora_layers(merged))
    assert not any(layer.merged for layer in lora_layers(plain))
    ids = torch.randint(0, merged.cfg.lm.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = plain.lm(input_ids=ids), merged.lm(input_ids=ids)
    assert (a - b).abs().max() < 1e-4 * a.abs().max()
    assert not torch.equal(plain.lm.layers[0].attn.qkv.weight, merged.lm.layers[0].attn.qkv.weight)
    with pytest.raises(RuntimeError, match="merged"):
        tinygptv.save(merged, tmp_path / "again")


def test_ablation_switches_remove_modules():
    cfg = tinygptv.preset("tiny").replace(**{"lm.qk_norm": False, "lm.post_attn_norm": False, "lora.r": 0})
    model = build_empty(cfg)
    names = [n for n, _ in model.named_parameters()]
    assert not any("q_norm" in n or "post_attn_norm" in n or "lora_" in n for n in names)


def test_full_preset_builds_in_seconds():
    import time

    t = time.perf_counter()
    model = build_empty(tinygptv.preset("tinygptv-phi2"))
    assert time.perf_counter() - t < 5
    assert sum(p.numel() for p in model.parameters()) > 3.8e9


def test_attention_runs_bf16_training_in_fp32_on_cpu():
    """The shared attention: bf16 inputs that will be back-propagated through are attended in fp32 (the CPU
    kernel's fast and accurate path), autocast notwithstanding; forward-only calls stay bf16 and are unchanged."""
    import torch.nn.functional as F

    from tinygptv.model.attention import attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 16, generator=g).bfloat16().requires_grad_() for _ in range(3))
    mask = torch.ones(9, 9, dtype=torch.bool).tril()[None, None]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v, attn_mask=mask)
        in_bf16 = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert out.dtype == torch.bfloat16
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask).bfloat16()
    assert not torch.equal(in_bf16, exact)  # the two paths are distinguishable on these inputs
    assert torch.equal(out, exact)
    out.float().pow(2).sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 for t in (q, k, v))
    with torch.no_grad():
        assert torch.equal(attention(q, k, v, attn_mask=mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    # the decoder under autocast: RoPE leaves q and k in fp32, v is bf16; still attended in fp32, not by the bf16 kernel
    q32, k32 = (t.detach().float().requires_grad_() for t in (q, k))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = attention(q32, k32, v, attn_mask=mask)
        by_autocast = F.scaled_dot_product_attention(q32, k32, v, attn_mask=mask)
    assert mixed.dtype == torch.bfloat16 and torch.equal(mixed, exact)
    assert not torch.equal(by_autocast.bfloat16(), exact)


def _decode_case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(3, 4, 1, 16, generator=g)
    k, v = torch.randn(3, 4, 9, 16, generator=g), torch.randn(3, 4, 9, 16, generator=g)
    mask = torch.ones(3, 1, 1, 9, dtype=torch.bool)
    mask[1, ..., :4] = False  # left padding
    return q, k, v, mask


def test_decode_attention_matches_sdpa():
    from tinygptv.model.attention import decode_attention

    q, k, v, mask = _decode_case()
    for m in (mask, None):
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m)
        assert (decode_attention(q, k, v, m) - ref).abs().max() < 1e-5
    kb, vb = k.bfloat16(), v.bfloat16()  # stored in bf16, attended in fp32
    ref = torch.nn.functional.scaled_dot_product_attention(q, kb.float(), vb.float(), attn_mask=mask)
    out = decode_attention(q, kb, vb, mask)
    assert out.dtype == torch.float32 and (out - ref).abs().max() < 1e-5


def test_one_query_attention_matches_sdpa():
    from tinygptv.model.attention import one_query_attention

    q, k, v, mask = _decode_case(2)
    additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    for m in (mask, additive, None):
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m)
        assert (one_query_attention(q, k, v, m) - ref).abs().max() < 1e-5


def test_decode_steps_use_one_query_attention_and_never_read_unwritten_cache(tiny_model, monkeypatch):
    """fp32 one-token steps go through the matrix-product attention; the cache's unwritten tail is garbage (NaN
    here) and must never reach the result."""
    from tinygptv.model import phi

    calls = []
    real = phi.one_query_attention
    monkeypatch.setattr(phi, "one_query_attention", lambda *a: calls.append(1) or real(*a))
    lm = tiny_model.lm
    cache = KVCache(2, 12, lm.cfg, torch.float32, "cpu")
    for t in cache.k + cache.v:
        t.fill_(float("nan"))
    full, stepped = full_and_stepped(lm, cache)
    assert len(calls) == 5 * lm.cfg.layers and torch.isfinite(stepped).all()
    assert (full[0] - stepped[0]).abs().max() < 1e-5 and (full[1, 3:] - stepped[1, 3:]).abs().max() < 1e-5


def test_decode_attention_falls_back_when_compiling_fails(monkeypatch, caplog):
    from tinygptv.model import attention

    def broken(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(attention, "_compiled_decode", broken)
    q, k, v, mask = _decode_case(1)
    out = attention.decode_attention(q, k, v, mask)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert (out - ref).abs().max() < 1e-5
    assert attention._compiled_decode is False and "no C++ compiler" in caplog.text


def test_fused_decode_cache_matches_full_forward(tiny_model):
    """bf16 keys/values + the compiled one-token kernel: logits within bf16 rounding of the uncached forward."""
    from tinygptv.infer.generate import new_cache

    lm = tiny_model.lm
    cache = new_cache(lm, 2, 12, torch.float32, torch.device("cpu"), fast_decode=True)
    assert cache.fused_decode and cache.k[0].dtype == torch.bfloat16
    full, stepped = full_and_stepped(lm, cache)
    scale = full.abs().max()
    assert (full[0] - stepped[0]).abs().max() < 0.02 * scale
    assert (full[1, 3:] - stepped[1, 3:]).abs().max() < 0.02 * scale
    assert (full[0] - stepped[0]).abs().max() > 0  # really ran through the bf16 cache
