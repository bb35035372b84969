"""The small interface the benchmarks run on, and an adapter over a :class:`~tinygptv.TinyGPTV` model.

Benchmarks only ever call a :class:`Predictor`, so tests can pass a scripted fake and the batched inference
engine can replace :class:`ModelPredictor`'s per-item loops later without touching the benchmarks.
"""

from __future__ import annotations

import dataclasses
import logging
from contextlib import contextmanager
from typing import Any, Iterator, Protocol, Sequence, runtime_checkable

log = logging.getLogger(__name__)

ImageLike = Any  # a path, bytes or PIL image (whatever ``tinygptv.image.load_image`` accepts), or None
LLItem = tuple[ImageLike, str, str]  # (image, prompt, continuation)


@runtime_checkable
class Predictor(Protocol):
    """What the evaluation needs from a model.

    - ``generate``: greedy continuation of each prompt, used **verbatim** (it contains one ``<ImageHere>`` per
      image), up to ``max_new_tokens`` tokens, stopping only at EOS — no stop strings: scorers trim themselves.
    - ``loglikelihood``: ``log p(continuation | image, prompt)`` summed over the continuation tokens.
    - ``count_tokens``: number of tokens of each text tokenised on its own (for mean-NLL ranking).
    """

    def generate(self, images: list[ImageLike], prompts: list[str], max_new_tokens: int) -> list[str]: ...

    def loglikelihood(self, items: list[LLItem]) -> list[float]: ...

    def count_tokens(self, texts: list[str]) -> list[int]: ...


class ModelPredictor:
    """:class:`Predictor` over a TinyGPT-V model, one item at a time.

    Defaults reproduce the upstream evaluator (evaluation.md §1, official reference §1.8):

    - generation: ``model.generate(image, prompt, max_new_tokens, chat=False)`` with no BOS (``add_bos=False``),
      greedy, and no stop string (upstream's stopping criterion is commented out, so only EOS or
      ``max_new_tokens`` end it): the model's template stop strings are disabled while generating;
    - log-likelihood: the training layout, BOS first (``loglikelihood_add_bos=True``), as upstream
      ``multi_select`` runs the training forward.

    Known differences from upstream decoding, both rare: upstream passes ``min_length=1`` (EOS forbidden as the
    very first token; here the answer is then ``""``) and drops a leading token id 0 (``!`` in Phi-2) before
    decoding (here it is kept, as only text comes back from ``model.generate``).

    The model's ``add_bos`` and ``template`` are restored after every call.
    """

    def __init__(self, model: Any, add_bos: bool = False, loglikelihood_add_bos: bool = True):
        if getattr(model, "tokenizer", None) is None:
            raise RuntimeError("the model has no tokenizer; load it with tinygptv.load(..., tokenizer=...)")
        self.model = model
        self.add_bos = add_bos
        self.loglikelihood_add_bos = loglikelihood_add_bos

    def describe(self) -> dict[str, Any]:
        """Settings recorded in ``results.json``."""
        return {"class": type(self).__name__, "model": getattr(getattr(self.model, "cfg", None), "name", None),
                "generate_add_bos": self.add_bos, "loglikelihood_add_bos": self.loglikelihood_add_bos,
                "decoding": "greedy, no stop strings"}

    @contextmanager
    def _state(self, add_bos: bool, raw_template: bool) -> Iterator[None]:
        model = self.model
        saved_bos, saved_template = model.add_bos, model.template
        try:
            model.add_bos = add_bos
            if raw_template:
                model.template = dataclasses.replace(saved_template, end_sym="", stop=())
            yield
        finally:
            model.add_bos, model.template = saved_bos, saved_template

    def generate(self, images: list[ImageLike], prompts: list[str], max_new_tokens: int) -> list[str]:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        out = []
        with self._state(self.add_bos, raw_template=True):
            for image, prompt in zip(images, prompts):
                out.append(self.model.generate(_image_arg(image), prompt, max_new_tokens=max_new_tokens, chat=False))
        return out

    def loglikelihood(self, items: list[LLItem]) -> list[float]:
        with self._state(self.loglikelihood_add_bos, raw_template=False):
            return [float(self.model.loglikelihood(_image_arg(image), prompt, continuation))
                    for image, prompt, continuation in items]

    def count_tokens(self, texts: list[str]) -> list[int]:
        return [len(self.model.tokenizer.encode(t)) for t in texts]


def _image_arg(image: ImageLike) -> Any:
    return str(image) if hasattr(image, "__fspath__") else image


def as_predictor(model_or_predictor: Any, **kwargs: Any) -> Predictor:
    """A :class:`Predictor` as is; a model wrapped in :class:`ModelPredictor` (``kwargs`` go to it)."""
    if isinstance(model_or_predictor, Predictor):
        return model_or_predictor
    if hasattr(model_or_predictor, "template") and hasattr(model_or_predictor, "add_bos"):
        return ModelPredictor(model_or_predictor, **kwargs)
    raise TypeError(f"{type(model_or_predictor).__name__} is neither a Predictor (generate, loglikelihood, "
                    "count_tokens) nor a TinyGPT-V model")


def describe_predictor(predictor: Predictor) -> dict[str, Any]:
    describe = getattr(predictor, "describe", None)
    return describe() if callable(describe) else {"class": type(predictor).__name__}


def batched(seq: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """Consecutive slices of at most ``size`` items."""
    if size < 1:
        raise ValueError("batch size must be >= 1")
    for i in range(0, len(seq), size):
        yield seq[i:i + size]
