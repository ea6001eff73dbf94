"""Live frames over a WebSocket, outside Gradio's event queue: webcam frames up as JPEG, generated frames down as JPEG.

One socket per page session (`/live/ws?token=...`). The page gets its token from a page-load event of its own
Gradio session, so the socket is that session's, seen from its address (through trusted proxies, as uvicorn
gives it); its frames go through the live loop like every other request (`loop.run` with the session's webcam
slot and the address: newest frame wins, session, address and cost caps apply). The page keeps at most
`in_flight` frames unanswered, so frames are dropped at the source; each frame gets exactly one answer.

Messages, page -> server: text `{"type": "params", "prompt", "strength", "steps", "seed"}` (kept for the frames
after it), binary: one JPEG/PNG/WebP frame. Server -> page: text `{"type": "ready" | "dropped" | "error", ...}`
and binary results: a 4-byte big-endian length, that many bytes of JSON (`type: "frame"`, `frame`: the number of
the frame answered, `params`: what made the image, `hud`), then the JPEG.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import secrets
import struct
import sys
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import gradio as gr
from PIL import Image

from .control import CANNY_HIGH, CANNY_LOW
from .inputs import InputError, clean_prompt, load_image
from .live import SUPERSEDED
from .request import GenerationError, Request, hud_line
from .text import public_text
from .visitors import Visitor


if TYPE_CHECKING:
    from starlette.websockets import WebSocket

    from .handlers import LiveApp


ROUTE = "/live/ws"
HEADER = struct.Struct(">I")  # the length of a result's JSON header
PAGE_JS = Path(__file__).with_name("stream.js")
MAX_TEXT_BYTES = 16 * 1024  # a params message; a prompt is cut to 1000 characters anyway
MAX_TOKENS = 10_000  # tokens kept at once (the oldest go first)
MAX_ANSWERS = 16  # answers of one socket not yet sent; more, and the client is not reading them: it is closed


@dataclass(frozen=True)
class SocketLimits:
    """What one socket may do; `max_bytes` is the upload cap (--max-file-size) unless told otherwise."""

    max_bytes: int = 20 * 1024 * 1024  # one message
    max_fps: float = 60.0  # frames a socket may send per second; frames above it are answered "dropped", unrun
    per_address: int = 4  # sockets open at once from one client address
    idle_s: float = 60.0  # a socket that sent no frame for this long is closed
    in_flight: int = 2  # frames unanswered at once; the page sends the next after an answer
    quality: int = 80  # JPEG quality of the frames sent down (--live-quality)
    token_s: float = 12 * 3600.0  # a page's token expires after this long (or when the page closes)


@dataclass(frozen=True)
class Ticket:
    """Who a token was issued to: a Gradio session seen from an address."""

    session: str
    address: str | None
    issued: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class FrameParams:
    prompt: str = ""
    strength: float = 0.5
    steps: int = 2
    seed: int = 0
    control: str = "off"  # a structure control the serving model has (edges, scribble, depth), or off
    control_scale: float = 1.0
    edge_low: int = CANNY_LOW
    edge_high: int = CANNY_HIGH


class LiveSockets:
    """Tokens for page sessions, the WebSocket endpoint, and how many sockets each address holds."""

    def __init__(self, app: LiveApp, limits: SocketLimits | None = None):
        self.app, self.limits = app, limits or SocketLimits()
        self._tickets: OrderedDict[str, Ticket] = OrderedDict()  # token -> its session and address
        self._tokens: dict[str, str] = {}  # session -> its token
        self._open: Counter[str | None] = Counter()  # address -> open sockets
        self._connections: dict[str, Connection] = {}  # token -> its open socket

    # ------------------------------------------------------------------ tokens (Gradio events of the page)
    def issue(self, request: gr.Request = None) -> str:
        """A page load's token (a demo.load handler): only that page's own event hears it."""
        visitor = Visitor.of(request)
        self._expire()
        token = self._tokens.get(visitor.session)
        if token is not None:  # a session's token is its first page load's, from that address only
            return token if self._tickets[token].address == visitor.address else ""
        token = secrets.token_urlsafe(24)
        self._tickets[token] = Ticket(visitor.session, visitor.address)
        self._tokens[visitor.session] = token
        while len(self._tickets) > MAX_TOKENS:
            _, ticket = self._tickets.popitem(last=False)
            self._tokens.pop(ticket.session, None)
        return token

    def revoke(self, request: gr.Request = None) -> None:
        """The page closed (demo.unload): its token stops working; an open socket ends with the session's work."""
        token = self._tokens.pop(Visitor.of(request).session, None)
        if token is not None:
            self._tickets.pop(token, None)

    def _expire(self) -> None:
        horizon = time.monotonic() - self.limits.token_s
        while self._tickets:
            token, ticket = next(iter(self._tickets.items()))
            if ticket.issued >= horizon:
                return
            del self._tickets[token]
            self._tokens.pop(ticket.session, None)

    def open_sockets(self, address: str | None) -> int:
        return self._open.get(address, 0)

    # ------------------------------------------------------------------ the socket
    def refusal(self, websocket: WebSocket) -> str | None:
        """Why this handshake is refused (None: accept): a foreign or missing Origin, an unknown token, another
        address than the page's."""
        if not same_origin(websocket.headers):
            return "origin"
        ticket = self._tickets.get(websocket.query_params.get("token", ""))
        if ticket is None or time.monotonic() - ticket.issued > self.limits.token_s:
            return "token"
        if ticket.address != client_address(websocket):
            return "address"
        return None

    async def endpoint(self, websocket: WebSocket) -> None:
        """`/live/ws`: refuse (HTTP 403) or serve one page session's frames until it closes."""
        if self.refusal(websocket) is not None:
            await websocket.close(code=1008)  # before accept: the handshake gets HTTP 403
            return
        token = websocket.query_params["token"]
        ticket, address = self._tickets[token], client_address(websocket)
        await websocket.accept()
        older = self._connections.get(token)
        if older is None and self._open[address] >= self.limits.per_address:
            message = (f"Too many live connections from your address (at most {self.limits.per_address}); close "
                       "another tab's camera and try again.")  # fmt: skip
            await _send_quietly(websocket, json.dumps(dict(type="error", message=message, fatal=True)))
            with contextlib.suppress(RuntimeError):  # the client may have gone already
                await websocket.close(code=1008)
            return
        connection = Connection(self, websocket, ticket.session, address)
        self._connections[token] = connection
        self._open[address] += 1
        try:
            if older is not None:  # one socket per page: a reconnect replaces the old one
                await older.end("This page opened a newer live connection.")
            await connection.serve()
        finally:
            self._open[address] -= 1
            if self._open[address] <= 0:
                del self._open[address]
            if self._connections.get(token) is connection:
                del self._connections[token]
                self.app.loop.forget(connection.slot)  # its pending frame goes, a running one stops at the next step
            connection.stop()


class Connection:
    """One open socket: its frames in, its results out."""

    def __init__(self, hub: LiveSockets, websocket: WebSocket, session: str, address: str | None):
        self.hub, self.websocket, self.address = hub, websocket, address
        self.limits = hub.limits
        self.slot = Visitor(session, address).slot("webcam")  # the page's webcam slot: newest frame wins
        self.params = FrameParams()
        self.frames = 0  # binary messages received: the number of the next frame
        self.newest = -1  # the newest frame submitted to the loop
        self.busy = 0  # frames received and not yet answered
        self.last_frame = time.monotonic()
        self.recent: deque[float] = deque()  # arrival times of the last second's frames
        self.tasks: set[asyncio.Task] = set()
        self._send_lock = asyncio.Lock()
        self._closed = False

    async def serve(self) -> None:
        limits = self.limits
        await self.send_json(type="ready", max_bytes=limits.max_bytes, in_flight=limits.in_flight,
                             max_fps=limits.max_fps, idle_s=limits.idle_s)  # fmt: skip
        while not self._closed:
            left = self.last_frame + limits.idle_s - time.monotonic()
            if left <= 0:
                await self.end(f"No frame for {limits.idle_s:g} s: the live connection was closed.", code=1000)
                return
            try:
                message = await asyncio.wait_for(self.websocket.receive(), timeout=left)
            except TimeoutError:
                continue
            except RuntimeError:  # the socket is gone
                return
            if message["type"] == "websocket.disconnect":
                return
            if message.get("bytes") is not None:
                self.receive_frame(message["bytes"])
            elif message.get("text") is not None:
                await self.receive_text(message["text"])

    def receive_frame(self, data: bytes) -> None:
        number, self.frames = self.frames, self.frames + 1
        now = time.monotonic()
        self.last_frame = now
        while self.recent and self.recent[0] < now - 1.0:
            self.recent.popleft()
        if len(data) > self.limits.max_bytes:
            reason = (f"The frame is {len(data) / 1e6:.1f} MB; the limit is {self.limits.max_bytes / 1e6:.1f} MB. "
                      "Send a smaller frame.")  # fmt: skip
            return self.answer_later(dict(type="error", frame=number, message=reason))
        if self.busy >= self.limits.in_flight:
            reason = f"At most {self.limits.in_flight} frames may wait for an answer; this one was dropped."
            return self.answer_later(dict(type="dropped", frame=number, reason=reason))
        if len(self.recent) >= self.limits.max_fps:
            reason = f"At most {self.limits.max_fps:g} frames a second; this one was dropped."
            return self.answer_later(dict(type="dropped", frame=number, reason=reason))
        self.recent.append(now)
        self.busy += 1
        self._spawn(self.process(number, data, self.params))

    def answer_later(self, message: dict) -> None:
        if len(self.tasks) >= MAX_ANSWERS:  # answers pile up unread: the client is not reading them
            if not self._closed:
                self._spawn(self.end("Answers were not being read: the live connection was closed."))
            self._closed = True
            return
        self._spawn(self.send_json(**message))

    def _spawn(self, coroutine) -> None:
        task = asyncio.ensure_future(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def receive_text(self, text: str) -> None:
        if len(text) > MAX_TEXT_BYTES:
            await self.send_json(type="error", message=f"A text message may be at most {MAX_TEXT_BYTES} bytes.")
            return
        try:
            message = json.loads(text)
            if not isinstance(message, dict) or message.get("type") != "params":
                raise ValueError('expected {"type": "params", ...}')
            self.params = frame_params(message, self.params)
        except (ValueError, TypeError, OverflowError) as error:
            await self.send_json(type="error", message=f"Bad message: {public_text(str(error))}")

    async def process(self, number: int, data: bytes, params: FrameParams) -> None:
        """Decode, generate, encode: one answer for frame `number` (its image, "dropped" or an error)."""
        try:
            answer = await self._generate(number, data, params)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # never the socket's end, never the server's: the visitor hears, the log keeps it
            print(f"live socket: {type(error).__name__}: {error}", file=sys.stderr)
            answer = dict(type="error", frame=number, message="The frame could not be processed; try again.")
        try:
            await (self.send(answer) if isinstance(answer, bytes) else self.send_json(**answer))
        finally:
            self.busy -= 1  # after the answer went: a client that does not read holds its places

    async def _generate(self, number: int, data: bytes, params: FrameParams) -> dict | bytes:
        try:
            image = await asyncio.to_thread(load_image, io.BytesIO(data))
        except InputError as error:
            return dict(type="error", frame=number, message=public_text(str(error)))
        if number < self.newest:  # a later frame was decoded first: it is the newest
            return dict(type="dropped", frame=number, reason="A newer frame came first.")
        self.newest = number
        request = Request(prompt=params.prompt, image=image, strength=params.strength, steps=params.steps,
                          seed=params.seed)  # fmt: skip
        app = self.hub.app
        try:  # the control image, as the Gradio stream's handler makes it (off: the request as it is)
            request, _ = await app.controlled(request, image, params.control, params.control_scale,
                                               (params.edge_low, params.edge_high))  # fmt: skip
        except gr.Error as error:
            return dict(type="error", frame=number, message=str(error.message))
        try:
            # A newer frame replaces the pending one but lets the running one finish (as the Gradio stream does).
            outcome = await app.loop.run(self.slot, request, address=self.address, preempt=False)
        except (ValueError, GenerationError) as error:
            return dict(type="error", frame=number, message=public_text(str(error)))
        if outcome == SUPERSEDED:
            return dict(type="dropped", frame=number, reason="A newer frame replaced it.")
        result, info = outcome.result, app.loop.info
        hud = hud_line(result.timings, outcome.wait_ms, app.rates.tick(self.slot), info["runtime"],
                       public_text(info["model"]))  # fmt: skip
        header = dict(type="frame", frame=number, params=result.params, hud=hud, warnings=result.warnings,
                      wait_ms=round(outcome.wait_ms, 1))  # fmt: skip
        return await asyncio.to_thread(encode_result, header, result.image, self.limits.quality)

    async def send_json(self, **message) -> None:
        await self.send(json.dumps(message, default=str))

    async def send(self, data: str | bytes) -> None:
        if self._closed:
            return
        async with self._send_lock:
            if not await _send_quietly(self.websocket, data):
                self._closed = True

    async def end(self, message: str, code: int = 1008) -> None:
        """Say why, then close."""
        await self.send_json(type="error", message=message, fatal=True)
        self._closed = True
        with contextlib.suppress(RuntimeError):  # already closed
            await self.websocket.close(code=code)

    def stop(self) -> None:
        """Stop its work: a frame waiting in the loop is cancelled (the loop drops it, or stops it at a step)."""
        self._closed = True
        for task in list(self.tasks):
            task.cancel()


async def _send_quietly(websocket: WebSocket, data: str | bytes) -> bool:
    """Send; False when the socket has gone (nothing to tell anyone)."""
    try:
        if isinstance(data, bytes):
            await websocket.send_bytes(data)
        else:
            await websocket.send_text(data)
        return True
    except Exception:  # WebSocketDisconnect, a closed transport: the page left
        return False


def frame_params(message: dict, current: FrameParams) -> FrameParams:
    """`current` with the fields `message` gives; ValueError naming a field that is not a number."""
    changes = {}
    if "prompt" in message:
        changes["prompt"] = clean_prompt(message["prompt"])
    if "control" in message:
        if not isinstance(message["control"], str) or len(message["control"]) > 32:
            raise ValueError("control must be the name of a control, or off.")
        changes["control"] = message["control"]
    for name, kind in (("strength", float), ("steps", int), ("seed", int), ("control_scale", float),
                       ("edge_low", int), ("edge_high", int)):  # fmt: skip
        if name in message:
            value = message[name]
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise ValueError(f"{name} must be a number; got {value!r}.")
            try:
                number = float(value)
            except ValueError as error:
                raise ValueError(f"{name} must be a number; got {value!r}.") from error
            if number != number or number in (float("inf"), float("-inf")):
                raise ValueError(f"{name} must be a finite number; got {value!r}.")
            changes[name] = kind(round(number)) if kind is int else number
    return replace(current, **changes)


def encode_result(header: dict, image: Image.Image, quality: int) -> bytes:
    """The binary result message: length, JSON header, JPEG (on a worker thread: a few ms at 512x512)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    meta = json.dumps(header, default=str).encode()
    return HEADER.pack(len(meta)) + meta + buffer.getvalue()


def decode_result(data: bytes) -> tuple[dict, bytes]:
    """(header, JPEG bytes) of a binary result message (clients and tests)."""
    (size,) = HEADER.unpack_from(data)
    return json.loads(data[HEADER.size : HEADER.size + size]), data[HEADER.size + size :]


def client_address(websocket: WebSocket) -> str | None:
    """The visitor's address as uvicorn gives it (behind a trusted proxy, the one it forwarded)."""
    client = websocket.client
    return getattr(client, "host", None) or None


def same_origin(headers) -> bool:
    """True when the handshake's Origin is the page's own host (Host, or X-Forwarded-Host behind a proxy).

    A browser always sends Origin with a WebSocket handshake and no page can forge it; WebSockets have no CORS,
    so this check is what keeps another site's page from opening the socket with a visitor's cookies.
    """
    origin = headers.get("origin")
    if not origin:
        return False
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False
    hosts = {headers.get("host", "")} | {h.strip() for h in headers.get("x-forwarded-host", "").split(",")[:1]}
    return parts.netloc.lower() in {h.lower() for h in hosts if h}


def attach(app: LiveApp, max_file_size: str | int | None, quality: int) -> LiveSockets:
    """Give `app` its live sockets (the page then shows the fast panel); messages capped at the upload cap."""
    from gradio.utils import _parse_file_size  # Gradio's own reading of --max-file-size

    limits = SocketLimits(quality=quality)
    cap = _parse_file_size(max_file_size)
    app.sockets = LiveSockets(app, limits if cap is None else replace(limits, max_bytes=cap))
    return app.sockets


def routes(hub: LiveSockets) -> list:
    """The WebSocket route, for the app's FastAPI constructor (Blocks.launch's app_kwargs)."""
    from starlette.routing import WebSocketRoute

    return [WebSocketRoute(ROUTE, hub.endpoint)]


PANEL = (
    '<div class="live-bar"><button class="live-start">Start camera</button> '
    '<span class="live-hud hud" id="cam-live-hud">Fast stream: press Start camera.</span></div>'
    '<div class="live-views"><video class="live-self" autoplay muted playsinline></video>'
    '<img class="live-out" id="cam-live-image" alt="Live output"></div>'
)
PANEL_CSS = """
.live-bar { display: flex; gap: 12px; align-items: center; margin-bottom: 8px; }
.live-start { padding: 6px 14px; white-space: nowrap; font-weight: 600; border-radius: 6px; border: 1px solid var(--border-color-primary); cursor: pointer; }
.live-views { display: flex; gap: 8px; }
.live-views video, .live-views img { width: 49%; max-height: 420px; object-fit: contain; background: #111; }
.live-self { transform: scaleX(-1); }
"""


def panel():
    """The webcam tab's fast-path panel (camera preview, live output, HUD) and the hidden box its token comes in."""
    gr.HTML(PANEL, css_template=PANEL_CSS, js_on_load=PAGE_JS.read_text(), elem_id="cam-live")
    return gr.Textbox("", visible="hidden", label="live token", elem_id="cam-live-token")
