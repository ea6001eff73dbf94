"""The live loop's worker: the one thread that makes engine calls. It executes the scheduler's plans and cannot die.

Every engine call (making rows, a UNet step, a decode, a CUDA-graph capture, a new engine's warm-up) is guarded:
an error fails only the jobs that call touched (their callers hear why), is logged once, and the worker goes on.
Should the thread end anyway (an exit raised inside an engine call, a bug in the loop), a watchdog fails the jobs
whose rows were in flight and starts another thread; `note` says so, for the status line.
A new engine is warmed up here too, between two steps of the current one, so GPU work never runs on two threads.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .request import GenerationError
from .schedule import Job, Plan, Settle, resolve
from .text import public_text


if TYPE_CHECKING:
    from .live import LiveLoop

log = logging.getLogger("lcm_live")
_FAILED = object()  # what a guarded call returns when it raised


@dataclass
class Swap:
    """Serve with `engine` from the next step boundary, after `prepare()` (its warm-up) ran on the worker."""

    engine: Any
    prepare: Callable[[], None] | None = None
    ready: Future = field(default_factory=Future)  # None once it serves, or the error its warm-up raised


def public_error(error: BaseException) -> Exception:
    """What a caller hears: a bad request (ValueError) or a GenerationError as it is; anything else wrapped."""
    if isinstance(error, (ValueError, GenerationError)):
        return error
    wrapped = GenerationError(f"The generation failed ({_describe(error)}); the server goes on, try again.")
    wrapped.__cause__ = error
    return wrapped


def _describe(error: BaseException) -> str:
    return public_text(f"{type(error).__name__}: {error}" if str(error) else type(error).__name__)


class Worker:
    """The worker thread and its watchdog."""

    def __init__(self, loop: LiveLoop, name: str = "lcm-live-worker"):
        self.loop, self.name = loop, name
        self.restarts = 0  # threads the watchdog had to replace
        self.errors = 0  # engine calls that raised and were survived
        self.last_error: str | None = None  # the last of those, without server paths
        self._thread = self._spawn()
        self._watchdog = threading.Thread(target=self._watch, name=f"{name}-watchdog", daemon=True)
        self._watchdog.start()

    def is_alive(self) -> bool:
        """Serving: its thread runs, or the watchdog is starting another."""
        return self._thread.is_alive() or self._watchdog.is_alive()

    def on_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def join(self, timeout: float | None = None) -> None:
        """Wait for the watchdog, which ends once the loop is closed and its last thread has ended."""
        self._watchdog.join(timeout)

    @property
    def note(self) -> str | None:
        """One line for the status line when something went wrong in the worker, else None."""
        if not self.restarts:
            return None
        times = "once" if self.restarts == 1 else f"{self.restarts} times"
        return f"The worker restarted {times}" + (f" (last error: {self.last_error})." if self.last_error else ".")

    # ------------------------------------------------------------------ the thread
    def _spawn(self) -> threading.Thread:
        thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
        thread.start()
        return thread

    def _serve(self) -> None:
        try:
            while (work := self.loop._next_work()) is not None:
                if isinstance(work, Swap):
                    self._swap(work)
                else:
                    self._execute(work)
        except BaseException as error:  # the thread ends; the watchdog starts another
            self.last_error = _describe(error)
            log.error("the live loop's worker stopped: %s", self.last_error, exc_info=error)

    def _watch(self) -> None:
        while True:
            self._thread.join()
            if self.loop.closed:
                return
            self.restarts += 1
            self.loop._lost(GenerationError("The server's worker restarted during this request; try again."))
            log.warning("restarting the live loop's worker (%d so far)", self.restarts)
            self._thread = self._spawn()

    # ------------------------------------------------------------------ executing a plan
    def _execute(self, plan: Plan) -> None:
        self._start(plan.admitted)
        pairs = [(job, row) for job in plan.step if self.loop._running(job) for row in job.rows if not row.done]
        if pairs:
            engine = pairs[0][0].engine
            self._step(pairs)
            self._call("capturing a CUDA graph", [], engine.warm, 1)  # one new shape, between steps

    def _swap(self, swap: Swap) -> None:
        """Warm the new engine up (its captures too) between two steps of the old one, then serve with it."""
        try:
            if swap.prepare is not None:
                swap.prepare()
        except BaseException as error:  # the loader reports it as a failed load; the old model keeps serving
            self._failed("warming up the new model", [], error)
            resolve(swap.ready, error=error)
            if not isinstance(error, Exception):
                raise  # the thread ends: the watchdog starts another
            return
        self.loop._serve_with(swap.engine)
        resolve(swap.ready, None)

    def _start(self, jobs: list[Job]) -> None:
        """Make the admitted jobs' rows together (text encoding, input images, initial latents); settle jobs decode."""
        generating = []
        for job in jobs:
            if isinstance(job.requests, Settle):
                result = self._call("a full-VAE decode", [job], job.engine.refine, job.requests.latents,
                                    job.requests.params)  # fmt: skip
                if result is not _FAILED:
                    self.loop._complete(job, result)
            else:
                generating.append(job)
        for engine in dict.fromkeys(job.engine for job in generating):
            batch = [job for job in generating if job.engine is engine]
            if len(batch) > 1:
                try:
                    self._make_rows(engine, batch)
                    continue
                except Exception:  # the call failed as a whole: each job on its own, so one bad job fails alone
                    pass
            for job in batch:
                self._call("making rows", [job], self._make_rows, engine, [job])

    def _make_rows(self, engine, jobs: list[Job]) -> None:
        """One start_many call for `jobs`; a row that is an error fails its job only."""
        requests = [request for job in jobs for request in job.requests]
        rows = engine.start_many(requests)
        if len(rows) != len(requests):
            raise RuntimeError(f"the engine made {len(rows)} rows for {len(requests)} requests")
        for job in jobs:
            job.rows, rows = list(rows[: len(job.requests)]), rows[len(job.requests) :]
            job.results = [None] * len(job.rows)
            errors = [row for row in job.rows if isinstance(row, BaseException)]
            if errors:  # a bad request (its caller hears why), or an engine fault in that row only
                job.rows = []
                self._failed("making a row", [job], errors[0])

    def _step(self, pairs: list[tuple[Job, Any]]) -> None:
        """One UNet call for the group's rows; then decode rows that finished and complete their jobs."""
        jobs = list(dict.fromkeys(job for job, _ in pairs))
        engine, rows = jobs[0].engine, [row for _, row in pairs]

        def all_stale() -> bool:
            return all(job.should_stop() and not job.finishing for job in jobs)

        stepped = self._call("a UNet step", jobs, engine.step, rows, all_stale)
        if stepped is _FAILED:
            return
        self.loop._stepped(pairs, bool(stepped))
        finished = [(job, row) for job, row in pairs if stepped and row.done]
        if not finished:
            return
        finishing = list(dict.fromkeys(job for job, _ in finished))
        results = self._call("decoding", finishing, engine.finish, [row for _, row in finished])
        if results is _FAILED:
            return
        for (job, row), result in zip(finished, results):
            job.results[job.rows.index(row)] = result
        for job in finishing:
            if all(row.done for row in job.rows):
                errors = [r for r in job.results if isinstance(r, BaseException)]
                if errors:
                    self._failed("decoding a row", [job], errors[0])
                else:
                    self.loop._complete(job, job.results[0] if len(job.results) == 1 else list(job.results))

    # ------------------------------------------------------------------ guards
    def _call(self, what: str, jobs: list[Job], fn: Callable, *args):
        """`fn(*args)`, or _FAILED after failing `jobs` when it raised (any Exception: out of memory included)."""
        try:
            return fn(*args)
        except Exception as error:
            self._failed(what, jobs, error)
            return _FAILED

    def _failed(self, what: str, jobs: list[Job], error: BaseException) -> None:
        """Fail the jobs an error touched and log it once; a bad request is its caller's business, not the log's."""
        if not isinstance(error, ValueError):
            self.errors += 1
            self.last_error = _describe(error)
            log.warning("%s failed (%d job(s) told): %s", what, len(jobs), self.last_error, exc_info=error)
        self.loop._fail(jobs, public_error(error))
