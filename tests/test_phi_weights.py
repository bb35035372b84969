"""Phi weight import/export, TinyGPT-V decoder additions, LoRA maths and stage-checkpoint import.

Reference: shared/reference/tinygptv-official.md §1.6 (Phi), §2 (TinyGPT-V modifications, LoRA), §3
(checkpoint formats). ``transformers.PhiForCausalLM`` is the parity reference; every weight (LayerNorms
included) is perturbed away from its initial value so a wrong mapping cannot pass by accident.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import PhiConfig, PhiForCausalLM  # noqa: E402

import tinygptv.model.phi as phi_model  # noqa: E402
from tinygptv.config import LMConfig, LoRAConfig  # noqa: E402
from tinygptv.model.lora import LoRALinear  # noqa: E402
from tinygptv.model.phi import PhiLM, RMSNorm  # noqa: E402
from tinygptv.weights.common import WeightImportError, assign_tensors  # noqa: E402
from tinygptv.weights.phi import (  # noqa: E402
    PHI_ABSENT_OK,
    convert_phi,
    detect_phi_layout,
    export_hf_phi,
    lm_config_from_hf,
    load_phi_folder,
)
from tinygptv.weights.stage import convert_stage_checkpoint, load_stage_checkpoint  # noqa: E402

VOCAB, HIDDEN, LAYERS, HEADS, INTER = 100, 64, 3, 4, 256  # INTER = 4·HIDDEN: the msft n_inner=None rule
HEAD_DIM = HIDDEN // HEADS
ROTARY = 8  # partial_rotary_factor 0.5 of a 16-dim head


# ------------------------------------------------------------------------------------------------ helpers


def _hf_config(qk_layernorm: bool = False) -> PhiConfig:
    return PhiConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                     num_attention_heads=HEADS, partial_rotary_factor=0.5, rope_theta=10000.0,
                     max_position_embeddings=64, layer_norm_eps=1e-5, resid_pdrop=0.0, embd_pdrop=0.0,
                     bos_token_id=0, eos_token_id=0, qk_layernorm=qk_layernorm)


def _perturb(module: nn.Module, seed: int) -> None:
    """Every parameter random: norm weights around 1, biases small, matrices ~ 1/sqrt(fan_in)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * noise)
            elif name.endswith("bias") or p.dim() == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[-1]))


def _hf_model(qk_layernorm: bool = False, seed: int = 0) -> PhiForCausalLM:
    torch.manual_seed(seed)
    model = PhiForCausalLM(_hf_config(qk_layernorm)).eval()
    _perturb(model, seed)
    return model


@pytest.fixture(scope="module")
def hf_model() -> PhiForCausalLM:
    return _hf_model(qk_layernorm=False, seed=1)


@pytest.fixture(scope="module")
def hf_model_qk() -> PhiForCausalLM:
    return _hf_model(qk_layernorm=True, seed=2)


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    mask[2, :1] = 0
    return ids, mask


@torch.no_grad()
def _hf_logits(model: PhiForCausalLM, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits.float()


@torch.no_grad()
def _our_logits(lm: PhiLM, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return lm(ids, attention_mask=mask)


def _max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return (a - b)[mask.bool()].abs().max().item()


def _import(folder: Path, qk_norm: bool = False, post_attn_norm: bool = False,
            lora: LoRAConfig | None = None) -> tuple[PhiLM, object]:
    cfg, tensors, report = load_phi_folder(folder, qk_norm=qk_norm, post_attn_norm=post_attn_norm)
    lm = PhiLM(cfg, lora).eval()
    assign_tensors(lm, tensors, report, absent_ok=PHI_ABSENT_OK)
    assert report.ok, report.summary()
    assert not (report.missing or report.unexpected or report.shape_errors)
    return lm, report


def _hf_state(model: PhiForCausalLM) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _fuse_per_head(sd: dict[str, torch.Tensor], prefix: str, wb: str) -> torch.Tensor:
    """transformers-4.36 ``query_key_value``: rows ordered head by head, q/k/v inside each head."""
    parts = []
    for h in range(HEADS):
        for proj in ("q_proj", "k_proj", "v_proj"):
            parts.append(sd[f"{prefix}self_attn.{proj}.{wb}"][h * HEAD_DIM:(h + 1) * HEAD_DIM])
    return torch.cat(parts, dim=0)


def _write_layout(model: PhiForCausalLM, folder: Path, layout: str) -> None:
    """Write ``model`` in one of the on-disk layouts the importer supports."""
    folder.mkdir(parents=True, exist_ok=True)
    sd = _hf_state(model)
    if layout == "split":
        model.save_pretrained(folder)
    elif layout == "split-sharded":
        model.save_pretrained(folder, max_shard_size="40KB")
        assert (folder / "model.safetensors.index.json").is_file()
    elif layout in ("split-bin", "split-bin-sharded"):
        model.config.to_json_file(folder / "config.json")
        if layout == "split-bin":
            torch.save(sd, folder / "pytorch_model.bin")
        else:
            keys = sorted(sd)
            shards = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
            weight_map = {}
            for shard, shard_keys in shards.items():
                torch.save({k: sd[k] for k in shard_keys}, folder / shard)
                weight_map.update({k: shard for k in shard_keys})
            (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    elif layout == "fused":
        out = {}
        for key, value in sd.items():
            if any(f".{p}_proj." in key for p in "qkv"):
                continue
            out[key] = value
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, ROTARY, 2).float() / ROTARY))
        for i in range(LAYERS):
            prefix = f"model.layers.{i}."
            for wb in ("weight", "bias"):
                out[f"{prefix}self_attn.query_key_value.{wb}"] = _fuse_per_head(sd, prefix, wb)
            out[f"{prefix}self_attn.rotary_emb.inv_freq"] = inv_freq.clone()  # 4.36 .bin files carry this buffer
        torch.save(out, folder / "pytorch_model.bin")
        (folder / "config.json").write_text(json.dumps({
            "architectures": ["PhiForCausalLM"], "model_type": "phi", "vocab_size": VOCAB, "hidden_size": HIDDEN,
            "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
            "num_key_value_heads": HEADS, "hidden_act": "gelu_new", "partial_rotary_factor": 0.5,
            "rope_theta": 10000.0, "rope_scaling": None, "max_position_embeddings": 64, "layer_norm_eps": 1e-5,
            "resid_pdrop": 0.1, "embd_pdrop": 0.0, "attention_dropout": 0.0, "qk_layernorm": False,
            "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 0, "transformers_version": "4.36.2",
        }))
    elif layout == "msft":
        out = {"transformer.embd.wte.weight": sd["model.embed_tokens.weight"]}
        for i in range(LAYERS):
            s, d = f"model.layers.{i}.", f"transformer.h.{i}."
            for wb in ("weight", "bias"):
                out[f"{d}ln.{wb}"] = sd[f"{s}input_layernorm.{wb}"]
                out[f"{d}mixer.Wqkv.{wb}"] = torch.cat([sd[f"{s}self_attn.{p}_proj.{wb}"] for p in "qkv"], dim=0)
                out[f"{d}mixer.out_proj.{wb}"] = sd[f"{s}self_attn.dense.{wb}"]
                out[f"{d}mlp.fc1.{wb}"] = sd[f"{s}mlp.fc1.{wb}"]
                out[f"{d}mlp.fc2.{wb}"] = sd[f"{s}mlp.fc2.{wb}"]
            out[f"{d}mixer.rotary_emb.inv_freq"] = torch.ones(ROTARY // 2)
        for wb in ("weight", "bias"):
            out[f"lm_head.ln.{wb}"] = sd[f"model.final_layernorm.{wb}"]
            out[f"lm_head.linear.{wb}"] = sd[f"lm_head.{wb}"]
        save_file({k: v.contiguous() for k, v in out.items()}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({
            "architectures": ["PhiForCausalLM"], "model_type": "phi-msft", "vocab_size": VOCAB, "n_embd": HIDDEN,
            "n_inner": None, "n_layer": LAYERS, "n_head": HEADS, "n_head_kv": None, "rotary_dim": ROTARY,
            "n_positions": 64, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new", "resid_pdrop": 0.1,
            "embd_pdrop": 0.0, "tie_word_embeddings": False,
        }))
    else:
        raise AssertionError(layout)


# ------------------------------------------------------------------------------------------------ parity

LAYOUTS = ["split", "split-sharded", "split-bin", "split-bin-sharded", "fused", "msft"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_import_parity_all_layouts(hf_model, tmp_path, layout):
    _write_layout(hf_model, tmp_path, layout)
    lm, report = _import(tmp_path)
    assert report.absent_expected == []  # qk_norm, RMSNorm and LoRA off: every target key came from the file
    assert len(report.loaded) == len(lm.state_dict())
    ids, mask = _batch()
    assert _max_diff(_hf_logits(hf_model, ids, mask), _our_logits(lm, ids, mask), mask) <= 1e-4
    if layout in ("fused", "msft"):
        assert len(report.ignored) == LAYERS and all("rotary_emb.inv_freq" in k for k in report.ignored)
        assert lm.cfg.resid_dropout == pytest.approx(0.1)
    else:
        assert report.ignored == []


def test_detect_layout_and_configs(hf_model, tmp_path):
    for layout, expected in (("split", "split"), ("fused", "fused"), ("msft", "msft")):
        folder = tmp_path / layout
        _write_layout(hf_model, folder, layout)
        cfg_json = json.loads((folder / "config.json").read_text())
        cfg = lm_config_from_hf(cfg_json, qk_norm=False, post_attn_norm=True)
        assert (cfg.vocab_size, cfg.hidden, cfg.layers, cfg.heads, cfg.mlp_dim) == (VOCAB, HIDDEN, LAYERS, HEADS, INTER)
        assert cfg.partial_rotary_factor == 0.5 and cfg.rotary_dim == ROTARY
        assert cfg.max_position_embeddings == 64 and cfg.ln_eps == 1e-5
        assert not cfg.qk_norm and cfg.post_attn_norm
        if layout == "fused":
            keys = torch.load(folder / "pytorch_model.bin", weights_only=True).keys()
        else:
            keys = load_file(str(folder / "model.safetensors")).keys()
        assert detect_phi_layout(keys) == expected


def test_qk_layernorm_parity(hf_model_qk, tmp_path):
    hf_model_qk.save_pretrained(tmp_path)
    lm, report = _import(tmp_path, qk_norm=True)
    assert any(k.endswith("attn.q_norm.bias") for k in report.loaded)
    ids, mask = _batch(1)
    assert _max_diff(_hf_logits(hf_model_qk, ids, mask), _our_logits(lm, ids, mask), mask) <= 1e-4
    with pytest.raises(WeightImportError, match="qk_layernorm"):
        load_phi_folder(tmp_path, qk_norm=False, post_attn_norm=False)


def test_plain_file_into_tinygptv_model_reports_absent_norms(hf_model, tmp_path):
    _write_layout(hf_model, tmp_path, "split")
    lm, report = _import(tmp_path, qk_norm=True, post_attn_norm=True, lora=LoRAConfig(r=4, alpha=8, dropout=0.0))
    absent = report.absent_expected
    assert "layers.0.attn.q_norm.weight" in absent and "layers.2.post_attn_norm.weight" in absent
    assert "layers.1.attn.qkv.lora_A" in absent and "layers.1.attn.dense.lora_B" in absent
    assert len(absent) == LAYERS * (4 + 1 + 4)


# ------------------------------------------------------------------------------------------------ errors


def test_renamed_missing_and_misshaped_keys_fail_naming_them(hf_model):
    cfg = lm_config_from_hf(hf_model.config.to_dict(), qk_norm=False, post_attn_norm=False)
    base = _hf_state(hf_model)

    renamed = dict(base)
    renamed["model.layers.1.mlp.fc_1.weight"] = renamed.pop("model.layers.1.mlp.fc1.weight")
    with pytest.raises(WeightImportError) as exc:
        convert_phi(renamed, cfg)
    assert "model.layers.1.mlp.fc1.weight" in str(exc.value) and "model.layers.1.mlp.fc_1.weight" in str(exc.value)

    missing = dict(base)
    del missing["model.layers.2.input_layernorm.bias"]
    with pytest.raises(WeightImportError, match=r"model\.layers\.2\.input_layernorm\.bias"):
        convert_phi(missing, cfg)

    bad_shapes = {"model.layers.0.self_attn.k_proj.weight": (HIDDEN, HIDDEN - 4), "lm_head.bias": (VOCAB - 1,)}
    for key, shape in bad_shapes.items():
        bad = dict(base)
        bad[key] = torch.zeros(shape)
        with pytest.raises(WeightImportError, match=key.replace(".", r"\.")):
            convert_phi(bad, cfg)

    extra_layer = dict(base)
    extra_layer[f"model.layers.{LAYERS}.mlp.fc1.weight"] = torch.zeros(INTER, HIDDEN)
    with pytest.raises(WeightImportError, match=rf"model\.layers\.{LAYERS}\.mlp\.fc1\.weight"):
        convert_phi(extra_layer, cfg)


def test_partial_qk_norms_and_unknown_inputs_fail(hf_model_qk, hf_model):
    sd = _hf_state(hf_model_qk)
    del sd["model.layers.1.self_attn.q_layernorm.weight"]
    cfg = lm_config_from_hf(hf_model_qk.config.to_dict(), qk_norm=True, post_attn_norm=False)
    with pytest.raises(WeightImportError, match=r"model\.layers\.1\.self_attn\.q_layernorm\.weight"):
        convert_phi(sd, cfg)

    cfg_plain = lm_config_from_hf(hf_model.config.to_dict(), qk_norm=False, post_attn_norm=False)
    with pytest.raises(WeightImportError, match="q_layernorm"):
        convert_phi(_hf_state(hf_model_qk), cfg_plain)

    with pytest.raises(WeightImportError, match=r"encoder\.weight"):
        detect_phi_layout(["encoder.weight", "decoder.bias"])
    with pytest.raises(WeightImportError, match="llama"):
        lm_config_from_hf({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4})
    with pytest.raises(WeightImportError, match="num_key_value_heads"):
        lm_config_from_hf({**hf_model.config.to_dict(), "num_key_value_heads": 2})


# ------------------------------------------------------------------------------------------------ hand checks


def _tiny_lm(qk_norm: bool = True, post_attn_norm: bool = True, layers: int = 1,
             lora: LoRAConfig | None = None, seed: int = 3) -> PhiLM:
    cfg = LMConfig(vocab_size=VOCAB, hidden=HIDDEN, layers=layers, heads=HEADS, mlp_dim=2 * HIDDEN,
                   partial_rotary_factor=0.5, max_position_embeddings=64, qk_norm=qk_norm,
                   post_attn_norm=post_attn_norm, resid_dropout=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(seed)
    lm = PhiLM(cfg, lora).eval()
    _perturb(lm, seed)
    return lm


def test_rmsnorm_by_hand():
    torch.manual_seed(0)
    norm = RMSNorm(HIDDEN, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(HIDDEN))
    x = torch.randn(2, 5, HIDDEN) * 3.0
    by_hand = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * norm.weight
    assert (norm(x) - by_hand).abs().max().item() <= 1e-5


def _rope_by_hand(t: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the first ROTARY dims of ``t [B,T,H,D]``: pairs (i, i + ROTARY/2)."""
    out = t.clone()
    half = ROTARY // 2
    for i in range(half):
        angle = positions.float() * 10000.0 ** (-2.0 * i / ROTARY)  # [T]
        cos, sin = angle.cos()[None, :, None], angle.sin()[None, :, None]
        a, b = t[..., i], t[..., i + half]
        out[..., i] = a * cos - b * sin
        out[..., i + half] = b * cos + a * sin
    return out


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def _block_by_hand(lm: PhiLM, x: torch.Tensor, qk_norm_before_rope: bool = True,
                   rms_on_attention_only: bool = True) -> torch.Tensor:
    """One TinyGPT-V decoder layer (reference §2.2) written out with plain tensor ops."""
    blk, cfg = lm.layers[0], lm.cfg
    B, T, C = x.shape
    H, D = cfg.heads, cfg.head_dim
    ln = blk.input_layernorm
    h = F.layer_norm(x, (C,), ln.weight, ln.bias, cfg.ln_eps)
    qkv = (h @ blk.attn.qkv.weight.T + blk.attn.qkv.bias).view(B, T, H, 3, D)
    q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]

    def qk_norm(t: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
        return F.layer_norm(t, (D,), norm.weight, norm.bias, cfg.ln_eps)

    pos = torch.arange(T)
    if qk_norm_before_rope:
        q, k = qk_norm(q, blk.attn.q_norm), qk_norm(k, blk.attn.k_norm)
        q, k = _rope_by_hand(q, pos), _rope_by_hand(k, pos)
    else:
        q, k = _rope_by_hand(q, pos), _rope_by_hand(k, pos)
        q, k = qk_norm(q, blk.attn.q_norm), qk_norm(k, blk.attn.k_norm)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D)
    scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
    o = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).reshape(B, T, C)
    a = o @ blk.attn.dense.weight.T + blk.attn.dense.bias
    m = _gelu_tanh(h @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias) @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias

    def rms(t: torch.Tensor) -> torch.Tensor:
        return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + cfg.rms_eps) * blk.post_attn_norm.weight

    return x + rms(a) + m if rms_on_attention_only else x + rms(a + m)


@torch.no_grad()
def test_decoder_block_by_hand_qk_norm_before_rope_rms_on_attention_only():
    lm = _tiny_lm()
    x = torch.randn(2, 6, HIDDEN)
    captured = {}
    lm.layers[0].register_forward_hook(lambda mod, args, out: captured.setdefault("out", out))
    lm(inputs_embeds=x)
    ours = captured["out"]
    assert (ours - _block_by_hand(lm, x)).abs().max().item() <= 1e-5
    # the two alternative orderings are genuinely different, so the check above discriminates
    assert (ours - _block_by_hand(lm, x, qk_norm_before_rope=False)).abs().max().item() > 1e-3
    assert (ours - _block_by_hand(lm, x, rms_on_attention_only=False)).abs().max().item() > 1e-3


@torch.no_grad()
def test_rope_receives_normalised_q(monkeypatch):
    lm = _tiny_lm()
    seen: list[torch.Tensor] = []
    original = phi_model.apply_partial_rope

    def spy(t, cos, sin):
        seen.append(t.clone())
        return original(t, cos, sin)

    monkeypatch.setattr(phi_model, "apply_partial_rope", spy)
    x = torch.randn(2, 5, HIDDEN)
    lm(inputs_embeds=x)
    blk = lm.layers[0]
    h = blk.input_layernorm(x)
    q_raw = (h @ blk.attn.qkv.weight.T + blk.attn.qkv.bias).view(2, 5, HEADS, 3, HEAD_DIM)[:, :, :, 0]
    q_expected = F.layer_norm(q_raw, (HEAD_DIM,), blk.attn.q_norm.weight, blk.attn.q_norm.bias, lm.cfg.ln_eps)
    assert (seen[0] - q_expected.transpose(1, 2)).abs().max().item() <= 1e-5  # first RoPE call = q of layer 0
    assert (seen[0] - q_raw.transpose(1, 2)).abs().max().item() > 1e-2


@torch.no_grad()
def test_lora_maths_merge_unmerge():
    torch.manual_seed(0)
    layer = LoRALinear(16, 12, bias=True, r=4, alpha=8.0, dropout=0.1).eval()
    layer.lora_A.normal_(0.0, 0.3)
    layer.lora_B.normal_(0.0, 0.3)
    x = torch.randn(3, 7, 16)
    by_hand = x @ layer.weight.T + layer.bias + (8.0 / 4) * ((x @ layer.lora_A.T) @ layer.lora_B.T)
    unmerged = layer(x)
    assert (unmerged - by_hand).abs().max().item() <= 1e-5
    w0 = layer.weight.clone()
    layer.merge()
    assert layer.merged and (layer.weight - w0).abs().max().item() > 1e-3
    assert (layer(x) - unmerged).abs().max().item() <= 1e-5
    layer.unmerge()
    assert not layer.merged and (layer.weight - w0).abs().max().item() <= 1e-6


# ------------------------------------------------------------------------------------------------ export


def _randomise_lora(lm: PhiLM, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in lm.modules():
            if isinstance(mod, LoRALinear) and mod.r > 0:
                mod.lora_A.copy_(torch.randn(mod.lora_A.shape, generator=g) * 0.2)
                mod.lora_B.copy_(torch.randn(mod.lora_B.shape, generator=g) * 0.2)


def test_export_split_loads_in_transformers_with_lora_merged(hf_model_qk, tmp_path):
    hf_model_qk.save_pretrained(tmp_path / "src")
    lora = LoRAConfig(r=4, alpha=8.0, dropout=0.0, targets=["qkv", "dense", "fc1", "fc2"])
    lm, _ = _import(tmp_path / "src", qk_norm=True, lora=lora)
    _randomise_lora(lm, 5)
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    ids, mask = _batch(2)
    ours = _our_logits(lm, ids, mask)
    assert _max_diff(ours, _hf_logits(hf_model_qk, ids, mask), mask) > 1e-2  # LoRA changes the function

    export_hf_phi(lm, tmp_path / "out", layout="split")
    assert all(not m.merged for m in lm.modules() if isinstance(m, LoRALinear))
    assert all(torch.equal(before[k], v) for k, v in lm.state_dict().items())
    reloaded, info = PhiForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert reloaded.config.qk_layernorm
    assert _max_diff(ours, _hf_logits(reloaded.eval(), ids, mask), mask) <= 1e-4


def test_export_split_with_post_attn_norm_raises(tmp_path):
    with pytest.raises(ValueError, match="post-attention RMSNorm"):
        export_hf_phi(_tiny_lm(post_attn_norm=True), tmp_path, layout="split")


def test_export_fused_round_trips(tmp_path):
    lora = LoRAConfig(r=4, alpha=8.0, dropout=0.0)
    lm = _tiny_lm(qk_norm=True, post_attn_norm=True, layers=2, lora=lora, seed=7)
    _randomise_lora(lm, 8)
    export_hf_phi(lm, tmp_path, layout="fused")
    cfg_json = json.loads((tmp_path / "config.json").read_text())
    assert cfg_json["model_type"] == "phi" and cfg_json["architectures"] == ["PhiForCausalLM"]
    assert cfg_json["qk_layernorm"] is True and cfg_json["partial_rotary_factor"] == 0.5
    keys = set(load_file(str(tmp_path / "model.safetensors")))
    assert {"model.layers.1.self_attn.query_key_value.weight", "model.layers.1.self_attn.q_layernorm.bias",
            "model.layers.1.self_attn.k_layernorm.weight", "model.layers.1.post_layernorm.weight"} <= keys
    assert not any("lora" in k for k in keys)
    back, report = _import(tmp_path, qk_norm=True, post_attn_norm=True)
    assert report.absent_expected == []
    ids, mask = _batch(3)
    assert _max_diff(_our_logits(lm, ids, mask), _our_logits(back, ids, mask), mask) <= 1e-4


# ------------------------------------------------------------------------------------------------ stage


STAGE_LORA = LoRAConfig(r=4, alpha=8.0, dropout=0.0, targets=["qkv", "dense"])
Q_HIDDEN, PROJ_HIDDEN = 32, 48


def _stage_sd(style: str, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A synthetic ``"model"`` dict in one key spelling and the tensors it must produce (our keys)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g)

    prefix = "llama_model." if style == "plain" else "llama_model.base_model.model."
    suffix = ".default.weight" if style == "default" else ".weight"
    sd: dict[str, torch.Tensor] = {}
    expected: dict[str, torch.Tensor] = {}

    def add(src: str, dst: str, value: torch.Tensor) -> None:
        sd[src] = value
        expected[dst] = value

    for i in range(LAYERS):
        s, d = f"{prefix}model.layers.{i}.", f"lm.layers.{i}."
        if style != "plain":
            add(f"{s}self_attn.query_key_value.lora_A{suffix}", f"{d}attn.qkv.lora_A", rnd(4, HIDDEN))
            add(f"{s}self_attn.query_key_value.lora_B{suffix}", f"{d}attn.qkv.lora_B", rnd(3 * HIDDEN, 4))
            add(f"{s}self_attn.dense.lora_A{suffix}", f"{d}attn.dense.lora_A", rnd(4, HIDDEN))
            add(f"{s}self_attn.dense.lora_B{suffix}", f"{d}attn.dense.lora_B", rnd(HIDDEN, 4))
        add(f"{s}self_attn.q_layernorm.weight", f"{d}attn.q_norm.weight", rnd(HEAD_DIM))
        add(f"{s}self_attn.k_layernorm.weight", f"{d}attn.k_norm.weight", rnd(HEAD_DIM))
        add(f"{s}post_layernorm.weight", f"{d}post_attn_norm.weight", rnd(HIDDEN))
        add(f"{s}input_layernorm.weight", f"{d}input_layernorm.weight", rnd(HIDDEN))
        if style == "v0":
            add(f"{s}self_attn.q_layernorm.bias", f"{d}attn.q_norm.bias", rnd(HEAD_DIM))
            add(f"{s}input_layernorm.bias", f"{d}input_layernorm.bias", rnd(HIDDEN))
    add(f"{prefix}model.final_layernorm.weight", "lm.final_layernorm.weight", rnd(HIDDEN))
    add("llama_proj.weight", "projector.proj1.weight", rnd(PROJ_HIDDEN, Q_HIDDEN))
    add("llama_proj.bias", "projector.proj1.bias", rnd(PROJ_HIDDEN))
    add("llama_proj2.weight", "projector.proj2.weight", rnd(HIDDEN, PROJ_HIDDEN))
    add("llama_proj2.bias", "projector.proj2.bias", rnd(HIDDEN))
    sd["Qformer.bert.embeddings.position_ids"] = torch.arange(512)[None]
    if style == "v0":
        sd["Qformer.bert.embeddings.LayerNorm.weight"] = rnd(Q_HIDDEN)
        sd["Qformer.bert.encoder.layer.0.attention.self.query.weight"] = rnd(Q_HIDDEN, Q_HIDDEN)
        sd["query_tokens"] = rnd(1, 4, Q_HIDDEN)
    return sd, expected


class _Projector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj1 = nn.Linear(Q_HIDDEN, PROJ_HIDDEN)
        self.proj2 = nn.Linear(PROJ_HIDDEN, HIDDEN)


class _Whole(nn.Module):
    def __init__(self, lora: LoRAConfig) -> None:
        super().__init__()
        self.lm = _tiny_lm(qk_norm=True, post_attn_norm=True, layers=LAYERS, lora=lora)
        self.projector = _Projector()


_FROZEN = [  # everything upstream keeps frozen (reference §2.4): not in a stage checkpoint
    r"lm\.embed_tokens\.weight", r"lm\.lm_head\.(weight|bias)", r"lm\.final_layernorm\.bias",
    r"lm\.layers\.\d+\.(attn\.(qkv|dense)|mlp\.fc[12])\.(weight|bias)",
    r"lm\.layers\.\d+\.(input_layernorm|attn\.[qk]_norm)\.bias",
]


@pytest.mark.parametrize("style", ["peft0.2", "default", "plain", "v0"])
def test_stage_checkpoint_import(tmp_path, style):
    sd, expected = _stage_sd(style)
    path = tmp_path / "TinyGPT-V_for_Stage3.pth"
    torch.save({"model": sd, "optimizer": {}, "config": {"run": {"init_lr": 1e-4}}, "scaler": {}, "epoch": 3}, path)
    r = 0 if style == "plain" else 4
    tensors, qformer_raw, info, report = load_stage_checkpoint(path, r, num_layers=LAYERS,
                                                               lora_targets=["qkv", "dense"])
    assert set(tensors) == set(expected)
    assert all(torch.equal(tensors[k], expected[k]) for k in expected)
    assert info["lora_r"] == r and info["layers"] == LAYERS
    styles = {"peft0.2": "peft-0.2", "default": "peft-default", "plain": "no-lora", "v0": "peft-0.2"}
    assert info["key_style"] == styles[style]
    assert report.ok and not report.unexpected
    if style == "v0":
        assert info["has_qformer"] and report.ignored == []
        assert set(qformer_raw) == {"Qformer.bert.embeddings.position_ids", "Qformer.bert.embeddings.LayerNorm.weight",
                                    "Qformer.bert.encoder.layer.0.attention.self.query.weight", "query_tokens"}
        assert torch.equal(qformer_raw["query_tokens"], sd["query_tokens"])
    else:
        assert qformer_raw == {} and report.ignored == ["Qformer.bert.embeddings.position_ids"]

    whole = _Whole(STAGE_LORA if r else LoRAConfig(r=0))
    absent_ok = _FROZEN + ([] if style == "v0" else [r"lm\.layers\.\d+\.(input_layernorm|attn\.q_norm)\.bias"])
    assign_tensors(whole, tensors, report, absent_ok=absent_ok)
    assert report.ok, report.summary()
    state = whole.state_dict()
    assert all(torch.equal(state[k], v) for k, v in expected.items())


def test_stage_checkpoint_lora_problems_raise():
    sd, _ = _stage_sd("peft0.2")
    partial = {k: v for k, v in sd.items() if "layers.1.self_attn.query_key_value.lora" not in k}
    with pytest.raises(WeightImportError, match=r"layers\.1\.qkv\.lora_A"):
        convert_stage_checkpoint(partial, 4)  # layers inferred from the norm keys
    with pytest.raises(WeightImportError, match=r"layers\.1\.qkv\.lora_B"):
        convert_stage_checkpoint(partial, 4, num_layers=LAYERS, lora_targets=["qkv", "dense"])
    tensors, _, info, _ = convert_stage_checkpoint({f"module.{k}": v for k, v in sd.items()}, 4)  # DDP prefix
    assert info["lora_r"] == 4 and "lm.layers.2.attn.qkv.lora_B" in tensors
    no_dense = {k: v for k, v in sd.items() if "dense.lora" not in k}
    with pytest.raises(WeightImportError, match=r"layers\.0\.dense\.lora_A"):
        convert_stage_checkpoint(no_dense, 4, lora_targets=["qkv", "dense"])

    plain, _ = _stage_sd("plain")
    with pytest.raises(WeightImportError, match="has none"):
        convert_stage_checkpoint(plain, 4)
    with pytest.raises(WeightImportError, match="rank in the checkpoint is 4"):
        convert_stage_checkpoint(sd, 8)
    with pytest.raises(WeightImportError, match="model has none"):
        convert_stage_checkpoint(sd, 0)


def test_stage_checkpoint_unknown_and_duplicate_keys_raise():
    sd, _ = _stage_sd("peft0.2")
    bad = {**sd, "llama_model.base_model.model.model.layers.0.self_attn.foo.weight": torch.zeros(2),
           "visual_encoder.blocks.0.norm1.weight": torch.zeros(2)}
    with pytest.raises(WeightImportError) as exc:
        convert_stage_checkpoint(bad, 4)
    assert "self_attn.foo.weight" in str(exc.value) and "visual_encoder.blocks.0.norm1.weight" in str(exc.value)
    dup_key = "llama_model.base_model.model.model.layers.0.self_attn.dense.lora_A.default.weight"
    dup = {**sd, dup_key: torch.zeros(4, HIDDEN)}
    with pytest.raises(WeightImportError, match="several source keys"):
        convert_stage_checkpoint(dup, 4)
