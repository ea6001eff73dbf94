"""Structure control in a real browser: an outline drawn in the Sketch tab, with the scribble control on the
embedded model, puts the shape where it was drawn, and the page shows the control image."""

import time

import numpy as np
import pytest

from lcm_live.presets import PRESETS


pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not PRESETS["demo"].controls, reason="the embedded model's scribble ControlNet is not in assets/"),
]


def _shown(page, image_id: str):
    from lcm_live.pngmeta import read_params

    src = page.locator(f"#{image_id} img").first.get_attribute("src")
    if not src:
        return None, {}
    body = page.request.get(src).body()
    import io

    from PIL import Image

    return Image.open(io.BytesIO(body)).convert("RGB"), read_params(body)


def test_a_drawn_triangle_outline_puts_a_triangle_there(page, artifacts, monkeypatch):
    import lcm_live.handlers as handlers
    from lcm_live.demo_model.control import filled, iou, shape_mask
    from lcm_live.request import image_digest

    received, real = [], handlers.preprocess

    def recording(kind, image, *args, **kwargs):
        made = real(kind, image, *args, **kwargs)
        received.append(made)
        return made

    monkeypatch.setattr(handlers, "preprocess", recording)
    page.get_by_role("tab", name="Sketch").click()
    assert page.locator("#sketch-control").get_by_label("scribble").is_checked()  # the sketch's default
    page.locator("#sketch-canvas").get_by_role("button", name="Brush").click()
    canvas = page.locator("#sketch-canvas canvas").first
    canvas.wait_for(state="visible", timeout=20_000)
    box = canvas.bounding_box()
    time.sleep(0.5)
    # one stroke around a triangle in the upper left of the drawing area (the middle of the editor)
    left, top, side = box["x"] + box["width"] / 2 - box["height"] * 0.42, box["y"] + box["height"] * 0.08, box["height"] * 0.84
    corners = [(0.3, 0.12), (0.5, 0.46), (0.1, 0.46), (0.3, 0.12)]
    page.mouse.move(left + side * corners[0][0], top + side * corners[0][1])
    page.mouse.down()
    for (x0, y0), (x1, y1) in zip(corners, corners[1:]):
        for k in range(1, 9):
            page.mouse.move(left + side * (x0 + (x1 - x0) * k / 8), top + side * (y0 + (y1 - y0) * k / 8))
            time.sleep(0.02)
    page.mouse.up()
    deadline = time.monotonic() + 30
    image, params = None, {}
    while time.monotonic() < deadline:
        image, params = _shown(page, "sketch-image")
        if received and params.get("control", {}).get("image") == image_digest(received[-1]):
            break
        time.sleep(0.2)
    page.screenshot(path=str(artifacts / "sketch-control.png"), full_page=True)
    received[-1].save(artifacts / "sketch-control-received.png")
    image.save(artifacts / "sketch-control-result.png")
    assert params["mode"] == "txt2img" and params["control"]["kind"] == "scribble"
    assert params["control"]["image"] == image_digest(received[-1])
    drawn = filled(np.asarray(received[-1])[..., 0] > 127)
    ys, xs = np.nonzero(drawn)
    assert xs.mean() < drawn.shape[1] / 2 and ys.mean() < drawn.shape[0] / 2  # drawn in the upper left
    overlap = iou(shape_mask(image.resize(drawn.shape[::-1]), "yellow"), drawn)
    assert overlap >= 0.7, f"IoU {overlap:.2f}"
    assert page.locator("#sketch-control-image img").count() == 1  # the control image is shown
