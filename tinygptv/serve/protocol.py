"""The ``/v1/chat/completions`` request schema and its mapping onto the engine.

Messages → the engine's conversation layout (:class:`tinygptv.infer.chat.Conversation`):

- ``system`` text is prepended to the next user turn (the TinyGPT-V templates have no system slot);
- consecutive ``user`` messages merge into one turn, as do consecutive ``assistant`` messages;
- ``assistant`` messages are the answers of earlier turns (context, never generated again);
- the last message must be from the user; each user turn holds at most one image (one ``<ImageHere>``).

Images come as ``data:image/...;base64,...`` URLs, or as local paths / ``file://`` URLs when the server was
started with an image folder, and only inside it (symlinks resolved). Remote ``http(s)`` URLs are refused: the
server never fetches anything. Images are decoded (within ``max_image_pixels``) and resized to the model's square
input here, in the request's thread, so queued requests stay small; the pixels are those the model would see.

Sampling: ``temperature`` defaults to 0 (greedy, reproducible), not OpenAI's 1. ``max_tokens`` (or
``max_completion_tokens``) is clamped to the room left in the context; a prompt that leaves no room, or is longer
than ``max_prompt_tokens``, is a 400 ``context_length_exceeded`` (conversations are never silently truncated).
Every problem raises :class:`ApiError` (400), never a 500.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import unquote, urlparse

import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from tinygptv.image import ImageError, load_image
from tinygptv.infer.chat import Conversation, Turn
from tinygptv.infer.engine import Engine, Request
from tinygptv.infer.generate import GenerationConfig
from tinygptv.model.sequence import Example, build_batch
from tinygptv.serve.errors import ApiError, bad_request
from tinygptv.templates import IMAGE_PLACEHOLDER


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Model):
    url: str = Field(description="data:image/...;base64,... or, with --image-dir, a path or file:// URL inside it")
    detail: str | None = None


class TextPart(_Model):
    type: Literal["text"]
    text: str


class ImagePart(_Model):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Model):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Model):
    include_usage: bool = False


class ChatCompletionRequest(_Model):
    """OpenAI chat-completion fields the server honours; other OpenAI fields are accepted and ignored.

    ``top_k`` and ``repetition_penalty`` are extensions. ``temperature`` defaults to 0 (greedy, reproducible).
    """

    model: str | None = Field(None, description="ignored: the server answers with the model it was started with")
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = 1


@dataclass
class Limits:
    """Input limits of the server (see ``tinygptv serve --help``)."""

    max_image_pixels: int = 16_000_000
    max_prompt_tokens: int | None = None
    default_max_tokens: int = 256
    image_dir: Path | None = None


@dataclass
class Prepared:
    """A validated request, ready for the worker."""

    request: Request
    cfg: GenerationConfig
    prompt_tokens: int
    image_sizes: list[tuple[int, int]]


class ImageResolver:
    """Turns an ``image_url`` into a decoded RGB image within the limits."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.root = limits.image_dir.resolve() if limits.image_dir is not None else None

    def load(self, url: str, param: str) -> Image.Image:
        if url.startswith("data:"):
            data = self._data_url(url, param)
            name = "<data URL>"
        elif url.startswith(("http://", "https://")):
            raise bad_request("remote image URLs are not fetched; send the image as a data:image/...;base64 URL",
                              param, "unsupported_image_url")
        else:
            path = self._local_path(url, param)
            data, name = path.read_bytes(), path.name
        try:
            return load_image(data, max_pixels=self.limits.max_image_pixels)
        except Image.DecompressionBombError as exc:  # PIL's own guard, far above our limit
            raise bad_request(f"image {name} is too large: {exc}", param, "image_too_large") from exc
        except ImageError as exc:
            too_large = "more than the limit" in str(exc)
            raise bad_request(str(exc).replace("<bytes>", name), param,
                              "image_too_large" if too_large else "invalid_image") from exc

    @staticmethod
    def _data_url(url: str, param: str) -> bytes:
        head, sep, payload = url.partition(",")
        if not sep or not head.endswith(";base64") or not head[5:].startswith("image/"):
            raise bad_request("image data URLs must look like data:image/<type>;base64,<data>", param,
                              "invalid_image_url")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise bad_request(f"invalid base64 image data: {exc}", param, "invalid_image") from exc

    def _local_path(self, url: str, param: str) -> Path:
        if self.root is None:
            raise bad_request("local image paths are disabled; start the server with --image-dir, or send a "
                              "data:image/...;base64 URL", param, "image_path_not_allowed")
        if url.startswith("file:"):
            parsed = urlparse(url)
            if parsed.netloc not in ("", "localhost"):
                raise bad_request("file:// URLs must name a local file", param, "image_path_not_allowed")
            url = unquote(parsed.path)
        path = (self.root / url).resolve()  # an absolute url replaces the root; resolve() follows symlinks
        if not path.is_relative_to(self.root):
            raise bad_request("image path is outside the server's image folder", param, "image_path_not_allowed")
        if not path.is_file():
            raise bad_request(f"image not found in the server's image folder: {url}", param, "image_not_found")
        return path


def _split_content(msg: Message, index: int, resolver: ImageResolver) -> tuple[str, list[Image.Image]]:
    if msg.content is None or isinstance(msg.content, str):
        return msg.content or "", []
    texts, images = [], []
    for j, part in enumerate(msg.content):
        if isinstance(part, TextPart):
            texts.append(part.text)
        elif msg.role != "user":
            raise bad_request(f"only user messages may contain images (message {index} is {msg.role})",
                              f"messages.{index}.content.{j}")
        else:
            images.append(resolver.load(part.image_url.url, f"messages.{index}.content.{j}.image_url.url"))
    return "\n".join(t for t in texts if t), images


def build_turns(messages: list[Message], resolver: ImageResolver) -> list[Turn]:
    """The conversation turns of an OpenAI message list (see the module docstring for the rules)."""
    turns: list[Turn] = []
    system: list[str] = []
    for i, msg in enumerate(messages):
        text, images = _split_content(msg, i, resolver)
        if IMAGE_PLACEHOLDER in text:
            raise bad_request(f"message text may not contain {IMAGE_PLACEHOLDER}; send images as image_url parts",
                              f"messages.{i}.content")
        if msg.role == "system":
            if text:
                system.append(text)
        elif msg.role == "user":
            if system:
                text = "\n".join([*system, text]) if text else "\n".join(system)
                system = []
            if turns and turns[-1].answer is None:
                last = turns[-1]
                last.question = "\n".join(t for t in (last.question, text) if t)
                last.images += images
            else:
                turns.append(Turn(text, images))
            if len(turns[-1].images) > 1:
                raise bad_request("at most one image per user turn (TinyGPT-V places one image per question)",
                                  f"messages.{i}.content")
        else:
            if not turns:
                raise bad_request("an assistant message must follow a user message", f"messages.{i}")
            last = turns[-1]
            last.answer = text if last.answer is None else "\n".join(t for t in (last.answer, text) if t)
    if not turns or turns[-1].answer is not None:
        raise bad_request("the last message must be from the user", "messages")
    if not turns[-1].question and not turns[-1].images:
        raise bad_request("the last user message is empty", "messages")
    return turns


class PromptCounter:
    """Exact prompt length (image tokens included) without running the vision tower or the real embedding.

    Uses the engine's own layout code (:func:`build_batch`) with a 1-dimensional stand-in embedding.
    """

    def __init__(self, engine: Engine):
        model = engine.model
        self.engine = engine
        self.queries = model.cfg.qformer.num_queries
        self.embed = nn.Embedding(max(model.cfg.lm.vocab_size, engine.tokenizer.vocab_size), 1)
        self.pad, self.bos, self.add_bos = model.cfg.lm.pad_token_id, model.cfg.lm.bos_token_id, model.add_bos

    @torch.no_grad()
    def count(self, request: Request) -> int:
        example = request.prompt if isinstance(request.prompt, Example) else Example(request.prompt, [])
        images = torch.zeros(len(request.images), self.queries, 1) if request.images else None
        batch = build_batch([example], [images], self.engine.tokenizer, self.embed, self.pad, self.bos,
                            add_bos=self.add_bos)
        return batch.inputs_embeds.shape[1]


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    items = [stop] if isinstance(stop, str) else list(stop or [])
    if len(items) > 4:
        raise bad_request("at most 4 stop sequences", "stop")
    if any(not s for s in items):
        raise bad_request("stop sequences must be non-empty", "stop")
    return tuple(items)


def prepare(body: ChatCompletionRequest, engine: Engine, counter: PromptCounter, limits: Limits,
            context: int) -> Prepared:
    """Validate ``body`` and turn it into an engine request, a generation config and the prompt length."""
    if body.n not in (None, 1):
        raise bad_request("only n=1 is supported", "n")
    turns = build_turns(body.messages, ImageResolver(limits))
    request = Conversation(engine).request(turns)
    sizes = [im.size for im in request.images]
    # the model sees every image resized to a square (bicubic, as its preprocessing, which then leaves it as is):
    # doing it here keeps queued requests small and gives the same pixels
    side = engine.model.image_size
    request.images = [im.resize((side, side), Image.BICUBIC) for im in request.images]
    try:
        prompt_tokens = counter.count(request)
    except ValueError as exc:
        raise bad_request(str(exc), "messages") from exc
    limit = context - 1 if limits.max_prompt_tokens is None else min(limits.max_prompt_tokens, context - 1)
    if prompt_tokens > limit:
        raise bad_request(f"the prompt is {prompt_tokens} tokens (images count as {counter.queries} each); at most "
                          f"{limit} are allowed", "messages", "context_length_exceeded")
    wanted = body.max_completion_tokens or body.max_tokens or limits.default_max_tokens
    try:
        cfg = GenerationConfig(max_new_tokens=min(wanted, context - prompt_tokens),
                               temperature=0.0 if body.temperature is None else body.temperature,
                               top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0,
                               repetition_penalty=body.repetition_penalty or 1.0, seed=body.seed,
                               stop=_stops(body.stop))
    except ValueError as exc:
        raise bad_request(str(exc)) from exc
    return Prepared(request, cfg, prompt_tokens, sizes)


def decode_json_error(exc: Exception) -> ApiError:
    """An :class:`ApiError` for a request body that could not be validated (pydantic / JSON errors)."""
    errors = getattr(exc, "errors", list)()
    if not errors:
        return bad_request(f"invalid request: {exc}")
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return bad_request(f"the request body is not valid JSON: {first.get('msg')}", None, "invalid_json")
    where = ".".join(loc)
    more = f" (and {len(errors) - 1} more error(s))" if len(errors) > 1 else ""
    return bad_request(f"{where or 'body'}: {first.get('msg')}{more}", where or None, "invalid_value")


__all__ = ["ChatCompletionRequest", "ImageResolver", "Limits", "Message", "Prepared", "PromptCounter", "build_turns",
           "decode_json_error", "prepare"]
