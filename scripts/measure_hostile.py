"""One hostile visitor against a checkout's app: memory, the second visitor's wait, 5xx counts, held connections.

Starts `python app.py --preset demo --offline` of each checkout given in its own process (defaults otherwise), sends
what docs/safety.md's findings 10-18 describe from one address, and reads the server's memory from /proc (its peak
through VmHWM, reset before each case). Prints a table and writes JSON. For a before/after comparison, give two
checkouts (e.g. a `git worktree` of the older commit and this one); they run one after the other.

    python scripts/measure_hostile.py --repo ../lcm-live-old --repo . --out bench-results/hostile.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path

import httpx


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from hostile_inputs import constant_png  # noqa: E402

from lcm_live.bench.page_client import QueueSession, error_text, output_file, start_app  # noqa: E402


MB = 1 << 20
CONTROL_OFF = ["off", 1.0, 100, 200]  # a live image tab's control, strength and edge thresholds


class Server:
    def __init__(self, pid: int):
        self.pid = pid

    def rss(self) -> int:
        return self._status("VmRSS:")

    def reset_peak(self) -> int:
        with contextlib.suppress(OSError), open(f"/proc/{self.pid}/clear_refs", "w") as f:
            f.write("5")
        return self.rss()

    def peak(self) -> int:
        return self._status("VmHWM:")

    def _status(self, key: str) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        return 0


def second_visitor(url: str) -> tuple[str, float]:
    started = time.perf_counter()
    try:
        result = QueueSession(url, address="203.0.113.99").call("txt2img", ["a second visitor", "", 1, 1.0, 0, 64, 64],
                                                                 timeout=120)  # fmt: skip
        outcome = "served" if output_file(result) else f"error: {error_text(result)[:60]}"
    except (RuntimeError, TimeoutError, httpx.HTTPError) as error:
        outcome = f"refused: {str(error)[:60]}"
    return outcome, time.perf_counter() - started


def big_pngs(url: str, server: Server, count: int) -> dict:
    png = constant_png(8000, 5000)
    base = server.reset_peak()
    sessions = [QueueSession(url, address="203.0.113.10") for _ in range(count)]
    upload = sessions[0].upload("big.png", png)
    events = [(s, s.join("img2img", [upload, "big", 0.5, 1, i])) for i, s in enumerate(sessions)]
    outcome, wait = second_visitor(url)
    results = [s.wait(e, timeout=600) for s, (status, e) in events if status == 200]
    for s in sessions:
        s.close()
    return dict(peak_mb=(server.peak() - base) / MB, images=sum(r["success"] for r in results),
                refused=count - sum(r["success"] for r in results), second=outcome, second_s=wait)  # fmt: skip


def editor_id(url: str) -> int:
    config = httpx.get(url + "config").json()
    return next(c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == "sketch-canvas")


def blob(url: str, editor: int, blob_id: str, data: bytes, kind: str, index) -> int:
    fields = {"session_hash": "x", "component_id": str(editor), "fn_name": "accept_blobs", "id": blob_id,
              "type": kind, "index": str(index)}  # fmt: skip
    return httpx.post(url + "gradio_api/component_server/", data=fields, files={"file": ("b", data)}, timeout=60,
                      headers={"X-Forwarded-For": "203.0.113.20"}).status_code  # fmt: skip


def blobs(url: str, server: Server) -> dict:
    editor = editor_id(url)
    before = server.reset_peak()
    index_status = blob(url, editor, "q", b"x" * 600, "layer", 100_000_000)
    index_kept = (server.rss() - before) / MB
    before = server.rss()
    chunk = os.urandom(19 * MB)
    statuses = [blob(url, editor, f"b{i}", chunk, "composite", "null") for i in range(20)]
    time.sleep(2)
    return dict(index_status=index_status, index_kept_mb=index_kept, uploads_taken=statuses.count(200),
                uploads_kept_mb=(server.rss() - before) / MB)  # fmt: skip


def idle_streams(url: str) -> dict:
    attacker = QueueSession(url, address="203.0.113.30")
    statuses = [attacker.join("live_webcam", [None, "idle", 0.5, 1, 0, *CONTROL_OFF])[0] for _ in range(80)]
    time.sleep(2)
    outcome, wait = second_visitor(url)
    attacker.close()
    return dict(joined=statuses.count(200), second=outcome, second_s=wait)


def sketch_layer(url: str, server: Server) -> dict:
    """A sketch event (as an API client sends it) whose one layer is a 79-megapixel RGBA PNG of a few hundred KB."""
    session = QueueSession(url, address="203.0.113.50")
    layer = session.upload("layer.png", constant_png(10000, 7900, "RGBA"))
    small = session.upload("c.png", constant_png(64, 64))
    inputs = len(next(d for d in httpx.get(url + "config").json()["dependencies"]
                      if d.get("api_name") == "live_sketch")["inputs"])  # fmt: skip
    data = [{"background": None, "layers": [layer], "composite": small}, "a sketch", 0.75, 1, 0,
            *CONTROL_OFF][:inputs]  # fmt: skip
    base = server.reset_peak()
    result = session.call("live_sketch", data, timeout=300)
    session.close()
    return dict(peak_mb=(server.peak() - base) / MB, image=bool(output_file(result)))


def long_prompt(url: str, server: Server) -> dict:
    before = server.rss()
    body = {"data": ["p" * 20_000_000, "", 1, 1.0, 0, 64, 64], "fn_index": fn_index(url, "txt2img"),
            "session_hash": "prompt1"}  # fmt: skip
    status = httpx.post(url + "gradio_api/queue/join", json=body, timeout=120).status_code
    time.sleep(2)
    return dict(status=status, kept_mb=(server.rss() - before) / MB)


def fn_index(url: str, api_name: str) -> int:
    config = httpx.get(url + "config").json()
    return next(d["id"] for d in config["dependencies"] if d.get("api_name") == api_name)


MALFORMED = [
    ("queue/join", {"data": [], "fn_index": -1, "session_hash": "abc"}),
    ("queue/join", {"data": [], "fn_index": 999, "session_hash": "abc"}),
    ("queue/join", {"data": ["x", "", 2, 1.0, 0, 64, 64], "fn_index": "txt2img", "session_hash": ""}),
    ("call/nothere", {"data": []}),
    ("call/load_model", {"data": ["sd15"]}),
    ("run/predict", {"data": [0], "fn_index": 0}),
    ("api/predict", {"data": []}),
    ("api/predict/", {"data": []}),
    ("component_server/", {"session_hash": "a", "component_id": 99999, "fn_name": "accept_blobs", "data": {}}),
]


def malformed(url: str) -> dict:
    statuses = []
    for route, body in MALFORMED:
        if body.get("fn_index") == "txt2img":
            body = {**body, "fn_index": fn_index(url, "txt2img")}
        statuses.append(httpx.post(url + "gradio_api/" + route, json=body, timeout=30).status_code)
    with contextlib.suppress(httpx.HTTPError):
        statuses.append(httpx.get(url + "gradio_api/call/nothere/1", timeout=30).status_code)
    return dict(requests=len(MALFORMED) + 1, http_5xx=sum(s >= 500 for s in statuses),
                failed_reads=len(MALFORMED) + 1 - len(statuses))  # fmt: skip


def slowloris(url: str, count: int, after: float) -> dict:
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    socks = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        socks.append(s)
    time.sleep(after)
    still_open = 0
    for s in socks:
        s.settimeout(0.05)
        try:
            still_open += s.recv(1) != b""
        except TimeoutError:
            still_open += 1
        except OSError:
            pass
        s.close()
    return dict(connections=count, open_after_s=after, still_open=still_open)


def uploads(url: str, count: int) -> dict:
    data, taken = os.urandom(2 * MB - 4096), 0
    with httpx.Client(timeout=60, headers={"X-Forwarded-For": "203.0.113.40"}) as http:
        for _ in range(count):
            taken += http.post(url + "gradio_api/upload", files={"files": ("a.bin", data)}).status_code == 200
    return dict(sent_mb=count * len(data) / MB, taken_mb=taken * len(data) / MB)


def measure(repo: Path) -> dict:
    process, url = start_app(repo, ["--max-file-size", "20mb"])
    server = Server(process.pid)
    try:
        QueueSession(url).call("txt2img", ["warm", "", 1, 1.0, 0, 64, 64])
        return dict(repo=str(repo), long_prompt=long_prompt(url, server), big_pngs=big_pngs(url, server, 16),
                    blobs=blobs(url, server), sketch_layer=sketch_layer(url, server), idle_streams=idle_streams(url),
                    malformed=malformed(url),
                    slowloris=slowloris(url, 200, 12.0), uploads=uploads(url, 150))  # fmt: skip
    finally:
        process.kill()
        process.wait()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", action="append", type=Path, help="a checkout to measure (repeat to compare)")
    parser.add_argument("--out", type=Path, default=Path("bench-results/hostile.json"))
    args = parser.parse_args(argv)
    runs = [measure(repo.resolve()) for repo in args.repo or [Path(".")]]
    for run in runs:
        print(f"\n{run['repo']}")
        for case, values in run.items():
            if case != "repo":
                print(f"  {case:13s} " + ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                                                   for k, v in values.items()))  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(runs, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
