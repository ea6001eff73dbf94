"""Ray Serve mode: the page on two local replicas of the embedded model (1 CPU, 1 thread each).

Ray starts once for the module and the app once on it; the tests talk to the page over HTTP as browsers do.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from lcm_live.pngmeta import read_params
from lcm_live.request import Request
from lcm_live.settings import Settings, replica_range
from tests.hostile_inputs import QueueSession, error_text, output_file


pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------- settings (no Ray needed)
def test_replica_flags_and_environment():
    assert replica_range("2") == (2, 2) and replica_range("1:4") == (1, 4)
    for bad in ("0", "3:1", "two", "1:x", ""):
        with pytest.raises(ValueError, match="N or MIN:MAX"):
            replica_range(bad)
    settings = Settings.from_args(["--replicas", "1:3", "--replica-cpus", "2", "--replica-gpus", "1"], environ={})
    assert (settings.replicas, settings.replica_cpus, settings.replica_gpus, settings.ray_mode) == ("1:3", 2.0, 1.0, True)
    from_env = Settings.from_args([], environ={"LCM_LIVE_REPLICAS": "2", "RAY_ADDRESS": "auto"})
    assert from_env.replicas == "2" and from_env.ray_address == "auto"
    assert Settings.from_args(["--ray-address", "10.0.0.1:6379"], environ={"RAY_ADDRESS": "auto"}).ray_address == (
        "10.0.0.1:6379"
    )
    assert not Settings.from_args([], environ={}).ray_mode


@pytest.mark.parametrize("path", ["deploy/serve.yaml", "deploy/rayservice.yaml"])
def test_deploy_configs_are_valid_serve_configs_that_build(path):
    pytest.importorskip("ray")
    import yaml
    from ray.serve.deployment import Application
    from ray.serve.schema import ServeDeploySchema

    from lcm_live.replicas import app_builder

    document = next(yaml.safe_load_all((ROOT / path).read_text()))
    config = document if "applications" in document else yaml.safe_load(document["spec"]["serveConfigV2"])
    app = ServeDeploySchema.model_validate(config).applications[0]
    assert (app.name, app.import_path, app.route_prefix) == ("lcm-live", "lcm_live.replicas:app_builder", None)
    assert isinstance(app_builder(app.args), Application)


# ---------------------------------------------------------------------- the page's side, on a fake handle
class FakeHandle:
    """Stands in for a Serve handle: `handle.options(session_id=s).run.remote(...)` awaits `script[call]`."""

    def __init__(self, script):
        self.script, self.calls = script, []

    def options(self, session_id):
        handle = self

        class Method:
            def __init__(self, name):
                self.name = name

            def remote(self, *args, **kwargs):
                handle.calls.append((session_id, self.name, args))
                return handle.script(len(handle.calls), self.name, args)

        return SimpleNamespace(run=Method("run"), settle=Method("settle"), forget=Method("forget"))


def _outcome(prompt: str, replica: str = "a"):
    from PIL import Image

    from lcm_live.live import Outcome
    from lcm_live.request import Result, Timings

    return Outcome(Result(Image.new("RGB", (8, 8)), {"prompt": prompt, "replica": replica}, Timings()), 1.0, 1.0, 1)


def test_the_newest_input_is_resent_when_its_replica_dies():
    ray = pytest.importorskip("ray")
    from lcm_live.replicas import RemoteLoop

    async def script(call, method, args):
        if call == 1:
            raise ray.exceptions.ActorDiedError()  # the replica died under the first try
        return _outcome(args[1].prompt, "b")

    handle = FakeHandle(script)
    loop = RemoteLoop(handle, info={})
    outcome = asyncio.run(loop.run("s1:txt2img", Request(prompt="final")))
    assert outcome.result.params == {"prompt": "final", "replica": "b"} and loop.stats.resent == 1
    assert [c[:2] for c in handle.calls] == [("s1", "run"), ("s1", "run")]  # both tries for session s1


def test_an_older_input_is_not_resent_and_never_replaces_a_newer_image():
    ray = pytest.importorskip("ray")
    from lcm_live.live import SUPERSEDED
    from lcm_live.replicas import RemoteLoop

    async def script(call, method, args):
        if args[1].prompt == "old, lost":
            await asyncio.sleep(0.05)
            raise ray.exceptions.ActorDiedError()
        if args[1].prompt == "old, late":
            await asyncio.sleep(0.1)
        return _outcome(args[1].prompt)

    async def main():
        loop = RemoteLoop(FakeHandle(script), info={})
        lost = asyncio.create_task(loop.run("s1:txt2img", Request(prompt="old, lost")))
        await asyncio.sleep(0.01)
        newer = await loop.run("s1:txt2img", Request(prompt="newer"))
        late = asyncio.create_task(loop.run("s2:txt2img", Request(prompt="old, late")))
        await asyncio.sleep(0.01)
        newest = await loop.run("s2:txt2img", Request(prompt="newest"))
        return await lost, newer, await late, newest, loop.stats.resent

    lost, newer, late, newest, resent = asyncio.run(main())
    assert lost == SUPERSEDED and resent == 0  # a newer input was already on its way
    assert newer.result.params["prompt"] == "newer" and newest.result.params["prompt"] == "newest"
    assert late == SUPERSEDED  # it finished after a newer one was shown


def test_a_replica_error_arrives_as_its_own_exception_without_ray_traceback():
    ray = pytest.importorskip("ray")
    from lcm_live.replicas import RemoteLoop

    async def script(call, method, args):
        cause = ValueError("steps must be a whole number from 1 to 8; got 9.")
        raise ray.exceptions.RayTaskError("run", "Traceback ... /srv/secret/path.py", cause).as_instanceof_cause()

    with pytest.raises(ValueError) as caught:
        asyncio.run(RemoteLoop(FakeHandle(script), info={}).run("s1:txt2img", Request(prompt="x", steps=9)))
    assert str(caught.value) == "steps must be a whole number from 1 to 8; got 9."


def test_results_leave_a_replica_without_tensors_and_name_it():
    pytest.importorskip("ray")
    import torch

    from lcm_live.replicas import LiveReplica

    outcome = _outcome("x")
    outcome.result.latents = torch.zeros(1, 4, 8, 8)
    portable = LiveReplica._portable(SimpleNamespace(id="r1"), outcome)
    assert portable.result.latents is None and portable.result.params["replica"] == "r1"
    assert outcome.result.latents is not None  # the replica keeps its own copy for the settle decode
    many = LiveReplica._portable(SimpleNamespace(id="r1"), replace(outcome, result=[outcome.result] * 2))
    assert [r.latents for r in many.result] == [None, None]


def test_the_replica_status_line_shows_names_and_errors_as_text():
    pytest.importorskip("ray")
    from lcm_live.replicas import Deployment, RemoteManager

    manager = RemoteManager.__new__(RemoteManager)  # no Ray: only the status line is read
    markup = '<img src="https://example.com/x.png"> [link](https://example.com) /srv/models/private'
    info = dict(model=markup, runtime="cpu float32", decoder="full VAE", embedded=False)
    manager.loop, manager.deployment = SimpleNamespace(info=info), Deployment(settings=None)
    manager.states = {"RUNNING": 2}
    manager.replicas = [dict(replica="r1", loading=markup, message=markup, fraction=0.5),
                        dict(replica="r2", error=f"Could not load {markup}")]  # fmt: skip
    status = manager.status_markdown()
    assert "<img" not in status and "](" not in status and "/srv/models" not in status, status
    assert "&lt;img" in status and status.count("&lt;img") == 4


def test_sessions_of_slots():
    pytest.importorskip("ray")
    from lcm_live.replicas import session_of

    assert session_of("abc123:txt2img") == session_of("abc123:webcam") == session_of("abc123:") == "abc123"


# ---------------------------------------------------------------------- start-up failures (subprocesses)
def _run_app(args: list[str], block_ray: bool = False) -> subprocess.CompletedProcess:
    """app.py in a fresh interpreter; with block_ray, as if Ray were not installed."""
    prelude = "import sys; sys.modules['ray'] = None; " if block_ray else "import sys; "
    code = prelude + f"sys.argv = ['app.py', *{args!r}]; import runpy; runpy.run_path('app.py', run_name='__main__')"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_without_ray_installed_start_up_says_so_and_exits():
    port = _free_port()
    done = _run_app(["--preset", "demo", "--replicas", "2", "--port", str(port)], block_ray=True)
    assert done.returncode != 0
    assert "need Ray Serve" in done.stderr and "pip install -r requirements-ray.txt" in done.stderr
    assert not _listening(port)  # no page came up


def test_an_unreachable_cluster_is_named_and_nothing_starts():
    pytest.importorskip("ray")
    port, closed = _free_port(), _free_port()
    done = _run_app(["--preset", "demo", "--ray-address", f"127.0.0.1:{closed}", "--port", str(port)])
    assert done.returncode != 0
    assert "unreachable" in done.stderr and f"127.0.0.1:{closed}" in done.stderr
    assert not _listening(port)


# ---------------------------------------------------------------------- on a local Ray instance
@pytest.fixture(scope="module")
def ray_instance():
    """Ray on this machine for the module: 2 CPUs, no dashboard; taken down at the end."""
    ray = pytest.importorskip("ray")
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    serve.shutdown()
    ray.shutdown()


def test_replicas_benchmark_runs_one_and_two_replicas(ray_instance, tmp_path):
    """The benchmark's fast mode (speed is not asserted): each stream's frames come from one replica."""
    from lcm_live.bench.__main__ import main

    data = main(["replicas", "--smoke", "--threads", "1", "--out", str(tmp_path)])
    assert (tmp_path / "replicas.md").read_text().startswith("### replicas: 8 streams")
    assert [r["mode"] for r in data["summary"]] == ["one process (no Ray)", "Ray Serve, 1 replica",
                                                    "Ray Serve, 2 replicas"]  # fmt: skip
    for row in data["rows"]:
        assert len(row["per_stream_fps"]) == 8 and row["superseded"] == 0
        assert max(row["replicas_per_stream"]) <= 1  # a stream is a session: it stays on its replica
    assert data["summary"][1]["x_one_replica"] == 1.0


# ---------------------------------------------------------------------- the page on two replicas
@pytest.fixture(scope="module")
def ray_page(ray_instance, tmp_path_factory):
    """The app on 2 replicas; yields (url, app)."""
    from app import close, launch

    previous = os.environ.get("GRADIO_TEMP_DIR")  # the session's other apps keep theirs (it is read per upload)
    os.environ["GRADIO_TEMP_DIR"] = str(tmp_path_factory.mktemp("gradio-cache-ray"))
    settings = Settings(preset="demo", offline=True, port=_free_port(), replicas="2", queue_size=256,
                        max_cost=256 * 256 * 8)  # the fault test's slow last images  # fmt: skip
    demo, app = launch(settings, prevent_thread_lock=True)
    try:
        _wait_for_replicas(app, 2)
        yield f"http://127.0.0.1:{settings.port}/", app
    finally:
        demo.close()
        close(app)
        if previous is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = previous


def _wait_for_replicas(app, count: int, timeout: float = 240.0, without: str | None = None) -> list[dict]:
    """The router's view once `count` replicas serve (none of them `without`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        app.manager.refresh()
        replicas = [r for r in app.manager.replicas if r.get("info") and r["replica"] != without]
        if len(replicas) == count and app.manager.serving == count:
            return replicas
        time.sleep(0.5)
    raise AssertionError(f"{count} replicas did not come up: {app.manager.replicas} {app.manager.states}")


def _type(url: str, name: str, prompt: str, seed: int, key_s: float, last: dict | None = None, sent=None) -> dict:
    """Session `name` types `prompt` key by key into the live endpoint, then maybe `last` (steps, side); what it saw."""
    session = QueueSession(url, session_hash=name)
    events, refusals = [], []
    inputs = [[prompt[:length], "", 2, 1.0, seed, 64, 64] for length in range(1, len(prompt) + 1)]
    if last is not None:
        inputs.append([prompt, "", last["steps"], 1.0, seed, last["side"], last["side"]])
    try:
        for data in inputs:
            status, event = session.join("live_txt2img", data)
            if status == 200:
                events.append(event)
            else:
                refusals.append(status)  # e.g. 500: the page failed to take a key
            time.sleep(key_s)
        if sent is not None:
            sent.wait()
        completed = [session.wait(event, timeout=300) for event in events]
    finally:
        session.close()
    images = [output_file(message) for message in completed]
    params = [_params(url, image) for image in images if image is not None]
    final = output_file(completed[-1])
    return dict(
        final=_params(url, final) if final else None,
        replicas=[p["replica"] for p in params],
        prompts=[p["prompt"] for p in params],
        errors=[error_text(m) for m in completed if not m.get("success")],
        refusals=refusals,
    )


def _params(url: str, image: dict) -> dict:
    return read_params(httpx.get(image["url"], timeout=60).content)


def _sessions(url: str, names: list[str], prompts: list[str], key_s: float, during=None, last=None, sent=None):
    results: list[dict | None] = [None] * len(prompts)

    def user(index: int):
        results[index] = _type(url, names[index], prompts[index], index, key_s, last, sent)

    threads = [threading.Thread(target=user, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    if during is not None:
        during()
    for thread in threads:
        thread.join(timeout=600)
    return results


def test_ten_sessions_typing_each_end_on_their_own_prompt_each_on_one_replica(ray_page):
    url, app = ray_page
    prompts = [f"s{u} {'a red circle' if u % 2 else 'a blue square'}" for u in range(10)]
    results = _sessions(url, [f"type{u}" for u in range(10)], prompts, key_s=0.04)
    for prompt, seen in zip(prompts, results):
        assert not seen["errors"] and not seen["refusals"], (seen["errors"], seen["refusals"])
        assert seen["final"]["prompt"] == prompt  # the image shown last is for the last key
        assert all(prompt.startswith(p) for p in seen["prompts"])  # no other session's image
        assert len(set(seen["replicas"])) == 1, seen["replicas"]  # every request of a session on one replica
    homes = [seen["replicas"][0] for seen in results]
    assert sorted(homes.count(r) for r in set(homes)) == [5, 5]  # spread evenly over the two
    assert "**Replicas:** 2 serving" in app.manager.status_markdown()


def test_a_killed_replica_loses_no_final_image_and_comes_back(ray_page):
    """Six sessions type, then each asks for a slow last image (256x256, 8 steps); a replica is killed under it."""
    from lcm_live.replicas import _ROUTERS, APP_NAME

    url, app = ray_page
    before = _wait_for_replicas(app, 2)
    victim = before[0]
    prompts = [f"k{u} {'a yellow triangle on purple' if u % 2 else 'a green circle on white'}" for u in range(6)]
    names = [f"kill{u}" for u in range(len(prompts))]
    resent, homed, sent = app.loop.stats.resent, [], threading.Barrier(len(prompts) + 1)
    router = _ROUTERS[APP_NAME]

    def kill_mid_stream():
        sent.wait()  # every session has sent its last input: the slow ones are running or waiting on the replicas
        time.sleep(1.0)  # time for the replicas to accept them (each takes seconds to run)
        homed.extend(name for name in names if router.replica_of(name) == victim["replica"])
        os.kill(victim["pid"], signal.SIGKILL)

    results = _sessions(url, names, prompts, 0.04, during=kill_mid_stream, last=dict(steps=8, side=256), sent=sent)
    assert homed, "no session was on the killed replica"
    for prompt, seen in zip(prompts, results):
        assert not seen["errors"] and not seen["refusals"], (seen["errors"], seen["refusals"])
        assert (seen["final"]["prompt"], seen["final"]["width"]) == (prompt, 256)  # every final image arrived ...
        assert seen["final"]["replica"] != victim["replica"]  # ... from a live replica
        assert len(set(seen["replicas"]) - {victim["replica"]}) == 1  # and sessions moved only off the lost one
    # The lost replica's calls were sent again: by RemoteLoop for calls the replica had accepted (counted here), by
    # Serve's router, without an error reaching us, for calls it had not accepted yet (on a busy machine, some).
    assert app.loop.stats.resent - resent >= 1
    back = _wait_for_replicas(app, 2, without=victim["replica"])  # Serve started a replacement
    assert victim["replica"] not in {r["replica"] for r in back}


def test_a_model_switch_reaches_every_replica_in_place(ray_page, tiny_models):
    from lcm_live.presets import ModelSpec

    url, app = ray_page
    before = {r["replica"] for r in _wait_for_replicas(app, 2)}
    paths = tiny_models["sd15"]
    assert app.manager.switch(ModelSpec(paths["base"], paths["lora"], 64, "tiny test model"))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        app.manager.refresh()
        reports = app.manager.replicas
        if len(reports) == 2 and all(r["info"]["model"] == "tiny test model" and not r["loading"] for r in reports):
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"not every replica switched: {app.manager.replicas}")
    assert {r["replica"] for r in reports} == before  # reconfigured in place, not restarted
    assert "tiny test model" in app.manager.status_markdown()
    served = [app.loop.run_sync(f"switch{k}:txt2img", Request(prompt="x", steps=2), timeout=120) for k in range(4)]
    assert {o.result.params["model"] for o in served} == {"/".join(Path(paths["base"]).parts[-2:])}
