"""Who is asking, and how much of the server they may hold: sessions, addresses, one-shot calls, disconnects.

A visitor is a Gradio session (a page load, or one API client) seen from a client address. The live loop caps
the jobs of each (`live.Limits`); here the one-shot calls (the API endpoints, the step sweep) also share a few
places in the loop, waiting in this process rather than in Gradio's queue, so one address's burst can neither
fill that queue for everyone nor crowd the loop's turns. A call whose client went away is cancelled: Gradio
removes a disconnected client's queued events but lets a running handler go on.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections import Counter
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

from gradio.context import LocalContext

from .request import RequestRefused


GONE = "gone"  # what a call resolves to when its client disconnected before the result
GONE_POLL_S = 0.2  # how often a waiting call looks whether its client is still there


@dataclass(frozen=True)
class Visitor:
    session: str  # the Gradio session hash (one per page load or API client); a fresh id when there is none
    address: str | None  # the client's address (behind a trusted proxy, the one it forwarded); None: unknown
    one_off: bool = False  # a session of one call (`/call/<endpoint>`, or no session at all): nothing to keep

    @classmethod
    def of(cls, request) -> Visitor:
        """The visitor behind a gr.Request (None: a direct call, e.g. from a test)."""
        session = getattr(request, "session_hash", None)
        client = getattr(request, "client", None) if request is not None else None
        url = getattr(getattr(request, "request", None), "url", None)
        if (getattr(request, "headers", None) or {}).get("x-gradio-user") == "mcp":
            session = None  # Gradio's MCP server calls through one client (one session) for every agent
        one_off = session is None or "/call/" in getattr(url, "path", "")  # /call/ makes a session per call
        session = (session or f"api-{uuid.uuid4().hex}").replace(":", "_")
        return cls(session, getattr(client, "host", None) or None, one_off)

    def slot(self, tab: str) -> str:
        """The session's newest-wins slot for `tab` (the live loop reads the session before the colon)."""
        return f"{self.session}:{tab}"


class OneShotGate:
    """One-shot calls take turns for `places` places in the live loop, at most `address_places` of them one
    address's; the others wait here, at most `per_address` per address (waiting or running): past that a call is
    refused at once, so it never holds a place in Gradio's queue. Used from Gradio's event loop only."""

    def __init__(self, places: int, per_address: int, address_places: int = 2):
        self.places, self.per_address, self.address_places = places, per_address, address_places
        self._turns: asyncio.Condition | None = None
        self._held: Counter[str] = Counter()  # address -> calls waiting or running
        self._running: Counter[str | None] = Counter()  # address -> calls in the loop

    def _free_for(self, address: str | None) -> bool:
        mine = self._running[address] < self.address_places or address is None
        return sum(self._running.values()) < self.places and mine

    @asynccontextmanager
    async def enter(self, visitor: Visitor):
        address = visitor.address
        if address is not None and self._held[address] >= self.per_address:
            raise RequestRefused(
                f"Too many requests at once from your address (at most {self.per_address}); wait for one to finish."
            )
        if self._turns is None:
            self._turns = asyncio.Condition()
        if address is not None:
            self._held[address] += 1
        try:
            async with self._turns:
                await self._turns.wait_for(lambda: self._free_for(address))
                self._running[address] += 1
            try:
                yield
            finally:
                async with self._turns:
                    self._running[address] -= 1
                    if self._running[address] <= 0:
                        del self._running[address]
                    self._turns.notify_all()
        finally:
            if address is not None:
                self._held[address] -= 1
                if self._held[address] <= 0:
                    del self._held[address]

    def held(self, address: str) -> int:
        return self._held.get(address, 0)


def current_event():
    """Gradio's queue event being handled; None outside a queued event."""
    blocks, event_id = LocalContext.blocks.get(None), LocalContext.event_id.get(None)
    events = getattr(getattr(blocks, "_queue", None), "event_ids_to_events", None)
    return events.get(event_id) if event_id and isinstance(events, dict) else None


async def while_connected(awaitable):
    """Await `awaitable`; cancel it and return GONE once the client that sent the current event disconnects.

    Cancelling the live loop's future makes it drop the job unrun, or stop it at the next step if running.
    """
    event = current_event()
    task = asyncio.ensure_future(awaitable)
    if event is None:
        return await task
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=GONE_POLL_S)
            if done:
                return task.result()
            if not getattr(event, "alive", True):
                task.cancel()
                return GONE
    except asyncio.CancelledError:
        task.cancel()
        raise


class AddressShare:
    """At most `per_address` things at once per client address (image decodes, webcam streams); past that a
    RequestRefused at once. Thread-safe: decodes run on worker threads."""

    def __init__(self, per_address: int, what: str):
        self.per_address, self.what = per_address, what
        self._held: Counter[str | None] = Counter()
        self._lock = threading.Lock()

    @contextmanager
    def hold(self, address: str | None):
        with self._lock:
            if address is not None and self._held[address] >= self.per_address:
                raise RequestRefused(
                    f"Too many {self.what} at once from your address (at most {self.per_address}); "
                    "wait for one to finish."
                )
            self._held[address] += 1
        try:
            yield
        finally:
            with self._lock:
                self._held[address] -= 1
                if self._held[address] <= 0:
                    del self._held[address]

    def held(self, address: str | None) -> int:
        with self._lock:
            return self._held.get(address, 0)
