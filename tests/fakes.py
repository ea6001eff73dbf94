"""Test doubles: the simulated engine (no torch), with failures on demand, and one whose steps the test lets run."""

import threading

from lcm_live.bench.sim import SimRow, SimulatedEngine
from lcm_live.request import Request


class FakeEngine(SimulatedEngine):
    """Each UNet call sleeps `step_s` (+ `per_row_s` a row) in `slices`; a prompt "fail: ..." raises MemoryError."""

    def __init__(self, step_s: float = 0.02, per_row_s: float = 0.0, slices: int = 4):
        super().__init__(step_s, per_row_s=per_row_s, blocks=slices)

    def start(self, request: Request) -> SimRow:
        if request.prompt.startswith("fail: "):
            raise MemoryError(request.prompt.removeprefix("fail: "))
        return super().start(request)


class GatedEngine(FakeEngine):
    """Each UNet call waits until the test lets it run (`go`), so the test decides what happens during a step.

    `wait_in_step()` returns once the worker is inside a call; `go()` lets that call end (it then asks
    `should_abort` once, as the real engine does between blocks); `open()` lets every later call run freely.
    `name` goes into each result's params, so a test can tell which engine made an image."""

    def __init__(self, name: str = "gated"):
        super().__init__(step_s=0.0, slices=1)
        self.name = name
        self.in_step = threading.Event()  # set while a call is in progress
        self._entered = threading.Semaphore(0)
        self._gate = threading.Semaphore(0)
        self._open = threading.Event()

    def step(self, rows, should_abort=None) -> bool:
        self.in_step.set()
        try:
            self._entered.release()
            if not self._open.is_set() and not self._gate.acquire(timeout=10):
                raise TimeoutError("the test never let this step run")
            if should_abort is not None and should_abort():
                return False
            return super().step(rows)
        finally:
            self.in_step.clear()

    def wait_in_step(self, timeout: float = 5.0) -> None:
        assert self._entered.acquire(timeout=timeout), "no step started"

    def go(self) -> None:
        self._gate.release()

    def open(self) -> None:
        self._open.set()
        self._gate.release()

    def _result(self, row: SimRow):
        result = super()._result(row)
        result.params["engine"] = self.name
        return result
