"""End to end: official-format files (tiny, written by the test) → `tinygptv import` → `tinygptv.load`.

Every tensor of the source files must land in the right place; the only absent target tensors are the ones
the formats are known to lack; a renamed key fails naming it; the result answers and can be exported back.
"""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tokenizers import ByteLevelBPETokenizer  # noqa: E402

import tinygptv  # noqa: E402
from tinygptv.cli import main  # noqa: E402
from tinygptv.weights.phi import load_phi_folder  # noqa: E402
from test_vision_qformer import QF, VISION, _hf_to_lavis_blip2, _hf_to_lavis_eva, hf  # noqa: E402,F401

VOCAB, HIDDEN, LAYERS, HEADS = 320, 64, 2, 4
R = 4


@pytest.fixture(scope="module")
def official(tmp_path_factory, hf):  # noqa: F811 (the imported fixture)
    root = tmp_path_factory.mktemp("official")
    torch.manual_seed(0)
    # Phi folder (current split layout) + GPT-2-style tokenizer files
    phi = transformers.PhiForCausalLM(transformers.PhiConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, partial_rotary_factor=0.5, bos_token_id=0, eos_token_id=0, pad_token_id=None))
    with torch.no_grad():
        for p in phi.parameters():
            p.normal_(0, 0.1)
    phi.save_pretrained(root / "phi")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["a red ball on the left", "what colour is it"] * 10, vocab_size=300,
                            special_tokens=["<|endoftext|>"])
    bpe.save_model(str(root / "phi"))
    # LAVIS EVA (one extra block beyond the depth we keep) and BLIP-2
    eva = _hf_to_lavis_eva(hf["sd"])
    extra = {k.replace(f"blocks.{VISION['depth'] - 1}.", f"blocks.{VISION['depth']}."): v.clone()
             for k, v in eva.items() if k.startswith(f"blocks.{VISION['depth'] - 1}.")}
    torch.save({**eva, **extra}, root / "eva_vit_g.pth")
    torch.save({"model": _hf_to_lavis_blip2(hf["sd"]), "config": {}}, root / "blip2.pth")
    # stage checkpoint, peft-0.2.0 key spelling
    g = torch.Generator().manual_seed(1)
    stage = {}
    pre = "llama_model.base_model.model.model.layers"
    for i in range(LAYERS):
        for tgt, out in (("query_key_value", 3 * HIDDEN), ("dense", HIDDEN)):
            stage[f"{pre}.{i}.self_attn.{tgt}.lora_A.weight"] = torch.randn(R, HIDDEN, generator=g)
            stage[f"{pre}.{i}.self_attn.{tgt}.lora_B.weight"] = torch.randn(out, R, generator=g)
        for n, d in (("self_attn.q_layernorm", HIDDEN // HEADS), ("self_attn.k_layernorm", HIDDEN // HEADS),
                     ("post_layernorm", HIDDEN), ("input_layernorm", HIDDEN)):
            stage[f"{pre}.{i}.{n}.weight"] = 1 + 0.1 * torch.randn(d, generator=g)
    stage["llama_model.base_model.model.model.final_layernorm.weight"] = 1 + 0.1 * torch.randn(HIDDEN, generator=g)
    stage["llama_proj.weight"] = torch.randn(48, QF["hidden"], generator=g)
    stage["llama_proj.bias"] = torch.randn(48, generator=g)
    stage["llama_proj2.weight"] = torch.randn(HIDDEN, 48, generator=g)
    stage["llama_proj2.bias"] = torch.randn(HIDDEN, generator=g)
    stage["Qformer.bert.embeddings.position_ids"] = torch.arange(7)[None]
    torch.save({"model": stage, "optimizer": {}, "epoch": 4}, root / "TinyGPT-V_for_Stage4.pth")
    base = tinygptv.preset("tiny").replace(**{
        "vision.image_size": VISION["image_size"], "vision.heads": VISION["heads"], "vision.depth": VISION["depth"],
        "vision.ln_eps": 1e-6, "qformer.heads": QF["heads"], "qformer.ln_eps": 1e-12, "projector.hidden": 48})
    base.to_yaml(root / "base.yaml")
    return dict(root=root, phi=phi, stage=stage)


def _import(official, out, stage="TinyGPT-V_for_Stage4.pth"):
    r = official["root"]
    return main(["import", "--llm", str(r / "phi"), "--vit", str(r / "eva_vit_g.pth"), "--qformer",
                 str(r / "blip2.pth"), "--stage-checkpoint", str(r / stage), "--config", str(r / "base.yaml"),
                 "--out", str(out)])


def test_import_loads_every_tensor(official, hf, tmp_path, capsys):  # noqa: F811
    assert _import(official, tmp_path / "ckpt") == 0
    printed = capsys.readouterr().out
    assert "missing" not in printed and "unexpected" not in printed
    model = tinygptv.load(tmp_path / "ckpt")
    cfg = model.cfg
    assert (cfg.lora.r, cfg.lm.hidden, cfg.lm.layers, cfg.vision.depth, cfg.qformer.num_queries) == (
        R, HIDDEN, LAYERS, VISION["depth"], QF["num_queries"])
    sd, stage = model.state_dict(), official["stage"]
    pre = "llama_model.base_model.model.model.layers"
    torch.testing.assert_close(sd["lm.layers.1.attn.qkv.lora_B"], stage[f"{pre}.1.self_attn.query_key_value.lora_B.weight"])
    torch.testing.assert_close(sd["lm.layers.0.attn.k_norm.weight"], stage[f"{pre}.0.self_attn.k_layernorm.weight"])
    torch.testing.assert_close(sd["lm.layers.0.attn.k_norm.bias"], torch.zeros(HIDDEN // HEADS))
    torch.testing.assert_close(sd["lm.layers.1.input_layernorm.weight"], stage[f"{pre}.1.input_layernorm.weight"])
    torch.testing.assert_close(sd["projector.proj2.bias"], stage["llama_proj2.bias"])
    phi_sd = official["phi"].state_dict()
    torch.testing.assert_close(sd["lm.layers.1.input_layernorm.bias"], phi_sd["model.layers.1.input_layernorm.bias"])
    torch.testing.assert_close(sd["lm.lm_head.weight"], phi_sd["lm_head.weight"])
    torch.testing.assert_close(sd["vision.ln_vision.weight"], hf["sd"]["vision_model.post_layernorm.weight"])
    torch.testing.assert_close(sd["qformer.query_tokens"], hf["sd"]["query_tokens"])
    # the vision side computes what HF BLIP-2 computes (ln_vision eps as in the HF file)
    with torch.no_grad():
        feats = model.vision(hf["images"])
        torch.testing.assert_close(feats, hf["v_out"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model.qformer(feats), hf["q_out"], atol=1e-4, rtol=1e-4)
    # tokenizer came from the Phi folder; the model answers
    vocab = (official["root"] / "phi" / "vocab.json").read_text()
    assert model.tokenizer.vocab_size == len(json.loads(vocab)) and model.tokenizer.eos_id == 0
    assert isinstance(model.generate(None, "what colour is it", max_new_tokens=4), str)


def test_lm_without_stage_matches_phi_when_new_norms_off(official, tmp_path):
    r = official["root"]
    base = tinygptv.ModelConfig.from_yaml(r / "base.yaml").replace(
        **{"lm.qk_norm": False, "lm.post_attn_norm": False, "lora.r": 0})
    base.to_yaml(tmp_path / "plain.yaml")
    assert main(["import", "--llm", str(r / "phi"), "--vit", str(r / "eva_vit_g.pth"), "--qformer",
                 str(r / "blip2.pth"), "--config", str(tmp_path / "plain.yaml"), "--out", str(tmp_path / "p")]) == 0
    model = tinygptv.load(tmp_path / "p")
    ids = torch.randint(1, VOCAB, (2, 7))
    with torch.no_grad():
        ref = official["phi"](input_ids=ids).logits
        ours = model.lm(ids)
    assert (ref - ours).abs().max() < 1e-4


def test_renamed_stage_key_fails_naming_it(official, tmp_path, capsys):
    stage = dict(official["stage"])
    key = "llama_model.base_model.model.model.layers.1.post_layernorm.weight"
    stage[key.replace("post_layernorm", "post_layernorn")] = stage.pop(key)
    torch.save({"model": stage}, official["root"] / "renamed.pth")
    assert _import(official, tmp_path / "bad", stage="renamed.pth") == 2
    assert "post_layernorn" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_export_round_trip(official, tmp_path, capsys):
    assert _import(official, tmp_path / "ckpt") == 0
    model = tinygptv.load(tmp_path / "ckpt")
    assert main(["export", "--model", str(tmp_path / "ckpt"), "--layout", "fused", "--out", str(tmp_path / "hf")]) == 0
    cfg, tensors, report = load_phi_folder(tmp_path / "hf")
    assert report.ok
    from tinygptv.model.lora import merge_lora

    merge_lora(model.lm)
    ours = model.lm.state_dict()
    for k, v in tensors.items():
        torch.testing.assert_close(v, ours[k], atol=1e-6, rtol=1e-5)
    # stock HF Phi has no post-attention RMSNorm: the split layout must refuse rather than drop it
    capsys.readouterr()
    assert main(["export", "--model", str(tmp_path / "ckpt"), "--layout", "split", "--out", str(tmp_path / "hf2")]) == 2
    assert "post" in capsys.readouterr().err
    # the default picks the layout that can hold the model
    assert main(["export", "--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf3")]) == 0
    assert "(fused layout)" in capsys.readouterr().out
    assert load_phi_folder(tmp_path / "hf3")[2].ok
