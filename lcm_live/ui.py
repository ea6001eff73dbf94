"""The page: four live tabs (text, image, webcam, sketch), a HUD, the API endpoints, and a model picker only where the
operator allows visitors to switch. No torch here; the handlers are in handlers.py.

Every widget change is sent at once (`trigger_mode="multiple"`), so the server hears new input while a
generation runs; the live loop drops or stops stale work and only the newest request's image is shown.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import gradio as gr
from gradio.context import LocalContext

from . import stream
from .control import CANNY_HIGH, CANNY_LOW
from .handlers import DEMO_PROMPT, PHOTO_PROMPT, LiveApp  # noqa: F401  (the example prompts, named here too)
from .inputs import ImageUpload
from .presets import ASSETS, PRESETS, preset_choices
from .request import (
    MAX_CONTROL_SCALE,
    MAX_GUIDANCE,
    MAX_SEED,
    MAX_SIZE,
    MAX_STEPS,
    MAX_STRENGTH,
    MIN_CONTROL_SCALE,
    MIN_GUIDANCE,
    MIN_SIZE,
    MIN_STEPS,
    MIN_STRENGTH,
    SIZE_STEP,
)
from .uploads import SketchBlobs, bound_sketchpad, refuse_web_addresses


CSS = """
.live-image img { image-rendering: pixelated; object-fit: contain; }
.hud { font-family: ui-monospace, monospace; font-size: 0.85em; }
"""


def image_input(**options) -> gr.Image:
    """A gr.Image whose preprocess is ours: an `inputs.ImageUpload` that the handler decodes (inputs.load_image:
    upright RGB at the working size, or a clear message) once it knows the visitor and their share.

    Gradio's own preprocess decodes a data: URL at full size, with no size limit, and re-encodes some uploads
    before any check; a file that is not an image came back as a long internal message naming the component.
    An http(s) address is refused rather than downloaded. (Set on the instance: a gr.Image subclass makes
    Gradio write a .pyi stub next to this file.)
    """
    component = gr.Image(**options)
    component.preprocess = _preprocess_image
    return refuse_web_addresses(component)


def _preprocess_image(payload):
    if payload is None:
        return None
    blocks = LocalContext.blocks.get(None)
    return ImageUpload(payload.path, payload.url, getattr(blocks, "max_file_size", None))


def _checked_examples(examples: gr.Examples) -> gr.Examples:
    """`examples` whose dataset refuses an index it does not have with a message (Gradio's own: an IndexError)."""
    dataset = examples.dataset
    preprocess = dataset.preprocess

    def checked(payload):
        if not isinstance(payload, int) or not 0 <= payload < len(dataset.samples):
            raise gr.Error("There is no such example.", print_exception=False)
        return preprocess(payload)

    dataset.preprocess = checked
    return examples


def examples() -> list[str]:
    return sorted(str(p) for p in (ASSETS / "examples").glob("*.png"))


def _steps(value: int, elem_id: str) -> gr.Slider:
    return gr.Slider(MIN_STEPS, MAX_STEPS, value, step=1, precision=0, label="Steps", elem_id=elem_id)


def _seed(elem_id: str) -> gr.Number:
    return gr.Number(0, label="Seed", precision=0, minimum=0, maximum=MAX_SEED, elem_id=elem_id)


def _strength(elem_id: str, value: float = 0.5) -> gr.Slider:
    return gr.Slider(MIN_STRENGTH, MAX_STRENGTH, value, step=0.05, label="Strength", elem_id=elem_id)


def _image_controls(app: LiveApp, prompt_text: str, prefix: str, steps_key: str, strength: float = 0.5,
                    control: str = "off") -> list:  # fmt: skip
    """[prompt, strength, steps, seed, control, control strength] of an image-to-image tab, their element ids
    starting with `prefix`; `control` is the tab's default where the serving model has it."""
    return [gr.Textbox(prompt_text, label="Prompt", lines=2, elem_id=f"{prefix}-prompt"),
            _strength(f"{prefix}-strength", strength), _steps(app.defaults()[steps_key], f"{prefix}-steps"),
            _seed(f"{prefix}-seed"), *_control(app, prefix, control)]  # fmt: skip


def _control(app: LiveApp, prefix: str, default: str) -> list:
    """[control choice, control strength, edge thresholds low and high]: off, or a structure control (ControlNet or
    T2I-Adapter) the serving model has."""
    loaded = app.controls()
    choice = gr.Radio(["off", *loaded], value=default if default in loaded else "off", label="Control",
                      info="The control image fixes where things are; the prompt says what they are.",
                      elem_id=f"{prefix}-control")  # fmt: skip
    scale = gr.Slider(MIN_CONTROL_SCALE, MAX_CONTROL_SCALE, 1.0, step=0.05, label="Control strength",
                      elem_id=f"{prefix}-control-scale")  # fmt: skip
    with gr.Accordion("Edge thresholds (Canny)", open=False, visible="edges" in loaded):
        low = gr.Slider(0, 500, CANNY_LOW, step=5, label="Low", elem_id=f"{prefix}-edges-low")
        high = gr.Slider(0, 500, CANNY_HIGH, step=5, label="High", elem_id=f"{prefix}-edges-high")
    return [choice, scale, low, high]


def _outputs(label: str, prefix: str) -> list:
    """[image, HUD, control image] of a live tab."""
    with gr.Row():
        image = _result(label, f"{prefix}-image", height=420, scale=4)
        control = gr.Image(type="pil", format="png", label="Control image", interactive=False, height=140, scale=1,
                           elem_id=f"{prefix}-control-image", elem_classes="live-image")  # fmt: skip
    return [image, gr.Markdown(elem_id=f"{prefix}-hud", elem_classes="hud"), control]


def _result(label: str, elem_id: str, **options) -> gr.Image:
    return gr.Image(type="filepath", format="png", label=label, interactive=False, elem_id=elem_id,
                    elem_classes="live-image", **options)  # fmt: skip


def text_tab(app: LiveApp, prompt_text: str, live: dict) -> SimpleNamespace:
    """Text to image: every keystroke and slider move regenerates; a step sweep on demand."""
    side, widest, _ = app.bounds()
    defaults = app.defaults()
    with gr.Tab("Text to image", id="txt2img"), gr.Row():
        with gr.Column():
            prompt = gr.Textbox(prompt_text, label="Prompt", lines=2, elem_id="t2i-prompt")
            negative = gr.Textbox("", label="Negative prompt (used when guidance > 1)", elem_id="t2i-negative")
            steps = _steps(defaults["steps"], "t2i-steps")
            guidance = gr.Slider(MIN_GUIDANCE, MAX_GUIDANCE, defaults["guidance_scale"], step=0.1, label="Guidance",
                                 elem_id="t2i-guidance")  # fmt: skip
            with gr.Row():
                seed = _seed("t2i-seed")
                randomize = gr.Button("Random seed", elem_id="t2i-random", scale=0)
            with gr.Row():  # as wide as the cost cap allows at 1 step; the page's load sets them for the model
                width = gr.Slider(MIN_SIZE, widest, side, step=SIZE_STEP, precision=0, label="Width", elem_id="t2i-width")
                height = gr.Slider(MIN_SIZE, widest, side, step=SIZE_STEP, precision=0, label="Height",
                                   elem_id="t2i-height")  # fmt: skip
        with gr.Column():
            image = _result("Result", "t2i-image", height=420)
            hud = gr.Markdown(elem_id="t2i-hud", elem_classes="hud")
            sweep_button = gr.Button("Step sweep: 1..8 steps, this seed", elem_id="t2i-sweep")
            sweep_image = _result("Step sweep", "t2i-sweep-image")
    inputs = [prompt, negative, steps, guidance, seed, width, height]
    gr.on([c.change for c in inputs], app.txt2img, inputs, [image, hud], api_name="live_txt2img",
          api_visibility="undocumented", **live).then(
        app.settle_txt2img, None, image, show_progress="hidden", api_visibility="private")  # fmt: skip
    randomize.click(lambda: random.randint(0, MAX_SEED), None, seed, show_progress="hidden", api_visibility="private")
    sweep_button.click(app.sweep, [prompt, negative, guidance, seed, width, height], sweep_image,
                       show_progress="minimal", concurrency_limit=None, api_visibility="private")  # fmt: skip
    return SimpleNamespace(inputs=inputs, image=image, hud=hud, width=width, height=height)


def image_tab(app: LiveApp, prompt_text: str, live: dict) -> None:
    """Image to image: an upload, a paste or an example, reworked live."""
    with gr.Tab("Image to image", id="img2img"), gr.Row():
        with gr.Column():
            source = image_input(type="pil", sources=["upload", "clipboard"], label="Input image", elem_id="i2i-input",
                                 height=300)  # fmt: skip
            if examples():
                _checked_examples(gr.Examples(examples(), inputs=[source], label="Examples"))
            inputs = [source, *_image_controls(app, prompt_text, "i2i", "image_steps")]
        with gr.Column():
            outputs = _outputs("Result", "i2i")
    gr.on([c.change for c in inputs], app.img2img, inputs, outputs, api_name="live_img2img",
          api_visibility="undocumented", **live).then(
        app.settle_img2img, None, outputs[0], show_progress="hidden", api_visibility="private")  # fmt: skip


def webcam_tab(app: LiveApp, prompt_text: str) -> gr.Textbox | None:
    """Webcam: the browser sends a frame as often as the model makes one (at most 30 a second); the server keeps
    only the newest, and a newer frame never stops the one being made. Where the app has a live socket
    (stream.py), frames travel over it and the Gradio stream below is the fallback; returns the box its token
    comes in."""
    with gr.Tab("Webcam", id="webcam"):
        token = stream.panel() if app.sockets is not None else None
        with gr.Row():
            with gr.Column():
                camera = image_input(sources=["webcam"], streaming=True, type="pil", label="Webcam",
                                     webcam_options=gr.WebcamOptions(mirror=True, constraints={
                                         "video": {"width": {"ideal": 640}, "height": {"ideal": 480}}}),
                                     elem_id="cam-input")  # fmt: skip
                inputs = [camera, *_image_controls(app, prompt_text, "cam", "webcam_steps", control="edges")]
            with gr.Column():
                outputs = _outputs("Live output", "cam")
        gr.Markdown("Browsers grant the camera only on `localhost` or HTTPS pages.")
    camera.stream(app.webcam, inputs, outputs, stream_every=app.frame_interval(),
                  time_limit=None, concurrency_limit=16, concurrency_id="webcam", show_progress="hidden",
                  api_name="live_webcam", api_visibility="undocumented")  # fmt: skip
    return token


def sketch_tab(app: LiveApp, prompt_text: str, live: dict) -> None:
    """Sketch: draw, and the image repaints after every stroke (image to image from the canvas)."""
    side = app.bounds()[0]
    with gr.Tab("Sketch", id="sketch"), gr.Row():
        with gr.Column():
            canvas = gr.Sketchpad(type="filepath", image_mode="RGB", label="Canvas", canvas_size=(side, side),
                                  brush=gr.Brush(default_size=max(2, side // 24)), height=360,
                                  elem_id="sketch-canvas")  # fmt: skip
            bound_sketchpad(canvas, SketchBlobs())  # its uploads bounded, only its composite decoded (by the handler)
            clear = gr.Button("Clear", elem_id="sketch-clear")
            inputs = [canvas, *_image_controls(app, prompt_text, "sketch", "image_steps", strength=0.75,
                                               control="scribble")]  # fmt: skip
        with gr.Column():
            outputs = _outputs("Result", "sketch")
    gr.on([canvas.change, *(c.change for c in inputs[1:])], app.sketch, inputs, outputs, api_name="live_sketch",
          api_visibility="undocumented", **live)  # fmt: skip
    clear.click(lambda: None, None, canvas, show_progress="hidden", api_visibility="private")


def model_tab(app: LiveApp, status: gr.Markdown) -> None:
    """The model picker: presets, and custom ids or folders only when the operator allows them."""
    custom = app.manager.policy.custom
    with gr.Tab("Model", id="model"):
        preset = gr.Dropdown(preset_choices(), value=None, label="Preset", elem_id="model-preset")
        inputs = [preset]
        if custom:
            inputs.append(gr.Textbox("", label="Custom base model (hub id or folder, SD 1.5 or SDXL family)",
                                     elem_id="model-base"))  # fmt: skip
            inputs.append(gr.Textbox("", label="Custom LCM-LoRA (hub id, folder or .safetensors file)",
                                     elem_id="model-lora"))  # fmt: skip
        load = gr.Button("Load model", elem_id="model-load")
        gr.Markdown(
            "The model serves everyone on this server. Loading happens in the background; the current model keeps "
            f"serving until the new one is ready. Presets: {', '.join(PRESETS)}."
        )
    load.click(app.switch_model, inputs, status, show_progress="minimal", api_name="load_model")


def api_endpoints(app: LiveApp) -> None:
    """Plain request/response endpoints (never superseded), each returning a PNG carrying its parameters.

    Their inputs are their own, bounded as request.py bounds a request (the page's sliders follow the serving model
    and its cost cap; the live loop refuses a request over the cap, saying why). Each call takes one
    of the app's one-shot places in the live loop (at least API_CONCURRENCY, a full batch where the loop batches more);
    more wait in the app, never in Gradio's queue.
    """

    def whole(value, low, high, name):
        return gr.Number(value, precision=0, minimum=low, maximum=high, label=name)

    with gr.Row(visible=False):
        prompt, negative = gr.Textbox("", label="prompt"), gr.Textbox("", label="negative_prompt")
        steps, seed = whole(4, MIN_STEPS, MAX_STEPS, "steps"), whole(0, 0, MAX_SEED, "seed")
        guidance = gr.Number(1.0, minimum=MIN_GUIDANCE, maximum=MAX_GUIDANCE, label="guidance_scale")
        width, height = whole(None, MIN_SIZE, MAX_SIZE, "width"), whole(None, MIN_SIZE, MAX_SIZE, "height")
        image = image_input(type="pil", label="image")
        strength = gr.Number(0.5, minimum=MIN_STRENGTH, maximum=MAX_STRENGTH, label="strength")
        out = gr.Image(type="filepath", format="png", label="image")
        grid = gr.Image(type="filepath", format="png", label="grid")
        buttons = [gr.Button(name) for name in ("txt2img", "img2img", "webcam_frame", "step_sweep")]
    api = dict(concurrency_limit=None, show_progress="hidden")
    buttons[0].click(app.api_txt2img, [prompt, negative, steps, guidance, seed, width, height], out,
                     api_name="txt2img", **api)  # fmt: skip
    buttons[1].click(app.api_img2img, [image, prompt, strength, steps, seed], out, api_name="img2img", **api)
    buttons[2].click(app.api_webcam_frame, [image, prompt, strength, steps, seed], out, api_name="webcam_frame", **api)
    buttons[3].click(app.api_step_sweep, [prompt, negative, guidance, seed, width, height], grid, api_name="step_sweep",
                     **api)  # fmt: skip


def _model_following(demo: gr.Blocks) -> SimpleNamespace:
    """The widgets whose values follow the serving model, found by element id: steps (text, image, webcam,
    sketch; the order of LiveApp.model_values), guidance, and the prompt boxes."""
    by_id = {block.elem_id: block for block in demo.blocks.values() if getattr(block, "elem_id", None)}
    tabs = ("t2i", "i2i", "cam", "sketch")
    return SimpleNamespace(steps=[by_id[f"{tab}-steps"] for tab in tabs], guidance=by_id["t2i-guidance"],
                           prompts=[by_id[f"{tab}-prompt"] for tab in tabs])  # fmt: skip


def build_ui(app: LiveApp, trigger_mode: str = "multiple") -> gr.Blocks:
    """The page. `trigger_mode="always_last"` gives Gradio's stock debounce instead (for comparisons)."""
    prompt_text = app.example_prompt()
    live = dict(trigger_mode=trigger_mode, show_progress="hidden", concurrency_limit=None)
    with gr.Blocks(title="lcm-live", delete_cache=(300, 900)) as demo:
        gr.Markdown(
            "# lcm-live\nThe image follows your prompt as you type: a 4-step LCM-LoRA pipeline, newest input wins."
        )
        status = gr.Markdown(app.manager.status_markdown(), label="status", elem_id="model-status")
        shown = gr.State(None)  # which model's size bounds this page's sliders show
        with gr.Tabs():
            text = text_tab(app, prompt_text, live)
            image_tab(app, prompt_text, live)
            token = webcam_tab(app, prompt_text)
            sketch_tab(app, prompt_text, live)
            if getattr(app.manager, "policy", None) is not None and app.manager.policy.enabled:  # not with replicas
                model_tab(app, status)
        api_endpoints(app)

        # The first image, at the serving model's size and with its own values; a status line refreshed every
        # second (load progress, errors), which also resets the sliders and example prompts once another model
        # serves. (The webcam's pace was fixed with the page: handlers.FramePacer keeps the model's.)
        followed, follow = gr.State(None), _model_following(demo)  # which model's values this page shows
        demo.load(app.page_load, follow.prompts,
                  [text.width, text.height, shown, *follow.steps, follow.guidance, *follow.prompts, followed],
                  show_progress="hidden", api_name="page_load", api_visibility="undocumented").then(
            app.txt2img, text.inputs, [text.image, text.hud], show_progress="hidden", api_name="first_txt2img",
            api_visibility="undocumented")  # fmt: skip
        gr.Timer(1.0).tick(app.page_status, [shown, followed, *follow.prompts],
                           [status, text.width, text.height, shown, *follow.steps, follow.guidance, *follow.prompts,
                            followed], show_progress="hidden", api_name="page_status", api_visibility="undocumented",
                           queue=False)  # fmt: skip
        demo.unload(app.forget)
        if token is not None:  # the page's token for its live socket; gone when the page closes
            demo.load(app.sockets.issue, None, token, show_progress="hidden", api_name="live_token",
                      api_visibility="undocumented")  # fmt: skip
            demo.unload(app.sockets.revoke)
    return demo
