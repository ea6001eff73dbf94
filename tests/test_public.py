"""Safe in public: no visitor can switch, poison, stall or deface the app for the others.

Each finding of the outsider's review is a test against the launched app (raw HTTP and gradio_client), in a real
browser where it is about the page. Visitors are told apart by address: the test connects over loopback, which the
server trusts as a proxy (uvicorn's default), so an X-Forwarded-For header sets the visitor's address.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from gradio_client import Client
from hostile_inputs import QueueSession, error_text, output_file

from lcm_live.handlers import largest_side
from lcm_live.models import ModelRefused
from lcm_live.pngmeta import A1111_KEY, KEY
from lcm_live.request import MAX_SIZE, MAX_STEPS, MIN_SIZE
from lcm_live.text import display_name, markdown_text, public_text


pytestmark = pytest.mark.app
ROOT = Path(__file__).resolve().parent.parent
ABSOLUTE_PATH = re.compile(r"(?<![\w:/.])/(?:root|home|tmp|work|srv|etc|proc|usr|var|opt)\b")


# ---------------------------------------------------------------------------------------------------- helpers
def server_paths(app) -> list[str]:
    """Folders whose names must never reach a visitor."""
    return [str(ROOT), str(Path.home()), tempfile.gettempdir(), os.environ.get("GRADIO_TEMP_DIR", "/tmp/gradio"),
            str(app.store.folder), os.getcwd()]  # fmt: skip


def assert_no_server_path(text: str, app) -> None:
    for folder in server_paths(app):
        assert folder not in text, (folder, text[:500])
    assert not ABSOLUTE_PATH.search(text), text[:500]


class Call:
    """One call through `/gradio_api/call/<endpoint>` from `address`, whose result stream can be dropped."""

    def __init__(self, url: str, endpoint: str, data: list, address: str, patience: float = 120.0):
        self.headers = {"X-Forwarded-For": address}
        self.url, self.endpoint = url, endpoint
        posted = httpx.post(url + f"gradio_api/call/{endpoint}", json={"data": data}, headers=self.headers, timeout=30)
        assert posted.status_code == 200, posted.text
        self.event_id = posted.json()["event_id"]
        self._client = httpx.Client(timeout=httpx.Timeout(patience), headers=self.headers)
        self._stream = self._client.stream("GET", url + f"gradio_api/call/{endpoint}/{self.event_id}")
        self._response = self._stream.__enter__()

    def result(self) -> tuple[str, str]:
        """(event, data) of the call's last message: ("complete", ...) or ("error", ...); ("left", "") when
        nothing came for `patience` seconds: then the client leaves."""
        kind = data = ""
        try:
            for line in self._response.iter_lines():
                if line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:"):
                    data = line[5:].strip()
                    if kind in ("complete", "error"):
                        break
        except httpx.ReadTimeout:
            kind = "left"
        self.leave()
        return kind, data

    def leave(self) -> None:
        """Go away: close the result stream before the result came."""
        self._stream.__exit__(None, None, None)
        self._client.close()


@contextlib.contextmanager
def slow_unet(app, step_s: float):
    """Every UNet call of the serving model first sleeps `step_s`; yields the latent sizes (h/8, w/8) it ran."""
    unet = app.loop.engine.txt2img.unet
    original = unet.forward
    seen: list[tuple[int, int]] = []

    def forward(sample, *args, **kwargs):
        seen.append(tuple(sample.shape[-2:]))
        time.sleep(step_s)
        return original(sample, *args, **kwargs)

    unet.forward = forward
    try:
        yield seen
    finally:
        del unet.forward


def latent(app, width: int, height: int) -> tuple[int, int]:
    """The latent size (h, w) of a width x height image on the serving model."""
    scale = app.loop.engine.txt2img.vae_scale_factor
    return height // scale, width // scale


def wait_until(condition, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"{what} not met in {timeout} s")


@pytest.fixture(scope="module")
def custom_server(tmp_path_factory):
    """The app started by an operator who lets visitors load any model (--allow-custom-models)."""
    from conftest import _free_port

    from app import launch
    from lcm_live.settings import Settings

    settings = Settings(preset="demo", offline=True, port=_free_port(), max_file_size="8mb", allow_custom_models=True)
    demo, app = launch(settings, prevent_thread_lock=True)
    yield f"http://127.0.0.1:{settings.port}/", app
    demo.close()
    app.loop.close()


def load(url: str, app, preset=None, base="", lora="") -> str:
    """A visitor's /load_model call, then the status line once the load has ended."""
    client = Client(url, verbose=False)
    client.predict(preset, base, lora, api_name="/load_model")
    app.manager.wait(120)
    return app.manager.status_markdown()


# ---------------------------------------------------------------------------------------------------- switching
def test_by_default_visitors_cannot_switch_the_model(client, live_server):
    url, app = live_server
    before = app.loop.info["model"]
    assert "/load_model" not in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    config = httpx.get(url + "config", timeout=10).json()
    assert not [c for c in config["components"] if c["props"].get("elem_id") in ("model-preset", "model-load")]
    assert not [c for c in config["components"] if c["props"].get("label") == "Model"]
    for body in ({"data": [None, str(ROOT / "assets/demo-model/base"), ""]}, {"data": ["sdxl"]}):
        posted = httpx.post(url + "gradio_api/call/load_model", json=body, timeout=10)
        assert posted.status_code != 200, posted.text
    assert app.loop.info["model"] == before and app.manager.status.loading is None


def test_presets_only_unless_custom_models_are_allowed():
    from app import build
    from lcm_live.settings import Settings

    for flags, names in (({"allow_model_switch": True}, ["preset"]),
                         ({"allow_custom_models": True}, ["preset", "base", "lora"])):  # fmt: skip
        demo, app = build(Settings(preset="demo", offline=True, **flags))
        try:
            endpoint = demo.get_api_info()["named_endpoints"]["/load_model"]
            assert [p["parameter_name"] for p in endpoint["parameters"]] == names
            assert [r["label"] for r in endpoint["returns"]] == ["status"]
            if "base" not in names:
                with pytest.raises(ModelRefused, match="presets only"):
                    app.manager.switch_for_visitor(None, str(ROOT / "assets/demo-model/base"))
            with pytest.raises(ModelRefused, match="Unknown preset"):
                app.manager.switch_for_visitor("<b>nope</b>")
        finally:
            app.loop.close()


def test_an_uploaded_lora_is_never_loaded(custom_server, tmp_path):
    url, app = custom_server
    lora = ROOT / "assets/demo-model/lcm-lora/pytorch_lora_weights.safetensors"
    uploaded = httpx.post(url + "gradio_api/upload", files={"files": ("lcm.safetensors", lora.read_bytes())}).json()[0]
    assert Path(uploaded).is_file()
    base = str(ROOT / "assets/demo-model/base")
    before = app.loop.engine
    for reference in (uploaded, str(Path(uploaded).parent), str(Path(uploaded).parent / ".." / Path(uploaded).parent.name)):
        text = load(url, app, base=base, lora=reference)
        assert app.loop.engine is before, reference  # nothing was loaded: every session still gets the same model
        assert "Could not load" in text and "keeps serving" in text
        assert_no_server_path(text, app)
    # The same weights from the operator's own folder do load: it was the upload that was refused.
    text = load(url, app, base=base, lora=str(lora.parent))
    assert app.loop.engine is not before and "Could not load" not in text
    assert markdown_text("demo-model/base + demo-model/lcm-lora") in text  # named without the server's path
    assert_no_server_path(text, app)


def test_a_failed_switch_says_the_same_for_existing_and_missing_paths(custom_server, tmp_path, caplog):
    url, app = custom_server
    (tmp_path / "a" / "x").mkdir(parents=True)
    (tmp_path / "a" / "x" / "weights").write_text("not a model")  # an existing file
    (tmp_path / "b" / "x" / "weights").mkdir(parents=True)  # an existing folder
    cases = [tmp_path / "a" / "x" / "weights", tmp_path / "b" / "x" / "weights", tmp_path / "c" / "x" / "weights"]
    with caplog.at_level(logging.WARNING, logger="lcm_live"):
        texts = {str(case): load(url, app, base=str(case)) for case in cases}
    assert len(set(texts.values())) == 1, texts  # one message, whatever exists
    text = next(iter(texts.values()))
    assert markdown_text("Could not load x/weights; the current model keeps serving.") in text
    assert_no_server_path(text, app)
    logged = caplog.text
    assert all(str(case) in logged for case in cases)  # the operator's log has the details


def test_the_operators_failed_model_says_why_without_paths(custom_server, tmp_path):
    from lcm_live.presets import ModelSpec

    _, app = custom_server
    assert app.manager.switch(ModelSpec(str(tmp_path / "gone" / "base"), None))
    app.manager.wait(60)
    text = app.manager.status_markdown().replace("\\", "")
    assert "Could not load gone/base. Could not load base model" in text and "no such file or folder" in text
    assert_no_server_path(text, app)


# ---------------------------------------------------------------------------------------------------- text, paths
# Markup a phisher would send: a form with a password input, a link, an image from elsewhere, Markdown links.
# No slash in the model name (a path's last parts are shown); at most 40 characters in the prompt's quoted tail.
MODEL_PAYLOAD = ("<form action=https:evil.example><input type=password name=pw><img src=https:evil.example>"
                 "<a href=https:evil.example>click [x](https:evil.example) ![y](https:evil.example) **b**")  # fmt: skip
PROMPT_TAIL = "<input type=password><img src=evil.ex>"
PAGE_ELEMENTS = """() => ({
    forms: document.querySelectorAll('form').length,
    passwords: document.querySelectorAll('input[type=password]').length,
    evil: document.querySelectorAll('[src*=evil], [href*=evil], [action*=evil]').length,
    echoed: [...document.querySelectorAll('#model-status, .hud, [data-testid=toast-body]')]
        .map(e => e.querySelectorAll('form, input, img, a, iframe').length).reduce((a, b) => a + b, 0),
})"""


def test_markup_in_every_echoed_field_is_shown_as_text(browser, custom_server, artifacts):
    """The prompt (its tail quoted in the HUD and a toast when cut) and the model fields (in the status line)."""
    url, app = custom_server
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    dialogs = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.goto(url)
    page.wait_for_selector("#t2i-image img", timeout=60_000)
    baseline = page.evaluate(PAGE_ELEMENTS)
    assert baseline == {"forms": 0, "passwords": 0, "evil": 0, "echoed": 0}, baseline

    prompt = "p" * (1000 - len(PROMPT_TAIL)) + PROMPT_TAIL + " and the rest is cut"
    page.locator("#t2i-prompt textarea").fill(prompt)
    page.wait_for_function("document.querySelector('#t2i-hud').innerText.includes('cut to its first')",
                           timeout=60_000)  # fmt: skip
    assert PROMPT_TAIL in page.locator("#t2i-hud").inner_text()  # the characters typed, as text
    page.locator("[data-testid=toast-body]").first.wait_for(timeout=10_000)
    page.get_by_role("tab", name="Model").click()
    page.locator("#model-base textarea, #model-base input").first.fill(MODEL_PAYLOAD)
    page.locator("#model-load").click()
    page.wait_for_function("document.querySelector('#model-status').innerText.includes('click [x]')",
                           timeout=60_000)  # the visitor's load failed (the line may say so of an earlier one)  # fmt: skip
    status = page.locator("#model-status").inner_text()
    assert MODEL_PAYLOAD in status, status
    assert page.evaluate(PAGE_ELEMENTS) == baseline
    assert_no_server_path(page.locator("body").inner_text(), app)
    page.screenshot(path=str(artifacts / "markup-as-text.png"), full_page=True)
    time.sleep(0.5)
    assert dialogs == []
    context.close()


def test_text_helpers():
    assert markdown_text("<b>**x**</b>") == "&lt;b&gt;\\*\\*x\\*\\*&lt;/b&gt;"
    assert markdown_text("https://e.example a@e.example") == "https\\://e\\.example a\\@e\\.example"  # no autolinks
    assert public_text("Cannot move /srv/app/x.png to the cache") == "Cannot move <path> to the cache"
    assert public_text("found in directory /srv/a/b.. To fix") == "found in directory <path>.. To fix"
    assert public_text("see https://huggingface.co/a/b, 1/2 and and/or") == "see https://huggingface.co/a/b, 1/2 and and/or"
    assert display_name("owner/model") == "owner/model"
    assert display_name("/root/.ssh/id_rsa") == ".ssh/id_rsa" and display_name("/nonexistent/.ssh/id_rsa") == ".ssh/id_rsa"


def test_bad_file_payloads_name_no_server_path(live_server):
    url, app = live_server
    for path in ("x.png", "/etc/passwd", "../../x.png", str(ROOT / "app.py")):
        payload = {"path": path, "meta": {"_type": "gradio.FileData"}}
        kind, data = Call(url, "img2img", [payload, "p", 0.5, 2, 0], "198.51.100.1").result()
        assert kind == "error", data
        assert "Cannot move" not in data and "root:" not in data
        assert_no_server_path(data, app)


def test_status_hud_and_images_name_no_server_path(live_server):
    url, app = live_server
    assert_no_server_path(app.manager.status_markdown(), app)
    session = QueueSession(url, address="198.51.100.2")
    try:
        message = session.call("live_txt2img", ["paths", "", 2, 1.0, 0, 64, 64])
    finally:
        session.close()
    image, hud = message["output"]["data"]
    assert_no_server_path(hud, app)
    png = httpx.get(image["url"], timeout=10)
    from PIL import Image

    chunks = Image.open(__import__("io").BytesIO(png.content)).text
    assert set(chunks) == {KEY, A1111_KEY}
    for text in chunks.values():
        assert_no_server_path(text, app)
    assert not json.loads(chunks[KEY])["model"].startswith("/")


# ---------------------------------------------------------------------------------------------------- costs
def test_the_costliest_request_is_refused_on_every_endpoint(client, live_server):
    url, _ = live_server
    big = ["big", "", 8, 1.0, 0, 1024, 768]
    for endpoint, data in (("txt2img", big), ("live_txt2img", big), ("step_sweep", ["big", "", 1.0, 0, 1024, 768])):
        kind, text = Call(url, endpoint, data, "198.51.100.3").result()
        assert kind == "error", (endpoint, text)
        assert "more than this server runs" in text or "greater than maximum value" in text, (endpoint, text)
    session = QueueSession(url, address="198.51.100.3")
    try:
        assert not session.call("live_txt2img", big)["success"]
    finally:
        session.close()
    assert client.predict("fits", "", 2, 1.0, 0, 64, 64, api_name="/txt2img")  # a request within the cap runs


def test_page_sliders_stop_where_the_cost_cap_does(live_server):
    url, app = live_server
    components = {c["props"].get("elem_id"): c["props"] for c in httpx.get(url + "config", timeout=10).json()["components"]}
    cap = app.loop.limits.cost_cap(app.loop.info["native_size"])
    widest = largest_side(cap)
    assert widest * widest <= cap and (widest + 8) ** 2 > cap
    for name in ("t2i-width", "t2i-height"):
        assert components[name]["minimum"] == MIN_SIZE and components[name]["maximum"] == widest <= MAX_SIZE
    for name in ("t2i-steps", "i2i-steps", "cam-steps"):
        assert components[name]["maximum"] == MAX_STEPS
    assert largest_side(512 * 512 * 8) == 1448 and largest_side(10**12) == MAX_SIZE and largest_side(1) == MIN_SIZE


def test_page_sliders_follow_the_serving_model():
    """Each page load sets the size sliders for the serving model; the status tick resets them once another serves."""
    from types import SimpleNamespace

    import gradio as gr
    from fakes import FakeEngine

    from lcm_live.handlers import LiveApp
    from lcm_live.live import LiveLoop
    from lcm_live.models import SwitchPolicy

    loop = LiveLoop(FakeEngine())
    app = LiveApp(SimpleNamespace(status_markdown=lambda: "status", policy=SwitchPolicy()), loop)
    try:
        width, height, key = app.page_bounds()
        assert width == height == gr.update(value=64, maximum=largest_side(64 * 64 * MAX_STEPS))
        assert app.status(key) == ("status", gr.skip(), gr.skip(), gr.skip())  # nothing changed: sliders left alone
        bigger = FakeEngine()
        bigger.native_size, bigger.info = 512, {**FakeEngine.info, "model": "bigger", "native_size": 512}
        loop.swap_engine(bigger).result(timeout=5)  # the worker warms it up, then serves with it
        status, width, height, new_key = app.status(key)
        assert width == height == gr.update(value=512, maximum=1448) and new_key != key
    finally:
        loop.close()


@pytest.mark.parametrize("endpoint", ["txt2img", "live_txt2img", "step_sweep"])
def test_one_address_cannot_take_more_than_its_share(live_server, endpoint):
    """A burst from one address: past its share it is refused at once, every endpoint alike; others are served.

    The burst's clients wait 3 s for an answer, then leave (their calls stop), so that the test stays short."""
    url, app = live_server
    share, address = app.gate.per_address, "203.0.113.9"
    data = ["burst", "", 1.0, 0, 64, 64] if endpoint == "step_sweep" else ["burst", "", 8, 1.0, 0, 64, 64]
    with slow_unet(app, 0.05), ThreadPoolExecutor(2 * share) as pool:
        calls = list(pool.map(lambda _: Call(url, endpoint, data, address, patience=3.0), range(2 * share)))
        results = pool.map(Call.result, calls)
        other = QueueSession(url, address="203.0.113.10")
        try:
            mine = other.call("live_txt2img", ["another visitor", "", 2, 1.0, 0, 64, 64], timeout=120)
        finally:
            other.close()
        results = list(results)
    refused = [text for kind, text in results if kind == "error"]
    assert output_file(mine) is not None, error_text(mine)
    assert len(refused) >= share // 2, results
    assert all("Too many requests at once from your address" in text for text in refused), refused[:3]
    wait_until(lambda: app.gate.held(address) == 0, what="the admitted calls were done or dropped")


def test_another_visitor_is_not_queued_behind_a_burst(live_server):
    """A page visitor's request runs between one address's API calls, not after all of them."""
    url, app = live_server
    burst_done: list[float] = []

    def finish(call):
        result = call.result()
        burst_done.append(time.perf_counter())
        return result

    with slow_unet(app, 0.05) as seen, ThreadPoolExecutor(8) as pool:
        calls = [Call(url, "txt2img", ["burst", "", 8, 1.0, i, 64, 64], "203.0.113.11") for i in range(8)]
        results = [pool.submit(finish, call) for call in calls]
        wait_until(lambda: len(seen) >= 2, what="the burst started")
        other = QueueSession(url, address="203.0.113.12")
        try:
            mine = other.call("live_txt2img", ["between", "", 2, 1.0, 0, 96, 64], timeout=120)
            done = time.perf_counter()
        finally:
            other.close()
        results = [future.result() for future in results]
    assert output_file(mine) is not None, error_text(mine)
    assert all(kind == "complete" for kind, _ in results), results
    before = sum(t < done for t in burst_done)
    assert before <= app.gate.address_places + 1, before  # behind that address's calls in the loop, not all 8


# ---------------------------------------------------------------------------------------------------- clients that leave
def test_a_request_whose_client_left_is_stopped(live_server):
    url, app = live_server
    with slow_unet(app, 0.5) as seen:
        call = Call(url, "txt2img", ["left", "", 6, 1.0, 0, 80, 64], "192.0.2.1")
        wait_until(lambda: seen.count(latent(app, 80, 64)) >= 2, what="the request started")
        call.leave()
        time.sleep(3.5)
        ran = seen.count(latent(app, 80, 64))
    assert ran < 6, ran  # stopped at a step boundary, not run to its end


def test_a_request_whose_client_left_before_its_turn_never_runs(live_server):
    url, app = live_server
    with slow_unet(app, 0.3) as seen:  # the blockers' 8 steps take 2.4 s or more: time to see the leaver go
        addresses = [f"192.0.2.{10 + i}" for i in range(app.gate.places)]
        blockers = [Call(url, "txt2img", ["block", "", 8, 1.0, i, 64, 64], a) for i, a in enumerate(addresses)]
        wait_until(lambda: all(app.gate.held(a) for a in addresses) and seen, what="the blockers took every place")
        leaver = Call(url, "txt2img", ["leaver", "", 4, 1.0, 0, 96, 64], "192.0.2.20")
        wait_until(lambda: app.gate.held("192.0.2.20") == 1, what="the leaver waits for a place")
        leaver.leave()
        wait_until(lambda: app.gate.held("192.0.2.20") == 0, what="the leaver's call was dropped")
        results = [blocker.result() for blocker in blockers]
        time.sleep(1.0)
    assert all(kind == "complete" for kind, _ in results), results
    assert latent(app, 96, 64) not in seen  # the leaver's size never ran
    assert app.gate.held("192.0.2.20") == 0


def test_one_shot_places_are_shared_by_addresses():
    """4 places, at most 2 of one address's; an address's waiting calls count in its share (here 3)."""
    import asyncio

    from lcm_live.request import RequestRefused
    from lcm_live.visitors import OneShotGate, Visitor

    gate = OneShotGate(places=4, per_address=3, address_places=2)
    running, most, refused = [], {"a": 0, "b": 0, "c": 0, "all": 0}, []

    async def call(address):
        try:
            async with gate.enter(Visitor("s", address)):
                running.append(address)
                most[address] = max(most[address], running.count(address))
                most["all"] = max(most["all"], len(running))
                await asyncio.sleep(0.01)
                running.remove(address)
        except RequestRefused as refusal:
            refused.append((address, str(refusal)))

    async def burst():
        await asyncio.gather(*(call(address) for address in "aaaaabbbcc"))

    with ThreadPoolExecutor(1) as pool:  # a loop of its own: the browser tests keep one running on this thread
        pool.submit(asyncio.run, burst()).result()
    assert most == {"a": 2, "b": 2, "c": 2, "all": 4}
    assert [address for address, _ in refused] == ["a", "a"]  # a's 4th and 5th: past its share of 3
    assert "at most 3" in refused[0][1] and gate.held("a") == 0


def test_one_shot_calls_leave_no_bookkeeping(client, live_server):
    _, app = live_server
    client.predict("warm", "", 1, 1.0, 0, 64, 64, api_name="/txt2img")
    before = app.loop.slot_names()
    for seed in range(3):
        client.predict("one call", "", 1, 1.0, seed, 64, 64, api_name="/txt2img")
    left = app.loop.slot_names() - before  # each call had a slot of its own; other visitors' may have gone
    assert not left, left


# ---------------------------------------------------------------------------------------------------- the API
EXPECTED_API = {
    "/txt2img": [("prompt", "string"), ("negative_prompt", "string"), ("steps", "integer"),
                 ("guidance_scale", "number"), ("seed", "integer"), ("width", "integer"), ("height", "integer")],
    "/img2img": [("image", None), ("prompt", "string"), ("strength", "number"), ("steps", "integer"),
                 ("seed", "integer")],
    "/webcam_frame": [("image", None), ("prompt", "string"), ("strength", "number"), ("steps", "integer"),
                      ("seed", "integer")],
    "/step_sweep": [("prompt", "string"), ("negative_prompt", "string"), ("guidance_scale", "number"),
                    ("seed", "integer"), ("width", "integer"), ("height", "integer")],
}  # fmt: skip


def test_api_parameters_are_named_and_typed(client):
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert set(endpoints) == set(EXPECTED_API)
    for name, expected in EXPECTED_API.items():
        parameters = endpoints[name]["parameters"]
        assert [p["parameter_name"] for p in parameters] == [n for n, _ in expected], name
        for parameter, (_, kind) in zip(parameters, expected):
            if kind is not None:
                assert parameter["type"]["type"] == kind, (name, parameter)
        assert [r["label"] for r in endpoints[name]["returns"]] == ["grid" if name == "/step_sweep" else "image"]


def test_the_readme_client_example_runs(live_server, tmp_path, capsys):
    url, _ = live_server
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"## API.*?```python\n(.*?)```", readme, re.S).group(1)
    assert "api_name=" in code and "prompt=" in code
    monkey_dir = os.getcwd()
    try:
        os.chdir(tmp_path)
        exec(compile(code.replace("http://127.0.0.1:7860/", url), "README.md", "exec"), {})
    finally:
        os.chdir(monkey_dir)
    printed = capsys.readouterr().out
    assert "'prompt': 'a yellow triangle on a purple background'" in printed, printed


# ---------------------------------------------------------------------------------------------------- settings
def test_public_settings_and_proxies():
    from app import trusted_proxies
    from lcm_live.settings import Settings

    assert Settings() == Settings(allow_model_switch=False, allow_custom_models=False, session_jobs=6, address_jobs=12)
    flags = Settings.from_args(["--allow-custom-models", "--address-jobs", "40", "--trusted-proxies", "10.1.0.0/16"],
                               environ={})  # fmt: skip
    assert flags.allow_custom_models and flags.address_jobs == 40 and flags.trusted_proxies == "10.1.0.0/16"
    assert Settings.from_env({"LCM_LIVE_ALLOW_MODEL_SWITCH": "1"}).allow_model_switch
    assert trusted_proxies(Settings(), environ={}) is None  # uvicorn's default: loopback only
    assert "10.0.0.0/8" in trusted_proxies(Settings(), environ={"SPACE_ID": "me/app"})
    assert trusted_proxies(Settings(), environ={"SPACE_ID": "me/app", "FORWARDED_ALLOW_IPS": "1.2.3.4"}) is None
    assert trusted_proxies(Settings(trusted_proxies="10.9.0.1"), environ={"SPACE_ID": "me/app"}) == "10.9.0.1"

