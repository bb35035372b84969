"""TinyGPT-V: EVA ViT → ln_vision → Q-Former → proj1 → proj2 → Phi (+LoRA, QK-norm, RMSNorm).

Reference §1.1 (data flow, 32 image tokens at every image size) and §1.7 (training forward).
The constructor is pure (no I/O); weights, tokenizer and template are attached by
:func:`tinygptv.checkpoint.load`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from tinygptv.config import ModelConfig
from tinygptv.image import ImageInput, preprocess
from tinygptv.model.phi import PhiLM
from tinygptv.model.projector import Projector
from tinygptv.model.qformer import QFormer
from tinygptv.model.sequence import Batch, Example, build_batch, causal_lm_loss, token_logprobs
from tinygptv.model.vision import VisionEncoder
from tinygptv.templates import ChatTemplate, get_template
from tinygptv.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class ModelOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor  # [B, L, V] fp32
    labels: torch.Tensor  # [B, L]


class TinyGPTV(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionEncoder(cfg.vision)
        self.qformer = QFormer(cfg.qformer, cfg.vision.width)
        self.projector = Projector(cfg.qformer.hidden, cfg.projector.hidden, cfg.lm.hidden)
        self.lm = PhiLM(cfg.lm, cfg.lora)
        self.tokenizer: Tokenizer | None = None
        self.template: ChatTemplate = get_template("stage4")
        self.add_bos = True  # training prepends BOS; set False to reproduce upstream inference (§9.6)
        # optional memo of the frozen towers' outputs (training sets one: tinygptv.train.tower_cache)
        self.tower_cache: Callable[[torch.Tensor, Callable], torch.Tensor] | None = None

    # ----------------------------------------------------------------------------------- images
    @property
    def image_size(self) -> int:
        return self.cfg.vision.image_size

    @property
    def dtype(self) -> torch.dtype:
        """The LM's compute dtype (its final norm's; embeddings may be stored quantized)."""
        return self.lm.final_layernorm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm.final_layernorm.weight.device

    def pixel_values(self, images: list[ImageInput]) -> torch.Tensor:
        """Preprocess images into ``[N, 3, S, S]`` on the model's device (vision dtype)."""
        vis_dtype = self.vision.vit.patch_embed.proj.weight.dtype
        return torch.stack([preprocess(im, self.image_size) for im in images]).to(self.device, vis_dtype)

    def image_queries(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[N, 3, S, S]`` → ``[N, Q, H]`` Q-Former outputs (the towers the paper keeps frozen)."""
        feats = self.vision(pixels)  # [N, 1+g², W]
        return self.qformer(feats)  # [N, Q, H]

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[N, 3, S, S]`` → ``[N, Q, C_lm]`` image embeddings for the LM."""
        if self.tower_cache is not None:
            queries = self.tower_cache(pixels, self.image_queries)
        else:
            queries = self.image_queries(pixels)
        return self.projector(queries.to(self.projector.dtype)).to(self.dtype)  # [N, Q, C]

    # ----------------------------------------------------------------------------------- training
    def prepare(self, examples: list[Example], pixels: list[torch.Tensor | None],
                max_txt_len: int | None = None) -> Batch:
        """Encode every image of the batch at once and assemble the sequence (reference §1.7)."""
        self._need_tokenizer()
        present = [p for p in pixels if p is not None]
        embeds: list[torch.Tensor | None] = []
        if present:
            flat = self.encode_images(torch.cat(present))
            i = 0
            for p in pixels:
                if p is None:
                    embeds.append(None)
                else:
                    embeds.append(flat[i:i + p.shape[0]])
                    i += p.shape[0]
        else:
            embeds = [None] * len(pixels)
        c = self.cfg.lm
        return build_batch(examples, embeds, self.tokenizer, self.lm.embed_tokens, c.pad_token_id, c.bos_token_id,
                           max_txt_len=max_txt_len, add_bos=self.add_bos)

    def forward(self, examples: list[Example], pixels: list[torch.Tensor | None],
                max_txt_len: int | None = None) -> ModelOutput:
        batch = self.prepare(examples, pixels, max_txt_len)
        logits = self.lm(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask)
        loss = causal_lm_loss(logits, batch.labels) if (batch.labels != -100).any() else None
        return ModelOutput(loss, logits, batch.labels)

    # ----------------------------------------------------------------------------------- public API
    @torch.no_grad()
    def loglikelihood(self, image: ImageInput | list[ImageInput] | None, prompt: str, continuation: str) -> float:
        """log p(continuation | image, prompt), laid out exactly as the training forward lays it out.

        ``prompt`` is used verbatim and must contain one ``<ImageHere>`` per image. Text-only: ``image=None``.
        """
        images = _as_list(image)
        pixels = [self.pixel_values(images)] if images else [None]
        batch = self.prepare([Example(prompt, [(continuation, True)])], pixels)
        logits = self.lm(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask)
        return float(token_logprobs(logits, batch.labels)[0])

    def format_prompt(self, question: str, with_image: bool) -> str:
        """A user question in the checkpoint's template, e.g. ``[INST] <Img><ImageHere></Img> q  [/INST]``."""
        return self.template.user_turn(question, with_image)

    def generate(self, image: ImageInput | list[ImageInput] | None, prompt: str, max_new_tokens: int = 64,
                 chat: bool = True, **sampling) -> str:
        """Answer ``prompt`` (greedy unless sampling settings are given, see
        :class:`tinygptv.infer.generate.GenerationConfig`). With ``chat=True`` the prompt is wrapped in the
        checkpoint's template; with ``chat=False`` it is used verbatim (one ``<ImageHere>`` per image)."""
        from tinygptv.infer.engine import Engine, GenerationConfig, Request

        self._need_tokenizer()
        engine = Engine(self)  # a fresh image cache: weights may have changed since the last call
        images = _as_list(image)
        request = engine.chat_request(prompt, images) if chat else Request(prompt, images)
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, **sampling)
        return engine.generate([request], cfg)[0].text

    def _need_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise RuntimeError("this model has no tokenizer attached; load it with tinygptv.load(...) or set "
                               "model.tokenizer = tinygptv.Tokenizer.from_folder(...)")

    def fold_projector(self) -> None:
        self.projector.fold()

    def set_trainable(self, lora: bool = True, norms: bool = True, projector: bool = True,
                      qformer: bool = False, vision: bool = False, input_norm: bool = True, lm: bool = False) -> int:
        """Freeze everything, then unfreeze the reference's trainable sets (§2.4); returns the trainable count.

        ``norms`` = the *weights* (never biases) of every layer's input LayerNorm, QK LayerNorms, post-attention
        RMSNorm and the final LayerNorm (``input_norm=False`` leaves the input LayerNorms frozen: the paper's
        "w/o input LayerNorm" ablation). ``qformer`` also unfreezes ``query_tokens`` (upstream v0 stage 4);
        ``lm`` unfreezes the whole language model (stage-0 pretraining of the nano model only).
        """
        self.requires_grad_(False)
        for name, p in self.lm.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if lora and leaf in ("lora_A", "lora_B"):
                p.requires_grad_(True)
            kinds = ("q_norm", "k_norm", "post_attn_norm", "final_layernorm") + (("input_layernorm",) if input_norm else ())
            if lm or (norms and leaf == "weight" and any(f".{n}." in f".{name}" for n in kinds)):
                p.requires_grad_(True)
        self.projector.requires_grad_(projector)
        self.qformer.requires_grad_(qformer)
        self.vision.requires_grad_(vision)
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def _as_list(image: ImageInput | list[ImageInput] | None) -> list[ImageInput]:
    if image is None:
        return []
    return list(image) if isinstance(image, (list, tuple)) else [image]


__all__ = ["TinyGPTV", "ModelOutput"]
