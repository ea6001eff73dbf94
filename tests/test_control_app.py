"""Control through the launched app: the image tab's control turns the input into the control image the model sees
(shown beside the result), and a bad control request gets one clear message while the app keeps serving."""

import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from PIL import Image, ImageDraw

from lcm_live.pngmeta import read_params
from lcm_live.presets import PRESETS


pytestmark = pytest.mark.skipif(not PRESETS["demo"].controls, reason="the embedded model's ControlNet is not in assets/")


@pytest.fixture
def drawing(tmp_path):
    path = tmp_path / "outline.png"
    image = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(image).rectangle((34, 34, 58, 58), outline="black", width=2)
    image.save(path)
    return handle_file(str(path))


def test_image_tab_with_scribble_control_shows_the_control_image(client, drawing):
    path, hud, control = client.predict(drawing, "a red square, blue background", 0.6, 4, 1, "scribble", 1.2, 100,
                                        200, api_name="/live_img2img")  # fmt: skip
    params = read_params(path)
    assert params["mode"] == "img2img" and params["control"]["kind"] == "scribble"
    assert params["control"]["scale"] == 1.2 and "ms" in hud
    shown = Image.open(control).convert("L")
    assert shown.getpixel((46, 34)) == 255 and shown.getpixel((5, 5)) == 0  # the outline, white on black


def test_control_off_runs_without_it(client, drawing):
    path, _, control = client.predict(drawing, "a red square", 0.6, 4, 1, "off", 1.0, 100, 200,
                                     api_name="/live_img2img")
    assert "control" not in read_params(path) and control is None


def test_a_control_strength_out_of_range_gets_one_clear_message(client, drawing):
    with pytest.raises(AppError, match="Value 2.5 is greater than maximum value 2") as refused:  # the slider's bound
        client.predict(drawing, "x", 0.6, 4, 1, "scribble", 2.5, 100, 200, api_name="/live_img2img")
    assert "Traceback" not in str(refused.value)
    path, _, _ = client.predict(drawing, "still serving", 0.6, 4, 1, "scribble", 1.0, 100, 200,
                                 api_name="/live_img2img")
    assert read_params(path)["prompt"] == "still serving"


def test_the_pages_edge_thresholds_reach_the_edge_detector():
    """The handler makes the control image with the page's thresholds (a faint square: found at 10-30, not 300-600)."""
    import asyncio
    from types import SimpleNamespace

    import numpy as np

    from lcm_live.handlers import LiveApp
    from lcm_live.live import Limits
    from lcm_live.request import Request

    loop = SimpleNamespace(info={"controls": ["edges"], "native_size": 64, "model": "m"}, limits=Limits())
    app = LiveApp(SimpleNamespace(), loop)
    faint = Image.new("RGB", (64, 64), (40, 40, 40))
    ImageDraw.Draw(faint).rectangle((16, 16, 47, 47), fill=(70, 70, 70))
    request = Request(prompt="x", image=faint)
    low, shown = asyncio.run(app.controlled(request, faint, "edges", 1.0, (10, 30)))
    assert low.control == "edges" and low.control_image is shown and np.asarray(shown).any()
    _, none_found = asyncio.run(app.controlled(request, faint, "edges", 1.0, (300, 600)))
    assert not np.asarray(none_found).any()
    unchanged, nothing = asyncio.run(app.controlled(request, faint, "depth", 1.0, (10, 30)))  # not loaded: off
    assert unchanged is request and nothing is None
