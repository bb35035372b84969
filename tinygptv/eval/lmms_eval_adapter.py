"""Optional adapter: run TinyGPT-V inside lmms-eval (``pip install lmms-eval``; evaluation.md §5).

Importing this module never fails; instantiating :class:`TinyGPTVLmms` without lmms-eval raises ``ImportError``.
Use it in-process (lmms-eval ≥ 0.7 also accepts an entry point ``lmms_eval.models`` pointing here)::

    from lmms_eval.evaluator import simple_evaluate
    from tinygptv.eval.lmms_eval_adapter import TinyGPTVLmms
    simple_evaluate(model=TinyGPTVLmms(pretrained="path/to/ckpt"), tasks=["gqa"])

Contract (lmms-eval "simple" models):

- ``generate_until``: each request's ``args`` are ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)``;
  the context is wrapped in the upstream evaluation prompt (``###Human: <Img><ImageHere></Img> {context}###
  Assistant: ``) unless it already contains ``<ImageHere>`` or ``wrap_prompt=False``; greedy, ``max_new_tokens``
  from ``gen_kwargs`` (default 20); the text is cut at the first ``until`` string (and at ``###``), then stripped.
- ``loglikelihood``: ``args`` are ``(context, continuation, doc_to_visual, doc_id, task, split)``; returns
  ``(mean NLL of the continuation, False)`` per request. lmms-eval's ``multiple_choice`` scoring takes the
  **argmin** of the first values (``lmms_eval/api/task.py``), so a loss — not a log-probability — is returned,
  like its bundled LLaVA wrapper; ``is_greedy`` is not computed.
- ``generate_until_multi_round`` is not supported.
"""

from __future__ import annotations

from typing import Any, Sequence

from tinygptv.eval.base import PAPER_MAX_NEW_TOKENS, PAPER_WRAPPER
from tinygptv.eval.predictor import Predictor, as_predictor

try:
    from lmms_eval.api.model import lmms as _LmmsBase

    _IMPORT_ERROR: ImportError | None = None
except ImportError as exc:
    _LmmsBase = object
    _IMPORT_ERROR = exc

STOP_STRINGS = ("###",)


def build_prompt(context: str, has_image: bool, wrap: bool = True) -> str:
    """The prompt sent to the model for an lmms-eval context."""
    if not wrap or "<ImageHere>" in context:
        return context
    if has_image:
        return PAPER_WRAPPER.format(context)
    return PAPER_WRAPPER.replace("<Img><ImageHere></Img> ", "").format(context)


def cut_until(text: str, until: str | Sequence[str] | None) -> str:
    """Text before the first of the ``until`` strings (and ``###``), stripped."""
    stops = [until] if isinstance(until, str) else list(until or [])
    for stop in (*stops, *STOP_STRINGS):
        if stop:
            text = text.split(stop)[0]
    return text.strip()


def mean_nll(predictor: Predictor, image: Any, prompt: str, continuation: str) -> float:
    """Mean negative log-likelihood per continuation token."""
    logprob = predictor.loglikelihood([(image, prompt, continuation)])[0]
    n_tokens = predictor.count_tokens([continuation])[0]
    return -logprob / max(n_tokens, 1)


class TinyGPTVLmms(_LmmsBase):  # type: ignore[misc, valid-type]
    """lmms-eval model over a TinyGPT-V checkpoint (``pretrained``) or any :class:`Predictor` (``predictor``)."""

    is_simple = True

    def __init__(self, pretrained: str = "tiny", device: str = "cpu", predictor: Predictor | None = None,
                 max_new_tokens: int = PAPER_MAX_NEW_TOKENS, wrap_prompt: bool = True, **kwargs: Any):
        if _IMPORT_ERROR is not None:
            raise ImportError("TinyGPTVLmms needs lmms-eval: pip install lmms-eval "
                              f"(import failed: {_IMPORT_ERROR})") from _IMPORT_ERROR
        super().__init__()
        if predictor is None:
            import tinygptv

            predictor = as_predictor(tinygptv.load(pretrained, device=device))
        self.predictor = predictor
        self.max_new_tokens = max_new_tokens
        self.wrap_prompt = wrap_prompt

    def _visual(self, doc_to_visual: Any, doc_id: Any, task: str, split: str) -> Any:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
        if len(visuals) > 1:
            raise ValueError(f"{task}: {len(visuals)} images per document; TinyGPT-V evaluation takes one")
        return visuals[0] if visuals else None

    def generate_until(self, requests: list[Any]) -> list[str]:
        out = []
        for req in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            gen_kwargs = dict(gen_kwargs or {})
            image = self._visual(doc_to_visual, doc_id, task, split)
            prompt = build_prompt(context, image is not None, self.wrap_prompt)
            max_new = int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens)
            text = self.predictor.generate([image], [prompt], max_new)[0]
            out.append(cut_until(text, gen_kwargs.get("until")))
        return out

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        out = []
        for req in requests:
            context, continuation, doc_to_visual, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            if callable(continuation):
                continuation = continuation(doc)
            image = self._visual(doc_to_visual, doc_id, task, split)
            prompt = build_prompt(context, image is not None, self.wrap_prompt)
            out.append((mean_nll(self.predictor, image, prompt, str(continuation)), False))
        return out

    def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
        raise NotImplementedError("TinyGPTVLmms does not support multi-round generation")


__all__ = ["TinyGPTVLmms", "build_prompt", "cut_until", "mean_nll"]
