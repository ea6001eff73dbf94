"""Control images from what visitors give: edges (OpenCV's Canny), scribbles (the sketch canvas, inverted to white
strokes on black as the scribble ControlNets expect) and depth (a transformers depth model, only where it is
downloaded). Each refuses bad input with one message naming what did not fit. No torch here but for depth.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


MODES = ("RGB", "RGBA", "L", "LA", "P")  # what the page and the API send
MIN_SIDE, MAX_SIDE = 16, 4096
MAX_ASPECT = 4.0  # longest side / shortest side
CANNY_LOW, CANNY_HIGH = 100, 200  # the canny ControlNet card's thresholds
DEPTH_MODEL = "depth-anything/Depth-Anything-V2-Small-hf"
SCRIBBLE_SIDE = 64  # strokes are kept this many pixels wide per side at least (about 1/64 of the image)


class ControlError(ValueError):
    """A control image could not be made from this input; the message says why."""


def checked_image(image, what: str = "control input") -> Image.Image:
    """`image` when it is a PIL image of a usable mode, size and aspect; ControlError naming what does not fit."""
    if not isinstance(image, Image.Image):
        raise ControlError(f"The {what} must be an image; got {type(image).__name__}.")
    if image.mode not in MODES:
        raise ControlError(f"The {what} is a {image.mode} image; give an RGB, RGBA or greyscale one.")
    width, height = image.size
    if not (MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE):
        raise ControlError(f"The {what} is {width}x{height}; each side must be from {MIN_SIDE} to {MAX_SIDE} pixels.")
    if max(width, height) / min(width, height) > MAX_ASPECT:
        raise ControlError(f"The {what} is {width}x{height}, more than {MAX_ASPECT:g} times as long as it is wide.")
    return image


def _flat_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency laid on white (a transparent canvas is blank paper)."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        paper = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(paper, image).convert("RGB")
    return image.convert("RGB")


def edges(image, low: int = CANNY_LOW, high: int = CANNY_HIGH) -> Image.Image:
    """White Canny edges on black (RGB), as the canny ControlNet's card makes them."""
    import cv2

    image = checked_image(image)
    if not (0 <= low <= high <= 1000):
        raise ControlError(f"The edge thresholds must satisfy 0 <= low <= high <= 1000; got {low} and {high}.")
    grey = np.asarray(_flat_rgb(image).convert("L"))
    found = cv2.Canny(grey, int(low), int(high))  # (H, W) uint8, 0 or 255
    return Image.fromarray(np.repeat(found[:, :, None], 3, axis=2))


def scribble(canvas, side: int | None = None, threshold: int = 128) -> Image.Image:
    """A drawing (dark strokes on light paper, or on a transparent canvas) -> white strokes on black (RGB).

    With `side`, the result's short side is `side` (the image's size; a 4:3 webcam frame keeps its shape and stays
    within the control's size limits) with strokes still solid: every block
    that a stroke touches becomes white, so thin lines do not fade away when a large canvas is scaled down."""
    canvas = checked_image(canvas, "drawing")
    ink = np.asarray(_flat_rgb(canvas).convert("L")) < threshold  # (H, W) bool: the strokes
    if not ink.any():
        raise ControlError("The drawing is empty: draw an outline, or turn the control off.")
    if ink.mean() > 0.5:  # mostly dark: already light strokes on dark paper
        ink = ~ink
    strokes = Image.fromarray(ink.astype(np.uint8) * 255)
    if side is not None:
        scale = side / max(1.0, min(canvas.width, canvas.height))
        size = (max(1, round(canvas.width * scale)), max(1, round(canvas.height * scale)))
        if size != strokes.size:
            strokes = strokes.resize(size, Image.Resampling.BOX).point(lambda v: 255 if v > 16 else 0)
    else:  # thicken to about 1/SCRIBBLE_SIDE of the image, as a scribble ControlNet sees strokes
        width = max(1, round(min(canvas.size) / SCRIBBLE_SIDE / 2) * 2 - 1)
        if width > 1:
            from PIL import ImageFilter

            strokes = strokes.filter(ImageFilter.MaxFilter(width))
    return strokes.convert("RGB")


class DepthEstimator:
    """A transformers depth-estimation pipeline, loaded once from the local cache only (never downloaded here)."""

    def __init__(self, model: str = DEPTH_MODEL, device: str = "cpu"):
        self.model, self.device = model, device
        self._pipe = None

    def load(self):
        """The pipeline; ControlError saying how to get the model when it is not downloaded or cannot load."""
        if self._pipe is None:
            try:
                from transformers import pipeline

                self._pipe = pipeline("depth-estimation", model=self.model, device=self.device,
                                      model_kwargs={"local_files_only": True})  # fmt: skip
            except Exception as error:
                raise ControlError(f"The depth model '{self.model}' is not available ({type(error).__name__}); "
                                   f"download it once with network (`hf download {self.model}`), or use another "
                                   "control.") from error  # fmt: skip
        return self._pipe

    def __call__(self, image) -> Image.Image:
        """Near is light, far is dark (RGB), as the depth ControlNets' cards make it."""
        image = checked_image(image)
        depth = self.load()(_flat_rgb(image))["depth"]  # a PIL image, the input's size
        return depth.convert("RGB")


def preprocess(kind: str, image, low: int = CANNY_LOW, high: int = CANNY_HIGH, side: int | None = None,
               depth: DepthEstimator | None = None) -> Image.Image:  # fmt: skip
    """The control image for `kind` ("scribble", "edges" or "depth") from a visitor's image or drawing."""
    if kind == "scribble":
        return scribble(image, side)
    if kind == "edges":
        return edges(image, low, high)
    if kind == "depth":
        return (depth or DepthEstimator())(image)
    raise ControlError(f"Unknown control {kind!r}; use scribble, edges or depth.")
