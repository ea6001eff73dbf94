"""Test doubles: an engine whose steps take a known time."""

import threading
import time

from PIL import Image

from lcm_live.request import GenerationStopped, Result, Timings


class FakeEngine:
    """Counts steps; each step sleeps `step_s`; honours should_stop between steps, except in the last one."""

    def __init__(self, step_s: float = 0.02):
        self.step_s = step_s
        self.steps_run = 0
        self.started: list[str] = []
        self.lock = threading.Lock()

    native_size = 64
    info = dict(model="fake", runtime="cpu fake", native_size=64, embedded=False, decoder="VAE", family="sd15")

    def generate(self, request, should_stop=None):
        self.started.append(request.prompt)
        if request.prompt.startswith("fail: "):
            raise MemoryError(request.prompt.removeprefix("fail: "))
        for index in range(request.steps):
            if should_stop is not None and index > 0 and should_stop():
                raise GenerationStopped(index)
            time.sleep(self.step_s)
            with self.lock:
                self.steps_run += 1
        params = dict(prompt=request.prompt, seed=request.seed, steps=request.steps)
        return Result(Image.new("RGB", (8, 8)), params, Timings(total_ms=request.steps * self.step_s * 1e3))
