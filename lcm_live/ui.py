"""The page: three live tabs (text, image, webcam), a model picker and a HUD. No torch here.

Every widget change is sent at once (`trigger_mode="multiple"`), so the server hears new input while a
generation runs; the live loop drops or stops stale work and only the newest request's image is shown.
"""

from __future__ import annotations

import asyncio
import html
import random
import re
import tempfile
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import gradio as gr
from gradio.context import LocalContext
from PIL import Image, ImageDraw

from .inputs import InputError, clean_prompt, image_from_payload
from .live import SUPERSEDED, LiveLoop, Outcome
from .pngmeta import save_png
from .presets import ASSETS, preset_choices, resolve_spec
from .request import MAX_SEED, GenerationError, Request, hud_line


if TYPE_CHECKING:
    from .models import ModelManager


DEMO_PROMPT = "a yellow triangle on a purple background"
PHOTO_PROMPT = (
    "close-up photography of old man standing in the rain at night, in a street lit by lamps, leica 35mm summilux"
)
SWEEP_STEPS = range(1, 9)
API_CONCURRENCY = 4  # plain API calls (/txt2img, /img2img, /webcam_frame) running at once; more wait in the queue
API_SLOT = "api:"  # slots of plain API calls: one call each
SETTLE_AFTER_S = 0.5  # input still this long: decode the last latents again with the full VAE
CSS = """
.live-image img { image-rendering: pixelated; object-fit: contain; }
.hud { font-family: ui-monospace, monospace; font-size: 0.85em; }
"""


class OutputStore:
    """PNG files carrying their parameters, in one folder; the oldest are deleted past `keep`."""

    def __init__(self, folder: str | None = None, keep: int = 256):
        self.folder = Path(folder or tempfile.mkdtemp(prefix="lcm-live-"))
        self.folder.mkdir(parents=True, exist_ok=True)
        self._paths: deque[Path] = deque()
        self._keep = keep
        self._lock = threading.Lock()

    def save(self, image: Image.Image, params: dict) -> str:
        path = save_png(image, params, self.folder / f"{uuid.uuid4().hex}.png")
        with self._lock:
            self._paths.append(path)
            while len(self._paths) > self._keep:
                self._paths.popleft().unlink(missing_ok=True)
        return str(path)


class RateMeter:
    """Frames per second shown per slot (a smoothed rate of images delivered)."""

    def __init__(self, slots: int = 1024):
        self._last: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._slots = slots

    def tick(self, slot: str) -> float:
        now = time.perf_counter()
        last, fps = self._last.pop(slot, (None, 0.0))
        if last is not None:
            instant = 1.0 / max(now - last, 1e-3)
            fps = instant if fps == 0 else 0.7 * fps + 0.3 * instant
        self._last[slot] = (now, fps)
        while len(self._last) > self._slots:
            self._last.popitem(last=False)
        return fps


def hud_markdown(outcome: Outcome, fps: float, info: dict, warnings: list[str]) -> str:
    result = outcome.result
    line = _markdown_text(hud_line(result.timings, outcome.wait_ms, fps, info["runtime"], info["model"]))
    if "replica" in result.params:  # Ray Serve mode: which replica made this image
        line += _markdown_text(f" · replica {result.params['replica']}")
    return line + "".join(f"  \n**Warning:** {_markdown_text(w)}" for w in warnings)


def _markdown_text(text: str) -> str:
    """User text shown inside Markdown as itself: no HTML, no links, images or emphasis."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|~>])", r"\\\1", html.escape(text, quote=False))


def _event_order() -> float | None:
    """When the client sent the event being handled (Gradio's enqueue time); None outside a queued event.

    Gradio preprocesses events in a thread pool, so under load one session's keystrokes can reach the handler
    out of order; the live loop uses this to keep the newest one the newest."""
    blocks, event_id = LocalContext.blocks.get(None), LocalContext.event_id.get(None)
    events = getattr(getattr(blocks, "_queue", None), "event_ids_to_events", None)
    event = events.get(event_id) if event_id and isinstance(events, dict) else None
    return getattr(event, "enqueue_time", None)


def _toast_text(text: str) -> str:
    """gr.Error and gr.Warning render their message as HTML: user text in it must be escaped."""
    return html.escape(text, quote=False)


def image_input(**options) -> gr.Image:
    """A gr.Image whose preprocess is ours (inputs.load_image): upright RGB at the working size, or a gr.Error.

    Gradio's own preprocess decodes a data: URL at full size, with no size limit, and re-encodes some uploads
    before any check; a file that is not an image came back as a long internal message naming the component.
    (Set on the instance: a gr.Image subclass makes Gradio write a .pyi stub next to this file.)
    """
    component = gr.Image(**options)
    component.preprocess = _preprocess_image
    return component


def _preprocess_image(payload):
    if payload is None:
        return None
    blocks = LocalContext.blocks.get(None)
    try:
        return image_from_payload(payload.path, payload.url, getattr(blocks, "max_file_size", None))
    except InputError as error:
        raise gr.Error(_toast_text(str(error))) from error


class LiveApp:
    """The handlers behind the page; each browser session gets its own slots in the live loop."""

    def __init__(self, manager: ModelManager, loop: LiveLoop, store: OutputStore | None = None):
        self.manager, self.loop = manager, loop
        self.store = store or OutputStore()
        self.rates = RateMeter()

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def slot(request: gr.Request | None, tab: str) -> str:
        session = getattr(request, "session_hash", None)
        return f"{session}:{tab}" if session else f"{API_SLOT}{uuid.uuid4().hex}"  # API calls: never superseded

    async def _generate(self, slot: str, request: Request):
        """Run `request` in `slot`; (png path, HUD) or None when a newer request superseded it."""
        one_shot = slot.startswith(API_SLOT)
        try:
            outcome = await self.loop.run(slot, request, order=_event_order())
        except (ValueError, GenerationError) as error:
            raise gr.Error(_toast_text(str(error))) from error
        finally:
            if one_shot:  # an API call's slot is never used again: drop its bookkeeping
                self.loop.forget(slot)
        if outcome == SUPERSEDED:
            return None
        result = outcome.result
        for warning in result.warnings:
            gr.Warning(_toast_text(warning))
        fps = self.rates.tick(slot)
        path = self.store.save(result.image, result.params)
        return path, hud_markdown(outcome, fps, self.loop.info, result.warnings)

    # ------------------------------------------------------------------ handlers
    async def txt2img(self, prompt, negative, steps, guidance, seed, width, height, request: gr.Request = None):
        req = Request(prompt=clean_prompt(prompt), negative_prompt=clean_prompt(negative), steps=_int(steps, "steps"),
                      guidance_scale=_float(guidance, "guidance"), seed=_int(seed, "seed"),
                      width=_int(width, "width"), height=_int(height, "height"))  # fmt: skip
        shown = await self._generate(self.slot(request, "txt2img"), req)
        return shown if shown is not None else (gr.skip(), gr.skip())

    async def img2img(self, image, prompt, strength, steps, seed, request: gr.Request = None):
        if image is None:
            return gr.skip(), "Upload, paste or pick an image to start."
        return await self._image_to_image(image, prompt, strength, steps, seed, self.slot(request, "img2img"))

    async def webcam(self, frame, prompt, strength, steps, seed, request: gr.Request = None):
        if frame is None:
            return gr.skip(), gr.skip()
        return await self._image_to_image(frame, prompt, strength, steps, seed, self.slot(request, "webcam"))

    async def _image_to_image(self, image, prompt, strength, steps, seed, slot):
        """`image` arrives upright, RGB and at the working size: `image_input`'s preprocess made it so."""
        req = Request(prompt=clean_prompt(prompt), image=image, strength=_float(strength, "strength"),
                      steps=_int(steps, "steps"), seed=_int(seed, "seed"))  # fmt: skip
        shown = await self._generate(slot, req)
        return shown if shown is not None else (gr.skip(), gr.skip())

    async def sweep(self, prompt, negative, guidance, seed, width, height, request: gr.Request = None):
        """The same seed at 1..8 steps, as one labelled grid image."""
        base = Request(prompt=clean_prompt(prompt), negative_prompt=clean_prompt(negative),
                       guidance_scale=_float(guidance, "guidance"), seed=_int(seed, "seed"),
                       width=_int(width, "width"), height=_int(height, "height"))  # fmt: skip

        try:
            outcome = await self.loop.run(self.slot(request, "sweep"), [replace(base, steps=n) for n in SWEEP_STEPS])
        except (ValueError, GenerationError) as error:
            raise gr.Error(_toast_text(str(error))) from error
        if outcome == SUPERSEDED:
            return gr.skip()
        results = outcome.result
        grid = step_grid([r.image for r in results], [f"{n} step{'s' * (n > 1)}" for n in SWEEP_STEPS])
        params = {**results[0].params, "steps": list(SWEEP_STEPS), "kind": "step sweep"}
        return self.store.save(grid, params)

    async def settle(self, tab: str, request: gr.Request | None):
        """Once input has been still for a moment, replace a TAESD preview by the full VAE's decode of it."""
        await asyncio.sleep(SETTLE_AFTER_S)
        try:
            outcome = await self.loop.settle(self.slot(request, tab))
        except Exception:  # e.g. the model was switched meanwhile: keep the preview
            return gr.skip()
        if outcome is None or outcome == SUPERSEDED:
            return gr.skip()  # newer input came, or nothing to upgrade
        return self.store.save(outcome.result.image, outcome.result.params)

    async def settle_txt2img(self, request: gr.Request):
        return await self.settle("txt2img", request)

    async def settle_img2img(self, request: gr.Request):
        return await self.settle("img2img", request)

    def switch_model(self, preset, base, lora):
        try:
            spec = resolve_spec(preset, (base or "").strip() or None, (lora or "").strip() or None)
        except ValueError as error:
            raise gr.Error(_toast_text(str(error))) from error
        if not self.manager.switch(spec):
            gr.Warning("A model is already loading; wait for it to finish.")
        return self.manager.status_markdown()

    def forget(self, request: gr.Request):
        if request is not None and request.session_hash:
            self.loop.forget(f"{request.session_hash}:")


def _int(value, name: str) -> int:
    try:
        return int(round(float(value)))
    except (TypeError, ValueError) as error:
        raise gr.Error(f"{name} must be a number; got {value!r}.") from error


def _float(value, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError) as error:
        raise gr.Error(f"{name} must be a number; got {value!r}.") from error


def step_grid(images: list[Image.Image], labels: list[str]) -> Image.Image:
    """Images side by side in two rows of four, each with its label underneath."""
    width, height = images[0].size
    cell = max(width, 96)
    columns, rows, label_h = 4, (len(images) + 3) // 4, 16
    grid = Image.new("RGB", (columns * cell, rows * (height + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    for index, (image, label) in enumerate(zip(images, labels)):
        x, y = (index % columns) * cell, (index // columns) * (height + label_h)
        grid.paste(image, (x + (cell - width) // 2, y))
        draw.text((x + 4, y + height + 2), label, fill="black")
    return grid


def examples() -> list[str]:
    return sorted(str(p) for p in (ASSETS / "examples").glob("*.png"))


def build_ui(app: LiveApp, trigger_mode: str = "multiple") -> gr.Blocks:
    """The page. `trigger_mode="always_last"` gives Gradio's stock debounce instead (for comparisons)."""
    info = app.manager.engine.info
    native = int(info["native_size"])
    default_prompt = DEMO_PROMPT if info["embedded"] else PHOTO_PROMPT
    live = dict(trigger_mode=trigger_mode, show_progress="hidden", concurrency_limit=None)
    with gr.Blocks(title="lcm-live", delete_cache=(300, 900)) as demo:
        gr.Markdown(
            "# lcm-live\nThe image follows your prompt as you type: a 4-step LCM-LoRA pipeline, newest input wins."
        )
        status = gr.Markdown(app.manager.status_markdown(), elem_id="model-status")
        with gr.Tabs():
            with gr.Tab("Text to image", id="txt2img"), gr.Row():
                with gr.Column():
                    prompt = gr.Textbox(default_prompt, label="Prompt", lines=2, elem_id="t2i-prompt")
                    negative = gr.Textbox("", label="Negative prompt (used when guidance > 1)", elem_id="t2i-negative")
                    steps = gr.Slider(1, 8, 4, step=1, label="Steps", elem_id="t2i-steps")
                    guidance = gr.Slider(1.0, 2.0, 1.0, step=0.1, label="Guidance", elem_id="t2i-guidance")
                    with gr.Row():
                        seed = gr.Number(0, label="Seed", precision=0, minimum=0, maximum=MAX_SEED, elem_id="t2i-seed")
                        randomize = gr.Button("Random seed", elem_id="t2i-random", scale=0)
                    with gr.Row():
                        width = gr.Slider(64, 1024, native, step=8, label="Width", elem_id="t2i-width")
                        height = gr.Slider(64, 1024, native, step=8, label="Height", elem_id="t2i-height")
                with gr.Column():
                    t2i_out = gr.Image(type="filepath", format="png", label="Result", interactive=False,
                                       height=420, elem_id="t2i-image", elem_classes="live-image")  # fmt: skip
                    t2i_hud = gr.Markdown(elem_id="t2i-hud", elem_classes="hud")
                    sweep_button = gr.Button("Step sweep: 1..8 steps, this seed", elem_id="t2i-sweep")
                    sweep_out = gr.Image(type="filepath", format="png", label="Step sweep", interactive=False,
                                         elem_id="t2i-sweep-image", elem_classes="live-image")  # fmt: skip
            with gr.Tab("Image to image", id="img2img"), gr.Row():
                with gr.Column():
                    i2i_in = image_input(type="pil", sources=["upload", "clipboard"], label="Input image",
                                      elem_id="i2i-input", height=300)  # fmt: skip
                    if examples():
                        gr.Examples(examples(), inputs=[i2i_in], label="Examples")
                    i2i_prompt = gr.Textbox(default_prompt, label="Prompt", lines=2, elem_id="i2i-prompt")
                    i2i_strength = gr.Slider(0.05, 1.0, 0.5, step=0.05, label="Strength", elem_id="i2i-strength")
                    i2i_steps = gr.Slider(1, 8, 4, step=1, label="Steps", elem_id="i2i-steps")
                    i2i_seed = gr.Number(0, label="Seed", precision=0, minimum=0, maximum=MAX_SEED, elem_id="i2i-seed")
                with gr.Column():
                    i2i_out = gr.Image(type="filepath", format="png", label="Result", interactive=False,
                                       height=420, elem_id="i2i-image", elem_classes="live-image")  # fmt: skip
                    i2i_hud = gr.Markdown(elem_id="i2i-hud", elem_classes="hud")
            with gr.Tab("Webcam", id="webcam"):
                with gr.Row():
                    with gr.Column():
                        cam = image_input(sources=["webcam"], streaming=True, type="pil", label="Webcam",
                                       webcam_options=gr.WebcamOptions(mirror=True, constraints={
                                           "video": {"width": {"ideal": 640}, "height": {"ideal": 480}}}),
                                       elem_id="cam-input")  # fmt: skip
                        cam_prompt = gr.Textbox(default_prompt, label="Prompt", lines=2, elem_id="cam-prompt")
                        cam_strength = gr.Slider(0.05, 1.0, 0.5, step=0.05, label="Strength", elem_id="cam-strength")
                        cam_steps = gr.Slider(1, 8, 2, step=1, label="Steps", elem_id="cam-steps")
                        cam_seed = gr.Number(
                            0, label="Seed", precision=0, minimum=0, maximum=MAX_SEED, elem_id="cam-seed"
                        )
                    with gr.Column():
                        cam_out = gr.Image(type="filepath", format="png", label="Live output", interactive=False,
                                           height=420, elem_id="cam-image", elem_classes="live-image")  # fmt: skip
                        cam_hud = gr.Markdown(elem_id="cam-hud", elem_classes="hud")
                gr.Markdown("Browsers grant the camera only on `localhost` or HTTPS pages.")
            with gr.Tab("Model", id="model"):
                preset = gr.Dropdown(preset_choices(), value=None, label="Preset", elem_id="model-preset")
                base = gr.Textbox("", label="Custom base model (hub id or folder, SD 1.5 or SDXL family)")
                lora = gr.Textbox("", label="Custom LCM-LoRA (hub id, folder or .safetensors file)")
                load = gr.Button("Load model", elem_id="model-load")
                gr.Markdown(
                    "Loading happens in the background; the current model keeps serving until the new one is ready."
                )

        # Text to image: every keystroke and slider move regenerates.
        t2i_inputs = [prompt, negative, steps, guidance, seed, width, height]
        gr.on([c.change for c in t2i_inputs], app.txt2img, t2i_inputs, [t2i_out, t2i_hud],
              api_name="live_txt2img", api_visibility="undocumented", **live).then(
            app.settle_txt2img, None, t2i_out, show_progress="hidden", api_visibility="private")  # fmt: skip
        randomize.click(lambda: random.randint(0, MAX_SEED), None, seed, show_progress="hidden",
                        api_visibility="private")  # fmt: skip
        sweep_button.click(app.sweep, [prompt, negative, guidance, seed, width, height], sweep_out,
                           api_name="step_sweep", show_progress="minimal")  # fmt: skip
        demo.load(app.txt2img, t2i_inputs, [t2i_out, t2i_hud], show_progress="hidden", api_name="first_txt2img",
                  api_visibility="undocumented")  # fmt: skip

        # Image to image.
        i2i_inputs = [i2i_in, i2i_prompt, i2i_strength, i2i_steps, i2i_seed]
        gr.on([c.change for c in i2i_inputs], app.img2img, i2i_inputs, [i2i_out, i2i_hud],
              api_name="live_img2img", api_visibility="undocumented", **live).then(
            app.settle_img2img, None, i2i_out, show_progress="hidden", api_visibility="private")  # fmt: skip

        # Webcam: the browser sends a frame every 100 ms; the server keeps only the newest.
        cam_inputs = [cam, cam_prompt, cam_strength, cam_steps, cam_seed]
        cam.stream(app.webcam, cam_inputs, [cam_out, cam_hud], stream_every=0.1, time_limit=None,
                   concurrency_limit=16, concurrency_id="webcam", show_progress="hidden",
                   api_name="live_webcam", api_visibility="undocumented")  # fmt: skip

        # Model picker, and a status line refreshed every second (load progress, errors).
        load.click(app.switch_model, [preset, base, lora], status, show_progress="minimal", api_name="load_model")
        gr.Timer(1.0).tick(app.manager.status_markdown, None, status, show_progress="hidden",
                           api_visibility="private", queue=False)  # fmt: skip

        # Plain API endpoints (request/response, never superseded); each returns a PNG carrying its parameters.
        with gr.Row(visible=False):
            api_frame = image_input(type="pil", label="frame")
            api_t2i = gr.Button("txt2img")
            api_i2i = gr.Button("img2img")
            api_cam = gr.Button("webcam_frame")
        # They share API_CONCURRENCY places: each call is its own slot in the round-robin, so without a cap a burst of
        # API calls would queue inside the live loop (ahead of every browser user) instead of in Gradio's queue,
        # whose max_size then refuses the excess with "queue is full".
        api = dict(concurrency_limit=API_CONCURRENCY, concurrency_id="api")
        api_t2i.click(_first(app.txt2img), t2i_inputs, t2i_out, api_name="txt2img", **api)
        api_i2i.click(_first(app.img2img), i2i_inputs, i2i_out, api_name="img2img", **api)
        api_cam.click(_first(app.webcam), [api_frame, cam_prompt, cam_strength, cam_steps, cam_seed], cam_out,
                      api_name="webcam_frame", **api)  # fmt: skip
        demo.unload(app.forget)
    return demo


def _first(handler):
    """The handler as an API endpoint: the image only, and its own slot (never superseded)."""

    async def endpoint(*args):
        shown = await handler(*args, request=None)
        return shown[0]

    endpoint.__name__ = handler.__name__
    return endpoint
