"""Sanitise what users send: images of any mode, size or orientation, and prompts of any length.

Everything here assumes hostile input: a file that is not an image, a truncated one, a decompression bomb
(a few kilobytes that decode to gigabytes), a `data:` URL that skips the upload size limit, a prompt of
megabytes or with markup in it. Each case ends in a usable value or an InputError whose message says why
and what to do; none ends in a crash or an unbounded allocation.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


MAX_INPUT_PIXELS = 40_000_000  # e.g. 8000 x 5000; larger images are refused before they are decoded
MAX_WORKING_SIDE = 2048  # images are downscaled to at most this side before use
MAX_DATA_URL_BYTES = 20 * 1024 * 1024  # a data: URL's decoded size when the server sets no upload limit
# Formats a browser, a phone or a camera sends; Pillow's rarer decoders (FITS, PSD, GD, DDS, ...) have had most
# of its memory-safety and decompression-bomb advisories, and nobody uploads them to an image playground.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
BIG_DECODE_PIXELS = 4_000_000  # decodes above this take a turn: at most two run at once (bounded peak memory)
URL_REFUSED = (
    "Images are not fetched from web addresses: send the image itself (an upload, a paste, or a data: URL)."
)

Image.MAX_IMAGE_PIXELS = MAX_INPUT_PIXELS  # Pillow refuses decompression bombs above 2x this when opening

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_BOMB = re.compile(r"\((\d+) pixels\)")
_BIG_DECODES = threading.BoundedSemaphore(2)
_TRANSPOSE = {  # EXIF orientation -> the transpose that makes the image upright (as ImageOps.exif_transpose)
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class InputError(ValueError):
    """Input the app cannot use; the message says why and what to do."""


def clean_prompt(text: str | None) -> str:
    """The prompt as text, control characters blanked (the engine cuts its length, with a warning)."""
    return _CONTROL.sub(" ", text if isinstance(text, str) else "" if text is None else str(text))


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.0f} megapixels"


def _too_large(width: int, height: int) -> InputError:
    return InputError(
        f"The image is {width}x{height} ({_megapixels(width * height)}); the limit is "
        f"{_megapixels(MAX_INPUT_PIXELS)}. Please send a smaller image."
    )


def _flatten(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB: transparency over white, CMYK converted, 16-bit scaled to 8-bit."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float32)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0, 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))  # 4 bytes a pixel at most, where alpha_composite took 15
        return flat
    return image.convert("RGB")


def _open(source) -> Image.Image:
    try:
        return Image.open(source, formats=FORMATS)
    except Image.DecompressionBombError as error:
        found = _BOMB.search(str(error))
        pixels = f" ({_megapixels(int(found.group(1)))})" if found else ""
        raise InputError(
            f"The image is too large{pixels}; the limit is {_megapixels(MAX_INPUT_PIXELS)}. Please send a smaller image."
        ) from error
    except UnidentifiedImageError as error:
        raise InputError(f"This file is not an image in a supported format ({', '.join(FORMATS)}).") from error


def load_image(source: str | Path | io.BytesIO | Image.Image | np.ndarray | None) -> Image.Image | None:
    """An RGB image, upright, at most MAX_WORKING_SIDE on a side; InputError for unusable input.

    The size is checked from the header before any pixel is decoded; JPEGs decode at reduced size; the image
    is shrunk before it is flattened and rotated, so the peak memory is about one decoded copy.
    """
    if source is None:
        return None
    if isinstance(source, np.ndarray):
        if source.ndim not in (2, 3) or source.size == 0:
            raise InputError(f"Expected an image array, got shape {source.shape}.")
        source = Image.fromarray(source.astype(np.uint8) if source.dtype != np.uint8 else source)
    try:
        image = source if isinstance(source, Image.Image) else _open(source)
        width, height = image.size
        if width * height > MAX_INPUT_PIXELS:
            raise _too_large(width, height)
        if width < 1 or height < 1:
            raise InputError(f"The image is {width}x{height}: it has no pixels.")
        if image.format == "JPEG":
            image.draft("RGB", (MAX_WORKING_SIDE, MAX_WORKING_SIDE))  # decode big JPEGs at reduced size
        big = width * height > BIG_DECODE_PIXELS
        if big:
            _BIG_DECODES.acquire()
        try:
            image.load()
            # After load(), inside the bounded section: for a PNG, getexif() decodes the whole image to find an
            # eXIf chunk after the pixels, so called earlier it was an unbounded decode of its own.
            orientation = image.getexif().get(0x0112, 1)
            if image.mode in ("P", "PA", "1", "CMYK", "YCbCr", "LAB", "HSV"):
                image = image.convert("RGBA" if "transparency" in image.info or image.mode == "PA" else "RGB")
            if max(image.size) > MAX_WORKING_SIDE:
                image = image.copy() if image is source else image
                image.thumbnail((MAX_WORKING_SIDE, MAX_WORKING_SIDE), Image.Resampling.LANCZOS)
        finally:
            if big:
                _BIG_DECODES.release()
    except InputError:
        raise
    except Image.DecompressionBombError as error:
        raise InputError(
            f"The image is too large to open safely; the limit is {_megapixels(MAX_INPUT_PIXELS)}."
        ) from error
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as error:
        raise InputError(f"This file is not a readable image ({type(error).__name__}: {error}).") from error
    image = _flatten(image)
    if orientation in _TRANSPOSE:
        image = image.transpose(_TRANSPOSE[orientation])
    image.info = {}  # upright now: an EXIF orientation left here would rotate it again when loaded again
    return image


def data_url_bytes(url: str, max_bytes: int | float | None = None) -> bytes:
    """The bytes inside a `data:[<type>][;base64],<data>` URL; InputError when malformed or over `max_bytes`.

    A data: URL reaches the handler without passing the upload route, so its size is checked here, from its
    length, before anything is decoded.
    """
    limit = MAX_DATA_URL_BYTES if max_bytes is None else max_bytes
    header, comma, payload = url.partition(",")
    if not comma or not header.startswith("data:"):
        raise InputError("The image data: URL is malformed: expected data:image/...;base64,<data>.")
    if not header.endswith(";base64"):
        raise InputError("The image data: URL must be base64-encoded (data:image/png;base64,...).")
    size = len(payload) * 3 // 4
    if size > limit:
        raise InputError(
            f"The image is {size / 1e6:.1f} MB; the limit is {limit / 1e6:.1f} MB. Please send a smaller image."
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as error:
        raise InputError(f"The image data: URL is not valid base64 ({error}).") from error


def image_from_payload(path: str | None, url: str | None, max_bytes: int | float | None = None) -> Image.Image:
    """The image an upload (`path`, a file in the server's cache) or a data: URL (`url`) carries, via load_image."""
    if url and url.startswith("data:"):
        return load_image(io.BytesIO(data_url_bytes(url, max_bytes)))
    if not path:
        raise InputError("No image was received: upload, paste or pick an image.")
    if is_web_address(path):
        raise InputError(URL_REFUSED)
    return load_image(path)


def is_web_address(reference: str | None) -> bool:
    return isinstance(reference, str) and reference.lower().startswith(("http://", "https://", "//"))


@dataclass(frozen=True)
class ImageUpload:
    """An image as it arrived (an upload in the cache, or a data: URL), not decoded yet: the handler decodes it
    once it knows who sent it, so that an address's share is checked before any pixel is."""

    path: str | None
    url: str | None
    max_bytes: int | float | None = None
    data: bytes | None = None  # the file's bytes, where it came in a form rather than through the upload route

    def load(self) -> Image.Image:
        if self.data is not None:
            return load_image(io.BytesIO(self.data))
        return image_from_payload(self.path, self.url, self.max_bytes)
