"""The live loop: newest-wins slots, continuously batched into shared UNet calls by one worker thread.

Every input change becomes a Request for a slot (a browser session's tab). A slot holds only its newest job: an
older pending job is dropped unrun, and a running one leaves at the next step boundary (at once, mid-step, when
every row of its batch is stale). At each step boundary the worker drops rows that finished or were superseded,
admits pending rows that fit the running batch (same model and size, up to `max_batch`) and runs one UNet call
for all of them: a new keystroke waits one step, never a whole batch. Batches of other sizes take turns at step
boundaries, and whoever has been served the fewest pixel-steps goes first (`fair.FairShare`).
The loop also keeps each slot's last preview, to decode it again with the full VAE once input is still (`settle`).

Three parts, as vLLM splits its engine core: `schedule.Scheduler` decides (pure: state in, plan out),
`slots.SlotBook` remembers each slot, `worker.Worker` executes plans on the one thread that touches the engine.
This class holds the lock around the first two and is what the handlers call (`interfaces.ServingLoop`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from .interfaces import LoopEngine
from .request import Request, Result
from .schedule import SUPERSEDED, Job, Limits, Plan, Scheduler, Settle, check_limits, resolve, session_of
from .slots import SlotBook
from .worker import Swap, Worker


__all__ = ["SUPERSEDED", "DEFAULT_MAX_BATCH", "Job", "Limits", "LiveLoop", "LoopStats", "Outcome", "Settle",
           "default_max_batch", "session_of"]  # fmt: skip

DEFAULT_MAX_BATCH = {"cpu": 8, "cuda": 16, "mps": 4}  # rows per UNet call; see docs/benchmarks.md


@dataclass
class Outcome:
    """A finished job: its result (a list for several requests), the user's wait (submit -> done), its run time."""

    result: Result | list[Result]
    wait_ms: float
    run_ms: float
    seq: int


@dataclass
class LoopStats:
    ran: int = 0  # jobs that ran to the end
    dropped: int = 0  # jobs superseded before they started
    stopped: int = 0  # jobs superseded while running
    failed: int = 0
    unet_calls: int = 0
    rows_stepped: int = 0  # rows over all UNet calls: rows_stepped / unet_calls is the mean batch
    aborted_steps: int = 0  # steps abandoned mid-call because every row in them was stale


class LiveLoop:
    """One worker thread, one engine, newest-wins slots batched into shared denoising steps."""

    def __init__(self, engine: LoopEngine, limits: Limits | None = None, max_batch: int | None = None):
        self.engine = engine
        self.limits = limits or Limits()
        self.stats = LoopStats()
        self._scheduler = Scheduler(max_batch or default_max_batch(engine))
        self._slots = SlotBook()
        self._swaps: list[Swap] = []  # engines waiting for the worker to warm them up and serve with them
        self._cond = threading.Condition()
        self.closed = False
        self._worker = Worker(self)

    @property
    def max_batch(self) -> int:
        return self._scheduler.max_batch

    # ------------------------------------------------------------------ submitting
    def submit(self, slot: str, requests: Request | Sequence[Request] | Settle, order: float | None = None,
               address: str | None = None, preempt: bool = True) -> Job:  # fmt: skip
        """Queue `requests` as `slot`'s newest job; the slot's older pending job is dropped, a running one stopped.

        `preempt=False` (a webcam frame) lets the slot's running job finish: frames that come faster than a
        generation would otherwise stop every one of them before its image.

        `order` is when the client sent it (Gradio's enqueue time): requests of one slot can reach this point out
        of order under load, and one sent before the slot's newest is superseded at once instead of winning.
        A bad request raises ValueError; one over the limits raises RequestRefused; neither queues.
        """
        if isinstance(requests, Request):
            requests = (requests,)
        elif not isinstance(requests, Settle):
            requests = tuple(requests)
            if not requests:
                raise ValueError("Nothing to generate: no requests were given.")
        with self._cond:
            if self.closed:
                raise RuntimeError("the live loop is closed")
            check_limits(requests, self.engine.native_size, self.limits)
            self._scheduler.check_shares(slot, address, self.limits)
            now = time.perf_counter()
            self._forget_names(self._slots.expire(now - self.limits.idle_forget_s, self._scheduler.busy_slots()))
            seq = self._slots.claim(slot, now, order, address)
            if seq is None:  # sent before the slot's newest: superseded at once
                late = Job(slot, requests, self._slots.latest(slot), address)
                self.stats.dropped += 1
                resolve(late.future, SUPERSEDED)
                return late
            job = Job(slot, requests, seq, address, submitted=now)
            older = self._scheduler.add(job, preempt)
            if older is not None:
                self.stats.dropped += 1
                resolve(older.future, SUPERSEDED)
            self._cond.notify_all()
        return job

    async def run(self, slot: str, requests, order: float | None = None, address: str | None = None,
                  preempt: bool = True) -> Outcome | str:  # fmt: skip
        """Submit and wait without blocking the event loop; an Outcome, or SUPERSEDED."""
        job = self.submit(slot, requests, order, address, preempt)
        return await asyncio.wrap_future(job.future)

    def run_sync(self, slot: str, requests, timeout: float | None = None, address: str | None = None):
        return self.submit(slot, requests, address=address).future.result(timeout)

    async def settle(self, slot: str) -> Outcome | str | None:
        """The slot's last preview decoded with the full VAE; None when there is none or newer input came."""
        with self._cond:
            preview = self._slots.take_preview(slot)
        if preview is None:
            return None
        return await self.run(slot, Settle(*preview))

    # ------------------------------------------------------------------ asking and telling
    @property
    def info(self) -> dict:
        """What serves: model, family, runtime, native size, decoder (for the page); and the worker's health."""
        note = self._worker.note
        return {**self.engine.info, "worker_note": note} if note else self.engine.info

    @property
    def alive(self) -> bool:
        """The worker serves (its thread runs, or the watchdog is starting another)."""
        return self._worker.is_alive()

    def latest_seq(self, slot: str) -> int:
        with self._cond:
            return self._slots.latest(slot)

    def forget(self, slot_prefix: str) -> None:
        """Drop the pending jobs and bookkeeping of a session that left; its running rows leave at the next step."""
        with self._cond:
            for job in self._scheduler.forget(slot_prefix):
                resolve(job.future, SUPERSEDED)
                self.stats.dropped += 1
            self._forget_names(self._slots.forget(slot_prefix))

    def swap_engine(self, engine: LoopEngine, prepare: Callable[[], None] | None = None) -> Future:
        """Serve later jobs with `engine` once the worker has run `prepare()` (its warm-up and graph captures)
        between two steps; rows already running finish on the old one. The future is done when it serves
        (or holds the error `prepare` raised: the old engine then keeps serving)."""
        swap = Swap(engine, prepare)
        with self._cond:
            if self.closed:
                raise RuntimeError("the live loop is closed")
            self._swaps.append(swap)
            self._cond.notify_all()
        return swap.ready

    def tables_size(self) -> int:
        """Entries in the per-slot and per-visitor bookkeeping (tests check it does not grow forever)."""
        with self._cond:
            return len(self._slots) + len(self._scheduler.fair)

    def slot_names(self) -> set[str]:
        """The slots the loop keeps bookkeeping for (tests check that none is left behind)."""
        with self._cond:
            return set(self._slots.touched) | set(self._slots.seq)

    def close(self) -> None:
        """Stop serving: every waiter hears SUPERSEDED; running rows stop at their next block boundary."""
        with self._cond:
            self.closed = True
            for job in self._scheduler.jobs():
                resolve(job.future, SUPERSEDED)
                job.stop.set()
            self._scheduler.pending.clear()
            for swap in self._swaps:
                resolve(swap.ready, error=RuntimeError("the live loop is closed"))
            self._swaps.clear()
            self._cond.notify_all()
        if not self._worker.on_thread():
            self._worker.join(timeout=30)

    # ------------------------------------------------------------------ for the worker (its thread only)
    def _next_work(self) -> Swap | Plan | None:
        """Wait for work: an engine to swap in (first), else the plan of the next step boundary. None once closed."""
        with self._cond:
            while not (self._swaps or self._scheduler.pending or self._scheduler.running or self.closed):
                self._cond.wait()
            if self.closed:
                return None
            if self._swaps:
                return self._swaps.pop(0)
            plan = self._scheduler.schedule(self.engine, time.perf_counter())
            for job in plan.stopped:
                self.stats.stopped += 1
                resolve(job.future, SUPERSEDED)
            self.stats.dropped += len(plan.dropped)
            return plan

    def _serve_with(self, engine: LoopEngine) -> None:
        with self._cond:
            self.engine = engine
            self._slots.previews.clear()  # latents of another model

    def _running(self, job: Job) -> bool:
        with self._cond:
            return job in self._scheduler.running

    def _stepped(self, pairs: list[tuple[Job, Any]], stepped: bool) -> None:
        with self._cond:
            if not stepped:
                self.stats.aborted_steps += 1
                return
            self.stats.unet_calls += 1
            self.stats.rows_stepped += len(pairs)
            self._scheduler.stepped(pairs)

    def _complete(self, job: Job, result) -> None:
        done = time.perf_counter()
        with self._cond:
            self._scheduler.remove(job)
            if not self._slots.deliver(job.slot, job.seq):  # a newer result already went out: never go back
                self.stats.stopped += 1
                resolve(job.future, SUPERSEDED)
                return
            self.stats.ran += 1
            if isinstance(result, Result):
                self._keep_preview(job, result)
            self._cond.notify_all()
        resolve(job.future, Outcome(result, (done - job.submitted) * 1e3, (done - job.started) * 1e3, job.seq))

    def _fail(self, jobs: list[Job], error: BaseException) -> None:
        with self._cond:
            for job in jobs:
                self._scheduler.remove(job)
                self.stats.failed += 1
                resolve(job.future, error=error)

    def _lost(self, error: BaseException) -> None:
        """The worker thread ended mid-plan: its running jobs' rows are in an unknown state, fail them."""
        with self._cond:
            self._fail(list(self._scheduler.running), error)

    def _keep_preview(self, job: Job, result: Result) -> None:
        """Keep a fast-decoded result's latents, for the full-VAE decode once the slot's input is still."""
        if result.params.get("decoder") == "tiny" and result.latents is not None and job.engine is self.engine:
            self._slots.keep_preview(job.slot, job.seq, result.latents, result.params)
        else:
            self._slots.drop_preview(job.slot)

    def _forget_names(self, names: list[str]) -> None:
        self._scheduler.fair.forget(names)


def default_max_batch(engine: LoopEngine) -> int:
    """Rows per UNet call for the engine's device (measured: docs/benchmarks.md)."""
    return DEFAULT_MAX_BATCH.get(engine.runtime.device.split(":")[0], 8)
