"""The page-side loop: the live loop's API for the page, served by replicas through a Serve handle."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from dataclasses import replace
from types import SimpleNamespace

from ray.exceptions import RayActorError, RayTaskError

from ..live import SUPERSEDED, Job, Outcome
from ..page_slots import PageSlots
from ..request import GenerationError
from .router import session_of


RESENDS = 3  # a slot's newest input is resent at most this often when replicas die under it


class RemoteLoop:
    """The live loop's API for the page (run, submit, settle, forget, info), served by replicas through a handle.

    The page's own bookkeeping stays here (page_slots.PageSlots): every slot's newest input has a sequence number,
    so a replica lost under it gets the newest input resent, and an older result never replaces a newer one. A
    slot's entry goes when its session leaves (forget) or after it has been idle a while.
    """

    def __init__(self, handle, info: dict, slots: PageSlots | None = None):
        self.handle = handle
        self._info = info
        self.slots = slots if slots is not None else PageSlots()
        self._lock = threading.Lock()
        self.stats = SimpleNamespace(resent=0)  # inputs resent after a replica was lost
        self._runner: asyncio.AbstractEventLoop | None = None  # for submit/run_sync from plain threads

    def _method(self, slot: str, name: str):
        return getattr(self.handle.options(session_id=session_of(slot)), name)

    async def run(self, slot: str, requests, order: float | None = None, **options) -> Outcome | str:
        """Run `requests` as `slot`'s newest input on the session's replica; an Outcome, or SUPERSEDED."""
        seq = self.slots.admit(slot, order)
        if seq is None:
            return SUPERSEDED  # sent before the slot's newest: never run
        for attempt in range(RESENDS + 1):
            try:
                outcome = await self._method(slot, "run").remote(slot, requests, order, **options)
                break
            except RayActorError:  # the replica died under this call; the router has dropped it
                if self.latest_seq(slot) != seq:
                    return SUPERSEDED  # a newer input is on its way to a live replica
                with self._lock:
                    self.stats.resent += 1
                await asyncio.sleep(0.05 * attempt)  # the newest input again, to the session's next replica
            except RayTaskError as error:
                raise _unwrapped(error) from None
        else:
            raise GenerationError("No replica could serve this request; try again in a moment.")
        if not isinstance(outcome, Outcome):
            return outcome
        if not self.slots.show(slot, seq):
            return SUPERSEDED
        return replace(outcome, seq=seq)

    def submit(self, slot: str, requests, order: float | None = None, **options) -> Job:
        """`run` from a plain thread; the Job's future holds the Outcome or SUPERSEDED."""
        future: Future = asyncio.run_coroutine_threadsafe(self.run(slot, requests, order, **options), self._loop())
        return Job(slot, requests, future=future)

    def run_sync(self, slot: str, requests, timeout: float | None = None) -> Outcome | str:
        return self.submit(slot, requests).future.result(timeout)

    async def settle(self, slot: str) -> Outcome | str | None:
        """The slot's last preview decoded with the full VAE, on the replica that holds it; None if there is none."""
        seq = self.latest_seq(slot)
        try:
            outcome = await self._method(slot, "settle").remote(slot)
        except RayActorError:
            return None  # the preview was on a lost replica: the page keeps the preview it shows
        except RayTaskError as error:
            raise _unwrapped(error) from None
        if not isinstance(outcome, Outcome):
            return outcome
        return replace(outcome, seq=seq) if self.latest_seq(slot) == seq else SUPERSEDED

    def latest_seq(self, slot: str) -> int:
        return self.slots.latest(slot)

    def forget(self, slot_prefix: str) -> None:
        """Drop a leaving session's jobs and bookkeeping, here and on its replica (not waited for)."""
        self.slots.forget(slot_prefix)
        self._method(slot_prefix, "forget").remote(slot_prefix)

    @property
    def info(self) -> dict:
        """What serves (model, runtime, ...), the runtime naming how many replicas serve."""
        return self._info

    def update_info(self, info: dict, replicas: int) -> None:
        self._info = {**info, "runtime": f"{info['runtime']} x {replicas} replica{'s' * (replicas != 1)}"}

    def swap_engine(self, engine) -> None:
        raise NotImplementedError("replicas load models themselves: use the manager's switch")

    def close(self) -> None:
        if self._runner is not None:
            self._runner.call_soon_threadsafe(self._runner.stop)

    def _loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._runner is None:
                self._runner = asyncio.new_event_loop()
                threading.Thread(target=self._runner.run_forever, name="lcm-live-remote", daemon=True).start()
            return self._runner


def _unwrapped(error: RayTaskError) -> BaseException:
    """The replica's own exception (its message, without Ray's traceback and the server's paths)."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, Exception) else GenerationError("A replica failed to run this request.")
