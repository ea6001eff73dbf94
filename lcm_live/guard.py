"""The bounds on every request, before Gradio's routes or a handler see it (an ASGI middleware).

Gradio's routes are part of what a visitor reaches: its upload route, its event queue, its component functions.
Here each request is held to: a body size; a per-address upload quota and a count of files per upload; a cap on
one address's events waiting in Gradio's queue (so one client cannot fill it for everyone); a length for every
text value of an event (checked before Gradio copies inputs into the session's state); events of this app with
their number of values; known endpoints for `/call/`. A request that fails inside a route gets a 400 with a short
message and one log line, never a 500 with a traceback.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import defaultdict, deque
from dataclasses import dataclass


log = logging.getLogger("lcm_live.guard")

API = "/gradio_api"
SMALL_BODY = 64 * 1024  # an event body below this cannot hold an over-long text value: not parsed here
LARGE_BODIES = 4  # bodies over SMALL_BODY (or of unknown length) one address may be sending at once
BODY_METHODS = ("POST", "PUT", "PATCH")
_CALL = re.compile(rf"^{API}/call/([^/]+)(?:/[^/]*)?/?$")
_EVENT = re.compile(rf"^{API}/(queue/join|run/[^/]+|api/[^/]+)/?$")  # bodies naming an event: fn_index, data
MAX_SESSION_CHARS = 64


@dataclass(frozen=True)
class Bounds:
    max_body: int  # bytes in any request body
    max_text_chars: int  # characters in any text value of an event (a prompt); longer ones are refused
    upload_quota: int  # bytes one address may upload (files and sketch blobs) per window
    upload_window_s: float
    max_files: int  # files in one upload request
    address_events: int  # one address's events waiting in Gradio's queue (for a place under a concurrency limit)
    verbose: bool = False  # log full tracebacks of requests that fail inside a route


class Refused(Exception):
    """A request the guard turns away; `status` and `message` are what the client gets."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class UploadQuota:
    """Bytes uploaded per address over a sliding window."""

    def __init__(self, quota: int, window_s: float):
        self.quota, self.window_s = quota, window_s
        self._spent: dict[str, deque[tuple[float, int]]] = defaultdict(deque)

    def used(self, address: str) -> int:
        spent, cutoff = self._spent[address], time.monotonic() - self.window_s
        while spent and spent[0][0] < cutoff:
            spent.popleft()
        if not spent:
            del self._spent[address]
            return 0
        return sum(size for _, size in spent)

    def charge(self, address: str, size: int) -> None:
        self._spent[address].append((time.monotonic(), size))

    def addresses(self) -> int:
        return len(self._spent)


def long_text(value, limit: int, key: str | None = None) -> int:
    """The length of the longest text value past `limit` in an event's data (file references aside), else 0."""
    if isinstance(value, str):
        return len(value) if len(value) > limit and key not in ("url", "path") else 0
    if isinstance(value, dict):
        return max((long_text(v, limit, k) for k, v in value.items()), default=0)
    if isinstance(value, list):
        return max((long_text(v, limit) for v in value), default=0)
    return 0


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


class RequestGuard:
    """ASGI middleware: see the module's docstring. `blocks` is the Gradio app (its queue and endpoints)."""

    def __init__(self, app, bounds: Bounds, blocks=None):
        self.app, self.bounds, self.blocks = app, bounds, blocks
        self.quota = UploadQuota(bounds.upload_quota, bounds.upload_window_s)
        self._joining: defaultdict[str, int] = defaultdict(int)  # address -> joins being handled
        self._large: defaultdict[str, int] = defaultdict(int)  # address -> large bodies being received

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_checked(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if message["status"] >= 500:  # a route's own 500: the client sent something it could not handle
                    log.warning("%s %s: answered %s, sent as 400", scope["method"], scope["path"], message["status"])
                    message = {**message, "status": 400}
            await send(message)

        large = None  # the address holding one of its large-body places
        try:
            # A body up to max_body may be read whole into memory (a JSON event, a sketch blob): an address sends
            # a few of those at a time, so that many at once cannot add up past the server's memory.
            if self._is_large(scope):
                large = self._hold_large(_address(scope))
            receive = await self._admit(scope, receive)
            await self.app(scope, receive, send_checked)
        except Refused as refusal:
            if started:
                raise
            log.info("%s %s from %s refused: %s", scope["method"], scope["path"], _address(scope), refusal.message)
            await _answer(send, refusal.status, refusal.message, scope["path"])
        except Exception as error:
            if started:
                raise
            log.warning("%s %s from %s failed: %s", scope["method"], scope["path"], _address(scope),
                        type(error).__name__, exc_info=self.bounds.verbose)  # fmt: skip
            await _answer(send, 400, "Malformed request.", scope["path"])
        finally:
            if large is not None:
                self._large[large] -= 1
                if self._large[large] <= 0:
                    del self._large[large]
            if scope.get("lcm_live_joining"):
                self._joining[scope["lcm_live_joining"]] -= 1
                if self._joining[scope["lcm_live_joining"]] <= 0:
                    del self._joining[scope["lcm_live_joining"]]

    @staticmethod
    def _is_large(scope) -> bool:
        if scope["method"] not in BODY_METHODS:
            return False
        length = _header(scope, b"content-length")
        return not (length and length.isdigit() and int(length) <= SMALL_BODY)

    def _hold_large(self, address: str) -> str:
        if self._large[address] >= LARGE_BODIES:
            raise Refused(429, f"Too many large requests at once from your address (at most {LARGE_BODIES}); "
                               "wait for one to finish.")  # fmt: skip
        self._large[address] += 1
        return address

    async def _admit(self, scope, receive):
        """The receive callable the app gets, counting and bounding the body; Refused for what is not admitted."""
        path, method, address = scope["path"], scope["method"], _address(scope)
        call = _CALL.match(path)
        if call and self.blocks is not None and call.group(1) not in self._endpoints():
            raise Refused(404, f"There is no endpoint named {call.group(1)[:40]!r}.")
        if method not in BODY_METHODS:
            return receive
        length = _header(scope, b"content-length")
        declared = int(length) if length and length.isdigit() else None
        if declared is not None and declared > self.bounds.max_body:
            raise Refused(413, f"The request is {declared} bytes; the limit is {self.bounds.max_body}.")
        uploading = path.endswith(("/upload", "/component_server", "/component_server/"))
        if uploading and self.quota.used(address) + (declared or 0) > self.bounds.upload_quota:
            minutes = self.bounds.upload_window_s / 60
            raise Refused(429, f"Your address has uploaded its share ({self.bounds.upload_quota} bytes per "
                               f"{minutes:.0f} minutes); try again later.")  # fmt: skip
        counted = self._counting(receive, address if uploading else None, _boundary(scope) if uploading else None)
        json_body = (_header(scope, b"content-type") or "").startswith("application/json")
        event = _EVENT.match(path) is not None
        if json_body and (event or declared is None or declared > SMALL_BODY):
            return await self._checked_json(counted, scope if event else None)
        return counted

    def _check_events(self, address: str) -> None:
        queue = getattr(self.blocks, "_queue", None)
        if queue is None:
            return
        waiting = self._joining[address]  # joins of this address not yet in the queue
        for events in queue.event_queue_per_concurrency_id.values():
            waiting += sum(_address_of(event) == address for event in events.queue)
        if waiting >= self.bounds.address_events:
            raise Refused(429, f"Too many requests waiting from your address (at most {self.bounds.address_events}); "
                               "wait for some to finish.")  # fmt: skip

    def _counting(self, receive, charged: str | None, boundary: bytes | None):
        """`receive`, refusing a body past the size limit, and for uploads past the quota or the file count."""
        total, files, tail = 0, 0, b""
        bounds, quota = self.bounds, self.quota

        async def counted():
            nonlocal total, files, tail
            message = await receive()
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > bounds.max_body:
                raise Refused(413, f"The request is over {bounds.max_body} bytes.")
            if charged is not None:
                quota.charge(charged, len(chunk))
                if quota.used(charged) > bounds.upload_quota:
                    raise Refused(429, "Your address has uploaded its share; try again later.")
            if boundary:
                window = tail + chunk
                files += window.count(boundary) - tail.count(boundary)
                tail = window[-len(boundary):]
                if files - 1 > bounds.max_files:  # the last delimiter closes the body
                    raise Refused(413, f"At most {bounds.max_files} files may be sent at once.")
            return message

        return counted

    async def _checked_json(self, receive, event_scope: dict | None):
        """Read a JSON body whole (it is within max_body), refuse over-long text values and, for an event (its
        `event_scope`), one that names no event of this app or gives it the wrong number of values, or a join past
        its address's waiting places; replay it."""
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return _replay([message], receive)
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            value = json.loads(body)
        except ValueError:
            value = None  # not JSON: the route says so
        longest = long_text(value, self.bounds.max_text_chars)
        if longest:
            raise Refused(413, f"A text value is {longest} characters long; the limit is "
                               f"{self.bounds.max_text_chars}.")  # fmt: skip
        if event_scope is not None and isinstance(value, dict) and self.blocks is not None:
            fn = self._check_event(value)
            if fn is not None and event_scope["path"].endswith("/queue/join") and self._may_wait(fn):
                address = _address(event_scope)
                self._check_events(address)
                event_scope["lcm_live_joining"] = address  # counted as waiting until the join is answered
                self._joining[address] += 1
        return _replay([{"type": "http.request", "body": body, "more_body": False}], receive)

    def _may_wait(self, fn) -> bool:
        """Whether `fn`'s events can wait in Gradio's queue: only those under a concurrency limit do."""
        limit = fn.concurrency_limit
        if limit == "default":
            limit = getattr(getattr(self.blocks, "_queue", None), "default_concurrency_limit", None)
        return limit is not None

    def _check_event(self, body: dict):
        """The event an event body names (None: named by api_name); Refused(400) for a body Gradio would fail on
        with a 500 and a traceback."""
        session = body.get("session_hash")
        if session is not None and (not isinstance(session, str) or not 0 < len(session) <= MAX_SESSION_CHARS):
            raise Refused(400, f"session_hash must be text of 1 to {MAX_SESSION_CHARS} characters.")
        index = body.get("fn_index")
        if index is None:
            return None  # named by api_name, or not at all: Gradio answers with a 4xx of its own
        fns = getattr(self.blocks, "fns", {})
        if isinstance(index, bool) or not isinstance(index, int) or index not in fns:
            raise Refused(400, "fn_index names no event of this app.")
        data = body.get("data")
        if not isinstance(data, list) or len(data) != len(fns[index].inputs):
            raise Refused(400, f"This event takes {len(fns[index].inputs)} input values.")
        return fns[index]

    def _endpoints(self) -> set[str]:
        names = set()
        for fn in getattr(self.blocks, "fns", {}).values():
            if fn.api_name and getattr(fn, "api_visibility", "public") != "private":
                names.add(fn.api_name)
        return names


def _replay(messages: list, then):
    """A receive callable that gives `messages` first, then what `then` gives (a disconnect, when it comes)."""
    pending = list(messages)

    async def receive():
        if pending:
            return pending.pop(0)
        return await then()

    return receive


def _boundary(scope) -> bytes | None:
    content_type = _header(scope, b"content-type") or ""
    found = re.search(r"boundary=\"?([^\";]+)", content_type)
    return b"--" + found.group(1).encode("latin-1") if found else None


def _address(scope) -> str:
    client = scope.get("client")
    return client[0] if client else "unknown"


def _address_of(event) -> str | None:
    client = getattr(getattr(event, "request", None), "client", None)
    return getattr(client, "host", None)


OPENAI_CODES = {413: "request_too_large", 429: "rate_limit_exceeded", 404: "unknown_url"}


async def _answer(send, status: int, message: str, path: str = "") -> None:
    if path.startswith("/v1/"):  # the OpenAI-style API's clients read errors in its shape (lcm_live/openai_api.py)
        kind = "requests" if status == 429 else "invalid_request_error"
        error = {"message": message, "type": kind, "param": None, "code": OPENAI_CODES.get(status, "invalid_request")}
        body = json.dumps({"error": error}).encode()
    else:
        body = json.dumps({"detail": message, "error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})
