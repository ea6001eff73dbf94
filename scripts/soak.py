"""Soak: a webcam-style stream of frames through /webcam_frame for minutes; prints the server's RSS curve.

    python scripts/soak.py --minutes 10                 # launches the app (embedded model) in this process
    python scripts/soak.py --minutes 10 --json soak.json --delete-cache 60,120

Every frame is a new 640x480 JPEG (a moving pattern with the frame number drawn in), as a browser sends
them. Samples every few seconds: resident memory, open file descriptors, threads, Gradio's cache folder
(files and bytes) and our output folder. After the warm-up (the first fifth, at least 10 s) memory must not
grow by 5% or more, and descriptors and threads must not creep; the exit status says whether it held.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MB = 1 << 20


def folder_size(folder: str | Path) -> tuple[int, int]:
    """(files, bytes) under `folder`."""
    files = size = 0
    for path in Path(folder).rglob("*"):
        try:
            if path.is_file():
                files += 1
                size += path.stat().st_size
        except OSError:  # deleted while we walked
            pass
    return files, size


def frame_jpeg(index: int, folder: Path) -> str:
    """A 640x480 JPEG: a bar that moves, and the frame number (so no two frames are the same file)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (640, 480), (20, 40 + index % 160, 90))
    draw = ImageDraw.Draw(image)
    x = (index * 17) % 600
    draw.rectangle((x, 100, x + 40, 380), fill=(240, 200, 40))
    draw.text((10, 10), f"frame {index}", fill="white")
    path = folder / f"frame-{index % 4}.jpg"  # a few names, rewritten: our side keeps no pile of files
    image.save(path, quality=85)
    return str(path)


def run_soak(url: str, seconds: float, cache_dir: str | None, store_dir: str | None = None, every: float = 5.0,
             log=print) -> dict:  # fmt: skip
    """Stream frames to `url` for `seconds`; the samples and the verdict as a dict."""
    import psutil
    from gradio_client import Client, handle_file

    process = psutil.Process()
    work = Path(tempfile.mkdtemp(prefix="soak-frames-"))
    downloads = work / "downloads"  # the client's copies of the results: not the server's cache, and deleted
    client = Client(url, verbose=False, download_files=str(downloads))
    samples, latencies, errors = [], [], 0
    start = time.perf_counter()
    next_sample, frames = 0.0, 0

    def sample():
        cache_files, cache_bytes = folder_size(cache_dir) if cache_dir else (0, 0)
        store_files = len(list(Path(store_dir).glob("*.png"))) if store_dir else 0
        point = dict(
            t=round(time.perf_counter() - start, 1), frames=frames, rss_mb=round(process.memory_info().rss / MB, 1),
            fds=process.num_fds(), threads=process.num_threads(), cache_files=cache_files,
            cache_mb=round(cache_bytes / MB, 2), store_files=store_files,
        )  # fmt: skip
        samples.append(point)
        log(
            f"{point['t']:7.1f} s  frames {frames:6d}  rss {point['rss_mb']:8.1f} MB  fds {point['fds']:4d}  "
            f"threads {point['threads']:3d}  cache {cache_files:6d} files {point['cache_mb']:8.2f} MB  "
            f"outputs kept {store_files}"
        )

    while True:
        now = time.perf_counter() - start
        if now >= next_sample:
            sample()
            next_sample += every
        if now >= seconds:
            break
        path = frame_jpeg(frames, work)
        began = time.perf_counter()
        try:
            result = client.predict(handle_file(path), "a yellow triangle on a purple background", 0.5, 2,
                                    frames % 7, api_name="/webcam_frame")  # fmt: skip
            latencies.append(time.perf_counter() - began)
            Path(result).unlink(missing_ok=True)
        except Exception as error:  # counted and reported; a soak keeps going
            errors += 1
            log(f"frame {frames}: {type(error).__name__}: {error}")
        frames += 1
    sample()
    warm = max(10.0, seconds / 5)
    after = [s for s in samples if s["t"] >= warm] or samples[-1:]
    base = after[0]
    last = samples[-1]
    result = dict(
        seconds=round(seconds, 1), frames=frames, errors=errors, fps=round(frames / seconds, 2),
        frame_p50_s=round(statistics.median(latencies), 3) if latencies else None,
        frame_p95_s=round(sorted(latencies)[int(0.95 * (len(latencies) - 1))], 3) if latencies else None,
        warmup_s=warm, rss_after_warmup_mb=base["rss_mb"], rss_end_mb=last["rss_mb"],
        rss_max_after_warmup_mb=max(s["rss_mb"] for s in after),
        rss_growth_pct=round(100 * (last["rss_mb"] - base["rss_mb"]) / base["rss_mb"], 2),
        fds_growth=last["fds"] - base["fds"], threads_growth=last["threads"] - base["threads"],
        cache_files_end=last["cache_files"], cache_mb_end=last["cache_mb"], store_files_end=last["store_files"],
        samples=samples,
    )  # fmt: skip
    result["held"] = bool(
        result["rss_growth_pct"] < 5 and result["fds_growth"] <= 8 and result["threads_growth"] <= 4 and not errors
    )
    shutil.rmtree(work, ignore_errors=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--every", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--json", default="soak.json", help="where to write the samples and the verdict")
    parser.add_argument("--delete-cache", default=None, help="FREQUENCY,AGE seconds for Gradio's cache sweep "
                        "(the app ships 300,900; a shorter one shows the plateau within a short soak)")  # fmt: skip
    parser.add_argument("--url", default=None, help="soak an app already running here instead of launching one")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    demo = app = None
    cache_dir = store_dir = None
    url = args.url
    if url is None:
        cache_dir = tempfile.mkdtemp(prefix="soak-gradio-cache-")
        os.environ["GRADIO_TEMP_DIR"] = cache_dir
        from lcm_live.presets import EMBEDDED_MODEL

        if not (EMBEDDED_MODEL / "base" / "model_index.json").exists() and not os.environ.get("LCM_LIVE_DEMO_MODEL"):
            sys.exit("The embedded model is missing (assets/demo-model); set LCM_LIVE_DEMO_MODEL to a model folder.")
        import socket

        from app import MAX_EVENTS, build, start_cache_sweeper
        from lcm_live.settings import Settings
        from lcm_live.ui import CSS

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        settings = Settings(preset="demo", offline=True, port=port)
        demo, app = build(settings)
        if args.delete_cache:
            demo.delete_cache = tuple(int(v) for v in args.delete_cache.split(","))
        demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, css=CSS,
                    max_file_size=settings.max_file_size, max_threads=MAX_EVENTS)  # fmt: skip
        start_cache_sweeper(demo, *demo.delete_cache)  # as app.launch does
        url = f"http://127.0.0.1:{port}/"
        store_dir = str(app.store.folder)
    print(f"soaking {url} for {args.minutes} min (delete_cache={demo.delete_cache if demo else 'unknown'})")
    result = run_soak(url, args.minutes * 60, cache_dir, store_dir, every=args.every)
    result["delete_cache"] = list(demo.delete_cache) if demo and demo.delete_cache else None
    Path(args.json).write_text(json.dumps(result, indent=2))
    summary = {k: v for k, v in result.items() if k != "samples"}
    print(json.dumps(summary, indent=2))
    print(f"{'HELD' if result['held'] else 'FAILED'}; samples in {args.json}")
    if demo is not None:
        demo.close()
        app.loop.close()
    return 0 if result["held"] else 1


if __name__ == "__main__":
    sys.exit(main())
