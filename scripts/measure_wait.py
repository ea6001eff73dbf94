"""How long a small request waits behind the costliest requests another visitor may send.

Starts the app of a checkout (`--repo`, default this one) on the embedded model in its own process, then, per run:
visitor A (one address) sends `--count` costly requests at once; `--lead` seconds later visitor B (another address)
sends a 64x64, 4-step /txt2img and the script times it, from its POST to its image. Also timed: B alone (the
floor) and what happened to A's requests (served or refused, and when). Raw HTTP only (`/gradio_api/call/...`, the
same positional parameters in every version of the app), so an older checkout can be measured the same way:

    git archive 455aa38 | tar -x -C /tmp/lcm-before     # the app before its cost cap and fair sharing
    python scripts/measure_wait.py --repo /tmp/lcm-before --costly txt2img:1024x768x8
    python scripts/measure_wait.py --costly txt2img:1024x768x8 --costly txt2img:64x64x8 --costly step_sweep:64x64 --count 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx


HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))

from lcm_live.bench.page_client import start_app  # noqa: E402


SMALL = ["small", "", 4, 1.0, 0, 64, 64]  # B's request: /txt2img, 64x64, 4 steps


def call(url: str, endpoint: str, data: list, address: str) -> tuple[str, float, str]:
    """(outcome, seconds from POST to the last message, error text): outcome is "image" or "refused"."""
    headers = {"X-Forwarded-For": address}
    start = time.perf_counter()
    posted = httpx.post(url + f"gradio_api/call/{endpoint}", json={"data": data}, headers=headers, timeout=60)
    if posted.status_code != 200:
        return "refused", time.perf_counter() - start, posted.text
    event = posted.json()["event_id"]
    text = httpx.get(url + f"gradio_api/call/{endpoint}/{event}", headers=headers, timeout=600).text
    took = time.perf_counter() - start
    return ("image" if "event: complete" in text else "refused"), took, "" if "event: complete" in text else text


def costly_data(spec: str) -> tuple[str, list]:
    """`txt2img:WxHxSTEPS` or `step_sweep:WxH` -> (endpoint, positional data)."""
    endpoint, _, size = spec.partition(":")
    numbers = [int(n) for n in size.split("x")]
    if endpoint == "step_sweep":
        width, height = numbers
        return endpoint, ["costly", "", 1.0, 0, width, height]
    width, height, steps = numbers
    return endpoint, ["costly", "", steps, 1.0, 0, width, height]


def run_behind(url: str, spec: str, count: int, lead: float) -> dict:
    endpoint, data = costly_data(spec)
    theirs: list[tuple[str, float, str]] = []
    threads = [threading.Thread(target=lambda: theirs.append(call(url, endpoint, data, "203.0.113.1")))
               for _ in range(count)]  # fmt: skip
    for thread in threads:
        thread.start()
    time.sleep(lead)
    outcome, waited, error = call(url, "txt2img", SMALL, "203.0.113.2")
    for thread in threads:
        thread.join()
    return dict(small_s=round(waited, 3), small_outcome=outcome, small_error=error[:200],
                costly=[dict(outcome=o, s=round(s, 3), error=e[:200]) for o, s, e in theirs])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=HERE, help="the checkout whose app.py to start")
    parser.add_argument("--costly", action="append", required=True, help="txt2img:WxHxSTEPS or step_sweep:WxH")
    parser.add_argument("--count", type=int, default=1, help="costly requests sent at once by visitor A")
    parser.add_argument("--lead", type=float, default=0.5, help="seconds between A's requests and B's")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--app-args", default="", help="extra flags for app.py, e.g. '--max-cost 10000000'")
    parser.add_argument("--label", default=None, help="what the checkout is (for a copy that is not a git checkout)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=args.repo, capture_output=True, text=True)
    process, url = start_app(args.repo, args.app_args.split())
    try:
        for _ in range(3):  # warm-up: first calls compile kernels, load the tokenizer cache, ...
            call(url, "txt2img", SMALL, "203.0.113.3")
        alone = [call(url, "txt2img", SMALL, "203.0.113.2")[1] for _ in range(args.runs)]
        results = dict(label=args.label or commit.stdout.strip() or str(args.repo), count=args.count, lead_s=args.lead,
                       small_alone_s=[round(s, 3) for s in alone], scenarios={})  # fmt: skip
        for spec in args.costly:
            runs = [run_behind(url, spec, args.count, args.lead) for _ in range(args.runs)]
            waits = [run["small_s"] for run in runs]
            results["scenarios"][spec] = dict(small_behind_median_s=round(statistics.median(waits), 3),
                                              runs=runs)  # fmt: skip
            costly = runs[0]["costly"][0]
            print(f"{spec} x{args.count}: 64x64 waits {statistics.median(waits):.2f} s (median of {waits}); "
                  f"A's first request: {costly['outcome']} after {costly['s']:.2f} s", flush=True)  # fmt: skip
        print(f"64x64 alone: {statistics.median(alone):.2f} s (median of {[round(s, 3) for s in alone]})")
    finally:
        process.terminate()
        process.wait(30)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
