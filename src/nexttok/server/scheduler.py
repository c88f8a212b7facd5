"""The scheduler: one thread owns the model and its decoder, and runs every request as rows of one batch.

Continuous batching: a request that arrives while others decode is prefilled between two steps and joins
the next step; each step feeds every running row one token in one decoder call; a request's rows leave
when its samples finish or its client goes away. ``n`` samples of a request share one prefill (``fork``).
What turns a request's scores into tokens is the same :class:`~nexttok.samples.Samples` ``generate()`` runs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from nexttok.decode import Scores, check_rows
from nexttok.decoders import make_decoder
from nexttok.errors import NexttokError
from nexttok.samples import Samples, Step, pick_together
from nexttok.sampling import SamplingConfig

if TYPE_CHECKING:
    from nexttok.lm import LM
    from nexttok.server.metrics import Metrics

_log = logging.getLogger("nexttok.serve")


class QueueFull(Exception):
    """More requests wait than ``max_queue`` allows: the client should retry (HTTP 429)."""


@dataclass
class PromptToken:
    """One prompt token scored by teacher forcing: its logprob given the tokens before (None for the first)
    and the ``top`` alternatives there as (id, logprob)."""

    id: int
    logprob: float | None
    top: list[tuple[int, float]]


@dataclass
class Job:
    """One request: its prompt ids, its samples' settings, and ``emit`` to send events back (thread-safe).

    Events: ``("prompt", list[PromptToken])``, ``("steps", list[Step])`` once per step, then ``("done", None)``
    or ``("error", NexttokError)``. ``max_new_tokens`` 0 only scores the prompt."""

    ids: list[int]
    config: SamplingConfig | None
    emit: Callable[[tuple[str, Any]], None] = field(default=lambda event: None)
    n: int = 1
    trace: bool = False
    top: int = 0
    prompt_top: int | None = None
    cancelled: bool = False
    arrived: float = field(default_factory=time.perf_counter)
    samples: Samples | None = None
    rows: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    last: float = 0.0

    def cancel(self) -> None:
        """The client went away: the scheduler drops the job's rows before its next step."""
        self.cancelled = True


class Scheduler:
    """Owns ``lm``: runs :class:`Job` s with at most ``max_batch`` rows decoding at once and at most
    ``max_queue`` jobs waiting for room, and any other model work (:meth:`call`) between two steps."""

    def __init__(self, lm: LM, max_batch: int = 16, max_queue: int = 64, metrics: Metrics | None = None):
        self.lm, self.max_batch, self.max_queue, self.metrics = lm, max_batch, max_queue, metrics
        self.waiting: deque[Job] = deque()
        self.calls: deque[tuple[Callable[[], Any], Future]] = deque()
        self.running: list[Job] = []
        self.decoder = None
        self._wake = threading.Condition()
        self._stop = False
        self.ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nexttok-scheduler", daemon=True)

    # -- the request side (any thread) ----------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue ``job``; :class:`QueueFull` when ``max_queue`` jobs already wait."""
        with self._wake:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (--max-queue {self.max_queue})")
            self.waiting.append(job)
            self._gauge()
            self._wake.notify()

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the model's thread between two steps; its result (or exception) in the Future."""
        future: Future = Future()
        with self._wake:
            self.calls.append((fn, future))
            self._wake.notify()
        return future

    def close(self, timeout: float = 5.0) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def busy_rows(self) -> int:
        return sum(len(j.rows) for j in self.running)

    # -- the model's thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        # The first token's logprobs are then the numbers /v1/next_token and `nexttok predict` show.
        self.decoder = make_decoder(self.lm, exact_prefill=True)
        _log.info("decoder: %s", self.decoder.reason)
        self.ready.set()
        while True:
            with self._wake:
                while not (self._stop or self.calls or self.running or self._admissible()):
                    self._wake.wait()
                if self._stop:
                    break
                calls, self.calls = list(self.calls), deque()
                admitted = self._admit()
            for fn, future in calls:
                _run_call(fn, future)
            for job in admitted:
                self._begin(job)
            self._leave_cancelled()
            if self.running:
                self._step()
            self._gauge()
        for job in [*self.running, *self.waiting]:
            job.emit(("error", NexttokError("the server is shutting down; retry against another server")))

    def _admissible(self) -> bool:
        return bool(self.waiting) and self._fits(self.waiting[0], self.busy_rows)

    def _fits(self, job: Job, rows: int) -> bool:
        """Whether ``job`` leaves the queue now, with ``rows`` rows busy: a cancelled one always (it is dropped),
        one that fits in --max-batch, or any when nothing runs (a request wider than the batch runs alone)."""
        return job.cancelled or rows + job.n <= self.max_batch or not rows

    def _admit(self) -> list[Job]:
        admitted, rows = [], self.busy_rows
        while self.waiting and self._fits(self.waiting[0], rows):
            job = self.waiting.popleft()
            if not job.cancelled:
                admitted.append(job)
                rows += job.n
        return admitted

    def _begin(self, job: Job) -> None:
        """Score the prompt if asked, prefill one row, fork the other samples, and take the first tokens."""
        try:
            if job.prompt_top is not None:
                job.emit(("prompt", self._score_prompt(job.ids, job.prompt_top)))
            if job.config is None:  # scoring only
                job.emit(("done", None))
                return
            check_rows(self.lm, job.n, len(job.ids) + job.config.max_new_tokens)
            job.samples = Samples(self.lm, job.ids, job.config, job.n, job.trace, job.top)
            row, logits = self.decoder.add(job.ids)
            job.rows = [row] + (self.decoder.fork(row, job.n - 1) if job.n > 1 else [])
            summary = self.decoder.summary(job.samples.top) if job.n == 1 else None
            self.running.append(job)
            self._advance(job, Scores(logits[None].expand(job.n, -1), summary))
        except NexttokError as e:
            self._end(job, ("error", e))
        except Exception as e:  # a request must never take the scheduler down
            _log.exception("request failed")
            self._end(job, ("error", NexttokError(f"internal error: {type(e).__name__}: {e}")))

    def _score_prompt(self, ids: list[int], top: int) -> list[PromptToken]:
        out = [PromptToken(ids[0], None, [])]
        if len(ids) > 1:
            logp = torch.log_softmax(self.decoder.score(ids, range(len(ids) - 1)), -1)  # (T - 1, V)
            chosen = logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
            k = min(top, logp.shape[-1])
            values, alts = torch.topk(logp, k, -1) if k else (torch.zeros(len(ids) - 1, 0), None)
            for i, token in enumerate(ids[1:]):
                pairs = list(zip(alts[i].tolist(), values[i].tolist(), strict=True)) if k else []
                out.append(PromptToken(token, chosen[i], pairs))
        return out

    def _step(self) -> None:
        jobs = list(self.running)
        rows = [r for j in jobs for r in j.rows]
        tokens = [t for j in jobs for t in j.tokens]
        try:
            logits = self.decoder.step(rows, tokens)  # (R, V)
        except Exception as e:
            _log.exception("decoder step failed")
            for job in jobs:
                self._end(job, ("error", NexttokError(f"internal error in the decoder: {e}")))
            self.decoder = make_decoder(self.lm, exact_prefill=True)
            return
        if self.metrics:
            self.metrics.batch_rows.observe(len(rows))
        summary = self.decoder.summary(jobs[0].samples.top) if len(rows) == 1 else None
        parts, lo = [], 0
        for job in jobs:
            parts.append(Scores(logits[lo : lo + len(job.rows)], summary))
            lo += len(job.rows)
        try:
            picked = pick_together([j.samples for j in jobs], parts)  # jobs of equal settings in one batch
        except Exception as e:
            _log.exception("sampling failed")
            for job in jobs:
                self._end(job, ("error", NexttokError(f"internal error while sampling: {e}")))
            return
        for job, result in zip(jobs, picked, strict=True):
            self._went_on(job, *result)

    def _advance(self, job: Job, scores: Scores) -> None:
        try:
            chosen, keep, steps = job.samples.pick(scores)
        except Exception as e:
            _log.exception("sampling failed")
            self._end(job, ("error", NexttokError(f"internal error while sampling: {e}")))
            return
        self._went_on(job, chosen, keep, steps)

    def _went_on(self, job: Job, chosen: torch.Tensor, keep: list[int], steps: list[Step]) -> None:
        self._timing(job, len(steps))
        job.emit(("steps", steps))
        for j in sorted(set(range(len(job.rows))) - set(keep)):
            self.decoder.drop(job.rows[j])
        job.rows = [job.rows[j] for j in keep]
        job.tokens = chosen[keep].tolist()
        if not keep:
            self._end(job, ("done", None))

    def _timing(self, job: Job, tokens: int) -> None:
        now = time.perf_counter()
        if self.metrics:
            if job.last:
                self.metrics.inter_token.observe(now - job.last)
            else:
                self.metrics.first_token.observe(now - job.arrived)
            self.metrics.tokens_out.inc(tokens)
        job.last = now

    def _leave_cancelled(self) -> None:
        for job in [j for j in self.running if j.cancelled]:
            self._end(job, ("error", NexttokError("the client went away")))

    def _end(self, job: Job, event: tuple[str, Any]) -> None:
        for row in job.rows:
            self.decoder.drop(row)
        job.rows, job.tokens = [], []
        if job in self.running:
            self.running.remove(job)
        job.emit(event)

    def _gauge(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.set(len(self.waiting))
            self.metrics.running_rows.set(self.busy_rows)


def _run_call(fn: Callable[[], Any], future: Future) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(fn())
    except BaseException as e:  # handed to the caller, who reports it
        future.set_exception(e)


__all__ = ["Job", "PromptToken", "QueueFull", "Scheduler", "Step"]
