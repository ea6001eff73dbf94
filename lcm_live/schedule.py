"""The live loop's scheduler: state in, plan out. No threads, no clocks: a test calls it step after step.

A slot holds only its newest job: `add` drops the slot's older pending job and stops its running one. At every
step boundary `schedule` turns the pending and running jobs into one Plan: the running jobs that leave
(superseded, or their waiter gave up), the pending jobs whose waiter left, the pending jobs that join the running
set (same engine and image size as a running batch, up to `max_batch` rows) and the group whose rows run the next
UNet call: the one holding the least-served visitor (`fair.FairShare`). `stepped` folds a step back in (charges
the fair shares). Batches of other sizes take turns at step boundaries, so a large request never holds a small
one for its whole run. The worker executes plans; it decides nothing.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

from .fair import FairShare
from .request import MAX_STEPS, Request, RequestRefused, checked


SUPERSEDED = "superseded"  # what a dropped or stopped job's future resolves to


def resolve(future: Future, value=None, error: BaseException | None = None) -> None:
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


def session_of(slot: str) -> str:
    return slot.partition(":")[0]


@dataclass(frozen=True)
class Limits:
    """What one visitor may ask of the shared loop. A session is a slot's prefix (`session:tab`)."""

    max_cost: int | None = None  # pixels x UNet steps of one request; None: the model's native size at MAX_STEPS
    session_jobs: int = 6  # a session's queued + running jobs (its tabs, sweeps and API calls)
    address_jobs: int = 12  # the same for every session of one client address
    idle_forget_s: float = 900.0  # a slot silent this long has its bookkeeping dropped

    def cost_cap(self, native_size: int) -> int:
        return self.max_cost if self.max_cost is not None else native_size * native_size * MAX_STEPS


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

    @property
    def steps_left(self) -> bool:
        """It has rows to step: unfinished ones, or (just admitted) rows not made yet. A settle job has none."""
        if isinstance(self.requests, Settle):
            return False
        return not self.rows or any(not row.done for row in self.rows)


def check_limits(requests: tuple[Request, ...] | Settle, native_size: int, limits: Limits) -> None:
    """Raise unless each request is valid and within the cost cap, and all share one image size."""
    if isinstance(requests, Settle):
        return
    cap = limits.cost_cap(native_size)
    for request in requests:
        request, _ = checked(request, native_size)
        if request.cost() > cap:
            raise RequestRefused(
                f"{request.width}x{request.height} at {request.unet_steps} steps is more than this server runs "
                f"for one request (at most {cap:,} pixel-steps, e.g. {_side(cap)}x{_side(cap)} at "
                f"{MAX_STEPS} steps). Use a smaller size or fewer steps."
            )
    if len({checked(r, native_size)[0].pixel_size for r in requests}) > 1:
        raise ValueError("The requests of one job must share one image size.")


def group_of(job: Job, engine) -> tuple[tuple, int]:
    """The batch a job's rows join, (engine, sizes), and how many rows it brings; rows of one group share UNet calls."""
    if isinstance(job.requests, Settle):
        return (id(engine), "settle"), 0
    sizes = sorted({checked(request, engine.native_size)[0].pixel_size for request in job.requests})
    return (id(engine), *sizes), len(job.requests)


@dataclass
class Plan:
    """What the worker does at one step boundary, in this order."""

    stopped: list[Job] = field(default_factory=list)  # running jobs that left: resolve them SUPERSEDED
    dropped: list[Job] = field(default_factory=list)  # pending jobs whose waiter left: never run
    admitted: list[Job] = field(default_factory=list)  # joined the running set: make their rows (or settle them)
    step: list[Job] = field(default_factory=list)  # their unfinished rows run the next UNet call together


class Scheduler:
    """Pending and running jobs, and the policy that turns them into plans."""

    def __init__(self, max_batch: int):
        self.max_batch = max_batch
        self.pending: OrderedDict[str, Job] = OrderedDict()  # slot -> newest job not yet started
        self.running: list[Job] = []  # admitted jobs whose rows are in flight
        self.fair = FairShare()

    def jobs(self) -> list[Job]:
        return [*self.pending.values(), *self.running]

    def busy_slots(self) -> set[str]:
        return {job.slot for job in self.jobs()}

    def check_shares(self, slot: str, address: str | None, limits: Limits) -> None:
        """Raise RequestRefused when the visitor already has its share of live jobs (its own slot's do not count)."""
        live = [job for job in self.jobs() if job.slot != slot and not job.should_stop()]
        if sum(job.session == session_of(slot) for job in live) >= limits.session_jobs:
            raise RequestRefused(
                f"Too many requests at once from this session (at most {limits.session_jobs}); wait for one to finish."
            )
        if address is not None and sum(job.address == address for job in live) >= limits.address_jobs:
            raise RequestRefused(
                f"Too many requests at once from your address (at most {limits.address_jobs}); wait for one to finish."
            )

    def add(self, job: Job, preempt: bool = True) -> Job | None:
        """Make `job` its slot's newest; the older pending job it replaces is returned (never run).
        `preempt=False` (a webcam frame) lets the slot's running job finish."""
        older = self.pending.pop(job.slot, None)
        if preempt:
            for running in self.running:
                if running.slot == job.slot:
                    running.stop.set()
        self.pending[job.slot] = job
        self.fair.join(job.session, job.address)
        return older

    def forget(self, slot_prefix: str) -> list[Job]:
        """Stop the running jobs of slots under `slot_prefix`; their pending jobs are returned (never run)."""
        for job in self.running:
            if job.slot.startswith(slot_prefix):
                job.stop.set()
        return [self.pending.pop(slot) for slot in [s for s in self.pending if s.startswith(slot_prefix)]]

    def schedule(self, engine, now: float = 0.0) -> Plan:
        """The plan for the next step boundary; admitted jobs take `engine` (the one serving) and start at `now`."""
        plan = Plan()
        plan.stopped = [job for job in self.running if job.should_stop() and not job.finishing]
        for job in plan.stopped:
            self.running.remove(job)
        plan.dropped = [job for job in self.pending.values() if job.future.cancelled()]
        for job in plan.dropped:
            del self.pending[job.slot]
        rows_in: dict[tuple, int] = {}  # group -> rows in flight
        for job in self.running:
            rows_in[job.group] = rows_in.get(job.group, 0) + sum(not row.done for row in job.rows)
        for job in sorted(self.pending.values(), key=lambda j: (*self.fair.priority(j.session, j.address),
                                                                j.submitted)):  # fmt: skip
            group, size = group_of(job, engine)
            used = rows_in.get(group, 0)
            if used and used + size > self.max_batch:
                continue  # its batch is full: it joins when a row leaves
            rows_in[group] = used + size
            del self.pending[job.slot]
            job.started, job.engine, job.group = now, engine, group
            self.running.append(job)
            plan.admitted.append(job)
        self.fair.settle_floor([(job.session, job.address) for job in self.jobs()])
        plan.step = self._pick_group()
        return plan

    def _pick_group(self) -> list[Job]:
        """The running jobs whose rows step next: the batch holding the least-served visitor."""
        groups: dict[tuple, list[Job]] = {}
        for job in self.running:
            if job.steps_left:
                groups.setdefault(job.group, []).append(job)
        if not groups:
            return []
        return min(groups.values(), key=lambda jobs: min(self.fair.priority(j.session, j.address) for j in jobs))

    def stepped(self, pairs: list[tuple[Job, Any]]) -> None:
        """Charge each stepped row's visitor its pixels (a visitor forgotten meanwhile stays forgotten)."""
        for job, row in pairs:
            self.fair.charge(job.session, job.address, row.pixels)

    def remove(self, job: Job) -> bool:
        """Take a finished or failed job out of the running set; False if it had already left."""
        if job in self.running:
            self.running.remove(job)
            return True
        return False


def _side(pixel_steps: int) -> int:
    """The largest square side (a multiple of 8) whose pixels at MAX_STEPS fit `pixel_steps`."""
    return int((pixel_steps / MAX_STEPS) ** 0.5) // 8 * 8
