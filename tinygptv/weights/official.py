"""Assemble a TinyGPT-V from the official weight files (what ``tinygptv import`` runs).

Inputs (reference §3): a Phi-2 / Phi-1.5 HF folder (any of the three published layouts), the LAVIS
``eva_vit_g.pth`` (or a BLIP-2 file that carries the ViT, or HF ``Blip2ForConditionalGeneration``
safetensors), a LAVIS BLIP-2 checkpoint for ``ln_vision``/``query_tokens``/Q-Former, and optionally a
TinyGPT-V stage checkpoint (LoRA, norms, projections) applied on top.

Dimensions come from the files (``config.json``, tensor shapes); what shapes cannot tell (ViT/Q-Former
heads, number of ViT blocks to keep, image size) comes from the base config (``--config`` or the paper
preset). Every tensor is accounted for: the only target tensors allowed to be absent are the ones the
formats are known to lack (the new norms and LoRA without a stage checkpoint, the projections before
stage 1), and those get the reference's initial values (§2.3) — the report lists them.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from tinygptv.config import ModelConfig, QFormerConfig, VisionConfig, preset
from tinygptv.model.phi import RMSNorm
from tinygptv.model.tinygptv import TinyGPTV
from tinygptv.tokenizer import Tokenizer
from tinygptv.weights.common import ImportReport, Tensors, WeightImportError, assign_tensors, read_tensor_file
from tinygptv.weights.phi import PHI_ABSENT_OK, load_phi_folder
from tinygptv.weights.stage import convert_stage_checkpoint
from tinygptv.weights.vision import convert_blip2_hf, convert_blip2_lavis, convert_eva_vit_lavis

log = logging.getLogger(__name__)


def vision_config_from_eva(sd: Tensors, base: VisionConfig, prefix: str = "") -> VisionConfig:
    """Width, patch and MLP size from a LAVIS EVA state dict; heads/depth/image size from ``base``."""
    proj = sd[prefix + "patch_embed.proj.weight"]  # [W, 3, P, P]
    fc1 = sd[prefix + "blocks.0.mlp.fc1.weight"]  # [mlp, W]
    blocks = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"blocks\.(\d+)\.", k))}
    depth = min(base.depth, len(blocks))
    return replace(base, width=proj.shape[0], patch_size=proj.shape[2], in_channels=proj.shape[1],
                   mlp_dim=fc1.shape[0], depth=depth)


def qformer_config_from_lavis(sd: Tensors, base: QFormerConfig) -> QFormerConfig:
    """Hidden size, queries, layers, MLP size and cross-attention cadence from a LAVIS BLIP-2 state dict."""
    q = sd["query_tokens"]  # [1, Q, H]
    layers = sorted({int(m.group(1)) for k in sd if (m := re.match(r"Qformer\.bert\.encoder\.layer\.(\d+)\.", k))})
    cross = [i for i in layers if f"Qformer.bert.encoder.layer.{i}.crossattention.self.query.weight" in sd]
    freq = cross[1] - cross[0] if len(cross) > 1 else base.cross_attention_freq
    mlp = sd["Qformer.bert.encoder.layer.0.intermediate_query.dense.weight"].shape[0]
    return replace(base, hidden=q.shape[2], num_queries=q.shape[1], layers=len(layers), mlp_dim=mlp,
                   cross_attention_freq=freq)


def import_official(llm: str | Path, vit: str | Path | None = None, qformer: str | Path | None = None,
                    stage_checkpoint: str | Path | None = None, hf_blip2: str | Path | None = None,
                    config: ModelConfig | None = None, seed: int = 0) -> tuple[TinyGPTV, ImportReport]:
    """Build a complete, strictly accounted model from the official files. See the module docstring."""
    base = config or preset("tinygptv-phi2")
    lm_cfg, lm_tensors, lm_report = load_phi_folder(llm, qk_norm=base.lm.qk_norm,
                                                    post_attn_norm=base.lm.post_attn_norm)
    reports = [lm_report]

    # --- vision side: dims from the files
    if hf_blip2 is not None:
        blip = _read(hf_blip2)
        vis_cfg, qf_cfg = _hf_blip2_configs(Path(hf_blip2), blip, base)
        vis_tensors, qf_tensors, rep = convert_blip2_hf(blip, vis_cfg, qf_cfg, name=str(hf_blip2))
        reports.append(rep)
    else:
        if qformer is None:
            raise ValueError("need --qformer (LAVIS BLIP-2 checkpoint) or --hf-blip2")
        blip = _read(qformer)
        qf_cfg = qformer_config_from_lavis(blip, base.qformer)
        if vit is not None:
            eva = _read(vit)
            vis_cfg = vision_config_from_eva(eva, base.vision)
            eva_tensors, rep = convert_eva_vit_lavis(eva, vis_cfg, name=str(vit))
            reports.append(rep)
            ln_tensors, qf_tensors, rep = convert_blip2_lavis(blip, vis_cfg, qf_cfg, name=str(qformer))
            vis_tensors = {**{f"vit.{k}": v for k, v in eva_tensors.items()}, **ln_tensors}
        elif any(k.startswith("visual_encoder.") for k in blip):
            vis_cfg = vision_config_from_eva(blip, base.vision, prefix="visual_encoder.")
            vis_tensors, qf_tensors, rep = convert_blip2_lavis(blip, vis_cfg, qf_cfg, include_vit=True,
                                                               name=str(qformer))
        else:
            raise ValueError(f"{qformer} has no ViT weights; pass --vit eva_vit_g.pth")
        reports.append(rep)

    # --- stage checkpoint (optional): LoRA rank from its shapes
    stage_tensors: Tensors = {}
    lora = base.lora
    if stage_checkpoint is not None:
        sd = _read(stage_checkpoint)
        probe = next((v for k, v in sd.items() if k.endswith(("lora_A.weight", "lora_A.default.weight"))), None)
        stage_tensors, qf_raw, info, rep = convert_stage_checkpoint(
            sd, lora_r_expected=0 if probe is None else probe.shape[0], num_layers=lm_cfg.layers,
            name=str(stage_checkpoint))
        reports.append(rep)
        lora = replace(lora, r=info["lora_r"], targets=list(info["lora_targets"]) or lora.targets)
        if qf_raw:  # upstream v0 stage 4 trained the Q-Former: route through the BLIP-2 converter
            _, qf_stage, rep = convert_blip2_lavis(_complete_blip(qf_raw, blip), vis_cfg, qf_cfg,
                                                   name=f"{stage_checkpoint} (Q-Former)")
            qf_tensors.update(qf_stage)
    cfg = replace(base, vision=vis_cfg, qformer=qf_cfg, lm=lm_cfg, lora=lora)

    # --- assign everything into a meta-built model with full accounting
    with torch.device("meta"):
        model = TinyGPTV(cfg)
    report = ImportReport(source="import")
    assign_tensors(model.vision, vis_tensors, report, prefix="vision.")
    assign_tensors(model.qformer, qf_tensors, report, prefix="qformer.")
    lm_stage = {k[len("lm."):]: v for k, v in stage_tensors.items() if k.startswith("lm.")}
    proj_stage = {k[len("projector."):]: v for k, v in stage_tensors.items() if k.startswith("projector.")}
    assign_tensors(model.lm, {**lm_tensors, **lm_stage}, report, absent_ok=PHI_ABSENT_OK, prefix="lm.")
    assign_tensors(model.projector, proj_stage, report, absent_ok=[r".*"], prefix="projector.")
    for rep in reports:
        report = report.merge(rep)
    init_missing(model, seed)
    report.raise_if_bad()
    if report.absent_expected:
        log.info("initialised as the reference does (absent from the files): %s",
                 _abbrev(report.absent_expected))
    model.tokenizer = Tokenizer.from_folder(llm)
    return model.eval(), report


def _complete_blip(stage_qformer: Tensors, blip: Tensors) -> Tensors:
    """Stage files hold only the trained Q-Former tensors; fill the rest from the BLIP-2 checkpoint."""
    out = {k: v for k, v in blip.items() if k.startswith(("Qformer.", "query_tokens", "ln_vision."))}
    out.update(stage_qformer)
    return out


@torch.no_grad()
def init_missing(model: nn.Module, seed: int = 0) -> list[str]:
    """Materialise parameters still on ``meta`` with the reference's initial values; return their names.

    New norms → weight 1 / bias 0 (§2.3); LoRA-A Kaiming-uniform(a=√5), LoRA-B 0 (§2.5); linear layers (the
    projections) PyTorch's default init (§1.4).
    """
    gen = torch.Generator().manual_seed(seed)
    done = []
    for mod_name, module in model.named_modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.device.type != "meta":
                continue
            value = torch.empty(p.shape, dtype=torch.float32)
            fan_in = p.shape[1] if p.ndim > 1 else (module.in_features if isinstance(module, nn.Linear) else 1)
            if isinstance(module, (nn.LayerNorm, RMSNorm)):
                value.fill_(1.0 if name == "weight" else 0.0)
            elif name == "lora_B":
                value.zero_()
            elif isinstance(module, nn.Linear) or name == "lora_A":
                bound = 1.0 / math.sqrt(fan_in)
                value.uniform_(-bound, bound, generator=gen)
            else:
                raise WeightImportError(f"no weights and no known initial value for {mod_name}.{name}")
            setattr(module, name, nn.Parameter(value, requires_grad=p.requires_grad))
            done.append(f"{mod_name}.{name}")
    return done


def _read(path: str | Path) -> Tensors:
    path = Path(path)
    if path.is_dir():
        from tinygptv.weights.common import read_hf_folder

        return read_hf_folder(path)
    return read_tensor_file(path)


def _hf_blip2_configs(path: Path, sd: Tensors, base: ModelConfig) -> tuple[VisionConfig, QFormerConfig]:
    folder = path if path.is_dir() else path.parent
    cfg_file = folder / "config.json"
    vis, qf = base.vision, base.qformer
    if cfg_file.is_file():
        c = json.loads(cfg_file.read_text())
        v, q = c.get("vision_config", {}), c.get("qformer_config", {})
        vis = replace(vis, width=v.get("hidden_size", vis.width), depth=v.get("num_hidden_layers", vis.depth),
                      heads=v.get("num_attention_heads", vis.heads), mlp_dim=v.get("intermediate_size", vis.mlp_dim),
                      patch_size=v.get("patch_size", vis.patch_size), ln_eps=v.get("layer_norm_eps", vis.ln_eps),
                      ln_vision_eps=v.get("layer_norm_eps", vis.ln_vision_eps))
        qf = replace(qf, hidden=q.get("hidden_size", qf.hidden), layers=q.get("num_hidden_layers", qf.layers),
                     heads=q.get("num_attention_heads", qf.heads), mlp_dim=q.get("intermediate_size", qf.mlp_dim),
                     cross_attention_freq=q.get("cross_attention_frequency", qf.cross_attention_freq),
                     ln_eps=q.get("layer_norm_eps", qf.ln_eps),
                     num_queries=c.get("num_query_tokens", qf.num_queries))
    else:
        log.warning("%s: no config.json beside the HF BLIP-2 weights; heads/eps from the base config", path)
    return vis, qf


def _abbrev(keys: list[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f", … ({len(keys)} in all)" if len(keys) > n else "")


__all__ = ["import_official", "init_missing", "vision_config_from_eva", "qformer_config_from_lavis"]
