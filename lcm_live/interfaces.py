"""The seams between layers, written down: what the handlers need of a live loop (local or remote), and what the
live loop needs of an engine (real or simulated). No torch: the torch-free tiers import this."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from .request import Request, Result


@runtime_checkable
class EngineRow(Protocol):
    """One request in flight on an engine: the loop reads its progress and cost, never its tensors."""

    @property
    def done(self) -> bool: ...  # every step ran

    @property
    def last_step(self) -> bool: ...  # the next step is its last

    @property
    def pixels(self) -> int: ...  # its cost per step


class HasDevice(Protocol):
    device: str  # "cpu", "cuda", "cuda:1", "mps"


@runtime_checkable
class LoopEngine(Protocol):
    """An engine as the live loop drives it: rows are started together, stepped in batches, finished together.

    Every call runs on the loop's worker thread (GPU work on one thread), a new engine's warm-up included."""

    native_size: int
    runtime: HasDevice

    @property
    def info(self) -> dict: ...  # what serves: model, family, runtime, native_size, embedded, decoder, frame_ms

    def start_many(self, requests: list[Request]) -> list[Any]: ...  # a row, or the Exception that row raised

    def step(self, rows: list[Any], should_abort: Callable[[], bool] | None = None) -> bool: ...  # False: aborted

    def finish(self, rows: list[Any]) -> list[Result]: ...  # decode finished rows together

    def refine(self, latents: Any, params: dict) -> Result: ...  # a preview decoded again with the full VAE

    def warm(self, limit: int | None = 1) -> int: ...  # capture queued CUDA graphs between steps; how many


@runtime_checkable
class ServingLoop(Protocol):
    """A live loop as the page's handlers use it: the single-process LiveLoop, or Ray mode's page-side loop."""

    async def run(self, slot: str, requests: Request | Sequence[Request], order: float | None = None,
                  **options) -> Any: ...  # fmt: skip  # an Outcome, or SUPERSEDED

    async def settle(self, slot: str) -> Any: ...  # the slot's last preview with the full VAE, SUPERSEDED or None

    def forget(self, slot_prefix: str) -> None: ...  # a session left: drop its jobs and bookkeeping

    def latest_seq(self, slot: str) -> int: ...

    @property
    def info(self) -> dict: ...  # the serving engine's info, plus the worker's health ("worker_note")

    def close(self) -> None: ...
