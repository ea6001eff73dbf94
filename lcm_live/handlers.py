"""The handlers behind the page and the API: widget values -> Requests for the live loop -> PNG files and a HUD.

Every call is a visitor's (its session and address count against the loop's limits); the one-shot calls (the API
endpoints, the step sweep, a live endpoint called through `/call/`) also wait for one of a few places; a call
whose client went away is cancelled. No torch here.
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
import time
import uuid
from collections import OrderedDict, deque
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import gradio as gr
from PIL import Image, ImageDraw

from .control import CANNY_HIGH, CANNY_LOW, ControlError, DepthEstimator, preprocess
from .inputs import ImageUpload, clean_prompt
from .live import SUPERSEDED, Limits, LiveLoop, Outcome
from .pngmeta import save_png
from .request import MAX_SIZE, MIN_SIZE, MIN_STEPS, SIZE_STEP, GenerationError, Request, RequestRefused, hud_line
from .text import markdown_text, public_text, toast_text
from .visitors import GONE, AddressShare, OneShotGate, Visitor, current_event, while_connected


if TYPE_CHECKING:
    from .models import ModelManager


SWEEP_STEPS = range(1, 9)
API_CONCURRENCY = 4  # one-shot calls (API endpoints, step sweeps) in the live loop at once, at least; more wait
# their turn. Where the loop batches more rows than this into one UNet call, a batch's worth may be in it.
SETTLE_AFTER_S = 0.5  # input still this long: decode the last latents again with the full VAE
DECODES_PER_ADDRESS = 4  # images one address may have being read at once; more are refused before decoding
STREAMS_PER_ADDRESS = 2  # webcam streams one address may hold open at once (each holds a place in Gradio's queue)
STREAM_IDLE_S = 20.0  # a webcam stream that sends no frame for this long is closed, freeing its place
DEMO_PROMPT = "a yellow triangle on a purple background"  # the embedded model's example prompt
PHOTO_PROMPT = (
    "close-up photography of old man standing in the rain at night, in a street lit by lamps, leica 35mm summilux"
)  # any other model's
EXAMPLE_PROMPTS = (DEMO_PROMPT, PHOTO_PROMPT)
PACE_SLACK = 0.8  # a webcam frame this close to the model's frame time after the last one still runs


class OutputStore:
    """PNG files carrying their parameters, in one folder; the oldest are deleted past `keep`."""

    def __init__(self, folder: str | None = None, keep: int = 256):
        self.folder = Path(folder or tempfile.mkdtemp(prefix="lcm-live-"))
        self.folder.mkdir(parents=True, exist_ok=True)
        self._paths: deque[Path] = deque()
        self._keep = keep
        self._lock = threading.Lock()

    async def save(self, image: Image.Image, params: dict) -> str:
        """Encode and write on a worker thread: a PNG takes milliseconds to tens of ms, the event loop none of them."""
        return await asyncio.to_thread(self.save_now, image, params)

    def save_now(self, image: Image.Image, params: dict) -> str:
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


class StreamBook:
    """Open webcam streams by address: at most `per_address` at once, each closed after `idle_s` without a frame.

    A Gradio stream holds its place in the queue for as long as it is open, whether or not frames come; empty
    frames cost nothing to send. Called on every frame of a stream (Gradio's event loop only)."""

    def __init__(self, per_address: int, idle_s: float):
        self.per_address, self.idle_s = per_address, idle_s
        self._open: dict[str | None, dict[str, tuple[object, float]]] = {}  # address -> event id -> (event, last frame)

    def frame(self, address: str | None, event, useful: bool) -> None:
        """Note a frame of `event`'s stream; RequestRefused when the stream must close (a surplus or idle one)."""
        if event is None:
            return
        now = time.monotonic()
        streams = self._open.setdefault(address, {})
        for key, (other, _) in list(streams.items()):  # streams that ended by themselves
            if not getattr(other, "alive", False) or getattr(other, "closed", False):
                del streams[key]
        known = streams.get(event._id)
        if known is None:
            if address is not None and len(streams) >= self.per_address:
                raise RequestRefused(
                    f"Too many webcam streams from your address (at most {self.per_address}); close one first."
                )
            known = streams[event._id] = (event, now)
        if useful:
            streams[event._id] = (event, now)
        elif now - known[1] > self.idle_s:
            del streams[event._id]
            raise RequestRefused(f"The webcam stream was closed: no frame for {self.idle_s:.0f} s.")
        if not streams:
            del self._open[address]

    def count(self, address: str | None) -> int:
        return len(self._open.get(address, {}))


class FramePacer:
    """Webcam frames per slot, let through no faster than the serving model makes them (the newest kept anyway)."""

    def __init__(self, slots: int = 1024):
        self._last: OrderedDict[str, float] = OrderedDict()
        self._slots = slots

    def admit(self, slot: str, interval_s: float) -> bool:
        now = time.perf_counter()
        last = self._last.get(slot)
        if last is not None and now - last < PACE_SLACK * interval_s:
            return False
        self._last.pop(slot, None)
        self._last[slot] = now
        while len(self._last) > self._slots:
            self._last.popitem(last=False)
        return True


def hud_markdown(outcome: Outcome, fps: float, info: dict, warnings: list[str]) -> str:
    result = outcome.result
    line = markdown_text(hud_line(result.timings, outcome.wait_ms, fps, info["runtime"], public_text(info["model"])))
    if "replica" in result.params:  # Ray Serve mode: which replica made this image
        line += markdown_text(f" · replica {result.params['replica']}")
    return line + "".join(f"  \n**Warning:** {markdown_text(w)}" for w in warnings)


def largest_side(cost_cap: int) -> int:
    """The widest width/height slider: the largest square side (a multiple of 8) within the cap at 1 step."""
    side = int((cost_cap / MIN_STEPS) ** 0.5) // SIZE_STEP * SIZE_STEP
    return max(MIN_SIZE, min(MAX_SIZE, side))


def _event_order() -> float | None:
    """When the client sent the event being handled (Gradio's enqueue time); None outside a queued event.

    Gradio preprocesses events in a thread pool, so under load one session's keystrokes can reach the handler
    out of order; the live loop uses this to keep the newest one the newest."""
    return getattr(current_event(), "enqueue_time", None)


def _error(error: Exception) -> gr.Error:
    """The visitor's message for a refused or failed request: escaped, without server paths."""
    return gr.Error(toast_text(public_text(str(error))), print_exception=False)


class LiveApp:
    """The handlers; each browser session gets its own newest-wins slots in the live loop."""

    def __init__(self, manager: ModelManager, loop: LiveLoop, store: OutputStore | None = None,
                 one_shot_places: int | None = None, limits: Limits | None = None):  # fmt: skip
        self.manager, self.loop = manager, loop
        self.limits = limits or getattr(loop, "limits", None) or Limits()  # the loop's own, unless it is remote
        self.store = store or OutputStore()
        self.rates = RateMeter()
        self.pacer = FramePacer()
        places = one_shot_places or max(API_CONCURRENCY, getattr(loop, "max_batch", 0))
        self.gate = OneShotGate(places, self.limits.address_jobs)
        self.depth = DepthEstimator()  # loaded on first use, from the local cache only
        self.sockets = None  # the live WebSocket for webcam frames (stream.LiveSockets), where the app serves one
        self.decodes = AddressShare(DECODES_PER_ADDRESS, "images being read")
        self.streams = StreamBook(STREAMS_PER_ADDRESS, STREAM_IDLE_S)

    async def _read_image(self, visitor: Visitor, image):
        """A PIL image from what the image component passed on: decoded here, within the address's share."""
        if not isinstance(image, ImageUpload):
            return image
        try:
            with self.decodes.hold(visitor.address):
                return await asyncio.to_thread(image.load)
        except ValueError as error:  # InputError, RequestRefused
            raise _error(error) from error

    # ------------------------------------------------------------------ running
    @contextmanager
    def _slot(self, visitor: Visitor, tab: str, one_shot: bool):
        """The slot to run in: the session's newest-wins slot for `tab`, or a slot of its own for a one-shot call
        (nothing supersedes it). Dropped after the call when nothing will come from it again."""
        slot = f"{visitor.slot(tab)}-{uuid.uuid4().hex}" if one_shot else visitor.slot(tab)
        try:
            yield slot
        finally:
            if one_shot or visitor.one_off:
                self.loop.forget(slot)

    async def _run(self, visitor: Visitor, slot: str, requests, gated: bool, preempt: bool = True):
        """Run `requests` in `slot`: an Outcome, SUPERSEDED (newer input came) or GONE (the client left).

        A gated call's share is kept by the gate (its address's places and calls), so it reaches the loop as its
        own visitor: the loop charges the pixel-steps of finished steps only, so a typist whose keystrokes keep
        superseding each other is never charged, and an address charged for every API call would wait behind
        typing crowds (a webcam client got 2 frames in 16 s beside 20 typists, 6 without its address)."""

        async def run():
            if not gated:
                return await self.loop.run(slot, requests, order=_event_order(), address=visitor.address,
                                           preempt=preempt)  # fmt: skip
            async with self.gate.enter(visitor):
                return await self.loop.run(slot, requests)

        try:
            return await while_connected(run())
        except (ValueError, GenerationError) as error:
            raise _error(error) from error

    async def run_one_shot(self, visitor: Visitor, tab: str, requests) -> Outcome | str:
        """Another protocol's call (the OpenAI-style API): a slot of its own, through the one-shot gate; the loop's
        ValueError (RequestRefused) and GenerationError come through as they are."""
        with self._slot(visitor, tab, one_shot=True) as slot:
            async with self.gate.enter(visitor):
                return await self.loop.run(slot, requests)

    async def _generate(self, visitor: Visitor, tab: str, request: Request, one_shot: bool = False,
                        preempt: bool = True):  # fmt: skip
        """(png path, HUD), or None when newer input superseded it or its client left. One-shot calls, and live
        calls through `/call/`, wait for one of the one-shot places."""
        with self._slot(visitor, tab, one_shot) as slot:
            outcome = await self._run(visitor, slot, request, one_shot or visitor.one_off, preempt)
        if outcome in (SUPERSEDED, GONE):
            return None
        result = outcome.result
        for warning in result.warnings:
            gr.Warning(toast_text(warning))
        fps = 0.0 if one_shot else self.rates.tick(visitor.slot(tab))
        path = await self.store.save(result.image, result.params)
        return path, hud_markdown(outcome, fps, self.loop.info, result.warnings)

    # ------------------------------------------------------------------ the page's live handlers
    async def txt2img(self, prompt, negative_prompt, steps, guidance_scale, seed, width, height,
                      request: gr.Request = None):  # fmt: skip
        req = _txt2img_request(prompt, negative_prompt, steps, guidance_scale, seed, width, height)
        shown = await self._generate(Visitor.of(request), "txt2img", req)
        return shown if shown is not None else (gr.skip(), gr.skip())

    async def img2img(self, image, prompt, strength, steps, seed, control="off", control_scale=1.0,
                      edge_low=CANNY_LOW, edge_high=CANNY_HIGH, request: gr.Request = None):  # fmt: skip
        if image is None:
            return gr.skip(), "Upload, paste or pick an image to start.", gr.skip()
        visitor = Visitor.of(request)
        image = await self._read_image(visitor, image)
        req, shown_control = await self.controlled(_img2img_request(image, prompt, strength, steps, seed), image,
                                                    control, control_scale, (edge_low, edge_high))  # fmt: skip
        shown = await self._generate(visitor, "img2img", req)
        return (*shown, shown_control) if shown is not None else (gr.skip(),) * 3

    async def webcam(self, image, prompt, strength, steps, seed, control="off", control_scale=1.0,
                     edge_low=CANNY_LOW, edge_high=CANNY_HIGH, request: gr.Request = None):  # fmt: skip
        visitor = Visitor.of(request)
        try:
            self.streams.frame(visitor.address, current_event(), useful=image is not None)
        except ValueError as error:  # too many streams, or an idle one: ends this stream, frees its place
            raise _error(error) from error
        if image is None:
            return gr.skip(), gr.skip(), gr.skip()
        # The browser's pace was fixed when the page was built (Gradio's stream_every); the serving model's is
        # kept here: a frame sooner than the model makes them is dropped before any work (before decoding).
        if not self.pacer.admit(visitor.slot("webcam"), self.frame_interval()):
            return gr.skip(), gr.skip(), gr.skip()
        image = await self._read_image(visitor, image)
        req, shown_control = await self.controlled(_img2img_request(image, prompt, strength, steps, seed), image,
                                                    control, control_scale, (edge_low, edge_high))  # fmt: skip
        # A newer frame replaces the pending one but lets the running one finish: frames faster than a generation
        # would otherwise stop every one of them before its image.
        shown = await self._generate(visitor, "webcam", req, preempt=False)
        return (*shown, shown_control) if shown is not None else (gr.skip(),) * 3

    async def sketch(self, canvas, prompt, strength, steps, seed, control="off", control_scale=1.0,
                     edge_low=CANNY_LOW, edge_high=CANNY_HIGH, request: gr.Request = None):  # fmt: skip
        """The sketch tab: the canvas (its flattened composite, checked like any upload) as image-to-image input,
        or, with the scribble control, as the control alone (the strokes say where, the prompt what)."""
        composite = canvas.get("composite") if isinstance(canvas, dict) else None
        if composite is None or composite == "":
            return gr.skip(), "Draw on the canvas to start.", gr.skip()
        visitor = Visitor.of(request)
        if isinstance(composite, str):  # a path (called directly, not through the page's editor)
            composite = ImageUpload(composite, None)
        image = await self._read_image(visitor, composite)
        req, shown_control = await self.controlled(_img2img_request(image, prompt, strength, steps, seed), image,
                                                    control, control_scale, (edge_low, edge_high),
                                                    drawing=True)  # fmt: skip
        shown = await self._generate(visitor, "sketch", req)
        return (*shown, shown_control) if shown is not None else (gr.skip(),) * 3

    def controls(self) -> list[str]:
        """The structure controls the serving model has loaded (its ControlNets)."""
        return list(self.loop.info.get("controls") or [])

    async def controlled(self, request: Request, source: Image.Image, control, control_scale,
                          edges: tuple = (CANNY_LOW, CANNY_HIGH),
                          drawing: bool = False) -> tuple[Request, Image.Image | None]:  # fmt: skip
        """The request with its control image made from `source`, and that image (to show); the request as it
        was when the control is off or the serving model has none of that kind. A drawing with the scribble
        control drops the drawing as input image: the strokes are the control, not a blurred start."""
        kind = control if isinstance(control, str) else "off"
        if kind == "off" or kind not in self.controls():
            return request, None
        scale = _float(control_scale, "control strength")
        try:
            low, high = (_int(value, "edge threshold") if value is not None else default
                         for value, default in zip(edges, (CANNY_LOW, CANNY_HIGH)))  # fmt: skip
            image = await asyncio.to_thread(preprocess, kind, source, low, high, side=self.bounds()[0],
                                            depth=self.depth)  # fmt: skip
        except ControlError as error:
            raise _error(error) from error
        if drawing and kind == "scribble":
            request = replace(request, image=None)
        return replace(request, control=kind, control_image=image, control_scale=scale), image

    async def sweep(self, prompt, negative_prompt, guidance_scale, seed, width, height, request: gr.Request = None):
        """The page's step sweep: the same seed at 1..8 steps as one labelled grid; a newer sweep supersedes it."""
        return await self._sweep(Visitor.of(request), prompt, negative_prompt, guidance_scale, seed, width, height,
                                 one_shot=False)  # fmt: skip

    async def _sweep(self, visitor: Visitor, prompt, negative_prompt, guidance_scale, seed, width, height,
                     one_shot: bool):  # fmt: skip
        """A step sweep is one job of 8 requests; like an API call it waits for one of the one-shot places."""
        base = _txt2img_request(prompt, negative_prompt, MIN_STEPS, guidance_scale, seed, width, height)
        with self._slot(visitor, "sweep", one_shot) as slot:
            outcome = await self._run(visitor, slot, [replace(base, steps=n) for n in SWEEP_STEPS], True)
        if outcome in (SUPERSEDED, GONE):
            return gr.skip()
        results = outcome.result
        grid = step_grid([r.image for r in results], [f"{n} step{'s' * (n > 1)}" for n in SWEEP_STEPS])
        params = {**results[0].params, "steps": list(SWEEP_STEPS), "kind": "step sweep"}
        return await self.store.save(grid, params)

    async def settle(self, tab: str, request: gr.Request | None):
        """Once input has been still for a moment, replace a TAESD preview by the full VAE's decode of it."""
        await asyncio.sleep(SETTLE_AFTER_S)
        try:
            outcome = await while_connected(self.loop.settle(Visitor.of(request).slot(tab)))
        except Exception:  # e.g. the model was switched meanwhile: keep the preview
            return gr.skip()
        if outcome is None or outcome in (SUPERSEDED, GONE):
            return gr.skip()  # newer input came, nothing to upgrade, or nobody is there
        return await self.store.save(outcome.result.image, outcome.result.params)

    async def settle_txt2img(self, request: gr.Request):
        return await self.settle("txt2img", request)

    async def settle_img2img(self, request: gr.Request):
        return await self.settle("img2img", request)

    # ------------------------------------------------------------------ the API (one call, one image)
    async def api_txt2img(self, prompt, negative_prompt="", steps=4, guidance_scale=1.0, seed=0, width=None,
                          height=None, request: gr.Request = None):  # fmt: skip
        """Make an image from a text prompt with a fast few-step (LCM-LoRA) model; the same seed and parameters always
        give the same image, and the PNG carries them in its text chunks.

        Args:
            prompt: What the image shows, in English (e.g. "a lighthouse at dusk, oil painting").
            negative_prompt: What it should not show; used only when guidance_scale is above 1.
            steps: Denoising steps, 1 to 8: 1 is a rough sketch, 4 is the model's usual quality.
            guidance_scale: 1 to 2; 1 (the default for most models) is fastest, higher follows the prompt harder.
            seed: A whole number from 0 to 4294967295; change it for a different image of the same prompt.
            width: Width in pixels, a multiple of 8 (default: the model's native size).
            height: Height in pixels, a multiple of 8 (default: the model's native size).
        Returns:
            The PNG image.
        """
        req = _txt2img_request(prompt, negative_prompt, steps, guidance_scale, seed, width, height)
        shown = await self._generate(Visitor.of(request), "txt2img", req, one_shot=True)
        return shown[0] if shown is not None else gr.skip()

    async def api_img2img(self, image, prompt="", strength=0.5, steps=4, seed=0, request: gr.Request = None):
        """Redraw an image to match a text prompt (image to image), keeping its composition; the PNG carries the
        parameters.

        Args:
            image: The input image (a file, URL or data: URL); it is fitted to the model's size, keeping its aspect.
            prompt: What the result should show (e.g. "the same scene in winter").
            strength: 0.05 to 1: how far to move from the input; 0.3 keeps it close, 0.8 mostly follows the prompt.
            steps: Denoising steps, 1 to 8 (only steps x strength of them run).
            seed: A whole number from 0 to 4294967295.
        Returns:
            The PNG image.
        """
        return await self._api_image("img2img", "image", image, prompt, strength, steps, seed, request)

    async def api_webcam_frame(self, image, prompt="", strength=0.5, steps=4, seed=0, request: gr.Request = None):
        """One webcam frame redrawn to match a prompt: the same as api_img2img, for a stream of frames.

        Args:
            image: The frame.
            prompt: What the result should show.
            strength: 0.05 to 1: how far to move from the frame.
            steps: Denoising steps, 1 to 8.
            seed: A whole number from 0 to 4294967295.
        Returns:
            The PNG image.
        """
        return await self._api_image("webcam", "frame", image, prompt, strength, steps, seed, request)

    async def _api_image(self, tab: str, what: str, image, prompt, strength, steps, seed, request):
        if image is None:
            raise gr.Error(f"No {what} was received: send one as `image`.", print_exception=False)
        visitor = Visitor.of(request)
        req = _img2img_request(await self._read_image(visitor, image), prompt, strength, steps, seed)
        shown = await self._generate(visitor, tab, req, one_shot=True)
        return shown[0] if shown is not None else gr.skip()

    async def api_step_sweep(self, prompt, negative_prompt="", guidance_scale=1.0, seed=0, width=None, height=None,
                             request: gr.Request = None):  # fmt: skip
        """Compare the step counts: one prompt and seed made at 1, 2, ... 8 steps, as one labelled grid image.

        Args:
            prompt: What the images show.
            negative_prompt: What they should not show; used only when guidance_scale is above 1.
            guidance_scale: 1 to 2.
            seed: A whole number from 0 to 4294967295.
            width: Width of each image in pixels, a multiple of 8 (default: the model's native size).
            height: Height of each image in pixels, a multiple of 8 (default: the model's native size).
        Returns:
            The grid as a PNG image (two rows of four, labelled "1 step" to "8 steps").
        """
        return await self._sweep(Visitor.of(request), prompt, negative_prompt, guidance_scale, seed, width, height,
                                 one_shot=True)  # fmt: skip

    # ------------------------------------------------------------------ the model, the page's bounds
    def switch_model(self, preset, base=None, lora=None):
        """A visitor's switch, as far as the operator allows it (only wired when allowed)."""
        try:
            started = self.manager.switch_for_visitor(preset, base, lora)
        except ValueError as error:
            raise _error(error) from error
        if not started:
            gr.Warning("A model is already loading; wait for it to finish.")
        return self.manager.status_markdown()

    def bounds(self) -> tuple[int, int, str]:
        """(default side, widest side, a key that changes with them) for the serving model and the cost cap."""
        info = self.loop.info
        native = int(info["native_size"])
        widest = largest_side(self.limits.cost_cap(native))
        return min(native, widest), widest, f"{info['model']}|{native}|{widest}"

    def frame_interval(self) -> float:
        """Seconds between webcam frames: the serving model's frame time, from 1/30 s (a camera's pace) to 1 s."""
        frame_ms = self.loop.info.get("frame_ms")
        return 0.1 if frame_ms is None else min(1.0, max(1 / 30, frame_ms / 1e3))

    def defaults(self) -> dict:
        """The serving model's own steps and guidance (its recipe), for the page's sliders."""
        info = self.loop.info
        steps = int(info.get("steps", 4))
        return dict(steps=steps, guidance_scale=float(info.get("guidance_scale", 1.0)), image_steps=max(2, steps),
                    webcam_steps=max(2, steps // 2))  # fmt: skip

    def example_prompt(self) -> str:
        """The serving model's example prompt (the embedded model knows only simple shapes)."""
        return DEMO_PROMPT if self.loop.info.get("embedded") else PHOTO_PROMPT

    def model_values(self, followed: str | None, *prompts):
        """The serving model's own values for a page: the steps sliders (text, image, webcam, sketch), guidance,
        each prompt box's example where the visitor has not typed (its placeholder always), and the key of what
        it set; all skipped while the page already follows this model."""
        info = self.loop.info
        key = f"{info['model']}|{info.get('steps')}|{info.get('guidance_scale')}|{info.get('embedded')}"
        if key == followed:
            return (gr.skip(),) * (6 + len(prompts))
        defaults, example = self.defaults(), self.example_prompt()
        steps = [gr.update(value=defaults[k]) for k in ("steps", "image_steps", "webcam_steps", "image_steps")]
        boxes = [gr.update(value=example, placeholder=example) if (text or "").strip() in EXAMPLE_PROMPTS
                 else gr.update(placeholder=example) for text in prompts]  # fmt: skip
        return (*steps, gr.update(value=defaults["guidance_scale"]), *boxes, key)

    def page_load(self, *prompts):
        """A page load: the size sliders (page_bounds), then the model's own values (model_values), always set."""
        return (*self.page_bounds(), *self.model_values(None, *prompts))

    def page_status(self, shown_key: str | None, followed: str | None, *prompts):
        """The status tick: the status line and sizes (status), then the model's own values (model_values)."""
        return (*self.status(shown_key), *self.model_values(followed, *prompts))

    def page_bounds(self):
        """The size sliders for this page load: the serving model's native size, as wide as the cost cap allows."""
        side, widest, key = self.bounds()
        size = gr.update(value=side, maximum=widest)
        return size, size, key

    def status(self, shown_key: str | None):
        """The status line, and new size sliders when the model (or its cap) changed since this page set them."""
        side, widest, key = self.bounds()
        if key == shown_key:
            return self.manager.status_markdown(), gr.skip(), gr.skip(), gr.skip()
        size = gr.update(value=side, maximum=widest)
        return self.manager.status_markdown(), size, size, key

    def forget(self, request: gr.Request):
        if request is not None and request.session_hash:
            self.loop.forget(f"{Visitor.of(request).session}:")


def _txt2img_request(prompt, negative_prompt, steps, guidance_scale, seed, width, height) -> Request:
    return Request(prompt=clean_prompt(prompt), negative_prompt=clean_prompt(negative_prompt),
                   steps=_int(steps, "steps"), guidance_scale=_float(guidance_scale, "guidance_scale"),
                   seed=_int(seed, "seed"), width=_size(width, "width"), height=_size(height, "height"))  # fmt: skip


def _img2img_request(image, prompt, strength, steps, seed) -> Request:
    """`image` arrives upright, RGB and at the working size: `ui.image_input`'s preprocess made it so."""
    return Request(prompt=clean_prompt(prompt), image=image, strength=_float(strength, "strength"),
                   steps=_int(steps, "steps"), seed=_int(seed, "seed"))  # fmt: skip


def _int(value, name: str) -> int:
    try:
        return int(round(float(value)))
    except (TypeError, ValueError, OverflowError) as error:
        raise gr.Error(toast_text(f"{name} must be a number; got {value!r}."), print_exception=False) from error


def _size(value, name: str) -> int | None:
    """A width or height; None (an API call that left it out): the serving model's native size."""
    return None if value is None else _int(value, name)


def _float(value, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError) as error:
        raise gr.Error(toast_text(f"{name} must be a number; got {value!r}."), print_exception=False) from error


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
