"""Typing traces replayed against the live loop and against Gradio's `always_last` policy.

Both policies drive the same engine. A trace is a list of (seconds, prompt) inputs, grouped into bursts by
pauses. Per burst we read: the latency from its last input to the image of that input being shown (in
model-times T, the time of one undisturbed generation), the UNet steps spent from its first input to then, and
stale images shown (an image for an older input shown after one for a newer input, or a burst whose last
image is not for its last input). Times of the fake engine and of the traces are divided by `scale` together,
so results in model-times do not depend on it.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field

from ..live import SUPERSEDED, LiveLoop
from ..request import Request
from .core import PROMPT
from .sim import SimulatedEngine, pause


# ---------------------------------------------------------------------- traces
def typed(text: str, cps: float, start: float = 0.0) -> list[tuple[float, str]]:
    """`text` typed one character at a time at `cps` characters per second."""
    return [(start + i / cps, text[: i + 1]) for i in range(len(text))]


def bursts_and_pauses(text: str, cps: float, pause_s: float, words_per_burst: int = 3) -> list[tuple[float, str]]:
    """Words typed in bursts at `cps`, with a `pause_s` pause after every `words_per_burst` words."""
    words, events, t, typed_so_far = text.split(" "), [], 0.0, ""
    for index, word in enumerate(words):
        chunk = (" " if index else "") + word
        for char in chunk:
            typed_so_far += char
            events.append((t, typed_so_far))
            t += 1 / cps
        if (index + 1) % words_per_burst == 0:
            t += pause_s
    return events


def split_bursts(events: list[tuple[float, str]], gap_s: float) -> list[list[int]]:
    """Indices of events grouped into bursts separated by more than `gap_s`."""
    bursts = [[0]]
    for i in range(1, len(events)):
        if events[i][0] - events[i - 1][0] > gap_s:
            bursts.append([])
        bursts[-1].append(i)
    return bursts


# ---------------------------------------------------------------------- engines
def CalibratedEngine(step_s: float, decode_s: float, blocks: int = 9) -> SimulatedEngine:
    """A stand-in engine: each UNet step takes `step_s` in `blocks` slices, then a decode of `decode_s`."""
    return SimulatedEngine(step_s, decode_s, blocks=blocks)


class BlockCounter:
    """Counts UNet blocks run by a real engine, so partial steps of stopped runs count too."""

    def __init__(self, engine):
        unet = engine.txt2img.unet
        blocks = [b for b in [*unet.down_blocks, unet.mid_block, *unet.up_blocks] if b is not None]
        self.blocks, self.calls, self.decodes = len(blocks), 0, 0
        self._hooks = [block.register_forward_pre_hook(self._count) for block in blocks]
        for vae in (engine.full_vae, engine.tiny_vae):
            if vae is not None:
                self._hooks.append(vae.decoder.register_forward_pre_hook(self._count_decode))

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()

    def _count(self, module, args):
        self.calls += 1

    def _count_decode(self, module, args):
        self.decodes += 1

    @property
    def steps_spent(self) -> float:
        return self.calls / self.blocks


# ---------------------------------------------------------------------- policies
@dataclass
class Shown:
    log: list[tuple[float, int]] = field(default_factory=list)  # (time, input index) of each image shown
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, index: int) -> None:
        with self.lock:
            self.log.append((time.perf_counter(), index))


class LiveLoopPolicy:
    name = "LiveLoop"

    def __init__(self, engine, shown: Shown, max_batch: int | None = None):
        self.loop, self.shown = LiveLoop(engine, max_batch=max_batch), shown

    def input(self, index: int, request: Request) -> None:
        job = self.loop.submit("bench", request)

        def done(future, index=index):
            if future.exception() is None and future.result() != SUPERSEDED:
                self.shown.add(index)

        job.future.add_done_callback(done)

    def close(self) -> None:
        self.loop.close()


class AlwaysLastPolicy:
    """Gradio's `always_last`: one run in flight, one pending; the pending one, sent when the running one ends,
    carries the newest values; nothing is aborted and every finished result is shown. Runs happen on one
    long-lived worker thread, as in Gradio's thread pool."""

    name = "always_last"

    def __init__(self, engine, shown: Shown):
        self.engine, self.shown = engine, shown
        self._cond = threading.Condition()
        self._newest: tuple[int, Request] | None = None  # the input values as they are now
        self._pending = self._closed = False
        self._worker = threading.Thread(target=self._serve, daemon=True)
        self._worker.start()

    def input(self, index: int, request: Request) -> None:
        with self._cond:
            self._newest, self._pending = (index, request), True
            self._cond.notify()

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                (index, request), self._pending = self._newest, False
            self.engine.generate(request)
            self.shown.add(index)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._worker.join(timeout=60)


# ---------------------------------------------------------------------- replay
def replay(policy_class, engine, counter, events, scale: float, model_s: float, steps: int, gap_s: float,
           size: int | None = None) -> dict:  # fmt: skip
    """Replay `events` (times in unscaled seconds) through a policy; per-burst metrics in model-times."""
    shown = Shown()
    policy = policy_class(engine, shown)
    bursts = split_bursts(events, gap_s)
    spent_at: list[tuple[float, float, int]] = []  # (time, steps spent, decodes), sampled at each input
    t0 = time.perf_counter()
    for index, (at, prompt) in enumerate(events):
        pause(t0 + at / scale - time.perf_counter())
        spent_at.append((time.perf_counter(), counter.steps_spent, counter.decodes))
        policy.input(index, Request(prompt=prompt, steps=steps, seed=0, width=size, height=size))
    # Wait for the last burst's image (or a generous limit).
    deadline = time.perf_counter() + 10 * model_s + 1
    while time.perf_counter() < deadline and not any(i == len(events) - 1 for _, i in shown.log):
        time.sleep(0.001)
    end_spent = (counter.steps_spent, counter.decodes)
    policy.close()
    log, stale, newest = shown.log, 0, -1
    for _, index in log:
        stale += index < newest
        newest = max(newest, index)
    latencies, steps_per_burst, decodes_per_burst, unsettled = [], [], [], 0
    for burst in bursts:
        last = burst[-1]
        times = [t for t, i in log if i == last]
        others_after = [i for t, i in log if i != last and times and t > times[0] and i < last]
        stale += len(others_after)
        if not times:
            unsettled += 1  # the next burst came before this one's image: nothing to measure
            continue
        input_time = spent_at[last][0]
        latencies.append((times[0] - input_time) / model_s)
        later = [(s, d) for t, s, d in spent_at if t >= times[0]]
        steps, decodes = later[0] if later else end_spent
        steps_per_burst.append(steps - spent_at[burst[0]][1])
        decodes_per_burst.append(decodes - spent_at[burst[0]][2])
    return dict(policy=policy_class.name, bursts=len(bursts), settled=len(latencies), unsettled=unsettled,
                latency_T_median=_stat(latencies, 50), latency_T_p95=_stat(latencies, 95),
                latency_T_max=round(max(latencies), 3) if latencies else None,
                steps_per_burst=round(statistics.mean(steps_per_burst), 2) if steps_per_burst else None,
                decodes_per_burst=round(statistics.mean(decodes_per_burst), 2) if decodes_per_burst else None,
                images_shown=len(log), stale_shown=stale, latencies_T=[round(x, 3) for x in latencies],
                steps=[round(x, 2) for x in steps_per_burst], decodes=decodes_per_burst)  # fmt: skip


def pooled(rows: list[dict]) -> dict:
    """All bursts of `rows` (one policy, one engine) together."""
    latencies = [x for r in rows for x in r["latencies_T"]]
    steps = [x for r in rows for x in r["steps"]]
    decodes = [x for r in rows for x in r["decodes"]]
    return dict(policy=rows[0]["policy"], bursts=sum(r["bursts"] for r in rows), settled=len(latencies),
                latency_T_median=_stat(latencies, 50), latency_T_p95=_stat(latencies, 95),
                latency_T_max=round(max(latencies), 3) if latencies else None,
                steps_per_burst=round(statistics.mean(steps), 2) if steps else None,
                decodes_per_burst=round(statistics.mean(decodes), 2) if decodes else None,
                images_shown=sum(r["images_shown"] for r in rows), stale_shown=sum(r["stale_shown"] for r in rows))  # fmt: skip


def _stat(values: list[float], pct: int) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))], 3)


def traces(model_s: float, smoke: bool = False) -> dict[str, list[tuple[float, str]]]:
    """The typing traces: the prompt at 5, 8 and 12 chars/s, and in bursts with pauses of ~3 model-times."""
    text = PROMPT[:10] if smoke else PROMPT
    return {
        "5 chars/s": typed(text, 5),
        "8 chars/s": typed(text, 8),
        "12 chars/s": typed(text, 12),
        "bursts 12 chars/s, pauses 3 T": bursts_and_pauses(text, 12, 3 * model_s, words_per_burst=1 if smoke else 2),
    }
