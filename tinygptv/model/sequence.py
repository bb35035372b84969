"""Multimodal sequence assembly and the loss, exactly as the reference training forward (§1.7, §5.6).

Per sample::

    [BOS] [condition: text segments around each <ImageHere>, each replaced by Q image embeddings]
          [target tokens (answer + end_sym, …) | target padding] [condition padding]

- Each text segment of the condition and each target part is tokenized separately, without special tokens.
- No condition (stages 1–2): the condition is the image embeddings alone. No image: the prompt text alone.
- Padding uses the embedding of ``pad_token_id`` with attention 0.
- Labels are −100 everywhere except supervised target tokens; target ids equal to ``pad_token_id`` are
  −100 too (upstream's pad = bos = eos = 50256 quirk, reference §9.7).
- Multi-turn (§5.6): target = ``a1+end``, ``<BOS>`` + ``q2`` (unsupervised, BOS attention 0), ``a2+end``, ….
- The target part is truncated to ``max_txt_len`` tokens (the end symbol can be cut, as upstream).
- Loss: token-mean cross-entropy over every supervised token of the batch (not a per-sample mean).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tinygptv.templates import IMAGE_PLACEHOLDER, ChatTemplate
from tinygptv.tokenizer import Tokenizer

IGNORE_INDEX = -100


@dataclass
class Example:
    """One training/scoring sample before tokenization.

    Attributes:
        condition: prompt text with one ``<ImageHere>`` per image, or ``None`` (image tokens only).
        targets: ordered ``(text, supervised)`` parts of the regress part.
        bos_before: indices into ``targets`` preceded by a BOS token that is attention-masked (§5.6).
    """

    condition: str | None
    targets: list[tuple[str, bool]] = field(default_factory=list)
    bos_before: tuple[int, ...] = ()


def single_turn(condition: str | None, answer: str, end_sym: str) -> Example:
    return Example(condition, [(answer + end_sym, True)])


def multi_turn(template: ChatTemplate, questions: list[str], answers: list[str]) -> Example:
    """The §5.6 layout; ``questions[0]`` should already carry the image prompt when there is an image."""
    if len(questions) != len(answers) or not questions:
        raise ValueError(f"multi-turn sample needs as many questions as answers (got {len(questions)}/{len(answers)})")
    targets: list[tuple[str, bool]] = []
    bos_before = []
    for i, (q, a) in enumerate(zip(questions, answers)):
        if i:
            bos_before.append(len(targets))
            targets.append((template.user_format.format(q), False))
        targets.append((a + template.end_sym, True))
    return Example(template.user_format.format(questions[0]), targets, tuple(bos_before))


@dataclass
class Batch:
    inputs_embeds: torch.Tensor  # [B, L, C]
    attention_mask: torch.Tensor  # [B, L] long
    labels: torch.Tensor  # [B, L] long, -100 = ignored


def build_batch(examples: list[Example], images: list[torch.Tensor | None], tokenizer: Tokenizer,
                embed: nn.Embedding, pad_token_id: int, bos_token_id: int, max_txt_len: int | None = None,
                add_bos: bool = True) -> Batch:
    """Assemble embeddings, attention mask and labels for a batch.

    Args:
        examples: one :class:`Example` per sample.
        images: per sample ``[n_i, Q, C]`` projected image embeddings, or ``None`` for text-only.
        embed: the LM's token embedding (its dtype/device are used for everything).
        max_txt_len: cap on target tokens per sample (``None`` = no cap).
        add_bos: prepend the BOS embedding (training does; upstream inference does not, §9.6).
    """
    if len(examples) != len(images):
        raise ValueError(f"{len(examples)} examples but {len(images)} image entries")
    device = next(iter(embed.state_dict().values())).device

    def emb(ids: list[int]) -> torch.Tensor:
        return embed(torch.tensor(ids, dtype=torch.long, device=device))  # [n, C]

    conds, tgt_ids, tgt_sup, tgt_att, tgt_img = [], [], [], [], []
    for ex, img in zip(examples, images):
        n_img = 0 if img is None else img.shape[0]
        used = 0  # images consumed so far, in placeholder order (condition first, then target parts)
        if ex.condition is None:
            if img is None:
                raise ValueError("an example with neither a prompt nor an image")
            conds.append(img.reshape(-1, img.shape[-1]))
            used = n_img
        else:
            pieces = []
            for i, seg in enumerate(ex.condition.split(IMAGE_PLACEHOLDER)):
                if i:
                    if used >= n_img:
                        _count_error(ex, n_img)
                    pieces.append(img[used])
                    used += 1
                ids = tokenizer.encode(seg)
                if ids:
                    pieces.append(emb(ids))
            conds.append(torch.cat(pieces) if pieces else emb([])[:0])
        ids, sup, att, img_rows = [], [], [], {}
        for j, (text, supervised) in enumerate(ex.targets):
            if j in ex.bos_before:
                ids.append(bos_token_id), sup.append(False), att.append(0 if bos_token_id == pad_token_id else 1)
            for k, seg in enumerate(text.split(IMAGE_PLACEHOLDER)):
                if k:  # an image inside a later turn (chat): its rows are context, never supervised
                    if used >= n_img:
                        _count_error(ex, n_img)
                    for row in img[used]:
                        img_rows[len(ids)] = row
                        ids.append(pad_token_id), sup.append(False), att.append(1)
                    used += 1
                part = tokenizer.encode(seg)
                ids += part
                sup += [supervised] * len(part)
                att += [1] * len(part)
        if used != n_img:
            _count_error(ex, n_img)
        if max_txt_len is not None:
            ids, sup, att = ids[:max_txt_len], sup[:max_txt_len], att[:max_txt_len]
        tgt_ids.append(ids), tgt_sup.append(sup), tgt_att.append(att), tgt_img.append(img_rows)

    B = len(examples)
    n_bos = 1 if add_bos else 0
    c_max = max(c.shape[0] for c in conds)
    t_max = max(len(t) for t in tgt_ids)
    L = n_bos + c_max + t_max
    pad_vec = emb([pad_token_id])[0]
    inputs = pad_vec.expand(B, L, -1).clone()
    mask = torch.zeros(B, L, dtype=torch.long, device=device)
    labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long, device=device)
    for b in range(B):
        if add_bos:
            inputs[b, 0] = emb([bos_token_id])[0]
            mask[b, 0] = 1
        c = conds[b].shape[0]
        inputs[b, n_bos:n_bos + c] = conds[b]
        mask[b, n_bos:n_bos + c] = 1
        t = len(tgt_ids[b])
        if t:
            start = n_bos + c
            ids = torch.tensor(tgt_ids[b], dtype=torch.long, device=device)
            inputs[b, start:start + t] = embed(ids)
            mask[b, start:start + t] = torch.tensor(tgt_att[b], device=device)
            sup = torch.tensor(tgt_sup[b], device=device) & (ids != pad_token_id)
            labels[b, start:start + t] = torch.where(sup, ids, torch.full_like(ids, IGNORE_INDEX))
            for pos, row in tgt_img[b].items():
                if pos < t:
                    inputs[b, start + pos] = row
    return Batch(inputs, mask, labels)


def _count_error(ex: Example, n_img: int) -> None:
    texts = [ex.condition or ""] + [t for t, _ in ex.targets]
    n = sum(t.count(IMAGE_PLACEHOLDER) for t in texts)
    raise ValueError(f"prompt has {n} {IMAGE_PLACEHOLDER} placeholder(s) but {n_img} image(s) were given: "
                     f"{ex.condition!r}")


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-mean next-token cross-entropy: ``logits [B,L,V]`` predict ``labels [B,L]`` shifted by one."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX)


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample sum of log p(label) over supervised positions: ``[B]``."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    tgt = labels[:, 1:]
    picked = logp.gather(-1, tgt.clamp(min=0)[..., None])[..., 0]
    return (picked * (tgt != IGNORE_INDEX)).sum(-1)
