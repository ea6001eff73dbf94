"""The request and connection bounds as plain objects: no server, no torch (the launched app: test_hostile_visitors)."""

import asyncio
import json

import pytest

from lcm_live.connections import AddressTable, ConnectionLimits
from lcm_live.guard import Bounds, RequestGuard, UploadQuota, long_text


pytestmark = pytest.mark.unit

BOUNDS = Bounds(max_body=1000, max_text_chars=10, upload_quota=100, upload_window_s=60, max_files=2,
                address_events=2)  # fmt: skip


def test_long_text_ignores_file_references():
    assert long_text(["short", {"path": "p" * 50, "url": "data:" + "u" * 50}], 10) == 0
    assert long_text(["short", {"meta": "m" * 11}], 10) == 11
    assert long_text([[["x" * 12]]], 10) == 12
    assert long_text([1, 2.5, None, True], 10) == 0


def test_the_upload_quota_is_per_address_and_forgets_the_window():
    quota = UploadQuota(100, window_s=0.0)
    quota.charge("a", 90)
    assert quota.used("a") == 0 and quota.addresses() == 0  # a window of 0 s forgets at once
    quota = UploadQuota(100, window_s=60)
    quota.charge("a", 90)
    assert quota.used("a") == 90 and quota.used("b") == 0


def test_connections_are_capped_per_address_except_for_trusted_proxies():
    table = AddressTable(ConnectionLimits(header_timeout_s=1, per_address=2, trusted="10.0.0.0/8,::1"))
    assert table.admit("1.2.3.4") and table.admit("1.2.3.4") and not table.admit("1.2.3.4")
    assert all(table.admit("10.1.2.3") for _ in range(10)) and table.admit("::1")
    table.release("1.2.3.4")
    assert table.admit("1.2.3.4")
    assert AddressTable(ConnectionLimits(1, 1, trusted="*")).trusted("8.8.8.8")


def run(guard, method, path, body=b"", headers=()):
    """(status, JSON body) of one request through `guard` in front of an app that answers 200 (or raises)."""
    sent = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "client": ("9.9.9.9", 1),
             "headers": [(k.encode(), v.encode()) for k, v in headers]}  # fmt: skip
    asyncio.run(guard(scope, receive, send))
    status = sent[0]["status"]
    payload = b"".join(m.get("body", b"") for m in sent[1:])
    return status, json.loads(payload) if payload else None


async def ok_app(scope, receive, send):
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


async def failing_app(scope, receive, send):
    raise KeyError("fn_index")


def test_the_guard_refuses_big_bodies_long_texts_and_turns_failures_into_400():
    guard = RequestGuard(ok_app, BOUNDS)
    big = run(guard, "POST", "/gradio_api/upload", b"x" * 1001, [("content-length", "1001")])
    assert big[0] == 413 and "limit is 1000" in big[1]["detail"]
    text = json.dumps({"data": ["x" * 11]}).encode()
    assert run(guard, "POST", "/gradio_api/run/predict", text, [("content-type", "application/json")])[0] == 413
    assert run(guard, "POST", "/gradio_api/run/predict", b'{"data": ["ok"]}',
               [("content-type", "application/json")])[0] == 200  # fmt: skip
    failed = run(RequestGuard(failing_app, BOUNDS), "POST", "/gradio_api/queue/join", b"{}")
    assert failed == (400, {"detail": "Malformed request.", "error": "Malformed request."})
    openai = run(guard, "POST", "/v1/images/generations", b"x" * 1001, [("content-length", "1001")])
    assert openai[0] == 413 and openai[1]["error"]["code"] == "request_too_large"


def test_the_guard_counts_files_and_an_address_quota_in_uploads():
    bounds = Bounds(max_body=1000, max_text_chars=10, upload_quota=400, upload_window_s=60, max_files=2,
                    address_events=2)  # fmt: skip
    guard = RequestGuard(ok_app, bounds)
    boundary = "b0undary"
    part = f"--{boundary}\r\nContent-Disposition: form-data; name=files; filename=a\r\n\r\nx\r\n"
    body = (part * 3 + f"--{boundary}--\r\n").encode()
    headers = [("content-type", f"multipart/form-data; boundary={boundary}")]
    many = run(guard, "POST", "/gradio_api/upload", body, headers)
    assert many[0] == 413 and "At most 2 files" in many[1]["detail"]
    two = (part * 2 + f"--{boundary}--\r\n").encode()  # ~170 bytes
    guard = RequestGuard(ok_app, bounds)
    statuses = [run(guard, "POST", "/gradio_api/upload", two, headers)[0] for _ in range(3)]
    assert statuses == [200, 200, 429], statuses  # 400 bytes per window for this address


def test_an_address_sends_a_few_large_bodies_at_a_time():
    """Each body up to max_body may be held whole in memory: a fifth large one at once from one address is refused
    at once, another address's and a small one are not, and a finished one frees its place."""
    release = asyncio.Event()

    async def slow_app(scope, receive, send):
        await receive()
        await release.wait()
        await ok_app(scope, _replayed, send)

    async def _replayed():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def request(guard, address, size):
        sent = []

        async def receive():
            return {"type": "http.request", "body": b"x" * size, "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/gradio_api/upload", "client": (address, 1),
                 "headers": [(b"content-length", str(size).encode())]}  # fmt: skip
        await guard(scope, receive, send)
        return sent[0]["status"]

    async def scenario():
        bounds = Bounds(max_body=10**6, max_text_chars=10, upload_quota=10**8, upload_window_s=60, max_files=2,
                        address_events=2)  # fmt: skip
        guard = RequestGuard(slow_app, bounds)
        large = 100 * 1024
        held = [asyncio.ensure_future(request(guard, "1.1.1.1", large)) for _ in range(4)]
        await asyncio.sleep(0.05)
        refused = await asyncio.wait_for(request(guard, "1.1.1.1", large), 5)  # refused at once, not held
        other = asyncio.ensure_future(request(guard, "2.2.2.2", large))
        small = asyncio.ensure_future(request(guard, "1.1.1.1", 100))
        await asyncio.sleep(0.05)
        release.set()
        statuses = await asyncio.gather(*held, other, small)
        again = await request(guard, "1.1.1.1", large)
        return refused, statuses, again

    refused, statuses, again = asyncio.run(scenario())
    assert refused == 429 and statuses == [200] * 6 and again == 200
