"""The app's tools over MCP (--mcp): the `mcp` package's client against the launched app, and the guard in front."""

import asyncio
import base64
import io
import os
from types import SimpleNamespace

import httpx
import pytest
from PIL import Image

from lcm_live.mcp_server import McpGuard
from lcm_live.pngmeta import read_params
from lcm_live.visitors import Visitor


KEY = "mcp-test-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app with --mcp and --api-key on the embedded model; yields its MCP URL (streamable HTTP)."""
    pytest.importorskip("mcp")
    os.environ.setdefault("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio-cache")))
    from app import close, launch
    from lcm_live.settings import Settings
    from tests.conftest import _free_port

    settings = Settings(preset="demo", offline=True, port=_free_port(), mcp=True, api_key=KEY)
    demo, app = launch(settings, prevent_thread_lock=True)
    yield f"http://127.0.0.1:{settings.port}/gradio_api/mcp/"
    demo.close()
    close(app)


def _session(url: str, calls):
    """Connect with the key, run `calls(session)` and return what it returns."""
    from mcp import ClientSession
    from mcp.client.streamable_http import streamablehttp_client

    async def run():
        headers = {"Authorization": f"Bearer {KEY}"}
        async with streamablehttp_client(url, headers=headers) as (read, write, _), ClientSession(read, write) as session:
            await session.initialize()
            return await calls(session)

    return asyncio.run(run())


def _png_params(result) -> tuple[Image.Image, dict]:
    """The image a tool returned, and the parameters of the PNG its URL serves."""
    content = {item.type: item for item in result.content}
    image = Image.open(io.BytesIO(base64.b64decode(content["image"].data)))
    url = content["text"].text.removeprefix("Image URL: ")
    return image, read_params(httpx.get(url, timeout=30).content)


@pytest.mark.app
def test_tools_are_listed_with_descriptions(server):
    tools = _session(server, lambda session: session.list_tools()).tools
    by_name = {tool.name: tool for tool in tools}
    assert {"api_txt2img", "api_img2img", "api_step_sweep"} <= set(by_name)
    txt2img = by_name["api_txt2img"]
    assert "text prompt" in txt2img.description
    assert "1 to 8" in txt2img.inputSchema["properties"]["steps"]["description"]
    assert by_name["api_img2img"].inputSchema["required"] == ["image"]


@pytest.mark.app
def test_txt2img_and_img2img_tools_return_images_with_their_parameters(server):
    buffer = io.BytesIO()
    Image.new("RGB", (96, 64), "orange").save(buffer, format="PNG")
    source = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    async def calls(session):
        made = await session.call_tool("api_txt2img", {"prompt": "a red circle", "seed": 5, "steps": 2, "width": 64,
                                                       "height": 64})  # fmt: skip
        edited = await session.call_tool("api_img2img", {"image": source, "prompt": "blue", "strength": 0.6})
        return made, edited

    made, edited = _session(server, calls)
    assert not made.isError and not edited.isError
    image, params = _png_params(made)
    assert image.size == (64, 64) and params["prompt"] == "a red circle" and params["seed"] == 5
    assert params["steps"] == 2 and params["mode"] == "txt2img"
    _, params = _png_params(edited)
    assert params["mode"] == "img2img" and params["strength"] == 0.6


@pytest.mark.app
def test_bad_tool_calls_are_tool_errors_and_the_server_keeps_serving(server):
    async def calls(session):
        missing = await session.call_tool("api_img2img", {"prompt": "no image"})
        wrong = await session.call_tool("api_txt2img", {"prompt": "x", "steps": 50})
        fine = await session.call_tool("api_txt2img", {"prompt": "still here", "width": 64, "height": 64})
        return missing, wrong, fine

    missing, wrong, fine = _session(server, calls)
    assert missing.isError and "image" in missing.content[0].text
    assert wrong.isError and "Traceback" not in wrong.content[0].text
    assert not fine.isError


@pytest.mark.app
def test_the_key_is_required(server):
    response = httpx.post(server, json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    assert response.status_code == 401 and "API key" in response.json()["error"]
    wrong = httpx.post(server, json={}, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401


def test_the_guard_names_the_callers_address_for_the_loopback_call():
    seen = {}

    async def inner(scope, receive, send):
        seen.update(dict(scope["headers"]))

    guard = McpGuard(inner)
    scope = {"type": "http", "path": "/gradio_api/mcp/", "client": ("203.0.113.9", 5000),
             "headers": [(b"x-forwarded-for", b"1.2.3.4"), (b"accept", b"*/*")]}  # fmt: skip
    asyncio.run(guard(scope, None, None))
    assert seen[b"x-forwarded-for"] == b"203.0.113.9" and seen[b"accept"] == b"*/*"
    seen.clear()
    asyncio.run(guard({**scope, "path": "/gradio_api/queue/join"}, None, None))  # other routes: untouched
    assert seen[b"x-forwarded-for"] == b"1.2.3.4"


def test_each_mcp_call_is_a_visitor_of_its_own():
    """Gradio's MCP server calls the endpoints through one client (one session) for every agent."""
    request = SimpleNamespace(session_hash="shared", client=SimpleNamespace(host="203.0.113.9"), request=None,
                              headers={"x-gradio-user": "mcp"})  # fmt: skip
    first, second = Visitor.of(request), Visitor.of(request)
    assert first.one_off and first.session != second.session and first.address == "203.0.113.9"
    assert not Visitor.of(SimpleNamespace(**{**vars(request), "headers": {}})).one_off
