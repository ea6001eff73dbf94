"""The live loop: newest-wins slots, continuously batched into shared UNet calls by one worker thread.

Every input change becomes a Request for a slot (a browser session's tab). A slot holds only its newest job: an
older pending job is dropped unrun, and a running one leaves at the next step boundary (at once, mid-step, when
every row of its batch is stale). At each step boundary the worker drops rows that finished or were superseded,
admits pending rows that fit the running batch (same model and size, up to `max_batch`) and runs one UNet call
for all of them: a new keystroke waits one step, never a whole batch. Batches of other sizes take turns at step
boundaries, and whoever has been served the fewest pixel-steps goes first (`fair.FairShare`).
The loop also keeps each slot's last preview, to decode it again with the full VAE once input is still (`settle`).
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

from .fair import FairShare
from .request import MAX_STEPS, Request, RequestRefused, Result, checked


SUPERSEDED = "superseded"  # what a dropped or stopped job's future resolves to
DEFAULT_MAX_BATCH = {"cpu": 8, "cuda": 16, "mps": 4}  # rows per UNet call; see docs/benchmarks.md


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


@dataclass(eq=False)
class Job:
    slot: str
    requests: tuple[Request, ...] | Settle  # several requests: one result each (the step sweep), batched together
    seq: int = 0
    address: str | None = None
    submitted: float = field(default_factory=time.perf_counter)
    future: Future = field(default_factory=Future)
    stop: threading.Event = field(default_factory=threading.Event)
    started: float | None = None
    engine: Any = None  # the engine its rows run on (a model switch lets running rows finish on the old one)
    group: tuple = ()  # rows of jobs with equal groups share UNet calls: (engine, width, height)
    rows: list = field(default_factory=list)
    results: list = field(default_factory=list)

    def should_stop(self) -> bool:
        """True once a newer job took this slot, or the waiter left."""
        return self.stop.is_set() or self.future.cancelled()

    @property
    def session(self) -> str:
        return session_of(self.slot)

    @property
    def finishing(self) -> bool:
        """Every unfinished row is in its last step: let it end (its image is nearly done)."""
        return bool(self.rows) and all(row.done or row.last_step for row in self.rows)


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

    def __init__(self, engine, limits: Limits | None = None, max_batch: int | None = None):
        self.engine = engine
        self.limits = limits or Limits()
        self.max_batch = max_batch or default_max_batch(engine)
        self.stats = LoopStats()
        self._pending: OrderedDict[str, Job] = OrderedDict()  # slot -> newest job not yet started
        self._active: list[Job] = []  # admitted jobs whose rows are in flight
        self._fair = FairShare()
        self._seq: dict[str, int] = {}
        self._delivered: dict[str, int] = {}  # slot -> seq of the newest job whose result went out
        self._order: dict[str, float] = {}  # slot -> send time of its newest job, when the caller knows it
        self._previews: dict[str, tuple[int, Any, dict]] = {}  # slot -> (seq, latents, params) of its last preview
        self._touched: dict[str, float] = {}  # slot -> when it last submitted (its bookkeeping expires)
        self._addresses: dict[str, str] = {}  # slot -> the address it last came from (its fair share expires too)
        self._cond = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._serve, name="lcm-live-worker", daemon=True)
        self._worker.start()

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
            if self._closed:
                raise RuntimeError("the live loop is closed")
            self._admit(slot, requests, address)
            now = time.perf_counter()
            self._expire(now)
            self._touched[slot] = now
            if address is not None:
                self._addresses[slot] = address
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
            for running in self._active:
                if running.slot == slot and preempt:
                    running.stop.set()
            self._pending[slot] = job
            self._cond.notify_all()
        return job

    def _admit(self, slot: str, requests, address: str | None) -> None:
        """Raise unless `requests` fit the limits: each within the cost cap, the visitor within its job caps."""
        if isinstance(requests, Settle):
            return
        native = self.engine.native_size
        cap = self.limits.cost_cap(native)
        for request in requests:
            request, _ = checked(request, native)
            if request.cost() > cap:
                raise RequestRefused(
                    f"{request.width}x{request.height} at {request.unet_steps} steps is more than this server runs "
                    f"for one request (at most {cap:,} pixel-steps, e.g. {_side(cap)}x{_side(cap)} at "
                    f"{MAX_STEPS} steps). Use a smaller size or fewer steps."
                )
        if len({checked(r, native)[0].pixel_size for r in requests}) > 1:
            raise ValueError("The requests of one job must share one image size.")
        session = session_of(slot)
        live = [job for job in (*self._pending.values(), *self._active) if job.slot != slot and not job.should_stop()]
        if sum(job.session == session for job in live) >= self.limits.session_jobs:
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
        busy = {job.slot for job in (*self._pending.values(), *self._active)}
        for slot in [s for s, t in self._touched.items() if t < horizon and s not in busy]:
            self._drop_tables(slot)

    def _drop_tables(self, slot: str) -> None:
        for table in (self._seq, self._order, self._previews, self._touched, self._delivered):
            table.pop(slot, None)
        session, address = session_of(slot), self._addresses.pop(slot, None)
        if not any(session_of(s) == session for s in self._touched):
            self._fair.forget([session])
        if address is not None and address not in self._addresses.values():
            self._fair.forget([address])

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
        """Drop the pending jobs and bookkeeping of a session that left; its running rows leave at the next step."""
        with self._cond:
            for slot in [s for s in self._pending if s.startswith(slot_prefix)]:
                _resolve(self._pending.pop(slot).future, SUPERSEDED)
                self.stats.dropped += 1
            for job in self._active:
                if job.slot.startswith(slot_prefix):
                    job.stop.set()
            for slot in [s for s in self._touched if s.startswith(slot_prefix)]:
                self._drop_tables(slot)

    def swap_engine(self, engine) -> None:
        """Serve later jobs with `engine` (rows already running finish on the old one)."""
        with self._cond:
            self.engine = engine
            self._previews.clear()  # latents of another model

    def tables_size(self) -> int:
        """Entries in the per-slot and per-visitor bookkeeping (tests check it does not grow forever)."""
        with self._cond:
            tables = (self._seq, self._order, self._previews, self._touched, self._delivered, self._addresses)
            return sum(map(len, tables)) + len(self._fair)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for job in [*self._pending.values(), *self._active]:
                _resolve(job.future, SUPERSEDED)
                job.stop.set()
            self._pending.clear()
            self._cond.notify_all()
        self._worker.join(timeout=30)

    # ------------------------------------------------------------------ serving
    def _serve(self) -> None:
        while True:
            admitted = self._admit_pending()
            if admitted is None:
                return
            self._start(admitted)
            group = self._pick_group()
            if group:
                self._step(group)
                self._warm(group[0][0].engine)

    @staticmethod
    def _warm(engine) -> None:
        """Let the engine capture one new shape's CUDA graph, if it has one waiting (between steps, once a shape)."""
        warm = getattr(engine, "warm", None)
        if warm is not None:
            warm(limit=1)

    def _admit_pending(self) -> list[Job] | None:
        """Wait for work; drop stale jobs; move pending jobs that fit into the running set. None once closed."""
        with self._cond:
            while not self._pending and not self._active and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            for job in [j for j in self._active if j.should_stop() and not j.finishing]:
                self._active.remove(job)
                self.stats.stopped += 1
                _resolve(job.future, SUPERSEDED)
            for slot in [s for s, j in self._pending.items() if j.future.cancelled()]:  # its waiter left
                del self._pending[slot]
                self.stats.dropped += 1
            rows_in: dict[tuple, int] = {}  # group -> rows in flight
            for job in self._active:
                rows_in[job.group] = rows_in.get(job.group, 0) + sum(not row.done for row in job.rows)
            admitted = []
            for job in sorted(self._pending.values(), key=lambda j: (*self._fair.priority(j.session, j.address),
                                                                     j.submitted)):  # fmt: skip
                group, size = _group_of(job, self.engine)
                used = rows_in.get(group, 0)
                if used and used + size > self.max_batch:
                    continue  # its batch is full: it joins when a row leaves
                rows_in[group] = used + size
                del self._pending[job.slot]
                job.started, job.engine, job.group = time.perf_counter(), self.engine, group
                self._active.append(job)
                admitted.append(job)
            self._fair.settle_floor([(j.session, j.address) for j in (*self._pending.values(), *self._active)])
            return admitted

    def _start(self, jobs: list[Job]) -> None:
        """Make the admitted jobs' rows together (text encoding, input images encoded in one call, initial latents);
        a settle job runs its decode now."""
        generating = []
        for job in jobs:
            if isinstance(job.requests, Settle):
                try:
                    self._complete(job, job.engine.refine(job.requests.latents, job.requests.params))
                except Exception as error:
                    self._fail([job], error)
            else:
                generating.append(job)
        for engine in dict.fromkeys(job.engine for job in generating):
            batch = [job for job in generating if job.engine is engine]
            try:
                rows = engine.start_many([request for job in batch for request in job.requests])
            except Exception as error:  # a failure: the callers hear; the loop keeps serving
                self._fail(batch, error)
                continue
            for job in batch:
                job.rows, rows = rows[: len(job.requests)], rows[len(job.requests) :]
                job.results = [None] * len(job.rows)
                errors = [row for row in job.rows if isinstance(row, Exception)]
                if errors:  # a bad request: its caller hears why
                    self._fail([job], errors[0])

    def _pick_group(self) -> list[tuple[Job, Any]]:
        """The (job, row) pairs to step next: the batch holding the least-served visitor."""
        with self._cond:
            groups: dict[tuple, list[tuple[Job, Any]]] = {}
            for job in self._active:
                for row in job.rows:
                    if not row.done:
                        groups.setdefault(job.group, []).append((job, row))
        if not groups:
            return []
        return min(groups.values(), key=lambda pairs: min(self._fair.priority(j.session, j.address) for j, _ in pairs))

    def _step(self, pairs: list[tuple[Job, Any]]) -> None:
        """One UNet call for the group's rows; then decode rows that finished and complete their jobs."""
        jobs = list(dict.fromkeys(job for job, _ in pairs))
        engine, rows = jobs[0].engine, [row for _, row in pairs]

        def all_stale() -> bool:
            return all(job.should_stop() and not job.finishing for job in jobs)

        try:
            stepped = engine.step(rows, all_stale)
        except Exception as error:
            self._fail(jobs, error)
            return
        if not stepped:
            self.stats.aborted_steps += 1
            return
        self.stats.unet_calls += 1
        self.stats.rows_stepped += len(rows)
        for job, row in pairs:
            self._fair.charge(job.session, job.address, row.pixels)
        finished = [(job, row) for job, row in pairs if row.done]
        if not finished:
            return
        try:
            results = engine.finish([row for _, row in finished])
        except Exception as error:
            self._fail(list(dict.fromkeys(job for job, _ in finished)), error)
            return
        for (job, row), result in zip(finished, results):
            job.results[job.rows.index(row)] = result
        for job in dict.fromkeys(job for job, _ in finished):
            if all(row.done for row in job.rows):
                errors = [r for r in job.results if isinstance(r, Exception)]
                if errors:
                    self._fail([job], errors[0])
                else:
                    self._complete(job, job.results[0] if len(job.results) == 1 else list(job.results))

    def _complete(self, job: Job, result) -> None:
        done = time.perf_counter()
        with self._cond:
            if job in self._active:
                self._active.remove(job)
            if self._delivered.get(job.slot, 0) > job.seq:  # a newer result already went out: never go back
                self.stats.stopped += 1
                _resolve(job.future, SUPERSEDED)
                return
            self._delivered[job.slot] = job.seq
            self.stats.ran += 1
            if isinstance(result, Result):
                self._remember_preview(job, result)
            self._cond.notify_all()
        _resolve(job.future, Outcome(result, (done - job.submitted) * 1e3, (done - job.started) * 1e3, job.seq))

    def _fail(self, jobs: list[Job], error: Exception) -> None:
        with self._cond:
            for job in jobs:
                if job in self._active:
                    self._active.remove(job)
                self.stats.failed += 1
                _resolve(job.future, error=error)

    def _remember_preview(self, job: Job, result: Result) -> None:
        """Keep a fast-decoded result's latents, for the full-VAE decode once the slot's input is still."""
        if result.params.get("decoder") == "tiny" and result.latents is not None and job.engine is self.engine:
            self._previews[job.slot] = (job.seq, result.latents, result.params)
        else:
            self._previews.pop(job.slot, None)


def _group_of(job: Job, engine) -> tuple[tuple, int]:
    """The batch a job's rows join, (engine, sizes), and how many rows it brings; rows of one group share UNet calls."""
    if isinstance(job.requests, Settle):
        return (id(engine), "settle"), 0
    sizes = sorted({checked(request, engine.native_size)[0].pixel_size for request in job.requests})
    return (id(engine), *sizes), len(job.requests)


def default_max_batch(engine) -> int:
    """Rows per UNet call for the engine's device (measured: docs/benchmarks.md)."""
    device = getattr(getattr(engine, "runtime", None), "device", "cpu")
    return DEFAULT_MAX_BATCH.get(device.split(":")[0], 8)


def _side(pixel_steps: int) -> int:
    """The largest square side (a multiple of 8) whose pixels at MAX_STEPS fit `pixel_steps`."""
    return int((pixel_steps / MAX_STEPS) ** 0.5) // 8 * 8
