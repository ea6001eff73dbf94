"""The launched app on the embedded model, through gradio_client (as an API user would call it)."""

import io

import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from lcm_live.pngmeta import read_params


pytestmark = pytest.mark.app


def _png(tmp_path, name="input.png", size=(96, 64), color="orange", mode="RGB"):
    path = tmp_path / name
    Image.new(mode, size, color).save(path)
    return str(path)


def test_named_endpoints_are_listed(client):
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert set(endpoints) == {"/txt2img", "/img2img", "/webcam_frame", "/step_sweep"}  # no /load_model by default


def test_txt2img_returns_a_png_with_its_parameters(client):
    path = client.predict("a red circle", "", 4, 1.0, 7, 64, 64, api_name="/txt2img")
    params = read_params(path)
    assert Image.open(path).format == "PNG" and Image.open(path).size == (64, 64)
    assert params["prompt"] == "a red circle" and params["seed"] == 7 and params["steps"] == 4
    assert params["mode"] == "txt2img" and params["scheduler"] == "LCMScheduler()" and params["recipe"] == "lcm"


def test_same_parameters_give_the_same_image(client):
    a = client.predict("same", "", 4, 1.0, 3, 64, 64, api_name="/txt2img")
    b = client.predict("same", "", 4, 1.0, 3, 64, 64, api_name="/txt2img")
    assert Image.open(a).tobytes() == Image.open(b).tobytes()


def test_img2img_and_webcam_frame(client, tmp_path):
    source = handle_file(_png(tmp_path))
    i2i = read_params(client.predict(source, "a blue square", 0.6, 4, 1, api_name="/img2img"))
    assert i2i["mode"] == "img2img" and i2i["strength"] == 0.6 and i2i["prompt"] == "a blue square"
    frame = read_params(client.predict(source, "webcam", 0.5, 2, 1, api_name="/webcam_frame"))
    assert frame["mode"] == "img2img" and frame["steps"] == 2 and frame["width"] > frame["height"]


def test_step_sweep_is_one_grid(client):
    path = client.predict("sweep", "", 1.0, 1337, 64, 64, api_name="/step_sweep")
    params = read_params(path)
    assert params["steps"] == list(range(1, 9)) and params["seed"] == 1337
    assert Image.open(path).width >= 4 * 64


@pytest.mark.parametrize(
    "args, message",
    [
        (("x", "", 100, 1.0, 0, 64, 64), "greater than maximum value 8"),
        (("x", "", 4, 1.0, 0, 10, 64), "less than minimum value 64"),
        (("x", "", 4, 9.0, 0, 64, 64), "greater than maximum value 2"),
        (("x", "", 4, 1.0, 0, 100, 64), "width must be a multiple of 8"),
    ],
)
def test_out_of_range_numbers_are_refused_with_the_bound(client, args, message):
    with pytest.raises(Exception, match=message):
        client.predict(*args, api_name="/txt2img")


def test_odd_images_are_converted(client, tmp_path):
    for mode, color in (("RGBA", (255, 0, 0, 128)), ("LA", (100, 50)), ("L", 128), ("CMYK", (0, 255, 0, 0))):
        name = f"odd-{mode}.{'jpg' if mode == 'CMYK' else 'png'}"
        path = tmp_path / name
        Image.new(mode, (80, 64), color).save(path)
        params = read_params(client.predict(handle_file(str(path)), "odd", 0.5, 2, 0, api_name="/img2img"))
        assert params["mode"] == "img2img"


def test_corrupt_image_gets_a_clear_error_and_the_server_keeps_serving(client, tmp_path):
    broken = tmp_path / "broken.png"
    good = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(good, format="PNG")
    broken.write_bytes(good.getvalue()[:60])
    with pytest.raises(AppError, match="not a readable image"):  # the client's error type, the server's message
        client.predict(handle_file(str(broken)), "x", 0.5, 2, 0, api_name="/img2img")
    assert read_params(client.predict("still serving", "", 2, 1.0, 0, 64, 64, api_name="/txt2img"))["steps"] == 2


def test_long_prompt_is_cut_and_still_returns_an_image(client):
    path = client.predict("word " * 4000, "", 2, 1.0, 0, 64, 64, api_name="/txt2img")
    assert len(read_params(path)["prompt"]) <= 1000


def test_model_status_reports_the_embedded_model(live_server):
    _, app = live_server
    text = app.manager.status_markdown()
    assert "embedded demo model" in text


def test_api_defaults_give_the_native_size(client, live_server):
    _, app = live_server
    params = read_params(client.predict("defaults", api_name="/txt2img"))
    native = app.loop.info["native_size"]
    assert (params["width"], params["height"], params["steps"], params["seed"]) == (native, native, 4, 0)
