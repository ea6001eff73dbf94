"""The live loop: per-session newest-wins slots served in turn by one worker thread that owns the engine.

Every input change becomes a Request for a slot (a browser session's tab). A slot holds only its newest job: an
older pending job is dropped unrun, and a running job of the same slot is told to stop. Slots take turns, so one
user's webcam stream or fast typing cannot starve another user. The loop also remembers each slot's last preview,
so that once input is still it can decode it again with the full VAE (`settle`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

from .request import MAX_STEPS, GenerationStopped, Request, RequestRefused, Result, checked


SUPERSEDED = "superseded"  # what a dropped or stopped job's future resolves to


def _resolve(future: Future, value=None, error: BaseException | None = None) -> None:
    """Settle `future` unless its waiter already gave up (a closed browser tab cancels it)."""
    if future.done():
        return
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)
    except InvalidStateError:  # cancelled between the check and the set
        pass


@dataclass(frozen=True)
class Limits:
    """What one visitor may ask of the shared loop. A session is a slot's prefix (`session:tab`)."""

    max_cost: int | None = None  # pixels x UNet steps of one request; None: the model's native size at MAX_STEPS
    session_jobs: int = 6  # a session's queued + running jobs (its tabs, sweeps and API calls)
    address_jobs: int = 12  # the same for every session of one client address
    idle_forget_s: float = 900.0  # a slot silent this long has its bookkeeping dropped

    def cost_cap(self, native_size: int) -> int:
        return self.max_cost if self.max_cost is not None else native_size * native_size * MAX_STEPS


def session_of(slot: str) -> str:
    return slot.partition(":")[0]


@dataclass
class Settle:
    """Decode a slot's last preview again with the full VAE."""

    latents: Any
    params: dict


@dataclass
class Job:
    slot: str
    requests: tuple[Request, ...] | Settle  # several requests: one result each (the step sweep)
    seq: int = 0
    address: str | None = None
    submitted: float = field(default_factory=time.perf_counter)
    future: Future = field(default_factory=Future)
    stop: threading.Event = field(default_factory=threading.Event)
    started: float | None = None

    def should_stop(self) -> bool:
        """True once a newer job took this slot, or the waiter left."""
        return self.stop.is_set() or self.future.cancelled()


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


class LiveLoop:
    """One worker thread, one engine, newest-wins slots served in turn."""

    def __init__(self, engine, limits: Limits | None = None):
        self.engine = engine
        self.limits = limits or Limits()
        self.stats = LoopStats()
        self._pending: OrderedDict[str, Job] = OrderedDict()  # slot -> newest job not yet started
        self._running: Job | None = None
        self._seq: dict[str, int] = {}
        self._order: dict[str, float] = {}  # slot -> send time of its newest job, when the caller knows it
        self._previews: dict[str, tuple[int, Any, dict]] = {}  # slot -> (seq, latents, params) of its last preview
        self._touched: dict[str, float] = {}  # slot -> when it last submitted (its bookkeeping expires)
        self._cond = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._serve, name="lcm-live-worker", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ submitting
    def submit(self, slot: str, requests: Request | Sequence[Request] | Settle, order: float | None = None,
               address: str | None = None) -> Job:  # fmt: skip
        """Queue `requests` as `slot`'s newest job; the slot's older pending job is dropped, a running one stopped.

        `order` is when the client sent it (Gradio's enqueue time): requests of one slot can reach this point out
        of order under load, and one sent before the slot's newest is superseded at once instead of winning.
        A bad request raises ValueError; one over the limits raises RequestRefused; neither queues.
        """
        if isinstance(requests, Request):
            requests = (requests,)
        elif not isinstance(requests, Settle):
            requests = tuple(requests)
        with self._cond:
            if self._closed:
                raise RuntimeError("the live loop is closed")
            if not isinstance(requests, Settle):
                self._admit(slot, requests, address)
            now = time.perf_counter()
            self._expire(now)
            self._touched[slot] = now
            if order is not None:
                if order < self._order.get(slot, float("-inf")):
                    late = Job(slot, requests, self._seq.get(slot, 0), address)
                    self.stats.dropped += 1
                    _resolve(late.future, SUPERSEDED)
                    return late
                self._order[slot] = order
            seq = self._seq.get(slot, 0) + 1
            self._seq[slot] = seq
            job = Job(slot, requests, seq, address)
            older = self._pending.pop(slot, None)
            if older is not None:
                self.stats.dropped += 1
                _resolve(older.future, SUPERSEDED)
            if self._running is not None and self._running.slot == slot:
                self._running.stop.set()
            self._pending[slot] = job  # to the back of the round-robin order
            self._cond.notify_all()
        return job

    def _admit(self, slot: str, requests: tuple[Request, ...], address: str | None) -> None:
        """Raise unless `requests` fit the limits: each within the cost cap, the visitor within its job caps."""
        cap = self.limits.cost_cap(self.engine.native_size)
        for request in requests:
            request, _ = checked(request, self.engine.native_size)
            if request.cost() > cap:
                raise RequestRefused(
                    f"{request.width}x{request.height} at {request.unet_steps} steps is more than this server runs "
                    f"for one request (at most {cap:,} pixel-steps, e.g. {_side(cap)}x{_side(cap)} at "
                    f"{MAX_STEPS} steps). Use a smaller size or fewer steps."
                )
        session = session_of(slot)
        live = [job for job in (*self._pending.values(), self._running) if job is not None and job.slot != slot]
        if sum(session_of(job.slot) == session for job in live) >= self.limits.session_jobs:
            raise RequestRefused(
                f"Too many requests at once from this session (at most {self.limits.session_jobs}); "
                "wait for one to finish."
            )
        if address is not None and sum(job.address == address for job in live) >= self.limits.address_jobs:
            raise RequestRefused(
                f"Too many requests at once from your address (at most {self.limits.address_jobs}); "
                "wait for one to finish."
            )

    def _expire(self, now: float) -> None:
        """Drop the bookkeeping of slots silent for `idle_forget_s` (sessions that left without saying so)."""
        horizon = now - self.limits.idle_forget_s
        for slot in [s for s, t in self._touched.items() if t < horizon]:
            if slot in self._pending or (self._running is not None and self._running.slot == slot):
                continue
            for table in (self._seq, self._order, self._previews, self._touched):
                table.pop(slot, None)

    async def run(self, slot: str, requests, order: float | None = None, address: str | None = None) -> Outcome | str:
        """Submit and wait without blocking the event loop; an Outcome, or SUPERSEDED."""
        job = self.submit(slot, requests, order, address)
        return await asyncio.wrap_future(job.future)

    def run_sync(self, slot: str, requests, timeout: float | None = None) -> Outcome | str:
        return self.submit(slot, requests).future.result(timeout)

    async def settle(self, slot: str) -> Outcome | str | None:
        """The slot's last preview decoded with the full VAE; None when there is none or newer input came."""
        with self._cond:
            preview = self._previews.get(slot)
            if preview is None or preview[0] != self._seq.get(slot, 0):
                return None
            del self._previews[slot]
        return await self.run(slot, Settle(preview[1], preview[2]))

    @property
    def info(self) -> dict:
        """What serves: model, family, runtime, native size, decoder (for the page)."""
        return self.engine.info

    def latest_seq(self, slot: str) -> int:
        with self._cond:
            return self._seq.get(slot, 0)

    def forget(self, slot_prefix: str) -> None:
        """Drop the pending jobs and bookkeeping of a session that left."""
        with self._cond:
            for slot in [s for s in self._pending if s.startswith(slot_prefix)]:
                _resolve(self._pending.pop(slot).future, SUPERSEDED)
                self.stats.dropped += 1
            for table in (self._seq, self._order, self._previews, self._touched):
                for slot in [s for s in table if s.startswith(slot_prefix)]:
                    del table[slot]
            if self._running is not None and self._running.slot.startswith(slot_prefix):
                self._running.stop.set()

    def swap_engine(self, engine) -> None:
        """Serve later jobs with `engine` (the running job finishes on the old one)."""
        with self._cond:
            self.engine = engine
            self._previews.clear()  # latents of another model

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for job in self._pending.values():
                _resolve(job.future, SUPERSEDED)
            self._pending.clear()
            if self._running is not None:
                self._running.stop.set()
            self._cond.notify_all()
        self._worker.join(timeout=30)

    # ------------------------------------------------------------------ serving
    def _next_job(self):
        """The next job to run and the engine to run it on, in round-robin order; None once closed."""
        with self._cond:
            while True:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return None
                _, job = self._pending.popitem(last=False)  # the slot that waited longest
                if job.future.cancelled():  # its waiter left: never run it
                    self.stats.dropped += 1
                    continue
                job.started = time.perf_counter()
                self._running = job
                return job, self.engine

    def tables_size(self) -> int:
        """Entries in the per-slot bookkeeping (for tests that check it does not grow forever)."""
        with self._cond:
            return sum(map(len, (self._seq, self._order, self._previews, self._touched)))

    @staticmethod
    def _work(job: Job, engine):
        if isinstance(job.requests, Settle):
            return engine.refine(job.requests.latents, job.requests.params)
        results = [engine.generate(request, job.should_stop) for request in job.requests]
        return results[0] if len(results) == 1 else results

    def _serve(self) -> None:
        while True:
            picked = self._next_job()
            if picked is None:
                return
            job, engine = picked
            try:
                result = self._work(job, engine)
                done = time.perf_counter()
                value, error = Outcome(result, (done - job.submitted) * 1e3, (done - job.started) * 1e3, job.seq), None
                self.stats.ran += 1
            except GenerationStopped:
                value, error = SUPERSEDED, None
                self.stats.stopped += 1
            except Exception as failure:  # the job's caller gets the error; the loop keeps serving
                value, error = None, failure
                self.stats.failed += 1
            with self._cond:
                self._running = None
                if isinstance(value, Outcome) and isinstance(value.result, Result):
                    self._remember_preview(job, value.result, engine)
            _resolve(job.future, value, error)

    def _remember_preview(self, job: Job, result: Result, engine) -> None:
        """Keep a fast-decoded result's latents, for the full-VAE decode once the slot's input is still."""
        if result.params.get("decoder") == "tiny" and result.latents is not None and engine is self.engine:
            self._previews[job.slot] = (job.seq, result.latents, result.params)
        else:
            self._previews.pop(job.slot, None)


def _side(pixel_steps: int) -> int:
    """The largest square side (a multiple of 8) whose pixels at MAX_STEPS fit `pixel_steps`."""
    return int((pixel_steps / MAX_STEPS) ** 0.5) // 8 * 8
