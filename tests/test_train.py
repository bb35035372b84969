"""Training: schedules, per-stage trainable sets, resume, non-finite guard, distributed equivalence."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import tinygptv
from tinygptv.train.config import OptimConfig, StageConfig
from tinygptv.train.loop import TrainingStopped, train
from tinygptv.train.schedule import lr_at

RECIPE = Path(tinygptv.__file__).parent / "configs" / "train"
COLOURS = {"red": (220, 30, 30), "blue": (30, 40, 220), "green": (30, 200, 60), "gray": (128, 128, 128)}


# ------------------------------------------------------------------------------------------ schedules
def test_upstream_schedule_values():
    """Values computed from the reference formula (tinygptv-official.md §4.4)."""
    s1 = OptimConfig(init_lr=1e-4, min_lr=8e-5, warmup_lr=1e-6, warmup_steps=1000)
    assert lr_at(s1, 0, 0, 5000, 1) == pytest.approx(1e-6)
    assert lr_at(s1, 0, 500, 5000, 1) == pytest.approx(1e-6 + 99e-6 * 0.5)
    assert lr_at(s1, 0, 1000, 5000, 1) == pytest.approx(9.81e-5, abs=5e-8)
    assert lr_at(s1, 0, 4999, 5000, 1) == pytest.approx(8.0e-5, abs=1e-9)
    s2 = OptimConfig(init_lr=1e-4, min_lr=8e-5, warmup_lr=1e-6, warmup_steps=5000)
    assert lr_at(s2, 1, 0, 5000, 4) == pytest.approx(9.707e-5, abs=1e-8)
    assert lr_at(s2, 2, 0, 5000, 4) == pytest.approx(9.0e-5)
    s3 = OptimConfig(init_lr=3e-5, min_lr=1e-5, warmup_lr=1e-6, warmup_steps=200)
    assert lr_at(s3, 1, 0, 200, 5) == pytest.approx(2.809e-5, abs=1e-8)
    assert lr_at(s3, 2, 100, 200, 5) == pytest.approx(2.0e-5)
    up4 = OptimConfig(init_lr=1e-5, min_lr=8e-5, warmup_lr=1e-6, warmup_steps=1000)  # upstream's rising "decay"
    assert lr_at(up4, 10, 0, 1000, 50) == pytest.approx(1.67e-5, abs=5e-8)
    assert lr_at(up4, 25, 0, 1000, 50) == pytest.approx(4.5e-5)


def test_paper_stage1_sawtooth_and_step_schedule():
    p1 = StageConfig.from_yaml(RECIPE / "stage1.yaml").optim
    assert lr_at(p1, 3, 0, 1000, 17) == pytest.approx(1e-5)
    assert lr_at(p1, 3, 500, 1000, 17) == pytest.approx(5.5e-5)
    assert lr_at(p1, 16, 999, 1000, 17) == pytest.approx(1e-5 + 9e-5 * 0.999)
    step = OptimConfig(schedule="linear_warmup_step", init_lr=1e-4, min_lr=1e-5, warmup_lr=1e-6, warmup_steps=10,
                       lr_decay_rate=0.5)
    assert lr_at(step, 0, 5, 100, 5) == pytest.approx(1e-6 + 99e-6 * 0.5)
    assert lr_at(step, 2, 0, 100, 5) == pytest.approx(2.5e-5)
    assert lr_at(step, 4, 0, 100, 5) == pytest.approx(1e-5)


def test_stage4_default_decays_and_configs_parse():
    cfgs = {n: StageConfig.from_yaml(RECIPE / f"{n}.yaml") for n in ("stage1", "stage2", "stage3", "stage4")}
    s4 = cfgs["stage4"]
    assert s4.optim.min_lr < s4.optim.init_lr and s4.model["vision.image_size"] == 448
    assert not cfgs["stage1"].trainable.lora and all(cfgs[n].trainable.lora for n in ("stage2", "stage3", "stage4"))
    assert sum(m["ratio"] for m in s4.data.mixture.values()) == 690
    with pytest.raises(Exception, match="run.nope"):
        cfgs["stage1"].with_overrides({"run.nope": 1})


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture
def custom_data(tmp_path):
    """8 records, every answer the same token length (so per-rank token means equal the global one)."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    with open(root / "train.jsonl", "w") as fh:
        for i, (name, rgb) in enumerate(list(COLOURS.items()) * 2):
            Image.new("RGB", (32, 24), rgb).save(root / "images" / f"{i}.png")
            fh.write(json.dumps({"id": str(i), "image": f"images/{i}.png", "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is it?"},
                {"from": "gpt", "value": f"It is {name:>5}."}]}) + "\n")
    return root


def stage(name: str, data: Path, steps: int = 2, batch: int = 2, **over) -> StageConfig:
    cfg = StageConfig.from_yaml(RECIPE / f"{name}.yaml")
    mixture = {"custom": {"batch_size": batch, "ratio": 1,
                          "paths": {"ann_path": str(data / "train.jsonl"), "image_root": str(data)},
                          "options": {"template": cfg.template}}}
    base = {"init": "tiny", "run.max_epoch": 1, "run.iters_per_epoch": steps, "run.amp": "none",
            "run.grad_checkpointing": False, "run.log_every": 1, "run.device": "cpu", "data.num_workers": 0,
            "model.lm.resid_dropout": 0.0, "optim.warmup_steps": 1, "optim.init_lr": 1e-2}
    if name == "stage4":
        base["model.vision.image_size"] = 56
    cfg = cfg.with_overrides({**base, **over})
    data_cfg = cfg.data
    data_cfg.mixture = mixture
    return cfg


@pytest.mark.parametrize("name", ["stage1", "stage2", "stage3", "stage4"])
def test_two_steps_change_exactly_the_trainable_set(name, custom_data, tmp_path):
    cfg = stage(name, custom_data)
    before = tinygptv.load(cfg.init, seed=cfg.run.seed).state_dict()
    final = train(cfg, custom_data, tmp_path / "out")
    after = tinygptv.load(final)
    changed = {k for k, v in after.state_dict().items() if k in before and v.shape == before[k].shape
               and not torch.equal(v, before[k])}
    probe = tinygptv.load("tiny")
    probe.set_trainable(**vars(cfg.trainable))
    expected = {n for n, p in probe.named_parameters() if p.requires_grad}
    if name == "stage4":  # the resized position embedding is frozen but saved with the checkpoint
        assert after.cfg.vision.image_size == 56 and after.vision.vit.pos_embed.shape[1] == 17
    assert changed == expected, (sorted(changed ^ expected))[:10]
    assert not any(k.startswith(("vision.", "qformer.")) for k in changed)
    assert not any(k.endswith("bias") and not k.startswith("projector.") for k in changed)  # norm biases frozen
    assert (name == "stage1") == (not any("lora" in k for k in changed))
    metrics = [json.loads(ln) for ln in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(m["loss"] > 0 for m in metrics)
    assert (tmp_path / "out" / "loss_curve.png").is_file()


def test_resume_reproduces_uninterrupted_run(custom_data, tmp_path):
    cfg = stage("stage2", custom_data, steps=6, **{"run.save_every": 2})
    ref = tinygptv.load(train(cfg, custom_data, tmp_path / "a")).state_dict()

    class Interrupt(Exception):
        pass

    from tinygptv.data import mixing

    calls = {"n": 0}
    original = mixing.MixtureLoader.__next__

    def flaky(self):
        calls["n"] += 1
        if calls["n"] == 4:  # dies during step 4 (after the step-2 checkpoint… and before step 4's)
            raise Interrupt
        return original(self)

    mixing.MixtureLoader.__next__ = flaky
    try:
        with pytest.raises(Interrupt):
            train(cfg, custom_data, tmp_path / "b")
    finally:
        mixing.MixtureLoader.__next__ = original
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text() == "step-00000002"
    resumed = tinygptv.load(train(cfg, custom_data, tmp_path / "b", resume=True)).state_dict()
    for k, v in ref.items():
        torch.testing.assert_close(resumed[k], v, rtol=0, atol=1e-6, msg=k)
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in lines] == [1, 2, 3, 4, 5, 6]


def test_nonfinite_guard(custom_data, tmp_path, monkeypatch):
    from tinygptv.model.tinygptv import ModelOutput, TinyGPTV

    real = TinyGPTV.forward

    def nan_forward(self, *a, **k):
        out = real(self, *a, **k)
        return ModelOutput(out.loss * float("nan"), out.logits, out.labels)

    monkeypatch.setattr(TinyGPTV, "forward", nan_forward)
    cfg = stage("stage2", custom_data, steps=10, **{"run.max_nonfinite": 3})
    with pytest.raises(TrainingStopped, match="3 non-finite"):
        train(cfg, custom_data, tmp_path / "o")


def test_dry_run_and_bad_root(custom_data, tmp_path, capsys):
    from tinygptv.cli import main

    cfg = stage("stage3", custom_data)
    cfg.to_yaml(tmp_path / "s.yaml")
    assert main(["train", "--config", str(tmp_path / "s.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "AdamW state" in out and "fits" in out and "frozen-tower cache" in out
    from tinygptv.train.memory import estimate

    model = tinygptv.load("tiny")
    model.set_trainable(**vars(cfg.trainable))
    with_cache = estimate(model.cfg, model, cfg, torch.device("cpu"))
    without = estimate(model.cfg, model, cfg.with_overrides({"run.tower_cache_mb": 0}), torch.device("cpu"))
    assert abs(with_cache.total - without.total - 1.1 * 2**30) <= 1  # the default 1024 MB bound, +10 %
    on_gpu = estimate(model.cfg, model, cfg, torch.device("cuda"))  # host memory: shown, not in the GPU's total
    assert on_gpu.tower_cache and "not in the total" in on_gpu.table()
    bad = stage("stage3", tmp_path / "missing")
    with pytest.raises(Exception, match="missing"):
        train(bad, tmp_path / "missing", tmp_path / "o2")


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun gloo test on Linux")
def test_two_process_gloo_matches_one_process(custom_data, tmp_path):
    """2 ranks × batch 2 vs 1 rank × batch 4: same samples, same token counts per rank → same update.
    Tolerance 1e-5 (different reduction order of the gradient all-reduce)."""
    one = stage("stage2", custom_data, steps=2, batch=4)
    two = stage("stage2", custom_data, steps=2, batch=2)
    ref = tinygptv.load(train(one, custom_data, tmp_path / "one")).state_dict()
    two.to_yaml(tmp_path / "two.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--log-dir", str(tmp_path / "logs"), "--redirects", "3", "-m", "tinygptv", "train",
                           "--config", str(tmp_path / "two.yaml"), "--data-root", str(custom_data),
                           "--output", str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=300)
    rank_logs = "".join(f"\n--- {f}:\n{f.read_text(errors='replace')[-3000:]}"
                        for f in sorted((tmp_path / "logs").rglob("*.log")))
    assert proc.returncode == 0, proc.stderr[-3000:] + rank_logs  # the ranks' own output is in their log files
    got = tinygptv.load(tmp_path / "two" / "final").state_dict()
    for k, v in ref.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-5, msg=k)
    logs = {p.parent.name: p.read_text() for p in (tmp_path / "logs").rglob("stderr.log")}
    assert len(logs) == 2
    assert sum("saved checkpoint" in t for t in logs.values()) == 1


def test_amp_auto_uses_bf16_only_where_the_cpu_has_fast_bf16(monkeypatch):
    from tinygptv.config import ConfigError
    from tinygptv.train import loop
    from tinygptv.train.config import RunConfig

    cpu = torch.device("cpu")
    for amx, avx512_bf16, fast in ((True, False, True), (False, True, True), (False, False, False)):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False)
        assert loop.fast_bf16(cpu) is fast
        assert loop.resolve_amp("auto", cpu) == ("bf16" if fast else "none")
        assert loop.resolve_amp("bf16", cpu) == "bf16"  # an explicit choice is kept
    assert RunConfig(amp="auto").amp == "auto"
    with pytest.raises(ConfigError, match="run.amp"):
        RunConfig(amp="fp8")


# ------------------------------------------------------------------------------------------ tower cache
def test_tensor_lru_bounds_by_entries_and_bytes():
    from tinygptv.lru import TensorLRU

    lru = TensorLRU(max_bytes=3 * 16)  # three 4-float tensors
    for i in range(4):
        lru.put(i, torch.full((4,), float(i)))
    assert list(lru.items) == [1, 2, 3] and lru.nbytes == 48
    assert lru.get(1) is not None and lru.get(0) is None and (lru.hits, lru.misses) == (1, 1)
    lru.put(4, torch.zeros(4))  # 1 was used last, so 2 goes
    assert list(lru.items) == [3, 1, 4]
    lru.put(5, torch.zeros(100))  # larger than the whole bound: not stored, nothing evicted
    assert list(lru.items) == [3, 1, 4]
    lru.put(3, torch.zeros(2))  # replacing a key updates the byte count
    assert lru.nbytes == 40
    by_count = TensorLRU(max_entries=2)
    for i in range(3):
        by_count.put(i, torch.zeros(1))
    assert list(by_count.items) == [1, 2]
    assert len(TensorLRU(max_entries=0)) == 0


def test_tower_cache_matches_the_towers_and_steps_aside_when_they_change(tiny_model):
    from tinygptv.train.tower_cache import TowerCache

    model = tiny_model.eval().requires_grad_(False)
    S = model.image_size
    pixels = torch.randn(3, 3, S, S, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.image_queries(pixels)
    sizes = []
    towers = model.image_queries
    model.image_queries = lambda p: sizes.append(p.shape[0]) or towers(p)
    model.tower_cache = TowerCache([model.vision, model.qformer], 2**20)
    with torch.no_grad():
        first = model.tower_cache(pixels[[0, 1, 0]], model.image_queries)  # one image twice: computed once
        second = model.tower_cache(pixels[[1, 2]], model.image_queries)  # only the new one goes through
    assert sizes == [2, 1] and len(model.tower_cache.lru) == 3
    torch.testing.assert_close(first, want[[0, 1, 0]], rtol=0, atol=1e-5)
    torch.testing.assert_close(second, want[[1, 2]], rtol=0, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast changes the towers' output: its own entry
        model.tower_cache(pixels[:1], model.image_queries)
    assert sizes[-1] == 1 and len(model.tower_cache.lru) == 4
    with torch.no_grad():
        enc = model.encode_images(pixels[:2])  # the model's own path uses the cache
        assert sizes[-1] == 1 and torch.allclose(enc, model.projector(want[:2]), atol=1e-5)
    model.qformer.train()  # dropout on: nothing may come from (or go into) the cache
    model.tower_cache(pixels[:2], model.image_queries)
    assert sizes[-1] == 2 and len(model.tower_cache.lru) == 4
    model.qformer.eval()
    model.vision.vit.patch_embed.proj.weight.requires_grad_(True)  # a trainable tower: the same
    model.tower_cache(pixels[:2], model.image_queries)
    assert sizes[-1] == 2 and len(model.tower_cache.lru) == 4


def test_training_with_the_tower_cache_equals_training_without(custom_data, tmp_path):
    cfg = stage("stage2", custom_data, steps=6)  # 8 images, 2 a step: from step 5 every image is cached
    cached = tinygptv.load(train(cfg, custom_data, tmp_path / "a")).state_dict()
    plain = tinygptv.load(train(stage("stage2", custom_data, steps=6, **{"run.tower_cache_mb": 0}),
                                custom_data, tmp_path / "b")).state_dict()
    for k, v in plain.items():
        torch.testing.assert_close(cached[k], v, rtol=0, atol=1e-6, msg=k)
    metrics = [json.loads(ln) for ln in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["tower_cache_hit_rate"] > 0
    assert "tower_cache_hit_rate" not in json.loads((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()[-1])
