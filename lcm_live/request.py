"""What a user asks for and what comes back: Request, Result, Timings, their bounds and errors. No torch here.

The page takes its slider bounds from here, the live loop prices and checks requests with it before they queue,
and the engine fills in defaults with `checked`; so a bound is written once.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from PIL import Image


MIN_STEPS, MAX_STEPS = 1, 8
MIN_GUIDANCE, MAX_GUIDANCE = 1.0, 2.0
MIN_SIZE, MAX_SIZE, SIZE_STEP = 64, 2048, 8
MIN_STRENGTH, MAX_STRENGTH = 0.05, 1.0  # the page's strength slider; the engine accepts any value in (0, 1]
MAX_SEED = 2**32 - 1
MAX_PROMPT_CHARS = 1000  # far past 77 tokens; longer text is cut before it reaches the tokenizer
MAX_TEXT_CHARS = 64 * 1024  # any text value in a request; longer ones are refused before they are stored
DECODERS = ("auto", "full", "tiny")  # auto: the fast preview decoder when one is loaded
CONTROLS = ("scribble", "edges", "depth")  # structure controls a model may have loaded (see lcm_live/control.py)
MIN_CONTROL_SCALE, MAX_CONTROL_SCALE = 0.0, 2.0  # the ControlNet's conditioning scale
MIN_CONTROL_SIDE, MAX_CONTROL_SIDE = 64, 4096  # a control image's sides, in pixels
MAX_CONTROL_ASPECT_GAP = 1.25  # how far a control image's aspect may be from the image's (it is cropped to fit)


class GenerationStopped(Exception):
    """Raised inside a generation when its caller asked it to stop; `steps_done` UNet steps had run."""

    def __init__(self, steps_done: int):
        super().__init__(f"stopped after {steps_done} step(s)")
        self.steps_done = steps_done


class GenerationError(RuntimeError):
    """A generation failed in a way the user should hear about (out of memory, NaN output)."""


class ModelLoadError(RuntimeError):
    """A model could be neither fetched nor found; the message says which id and what to do."""


class RequestRefused(ValueError):
    """The service will not take this request now (too costly, too many from one visitor); the message says why."""


@dataclass(frozen=True)
class Request:
    prompt: str = ""
    negative_prompt: str = ""  # used only when guidance_scale > 1
    steps: int = 4
    guidance_scale: float = 1.0
    seed: int = 0
    width: int | None = None  # None: the model's native size (or the input image's shape, fitted)
    height: int | None = None
    image: Image.Image | None = field(default=None, compare=False)  # given: image-to-image
    strength: float = 0.5  # image-to-image only: how far from the input image to go
    decoder: str = "auto"  # "auto", "full" or "tiny"
    control: str | None = None  # a structure control the model has loaded ("scribble", "edges", "depth"), or None
    control_image: Image.Image | None = field(default=None, compare=False)  # what that control sees (preprocessed)
    control_scale: float = 1.0  # the control's conditioning scale, 0 (none) to 2

    @property
    def mode(self) -> str:
        return "img2img" if self.image is not None else "txt2img"

    @property
    def unet_steps(self) -> int:
        """UNet calls this request makes: image-to-image runs int(steps * strength) of them, at least one."""
        if self.image is None:
            return int(self.steps)
        return max(1, min(int(self.steps), int(self.steps * effective_strength(self))))

    @property
    def pixel_size(self) -> tuple[int, int]:
        """(width, height) of a checked request."""
        return int(self.width or 0), int(self.height or 0)

    def cost(self) -> int:
        """What a request costs the service: pixels x UNet steps (call on a checked request)."""
        return int(self.width or 0) * int(self.height or 0) * self.unet_steps


def effective_strength(request: Request) -> float:
    """The strength actually used: raised just enough that at least one UNet step runs, at most 1."""
    strength = request.strength
    if request.steps * strength < 1:
        strength = 1.0 / request.steps + 1e-6
    return min(strength, 1.0)


@dataclass
class Timings:
    text_ms: float = 0.0
    denoise_ms: float = 0.0
    decode_ms: float = 0.0
    total_ms: float = 0.0
    unet_steps: int = 0
    text_cached: bool = False
    batch: int = 1  # the most rows that shared a UNet call with this one
    warming_up: bool = False  # some steps ran before this size's CUDA graph was captured (slower, once)


@dataclass
class Result:
    image: Image.Image
    params: dict  # exactly what produced `image`; goes into the PNG text chunk
    timings: Timings
    latents: Any = None  # (1, 4, H/8, W/8) on the engine's device, for a later sharper decode
    warnings: list[str] = field(default_factory=list)


def image_digest(image: Image.Image) -> str:
    """A short fingerprint of an input image's pixels, recorded in the parameters of images made from it (two
    checksums, not a cryptographic hash: it tells inputs apart, in a fraction of a millisecond per frame)."""
    import zlib

    pixels = f"{image.mode} {image.size} ".encode() + image.tobytes()
    return f"{zlib.crc32(pixels):08x}{zlib.adler32(pixels):08x}"


def _round8(value: float) -> int:
    return max(MIN_SIZE, int(round(value / SIZE_STEP)) * SIZE_STEP)


def fit_size(width: int, height: int, side: int) -> tuple[int, int]:
    """The size with the aspect of (width, height) and the area of side x side, in multiples of 8."""
    scale = (side * side / (width * height)) ** 0.5
    return min(MAX_SIZE, _round8(width * scale)), min(MAX_SIZE, _round8(height * scale))


def checked(request: Request, native_size: int) -> tuple[Request, list[str]]:
    """The request with defaults filled in, plus warnings; ValueError naming the bound for a bad value."""
    warnings = []
    if not isinstance(request.prompt, str) or not isinstance(request.negative_prompt, str):
        raise ValueError("The prompt and negative prompt must be text.")
    if not MIN_STEPS <= int(request.steps) <= MAX_STEPS or int(request.steps) != request.steps:
        raise ValueError(f"steps must be a whole number from {MIN_STEPS} to {MAX_STEPS}; got {request.steps}.")
    if not MIN_GUIDANCE <= request.guidance_scale <= MAX_GUIDANCE:
        raise ValueError(f"guidance_scale must be from {MIN_GUIDANCE} to {MAX_GUIDANCE}; got {request.guidance_scale}.")
    if not 0 <= int(request.seed) <= MAX_SEED or int(request.seed) != request.seed:
        raise ValueError(f"seed must be a whole number from 0 to {MAX_SEED}; got {request.seed}.")
    if request.image is not None and not 0 < request.strength <= 1:
        raise ValueError(f"strength must be above 0 and at most 1; got {request.strength}.")
    if request.decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {', '.join(DECODERS)}; got {request.decoder!r}.")
    _check_control(request)
    shape = request.image if request.image is not None else request.control_image
    if shape is not None:
        default_width, default_height = fit_size(shape.width, shape.height, native_size)
    else:
        default_width = default_height = native_size
    width = default_width if request.width is None else request.width
    height = default_height if request.height is None else request.height
    for name, value in (("width", width), ("height", height)):
        if not MIN_SIZE <= value <= MAX_SIZE or value % SIZE_STEP:
            raise ValueError(f"{name} must be a multiple of {SIZE_STEP} from {MIN_SIZE} to {MAX_SIZE}; got {value}.")
    if request.control_image is not None:
        _check_control_aspect(request.control_image, width, height)
    prompt = request.prompt[:MAX_PROMPT_CHARS]  # cut before anything tokenizes it
    if len(prompt) < len(request.prompt):
        warnings.append(
            f"The prompt was cut to its first {MAX_PROMPT_CHARS} of {len(request.prompt)} characters; "
            f"it now ends with \u201c{prompt[-40:]}\u201d."
        )
    return replace(request, prompt=prompt, negative_prompt=request.negative_prompt[:MAX_PROMPT_CHARS],
                   width=int(width), height=int(height), steps=int(request.steps),
                   seed=int(request.seed)), warnings  # fmt: skip


def _check_control(request: Request) -> None:
    """ValueError naming what does not fit in a request's control fields."""
    if request.control is None:
        if request.control_image is not None:
            raise ValueError(f"A control image was given without a control; choose one of {', '.join(CONTROLS)}.")
        return
    if request.control not in CONTROLS:
        raise ValueError(f"control must be one of {', '.join(CONTROLS)} (or none); got {request.control!r}.")
    scale = request.control_scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (
            MIN_CONTROL_SCALE <= scale <= MAX_CONTROL_SCALE):  # fmt: skip
        raise ValueError(f"control_scale must be from {MIN_CONTROL_SCALE:g} to {MAX_CONTROL_SCALE:g}; got {scale!r}.")
    image = request.control_image
    if image is None:
        raise ValueError(f"The {request.control} control needs a control image.")
    if not isinstance(image, Image.Image) or image.mode not in ("RGB", "L"):
        mode = image.mode if isinstance(image, Image.Image) else type(image).__name__
        raise ValueError(f"The control image must be an RGB or greyscale image; got {mode}.")
    if not all(MIN_CONTROL_SIDE <= side <= MAX_CONTROL_SIDE for side in image.size):
        raise ValueError(f"The control image is {image.width}x{image.height}; each side must be from "
                         f"{MIN_CONTROL_SIDE} to {MAX_CONTROL_SIDE} pixels.")  # fmt: skip


def _check_control_aspect(image: Image.Image, width: int, height: int) -> None:
    gap = (image.width / image.height) / (width / height)
    if not 1 / MAX_CONTROL_ASPECT_GAP <= gap <= MAX_CONTROL_ASPECT_GAP:
        raise ValueError(f"The control image is {image.width}x{image.height} but the image is {width}x{height}: "
                         "their shapes differ too much to line up; give a control image of the image's shape.")


def hud_line(timings: Timings, wait_ms: float, fps: float, runtime: str, model: str) -> str:
    """The HUD's plain-text line: latency, rate, stage times, where it ran and on what model."""
    text = "cached" if timings.text_cached else f"{timings.text_ms:.0f} ms"
    batch = f" · batch {timings.batch}" if timings.batch > 1 else ""
    batch += " · warming up" if timings.warming_up else ""
    return (
        f"{wait_ms:.0f} ms · {fps:.1f} fps · text {text} · denoise {timings.denoise_ms:.0f} ms "
        f"({timings.unet_steps} steps{batch}) · decode {timings.decode_ms:.0f} ms · {runtime} · {model}"
    )
