"""OpenAI-compatible HTTP server for TinyGPT-V: ``tinygptv serve`` (needs the ``[serve]`` extra).

- :mod:`tinygptv.serve.protocol`: the request schema and its mapping onto the engine (messages → conversation
  layout, images, limits, sampling settings), with every bad input turned into an :class:`ApiError` (4xx).
- :mod:`tinygptv.serve.worker`: one thread that batches queued requests into single ``generate_tokens`` calls.
- :mod:`tinygptv.serve.app`: the FastAPI application (``/v1/chat/completions``, ``/v1/models``, ``/health``, ``/``).
- :mod:`tinygptv.serve.cli`: the ``serve`` sub-command and a background-thread server for tests and benchmarks.

Importing this package does not import FastAPI; :func:`create_app` does.
"""

from __future__ import annotations

from tinygptv.serve.errors import ApiError

__all__ = ["ApiError", "create_app"]


def create_app(*args, **kwargs):
    """See :func:`tinygptv.serve.app.create_app` (imported lazily: it needs FastAPI)."""
    from tinygptv.serve.app import create_app as _create_app

    return _create_app(*args, **kwargs)
