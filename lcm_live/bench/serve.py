"""Many simulated users against one real engine and live loop: webcam-style streams and typists.

Each case runs with batching on (`max_batch` rows per UNet call) and off (1 row per call) in the same run, so
the ratio between them is measured under the same machine load.
"""

from __future__ import annotations

import statistics
import threading
import time

from PIL import Image

from ..live import SUPERSEDED, Limits, LiveLoop
from ..request import Request
from .sim import pause


UNLIMITED = Limits(max_cost=2**40, session_jobs=10**6, address_jobs=10**6)  # a benchmark measures, it does not police
TYPED = "a red circle on a blue ground"[:28]  # 28 keys, as the 20-user hardening test types


def percentile(values: list[float], pct: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def webcam_frame(index: int, width: int = 640, height: int = 480) -> Image.Image:
    """A camera-sized frame whose content differs per stream."""
    image = Image.new("RGB", (width, height), (40 * index % 256, 90, 160))
    image.paste((220, 200, 40), (width // 4 + 8 * index, height // 4, width // 2 + 8 * index, height // 2))
    return image


def streams(engine, count: int, seconds: float, max_batch: int, interval_s: float = 0.02, steps: int = 2,
            strength: float = 0.5, warmup_s: float = 1.0, frame_size: tuple[int, int] = (640, 480)) -> dict:  # fmt: skip
    """`count` webcam sessions, each sending a frame every `interval_s` whatever the server does (as a browser does).

    A slot keeps only its newest frame, so frames the server cannot keep up with are dropped, never queued; what
    counts is the frames each session gets back per second, and how old a frame is when its image arrives.
    """
    loop = LiveLoop(engine, UNLIMITED, max_batch=max_batch)
    shown: list[list[tuple[float, float]]] = [[] for _ in range(count)]  # (done time, latency s) per session
    frames = [webcam_frame(i, *frame_size) for i in range(count)]
    stop = threading.Event()

    def stream(index: int) -> None:
        request = Request(prompt="a yellow triangle on a purple background", image=frames[index], steps=steps,
                          strength=strength, seed=index)  # fmt: skip
        due = time.perf_counter() + index * interval_s / count
        while not stop.is_set():
            pause(due - time.perf_counter())
            due += interval_s
            sent = time.perf_counter()
            job = loop.submit(f"stream{index}:webcam", request, preempt=False)

            def done(future, sent=sent):
                if not future.cancelled() and future.exception() is None and future.result() != SUPERSEDED:
                    now = time.perf_counter()
                    shown[index].append((now, now - sent))

            job.future.add_done_callback(done)

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    time.sleep(warmup_s)
    begin, calls_before, rows_before = time.perf_counter(), loop.stats.unet_calls, loop.stats.rows_stepped
    time.sleep(seconds)
    end, calls, rows = time.perf_counter(), loop.stats.unet_calls - calls_before, loop.stats.rows_stepped - rows_before
    stop.set()
    for thread in threads:
        thread.join(timeout=120)
    loop.close()
    per_session = [sum(begin <= t < end for t, _ in log) / seconds for log in shown]
    latencies = [lat for log in shown for t, lat in log if begin <= t < end]
    return dict(streams=count, max_batch=max_batch, fps=round(sum(per_session), 2),
                fps_min=round(min(per_session), 2), fps_max=round(max(per_session), 2),
                latency_p50_ms=_ms(percentile(latencies, 50)), latency_p95_ms=_ms(percentile(latencies, 95)),
                mean_batch=round(rows / calls, 2) if calls else None)  # fmt: skip


def typists(engine, count: int, max_batch: int, key_s: float = 0.08, webcam: bool = True, size: int | None = None,
            text: str = TYPED) -> dict:  # fmt: skip
    """`count` sessions typing `text` key by key (each key a request), optionally beside one webcam stream.

    Per typist: last key -> its final image; every image shown is checked to be newer than the one before it,
    and the final one to carry the final prompt.
    """
    loop = LiveLoop(engine, UNLIMITED, max_batch=max_batch)
    stop = threading.Event()
    results: list[dict] = [{} for _ in range(count)]

    def camera() -> None:
        request = Request(prompt="webcam", image=webcam_frame(99), steps=2, strength=0.5)
        while not stop.is_set():
            loop.submit("camera:webcam", request, preempt=False).future.result(timeout=120)

    def typist(index: int) -> None:
        shown: list[int] = []
        lock = threading.Lock()
        jobs = []
        time.sleep(index * key_s / count)  # not all in step
        for k in range(1, len(text) + 1):
            prompt = f"{index} {text[:k]}"
            job = loop.submit(f"typist{index}:txt2img", Request(prompt=prompt, seed=index, width=size, height=size))

            def done(future, k=k):
                if future.exception() is None and future.result() != SUPERSEDED:
                    with lock:
                        shown.append(k)

            job.future.add_done_callback(done)
            jobs.append((time.perf_counter(), job))
            time.sleep(key_s)
        last_sent, last = jobs[-1]
        outcome = last.future.result(timeout=300)
        latency = time.perf_counter() - last_sent if outcome != SUPERSEDED else None
        final_ok = outcome != SUPERSEDED and outcome.result.params["prompt"] == f"{index} {text}"
        with lock:
            stale = sum(b < a for a, b in zip(shown, shown[1:]))
        results[index] = dict(latency=latency, final_ok=final_ok, stale=stale, shown=len(shown))

    cam = threading.Thread(target=camera, daemon=True)
    if webcam:
        cam.start()
        time.sleep(0.5)
    threads = [threading.Thread(target=typist, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stop.set()
    if webcam:
        cam.join(timeout=120)
    calls, rows = loop.stats.unet_calls, loop.stats.rows_stepped
    loop.close()
    latencies = [r["latency"] for r in results if r["latency"] is not None]
    return dict(typists=count, webcam=webcam, max_batch=max_batch, latency_p50_s=_s(percentile(latencies, 50)),
                latency_p95_s=_s(percentile(latencies, 95)), latency_max_s=_s(max(latencies, default=None)),
                finals_correct=sum(r["final_ok"] for r in results), stale_shown=sum(r["stale"] for r in results),
                images_shown=sum(r["shown"] for r in results), mean_batch=round(rows / calls, 2) if calls else None)  # fmt: skip


def model_time(engine, size: int | None = None, repeats: int = 8) -> float:
    """Seconds for one undisturbed 4-step generation (the median of the last runs; the first ones warm up)."""
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        engine.generate(Request(prompt=f"calibrate {i}", width=size, height=size))
        times.append(time.perf_counter() - start)
    return statistics.median(times[repeats // 2 :])


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 1)


def _s(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


def through_app(count: int, seconds: float, max_batch: int, warmup_s: float = 3.0, steps: int = 2,
                threads: int | None = None) -> dict:  # fmt: skip
    """`count` sessions streaming frames back to back into a real app started as its own process
    (`python app.py --preset demo --max-batch N`), through the API's `/webcam_frame`, each as a visitor of its own
    address (forwarded by a proxy on this machine, which the app trusts by default). Each session is a page-like
    raw-HTTP client (`page_client.QueueSession`): per frame it uploads the PNG, joins the event, reads the result
    off its SSE stream and fetches the output image."""
    import io
    from pathlib import Path

    from .page_client import QueueSession, error_text, output_file, start_app

    extra = ["--max-batch", str(max_batch), "--queue-size", "1024", "--session-jobs", "64", "--address-jobs", "1024"]
    env = {"OMP_NUM_THREADS": str(threads)} if threads else None
    server, url = start_app(Path(__file__).resolve().parents[2], extra, env)
    frames = []
    for i in range(count):
        buffer = io.BytesIO()
        webcam_frame(i).save(buffer, format="PNG")
        frames.append(buffer.getvalue())
    sessions = []
    try:
        # one visitor each, as behind a reverse proxy
        sessions = [QueueSession(url, address=f"198.51.100.{i + 1}") for i in range(count)]
        done: list[list[tuple[float, float]]] = [[] for _ in range(count)]
        failures: list[str] = []
        stop = threading.Event()

        def stream(index: int) -> None:
            session = sessions[index]
            while not stop.is_set():
                sent = time.perf_counter()
                frame = session.upload(f"frame{index}.png", frames[index])
                message = session.call("webcam_frame", [frame, "a yellow triangle on a purple background", 0.5,
                                                        steps, index])  # fmt: skip
                image = output_file(message)
                if image is None:
                    failures.append(error_text(message) or "no image")
                    continue
                session.fetch(image)
                done[index].append((time.perf_counter(), time.perf_counter() - sent))

        workers = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(count)]
        for worker in workers:
            worker.start()
        time.sleep(warmup_s)
        begin = time.perf_counter()
        time.sleep(seconds)
        end = time.perf_counter()
        stop.set()
        for worker in workers:
            worker.join(timeout=60)
    finally:
        for session in sessions:
            session.close()
        server.terminate()
        server.wait(timeout=30)
    if failures:
        raise RuntimeError(f"{len(failures)} frames failed through the app, e.g. {failures[0]}")
    per_session = [sum(begin <= t < end for t, _ in log) / seconds for log in done]
    latencies = [lat for log in done for t, lat in log if begin <= t < end]
    return dict(streams=count, max_batch=max_batch, fps=round(sum(per_session), 2),
                fps_min=round(min(per_session), 2), fps_max=round(max(per_session), 2),
                latency_p50_ms=_ms(percentile(latencies, 50)), latency_p95_ms=_ms(percentile(latencies, 95)))  # fmt: skip
