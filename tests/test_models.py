"""Model management: start-up fallback, background switching with progress, and the settle upgrade."""

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import gradio as gr
import pytest
from diffusers import AutoencoderTiny

from lcm_live.device import pick_runtime
from lcm_live.engine import Engine
from lcm_live.handlers import LiveApp
from lcm_live.live import LiveLoop
from lcm_live.models import ModelManager
from lcm_live.pngmeta import read_params
from lcm_live.presets import PRESETS, ModelSpec
from lcm_live.request import GenerationError
from lcm_live.settings import Settings


@pytest.fixture
def manager():
    manager = ModelManager(pick_runtime("cpu", "float32"), taesd=False, offline=True)
    loop = LiveLoop(manager.load_now(PRESETS["demo"]))
    manager.attach(loop)
    yield manager
    loop.close()


def test_an_unreachable_model_leaves_the_embedded_model_serving_and_says_why(manager):
    assert manager.switch(PRESETS["sd15"])
    manager.wait(60)
    text = manager.status_markdown().replace("\\", "")  # Markdown's escapes off: the text as shown
    assert manager.engine.info["embedded"]
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in text and "hf download" in text
    assert "embedded demo model" in text and "offline and not cached" in text


def test_switching_loads_in_the_background_and_takes_over(manager, tiny_models, monkeypatch):
    paths = tiny_models["sdxl"]
    seen_progress, warmed_on = [], []

    def warm_up(engine, progress=None):  # GPU work on one thread: the new model warms up on the loop's worker
        warmed_on.append(threading.current_thread().name)
        real_warm_up(engine, progress)

    real_warm_up = Engine.warm_up
    monkeypatch.setattr(Engine, "warm_up", warm_up)
    assert manager.switch(ModelSpec(paths["base"], paths["lora"]))
    while manager.status.loading:
        seen_progress.append(manager.status_markdown())
        time.sleep(0.01)
    manager.wait(60)
    assert any("Loading" in line for line in seen_progress)
    assert manager.engine.family == "sdxl" and manager.status.error is None
    assert warmed_on == ["lcm-live-worker"] and manager.engine.frame_ms > 0
    assert not manager.engine.info["embedded"]
    result = manager.loop.run_sync("s", _request("after switch"), 30)
    assert result.result.params["model"] == "sdxl/base"  # a local folder, without the server's own path


def test_the_status_line_says_when_the_worker_had_to_restart(manager):
    class WorkerExit(BaseException):
        """Not an Exception: it ends the worker thread, as a bug in the loop would."""

    engine, real_step = manager.engine, manager.engine.step

    def step(*args, **kwargs):
        engine.step = real_step
        raise WorkerExit("lost at /srv/lcm/worker.py")

    engine.step = step
    with pytest.raises(GenerationError, match="restarted"):
        manager.loop.run_sync("s", _request("lost"), 30)
    assert manager.loop.run_sync("s", _request("after"), 30).result.params["prompt"] == "after"
    text = manager.status_markdown().replace("\\", "")
    assert "The worker restarted once (last error: WorkerExit: lost at &lt;path&gt;)" in text and "/srv" not in text


def run_async(coroutine):
    """Run a coroutine to the end on a thread of its own (the browser tests keep a loop on this one)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def _request(prompt):
    from lcm_live.request import Request

    return Request(prompt=prompt)


def test_settings_from_env_and_flags():
    env = {"LCM_LIVE_PRESET": "sdxl", "LCM_LIVE_TAESD": "false", "LCM_LIVE_PORT": "9000"}
    assert Settings.from_env(env) == Settings(preset="sdxl", taesd=False, port=9000)
    flags = Settings.from_args(["--preset", "demo", "--taesd", "--dtype", "float32"], environ=env)
    assert flags.preset == "demo" and flags.taesd and flags.dtype == "float32" and flags.port == 9000
    with pytest.raises(ValueError, match="LCM_LIVE_SHARE must be true or false"):
        Settings.from_env({"LCM_LIVE_SHARE": "maybe"})


def test_settle_upgrade_replaces_the_tiny_preview_with_the_full_decode(manager):
    engine = manager.engine
    engine.tiny_vae = AutoencoderTiny()  # TAESD's architecture; random weights are fine for the mechanism
    app = LiveApp(manager, manager.loop)
    session = SimpleNamespace(session_hash="settle-test")
    try:
        preview, _ = run_async(app.txt2img("still input", "", 4, 1.0, 0, 64, 64, request=session))
        assert read_params(preview)["decoder"] == "tiny"
        sharp = run_async(app.settle("txt2img", session))
        params = read_params(sharp)
        assert params["decoder"] == "full" and params["prompt"] == "still input"
        assert run_async(app.settle("txt2img", session)) == gr.skip()  # nothing left to upgrade: skipped
    finally:
        engine.tiny_vae = None
