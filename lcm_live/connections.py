"""Connections the server accepts: a deadline for each request's headers, and a cap per client address.

Uvicorn closes a connection that sends nothing after a response (`timeout_keep_alive`) but waits for ever on one
that sends half a request's headers (slowloris): 20,000 of those used up the process's file descriptors. Here each
connection must complete a request's headers within `header_timeout_s` of opening, and of each response; and one
address may hold at most `per_address` connections. Addresses of trusted proxies are not capped (on a Space every
visitor arrives through them; the proxy bounds its own clients).

Gradio starts uvicorn itself; `guarded_server(...)` makes the server that `Blocks.launch` starts use this protocol.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float  # seconds to complete a request's headers, from connecting or from the last response
    per_address: int  # open connections from one address (not counted for trusted proxies)
    trusted: str = "127.0.0.1,::1"  # FORWARDED_ALLOW_IPS: addresses and networks, or "*"


class AddressTable:
    """Open connections per address, and which addresses are trusted proxies."""

    def __init__(self, limits: ConnectionLimits):
        self.limits = limits
        self.open: Counter[str] = Counter()
        entries = [e.strip() for e in limits.trusted.split(",") if e.strip()]
        self.trust_all = "*" in entries
        self.networks = []
        for entry in entries:
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                continue  # a host name: uvicorn matches those literally; nothing to cap by

    def trusted(self, address: str) -> bool:
        if self.trust_all:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.networks)

    def admit(self, address: str | None) -> bool:
        if address is None or self.trusted(address):
            return True
        if self.open[address] >= self.limits.per_address:
            return False
        self.open[address] += 1
        return True

    def release(self, address: str) -> None:
        self.open[address] -= 1
        if self.open[address] <= 0:
            del self.open[address]


def guarded_protocol(base: type, table: AddressTable) -> type:
    """A subclass of uvicorn's HTTP protocol `base` that applies `table`'s cap and the headers deadline."""

    class GuardedProtocol(base):
        def connection_made(self, transport):
            super().connection_made(transport)
            peer = transport.get_extra_info("peername")
            address = peer[0] if isinstance(peer, (tuple, list)) and peer else None
            self._counted = address if address is not None and not table.trusted(address) else None
            self._headers_deadline = None
            if not table.admit(address):
                self._counted = None
                transport.close()
                return
            self._arm()

        def connection_lost(self, exc):
            if self._headers_deadline is not None:
                self._headers_deadline.cancel()
            if self._counted is not None:
                table.release(self._counted)
                self._counted = None
            super().connection_lost(exc)

        def handle_websocket_upgrade(self, *args, **kwargs):
            """The connection becomes a WebSocket (its own protocol, its own limits in lcm_live/stream.py): the
            headers deadline and this protocol's count end here, as this object will hear no connection_lost."""
            if self._headers_deadline is not None:
                self._headers_deadline.cancel()
                self._headers_deadline = None
            if self._counted is not None:
                table.release(self._counted)
                self._counted = None
            return super().handle_websocket_upgrade(*args, **kwargs)

        def on_response_complete(self):
            super().on_response_complete()
            self._arm()

        def _arm(self):
            """Close the connection unless a new request's headers are complete within the deadline."""
            if self._headers_deadline is not None:
                self._headers_deadline.cancel()
            self._headers_deadline = self.loop.call_later(table.limits.header_timeout_s, self._overdue, self.cycle)

        def _overdue(self, cycle_then):
            self._headers_deadline = None
            if self.cycle is cycle_then and not self.transport.is_closing():
                self.transport.close()

    GuardedProtocol.__name__ = f"Guarded{base.__name__}"
    return GuardedProtocol


@contextmanager
def guarded_server(limits: ConnectionLimits):
    """While open, the uvicorn server that Gradio's launch starts uses the guarded protocol."""
    from gradio import http_server
    from uvicorn.config import Config

    table = AddressTable(limits)
    started = http_server.Server

    class GuardedServer(started):
        def __init__(self, config: Config, *args, **kwargs):
            if not config.loaded:
                config.load()  # resolves the HTTP protocol class ("auto": httptools if installed, else h11)
            config.http_protocol_class = guarded_protocol(config.http_protocol_class, table)
            super().__init__(config, *args, **kwargs)

    GuardedServer.connections = table
    http_server.Server = GuardedServer
    try:
        yield table
    finally:
        http_server.Server = started
