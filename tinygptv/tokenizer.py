"""Tokenizer: the Phi-2 GPT-2-style byte-level BPE, read from a HF folder with the `tokenizers` library.

Accepts ``tokenizer.json``, or ``vocab.json`` + ``merges.txt`` (+ ``added_tokens.json``). Encoding never adds
special tokens (as upstream's ``add_special_tokens=False``; the CodeGen tokenizer adds no BOS anyway), but
the literal ``<|endoftext|>`` in text maps to its special id, as in the HF tokenizer.

For random-weight presets without a tokenizer folder there is :meth:`Tokenizer.byte_level`: the 256 byte
symbols plus ``<|endoftext|>`` and no merges.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer as _HFTokenizer, decoders, models, pre_tokenizers

EOS_TOKEN = "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable-character table used by byte-level BPE vocabularies."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, (chr(c) for c in chars)))


class Tokenizer:
    """Thin wrapper: ``encode(text) -> ids`` (no specials added), ``decode(ids)``, ``eos_id``."""

    def __init__(self, backend: _HFTokenizer, eos_token: str = EOS_TOKEN):
        self.backend = backend
        self.eos_token = eos_token
        eos_id = backend.token_to_id(eos_token)
        if eos_id is None:
            raise ValueError(f"tokenizer has no {eos_token!r} token")
        self.eos_id = eos_id

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids if text else []

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def save(self, folder: str | Path) -> None:
        self.backend.save(str(Path(folder) / "tokenizer.json"))

    @classmethod
    def from_folder(cls, folder: str | Path) -> "Tokenizer":
        folder = Path(folder)
        if (folder / "tokenizer.json").is_file():
            return cls(_HFTokenizer.from_file(str(folder / "tokenizer.json")))
        vocab, merges = folder / "vocab.json", folder / "merges.txt"
        if not (vocab.is_file() and merges.is_file()):
            raise FileNotFoundError(f"{folder}: no tokenizer.json, nor vocab.json + merges.txt")
        backend = _HFTokenizer(models.BPE.from_file(str(vocab), str(merges)))
        _byte_level(backend)
        added = folder / "added_tokens.json"
        extra = json.loads(added.read_text()) if added.is_file() else {}
        specials = {EOS_TOKEN} | _special_tokens(folder)
        for token, _id in sorted(extra.items(), key=lambda kv: kv[1]):
            backend.add_tokens([AddedToken(token, special=token in specials, normalized=False)])
        present = [t for t in specials if backend.token_to_id(t) is not None]
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in present])
        for token, want in extra.items():
            got = backend.token_to_id(token)
            if got != want:
                raise ValueError(f"{added}: token {token!r} should have id {want}, got {got}")
        return cls(backend)

    @classmethod
    def byte_level(cls, eos_id: int = 0) -> "Tokenizer":
        """256 byte tokens + ``<|endoftext|>`` at ``eos_id`` (0 ≤ eos_id ≤ 256), no merges."""
        if not 0 <= eos_id <= 256:
            raise ValueError("byte-level tokenizer: eos_id must be in [0, 256]")
        symbols = [bytes_to_unicode()[b] for b in range(256)]
        symbols.insert(eos_id, EOS_TOKEN)
        return cls.byte_bpe({s: i for i, s in enumerate(symbols)}, [])

    @classmethod
    def byte_bpe(cls, vocab: dict[str, int], merges: list[tuple[str, str]]) -> "Tokenizer":
        """A GPT-2-style byte-level BPE from an in-memory ``vocab`` (symbols of :func:`bytes_to_unicode`) and
        ``merges``; ``<|endoftext|>`` is its special end token (appended to the vocabulary when ``vocab`` lacks it)."""
        backend = _HFTokenizer(models.BPE(vocab=vocab, merges=merges))
        _byte_level(backend)
        backend.add_special_tokens([AddedToken(EOS_TOKEN, special=True, normalized=False)])
        return cls(backend)


def _byte_level(backend: _HFTokenizer) -> None:
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()


def _special_tokens(folder: Path) -> set[str]:
    path = folder / "special_tokens_map.json"
    if not path.is_file():
        return set()
    out = set()
    for value in json.loads(path.read_text()).values():
        content = value.get("content") if isinstance(value, dict) else value
        if isinstance(content, str):
            out.add(content)
    return out
