"""How frames travel: the real app (page, handlers, live loop, live socket) over a simulated engine, in its own
process; the old path (Gradio's queue: the /webcam_frame API, the Gradio webcam stream) beside the new one (the
live socket), for raw clients and for Chromium with a fake camera, in one run.

`python -m lcm_live.bench transport --serve PORT` only starts that app and leaves it running.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

from ..request import Result, Timings, image_digest
from .serve import percentile, streams, webcam_frame
from .sim import SimRow, SimulatedEngine, pause


REPO = Path(__file__).resolve().parents[2]
PROMPT = "a yellow triangle on a purple background"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--use-fake-device-for-media-stream=fps=30", "--use-fake-ui-for-media-stream"]  # a 30 fps camera; fmt: skip


def texture(size: int, seed: int = 0) -> Image.Image:
    """Smooth noise: JPEG and PNG sizes of a photo-like image, not of a flat test card."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8))
    return small.resize((size, size), Image.Resampling.BICUBIC)


def camera_frame(index: int, width: int = 640, height: int = 480) -> Image.Image:
    """A camera-sized frame, different per client, with photo-like detail."""
    return Image.blend(webcam_frame(index, width, height), texture(max(width, height), index).crop((0, 0, width, height)),
                       0.5)  # fmt: skip


class FreeEngine(SimulatedEngine):
    """The simulated engine making `size` x `size` images (a photo-like texture, whatever the input: what a model
    returns costs it no CPU here), so that only the way frames travel costs time when `step_s` is 0."""

    def __init__(self, step_s: float = 0.0, size: int = 512):
        super().__init__(step_s, blocks=1)
        self.native_size = size
        self.info = dict(model="simulated", runtime="cpu simulated", native_size=size, embedded=False, decoder="VAE",
                         family="sd15")  # fmt: skip
        self._textures = {(size, size): texture(size)}

    def _result(self, row: SimRow) -> Result:
        request = row.request
        size = (request.width, request.height)
        if size not in self._textures:  # the model's area at the input's aspect (a 4:3 camera: 592x440)
            self._textures[size] = self._textures[self.native_size, self.native_size].resize(size)
        image = self._textures[size]
        params = dict(mode=request.mode, prompt=request.prompt, steps=request.steps, seed=request.seed,
                      width=request.width, height=request.height, model="simulated", decoder="full")  # fmt: skip
        if request.image is not None:
            params.update(strength=request.strength, input=image_digest(request.image))
        timings = Timings(denoise_ms=row.steps * self.step_s * 1e3, unet_steps=row.index, batch=row.batch)
        return Result(image, params, timings, warnings=row.warnings)


class SimManager:
    """What the page asks of a model manager, for an app that serves only the simulated engine."""

    policy = None

    def __init__(self, engine: FreeEngine):
        self.engine = engine

    def status_markdown(self) -> str:
        return f"**Model:** simulated engine, {self.engine.native_size}x{self.engine.native_size} (a benchmark)"


def serve(port: int, step_ms: float, size: int, quality: int, host: str | None = None):
    """Launch the app over FreeEngine on `port` and block (`--serve PORT`)."""
    sys.path.insert(0, str(REPO))
    import app as app_module
    from lcm_live.handlers import LiveApp
    from lcm_live.live import Limits, LiveLoop
    from lcm_live.settings import Settings
    from lcm_live.stream import attach
    from lcm_live.ui import build_ui

    settings = Settings(preset="demo", port=port, host=host, live_quality=quality, queue_size=1024)
    engine = FreeEngine(step_ms / 1e3, size)
    loop = LiveLoop(engine, Limits(session_jobs=settings.session_jobs, address_jobs=settings.address_jobs))
    live_app = LiveApp(SimManager(engine), loop)
    attach(live_app, settings.max_file_size, quality)
    demo = build_ui(live_app)
    demo.queue(max_size=settings.queue_size, default_concurrency_limit=None)
    print(f"simulated engine ({step_ms:g} ms a step, {size}x{size}) at http://{host or '127.0.0.1'}:{port}/",
          flush=True)  # fmt: skip
    app_module.launch(settings, built=(demo, live_app))


def start_server(args) -> tuple[subprocess.Popen, str]:
    """The simulated app in its own process on a free port; (process, url) once it answers."""

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "lcm_live.bench", "transport", "--serve", str(port), "--step-ms",
               str(args.step_ms), "--size", str(args.size), "--quality", str(args.quality)]  # fmt: skip
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
    from .page_client import answering

    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return process, answering(process, f"http://127.0.0.1:{port}/", "the simulated app", 120)


class CpuMeter:
    """CPU seconds (user + system) the server process spent between `start` and `stop`."""

    def __init__(self, pid: int):
        import psutil

        self.process = psutil.Process(pid)

    def now(self) -> float:
        times = self.process.cpu_times()
        return times.user + times.system


def _frames(count: int, fmt: str = "JPEG") -> list[bytes]:
    out = []
    for i in range(count):
        buffer = io.BytesIO()
        camera_frame(i).save(buffer, format=fmt, quality=80)
        out.append(buffer.getvalue())
    return out


def _summary(name: str, clients: int, log: list[list[tuple[float, float | None]]], begin: float, end: float,
             cpu_s: float, down_bytes: list[int]) -> dict:  # fmt: skip
    seconds = end - begin
    per_client = [sum(begin <= t < end for t, _ in entries) / seconds for entries in log]
    latencies = [lat for entries in log for t, lat in entries if begin <= t < end and lat is not None]
    frames = sum(sum(begin <= t < end for t, _ in entries) for entries in log)
    return dict(path=name, clients=clients, fps=round(sum(per_client), 1), fps_min=round(min(per_client), 1),
                fps_max=round(max(per_client), 1), latency_p50_ms=_ms(percentile(latencies, 50)),
                latency_p95_ms=_ms(percentile(latencies, 95)),
                cpu_ms_per_frame=round(cpu_s * 1e3 / frames, 1) if frames else None,
                kib_down=round(sum(down_bytes) / len(down_bytes) / 1024, 1) if down_bytes else None)  # fmt: skip


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 1)


def _timed(run, meter: CpuMeter, warmup_s: float, seconds: float):
    """Run `run(stop)` on its own threads; (begin, end, cpu seconds) of the measured window."""
    stop = threading.Event()
    worker = threading.Thread(target=run, args=(stop,), daemon=True)
    worker.start()
    time.sleep(warmup_s)
    cpu, begin = meter.now(), time.perf_counter()
    time.sleep(seconds)
    end, cpu = time.perf_counter(), meter.now() - cpu
    stop.set()
    worker.join(timeout=60)
    return begin, end, cpu


def api_clients(url: str, count: int, meter: CpuMeter, args) -> dict:
    """The old path for API clients: each frame uploaded, run through Gradio's queue as /webcam_frame, the PNG
    fetched; one call at a time, at most `client_fps` a second, one address each."""
    from .page_client import QueueSession, error_text, output_file

    frames = _frames(count)
    sessions = [QueueSession(url, address=f"198.51.100.{i + 1}") for i in range(count)]
    log: list[list] = [[] for _ in range(count)]
    down: list[int] = []
    failures: list[str] = []

    def client(index: int, stop: threading.Event) -> None:
        session, due = sessions[index], time.perf_counter()
        while not stop.is_set():
            pause(due - time.perf_counter())  # paced as the socket clients are
            sent = time.perf_counter()
            due = max(due, sent) + 1 / args.client_fps
            frame = session.upload(f"frame{index}.jpg", frames[index], mime="image/jpeg")
            message = session.call("webcam_frame", [frame, PROMPT, args.strength, args.steps, index])
            image = output_file(message)
            if image is None:
                failures.append(error_text(message) or "no image")
                continue
            down.append(len(session.fetch(image)))
            log[index].append((time.perf_counter(), time.perf_counter() - sent))

    try:
        begin, end, cpu = _timed(_all_at_once(client, count), meter, args.warmup, args.seconds)
    finally:
        for session in sessions:
            session.close()
    if failures:
        print(f"old path: {len(failures)} failed calls, e.g. {failures[0]}", file=sys.stderr)
    return _summary("old: /webcam_frame API (Gradio queue, PNG)", count, log, begin, end, cpu, down)


def _all_at_once(client, count: int):
    """run(stop): `count` clients, each `client(index, stop)` on a thread of its own, until all return."""

    def run(stop):
        threads = [threading.Thread(target=client, args=(i, stop), daemon=True) for i in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    return run


def socket_clients(url: str, count: int, meter: CpuMeter, args) -> dict:
    """The new path for raw clients: the page's protocol (a token from the page's load event, JPEG frames up,
    at most 2 unanswered, at most `client_fps` a second), one address each."""
    from websockets.sync.client import connect

    from ..stream import decode_result
    from .page_client import QueueSession

    frames = _frames(count)
    host = urlsplit(url).netloc
    sockets = []
    for i in range(count):
        address = f"198.51.100.{100 + i}"
        session = QueueSession(url, address=address)
        token = session.call("live_token", [])["output"]["data"][0]
        session.close()
        ws = connect(f"ws://{host}/live/ws?token={token}", origin=f"http://{host}",
                     additional_headers={"X-Forwarded-For": address}, max_size=None)  # fmt: skip
        json.loads(ws.recv())  # ready
        ws.send(json.dumps(dict(type="params", prompt=PROMPT, strength=args.strength, steps=args.steps, seed=i)))
        sockets.append(ws)
    log: list[list] = [[] for _ in range(count)]
    down: list[int] = []

    def client(index: int, stop: threading.Event) -> None:
        ws, sent_at, number, due = sockets[index], {}, 0, time.perf_counter()
        while not stop.is_set():
            now = time.perf_counter()
            if len(sent_at) < 2 and now >= due:  # as the page: at most 2 unanswered, at most client_fps a second
                sent_at[number] = now
                ws.send(frames[index])
                number, due = number + 1, max(due, now) + 1 / args.client_fps
                continue
            try:
                message = ws.recv(timeout=max(0.001, due - now) if len(sent_at) < 2 else 10)
            except TimeoutError:
                continue
            if isinstance(message, bytes):
                header, jpeg = decode_result(message)
                down.append(len(jpeg))
                now = time.perf_counter()
                log[index].append((now, now - sent_at.pop(header["frame"], now)))
            else:
                sent_at.pop(json.loads(message).get("frame"), None)

    try:
        begin, end, cpu = _timed(_all_at_once(client, count), meter, args.warmup, args.seconds)
    finally:
        for ws in sockets:
            ws.close()
    return _summary("new: live socket (JPEG both ways)", count, log, begin, end, cpu, down)


def chromium(url: str, meter: CpuMeter, args, fast: bool) -> dict:
    """One Chromium page with the fake camera on the Webcam tab: the live socket (`fast`), or the Gradio webcam
    stream with the socket refused (what a visitor behind a WebSocket-blocking proxy gets)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_context(viewport={"width": 1280, "height": 1000}).new_page()
        if not fast:
            page.route_web_socket("**/live/ws*", lambda ws: ws.close())
        page.goto(url)
        page.get_by_role("tab", name="Webcam").click()
        page.locator("#cam-live .live-start").click()
        if fast:
            page.wait_for_function("window.lcmLive.shown > 0", timeout=60_000)
        else:
            page.wait_for_function("window.lcmLive.mode === 'fallback'", timeout=30_000)
            page.locator("#cam-input").get_by_text("Click to Access Webcam").click()
            page.locator("#cam-input video").wait_for(state="visible", timeout=20_000)
            page.locator("#cam-input").get_by_role("button").filter(has_text="Record").or_(
                page.locator("#cam-input button[aria-label*='ecord']")
            ).first.click()
            page.evaluate("""() => { window.oldShown = []; let last = null;
                setInterval(() => { const img = document.querySelector('#cam-image img');
                  const src = img && img.complete ? img.currentSrc : null;
                  if (src && src !== last) { last = src; window.oldShown.push(performance.now()); } }, 4); }""")
        time.sleep(args.warmup)
        cpu, begin = meter.now(), page.evaluate("performance.now()")
        time.sleep(args.seconds)
        end, cpu = page.evaluate("performance.now()"), meter.now() - cpu
        if fast:
            data = page.evaluate("({shownAt: window.lcmLive.shownAt, latencies: window.lcmLive.latencies})")
            log = [list(zip(data["shownAt"], (x / 1e3 for x in data["latencies"])))]
        else:
            log = [[(t, None) for t in page.evaluate("window.oldShown")]]
        browser.close()
    log = [[(t / 1e3, lat) for t, lat in log[0]]]
    name = "new: Chromium, live socket" if fast else "old: Chromium, Gradio webcam stream"
    return _summary(name, 1, log, begin / 1e3, end / 1e3, cpu, [])


def loop_alone(args, count: int) -> dict:
    """The same engine and streams with no transport at all (frames submitted in-process): the ceiling."""
    engine = FreeEngine(args.step_ms / 1e3, args.size)
    frame = camera_frame(0)
    row = streams(engine, count, args.seconds, 8, interval_s=1 / args.client_fps, steps=args.steps,
                  strength=args.strength, warmup_s=args.warmup, frame_size=frame.size)  # fmt: skip
    return dict(path="loop alone (no transport)", clients=count, fps=row["fps"], fps_min=row["fps_min"],
                fps_max=row["fps_max"], latency_p50_ms=row["latency_p50_ms"], latency_p95_ms=row["latency_p95_ms"],
                cpu_ms_per_frame=None, kib_down=None)  # fmt: skip


def run(args) -> tuple[dict, list[dict]]:
    """All rows of one run against one server process."""
    counts = [int(n) for n in str(args.clients).split(",") if n]
    server, url = start_server(args)
    meter = CpuMeter(server.pid)
    rows = []
    try:
        for count in counts:
            for measure in (api_clients, socket_clients):
                rows.append(measure(url, count, meter, args))
                print(rows[-1], flush=True)
        if args.browser:
            for fast in (False, True):
                rows.append(chromium(url, meter, args, fast))
                print(rows[-1], flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
    for count in counts:
        rows.append(loop_alone(args, count))
        print(rows[-1], flush=True)
    return dict(url=url, clients=counts), rows
