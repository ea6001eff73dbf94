"""Hardening: hostile images, uploads, prompts, a full queue, file routes, failures inside the model, many users.

Every test talks to the launched app (embedded model) the way a user or an API client would. The app runs in
this process, so server memory is measured with psutil on ourselves.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import threading
import time
import urllib.parse
from pathlib import Path

import httpx
import psutil
import pytest
import torch
from gradio_client import Client, handle_file
from hostile_inputs import (
    QueueSession,
    broken_images,
    constant_png,
    data_url,
    encode,
    error_text,
    odd_images,
    output_file,
)
from PIL import Image

from lcm_live.inputs import load_image
from lcm_live.pngmeta import read_params
from lcm_live.request import MAX_PROMPT_CHARS


pytestmark = pytest.mark.app
MB = 1 << 20


# ---------------------------------------------------------------------------------------------------- helpers
def rss() -> int:
    return psutil.Process().memory_info().rss


class PeakRss:
    """The process's peak RSS over a block, from VmHWM (reset through clear_refs) or, failing that, sampling."""

    def __enter__(self):
        self.base = rss()
        self.peak = self.base
        self._hwm = False
        with contextlib.suppress(OSError):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak-RSS counter
            self._hwm = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        if self._hwm:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        self.peak = max(self.peak, int(line.split()[1]) * 1024)
        self.growth = self.peak - self.base


def write(tmp_path, name: str, data: bytes) -> str:
    path = tmp_path / name.replace("/", "_")
    path.write_bytes(data)
    return str(path)


def i2i(client, image, prompt="odd", strength=0.5, steps=2, seed=0):
    return client.predict(image, prompt, strength, steps, seed, api_name="/img2img")


def fetch_params(url: str) -> dict:
    return read_params(httpx.get(url, timeout=30).content)


def refused(call) -> str:
    """The message a refused API call carries."""
    with pytest.raises(Exception) as caught:  # noqa: PT011 - gradio_client wraps the server's gr.Error in AppError
        call()
    return str(caught.value)


# ---------------------------------------------------------------------------------------------------- images
@pytest.mark.parametrize("name", list(odd_images()))
def test_odd_images_give_an_rgb_result(client, tmp_path, name):
    data, filename = odd_images()[name]
    path = i2i(client, handle_file(write(tmp_path, filename, data)))
    params = read_params(path)
    assert params["mode"] == "img2img" and Image.open(path).mode == "RGB"
    if name == "exif-rotated":  # a tall picture tagged "rotate 90" is wide once upright
        assert params["width"] > params["height"], params


def test_odd_images_are_converted_faithfully():
    images = {name: load_image(__import__("io").BytesIO(data)) for name, (data, _) in odd_images().items()}
    assert all(image.mode == "RGB" for image in images.values())
    assert images["exif-rotated"].size == (96, 48)
    assert images["rgba"].getpixel((5, 5)) == (255, 127, 127)  # half-transparent red over white
    assert images["palette-transparency"].getpixel((5, 5)) == (255, 255, 255)  # the transparent half is white
    assert images["palette-transparency"].getpixel((90, 5)) == (0, 0, 255)
    deep = images["png-16-bit"]
    assert deep.getpixel((0, 0))[0] < 10 and deep.getpixel((95, 63))[0] > 245  # 16-bit scaled, not clipped white


@pytest.mark.parametrize("name", list(broken_images()))
def test_broken_images_get_a_clear_message(client, tmp_path, name):
    data, filename = broken_images()[name]
    message = refused(lambda: i2i(client, handle_file(write(tmp_path, filename, data))))
    assert "not a readable image" in message or "not an image" in message, message
    assert "preprocess" not in message and "<img" not in message  # no internals, no live markup
    assert read_params(client.predict("still serving", "", 1, 1.0, 0, 64, 64, api_name="/txt2img"))["steps"] == 1


def test_huge_images_are_refused_or_shrunk_within_memory(client, tmp_path):
    huge = write(tmp_path, "huge.png", constant_png(12000, 12000))  # 144 megapixels in ~0.4 MB
    bomb = write(tmp_path, "bomb.png", constant_png(20000, 20000, "L"))  # 400 megapixels
    big = write(tmp_path, "big.png", constant_png(7000, 5000, "RGBA"))  # 35 megapixels: allowed, 140 MB decoded
    with PeakRss() as memory:
        message = refused(lambda: i2i(client, handle_file(huge)))
        assert "too large (144 megapixels); the limit is 40 megapixels" in message, message
        message = refused(lambda: i2i(client, handle_file(bomb)))
        assert "too large (400 megapixels); the limit is 40 megapixels" in message, message
        params = read_params(i2i(client, handle_file(big)))
    assert params["mode"] == "img2img" and params["width"] > params["height"]
    print(f"\npeak server RSS growth on 12000x12000, 20000x20000 and 7000x5000 RGBA: {memory.growth / MB:.0f} MB")
    assert memory.growth < 1024 * MB


def _data_payload(data: bytes, mime: str = "image/png") -> dict:
    return {"url": data_url(data, mime), "meta": {"_type": "gradio.FileData"}}


def test_data_urls_behave_like_uploads(client):
    for name, (data, filename) in odd_images().items():
        mime = "image/jpeg" if filename.endswith(".jpg") else "image/png"
        params = read_params(i2i(client, _data_payload(data, mime)))
        assert params["mode"] == "img2img", name
        if name == "exif-rotated":
            assert params["width"] > params["height"]
    for name, (data, _) in broken_images().items():
        message = refused(lambda data=data: i2i(client, _data_payload(data)))
        assert "not a readable image" in message or "not an image" in message, (name, message)
    with PeakRss() as memory:
        message = refused(lambda: i2i(client, _data_payload(constant_png(12000, 12000))))
    assert "144 megapixels" in message and memory.growth < 1024 * MB


def test_data_url_over_the_upload_limit_is_refused(client):
    noise = Image.effect_noise((1200, 1200), 64).convert("RGB")  # noise does not compress: ~4 MB of PNG
    data = encode(noise)
    assert len(data) > 2 * MB
    message = refused(lambda: i2i(client, _data_payload(data)))
    assert "the limit is 2.1 MB" in message, message


def test_data_url_through_raw_http_call(live_server):
    url = live_server[0]
    for payload, expect in (
        (_data_payload(odd_images()["rgba"][0]), "complete"),
        (_data_payload(b"garbage"), "error"),
        (_data_payload(constant_png(12000, 12000)), "error"),
    ):
        posted = httpx.post(url + "gradio_api/call/img2img", json={"data": [payload, "raw", 0.5, 2, 0]}, timeout=30)
        assert posted.status_code == 200
        events = httpx.get(url + f"gradio_api/call/img2img/{posted.json()['event_id']}", timeout=60)
        assert events.status_code == 200 and f"event: {expect}" in events.text, events.text[:300]
        if expect == "error":
            assert "image" in events.text and "preprocess" not in events.text


# ---------------------------------------------------------------------------------------------------- uploads
def test_upload_over_the_limit_is_413_and_just_under_works(live_server, tmp_path):
    url = live_server[0]
    over = httpx.post(url + "gradio_api/upload", files={"files": ("big.png", b"\0" * (2 * MB + 1), "image/png")})
    assert over.status_code == 413 and str(2 * MB) in over.text, over.text
    noise = Image.effect_noise((800, 800), 64).convert("RGB")
    under = encode(noise)
    assert 1.5 * MB < len(under) < 2 * MB, len(under)
    uploaded = httpx.post(url + "gradio_api/upload", files={"files": ("under.png", under, "image/png")})
    assert uploaded.status_code == 200
    path = uploaded.json()[0]
    file_data = {"path": path, "orig_name": "under.png", "meta": {"_type": "gradio.FileData"}}
    result = QueueSession(url).call("img2img", [file_data, "under the limit", 0.5, 2, 0])
    assert output_file(result) is not None, error_text(result)


# ---------------------------------------------------------------------------------------------------- prompts
def test_long_prompt_is_cut_with_a_visible_warning(live_server):
    session = QueueSession(live_server[0])
    prompt = "a red circle " + "x" * 20_000
    status, event = session.join("txt2img", [prompt, "", 2, 1.0, 0, 64, 64])
    assert status == 200
    result = session.wait(event)
    image = output_file(result)
    assert image is not None, error_text(result)
    assert len(fetch_params(image["url"])["prompt"]) == MAX_PROMPT_CHARS
    assert any(f"cut to its first {MAX_PROMPT_CHARS}" in log for log in session.logs(event)), session.logs(event)
    session.close()


def test_empty_prompt_works(client):
    assert read_params(client.predict("", "", 2, 1.0, 0, 64, 64, api_name="/txt2img"))["prompt"] == ""


@pytest.mark.parametrize(
    "endpoint, args, bound",
    [
        ("/txt2img", ("x", "", 1000, 1.0, 0, 64, 64), "maximum value 8"),
        ("/txt2img", ("x", "", 4, 1.0, 0, 10, 64), "minimum value 64"),
        ("/txt2img", ("x", "", 4, 1.0, -5, 64, 64), "minimum value 0"),
        ("/img2img", (None, "x", 5, 2, 0), "maximum value 1"),
        ("/img2img", (None, "x", 0.5, 0, 0), "minimum value 1"),
    ],
)
def test_out_of_range_numbers_are_refused_with_the_bound(client, tmp_path, endpoint, args, bound):
    if args[0] is None:
        args = (handle_file(write(tmp_path, "in.png", odd_images()["greyscale"][0])), *args[1:])
    assert bound in refused(lambda: client.predict(*args, api_name=endpoint))


def test_html_in_a_prompt_is_text_never_markup(browser, live_server, artifacts):
    tag = "<img src=x onerror=alert(1)>"
    prompt = "b" * (MAX_PROMPT_CHARS - len(tag)) + tag + " and the rest is cut"
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    dialogs = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.goto(live_server[0])
    page.wait_for_selector("#t2i-image img", timeout=60_000)
    page.locator("#t2i-prompt textarea").fill(prompt)
    page.wait_for_function(
        "document.querySelector('#t2i-hud') && document.querySelector('#t2i-hud').innerText.includes('onerror')",
        timeout=60_000,
    )
    hud = page.locator("#t2i-hud").inner_text()
    assert tag in hud, hud  # shown as the characters the user typed
    toasts = page.locator("[data-testid=toast-text]")
    toasts.first.wait_for(timeout=10_000)
    assert any(tag in toasts.nth(i).inner_text() for i in range(toasts.count()))
    assert page.locator("img[src='x']").count() == 0  # never an element
    assert page.locator("#t2i-hud img, [data-testid=toast-text] img").count() == 0
    page.screenshot(path=str(artifacts / "html-prompt.png"), full_page=True)
    time.sleep(0.5)
    assert dialogs == []
    context.close()


# ---------------------------------------------------------------------------------------------------- the queue
@pytest.fixture(scope="module")
def small_share_server():
    """A second instance of the app that gives each address 4 jobs at once (and makes slow requests possible)."""
    from conftest import _free_port

    from app import launch
    from lcm_live.settings import Settings

    settings = Settings(preset="demo", offline=True, port=_free_port(), max_file_size="2mb", address_jobs=4,
                        max_cost=256 * 256 * 8)  # fmt: skip
    demo, app = launch(settings, prevent_thread_lock=True)
    yield f"http://127.0.0.1:{settings.port}/", app
    demo.close()
    app.loop.close()


def test_a_burst_past_an_address_share_is_refused_at_once(small_share_server):
    """12 slow API calls at once from one address: its share runs, the rest are refused at once with a message,
    instead of waiting in Gradio's queue (which a burst from one address filled for everyone)."""
    url, app = small_share_server
    share = app.loop.limits.address_jobs
    sessions = [QueueSession(url, address="192.0.2.50") for _ in range(3 * share)]
    joined, lock = [], threading.Lock()

    def join(index, session):
        start = time.perf_counter()
        status, event = session.join("txt2img", [f"queued {index}", "", 8, 1.0, index, 256, 256])
        result = session.wait(event, timeout=180) if status == 200 else {"success": False, "output": {"error": event}}
        with lock:
            joined.append((status, result, time.perf_counter() - start))

    threads = [threading.Thread(target=join, args=(i, s)) for i, s in enumerate(sessions)]
    for thread in threads:
        thread.start()
    other = QueueSession(url, address="192.0.2.51").call("txt2img", ["another visitor", "", 1, 1.0, 0, 64, 64])
    for thread in threads:
        thread.join()
    assert all(status == 200 for status, _, _ in joined), [r for s, r, _ in joined if s != 200][:2]
    accepted = [result for _, result, _ in joined if result["success"]]
    refusals = [(error_text(result), took) for _, result, took in joined if not result["success"]]
    assert share <= len(accepted) <= share + 2, len(accepted)  # a few may slip in as the first ones finish
    for text, took in refusals:
        assert "Too many requests at once from your address (at most 4)" in text and took < 2.0, (text, took)
    assert all(output_file(result) is not None for result in accepted)
    assert output_file(other) is not None, error_text(other)
    for session in sessions:
        session.close()


# ---------------------------------------------------------------------------------------------------- files
TRAVERSALS = [
    "../../../../etc/passwd",
    "/etc/passwd",
    "..%2F..%2F..%2F..%2Fetc%2Fpasswd",
    "%2Fetc%2Fpasswd",
    "%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "..%252F..%252F..%252Fetc%252Fpasswd",
    "....//....//etc/passwd",
    "/proc/self/environ",
    "app.py",
    str(Path(__file__).resolve().parent.parent / "app.py"),  # the app's own source, by absolute path
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_file_route_refuses_paths_outside_the_cache(live_server, path):
    url = live_server[0]
    for route in ("gradio_api/file=", "file="):
        response = httpx.get(url + route + path, timeout=10)
        assert response.status_code in (403, 404), (route, path, response.status_code)
        assert "root:" not in response.text and "import" not in response.text


def test_file_route_serves_generated_images_only(live_server, client):
    url, app = live_server
    session = QueueSession(url)
    image = output_file(session.call("txt2img", ["served", "", 1, 1.0, 0, 64, 64]))
    served = httpx.get(image["url"], timeout=10)
    assert served.status_code == 200 and served.content.startswith(b"\x89PNG")
    store = next(app.store.folder.glob("*.png"))  # our own folder is not public: only Gradio's cache copy is
    assert httpx.get(url + "gradio_api/file=" + urllib.parse.quote(str(store)), timeout=10).status_code in (403, 404)
    sneaky = {"path": "/etc/passwd", "orig_name": "x.png", "meta": {"_type": "gradio.FileData"}}
    result = session.call("img2img", [sneaky, "x", 0.5, 2, 0])
    assert not result["success"] and "root:" not in json.dumps(result)
    session.close()


# ---------------------------------------------------------------------------------------------------- failures
@contextlib.contextmanager
def unet_fails_once(app, make_output):
    """The engine's UNet: its next call goes through `make_output(original_forward, args, kwargs)`, once."""
    unet = app.loop.engine.txt2img.unet
    original = unet.forward
    calls = {"n": 0}

    def forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            return make_output(original, args, kwargs)
        return original(*args, **kwargs)

    unet.forward = forward
    try:
        yield calls
    finally:
        del unet.forward


def test_out_of_memory_on_one_request(client, live_server):
    _, app = live_server
    client.predict("warm", "", 2, 1.0, 0, 64, 64, api_name="/txt2img")
    before = rss()

    def oom(original, args, kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    with unet_fails_once(app, oom) as calls:
        message = refused(lambda: client.predict("doomed", "", 2, 1.0, 0, 64, 64, api_name="/txt2img"))
        assert "Out of memory" in message and calls["n"] >= 1
        assert read_params(client.predict("next", "", 2, 1.0, 0, 64, 64, api_name="/txt2img"))["prompt"] == "next"
    assert rss() - before < 64 * MB


def test_nan_latents_are_an_error_never_a_black_image(client, live_server):
    _, app = live_server

    def nan(original, args, kwargs):
        out = original(*args, **kwargs)
        first = out[0] if isinstance(out, tuple) else out.sample
        poisoned = torch.full_like(first, float("nan"))
        return (poisoned,) if isinstance(out, tuple) else type(out)(sample=poisoned)

    with unet_fails_once(app, nan):
        message = refused(lambda: client.predict("poisoned", "", 1, 1.0, 0, 64, 64, api_name="/txt2img"))
    assert "NaN" in message
    path = client.predict("healthy", "", 1, 1.0, 0, 64, 64, api_name="/txt2img")
    assert read_params(path)["prompt"] == "healthy"


# ---------------------------------------------------------------------------------------------------- many users
def test_twenty_users_typing_with_a_webcam_stream(live_server, client, tmp_path, artifacts):
    """20 sessions type their own prompt key by key into the live endpoint while a webcam-style stream runs."""
    url, app = live_server
    users, key_s = 20, 0.08
    prompts = [f"user{u:02d} {'a blue square on green' if u % 2 else 'a red circle on white'}" for u in range(users)]
    frame = handle_file(write(tmp_path, "frame.png", encode(Image.new("RGB", (80, 60), "teal"))))
    stop, frames = threading.Event(), []
    # The webcam is a visitor of its own (the shared client's address carries every earlier test's work).
    camera_client = Client(url, verbose=False, headers={"X-Forwarded-For": "198.18.1.1"})

    def webcam():
        while not stop.is_set():
            start = time.perf_counter()
            camera_client.predict(frame, "webcam", 0.5, 2, 0, api_name="/webcam_frame")
            frames.append(time.perf_counter() - start)

    results: dict[int, dict] = {}
    refusals: list[str] = []

    def user(index: int):
        session = QueueSession(url, address=f"198.18.0.{index + 1}")  # 20 people, 20 addresses
        events = []
        for length in range(1, len(prompts[index]) + 1):
            status, event = session.join("live_txt2img", [prompts[index][:length], "", 2, 1.0, index, 64, 64])
            if status != 200:
                refusals.append(event)
            else:
                events.append(event)
            time.sleep(key_s)
        last_key = time.perf_counter()
        completed = [session.wait(event, timeout=300) for event in events]
        shown = []  # (time, prompt) of every image this user received, in arrival order
        for event, message in zip(events, completed):
            image = output_file(message)
            if image is not None:
                shown.append((session.finished[event][0], fetch_params(image["url"])["prompt"]))
        shown.sort()
        final = output_file(completed[-1])
        results[index] = dict(
            final_prompt=fetch_params(final["url"])["prompt"] if final else None,
            latency=session.finished[events[-1]][0] - last_key,
            shown=[prompt for _, prompt in shown],
            errors=[error_text(m) for m in completed if not m.get("success")],
        )
        session.close()

    camera = threading.Thread(target=webcam, daemon=True)
    camera.start()
    time.sleep(0.5)
    threads = [threading.Thread(target=user, args=(i,)) for i in range(users)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    stop.set()
    camera.join(timeout=60)
    wall = time.perf_counter() - started

    lost = [i for i in range(users) if i not in results or results[i]["final_prompt"] is None]
    crosstalk = [
        (i, prompt) for i, r in results.items() for prompt in r["shown"] if not prompts[i].startswith(prompt)
    ]  # every image a user saw must be for one of its own prefixes
    regressions = [(i, r["shown"]) for i, r in results.items() if r["shown"] != sorted(r["shown"], key=len)]
    latencies = sorted(r["latency"] for r in results.values())
    figures = dict(
        users=users, keys_per_user=len(prompts[0]), key_interval_s=key_s, wall_s=round(wall, 1),
        latency_p50_s=round(statistics.median(latencies), 3),
        latency_p95_s=round(latencies[int(0.95 * (len(latencies) - 1))], 3),
        latency_max_s=round(latencies[-1], 3), lost=len(lost), crosstalk=len(crosstalk),
        older_replaced_newer=len(regressions), refused_keys=len(refusals), webcam_frames=len(frames),
        webcam_frame_p50_s=round(statistics.median(frames), 3) if frames else None,
        images_shown=sum(len(r["shown"]) for r in results.values()),
        loop=vars(app.loop.stats),
    )  # fmt: skip
    print("\nmany users:", json.dumps(figures))
    (artifacts / "many-users.json").write_text(json.dumps(figures, indent=2))
    assert not refusals, refusals[:3]
    assert not lost and not crosstalk and not regressions, (lost, crosstalk, regressions)
    assert all(results[i]["final_prompt"] == prompts[i] for i in range(users))
    assert all(not r["errors"] for r in results.values())
    assert len(frames) >= 3, "the webcam stream starved"
    assert figures["latency_p95_s"] < 30
