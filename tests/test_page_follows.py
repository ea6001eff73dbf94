"""The page follows the serving model: after a switch its load and status tick give the new model's steps,
guidance and example prompt (where the visitor has not typed), and the webcam keeps the model's pace."""

import os

import pytest

from lcm_live.handlers import DEMO_PROMPT, PACE_SLACK, PHOTO_PROMPT, FramePacer


pytestmark = pytest.mark.app


@pytest.fixture(scope="module")
def own_server(tmp_path_factory):
    """The app launched on the embedded model, its own (this module switches its model)."""
    import socket

    os.environ.setdefault("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio-cache")))
    from gradio_client import Client

    from app import launch
    from lcm_live.settings import Settings

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo, app = launch(Settings(preset="demo", offline=True, port=port), prevent_thread_lock=True)
    yield Client(f"http://127.0.0.1:{port}/", verbose=False), app
    demo.close()
    app.loop.close()


def test_the_page_takes_the_new_models_steps_guidance_and_prompt(own_server, tiny_models):
    from lcm_live.presets import ModelSpec, Recipe

    client, app = own_server
    untouched, typed = DEMO_PROMPT, "my own words"
    loaded = client.predict(untouched, typed, untouched, untouched, api_name="/page_load")
    # [width, height, steps (text, image, webcam, sketch), guidance, prompts (the same four)]; states are not sent
    assert _values(loaded[2:7]) == [4, 4, 2, 4, 1.0]  # the embedded model: 4 steps, no guidance
    assert _values(loaded[7:11]) == [DEMO_PROMPT, None, DEMO_PROMPT, DEMO_PROMPT]  # None: left as the visitor typed

    paths = tiny_models["sd15"]
    one_step = Recipe("one-step", "LCMScheduler", steps=1, guidance_scale=1.5)
    assert app.manager.switch(ModelSpec(paths["base"], paths["lora"], recipe=one_step))
    app.manager.wait(60)
    assert app.loop.info["steps"] == 1 and app.manager.status.error is None

    ticked = client.predict(untouched, typed, untouched, untouched, api_name="/page_status")
    # [status, width, height, steps x4, guidance, prompts x4]
    assert _values(ticked[3:8]) == [1, 2, 2, 2, 1.5]  # the recipe's 1 step; image tabs at least 2; guidance 1.5
    assert _values(ticked[8:12]) == [PHOTO_PROMPT, None, PHOTO_PROMPT, PHOTO_PROMPT]
    assert all(update["placeholder"] == PHOTO_PROMPT for update in ticked[8:12])
    again = client.predict(untouched, typed, untouched, untouched, api_name="/page_status")
    assert _values(again[3:12]) == [None] * 9  # this page follows the new model already: nothing reset twice
    assert _values(client.predict(untouched, typed, untouched, untouched, api_name="/page_load")[2:7]) == [
        1, 2, 2, 2, 1.5]  # fmt: skip  # a new page load too


def _values(updates) -> list:
    return [update.get("value") if isinstance(update, dict) else update for update in updates]


def test_webcam_frames_are_paced_to_the_model():
    pacer = FramePacer()
    assert pacer.admit("a:webcam", 10.0)
    assert not pacer.admit("a:webcam", 10.0)  # sooner than the model makes frames: dropped
    assert pacer.admit("b:webcam", 10.0)  # each visitor keeps their own pace
    assert pacer.admit("a:webcam", 0.0) and PACE_SLACK < 1.0  # a faster model lets the next one through
