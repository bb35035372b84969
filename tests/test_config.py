import pytest

from tinygptv.config import PRESETS, ConfigError, ModelConfig, parse_overrides, preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_yaml_round_trip(name, tmp_path):
    cfg = preset(name)
    cfg.to_yaml(tmp_path / "c.yaml")
    assert ModelConfig.from_yaml(tmp_path / "c.yaml") == cfg


def test_paper_preset_dims():
    cfg = preset("tinygptv-phi2")
    assert (cfg.vision.depth, cfg.vision.width, cfg.vision.heads, cfg.vision.mlp_dim, cfg.vision.patch_size) == (
        39, 1408, 16, 6144, 14)
    assert (cfg.qformer.layers, cfg.qformer.hidden, cfg.qformer.heads, cfg.qformer.num_queries,
            cfg.qformer.cross_attention_freq) == (12, 768, 12, 32, 2)
    assert cfg.projector.hidden == 4096
    assert (cfg.lm.hidden, cfg.lm.layers, cfg.lm.heads, cfg.lm.mlp_dim, cfg.lm.vocab_size) == (2560, 32, 32, 10240, 51200)
    assert cfg.lm.rotary_dim == 32 and cfg.lm.head_dim == 80
    assert preset("tinygptv-phi1.5").lm.hidden == 2048


def test_unknown_key_is_named(tmp_path):
    (tmp_path / "c.yaml").write_text("lm:\n  hiden: 3\n")
    with pytest.raises(ConfigError, match="lm.hiden"):
        ModelConfig.from_yaml(tmp_path / "c.yaml")


def test_bad_values():
    with pytest.raises(ConfigError, match="lm.hidden"):
        ModelConfig.from_dict({"lm": {"hidden": 65, "heads": 4}})
    with pytest.raises(ConfigError, match="lora.targets"):
        ModelConfig.from_dict({"lora": {"targets": ["query_key_valu"]}})
    with pytest.raises(ConfigError, match="expected an integer"):
        ModelConfig.from_dict({"lm": {"layers": 2.5}})
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("phi-3")


def test_overrides():
    cfg = preset("tiny").replace(**parse_overrides(["lm.layers=3", "lora.r=0", "lm.qk_norm=false"]))
    assert cfg.lm.layers == 3 and cfg.lora.r == 0 and cfg.lm.qk_norm is False
    with pytest.raises(ConfigError, match="lm.nope"):
        preset("tiny").replace(**{"lm.nope": 1})
