"""Test doubles: the simulated engine (no torch), with failures on demand."""

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
