"""The live socket (/live/ws) on the launched app: who may open it, what bad frames get, whose frames come back."""

import io
import json
import time
from urllib.parse import urlsplit

import pytest
from PIL import Image

from lcm_live.bench.page_client import QueueSession
from lcm_live.stream import FrameParams, LiveSockets, decode_result, frame_params, same_origin


websockets = pytest.importorskip("websockets.sync.client")
websockets_exceptions = pytest.importorskip("websockets.exceptions")
InvalidStatus = websockets_exceptions.InvalidStatus


def jpeg(color, size=(160, 120)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="JPEG")
    return buffer.getvalue()


def token_for(url: str, address: str | None = None) -> str:
    """A page session's token, as the page gets it at load (an event of its own Gradio session)."""
    session = QueueSession(url, address=address)
    try:
        message = session.call("live_token", [])
    finally:
        session.close()
    assert message["success"], message
    return message["output"]["data"][0]


def open_socket(url: str, token: str | None, origin: str | None = None, address: str | None = None):
    host = urlsplit(url).netloc
    query = f"?token={token}" if token is not None else ""
    headers = {"X-Forwarded-For": address} if address else None
    return websockets.connect(f"ws://{host}/live/ws{query}", origin=origin or f"http://{host}",
                              additional_headers=headers, open_timeout=10)  # fmt: skip


def receive(ws, timeout: float = 30.0):
    """The next message: a dict for JSON, (header, jpeg) for a result frame."""
    message = ws.recv(timeout=timeout)
    return decode_result(message) if isinstance(message, bytes) else json.loads(message)


def result(ws, timeout: float = 60.0):
    """The next result frame's (header, jpeg), skipping "dropped" answers; fails on an error."""
    deadline = time.monotonic() + timeout
    while True:
        message = receive(ws, max(0.1, deadline - time.monotonic()))
        if isinstance(message, tuple):
            return message
        assert message["type"] == "dropped", message


@pytest.fixture
def url(live_server):
    return live_server[0]


def test_a_socket_needs_the_pages_origin_and_token(url):
    token = token_for(url)
    with pytest.raises(InvalidStatus) as refused:  # another site's page, with the visitor's token
        open_socket(url, token, origin="https://evil.example")
    assert refused.value.response.status_code == 403
    for wrong in (None, "guessed-token", token[:-2] + "xx"):
        with pytest.raises(InvalidStatus):
            open_socket(url, wrong)
    with pytest.raises(InvalidStatus):  # the token is its page's address's, not another's
        open_socket(url, token, address="203.0.113.9")
    with open_socket(url, token) as ws:
        assert receive(ws)["type"] == "ready"


def test_bad_frames_get_a_message_and_the_socket_lives(url):
    token = token_for(url)
    with open_socket(url, token) as ws:
        assert receive(ws)["type"] == "ready"
        ws.send(b"\x00" * (2 * 1024 * 1024 + 10))  # the app's upload cap is 2 MB
        oversize = receive(ws)
        assert oversize["type"] == "error" and oversize["frame"] == 0 and "limit is 2.1 MB" in oversize["message"]
        ws.send(b"GIF89a not really")
        malformed = receive(ws)
        assert malformed["type"] == "error" and malformed["frame"] == 1 and "not" in malformed["message"]
        ws.send("{not json")
        assert receive(ws)["type"] == "error"
        ws.send(json.dumps({"type": "params", "steps": "many"}))
        assert "steps must be a number" in receive(ws)["message"]
        ws.send(json.dumps({"type": "params", "steps": 99}))  # accepted here, refused with the frame that uses it
        ws.send(jpeg((10, 200, 10)))
        refused = receive(ws)
        assert refused["type"] == "error" and refused["frame"] == 2 and "steps must be" in refused["message"]
        ws.send(json.dumps({"type": "params", "prompt": "a green field", "steps": 2, "strength": 0.5, "seed": 7}))
        ws.send(jpeg((10, 200, 10)))
        header, image = result(ws)
    assert header["frame"] == 3
    params = header["params"]
    assert (params["prompt"], params["steps"], params["seed"], params["strength"]) == ("a green field", 2, 7, 0.5)
    assert params["mode"] == "img2img" and params["input"] and params["model"]
    assert "ms" in header["hud"]
    assert Image.open(io.BytesIO(image)).size == (params["width"], params["height"])


def test_one_address_holds_at_most_its_cap_of_sockets(url, live_server):
    address = "198.51.100.77"
    cap = live_server[1].sockets.limits.per_address
    sockets = [open_socket(url, token_for(url, address), address=address) for _ in range(cap)]
    try:
        for ws in sockets:
            assert receive(ws)["type"] == "ready"
        with open_socket(url, token_for(url, address), address=address) as extra:
            refusal = receive(extra)
            assert refusal["type"] == "error" and refusal["fatal"] and f"at most {cap}" in refusal["message"]
        with open_socket(url, token_for(url, "198.51.100.78"), address="198.51.100.78") as other:
            assert receive(other)["type"] == "ready"  # another address is not affected
    finally:
        for ws in sockets:
            ws.close()


def test_two_sessions_never_see_each_others_frames(url):
    first, second = open_socket(url, token_for(url)), open_socket(url, token_for(url))
    try:
        for ws, prompt in ((first, "first session"), (second, "second session")):
            assert receive(ws)["type"] == "ready"
            ws.send(json.dumps({"type": "params", "prompt": prompt, "steps": 2, "seed": 1}))
        for _ in range(3):  # both streaming at once
            first.send(jpeg((200, 0, 0)))
            second.send(jpeg((0, 0, 200)))
            assert result(first)[0]["params"]["prompt"] == "first session"
            assert result(second)[0]["params"]["prompt"] == "second session"
    finally:
        first.close()
        second.close()


def test_closing_the_socket_stops_its_work(url, live_server):
    app = live_server[1]
    token = token_for(url)
    slot = f"{app.sockets._tickets[token].session}:webcam"
    with open_socket(url, token) as ws:
        assert receive(ws)["type"] == "ready"
        ws.send(json.dumps({"type": "params", "prompt": "leaving", "steps": 4, "strength": 1.0}))
        ws.send(jpeg((90, 90, 90)))
        deadline = time.monotonic() + 10
        while app.loop.latest_seq(slot) == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert app.loop.latest_seq(slot) == 1  # the frame reached the loop
    deadline = time.monotonic() + 10
    while app.loop.latest_seq(slot) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert app.loop.latest_seq(slot) == 0  # the slot was forgotten: its work stopped, nothing is kept for it


def test_a_flood_is_answered_frame_by_frame_and_dropped_at_the_door(url):
    with open_socket(url, token_for(url)) as ws:
        assert receive(ws)["type"] == "ready"
        ws.send(json.dumps({"type": "params", "prompt": "flood", "steps": 4, "strength": 1.0}))
        frame = jpeg((120, 60, 30))
        for _ in range(8):  # a client that does not wait for answers
            ws.send(frame)
        answers = {}
        while len(answers) < 8:
            message = receive(ws)
            header = message[0] if isinstance(message, tuple) else message
            assert header["frame"] not in answers  # one answer per frame
            answers[header["frame"]] = header
    assert sorted(answers) == list(range(8))
    kinds = [answers[n]["type"] for n in range(8)]
    assert "frame" in kinds and any("may wait for an answer" in a.get("reason", "") for a in answers.values())


def test_an_idle_socket_is_closed_with_a_message(url, live_server):
    from dataclasses import replace

    hub = live_server[1].sockets
    limits = hub.limits
    token = token_for(url)
    hub.limits = replace(limits, idle_s=0.5)
    try:
        ws = open_socket(url, token)
        assert receive(ws)["type"] == "ready"  # sent by the connection, which took the limits it was opened with
    finally:
        hub.limits = limits
    with ws:
        closing = receive(ws, timeout=10)
        assert closing["type"] == "error" and closing["fatal"] and "No frame for 0.5 s" in closing["message"]
        with pytest.raises(websockets_exceptions.ConnectionClosed):
            ws.recv(timeout=10)


def test_the_socket_is_an_operator_setting():
    from lcm_live.settings import Settings

    settings = Settings.from_args(["--no-live-socket", "--live-quality", "60"], environ={})
    assert settings.live_socket is False and settings.live_quality == 60
    assert Settings.from_args([], environ={"LCM_LIVE_LIVE_SOCKET": "false"}).live_socket is False
    with pytest.raises(SystemExit):
        Settings.from_args(["--live-quality", "0"], environ={})


def test_a_sessions_token_is_its_first_address_only():
    from types import SimpleNamespace

    def request(session, host):
        return SimpleNamespace(session_hash=session, client=SimpleNamespace(host=host), request=None)

    hub = LiveSockets(app=None)
    token = hub.issue(request("page1", "192.0.2.1"))
    assert token and hub.issue(request("page1", "192.0.2.1")) == token  # the same page asking again
    assert hub.issue(request("page1", "192.0.2.66")) == ""  # someone else naming that session gets nothing
    assert hub.issue(request("page2", "192.0.2.66")) not in ("", token)
    hub.revoke(request("page1", "192.0.2.1"))
    assert token not in hub._tickets


def test_frame_params_and_origin_checks():
    params = frame_params({"prompt": "a\x00b", "steps": "3", "seed": 2.0}, FrameParams())
    assert (params.prompt, params.steps, params.seed) == ("a b", 3, 2)
    for bad in ({"seed": float("nan")}, {"strength": [1]}, {"steps": True}):
        with pytest.raises(ValueError):
            frame_params(bad, params)
    assert same_origin({"origin": "http://app.example:7860", "host": "app.example:7860"})
    assert same_origin({"origin": "https://space.hf.space", "host": "10.0.0.5:7860", "x-forwarded-host": "space.hf.space"})
    assert not same_origin({"origin": "http://evil.example", "host": "app.example"})
    assert not same_origin({"host": "app.example"})
    assert not same_origin({"origin": "null", "host": "app.example"})


def test_a_socket_frame_takes_the_pages_structure_control(url, live_server):
    """The Control choice reaches the socket's frames as the Gradio stream's: the control is in the image's
    parameters; a control the model does not have is off; a bad scale gets a message and the socket lives."""
    if "scribble" not in live_server[1].controls():
        pytest.skip("the embedded model ships without its scribble ControlNet")
    from PIL import ImageDraw

    drawing = Image.new("RGB", (160, 120), "white")
    ImageDraw.Draw(drawing).rectangle((40, 30, 110, 90), outline="black", width=4)
    buffer = io.BytesIO()
    drawing.save(buffer, format="JPEG")
    outline = buffer.getvalue()
    with open_socket(url, token_for(url)) as ws:
        assert receive(ws)["type"] == "ready"
        ws.send(json.dumps({"type": "params", "prompt": "a red circle", "steps": 2, "control": "scribble",
                            "control_scale": 1.0}))  # fmt: skip
        ws.send(outline)
        header, _ = result(ws)
        assert header["params"]["control"]["kind"] == "scribble"
        ws.send(json.dumps({"type": "params", "control": "scribble", "control_scale": 9}))
        ws.send(outline)
        refused = receive(ws)
        assert refused["type"] == "error" and "control" in refused["message"].lower(), refused
        ws.send(json.dumps({"type": "params", "control": "unknown-kind", "control_scale": 1}))
        ws.send(jpeg("white"))
        header, _ = result(ws)
        assert "control" not in header["params"]
