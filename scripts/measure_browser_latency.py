"""Last keystroke -> final image, in a real browser: lcm-live's loop against Gradio's stock `always_last`.

The embedded model is slowed to a chosen model-time T (a sleep per UNet call), a person-like typist types
bursts into the prompt in Chromium, and the page records when each image arrived. Prints a table of the
latency after the last key in model-times (median, p95) and the UNet steps spent per burst; writes JSON.

    python scripts/measure_browser_latency.py --model-time 0.4 --bursts 5 --out bench-results/browser_latency.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
WATCH_IMAGES = """() => {
  window.__arrivals = [];
  const root = document.querySelector('#t2i-image');
  new MutationObserver(() => {
    const img = root.querySelector('img');
    if (img && img.src && (!window.__arrivals.length || window.__arrivals.at(-1).src !== img.src))
      window.__arrivals.push({t: performance.now(), src: img.src});
  }).observe(root, {subtree: true, childList: true, attributes: true, attributeFilter: ['src']});
}"""
PHRASES = ["a small red circle on the left", "a large blue square, yellow background", "a green triangle on top"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slow_down(engine, step_s: float) -> list[float]:
    """Make each UNet step take `step_s`, spread over its blocks as if they computed; returns a list whose
    sum is the UNet work done in step-equivalents (an aborted step counts the fraction of blocks it ran)."""
    unet = engine.txt2img.unet
    blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    work: list[float] = []

    def block_done(module, args, output):
        time.sleep(step_s / len(blocks))
        work.append(1 / len(blocks))

    for block in blocks:
        block.register_forward_hook(block_done)
    return work


def measure(mode: str, model_time: float, bursts: int, key_delay_ms: int) -> dict:
    from playwright.sync_api import sync_playwright

    from app import build
    from lcm_live.pngmeta import read_params
    from lcm_live.request import Request
    from lcm_live.settings import Settings
    from lcm_live.ui import CSS, build_ui

    demo, app = build(Settings(preset="demo", offline=True))
    demo = build_ui(app, trigger_mode=mode)
    demo.queue(default_concurrency_limit=None)
    work = slow_down(app.loop.engine, model_time / 4)
    start = time.perf_counter()
    app.loop.engine.generate(Request(prompt="calibrate", steps=4))
    t_model = time.perf_counter() - start  # the real model-time, text encoder and decode included
    port = free_port()
    demo.launch(server_port=port, prevent_thread_lock=True, css=CSS)
    latencies, steps = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_selector("#t2i-image img", timeout=60_000)
        time.sleep(2 * model_time)
        page.evaluate(WATCH_IMAGES)
        box = page.locator("#t2i-prompt textarea")
        for burst in range(bursts):
            phrase = f"{PHRASES[burst % len(PHRASES)]} {burst}"
            box.fill("")
            time.sleep(3 * model_time)  # let the cleared prompt's image finish
            page.evaluate("() => { window.__arrivals = []; }")
            work.clear()
            for char in phrase:
                box.press(char if char != " " else "Space")
                last_key = page.evaluate("() => performance.now()")
                time.sleep(key_delay_ms / 1000)
            deadline = time.monotonic() + 20 * model_time + 10
            arrival = None
            while arrival is None and time.monotonic() < deadline:
                for item in page.evaluate("() => window.__arrivals"):
                    if (
                        item["t"] > last_key
                        and read_params(page.request.get(item["src"]).body()).get("prompt") == phrase
                    ):
                        arrival = item["t"]
                        break
                time.sleep(0.05)
            time.sleep(2 * model_time)
            if arrival is not None:
                latencies.append((arrival - last_key) / 1000 / t_model)
            steps.append(sum(work))
        browser.close()
    demo.close()
    app.loop.close()
    return dict(mode=mode, model_time_s=round(t_model, 3), key_delay_ms=key_delay_ms, bursts=bursts,
                measured=len(latencies), latency_median_T=round(statistics.median(latencies), 3),
                latency_p95_T=round(sorted(latencies)[max(0, int(0.95 * len(latencies)) - 1)], 3),
                latencies_T=[round(x, 3) for x in latencies], unet_steps_per_burst=statistics.mean(steps))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-time", type=float, default=0.4, help="seconds per 4-step generation")
    parser.add_argument("--bursts", type=int, default=5)
    parser.add_argument("--key-delay-ms", type=int, default=60)
    parser.add_argument("--out", default="bench-results/browser_latency.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = [measure(mode, args.model_time, args.bursts, args.key_delay_ms) for mode in ("multiple", "always_last")]
    print("| policy | model-time | last key -> final image (median, T) | p95 (T) | UNet work per burst (steps) |")
    print("|---|---|---|---|---|")
    for row in rows:
        name = "lcm-live loop" if row["mode"] == "multiple" else "Gradio always_last"
        print(f"| {name} | {row['model_time_s']} s | {row['latency_median_T']} | {row['latency_p95_T']} "
              f"| {row['unet_steps_per_burst']:.1f} |")  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
