"""Serve many users from one model: requests that wait together decode together, as one batch.

The model takes one preference (and one prompt, one seed) per row, so answers for different users, prompts and
slider positions can share a decoding batch; on a CPU a batch of 8 decodes several times as many tokens per second
as 8 answers one after another (``benchmarks/app_concurrency.py`` measures it). A :class:`BatchServer` owns the
model in one worker thread: callers :meth:`~BatchServer.stream` a request from any thread and get its growing
answers; the worker takes every request that is waiting (up to ``max_rows`` rows), decodes those that share the
decoding settings (method, strength, temperature) as one batch, and hands each caller its own rows.

A request's rows are seeded with its own seed, so an answer is the same text whether it was decoded alone or in a
batch (up to float rounding in a greedy tie). Rows of a batch run until the longest request is done; a request
leaves as soon as its own ``max_new_tokens`` are reached or all its rows have ended.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from .files import check_positive_int
from .generation import Generation, stream_generate
from .methods import build_decoder

logger = logging.getLogger(__name__)

_DONE = object()


def _own(error: Exception) -> Exception:
    """A fresh exception like ``error`` for one caller (raising one object in several threads shares its traceback)."""
    try:
        copy = type(error)(*error.args)
    except Exception:  # noqa: BLE001  an exception type that cannot be rebuilt from its args
        copy = RuntimeError(f"{type(error).__name__}: {error}")
    copy.__cause__ = error
    return copy


@dataclass(eq=False)
class _Job:
    request: object  # paretoalign.ui.Request
    answers: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def rows(self) -> int:
        return len(self.request.preferences)

    @property
    def key(self) -> tuple:
        return (self.request.method, float(self.request.strength), float(self.request.temperature))


class BatchServer:
    """Decode the requests that are waiting at the same time as one batch, in one worker thread.

    Args:
        model: a callable returning the model (called in the worker, so loading it happens off the caller's thread).
        max_rows: the most rows (answers) one batch holds; 1 serves requests one at a time, in arrival order.
        gather_seconds: how long the worker waits after a request arrives at an idle server for others to join it.
    """

    def __init__(self, model: Callable[[], object], max_rows: int = 16, gather_seconds: float = 0.05):
        check_positive_int("max_rows", max_rows)
        if not gather_seconds >= 0:
            raise ValueError(f"gather_seconds must be >= 0, got {gather_seconds!r}")
        self.model, self.max_rows, self.gather_seconds = model, max_rows, gather_seconds
        self._waiting: queue.Queue[_Job] = queue.Queue()
        self._backlog: list[_Job] = []  # taken from the queue, waiting for a batch with their settings
        self._start_lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self.batches: collections.deque[int] = collections.deque(maxlen=1000)  # rows of the latest decoded batches

    def stream(self, request) -> Iterator[list[Generation]]:
        """Yield ``request``'s growing answers (one :class:`Generation` per preference row) as its batch decodes.

        Raises whatever decoding raised for this request's batch. Closing the iterator early (a user who left)
        drops the request's rows from what is handed back; the batch it shares finishes for the others.
        """
        job = _Job(request)
        self._ensure_worker()
        self._waiting.put(job)
        try:
            while True:
                item = job.answers.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            job.cancelled.set()

    def _ensure_worker(self) -> None:
        with self._start_lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._serve, name="paretoalign-batch-server", daemon=True)
                self._worker.start()

    def _take(self) -> list[_Job]:
        """The next batch: the oldest waiting request and every other one with its settings, up to ``max_rows``."""
        if not self._backlog:
            self._backlog.append(self._waiting.get())
            if self.max_rows > 1 and self.gather_seconds:
                time.sleep(self.gather_seconds)  # others arriving with it join the batch
        while True:
            try:
                self._backlog.append(self._waiting.get_nowait())
            except queue.Empty:
                break
        first = self._backlog[0]
        batch, rows = [], 0
        for job in list(self._backlog):
            if job.key == first.key and (not batch or rows + job.rows <= self.max_rows):
                batch.append(job)
                rows += job.rows
                self._backlog.remove(job)
        return batch

    def _serve(self) -> None:
        batch: list[_Job] = []
        try:
            while True:
                batch = [job for job in self._take() if not job.cancelled.is_set()]
                if batch:
                    self._run(batch)
        except BaseException as error:  # the worker is going away: nobody may wait for it forever
            for job in [*batch, *self._backlog]:
                job.answers.put(RuntimeError(f"the batch server stopped ({type(error).__name__}: {error})"))
            raise

    def _run(self, batch: list[_Job]) -> None:
        """Decode ``batch``; if it fails, decode each of its requests alone, so only a request that fails by
        itself gets the error (each caller its own exception object)."""
        try:
            self._decode(batch)  # hands every request its answers and its end
            return
        except Exception as error:  # noqa: BLE001
            if len(batch) == 1:
                logger.exception("decoding a request failed")
                batch[0].answers.put(_own(error))
                return
            logger.warning("a batch of %d requests failed (%s: %s); decoding them one by one", len(batch), type(error).__name__, error)
        for job in batch:
            if not job.cancelled.is_set():
                self._run([job])

    def _decode(self, batch: list[_Job]) -> None:
        model = self.model()
        first = batch[0].request
        prompts, preferences, seeds, spans = [], [], [], []
        for job in batch:
            request = job.request
            spans.append(slice(len(prompts), len(prompts) + job.rows))
            prompts += [request.prompt] * job.rows
            preferences += [list(row) for row in request.preferences]
            seeds += [request.seed] * job.rows
        self.batches.append(len(prompts))
        decoder = build_decoder(first.method, model, strength=first.strength)
        longest = max(job.request.max_new_tokens for job in batch)
        live = list(zip(batch, spans))
        for step, partial in enumerate(
            stream_generate(model, prompts, preferences, decoder=decoder, max_new_tokens=longest, temperature=first.temperature, seed=seeds),
            start=1,
        ):
            still = []
            for job, span in live:
                if job.cancelled.is_set():
                    continue
                answers = partial[span]
                job.answers.put(answers)
                if step < job.request.max_new_tokens and not all(answer.finish_reason == "eos" for answer in answers):
                    still.append((job, span))
                else:
                    job.answers.put(_DONE)
            live = still
            if not live:
                return  # every request has what it asked for; the longer rows are nobody's
