"""MCP (--mcp): the app's API endpoints as the tools of Gradio's built-in MCP server, for agents.

Gradio serves the tools at /gradio_api/mcp/ (streamable HTTP) and /gradio_api/mcp/sse (SSE), described from the API
handlers' docstrings (handlers.LiveApp.api_*), and runs each call through a client of its own that calls the
endpoint on this server, with the MCP request's headers. So a tool call meets the same limits as an API call: its
own session (visitors.Visitor.of knows that client), the one-shot gate, the address's caps. The guard here checks the
bearer key, when one is set, and names the caller's address (as uvicorn resolved it, trusted proxies included) in the
headers that loopback call carries, in place of whatever X-Forwarded-For the caller sent. No torch here.
"""

from __future__ import annotations

import hmac
import json
import re


MCP_PATH = re.compile(r"/gradio_api/mcp(/|$)")


def check_installed() -> None:
    """SystemExit naming the install command when Gradio's MCP extra is missing."""
    try:
        import mcp  # noqa: F401
    except ImportError as error:
        raise SystemExit(f'lcm-live: --mcp needs Gradio\'s MCP extra ({error}): pip install "gradio[mcp]"') from error


class McpGuard:
    """ASGI middleware on the MCP routes: the bearer key (when set), and the caller's address for the loopback call."""

    def __init__(self, app, api_key: str | None = None):
        self.app, self.api_key = app, api_key or None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not MCP_PATH.search(scope.get("path", "")):
            return await self.app(scope, receive, send)
        headers = [(name, value) for name, value in scope["headers"] if name != b"x-forwarded-for"]
        if self.api_key is not None and not self._authorized(dict(headers).get(b"authorization", b"")):
            return await _refuse(send)
        client = scope.get("client")
        if client:
            headers.append((b"x-forwarded-for", str(client[0]).encode()))
        await self.app({**scope, "headers": headers}, receive, send)

    def _authorized(self, header: bytes) -> bool:
        scheme, _, token = header.decode("latin-1").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())


async def _refuse(send) -> None:
    body = json.dumps({"error": "A valid API key is required: send `Authorization: Bearer <key>`."}).encode()
    await send({"type": "http.response.start", "status": 401,
                "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})
