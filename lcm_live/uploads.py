"""What visitors send through Gradio's image components, bounded: the sketch pad's blobs, and web addresses.

The editor's page uploads the canvas as blobs (`accept_blobs` at `/gradio_api/component_server/`), then sends an
event naming them by an id of its choosing. Gradio keeps those blobs in one dictionary for every session, frees them
only when an event names them, sizes a list by a client-given index, and decodes every layer itself. Here only the
flattened canvas (the composite) is kept, within a budget per address and for a minute at most; the layers and the
background are not kept; and the composite is decoded by the handler through `inputs.load_image`, like any upload.
An image given as an http(s) address is refused: Gradio would download it whole, with no size cap.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import gradio as gr
from fastapi import HTTPException
from gradio.components.base import server

from .inputs import URL_REFUSED, ImageUpload, is_web_address


MAX_LAYERS = 8  # layers a canvas may send (the page sends one or two)
BLOB_TTL_S = 60.0  # a blob that no event claims is forgotten after this
BLOBS_PER_ADDRESS = 16
BYTES_PER_ADDRESS = 32 * 1024 * 1024
BYTES_IN_ALL = 256 * 1024 * 1024
MAX_ID_CHARS = 64
KINDS = ("composite", "background", "layer")


class BlobRefused(ValueError):
    """A blob the editor's upload function does not take; the message says why."""


@dataclass
class _Blob:
    data: bytes
    address: str | None
    stored: float


class SketchBlobs:
    """Composites waiting for the event that names them: bounded per address, in all, and in time. Thread-safe."""

    def __init__(self, per_address: int = BLOBS_PER_ADDRESS, bytes_per_address: int = BYTES_PER_ADDRESS,
                 bytes_in_all: int = BYTES_IN_ALL, ttl_s: float = BLOB_TTL_S):  # fmt: skip
        self.per_address, self.bytes_per_address, self.bytes_in_all, self.ttl_s = (
            per_address, bytes_per_address, bytes_in_all, ttl_s)  # fmt: skip
        self._blobs: OrderedDict[str, _Blob] = OrderedDict()  # id -> blob, oldest first
        self._lock = threading.Lock()

    def put(self, blob_id: str, data: bytes, address: str | None) -> None:
        with self._lock:
            self._expire(time.monotonic())
            self._blobs.pop(blob_id, None)  # a page sends a new canvas under a new id; a repeated id replaces
            mine = [b for b in self._blobs.values() if b.address == address]
            if address is not None and (len(mine) >= self.per_address
                                        or sum(len(b.data) for b in mine) + len(data) > self.bytes_per_address):  # fmt: skip
                raise BlobRefused("Too many sketch uploads waiting from your address; wait a moment.")
            if self.size() + len(data) > self.bytes_in_all:
                raise BlobRefused("The server holds too many sketch uploads right now; try again in a moment.")
            self._blobs[blob_id] = _Blob(data, address, time.monotonic())

    def take(self, blob_id: str) -> bytes | None:
        with self._lock:
            self._expire(time.monotonic())
            blob = self._blobs.pop(blob_id, None)
        return None if blob is None else blob.data

    def size(self) -> int:
        return sum(len(b.data) for b in self._blobs.values())

    def __len__(self) -> int:
        return len(self._blobs)

    def _expire(self, now: float) -> None:
        while self._blobs:
            blob_id, blob = next(iter(self._blobs.items()))
            if now - blob.stored <= self.ttl_s:
                return
            del self._blobs[blob_id]


def _check(fields: dict, files: list) -> tuple[str, str]:
    """(kind, id) of one blob upload; BlobRefused naming what is wrong."""
    kind, blob_id, index = fields.get("type"), fields.get("id"), fields.get("index")
    if kind not in KINDS:
        raise BlobRefused(f"A sketch upload's type must be one of {', '.join(KINDS)}.")
    if not isinstance(blob_id, str) or not 0 < len(blob_id) <= MAX_ID_CHARS:
        raise BlobRefused(f"A sketch upload needs an id of 1 to {MAX_ID_CHARS} characters.")
    if kind == "layer":
        try:
            number = int(index)
        except (TypeError, ValueError):
            raise BlobRefused("A sketch layer's index must be a whole number.") from None
        if not 0 <= number < MAX_LAYERS:
            raise BlobRefused(f"A sketch may have at most {MAX_LAYERS} layers.")
    if len(files) != 1 or not isinstance(files[0], (tuple, list)) or not isinstance(files[0][1], bytes):
        raise BlobRefused("A sketch upload carries exactly one file.")
    return kind, blob_id


def bound_sketchpad(editor: gr.ImageEditor, blobs: SketchBlobs) -> gr.ImageEditor:
    """`editor` with its upload function and its preprocess replaced by bounded ones (set on the instance)."""

    @server
    def accept_blobs(data, request: gr.Request):
        """Keep the canvas's composite for the event that will name it; the layers and background are not kept."""
        try:
            fields, files = getattr(data, "data", None), getattr(data, "files", None)
            if not isinstance(fields, dict) or not isinstance(files, list):
                raise BlobRefused("A sketch upload must be a form with one file.")
            kind, blob_id = _check(fields, files)
            if kind == "composite":
                blobs.put(blob_id, files[0][1], getattr(request.client, "host", None) if request else None)
        except BlobRefused as error:
            raise HTTPException(status_code=429 if "Too many" in str(error) else 400, detail=str(error)) from None

    def preprocess(payload):
        """{"composite": an ImageUpload the handler decodes} (no layer or background is decoded)."""
        if payload is None:
            return None
        if payload.id is not None:
            data = blobs.take(payload.id)
            composite = None if data is None else ImageUpload(None, None, data=data)
        else:  # an API client's FileData values
            if len(payload.layers) > MAX_LAYERS:
                raise gr.Error(f"A sketch may have at most {MAX_LAYERS} layers.", print_exception=False)
            file = payload.composite
            composite = None if file is None else ImageUpload(file.path, file.url)
        return {"background": None, "layers": [], "composite": composite}

    editor.accept_blobs = accept_blobs
    editor.preprocess = preprocess
    return refuse_web_addresses(editor)


def refuse_web_addresses(component):
    """`component` with Gradio's fetching of http(s) inputs refused: it downloads a URL whole, with no size cap."""
    fetch = component.async_move_resource_to_block_cache

    async def move_to_cache(url_or_file_path):
        if is_web_address(str(url_or_file_path)):
            raise gr.Error(URL_REFUSED, print_exception=False)
        return await fetch(url_or_file_path)

    component.async_move_resource_to_block_cache = move_to_cache
    return component
