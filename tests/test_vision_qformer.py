"""Vision tower + Q-Former: parity with HF BLIP-2, LAVIS/HF checkpoint import, pos-embed resizing, full-size shapes.

Reference: ``shared/reference/tinygptv-official.md`` §1.2, §1.3, §3.1. Everything runs on CPU with tiny
random models; no network access.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from tinygptv.config import QFormerConfig, VisionConfig
from tinygptv.model.qformer import QFormer
from tinygptv.model.vision import VisionEncoder, interpolate_pos_embed
from tinygptv.weights.common import ImportReport, WeightImportError, assign_tensors, read_tensor_file
from tinygptv.weights.vision import (convert_blip2_hf, convert_blip2_lavis, convert_eva_vit_lavis,
                                     convert_hf_qformer_model, convert_hf_vision_model)

transformers = pytest.importorskip("transformers")
from transformers import Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionConfig, Blip2VisionModel  # noqa: E402

TOL = 1e-4
BATCH = 2
VISION = dict(image_size=42, patch_size=14, width=48, depth=3, heads=4, mlp_dim=80)
QF = dict(hidden=32, layers=4, heads=4, mlp_dim=64, num_queries=5, cross_attention_freq=2)
HF_LN_EPS = 1e-6
QF_LN_EPS = 1e-12


def vision_cfg(**kw) -> VisionConfig:
    return VisionConfig(**{**VISION, "ln_eps": HF_LN_EPS, "ln_vision_eps": HF_LN_EPS, **kw})


def qformer_cfg() -> QFormerConfig:
    return QFormerConfig(**QF, ln_eps=QF_LN_EPS)


def _perturb(model: torch.nn.Module) -> None:
    """Random non-default weights; LayerNorms away from (1, 0); k part of the fused ViT qkv bias = 0."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if re.search(r"(layer_?norm\w*|LayerNorm)\.weight$", name, flags=re.I):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
            if name.endswith("self_attn.qkv.bias"):
                p.view(3, -1)[1].zero_()


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """Tiny random HF vision model + Q-Former, their outputs and a BLIP-2-style safetensors file."""
    torch.manual_seed(0)
    vcfg = Blip2VisionConfig(hidden_size=VISION["width"], intermediate_size=VISION["mlp_dim"],
                             num_hidden_layers=VISION["depth"], num_attention_heads=VISION["heads"],
                             image_size=VISION["image_size"], patch_size=VISION["patch_size"],
                             layer_norm_eps=HF_LN_EPS, qkv_bias=True)
    qcfg = Blip2QFormerConfig(hidden_size=QF["hidden"], num_hidden_layers=QF["layers"],
                              num_attention_heads=QF["heads"], intermediate_size=QF["mlp_dim"],
                              encoder_hidden_size=VISION["width"], cross_attention_frequency=2,
                              layer_norm_eps=QF_LN_EPS)
    vision, qformer = Blip2VisionModel(vcfg).eval(), Blip2QFormerModel(qcfg).eval()
    _perturb(vision)
    _perturb(qformer)
    query_tokens = torch.randn(1, QF["num_queries"], QF["hidden"])
    images = torch.randn(BATCH, 3, VISION["image_size"], VISION["image_size"])
    with torch.no_grad():
        v_out = vision(pixel_values=images).last_hidden_state
        q_out = qformer(query_embeds=query_tokens.expand(BATCH, -1, -1), encoder_hidden_states=v_out).last_hidden_state
    sd = {"query_tokens": query_tokens}
    sd.update({"vision_model." + k: v for k, v in vision.state_dict().items()})
    sd.update({"qformer." + k: v for k, v in qformer.state_dict().items()})
    sd = {k: v.contiguous().clone() for k, v in sd.items()}
    path = tmp_path_factory.mktemp("hf") / "model.safetensors"
    save_file(sd, str(path))
    return dict(vision=vision, qformer=qformer, images=images, v_out=v_out, q_out=q_out, sd=sd, path=path)


def _hf_to_lavis_eva(hf_sd: dict, prefix: str = "") -> dict:
    """Rewrite HF ``vision_model.*`` keys to LAVIS ``eva_vit_g.pth`` names (independent of the importer)."""
    out = {}
    for key, v in hf_sd.items():
        if not key.startswith("vision_model.") or "post_layernorm" in key:
            continue
        k = key[len("vision_model."):]
        k = (k.replace("embeddings.class_embedding", "cls_token").replace("embeddings.position_embedding", "pos_embed")
             .replace("embeddings.patch_embedding", "patch_embed.proj").replace("encoder.layers.", "blocks.")
             .replace("layer_norm1", "norm1").replace("layer_norm2", "norm2")
             .replace("self_attn.projection", "attn.proj")
             .replace("self_attn.qkv", "attn.qkv"))
        if k.endswith("attn.qkv.bias"):
            q, _, vb = v.chunk(3)
            out[prefix + k.replace("qkv.bias", "q_bias")] = q.clone()
            out[prefix + k.replace("qkv.bias", "v_bias")] = vb.clone()
        else:
            out[prefix + k] = v
    return out


def _hf_to_lavis_blip2(hf_sd: dict) -> dict:
    """Rewrite HF keys to a LAVIS BLIP-2 ``["model"]`` dict, plus text-branch keys that must be ignored."""
    out = {"query_tokens": hf_sd["query_tokens"],
           "ln_vision.weight": hf_sd["vision_model.post_layernorm.weight"],
           "ln_vision.bias": hf_sd["vision_model.post_layernorm.bias"]}
    for key, v in hf_sd.items():
        if key.startswith("qformer."):
            k = (key.replace("qformer.layernorm.", "Qformer.bert.embeddings.LayerNorm.")
                 .replace("qformer.encoder.layer.", "Qformer.bert.encoder.layer.")
                 .replace(".attention.attention.", ".attention.self.")
                 .replace(".crossattention.attention.", ".crossattention.self."))
            out[k] = v
    out.update(TEXT_BRANCH)
    return out


TEXT_BRANCH = {
    "Qformer.bert.embeddings.word_embeddings.weight": torch.zeros(10, QF["hidden"]),
    "Qformer.bert.embeddings.position_embeddings.weight": torch.zeros(7, QF["hidden"]),
    "Qformer.bert.embeddings.position_ids": torch.arange(7)[None],
    "Qformer.bert.encoder.layer.0.intermediate.dense.weight": torch.zeros(QF["mlp_dim"], QF["hidden"]),
    "Qformer.bert.encoder.layer.1.output.LayerNorm.bias": torch.zeros(QF["hidden"]),
    "Qformer.cls.predictions.bias": torch.zeros(10),
    "t5_proj.weight": torch.zeros(8, QF["hidden"]),
    "temp": torch.tensor(0.07),
}


def _load(vision_tensors: dict, qformer_tensors: dict, report: ImportReport,
          vcfg: VisionConfig | None = None) -> tuple[VisionEncoder, QFormer]:
    enc, qf = VisionEncoder(vcfg or vision_cfg()).eval(), QFormer(qformer_cfg(), VISION["width"]).eval()
    assign_tensors(enc, vision_tensors, report)
    assign_tensors(qf, qformer_tensors, report)
    report.raise_if_bad()
    return enc, qf


def _check_parity(enc: VisionEncoder, qf: QFormer, hf: dict) -> None:
    with torch.no_grad():
        v = enc(hf["images"])
        q = qf(v)
    assert v.shape == hf["v_out"].shape and q.shape == hf["q_out"].shape
    assert (v - hf["v_out"]).abs().max().item() <= TOL
    assert (q - hf["q_out"]).abs().max().item() <= TOL


def test_hf_parity(hf):
    enc, qf = _load(*convert_blip2_hf(read_tensor_file(hf["path"]), vision_cfg(), qformer_cfg()))
    _check_parity(enc, qf, hf)


def test_image_mask_matches_hf_encoder_attention_mask(hf):
    enc, qf = _load(*convert_blip2_hf(hf["sd"], vision_cfg(), qformer_cfg()))
    mask = torch.ones(BATCH, hf["v_out"].shape[1], dtype=torch.bool)
    mask[0, 3:] = False
    with torch.no_grad():
        ours = qf(hf["v_out"], image_mask=mask)
        ref = hf["qformer"](query_embeds=qf.query_tokens.expand(BATCH, -1, -1), encoder_hidden_states=hf["v_out"],
                            encoder_attention_mask=mask.long()).last_hidden_state
    assert (ours - ref).abs().max().item() <= TOL


def test_bare_hf_models(hf):
    v_sd = {k[len("vision_model."):]: v for k, v in hf["sd"].items() if k.startswith("vision_model.")}
    q_sd = {k[len("qformer."):]: v for k, v in hf["sd"].items() if k.startswith("qformer.")}
    v_t, v_rep = convert_hf_vision_model(v_sd, vision_cfg())
    q_t, q_rep = convert_hf_qformer_model(q_sd, qformer_cfg())
    assert "query_tokens" not in q_t
    q_t["query_tokens"] = hf["sd"]["query_tokens"]
    enc, qf = _load(v_t, q_t, v_rep.merge(q_rep))
    _check_parity(enc, qf, hf)


def test_lavis_layouts(hf, tmp_path):
    depth = VISION["depth"]
    eva = _hf_to_lavis_eva(hf["sd"])
    extra = {k.replace("blocks.0.", f"blocks.{depth}."): v.clone() for k, v in eva.items() if k.startswith("blocks.0.")}
    torch.save({**eva, **extra}, tmp_path / "eva_vit_g.pth")
    torch.save({"model": _hf_to_lavis_blip2(hf["sd"])}, tmp_path / "blip2.pth")

    vit_t, vit_rep = convert_eva_vit_lavis(read_tensor_file(tmp_path / "eva_vit_g.pth"), vision_cfg())
    ln_t, q_t, q_rep = convert_blip2_lavis(read_tensor_file(tmp_path / "blip2.pth"), vision_cfg(), qformer_cfg())
    assert set(ln_t) == {"ln_vision.weight", "ln_vision.bias"}
    report = vit_rep.merge(q_rep)
    enc, qf = _load({**{"vit." + k: v for k, v in vit_t.items()}, **ln_t}, q_t, report)
    _check_parity(enc, qf, hf)
    assert report.unexpected == [] and report.missing == []
    assert set(vit_rep.ignored) == set(extra)
    assert set(q_rep.ignored) == set(TEXT_BRANCH)


def test_lavis_blip2_include_vit(hf):
    sd = {**_hf_to_lavis_blip2(hf["sd"]), **_hf_to_lavis_eva(hf["sd"], prefix="visual_encoder.")}
    with_vit = convert_blip2_lavis(sd, vision_cfg(), qformer_cfg(), include_vit=True)
    _check_parity(*_load(*with_vit), hf)
    _, _, rep = convert_blip2_lavis(sd, vision_cfg(), qformer_cfg())
    assert rep.ok and any(k.startswith("visual_encoder.") for k in rep.ignored)


def test_renamed_key_fails_naming_it(hf):
    eva = _hf_to_lavis_eva(hf["sd"])
    eva["blocks.1.attn.qkv.weightX"] = eva.pop("blocks.1.attn.qkv.weight")
    with pytest.raises(WeightImportError, match=r"blocks\.1\.attn\.qkv\.weight'.*blocks\.1\.attn\.qkv\.weightX"):
        convert_eva_vit_lavis(eva, vision_cfg())


def test_deleted_key_fails_naming_it(hf):
    sd = dict(hf["sd"])
    key = "qformer.encoder.layer.2.crossattention.output.LayerNorm.bias"
    del sd[key]
    with pytest.raises(WeightImportError, match=re.escape(key)):
        convert_blip2_hf(sd, vision_cfg(), qformer_cfg())
    blip2 = _hf_to_lavis_blip2(hf["sd"])
    del blip2["ln_vision.weight"]
    with pytest.raises(WeightImportError, match=re.escape("ln_vision.weight")):
        convert_blip2_lavis(blip2, vision_cfg(), qformer_cfg())


def test_unknown_key_is_unexpected(hf):
    sd = {**hf["sd"], "qformer.encoder.layer.1.crossattention.self.query.weight": torch.zeros(1)}
    _, _, report = convert_blip2_hf(sd, vision_cfg(), qformer_cfg())
    assert report.unexpected == ["qformer.encoder.layer.1.crossattention.self.query.weight"]
    with pytest.raises(WeightImportError, match=r"crossattention\.self\.query\.weight"):
        report.raise_if_bad()


def test_nonzero_k_bias_raises(hf):
    sd = dict(hf["sd"])
    key = "vision_model.encoder.layers.1.self_attn.qkv.bias"
    bias = sd[key].clone()
    bias[VISION["width"] + 3] = 0.5
    sd[key] = bias
    with pytest.raises(WeightImportError, match=re.escape(key)):
        convert_blip2_hf(sd, vision_cfg(), qformer_cfg())


def test_interpolate_pos_embed_bicubic():
    torch.manual_seed(1)
    width = 6
    pos = torch.randn(1, 1 + 2 * 2, width)
    out = interpolate_pos_embed(pos, 4)
    assert out.shape == (1, 1 + 16, width)
    assert torch.equal(out[:, 0], pos[:, 0])
    grid = pos[:, 1:].reshape(1, 2, 2, width).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False)  # [1, W, 4, 4]
    ref = ref.permute(0, 2, 3, 1).reshape(1, 16, width)
    assert torch.allclose(out[:, 1:], ref, atol=1e-6)
    assert interpolate_pos_embed(pos.half(), 4).dtype == torch.float16


def test_set_image_size_matches_hf_interpolation(hf):
    enc, _ = _load(*convert_blip2_hf(hf["sd"], vision_cfg(), qformer_cfg()))
    enc.set_image_size(84)
    assert enc.cfg.image_size == 84 and enc.vit.pos_embed.shape == (1, 1 + 36, VISION["width"])
    images = torch.randn(BATCH, 3, 84, 84)
    with torch.no_grad():
        ours = enc(images)
        ref = hf["vision"](pixel_values=images, interpolate_pos_encoding=True).last_hidden_state
    assert ours.shape == (BATCH, 37, VISION["width"])
    assert (ours - ref).abs().max().item() <= TOL
    with pytest.raises(ValueError, match="set_image_size"):
        enc(hf["images"])


def test_import_interpolates_file_pos_embed(hf):
    vision_t, q_t, report = convert_blip2_hf(hf["sd"], vision_cfg(image_size=84), qformer_cfg())
    assert vision_t["vit.pos_embed"].shape == (1, 37, VISION["width"])
    enc, _ = _load(vision_t, q_t, report, vcfg=vision_cfg(image_size=84))
    images = torch.randn(1, 3, 84, 84)
    with torch.no_grad():
        ref = hf["vision"](pixel_values=images, interpolate_pos_encoding=True).last_hidden_state
        assert (enc(images) - ref).abs().max().item() <= TOL


def test_meta_construction_then_import(hf):
    vision_t, q_t, report = convert_blip2_hf(hf["sd"], vision_cfg(), qformer_cfg())
    with torch.device("meta"):
        enc, qf = VisionEncoder(vision_cfg()), QFormer(qformer_cfg(), VISION["width"])
    assign_tensors(enc, vision_t, report)
    assign_tensors(qf, q_t, report)
    report.raise_if_bad()
    _check_parity(enc.eval(), qf.eval(), hf)


def test_full_size_shapes_on_meta():
    cfg = VisionConfig()
    with torch.device("meta"):
        enc = VisionEncoder(cfg)
        qf = QFormer(QFormerConfig(), 1408)
    w, m, p, c, g = cfg.width, cfg.mlp_dim, cfg.patch_size, cfg.in_channels, cfg.grid
    per_block = (2 * w          # norm1
                 + 3 * w * w    # qkv (no bias)
                 + 2 * w        # q_bias, v_bias
                 + w * w + w    # proj
                 + 2 * w        # norm2
                 + w * m + m    # fc1
                 + m * w + w)   # fc2
    embed = c * p * p * w + w + w + (g * g + 1) * w  # patch conv + bias, cls, pos
    expected = embed + cfg.depth * per_block + 2 * w  # + ln_vision
    assert len(enc.vit.blocks) == 39
    assert sum(t.numel() for t in enc.parameters()) == expected
    assert abs(expected / 1e6 - 985.9) < 0.1
    assert qf.cross_attention_layers == [0, 2, 4, 6, 8, 10]
    assert qf.layers[0].cross_attn.key.weight.shape == (768, 1408)
    assert qf.query_tokens.shape == (1, 32, 768)
    enc.set_image_size(448)
    assert enc.vit.pos_embed.shape == (1, 1025, 1408) and cfg.image_size == 448
