"""A raw-HTTP client that behaves like one browser page: events joined in order on one session, their messages
read off one SSE stream, files uploaded and fetched as the page does. Tests use it to drive the live endpoints;
`bench serve` uses it to stream frames into a launched app at a client cost of a few ms per frame (gradio_client
spends about 0.3 s of CPU per call, which on a small machine measures the client, not the app)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx


def start_app(repo: Path, extra: list[str], env: dict | None = None, timeout: float = 180.0):
    """`python app.py --preset demo --offline` of the checkout at `repo`, on a free port, in its own process;
    returns (process, url) once the app answers. SystemExit if it exits or does not answer in `timeout` s."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", **(env or {})}
    command = [sys.executable, "app.py", "--preset", "demo", "--offline", "--port", str(port), *extra]
    process = subprocess.Popen(command, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return process, answering(process, f"http://127.0.0.1:{port}/", f"the app in {repo}", timeout)


def answering(process: subprocess.Popen, url: str, what: str, timeout: float) -> str:
    """`url` once the app `process` serves answers there; SystemExit (and the process killed) if it exits or does
    not answer in `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "config", timeout=2).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            raise SystemExit(f"{what} exited with {process.returncode}")
        time.sleep(0.3)
    process.kill()
    raise SystemExit(f"{what} did not answer in {timeout:.0f} s")


class QueueSession:
    """One browser-like session over raw HTTP: events joined in order, their messages read off one SSE stream.

    This is what the page's JavaScript does, so the live endpoints (newest wins per session) can be exercised;
    gradio_client submits each call from its own thread, so its calls can reach the server out of order.
    """

    def __init__(self, url: str, session_hash: str | None = None, timeout: float = 120.0, address: str | None = None):
        self.url = url.rstrip("/") + "/"
        self.session_hash = session_hash or uuid.uuid4().hex[:11]
        # The app sees the test's loopback connection as a trusted proxy: X-Forwarded-For sets the visitor's address.
        self.headers = {"X-Forwarded-For": address} if address else {}
        self.http = httpx.Client(timeout=timeout, headers=self.headers)
        self.messages: dict[str, list[dict]] = {}
        self.finished: dict[str, tuple[float, dict]] = {}  # event id -> (perf_counter time, process_completed msg)
        self._done: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._reader = threading.Thread(target=self._read, daemon=True, name=f"sse-{self.session_hash}")
        self._reader.start()

    _fn_index_cache: dict[tuple[str, str], int] = {}

    def fn_index(self, api_name: str) -> int:
        key = (self.url, api_name)
        if key not in self._fn_index_cache:
            config = self.http.get(self.url + "config").json()
            for dependency in config["dependencies"]:
                self._fn_index_cache[(self.url, dependency.get("api_name"))] = dependency["id"]
        return self._fn_index_cache[key]

    def join(self, api_name: str, data: list) -> tuple[int, str]:
        """(HTTP status, event id or the refusal's text)."""
        body = dict(data=data, fn_index=self.fn_index(api_name), session_hash=self.session_hash, event_data=None,
                    trigger_id=None)  # fmt: skip
        response = self.http.post(self.url + "gradio_api/queue/join", json=body)
        if response.status_code != 200:
            return response.status_code, response.text
        event_id = response.json()["event_id"]
        with self._lock:
            self.messages.setdefault(event_id, [])
            self._done.setdefault(event_id, threading.Event())
        self._wake.set()
        return 200, event_id

    def wait(self, event_id: str, timeout: float = 120.0) -> dict:
        """The event's process_completed message (success, output or error)."""
        with self._lock:
            done = self._done.setdefault(event_id, threading.Event())
        if not done.wait(timeout):
            raise TimeoutError(f"event {event_id} did not complete in {timeout} s")
        return self.finished[event_id][1]

    def call(self, api_name: str, data: list, timeout: float = 120.0) -> dict:
        status, event_id = self.join(api_name, data)
        if status != 200:
            raise RuntimeError(f"join refused: {status} {event_id}")
        return self.wait(event_id, timeout)

    def upload(self, name: str, data: bytes, mime: str = "image/png") -> dict:
        """Upload a file as the page does; its FileData for an event's data."""
        response = self.http.post(self.url + "gradio_api/upload", files={"files": (name, data, mime)})
        response.raise_for_status()
        return {"path": response.json()[0], "meta": {"_type": "gradio.FileData"}}

    def fetch(self, file: dict) -> bytes:
        """The bytes of an output FileData, fetched as the page shows it."""
        response = self.http.get(file["url"])
        response.raise_for_status()
        return response.content

    def logs(self, event_id: str) -> list[str]:
        return [m["log"] for m in self.messages.get(event_id, []) if m.get("msg") == "log"]

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self.http.close()

    def _outstanding(self) -> bool:
        with self._lock:
            return any(not event.is_set() for event in self._done.values())

    def _read(self) -> None:
        stream_http = httpx.Client(timeout=httpx.Timeout(60.0, read=30.0), headers=self.headers)
        while not self._closed:
            if not self._outstanding():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                url = self.url + f"gradio_api/queue/data?session_hash={self.session_hash}"
                with stream_http.stream("GET", url) as stream:
                    for line in stream.iter_lines():
                        if not line.startswith("data:"):
                            continue
                        message = json.loads(line[5:])
                        if self._handle(message):
                            break
            except (httpx.HTTPError, json.JSONDecodeError):
                time.sleep(0.05)
        stream_http.close()

    def _handle(self, message: dict) -> bool:
        """Record one message; True when the server closes the stream."""
        kind, event_id = message.get("msg"), message.get("event_id")
        if kind == "close_stream":
            return True
        if event_id is None:
            return False
        with self._lock:
            self.messages.setdefault(event_id, []).append(message)
            if kind == "process_completed":
                self.finished[event_id] = (time.perf_counter(), message)
                self._done.setdefault(event_id, threading.Event()).set()
        return False


def output_file(message: dict, index: int = 0) -> dict | None:
    """The FileData of output `index` of a completed event, or None when it was skipped (superseded)."""
    if not message.get("success"):
        return None
    value = message["output"]["data"][index]
    return value if isinstance(value, dict) and value.get("path") else None


def error_text(message: dict) -> str:
    return "" if message.get("success") else str(message.get("output", {}).get("error"))
