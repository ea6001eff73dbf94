"""The OpenAI-style images API of the launched app, called with the official `openai` client (and raw HTTP for what
that client cannot send)."""

import base64
import io
import os

import httpx
import pytest
from PIL import Image

from lcm_live.pngmeta import read_params


openai = pytest.importorskip("openai")
pytestmark = pytest.mark.app

KEY = "sk-lcm-live-test"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app with --openai-api and --api-key, on the embedded model; yields its /v1 base URL."""
    os.environ.setdefault("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio-cache")))
    from app import close, launch
    from lcm_live.settings import Settings
    from tests.conftest import _free_port

    settings = Settings(preset="demo", offline=True, port=_free_port(), max_file_size="1mb", openai_api=True,
                        api_key=KEY)  # fmt: skip
    demo, app = launch(settings, prevent_thread_lock=True)
    yield f"http://127.0.0.1:{settings.port}/v1"
    demo.close()
    close(app)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server, api_key=KEY, max_retries=0, timeout=120)


def _png_bytes(size=(96, 64), color="orange") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_generation_as_base64_keeps_its_parameters(client):
    response = client.images.generate(prompt="a red circle", size="64x64", response_format="b64_json",
                                      extra_body={"seed": 7, "steps": 2})  # fmt: skip
    png = base64.b64decode(response.data[0].b64_json)
    params = read_params(png)
    assert Image.open(io.BytesIO(png)).size == (64, 64) and response.created > 0
    assert params["prompt"] == "a red circle" and params["seed"] == 7 and params["steps"] == 2
    assert params["mode"] == "txt2img"


def test_two_images_as_urls_have_consecutive_seeds(client, server):
    response = client.images.generate(prompt="two", n=2, size="64x64", response_format="url",
                                      extra_body={"seed": 11, "steps": 1, "negative_prompt": "blur"})  # fmt: skip
    assert len(response.data) == 2
    images = [httpx.get(item.url, timeout=30) for item in response.data]
    assert [r.headers["content-type"] for r in images] == ["image/png", "image/png"]
    assert [read_params(r.content)["seed"] for r in images] == [11, 12]
    assert httpx.get(f"{server}/files/../../etc/passwd").status_code == 404


def test_edit_is_image_to_image(client):
    response = client.images.edit(image=("in.png", _png_bytes(), "image/png"), prompt="a blue square",
                                  extra_body={"strength": 0.6, "steps": 4, "seed": 3})  # fmt: skip
    params = read_params(base64.b64decode(response.data[0].b64_json))
    assert params["mode"] == "img2img" and params["strength"] == 0.6 and params["prompt"] == "a blue square"
    assert params["width"] > params["height"]  # the input's aspect, fitted to the model's size


def test_models_lists_the_app(client):
    assert [model.id for model in client.models.list()] == ["lcm-live"]


def test_a_wrong_or_missing_key_is_401(server):
    wrong = openai.OpenAI(base_url=server, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        wrong.images.generate(prompt="x", size="64x64")
    assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"
    assert httpx.get(f"{server}/models").json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    "fields, param, words",
    [
        ({"size": "100x3"}, "size", "multiple of 8"),
        ({"size": "big"}, "size", "WIDTHxHEIGHT"),
        ({"size": "2048x2048"}, "size", "pixel-steps"),
        ({"n": 9}, "n", "from 1 to 4"),
        ({"response_format": "jpeg"}, "response_format", "b64_json or url"),
        ({"steps": 50}, "steps", "from 1 to 8"),
    ],
)
def test_bad_fields_are_400_naming_the_field(client, fields, param, words):
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.generate(prompt="x", **{k: v for k, v in fields.items() if k != "steps"},
                               extra_body={"steps": fields["steps"]} if "steps" in fields else None)  # fmt: skip
    assert refused.value.status_code == 400 and refused.value.param == param
    assert words in refused.value.message


def test_a_non_image_upload_is_400(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.edit(image=("notes.png", b"just some text", "image/png"), prompt="x")
    assert refused.value.param == "image" and "not an image" in refused.value.message


def test_malformed_calls_get_openai_errors_not_500s(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    cases = [
        httpx.post(f"{server}/images/generations", json={"prompt": 123}, headers=headers),
        httpx.post(f"{server}/images/generations", json={}, headers=headers),
        httpx.post(f"{server}/images/generations", content=b"{not json", headers=headers),
        httpx.post(f"{server}/images/generations", json=["a list"], headers=headers),
        httpx.post(f"{server}/images/edits", data={"prompt": "x"}, headers=headers),
        httpx.post(f"{server}/images/variations", json={}, headers=headers),
    ]
    assert [r.status_code for r in cases] == [400, 400, 400, 400, 400, 404]
    for response in cases:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and "Traceback" not in error["message"]
    assert cases[0].json()["error"]["param"] == "prompt" and cases[0].json()["error"]["code"] == "invalid_type"
    assert cases[1].json()["error"]["code"] == "missing_required_parameter"


def test_an_upload_over_the_limit_is_413_and_the_server_keeps_serving(client, server):
    headers = {"Authorization": f"Bearer {KEY}"}
    big = {"image": ("big.png", os.urandom(1_200_000), "image/png")}
    response = httpx.post(f"{server}/images/edits", files=big, data={"prompt": "x"}, headers=headers)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    huge = httpx.post(f"{server}/images/generations", json={"prompt": "x" * 1_100_000}, headers=headers)
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"
    assert client.images.generate(prompt="still here", size="64x64").data[0].b64_json
