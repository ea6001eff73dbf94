"""Sanitise what users send: images of any mode, size or orientation, and prompts of any length."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


MAX_INPUT_PIXELS = 40_000_000  # e.g. 8000 x 5000; larger images are refused before they are decoded
MAX_WORKING_SIDE = 2048  # images are downscaled to at most this side before use
MAX_PROMPT_CHARS = 1000

Image.MAX_IMAGE_PIXELS = MAX_INPUT_PIXELS  # Pillow refuses decompression bombs above 2x this when opening

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


class InputError(ValueError):
    """Input the app cannot use; the message says why and what to do."""


def clean_prompt(text: str | None) -> tuple[str, list[str]]:
    """The prompt without control characters, cut to MAX_PROMPT_CHARS; (prompt, warnings)."""
    text = _CONTROL.sub(" ", text or "")
    if len(text) > MAX_PROMPT_CHARS:
        return text[:MAX_PROMPT_CHARS], [f"The prompt was cut to its first {MAX_PROMPT_CHARS} characters."]
    return text, []


def _flatten(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB: transparency over white, CMYK converted, 16-bit scaled to 8-bit."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0, 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(source: str | Path | Image.Image | np.ndarray | None) -> Image.Image | None:
    """An RGB image, upright, at most MAX_WORKING_SIDE on a side; InputError for unusable input."""
    if source is None:
        return None
    if isinstance(source, np.ndarray):
        if source.ndim not in (2, 3) or source.size == 0:
            raise InputError(f"Expected an image array, got shape {source.shape}.")
        source = Image.fromarray(source.astype(np.uint8) if source.dtype != np.uint8 else source)
    try:
        image = source if isinstance(source, Image.Image) else Image.open(source)
        width, height = image.size
        if width * height > MAX_INPUT_PIXELS:
            raise InputError(
                f"The image is {width}x{height} ({width * height / 1e6:.0f} megapixels); "
                f"the limit is {MAX_INPUT_PIXELS / 1e6:.0f} megapixels. Please send a smaller image."
            )
        if image.format == "JPEG":
            image.draft("RGB", (MAX_WORKING_SIDE, MAX_WORKING_SIDE))  # decode big JPEGs at reduced size
        image = ImageOps.exif_transpose(image)
        image.load()
    except InputError:
        raise
    except Image.DecompressionBombError as error:
        raise InputError(f"The image is too large to open safely: {error}") from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise InputError(f"This file is not a readable image ({type(error).__name__}: {error}).") from error
    image = _flatten(image)
    if max(image.size) > MAX_WORKING_SIDE:
        image.thumbnail((MAX_WORKING_SIDE, MAX_WORKING_SIDE), Image.Resampling.LANCZOS)
    return image
