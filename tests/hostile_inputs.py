"""Hostile and odd inputs, built cheaply; the raw queue client that behaves like one browser session lives in the
package (`lcm_live.bench.page_client`) and is re-exported here."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
from PIL import Image

from lcm_live.bench.page_client import QueueSession, error_text, output_file  # noqa: F401 (re-exported)


# ---------------------------------------------------------------------------------------------------- images
def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def constant_png(width: int, height: int, mode: str = "RGB", value: int = 90) -> bytes:
    """A width x height PNG of one colour, written row by row: a 12000x12000 image costs ~1 MB and no big buffer."""
    channels, color_type = {"L": (1, 0), "RGB": (3, 2), "RGBA": (4, 6)}[mode]

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    row = b"\x00" + bytes([value]) * (width * channels)  # filter byte 0, then the pixels
    packer = zlib.compressobj(9)
    parts = []
    rows_per_feed = max(1, (1 << 22) // len(row))
    block = row * rows_per_feed
    done = 0
    while done < height:
        count = min(rows_per_feed, height - done)
        parts.append(packer.compress(block if count == rows_per_feed else row * count))
        done += count
    parts.append(packer.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def odd_images() -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, file name): modes and formats a user may send, each one usable."""
    gradient = np.linspace(0, 65535, 96 * 64, dtype=np.uint16).reshape(64, 96)
    palette = Image.new("P", (96, 64), 1)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.paste(0, (0, 0, 48, 64))
    tall = Image.new("RGB", (48, 96), "orange")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    return {
        "rgba": (encode(Image.new("RGBA", (96, 64), (255, 0, 0, 128))), "rgba.png"),
        "la": (encode(Image.new("LA", (96, 64), (100, 50))), "la.png"),
        "cmyk-jpeg": (encode(Image.new("CMYK", (96, 64), (0, 255, 0, 0)), "JPEG"), "cmyk.jpg"),
        "palette-transparency": (encode(palette, transparency=0), "palette.png"),
        "png-16-bit": (encode(Image.fromarray(gradient, "I;16")), "deep.png"),
        "greyscale": (encode(Image.new("L", (96, 64), 128)), "grey.png"),
        "exif-rotated": (encode(tall, "JPEG", exif=exif.tobytes()), "rotated.jpg"),
        "gif": (encode(Image.new("P", (96, 64), 3), "GIF"), "anim.gif"),
    }


def broken_images() -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, file name): files that are not usable images."""
    good = encode(Image.new("RGB", (64, 64), "red"))
    jpeg = encode(Image.new("RGB", (256, 256), "blue"), "JPEG")
    return {
        "truncated-png": (good[:60], "broken.png"),
        "truncated-jpeg": (jpeg[: len(jpeg) // 2], "broken.jpg"),
        "not-an-image": (b"hello, this is text, not pixels\n" * 4, "text.png"),
        "empty": (b"", "empty.png"),
        "html-named": (b"GIF89a" + b"\0" * 20, "<img src=x onerror=alert(1)>.gif"),
    }
