"""ZeroGPU mode: each visitor is served by GPU calls of their own, as Hugging Face's ZeroGPU Spaces require.

On ZeroGPU, CUDA is real only inside a function decorated with `spaces.GPU`; each call runs in a worker process
that holds a GPU for at most the declared duration, charged to the visitor whose event made the call. So this loop
never touches the engine itself. A visitor's first keystroke opens one decorated generator call (in that
keystroke's Gradio context, so ZeroGPU charges them); their later keystrokes go to it over a pipe, newest first per
slot, and its images come back as its yields; after `idle_s` without input, or near the duration, the call returns
and lets the GPU go. A burst of typing costs one acquisition. Nothing is batched across visitors. A refusal
(quota spent, no GPU free) reaches that visitor as a GenerationError with ZeroGPU's message; others go on.

The same methods as live.LiveLoop, as far as the handlers use them: run, settle, forget, info, limits, max_batch,
engine, swap_engine, close.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import os
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from multiprocessing import Pipe
from typing import Any

from .live import SUPERSEDED, Limits, Outcome
from .request import MAX_STEPS, GenerationError, GenerationStopped, Request, RequestRefused, checked
from .schedule import resolve, session_of


DURATION_S = 30  # the GPU time each call declares (ZeroGPU admits a call only if the visitor's quota covers it)
IDLE_S = 2.0  # a call returns after this long without input: the next keystroke acquires again
BUDGET = 0.75  # of the duration: past it a call takes no new job (the next goes to a new call)


def wanted(settings, environ=os.environ) -> bool:
    """ZeroGPU mode: --zerogpu, or a ZeroGPU Space (SPACES_ZERO_GPU set, as the `spaces` package reads it)."""
    return settings.zerogpu or environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")


def gpu_decorator():
    """`spaces.GPU` (a no-op unless SPACES_ZERO_GPU is set); SystemExit naming the install when it is missing.

    Import this before torch touches CUDA: on ZeroGPU the package patches torch so that the model "moves" to cuda at
    start-up and really moves in each call's worker."""
    try:
        import spaces
    except ImportError as error:
        raise SystemExit(f"lcm-live: ZeroGPU mode needs the `spaces` package ({error}): pip install spaces") from error
    return spaces.GPU


def load_engine(manager, spec):
    """The model at start-up, as ZeroGPU expects: no warm-up run (CUDA is not real here), no CUDA graphs, no compile."""
    from .engine import Engine

    engine = Engine.load(spec, manager.runtime_for(spec), taesd=False, local_files_only=manager.offline, warmup=False)
    for cache in (getattr(engine, "unet_graphs", None), getattr(engine, "decode_graphs", None)):
        if cache is not None:
            cache.enabled = False  # captured graphs would not survive a call's worker
    engine.notes.append("ZeroGPU: each visitor's images run in GPU calls of their own.")
    return engine


@dataclass(eq=False)
class Job:
    slot: str
    requests: tuple[Request, ...]
    address: str | None
    preempt: bool
    seq: int
    id: int = 0
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None
    future: Future = field(default_factory=Future)


@dataclass(eq=False)
class Call:
    """One GPU call of one visitor session: the pipe to it, the jobs sent to it and not answered yet."""

    session: str
    context: contextvars.Context  # the Gradio context of the event that opened it (ZeroGPU charges its visitor)
    conn: Any
    child: Any  # the pipe's other end, handed to the call
    jobs: dict[int, Job] = field(default_factory=dict)
    outbox: queue.Queue = field(default_factory=queue.Queue)
    answered: int = 0
    ended: bool = False


@dataclass
class ZeroStats:
    acquisitions: int = 0  # GPU calls opened
    ran: int = 0
    refused: int = 0  # calls ZeroGPU refused (quota, no GPU)


class ZeroGpuLoop:
    """Per-visitor GPU calls instead of one shared worker; newest-wins slots as in the live loop, no batching."""

    def __init__(self, engine, limits: Limits | None = None, duration: int = DURATION_S, idle_s: float = IDLE_S,
                 gpu=None):  # fmt: skip
        self.engine = engine
        self.limits = limits or Limits()
        self.max_batch = 1
        self.duration, self.idle_s = duration, idle_s
        self.stats = ZeroStats()
        self._gpu_call = (gpu or gpu_decorator())(duration=duration)(self._serve)  # decorated once: spaces caches it
        self._lock = threading.Lock()
        self._calls: dict[str, Call] = {}  # session -> its open call
        self._newest: dict[str, Job] = {}  # slot -> its newest job
        self._order: dict[str, float] = {}
        self._ids = itertools.count(1)
        self._closed = False

    # ------------------------------------------------------------------ the handlers' side
    async def run(self, slot: str, requests, order: float | None = None, address: str | None = None,
                  preempt: bool = True) -> Outcome | str:  # fmt: skip
        """Submit and wait; an Outcome, or SUPERSEDED. ValueError / RequestRefused / GenerationError as the loop's."""
        job = self.submit(slot, requests, order, address, preempt)
        return await asyncio.wrap_future(job.future)

    def submit(self, slot: str, requests: Request | Sequence[Request], order: float | None = None,
               address: str | None = None, preempt: bool = True) -> Job:  # fmt: skip
        requests = (requests,) if isinstance(requests, Request) else tuple(requests)
        if not requests:
            raise ValueError("Nothing to generate: no requests were given.")
        with self._lock:
            if self._closed:
                raise RuntimeError("the live loop is closed")
            self._admit(slot, requests, address)
            older = self._newest.get(slot)
            job = Job(slot, requests, address, preempt, (older.seq if older else 0) + 1, next(self._ids))
            if order is not None:
                if order < self._order.get(slot, float("-inf")):
                    resolve(job.future, SUPERSEDED)
                    return job
                self._order[slot] = order
            if older is not None and preempt:
                resolve(older.future, SUPERSEDED)  # the call drops or stops it
            self._newest[slot] = job
            self._send(job, contextvars.copy_context())
        return job

    def _admit(self, slot: str, requests: tuple[Request, ...], address: str | None) -> None:
        """Raise unless the requests fit: each within the cost cap, the visitor within its job caps."""
        native = self.engine.native_size
        cap = self.limits.cost_cap(native)
        for request in requests:
            request, _ = checked(request, native)
            if request.cost() > cap:
                raise RequestRefused(f"{request.width}x{request.height} at {request.unet_steps} steps is more than "
                                     f"this server runs for one request (at most {cap:,} pixel-steps, at most "
                                     f"{MAX_STEPS} steps). Use a smaller size or fewer steps.")  # fmt: skip
        live = [job for job in self._newest.values() if job.slot != slot and not job.future.done()]
        session = session_of(slot)
        if sum(session_of(job.slot) == session for job in live) >= self.limits.session_jobs:
            raise RequestRefused(f"Too many requests at once from this session (at most {self.limits.session_jobs}); "
                                 "wait for one to finish.")  # fmt: skip
        if address is not None and sum(job.address == address for job in live) >= self.limits.address_jobs:
            raise RequestRefused(f"Too many requests at once from your address (at most {self.limits.address_jobs}); "
                                 "wait for one to finish.")  # fmt: skip

    def _send(self, job: Job, context: contextvars.Context) -> None:
        """Give `job` to its session's open call, opening one (an acquisition) when there is none. Under the lock."""
        session = session_of(job.slot)
        call = self._calls.get(session)
        if call is None or call.ended:
            call = self._open(session, context)
        call.jobs[job.id] = job
        call.outbox.put(("job", job.id, job.slot, job.requests, job.preempt))

    def _open(self, session: str, context: contextvars.Context) -> Call:
        conn, child = Pipe()
        call = Call(session, context, conn, child)
        self._calls[session] = call
        self.stats.acquisitions += 1
        threading.Thread(target=context.copy().run, args=(self._drive, call), name="lcm-live-zerogpu",
                         daemon=True).start()  # fmt: skip
        threading.Thread(target=self._feed, args=(call,), name="lcm-live-zerogpu-feed", daemon=True).start()
        return call

    async def settle(self, slot: str) -> None:
        """Nothing to upgrade: images here are decoded with the full VAE (there is no GPU between calls)."""
        return None

    @property
    def info(self) -> dict:
        return self.engine.info

    def forget(self, slot_prefix: str) -> None:
        """Drop a departed session's jobs; its call drops them too and returns once idle."""
        with self._lock:
            for slot in [s for s in self._newest if s.startswith(slot_prefix)]:
                job = self._newest.pop(slot)
                self._order.pop(slot, None)
                if not job.future.done():
                    resolve(job.future, SUPERSEDED)
                    call = self._calls.get(session_of(slot))
                    if call is not None:
                        call.outbox.put(("drop", slot_prefix))

    def swap_engine(self, engine) -> None:
        """Serve later calls with `engine` (ZeroGPU mode loads its one model at start-up; switching is off)."""
        with self._lock:
            self.engine = engine

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for call in self._calls.values():
                call.outbox.put(("end",))
            for job in self._newest.values():
                resolve(job.future, SUPERSEDED)

    # ------------------------------------------------------------------ this process's side of a call
    def _feed(self, call: Call) -> None:
        """Send the call's messages in order (a big image may fill the pipe until the call reads it)."""
        while (message := call.outbox.get()) is not None:
            try:
                call.conn.send(message)
            except (OSError, ValueError):  # the call ended
                return

    def _drive(self, call: Call) -> None:
        """Run one GPU call in the visitor's context and route its yields; then resend what it left unanswered."""
        error = None
        try:
            for message in self._gpu_call(call.child, self.idle_s, self.duration * BUDGET):
                self._answer(call, message)
        except Exception as failure:  # ZeroGPU refused (quota, no GPU) or the worker died
            error = failure
        with self._lock:
            call.ended = True
            if self._calls.get(call.session) is call:
                del self._calls[call.session]
            left = [job for job in call.jobs.values() if not job.future.done()]
            call.outbox.put(None)
            if error is None and left and call.answered and not self._closed:
                for job in left:  # sent as the call was ending: a new call takes them
                    self._send(job, call.context)
                left = []
        if error is not None:
            self.stats.refused += 1
        text = _refusal(error) if error is not None else "The GPU call ended before your image; try again."
        for job in left:
            resolve(job.future, error=GenerationError(text))
        for end in (call.conn, call.child):
            end.close()

    def _answer(self, call: Call, message: tuple) -> None:
        kind, job_id, *rest = message
        with self._lock:
            job = call.jobs.pop(job_id, None)
            call.answered += 1
        if job is None:
            return
        if kind == "done":
            self.stats.ran += 1
            results = rest[0]
            done = time.perf_counter()
            result = results[0] if len(results) == 1 else list(results)
            resolve(job.future, Outcome(result, (done - job.submitted) * 1e3, rest[1], job.seq))
        elif kind == "failed":
            error_kind, text = rest
            resolve(job.future, error=(ValueError if error_kind == "ValueError" else GenerationError)(text))
        else:  # stopped or dropped for a newer one
            resolve(job.future, SUPERSEDED)

    # ------------------------------------------------------------------ inside the GPU call
    def _serve(self, conn, idle_s: float, budget_s: float):
        """The decorated generator: run the jobs that come over `conn`, newest first per slot; yield each answer.

        Returns after `idle_s` without a job (or once `budget_s` is spent, or the other end hangs up), which lets
        the GPU go. Runs in ZeroGPU's worker process: everything it needs comes over `conn` or was there at fork.
        """
        started = time.monotonic()
        pending: dict[str, tuple] = {}  # slot -> (job id, requests, preempt)
        dropped: list[int] = []  # jobs replaced before they ran

        def receive(timeout: float) -> bool:
            """Read what is waiting (or what comes within `timeout`) into `pending`; False once hung up or ended."""
            try:
                while conn.poll(timeout):
                    kind, *rest = conn.recv()
                    if kind == "end":
                        return False
                    if kind == "drop":
                        for slot in [s for s in pending if s.startswith(rest[0])]:
                            dropped.append(pending.pop(slot)[0])
                    else:
                        job_id, slot, requests, preempt = rest
                        if slot in pending:
                            dropped.append(pending.pop(slot)[0])
                        pending[slot] = (job_id, requests, preempt)
                    timeout = 0
            except (EOFError, OSError):
                return False
            return True

        while time.monotonic() - started < budget_s:
            if not receive(0 if pending else idle_s) or not pending:
                break
            yield from (("dropped", job_id) for job_id in dropped)
            dropped.clear()
            slot = next(iter(pending))
            job_id, requests, preempt = pending.pop(slot)

            def newer(slot=slot, preempt=preempt) -> bool:
                return preempt and (not receive(0) or slot in pending)

            yield self._run_job(job_id, requests, newer)
        yield from (("dropped", job_id) for job_id in dropped)

    def _run_job(self, job_id: int, requests, newer) -> tuple:
        """One job's answer: ("done", id, results, run ms), ("stopped", id) or ("failed", id, kind, message)."""
        start = time.perf_counter()
        try:
            results = []
            for request in requests:
                request = replace(request, decoder="full") if request.decoder == "auto" else request
                results.append(replace(self.engine.generate(request, newer), latents=None))  # no CUDA tensor leaves
        except GenerationStopped:
            return ("stopped", job_id)
        except Exception as error:  # a bad request or a failed generation: that job's caller hears why
            return ("failed", job_id, "ValueError" if isinstance(error, ValueError) else "", str(error))
        return ("done", job_id, results, (time.perf_counter() - start) * 1e3)


def _refusal(error: BaseException) -> str:
    """ZeroGPU's message (a gr.Error's text) for the visitor; a worker crash in plain words."""
    text = str(getattr(error, "message", "") or error)
    if type(error).__name__ == "Error":  # gr.Error: ZeroGPU's quota and availability messages
        return text
    return f"The GPU call failed ({type(error).__name__}: {text}); try again."
