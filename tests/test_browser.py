"""The page in a real browser (Debian's chromium through Playwright): typing, sliders, upload, webcam."""

import time

import pytest
from PIL import Image

from lcm_live.pngmeta import read_params


pytestmark = pytest.mark.browser


def shown_params(page, image_id: str) -> dict:
    """The generation parameters inside the PNG the page currently shows in `image_id`."""
    src = page.locator(f"#{image_id} img").first.get_attribute("src")
    if not src:
        return {}
    return read_params(page.request.get(src).body())


def wait_for_params(page, image_id: str, want: dict, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    params = {}
    while time.monotonic() < deadline:
        params = shown_params(page, image_id)
        if all(params.get(k) == v for k, v in want.items()):
            return params
        time.sleep(0.1)
    raise AssertionError(f"{image_id} still shows {params}, expected {want}")


def test_typing_key_by_key_ends_on_the_final_prompt(page, artifacts):
    box = page.locator("#t2i-prompt textarea")
    box.click()
    box.press("Control+A")
    box.press("Delete")
    final = "a small green square on the right, red background"
    box.press_sequentially(final, delay=70)  # ~14 characters a second, a fast typist
    params = wait_for_params(page, "t2i-image", {"prompt": final})
    time.sleep(1.0)  # nothing older may replace it afterwards
    assert shown_params(page, "t2i-image")["prompt"] == final
    assert params["steps"] == 4
    assert "ms" in page.locator("#t2i-hud").inner_text()
    assert "embedded demo model" in page.locator("#model-status").inner_text()  # the offline note is visible
    page.screenshot(path=str(artifacts / "txt2img.png"), full_page=True)


def test_dragging_a_slider_ends_on_its_final_value(page, artifacts):
    slider = page.locator("#t2i-steps input[type=range]")
    box = slider.bounding_box()
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] * 0.5, y)
    page.mouse.down()
    for fraction in (0.6, 0.75, 0.9, 0.2, 0.05):  # right, then back to the left end
        page.mouse.move(box["x"] + box["width"] * fraction, y, steps=5)
    page.mouse.up()
    value = int(page.locator("#t2i-steps input[type=number]").input_value())
    assert value == 1
    wait_for_params(page, "t2i-image", {"steps": value})
    time.sleep(1.0)
    assert shown_params(page, "t2i-image")["steps"] == value
    page.screenshot(path=str(artifacts / "slider.png"), full_page=True)


def test_uploading_an_image_runs_image_to_image(page, artifacts, tmp_path):
    picture = tmp_path / "upload.png"
    Image.new("RGB", (160, 120), (30, 144, 255)).save(picture)
    page.get_by_role("tab", name="Image to image").click()
    page.locator("#i2i-input input[type=file]").set_input_files(str(picture))
    params = wait_for_params(page, "i2i-image", {"mode": "img2img"})
    assert params["width"] > params["height"]  # the upload's aspect is kept
    page.locator("#i2i-prompt textarea").fill("a red circle")
    wait_for_params(page, "i2i-image", {"mode": "img2img", "prompt": "a red circle"})
    page.screenshot(path=str(artifacts / "img2img.png"), full_page=True)


def test_webcam_streams_over_the_live_socket_and_follows_the_prompt(page, live_server, artifacts):
    """The fast path: the page captures the fake camera, sends JPEG frames over /live/ws and shows each result."""
    page.get_by_role("tab", name="Webcam").click()
    page.locator("#cam-live .live-start").click()
    page.wait_for_function("window.lcmLive && window.lcmLive.mode === 'socket' && window.lcmLive.shown >= 5",
                           timeout=30_000)  # fmt: skip
    assert page.locator("#cam-input").is_hidden()  # the Gradio stream is only the fallback
    assert page.locator("#cam-live-image").get_attribute("src").startswith("blob:")
    assert "fps shown" in page.locator("#cam-live-hud").inner_text()
    page.locator("#cam-prompt textarea").fill("a blue square in the rain")
    page.wait_for_function("window.lcmLive.params.prompt === 'a blue square in the rain'", timeout=30_000)
    shown = page.evaluate("window.lcmLive.shown")
    page.wait_for_function(f"window.lcmLive.shown >= {shown + 5}", timeout=30_000)  # frames keep coming
    assert page.evaluate("window.lcmLive.params.mode") == "img2img"
    page.screenshot(path=str(artifacts / "webcam-socket.png"), full_page=True)
    sockets = live_server[1].sockets
    assert sockets.open_sockets("127.0.0.1") == 1
    page.close()  # closing the tab ends the socket, and with it the session's webcam work
    deadline = time.monotonic() + 10
    while sockets.open_sockets("127.0.0.1") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sockets.open_sockets("127.0.0.1") == 0


def test_webcam_falls_back_to_the_gradio_stream_when_the_socket_is_refused(page, artifacts):
    page.route_web_socket("**/live/ws*", lambda ws: ws.close())  # a proxy that lets no WebSocket through
    page.get_by_role("tab", name="Webcam").click()
    page.locator("#cam-live .live-start").click()
    page.wait_for_function("window.lcmLive.mode === 'fallback'", timeout=20_000)
    assert "Fast stream unavailable" in page.locator("#cam-live-hud").inner_text()
    page.locator("#cam-input").get_by_text("Click to Access Webcam").click()
    page.locator("#cam-input video").wait_for(state="visible", timeout=20_000)
    page.locator("#cam-input").get_by_role("button").filter(has_text="Record").or_(
        page.locator("#cam-input button[aria-label*='ecord']")
    ).first.click()
    seen = set()
    deadline = time.monotonic() + 30
    while len(seen) < 4 and time.monotonic() < deadline:
        src = (
            page.locator("#cam-image img").first.get_attribute("src")
            if page.locator("#cam-image img").count()
            else None
        )
        if src:
            seen.add(src)
        time.sleep(0.1)
    assert len(seen) >= 4, f"only {len(seen)} distinct output frames arrived"
    params = shown_params(page, "cam-image")
    assert params["mode"] == "img2img"
    page.screenshot(path=str(artifacts / "webcam.png"), full_page=True)


def test_sketch_repaints_on_every_stroke_and_ends_on_the_final_canvas(page, artifacts, monkeypatch):
    """Strokes drawn with the mouse; the final image's parameters carry the digest of the last canvas received."""
    import lcm_live.inputs as inputs
    from lcm_live.request import image_digest

    received, load = [], inputs.load_image

    def recording(source):
        image = load(source)
        received.append(image_digest(image))
        return image

    monkeypatch.setattr(inputs, "load_image", recording)  # the handler decodes each canvas it receives
    page.get_by_role("tab", name="Sketch").click()
    page.locator("#sketch-control").get_by_label("off").check()  # the canvas as image-to-image input
    page.locator("#sketch-canvas").get_by_role("button", name="Brush").click()
    canvas = page.locator("#sketch-canvas canvas").first
    canvas.wait_for(state="visible", timeout=20_000)
    box = canvas.bounding_box()
    time.sleep(0.5)
    for i in range(4):  # four strokes on the drawing area (the middle of the editor), each a separate drag
        x, y = box["x"] + box["width"] * 0.38, box["y"] + box["height"] * (0.3 + 0.12 * i)
        page.mouse.move(x, y)
        time.sleep(0.1)
        page.mouse.down()
        for k in range(1, 5):  # moved in a few steps, not teleported (the editor uploads the canvas as it changes)
            page.mouse.move(x + 30 * k, y + 8 * k)
            time.sleep(0.05)
        page.mouse.up()
        time.sleep(1.5)  # a person's pause between strokes
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (received and shown_params(page, "sketch-image").get("input") == received[-1]):
        time.sleep(0.2)
    time.sleep(1.0)  # nothing older may replace it afterwards
    params = shown_params(page, "sketch-image")
    assert len(set(received)) >= 3, f"{len(set(received))} distinct canvases reached the server"
    assert params["mode"] == "img2img" and params["input"] == received[-1]
    assert "ms" in page.locator("#sketch-hud").inner_text()
    page.screenshot(path=str(artifacts / "sketch.png"), full_page=True)
    page.locator("#sketch-clear").click()  # the canvas empties; the last image stays
    time.sleep(0.5)
    assert shown_params(page, "sketch-image")["input"] == received[-1]
