"""ZeroGPU mode (lcm_live/zerogpu.py) against a stand-in for `spaces.GPU` that runs each call as ZeroGPU does.

The stand-in (FakeZeroGpu) charges each call to the visitor of the Gradio context it is made in, may refuse it with
ZeroGPU's own kind of message, and runs the decorated generator in a forked worker process, its arguments and yields
pickled through multiprocessing queues; the engine (FakeEngine) fails any call made outside such a worker. The real
`spaces.GPU` is checked to be a no-op where SPACES_ZERO_GPU is unset (and the app is served through it so).
"""

import asyncio
import multiprocessing
import os
import time
from collections import Counter
from types import SimpleNamespace

import gradio as gr
import pytest
from gradio.context import LocalContext
from PIL import Image

from lcm_live.live import SUPERSEDED, Limits
from lcm_live.request import GenerationError, GenerationStopped, Request, RequestRefused, Result, Timings, checked
from lcm_live.zerogpu import ZeroGpuLoop


FORK = multiprocessing.get_context("fork")
IN_WORKER = {"pid": None}  # set in a worker process only


class FakeEngine:
    """Makes a flat image per request in 10 ms a step; refuses to run outside a GPU worker."""

    native_size = 64
    info = {"model": "fake", "runtime": "fake", "native_size": 64, "embedded": False}

    def __init__(self):
        self.outside = 0

    def generate(self, request: Request, should_stop=None) -> Result:
        if IN_WORKER["pid"] != os.getpid():
            self.outside += 1
            raise AssertionError("an engine call outside a GPU call")
        request, _ = checked(request, self.native_size)
        for step in range(request.steps):
            time.sleep(0.01)
            if should_stop is not None and step < request.steps - 1 and should_stop():
                raise GenerationStopped(step)
        params = {"prompt": request.prompt, "seed": request.seed, "decoder": request.decoder, "pid": os.getpid()}
        return Result(Image.new("RGB", (request.width, request.height), "purple"), params, Timings())


def _worker(task, args_queue, results):
    IN_WORKER["pid"] = os.getpid()
    try:
        for value in task(*args_queue.get()):
            results.put(("yield", value))
    except Exception as error:
        results.put(("error", repr(error)))
    results.put(("end", None))


class FakeZeroGpu:
    """`spaces.GPU` as ZeroGPU runs it, without a GPU: a counted, refusable acquisition per call, a forked worker."""

    def __init__(self, refuse: tuple[str, ...] = ()):
        self.acquisitions: Counter[str] = Counter()  # visitor (session hash of the call's Gradio request) -> calls
        self.durations: list = []
        self.refuse = refuse

    def __call__(self, task=None, *, duration=None):
        self.durations.append(duration)

        def decorate(task):
            def gpu_call(*args):
                visitor = getattr(LocalContext.request.get(None), "session_hash", None)
                self.acquisitions[visitor] += 1
                if visitor in self.refuse:
                    raise gr.Error("You have exceeded your free ZeroGPU quota (30s requested vs. 12s left). "
                                   "Try again in 0:41:00.", print_exception=False)  # fmt: skip
                args_queue, results = FORK.SimpleQueue(), FORK.SimpleQueue()
                worker = FORK.Process(target=_worker, args=(task, args_queue, results), daemon=True)
                worker.start()
                args_queue.put(args)  # pickled: the pipe's end travels as ZeroGPU's arguments do
                while True:
                    kind, value = results.get()
                    if kind == "end":
                        break
                    if kind == "error":
                        raise RuntimeError(value)
                    yield value
                worker.join(5)

            return gpu_call

        return decorate if task is None else decorate(task)


def _as(visitor: str):
    """Make the current task's Gradio request that of `visitor` (the context ZeroGPU reads)."""
    LocalContext.request.set(SimpleNamespace(session_hash=visitor, headers={}))


async def _type(loop, visitor: str, text: str, pause: float = 0.03, steps: int = 4):
    """One keystroke per character into the visitor's txt2img slot; every keystroke's outcome."""
    _as(visitor)
    calls = []
    for end in range(1, len(text) + 1):
        calls.append(asyncio.ensure_future(loop.run(f"{visitor}:txt2img", Request(prompt=text[:end], steps=steps))))
        await asyncio.sleep(pause)
    return await asyncio.gather(*calls, return_exceptions=True)


@pytest.fixture
def zero():
    gpu, engine = FakeZeroGpu(), FakeEngine()
    loop = ZeroGpuLoop(engine, Limits(), duration=20, idle_s=1.0, gpu=gpu)
    yield SimpleNamespace(loop=loop, gpu=gpu, engine=engine)
    loop.close()


def test_spaces_gpu_is_a_no_op_without_zero_gpu():
    spaces = pytest.importorskip("spaces")
    assert "SPACES_ZERO_GPU" not in os.environ

    def task():
        yield 1

    assert spaces.GPU(task) is task and spaces.GPU(duration=12)(task) is task


def test_a_typing_burst_costs_one_acquisition_and_the_newest_image_comes_back(zero):
    outcomes = asyncio.run(_type(zero.loop, "alice", "a red fox"))
    assert zero.gpu.acquisitions == {"alice": 1} and zero.gpu.durations == [20]
    final = outcomes[-1].result
    assert final.params["prompt"] == "a red fox" and final.params["pid"] != os.getpid()
    assert final.params["decoder"] == "full" and final.latents is None
    assert all(o is SUPERSEDED or o.result.params["prompt"] for o in outcomes[:-1])
    assert zero.engine.outside == 0

    time.sleep(1.6)  # idle: the call let the GPU go; the next burst acquires again
    asyncio.run(_type(zero.loop, "alice", "a blue fox"))
    assert zero.gpu.acquisitions == {"alice": 2} and zero.loop.stats.acquisitions == 2


def test_each_visitor_is_charged_for_their_own_calls(zero):
    async def both():
        return await asyncio.gather(_type(zero.loop, "alice", "one two"), _type(zero.loop, "bob", "three"))

    alice, bob = asyncio.run(both())
    assert zero.gpu.acquisitions == {"alice": 1, "bob": 1}
    assert alice[-1].result.params["prompt"] == "one two" and bob[-1].result.params["prompt"] == "three"


def test_a_refusal_reaches_its_visitor_as_text_and_others_go_on():
    gpu = FakeZeroGpu(refuse=("bob",))
    loop = ZeroGpuLoop(FakeEngine(), Limits(), duration=20, idle_s=0.4, gpu=gpu)

    async def both():
        return await asyncio.gather(_type(loop, "bob", "hi"), _type(loop, "alice", "hello"))

    try:
        bob, alice = asyncio.run(both())
    finally:
        loop.close()
    assert isinstance(bob[-1], GenerationError) and "exceeded your free ZeroGPU quota" in str(bob[-1])
    assert alice[-1].result.params["prompt"] == "hello"


def test_calls_end_near_their_duration_and_typing_goes_on_in_a_new_one():
    gpu, engine = FakeZeroGpu(), FakeEngine()
    loop = ZeroGpuLoop(engine, Limits(), duration=1, idle_s=0.4, gpu=gpu)  # a call takes jobs for 0.75 s
    try:
        outcomes = asyncio.run(_type(loop, "alice", "a long prompt typed slowly", pause=0.06))
    finally:
        loop.close()
    assert gpu.acquisitions["alice"] >= 2
    assert outcomes[-1].result.params["prompt"] == "a long prompt typed slowly"


def test_one_shot_jobs_and_limits(zero):
    async def calls():
        _as("carol")
        sweep = await zero.loop.run("carol:sweep-1", [Request(prompt="s", steps=n, seed=1) for n in (1, 2, 3)])
        with pytest.raises(RequestRefused, match="pixel-steps"):
            await zero.loop.run("carol:txt2img", Request(prompt="big", width=2048, height=2048))
        with pytest.raises(ValueError, match="steps must be"):
            await zero.loop.run("carol:txt2img", Request(prompt="bad", steps=50))
        return sweep

    sweep = asyncio.run(calls())
    assert [r.params["prompt"] for r in sweep.result] == ["s", "s", "s"]
    assert zero.gpu.acquisitions == {"carol": 1}  # refused requests never reach a GPU call


def test_a_departed_session_is_dropped(zero):
    async def leave():
        _as("dave")
        slow = asyncio.ensure_future(zero.loop.run("dave:txt2img", Request(prompt="slow", steps=8)))
        await asyncio.sleep(0.02)
        zero.loop.forget("dave:")
        return await slow

    assert asyncio.run(leave()) is SUPERSEDED


@pytest.mark.app
def test_the_app_serves_in_zerogpu_mode_through_the_real_spaces_decorator(tmp_path_factory, monkeypatch):
    """--zerogpu on a machine without ZeroGPU: `spaces.GPU` is a no-op, each visitor's calls run in this process,
    made in the Gradio context of the visitor's own event (whose request ZeroGPU charges)."""
    spaces = pytest.importorskip("spaces")
    os.environ.setdefault("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio-cache")))
    from gradio_client import Client

    from app import close, launch
    from lcm_live import zerogpu
    from lcm_live.pngmeta import read_params
    from lcm_live.settings import Settings
    from tests.conftest import _free_port

    charged = []

    def real_gpu_seen(task=None, *, duration=None):
        def decorate(task):
            gpu_call = spaces.GPU(duration=duration)(task)

            def call(*args):
                charged.append(getattr(LocalContext.request.get(None), "session_hash", None))
                yield from gpu_call(*args)

            return call

        return decorate

    monkeypatch.setattr(zerogpu, "gpu_decorator", lambda: real_gpu_seen)
    settings = Settings(preset="demo", offline=True, port=_free_port(), zerogpu=True, allow_model_switch=True)
    demo, app = launch(settings, prevent_thread_lock=True)
    try:
        assert isinstance(app.loop, ZeroGpuLoop) and not app.manager.policy.enabled
        client = Client(f"http://127.0.0.1:{settings.port}/", verbose=False)
        path = client.predict("a red circle", "", 2, 1.0, 7, 64, 64, api_name="/txt2img")
        params = read_params(path)
        assert params["prompt"] == "a red circle" and params["decoder"] == "full"
        assert app.loop.stats.acquisitions == 1 and charged == [client.session_hash]
    finally:
        demo.close()
        close(app)


def test_the_real_spaces_wrapper_against_a_fake_device_api():
    """tests/zerogpu_device_api.py, in a process of its own (SPACES_ZERO_GPU makes `spaces` patch torch): the package's
    own wrapper schedules each typing burst once per visitor, runs it in a forked worker and relays the refusal."""
    pytest.importorskip("spaces")
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent / "zerogpu_device_api.py"
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0 and lines, done.stderr[-2000:]
    report = json.loads(lines[-1])
    assert report["schedules"]["alice"] == 2  # two bursts of typing, one acquisition each
    assert report["calls"]["/allow"] == 2 and report["calls"]["/release"] == 2
    first, second = report["alice"]
    assert first["prompt"] == "a red fox" and second["prompt"] == "a blue fox"
    assert first["pid"] != report["pid"] and report["outside"] == 0  # made in the wrapper's worker only
    assert report["bob_error"] == "GenerationError" and "exceeded your ZeroGPU quota" in report["bob"]
