"""Helpers for testing clients against the server without a trained model.

- :class:`ServerThread`: uvicorn in a background thread on a free loopback port.
- :func:`scripted_generate`: a drop-in for ``generate_tokens`` that "answers" a fixed text, token by token, for
  every row of a batch (e.g. an answer with a grounding box), optionally slowly.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

from tinygptv.infer.generate import GenerationConfig, StepEvent
from tinygptv.tokenizer import Tokenizer


def scripted_generate(tokenizer: Tokenizer, text: str, delay_s: float = 0.0,
                      on_step: Callable[[int], None] | None = None):
    """A ``generate_tokens`` replacement that yields the tokens of ``text`` then EOS for every row.

    ``delay_s`` sleeps before each step; ``on_step(step)`` is called before each step (to count or block).
    """
    script = tokenizer.encode(text)

    def generate(lm, prompts, cfg: GenerationConfig, eos_id: int, decode=None, pad_id=None) -> Iterator[StepEvent]:
        rows = range(len(prompts))
        for step in range(min(len(script) + 1, cfg.max_new_tokens)):
            if on_step is not None:
                on_step(step)
            if delay_s:
                time.sleep(delay_s)
            last = step == cfg.max_new_tokens - 1
            for b in rows:
                if step == len(script):
                    yield StepEvent(b, None, True, "eos")
                else:
                    yield StepEvent(b, script[step], last, "length" if last else None)

    return generate


class ServerThread:
    """uvicorn in a background thread on a free loopback port (tests, benchmarks); use as a context manager.

    ``url`` is the base address (``http://127.0.0.1:PORT``) once entered.
    """

    def __init__(self, app, host: str = "127.0.0.1", startup_timeout: float = 20.0):
        self.app = app
        self.host = host
        self.startup_timeout = startup_timeout
        self.url = ""
        self.server = None
        self.thread: threading.Thread | None = None

    def __enter__(self) -> ServerThread:
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        self.url = f"http://{self.host}:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True,
                                       name="tinygptv-uvicorn")
        self.thread.start()
        end = time.monotonic() + self.startup_timeout
        while not self.server.started:
            if time.monotonic() > end or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
