"""One readable training loop for every stage (reference §4), on CPU, one GPU, or many via ``torchrun``.

    model ← init checkpoint (or preset) ; set image size ; freeze all but the stage's trainable set
    for step: lr ← schedule ; batch ← mixture ; loss ← model(batch) (token mean) ; backward (accumulate)
              non-finite loss → skip the step, count, stop after N in a row ; clip ; AdamW step
              log metrics (JSONL) ; checkpoint atomically (trainable tensors + optimizer/RNG/data state)

Checkpoints are ``tinygptv.load``-able folders (trainable tensors over a ``base`` checkpoint) plus
``train_state.pt`` (read back with ``weights_only=True``); ``resume=True`` continues exactly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

import tinygptv
from tinygptv.config import PRESETS, ConfigError, preset
from tinygptv.templates import get_template
from tinygptv.train.config import StageConfig
from tinygptv.train.schedule import lr_at
from tinygptv.train.tower_cache import TowerCache

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
LATEST = "latest"


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. too many non-finite losses in a row)."""


# --------------------------------------------------------------------------------------------- setup
def distributed_env() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(name)


def build_model(cfg: StageConfig, device: torch.device) -> tuple[tinygptv.TinyGPTV, Path | None]:
    """The stage's starting model and its checkpoint folder (``None`` for a preset)."""
    overrides = dict(cfg.model)
    image_size = overrides.pop("vision.image_size", None)
    if cfg.init in PRESETS or cfg.init.endswith((".yaml", ".yml")):
        base_cfg = preset(cfg.init) if cfg.init in PRESETS else tinygptv.ModelConfig.from_yaml(cfg.init)
        model = tinygptv.load(base_cfg.replace(**overrides), seed=cfg.run.seed)
        base = None
    else:
        base = Path(cfg.init)
        if overrides:
            raise ConfigError(f"model overrides {sorted(overrides)} cannot change a checkpoint's architecture "
                              f"(only vision.image_size can); start from a preset or config instead")
        model = tinygptv.load(base)
    if image_size is not None and image_size != model.cfg.vision.image_size:
        model.vision.set_image_size(int(image_size))
    model.template = get_template(cfg.template)
    return model.to(device), base


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Reference decay groups: matrices decayed unless their name has 'bias', 'ln' or 'bn'; the rest not."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or any(s in name for s in ("bias", "ln", "bn")) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# --------------------------------------------------------------------------------------------- state
def rng_state() -> dict:
    state = {"python": list(random.getstate()[1]), "python_pos": random.getstate()[2],
             "numpy": np.random.get_state()[1].tolist(), "numpy_pos": int(np.random.get_state()[2]),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def find_latest(out: Path) -> Path | None:
    pointer = out / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    folder = out / "checkpoints" / pointer.read_text().strip()
    return folder if (folder / STATE_FILE).is_file() else None


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------- training
def train(cfg: StageConfig, data_root: str | Path, output_dir: str | Path, resume: bool = False,
          loader=None) -> Path:
    """Run one stage; returns the folder of its final checkpoint (``output_dir/final``)."""
    from tinygptv.data.mixing import MixtureLoader
    from tinygptv.data.registry import build_mixture
    from tinygptv.train.metrics import MetricsWriter

    rank, world, local_rank = distributed_env()
    device = pick_device(cfg.run.device, local_rank)
    cfg.run.amp = resolve_amp(cfg.run.amp, device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    out = Path(output_dir)
    if rank == 0:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        cfg.to_yaml(out / "stage.yaml")
    random.seed(cfg.run.seed + rank)
    np.random.seed(cfg.run.seed + rank)
    torch.manual_seed(cfg.run.seed + rank)

    latest = find_latest(out) if resume else None
    model, base = build_model(cfg, device)
    if latest is not None:
        log.info("resuming from %s", latest)
        model = tinygptv.load(latest).to(device)
        model.template = get_template(cfg.template)
    base_for_deltas = base if base is not None else (out / "base")
    if base is None and rank == 0 and not (out / "base" / "config.yaml").is_file():
        tinygptv.save(model, out / "base")  # a preset start: keep the frozen weights once
    n_trainable = model.set_trainable(**asdict(cfg.trainable))
    model.lm.gradient_checkpointing = cfg.run.grad_checkpointing
    if device.type == "cuda" and cfg.run.amp != "none":  # frozen weights in half precision, trainables fp32
        half = torch.bfloat16 if cfg.run.amp == "bf16" else torch.float16
        for p in model.parameters():
            if not p.requires_grad and p.is_floating_point():
                p.data = p.data.to(half)
    log.info("stage %s: %s trainable parameters", cfg.stage, f"{n_trainable:,}")
    resized = ["vision.vit.pos_embed"] if "vision.image_size" in cfg.model else []

    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.init_lr,
                                  betas=(0.9, cfg.optim.beta2))
    scaler = torch.amp.GradScaler("cuda") if cfg.run.amp == "fp16" and device.type == "cuda" else None
    if loader is None:
        loader = MixtureLoader(build_mixture(cfg.data.mixture, data_root), image_size=model.image_size,
                               seed=cfg.run.seed, rank=rank, world_size=world, num_workers=cfg.data.num_workers)
    step, nonfinite_total = 0, 0
    if latest is not None:
        state = torch.load(latest / STATE_FILE, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        loader.load_state_dict(json.loads(state["loader"]))
        set_rng_state(state["rng"][rank] if isinstance(state["rng"], list) else state["rng"])
        step, nonfinite_total = state["step"], state["nonfinite_total"]
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None,
                                                  find_unused_parameters=True)
    metrics = MetricsWriter(out, enabled=rank == 0, resume=latest is not None, step=step)
    trainable = [p for p in model.parameters() if p.requires_grad]
    total = cfg.run.total_steps
    save_every = cfg.run.save_every or cfg.run.iters_per_epoch
    nonfinite_run = 0
    progress = _progress(total, step, rank, cfg.stage)
    model.train()
    model.vision.eval()  # frozen towers stay in eval mode (no dropout), as upstream's disabled_train
    model.qformer.eval()
    if cfg.run.tower_cache_mb > 0:
        model.tower_cache = TowerCache([model.vision, model.qformer], cfg.run.tower_cache_mb * 2**20)
    autocast = amp_autocast(cfg.run.amp, device)
    tokens = samples = 0
    t_last = time.perf_counter()
    while step < total:
        epoch, i = divmod(step, cfg.run.iters_per_epoch)
        lr = lr_at(cfg.optim, epoch, i, cfg.run.iters_per_epoch, cfg.run.max_epoch)
        for g in optimizer.param_groups:
            g["lr"] = lr
        loss_sum, finite, grad_norm = 0.0, True, None
        for micro in range(cfg.run.accum_grad_iters):
            batch = next(loader)
            sync = contextlib.nullcontext() if world == 1 or micro == cfg.run.accum_grad_iters - 1 else net.no_sync()
            with sync, autocast:
                output = net(batch.examples, batch.pixels, cfg.data.max_txt_len)
            loss = output.loss
            if loss is None or not torch.isfinite(loss):
                finite = False
                break
            scaled = loss / cfg.run.accum_grad_iters
            (scaler.scale(scaled) if scaler else scaled).backward()
            loss_sum += loss.item()
            tokens += int((output.labels != -100).sum())
            samples += len(batch.examples)
        if world > 1:
            flag = torch.tensor([1.0 if finite else 0.0], device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            finite = bool(flag.item())
        if not finite:
            optimizer.zero_grad(set_to_none=True)
            nonfinite_run += 1
            nonfinite_total += 1
            log.warning("step %d: non-finite loss, step skipped (%d in a row)", step, nonfinite_run)
            if nonfinite_run >= cfg.run.max_nonfinite:
                raise TrainingStopped(f"{nonfinite_run} non-finite losses in a row at step {step}; lower the "
                                      f"learning rate, enable run.amp=bf16 instead of fp16, or check the data")
        else:
            nonfinite_run = 0
            if scaler:
                scaler.unscale_(optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.run.clip_grad_norm or float("inf")))
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        step += 1
        progress.update(1)
        if step % cfg.run.log_every == 0 or step == total:
            now = time.perf_counter()
            counters = loader.counters
            metrics.log({"step": step, "epoch": epoch, "loss": loss_sum / cfg.run.accum_grad_iters if finite else None,
                         "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens * world / (now - t_last),
                         "samples_per_s": samples * world / (now - t_last), "nonfinite_total": nonfinite_total,
                         "skipped_records": sum(c["bad_records"] for c in counters.values()),
                         "skipped_images": sum(c["bad_images"] for c in counters.values()),
                         **(model.tower_cache.stats() if model.tower_cache is not None else {})})
            progress.set_postfix(loss=f"{loss_sum / cfg.run.accum_grad_iters:.3f}", lr=f"{lr:.2e}")
            tokens = samples = 0
            t_last = now
        if step % save_every == 0 or step == total:
            _checkpoint(model, optimizer, scaler, loader, out, step, nonfinite_total, base_for_deltas, resized,
                        cfg, rank, world)
    progress.close()
    model.tower_cache = None
    metrics.close(cfg.stage)
    final = out / "final"
    if rank == 0:
        tinygptv.save(model, final, base=base_for_deltas, include=resized)
    if world > 1:
        torch.distributed.barrier()
    return final


def _checkpoint(model, optimizer, scaler, loader, out: Path, step: int, nonfinite_total: int, base: Path,
                resized: list[str], cfg: StageConfig, rank: int, world: int) -> None:
    """Atomic checkpoint: the folder appears complete or not at all; ``latest`` moves after it."""
    rngs = [None] * world
    if world > 1:
        torch.distributed.all_gather_object(rngs, rng_state())
        loaders = [None] * world
        torch.distributed.all_gather_object(loaders, json.dumps(loader.state_dict()))
    else:
        rngs = [rng_state()]
    if rank != 0:
        return
    state = {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None,
             "loader": json.dumps(loader.state_dict()), "rng": rngs if world > 1 else rngs[0], "step": step,
             "nonfinite_total": nonfinite_total, "stage": cfg.stage}
    name = f"step-{step:08d}"
    folder = out / "checkpoints" / name
    tinygptv.save(model, folder, base=base, include=resized,
                  extra=lambda tmp: torch.save(state, tmp / STATE_FILE))
    write_text_atomic(out / "checkpoints" / LATEST, name)
    old = sorted(p for p in (out / "checkpoints").glob("step-*") if p.name != name)
    for p in old[: max(0, len(old) - cfg.run.keep_checkpoints + 1)]:
        shutil.rmtree(p, ignore_errors=True)


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls are faster than fp32 here: CUDA with bf16 support, or a CPU with AMX / AVX-512-BF16.
    Elsewhere (e.g. AVX2-only CPUs) PyTorch emulates bf16 and autocast makes training several times slower
    (measured on an AVX2 EPYC: a 3072x256x768 matmul takes 96 ms in bf16 vs 13 ms in fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    cpu = torch.cpu
    return any(getattr(cpu, name, lambda: False)() for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def resolve_amp(amp: str, device: torch.device) -> str:
    """``auto`` → ``bf16`` where :func:`fast_bf16`, else ``none``; other values unchanged."""
    if amp != "auto":
        return amp
    chosen = "bf16" if fast_bf16(device) else "none"
    log.info("run.amp=auto: %s on %s", chosen, device)
    return chosen


def amp_autocast(amp: str, device: torch.device):
    """The autocast context of a resolved ``run.amp`` value (re-entered every step)."""
    if amp == "none":
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("run.amp=fp16 needs a CUDA device; use bf16 on CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def _progress(total: int, start: int, rank: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc=desc, disable=rank != 0, dynamic_ncols=True, mininterval=1.0)


__all__ = ["train", "TrainingStopped", "lr_at", "param_groups"]
