"""Hostile and odd inputs, built cheaply, and a raw queue client that behaves like one browser session."""

from __future__ import annotations

import base64
import io
import json
import struct
import threading
import time
import uuid
import zlib

import httpx
import numpy as np
from PIL import Image


# ---------------------------------------------------------------------------------------------------- images
def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def constant_png(width: int, height: int, mode: str = "RGB", value: int = 90) -> bytes:
    """A width x height PNG of one colour, written row by row: a 12000x12000 image costs ~1 MB and no big buffer."""
    channels, color_type = {"L": (1, 0), "RGB": (3, 2), "RGBA": (4, 6)}[mode]

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    row = b"\x00" + bytes([value]) * (width * channels)  # filter byte 0, then the pixels
    packer = zlib.compressobj(9)
    parts = []
    rows_per_feed = max(1, (1 << 22) // len(row))
    block = row * rows_per_feed
    done = 0
    while done < height:
        count = min(rows_per_feed, height - done)
        parts.append(packer.compress(block if count == rows_per_feed else row * count))
        done += count
    parts.append(packer.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def odd_images() -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, file name): modes and formats a user may send, each one usable."""
    gradient = np.linspace(0, 65535, 96 * 64, dtype=np.uint16).reshape(64, 96)
    palette = Image.new("P", (96, 64), 1)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.paste(0, (0, 0, 48, 64))
    tall = Image.new("RGB", (48, 96), "orange")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    return {
        "rgba": (encode(Image.new("RGBA", (96, 64), (255, 0, 0, 128))), "rgba.png"),
        "la": (encode(Image.new("LA", (96, 64), (100, 50))), "la.png"),
        "cmyk-jpeg": (encode(Image.new("CMYK", (96, 64), (0, 255, 0, 0)), "JPEG"), "cmyk.jpg"),
        "palette-transparency": (encode(palette, transparency=0), "palette.png"),
        "png-16-bit": (encode(Image.fromarray(gradient, "I;16")), "deep.png"),
        "greyscale": (encode(Image.new("L", (96, 64), 128)), "grey.png"),
        "exif-rotated": (encode(tall, "JPEG", exif=exif.tobytes()), "rotated.jpg"),
        "gif": (encode(Image.new("P", (96, 64), 3), "GIF"), "anim.gif"),
    }


def broken_images() -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, file name): files that are not usable images."""
    good = encode(Image.new("RGB", (64, 64), "red"))
    jpeg = encode(Image.new("RGB", (256, 256), "blue"), "JPEG")
    return {
        "truncated-png": (good[:60], "broken.png"),
        "truncated-jpeg": (jpeg[: len(jpeg) // 2], "broken.jpg"),
        "not-an-image": (b"hello, this is text, not pixels\n" * 4, "text.png"),
        "empty": (b"", "empty.png"),
        "html-named": (b"GIF89a" + b"\0" * 20, "<img src=x onerror=alert(1)>.gif"),
    }


# ---------------------------------------------------------------------------------------------------- the queue
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
