"""A stand-in engine with the real one's interface (start, step, finish, refine) and calibrated times. No torch.

A UNet call for B rows takes `step_s + per_row_s * B`, slept in `blocks` slices with `should_abort` asked between
them, as the real engine asks between UNet blocks; a decode takes `decode_s`. Used by the live-loop benchmark
and the loop's tests.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from PIL import Image

from ..request import GenerationStopped, Request, Result, Timings, checked


@dataclass(eq=False)
class SimRow:
    request: Request  # checked
    steps: int
    index: int = 0
    batch: int = 1
    warnings: list = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.index >= self.steps

    @property
    def last_step(self) -> bool:
        return self.index == self.steps - 1

    @property
    def pixels(self) -> int:
        return self.request.width * self.request.height


@dataclass(frozen=True)
class SimRuntime:
    device: str = "cpu"
    label: str = "cpu simulated"


class SimulatedEngine:
    native_size = 64
    runtime = SimRuntime()
    info = dict(model="simulated", runtime="cpu simulated", native_size=64, embedded=False, decoder="VAE",
                family="sd15")  # fmt: skip

    def __init__(self, step_s: float, decode_s: float = 0.0, per_row_s: float = 0.0, blocks: int = 9):
        self.step_s, self.decode_s, self.per_row_s, self.blocks = step_s, decode_s, per_row_s, blocks
        self.block_calls = self.decodes = self.steps_run = 0  # steps_run: row-steps
        self.calls: list[list[str]] = []  # the prompts of each UNet call
        self.started: list[str] = []
        self._lock = threading.Lock()

    def start(self, request: Request) -> SimRow:
        request, warnings = checked(request, self.native_size)
        self.started.append(request.prompt)
        return SimRow(request, request.unet_steps, warnings=warnings)

    def start_many(self, requests: list[Request]) -> list[SimRow | Exception]:
        rows = []
        for request in requests:
            try:
                rows.append(self.start(request))
            except Exception as error:
                rows.append(error)
        return rows

    def step(self, rows: list[SimRow], should_abort=None) -> bool:
        due = time.perf_counter()  # sleep to deadlines: overshoots do not add up
        for _ in range(self.blocks):
            if should_abort is not None and should_abort():
                return False
            due += (self.step_s + self.per_row_s * len(rows)) / self.blocks
            pause(due - time.perf_counter())
            with self._lock:
                self.block_calls += 1
        with self._lock:
            self.calls.append([row.request.prompt for row in rows])
            for row in rows:
                row.index += 1
                row.batch = max(row.batch, len(rows))
                self.steps_run += 1
        return True

    def finish(self, rows: list[SimRow]) -> list[Result]:
        pause(self.decode_s)
        self.decodes += 1
        return [self._result(row) for row in rows]

    def refine(self, latents, params: dict) -> Result:
        pause(self.decode_s)
        return Result(Image.new("RGB", (8, 8)), {**params, "decoder": "full"}, Timings(decode_ms=self.decode_s * 1e3))

    def warm(self, limit: int | None = 1) -> int:
        """No CUDA graphs to capture."""
        return 0

    def generate(self, request: Request, should_stop=None) -> Result:
        """One request alone, stopping between blocks when `should_stop()` says so (except in its last step)."""
        start = time.perf_counter()
        row = self.start(request)
        while not row.done:
            stop = should_stop if should_stop is not None and not row.last_step else None
            if not self.step([row], stop):
                raise GenerationStopped(row.index)
        result = self.finish([row])[0]
        result.timings.total_ms = (time.perf_counter() - start) * 1e3
        return result

    @property
    def steps_spent(self) -> float:
        """UNet calls made, counting the slices of abandoned ones."""
        return self.block_calls / self.blocks

    def _result(self, row: SimRow) -> Result:
        request = row.request
        params = dict(prompt=request.prompt, seed=request.seed, steps=request.steps, width=request.width,
                      decoder="full")  # fmt: skip
        timings = Timings(denoise_ms=row.steps * self.step_s * 1e3, decode_ms=self.decode_s * 1e3,
                          unet_steps=row.index, batch=row.batch)  # fmt: skip
        return Result(Image.new("RGB", (8, 8)), params, timings, warnings=row.warnings)


def pause(seconds: float) -> None:
    if seconds > 0:
        time.sleep(seconds)
