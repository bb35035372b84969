"""One worker thread that batches queued requests into single ``generate_tokens`` calls (dynamic batching).

Policy:

- The queue is bounded (:class:`~tinygptv.serve.errors.ApiError` 429 when full) and served first come, first
  served: the oldest waiting job always starts the next batch.
- Every other waiting job that is *compatible* with it joins, up to ``max_batch``. Compatible means the same
  sampling settings, since one ``generate_tokens`` call has one sampler: all greedy jobs batch together (with the
  same repetition penalty), unseeded sampled jobs batch when temperature / top-p / top-k / penalty are equal,
  and a seeded sampled job always runs alone so its seed reproduces its answer. The batch must also fit the
  context: ``max(prompt) + max(max_tokens)`` positions.
- ``max_tokens`` and ``stop`` are per job: the batch decodes up to the largest ``max_tokens`` with the template's
  stop strings, and each row is finished on its own limit / stop strings here. Greedy rows are identical to
  running alone (left padding, positions from the mask).
- When a batch is smaller than the recent concurrency (the most jobs that were in the system, queued or running,
  at any of the last ``2 × max_batch`` submits), the worker waits up to ``batch_wait_s`` (``tinygptv serve``
  default: 25 ms) for more before starting it: clients just answered by the previous batch come back within
  milliseconds, and without the wait they trail one batch behind (batches alternating 7, 1, 7, 1… or 4, 4, …
  instead of 8, 8, …). A lone client never waits: the concurrency it creates is 1.
- Batching is dynamic, not continuous: jobs arriving while a batch decodes wait for the next batch.
- A cancelled (client gone) or timed-out row is no longer decoded to text nor sent; once every row of a batch
  is finished or cancelled the token generator is closed, so the batch stops computing at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from tinygptv.infer.engine import Engine, Request, cut_at_stop, safe_prefix_len
from tinygptv.infer.generate import GenerationConfig, generate_tokens
from tinygptv.serve.errors import ApiError, bad_request, queue_full, server_error, timed_out

log = logging.getLogger(__name__)


@dataclass
class Started:
    """The job's batch started (its prompt is being processed)."""

    prompt_tokens: int
    batch_size: int


@dataclass
class Delta:
    text: str


@dataclass
class Done:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length" (OpenAI's values)
    prompt_tokens: int


@dataclass
class Failed:
    error: ApiError


Event = Started | Delta | Done | Failed


@dataclass(eq=False)
class Job:
    """One request in the queue; ``sink`` receives its events from the worker thread (must not block)."""

    request: Request
    cfg: GenerationConfig
    prompt_tokens: int
    sink: Callable[[Event], None]
    timeout_s: float
    stream: bool = False
    created: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def deadline(self) -> float:
        return self.created + self.timeout_s

    def expired(self) -> bool:
        return time.monotonic() > self.deadline

    def cancel(self) -> None:
        self.cancelled.set()

    def batch_key(self) -> tuple:
        c = self.cfg
        if c.greedy:
            return ("greedy", c.repetition_penalty)
        if c.seed is None:
            return ("sample", c.temperature, c.top_p, c.top_k, c.repetition_penalty)
        return ("seeded", id(self))


class TextStream:
    """Incremental detokenization of one row, as :meth:`Engine.stream`: text before the first stop string,
    leading whitespace stripped, and nothing emitted that could still become a stop string or is half a
    character. The concatenated deltas equal :meth:`final`."""

    def __init__(self, decode: Callable[[list[int]], str], stops: tuple[str, ...]):
        self.decode = decode
        self.stops = stops
        self.ids: list[int] = []
        self.sent = 0

    def push(self, token: int | None, finished: bool) -> tuple[str, bool]:
        """Add a token; return ``(delta, stopped)``. ``finished`` flushes what was held back."""
        if token is not None:
            self.ids.append(token)
        text, stopped = cut_at_stop(self.decode(self.ids), self.stops)
        text = text.lstrip()
        end = finished or stopped
        safe = len(text) if end else safe_prefix_len(text, self.stops)
        delta = ""
        if safe > self.sent:
            delta = text[self.sent:safe]
            if end:
                delta = delta.rstrip()
            self.sent = safe
        return delta, stopped

    def final(self) -> str:
        return cut_at_stop(self.decode(self.ids), self.stops)[0].strip()


@dataclass
class _Row:
    job: Job
    text: TextStream
    done: bool = False


@dataclass
class WorkerStats:
    batches: int = 0
    batch_sizes: Counter = field(default_factory=Counter)
    completed: int = 0
    cancelled: int = 0
    timed_out: int = 0
    tokens: int = 0

    def to_dict(self) -> dict:
        return {"batches": self.batches, "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                "completed": self.completed, "cancelled": self.cancelled, "timed_out": self.timed_out,
                "tokens": self.tokens}


class BatchWorker:
    """The single consumer of the request queue; ``generate`` is the token generator (injectable for tests)."""

    def __init__(self, engine: Engine, max_batch: int = 8, queue_size: int = 64, batch_wait_s: float = 0.0,
                 generate=generate_tokens):
        if max_batch < 1 or queue_size < 1 or batch_wait_s < 0:
            raise ValueError("max_batch and queue_size must be >= 1, batch_wait_s >= 0")
        self.engine = engine
        self.max_batch = max_batch
        self.queue_size = queue_size
        self.batch_wait_s = batch_wait_s
        self._running = 0  # rows of the batch being decoded
        self._recent_load: deque[int] = deque(maxlen=2 * max_batch)  # jobs in the system at each recent submit
        self.generate = generate
        self.context = engine.model.cfg.lm.max_position_embeddings
        self.stats = WorkerStats()
        self._pending: deque[Job] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------ control
    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="tinygptv-batch-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the running batch, refuse what is still queued, and join the thread."""
        with self._cv:
            self._stopping = True
            left, self._pending = list(self._pending), deque()
            self._cv.notify_all()
        for job in left:
            self._emit(job, Failed(ApiError(503, "the server is shutting down", "server_error", None, "shutdown")))
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def pending(self) -> int:
        """Jobs waiting in the queue (not counting the running batch)."""
        return len(self._pending)

    def submit(self, job: Job) -> None:
        """Queue ``job``; raises the 429 :class:`ApiError` when the queue is full."""
        with self._cv:
            if self._stopping:
                raise ApiError(503, "the server is shutting down", "server_error", None, "shutdown")
            if len(self._pending) >= self.queue_size:
                raise queue_full(self.queue_size)
            self._pending.append(job)
            self._recent_load.append(len(self._pending) + self._running)
            self._cv.notify()

    # ------------------------------------------------------------------------------------------ batching
    def _take(self) -> list[Job] | None:
        with self._cv:
            while not self._pending and not self._stopping:
                self._cv.wait()
            if self._stopping:
                return None
            batch = [self._pending.popleft()]
            self._collect(batch)
            expect = min(self.max_batch, max(self._recent_load, default=1))  # recent concurrency
            end = time.monotonic() + self.batch_wait_s
            while len(batch) < expect and not self._stopping and time.monotonic() < end:
                self._cv.wait(end - time.monotonic())  # woken by every submit
                self._collect(batch)
            self._running = len(batch)
            return batch

    def _collect(self, batch: list[Job]) -> None:
        """Move the waiting jobs compatible with ``batch[0]`` into ``batch`` (lock held)."""
        key = batch[0].batch_key()
        longest = max(j.prompt_tokens for j in batch)
        most_new = max(j.cfg.max_new_tokens for j in batch)
        keep: deque[Job] = deque()
        while self._pending:
            job = self._pending.popleft()
            fits = max(longest, job.prompt_tokens) + max(most_new, job.cfg.max_new_tokens) <= self.context
            if job.cancelled.is_set():
                self.stats.cancelled += 1
            elif len(batch) < self.max_batch and job.batch_key() == key and fits:
                batch.append(job)
                longest, most_new = max(longest, job.prompt_tokens), max(most_new, job.cfg.max_new_tokens)
            else:
                keep.append(job)
        self._pending = keep

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                self._run(batch)
            except Exception:  # a bug must not kill the only worker; every row of the batch gets a 500
                log.exception("batch failed")
                for job in batch:
                    self._emit(job, Failed(server_error("generation failed; see the server log")))
            finally:
                self._running = 0

    def _emit(self, job: Job, event: Event) -> None:
        try:
            job.sink(event)
        except RuntimeError:  # the client's event loop is closed: nobody is listening any more
            job.cancel()

    @torch.no_grad()
    def _run(self, jobs: list[Job]) -> None:
        live, prompts, failed = [], [], []
        images = [im for job in jobs if not job.cancelled.is_set() for im in job.request.images]
        if images:  # new images of the whole batch through the vision tower at once; the cache serves them below
            self.engine.image_embeddings(images)
        for job in jobs:
            if job.cancelled.is_set():
                self.stats.cancelled += 1
            elif job.expired():
                self.stats.timed_out += 1
                failed.append((job, timed_out(job.timeout_s)))
            else:
                try:
                    prompts.append(self.engine.prompt_embeddings(job.request))
                    live.append(job)
                except ValueError as exc:
                    failed.append((job, bad_request(str(exc))))
        self._running = len(live)
        for job, error in failed:
            self._emit(job, Failed(error))
        if not live:
            return
        engine = self.engine
        template_stops = engine.template.stop_strings
        cfg = replace(live[0].cfg, max_new_tokens=max(j.cfg.max_new_tokens for j in live), stop=template_stops)
        rows = [_Row(j, TextStream(engine.tokenizer.decode, tuple(dict.fromkeys((*template_stops, *j.cfg.stop)))))
                for j in live]
        self.stats.batches += 1
        self.stats.batch_sizes[len(rows)] += 1
        log.debug("batch of %d (queue %d)", len(rows), self.pending)
        for row, (emb, _) in zip(rows, prompts):
            self._emit(row.job, Started(emb.shape[0], len(rows)))
        gen = self.generate(engine.model.lm, prompts, cfg, engine.model.cfg.lm.eos_token_id, engine.tokenizer.decode)
        try:
            for ev in gen:
                row = rows[ev.row]
                if not row.done:
                    self._advance(row, ev.token, ev.finished, ev.reason, prompts[ev.row][0].shape[0])
                if all(r.done for r in rows):
                    break
        finally:
            close = getattr(gen, "close", None)
            if close is not None:
                close()
        for row, (emb, _) in zip(rows, prompts):
            if not row.done:  # the generator ended without finishing it (cannot happen with generate_tokens)
                self._finish(row, "length", emb.shape[0])

    def _advance(self, row: _Row, token: int | None, finished: bool, reason: str | None, prompt_len: int) -> None:
        job = row.job
        if job.cancelled.is_set():
            self._close(row)
            self.stats.cancelled += 1
            return
        if job.expired():
            self._close(row)
            self.stats.timed_out += 1
            self._emit(job, Failed(timed_out(job.timeout_s)))
            return
        own_limit = token is not None and len(row.text.ids) + 1 >= job.cfg.max_new_tokens
        delta, stopped = row.text.push(token, finished or own_limit)
        if delta and job.stream:
            self._emit(job, Delta(delta))
        if stopped or (finished and reason in ("eos", "stop")):
            self._finish(row, "stop", prompt_len)
        elif finished or own_limit:
            self._finish(row, "length", prompt_len)

    def _close(self, row: _Row) -> None:
        """The row needs no more tokens: its client may come back with a new request right away."""
        row.done = True
        self._running -= 1

    def _finish(self, row: _Row, reason: str, prompt_len: int) -> None:
        self._close(row)
        self.stats.completed += 1
        self.stats.tokens += len(row.text.ids)
        self._emit(row.job, Done(row.text.final(), list(row.text.ids), reason, prompt_len))
