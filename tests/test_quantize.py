"""Quantized inference: really quantized (types, bytes), close to the float model, saved and reloaded as is.

Tolerances (stated, measured on the random `small` preset, logits of magnitude ~1.3): bf16 ≤ 0.03,
int8 ≤ 0.12, int4 ≤ 0.4 max-abs logit difference vs fp32.
"""

import pytest
import torch

import tinygptv
from tinygptv.infer.quantize import (Int4Linear, Int8Embedding, Int8Linear, QuantConfig, dynamic_int8_available,
                                     quantize_model, quantized_bytes, reduce_range)

TOL = {"bf16": 0.03, "int8": 0.12, "int4": 0.4}


@pytest.fixture(scope="module")
def ref():
    return tinygptv.load("small", seed=1)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(1, 400, (2, 16), generator=torch.Generator().manual_seed(0))


def logits(model, ids):
    with torch.no_grad():
        return model.lm(ids)


@pytest.mark.parametrize("mode", ["bf16", "int8", "int4"])
def test_quantized_close_and_small(ref, ids, mode):
    model = tinygptv.load("small", seed=1, quantize=mode)
    diff = (logits(model, ids) - logits(ref, ids)).abs().max().item()
    assert diff <= TOL[mode], diff
    assert diff > 0  # it really changed the arithmetic
    ratio = quantized_bytes(model) / quantized_bytes(ref)
    assert ratio < {"bf16": 0.51, "int8": 0.3, "int4": 0.23}[mode], ratio
    if mode != "bf16":
        kind = Int8Linear if mode == "int8" else Int4Linear
        lm_linears = [m for n, m in model.lm.named_modules() if n.endswith(("qkv", "dense", "fc1", "fc2", "lm_head"))]
        assert lm_linears and all(isinstance(m, kind) for m in lm_linears)
        assert isinstance(model.lm.embed_tokens, Int8Embedding)
        for part in (model.vision, model.qformer, model.projector):
            assert not any(type(m) is torch.nn.Linear for m in part.modules())
        with pytest.raises(ValueError, match="quantized"):
            model.fold_projector()
        assert model.lm.layers[0].mlp.fc1.state_dict()["qweight" if mode == "int8" else "packed"].dtype in (
            torch.int8, torch.uint8)


def test_int8_kernels_agree(ref, ids):
    a = tinygptv.load("small", seed=1, quantize=QuantConfig("int8", int8_kernel="dynamic"))
    b = tinygptv.load("small", seed=1, quantize=QuantConfig("int8", int8_kernel="weight-only"))
    assert (logits(a, ids) - logits(b, ids)).abs().max() < TOL["int8"]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_save_and_reload_without_requantizing(ref, ids, tmp_path, mode):
    model = tinygptv.load("small", seed=1, quantize=mode)
    tinygptv.save(model, tmp_path / "q")
    assert (tmp_path / "q" / "quantization.yaml").is_file()
    again = tinygptv.load(tmp_path / "q")
    assert torch.equal(logits(again, ids), logits(model, ids))
    with pytest.raises(ValueError, match="saved quantized"):
        tinygptv.load(tmp_path / "q", quantize="int4" if mode == "int8" else "int8")


def test_checkpoint_quantized_before_the_projector_was_still_loads(ref, tmp_path):
    """A quantized checkpoint written when the projections stayed float (its quantization.yaml has no
    ``projector`` key) loads as such; the image embeddings then match a freshly quantized model's closely."""
    import yaml

    old = tinygptv.load("small", seed=1, quantize=QuantConfig("int8", projector=False))
    assert type(old.projector.proj1) is torch.nn.Linear
    tinygptv.save(old, tmp_path / "q")
    fields = yaml.safe_load((tmp_path / "q" / "quantization.yaml").read_text())
    del fields["projector"]
    (tmp_path / "q" / "quantization.yaml").write_text(yaml.safe_dump(fields))
    again = tinygptv.load(tmp_path / "q")
    assert type(again.projector.proj1) is torch.nn.Linear
    new = tinygptv.load("small", seed=1, quantize="int8")
    px = torch.rand(1, 3, ref.image_size, ref.image_size)
    with torch.no_grad():
        a, b, f = again.encode_images(px), new.encode_images(px), ref.encode_images(px)
    assert (a - b).abs().max() < 0.05 * f.abs().max(), ((a - b).abs().max(), f.abs().max())


def test_streaming_quantized_load_equals_quantize_after_load(ref, ids, tmp_path):
    tinygptv.save(ref, tmp_path / "fp")
    streamed = tinygptv.load(tmp_path / "fp", quantize="int8")
    after = quantize_model(tinygptv.load(tmp_path / "fp"), "int8")
    assert torch.equal(logits(streamed, ids), logits(after, ids))


def test_lora_is_merged_before_quantizing(ids, tmp_path):
    model = tinygptv.load("small", seed=2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.05)
    tinygptv.save(model, tmp_path / "lora")
    q = tinygptv.load(tmp_path / "lora", quantize="int8")
    assert (logits(q, ids) - logits(model, ids)).abs().max() < TOL["int8"]


def test_generation_runs_quantized(red_image):
    model = tinygptv.load("tiny", quantize="int8")
    assert isinstance(model.generate(red_image, "what?", max_new_tokens=3), str)


def test_chunked_quantization_equals_whole(monkeypatch):
    from tinygptv.infer import quantize as q

    g = torch.Generator().manual_seed(0)
    w = torch.randn(70, 64, generator=g)
    whole = (q.Int8Linear.from_weight(w, None), q.Int8Embedding.from_weight(w, torch.float32),
             q.Int4Linear.from_weight(w, None, 32))
    monkeypatch.setattr(q, "CHUNK_ELEMENTS", 3 * 64 + 5)  # 3 rows per chunk, a ragged last one
    chunked = (q.Int8Linear.from_weight(w, None), q.Int8Embedding.from_weight(w, torch.float32),
               q.Int4Linear.from_weight(w, None, 32))
    for a, b in zip(whole, chunked):
        for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(x, y), name
    scale = w.abs().amax(1) / 127
    assert torch.equal(whole[0].qweight, torch.round(w / scale[:, None]).to(torch.int8))
    assert (whole[2].dequantize() - w).abs().max() < (w.abs().max() * 2 / 15)


def test_kernels_are_packed_at_load(tmp_path, ids):
    if not dynamic_int8_available():
        pytest.skip("no fbgemm/x86 quantized engine")
    model = tinygptv.load("small", seed=1, quantize="int8")
    lins = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert lins and all(m._packed is not None and m.qweight.numel() == 0 for m in lins)  # no unpacked copy kept
    tinygptv.save(model, tmp_path / "q")  # saving unpacks from the kernel's copy
    again = tinygptv.load(tmp_path / "q")
    assert all(m._packed is not None for m in again.modules() if isinstance(m, Int8Linear))
    assert torch.equal(logits(again, ids), logits(model, ids))


@pytest.mark.parametrize("shape", [(16, 32), (80, 96), (272, 128), (608, 1024)])
def test_int4_weights_are_held_once_and_saved_portably(shape):
    """After its first forward an Int4Linear keeps only the CPU kernel's packing (whose layout depends on the CPU's
    vector width); its state dict still has the portable packing, rebuilt exactly from the kernel's copy."""
    out_f, in_f = shape
    g = torch.Generator().manual_seed(out_f)
    lin = Int4Linear.from_weight(torch.randn(shape, generator=g), torch.randn(out_f, generator=g), 32)
    portable = lin.packed.clone()
    x = torch.randn(3, in_f, generator=g)
    y = lin(x)
    assert lin.packed.numel() == 0 and lin._kernel_weight is not None
    assert quantized_bytes(lin) == (lin._kernel_weight.numel() + lin.scales_zeros.numel() * 2 + out_f * 2)
    assert torch.equal(lin.state_dict()["packed"], portable)
    fresh = Int4Linear(in_f, out_f, True, 32)
    fresh.load_state_dict(lin.state_dict())
    assert torch.equal(fresh(x), y)
    lin.load_state_dict(fresh.state_dict())  # loading into a prepared module restores its buffer first
    assert torch.equal(lin(x), y)


def test_streaming_load_frees_the_float_embedding_before_the_vision_tower():
    """The embedding's floating-point table (0.26 GB at full size) once stayed referenced until the whole model was
    quantized, and was the entire excess of the load's peak RSS: it must be gone when the vision tower is read."""
    import gc
    import weakref

    from tinygptv.checkpoint import build_empty

    model = build_empty(tinygptv.load("small", seed=1).cfg)
    tables, alive_at_vision = [], []

    def fetch(name, lin):
        w = torch.randn(lin.weight.shape) * 0.02
        if name == "lm.embed_tokens":
            tables.append(weakref.ref(w))
        elif name.startswith("vision.") and not alive_at_vision:
            gc.collect()
            alive_at_vision.append(tables[0]() is not None)
        return w, None

    quantize_model(model, "int8", fetch=fetch)
    assert tables and alive_at_vision == [False]


def test_generation_returns_freed_memory_when_a_request_ends(monkeypatch):
    from tinygptv import system
    from tinygptv.infer.generate import GenerationConfig, generate_tokens

    calls = []
    monkeypatch.setattr(system, "release_memory", lambda: calls.append(1))
    lm = tinygptv.load("tiny", seed=1).lm.eval()
    prompt = (lm.embed_tokens(torch.tensor([1, 2, 3])).detach(), torch.ones(3, dtype=torch.long))
    list(generate_tokens(lm, [prompt], GenerationConfig(max_new_tokens=3), eos_id=-1, pad_id=0))
    assert calls == [1]
    stream = generate_tokens(lm, [prompt], GenerationConfig(max_new_tokens=5), eos_id=-1, pad_id=0)
    next(stream)
    stream.close()  # a client that stops reading mid-stream
    assert calls == [1, 1]


def test_dynamic_int8_uses_8_bit_activations_only_where_vnni_accumulates_in_32_bits():
    assert reduce_range(frozenset({"avx2", "fma"})) is True  # vpmaddubsw's 16-bit sums could saturate
    assert reduce_range(frozenset()) is True  # unknown CPU: the safe default
    for vnni in ("avx512_vnni", "avx_vnni", "amx_int8"):
        assert reduce_range(frozenset({"avx2", vnni})) is False


@pytest.mark.skipif(not dynamic_int8_available(), reason="no dynamic int8 kernel")
def test_dynamic_int8_error_with_the_chosen_activation_bits():
    """On a VNNI CPU the kernel runs with 8-bit activations and its error against the float product is clearly
    smaller than with 7 bits; elsewhere it keeps PyTorch's 7 bits."""
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(256, 512)
    x = torch.randn(64, 256, generator=g)
    x[:, :4] *= 8  # a few outlier channels widen the per-tensor range, as in real activations
    q = Int8Linear.from_weight(lin.weight.detach(), lin.bias.detach(), kernel="dynamic")
    exact = x @ q.dequantize().T + lin.bias.detach()
    err = {bits: (torch.ops.quantized.linear_dynamic(x, q._prepack(), bits == 7) - exact).abs().mean().item()
           for bits in (7, 8)}
    if not reduce_range():
        assert err[8] < 0.7 * err[7]
    with torch.no_grad():
        got = q(x)
    assert (got - exact).abs().mean().item() == pytest.approx(err[7 if reduce_range() else 8], rel=1e-5)
