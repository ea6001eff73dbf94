"""An OpenAI-style images API on the app's own server (opt-in, --openai-api), for the `openai` SDK, Open WebUI, ...

POST /v1/images/generations (text to image), POST /v1/images/edits (image to image), GET /v1/models, and
GET /v1/files/<name>.png for `url` responses. Every image is made by the app's live loop as a one-shot call of its
client (a slot of its own, the client's address, the one-shot gate), so it batches with the page's visitors under
the same limits; the PNGs carry their parameters. Every error is a 4xx (or 503) in OpenAI's shape:
{"error": {"message", "type", "param", "code"}}. No torch here.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import json
import random
import re
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.datastructures import UploadFile

from .inputs import InputError, clean_prompt, load_image
from .request import MAX_SEED, MAX_STEPS, MIN_SIZE, SIZE_STEP, GenerationError, RequestRefused, checked
from .request import Request as ImageRequest
from .text import public_text
from .visitors import Visitor


if TYPE_CHECKING:
    from .handlers import LiveApp


MODEL_ID = "lcm-live"  # what /v1/models lists; any `model` a client sends is served by the app's model
MAX_N = 4  # images per call; they run as one job, batched together
FORMATS = ("b64_json", "url")  # the first is the default (gpt-image clients read b64_json without asking)
MAX_JSON_BYTES = 1_000_000  # a generation's JSON body
GONE_POLL_S = 0.2  # how often a running call looks whether its client is still there
_SIZE = re.compile(r"^\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*$")
_FILE = re.compile(r"^[0-9a-f]{32}\.png$")  # OutputStore's names


class ApiError(Exception):
    """A refused call: its HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        error = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": error}, status_code=self.status)


def upload_limit(text: str | int | None) -> int | None:
    """'20mb' -> bytes (Gradio's max_file_size forms: b, kb, mb, gb); None: no limit."""
    if text is None or isinstance(text, int):
        return text
    found = re.fullmatch(r"\s*(\d+)\s*([kmgt]?b)\s*", str(text).lower())
    if not found:
        raise ValueError(f"max_file_size must be like 20mb; got {text!r}.")
    return int(found.group(1)) * 1024 ** ["b", "kb", "mb", "gb", "tb"].index(found.group(2))


def routes(app: LiveApp, api_key: str | None = None, max_upload: int | None = None) -> list:
    """The API's routes, for the server's FastAPI app (Blocks.launch(app_kwargs={"routes": ...}))."""
    api = ImagesApi(app, api_key, max_upload)
    router = APIRouter(prefix="/v1")
    router.add_api_route("/images/generations", api.generations, methods=["POST"])
    router.add_api_route("/images/edits", api.edits, methods=["POST"])
    router.add_api_route("/models", api.models, methods=["GET"])
    router.add_api_route("/files/{name}", api.file, methods=["GET"], name="openai_file")
    router.add_api_route("/{rest:path}", api.unknown, methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    return router.routes


class ImagesApi:
    """The endpoints; each answers JSON, an ApiError's response, or (for a stored image) the PNG."""

    def __init__(self, app: LiveApp, api_key: str | None, max_upload: int | None):
        self.app, self.api_key, self.max_upload = app, api_key or None, max_upload

    # ------------------------------------------------------------------ endpoints
    async def generations(self, request: Request):
        async def answer():
            body = await _json_object(request)
            prompt = _text(body, "prompt", required=True)
            base = self._request(body, prompt, image=None)
            return await self._images(request, base, body)

        return await self._answer(request, answer)

    async def edits(self, request: Request):
        async def answer():
            form = await self._form(request)
            prompt = _text(form, "prompt", required=True)
            image = await _image(form)
            base = self._request(form, prompt, image=image)
            return await self._images(request, base, form)

        return await self._answer(request, answer)

    async def models(self, request: Request):
        async def answer():
            model = {"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "lcm-live"}
            return JSONResponse({"object": "list", "data": [model]})

        return await self._answer(request, answer)

    async def file(self, name: str):
        """A stored PNG (names are random: a url response is its only way in)."""
        path = Path(self.app.store.folder) / name
        if not _FILE.match(name) or not path.is_file():
            return ApiError(404, "No such image (images are kept for a while, then deleted).").response()
        return FileResponse(path, media_type="image/png")

    async def unknown(self, request: Request, rest: str):
        return ApiError(404, f"Unknown endpoint {request.method} /v1/{rest[:80]}; this server offers "
                             "/v1/images/generations, /v1/images/edits and /v1/models.", code="unknown_url").response()  # fmt: skip

    # ------------------------------------------------------------------ the parts
    async def _answer(self, request: Request, answer):
        """Check the key, then run `answer`; any refusal in OpenAI's shape, never a traceback."""
        try:
            self._check_key(request)
            return await answer()
        except ApiError as error:
            return error.response()
        except Exception as error:  # a bug: the server log has it, the client a plain message
            print(f"openai api: {type(error).__name__}: {error}", file=sys.stderr)
            return ApiError(500, "The server had an error making this image.", kind="server_error").response()

    def _check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "No API key was sent: send it as `Authorization: Bearer <key>`.",
                           code="invalid_api_key")  # fmt: skip
        if not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")

    async def _form(self, request: Request):
        """The multipart form, its bytes counted as they arrive: past the upload limit a 413, nothing spooled."""
        limit = self.max_upload
        declared = request.headers.get("content-length", "")
        if limit is not None and declared.isdigit() and int(declared) > limit:
            raise _too_large(int(declared), limit)
        seen = 0

        async def receive():
            nonlocal seen
            message = await request.receive()
            seen += len(message.get("body", b""))
            if limit is not None and seen > limit:
                raise _too_large(seen, limit)
            return message

        try:
            return await Request(request.scope, receive).form(max_files=2, max_fields=32)
        except ApiError:
            raise
        except Exception as error:  # malformed multipart, too many parts
            raise ApiError(400, f"The form could not be read: {public_text(str(error))[:200]}") from error

    def _request(self, fields, prompt: str, image) -> ImageRequest:
        """One image's request from the call's fields, checked against the model and the cost cap."""
        info = self.app.loop.info
        native = int(info["native_size"])
        width, height = _size(fields.get("size"))
        request = ImageRequest(
            prompt=clean_prompt(prompt), negative_prompt=clean_prompt(_text(fields, "negative_prompt")),
            steps=_number(fields, "steps", int, int(info.get("steps", 4))),
            guidance_scale=_number(fields, "guidance_scale", float, float(info.get("guidance_scale", 1.0))),
            seed=_number(fields, "seed", int, random.randint(0, MAX_SEED - MAX_N)), width=width, height=height,
            image=image, strength=_number(fields, "strength", float, 0.5),
        )  # fmt: skip
        try:
            request, _ = checked(request, native)
        except ValueError as error:
            name = str(error).split(" ", 1)[0]
            raise ApiError(400, str(error), param="size" if name in ("width", "height") else name) from error
        cap = self.app.limits.cost_cap(native)
        if request.cost() > cap:
            side = int((cap / request.unet_steps) ** 0.5) // SIZE_STEP * SIZE_STEP
            raise ApiError(400, f"{request.width}x{request.height} at {request.unet_steps} steps is more than this "
                                f"server makes in one image (at most {cap:,} pixel-steps: e.g. {side}x{side} at "
                                f"{request.unet_steps} steps, or {MAX_STEPS} steps at a smaller size).",
                           param="size", code="invalid_size")  # fmt: skip
        return request

    async def _images(self, request: Request, base: ImageRequest, fields) -> JSONResponse:
        """Run the call's n images as one job of the live loop; the PNGs as base64 or as links."""
        n = _number(fields, "n", int, 1)
        if not 1 <= n <= MAX_N:
            raise ApiError(400, f"n must be from 1 to {MAX_N} on this server; got {n}.", param="n")
        form = fields.get("response_format") or FORMATS[0]
        if form not in FORMATS:
            raise ApiError(400, f"response_format must be b64_json or url; got {str(form)[:40]!r}.",
                           param="response_format")  # fmt: skip
        requests = [ImageRequest(**{**_fields(base), "seed": base.seed + i}, image=base.image) for i in range(n)]
        client = getattr(request.client, "host", None)
        visitor = Visitor(f"openai-{uuid.uuid4().hex}", client or None, one_off=True)
        try:
            outcome = await _while_connected(request, self.app.run_one_shot(visitor, "openai", requests))
        except RequestRefused as error:
            raise ApiError(429, str(error), code="rate_limit_exceeded", kind="requests") from error
        except ValueError as error:
            raise ApiError(400, public_text(str(error))) from error
        except GenerationError as error:
            raise ApiError(503, public_text(str(error)), kind="server_error") from error
        if not hasattr(outcome, "result"):
            raise ApiError(
                503, "The server is shutting down or the call was cancelled; try again.", kind="server_error"
            )
        results = outcome.result if isinstance(outcome.result, list) else [outcome.result]
        data = []
        for result in results:
            path = Path(await self.app.store.save(result.image, result.params))
            if form == "url":
                data.append({"url": str(request.url_for("openai_file", name=path.name))})
            else:
                data.append({"b64_json": base64.b64encode(await asyncio.to_thread(path.read_bytes)).decode()})
        size = f"{results[0].image.width}x{results[0].image.height}"
        return JSONResponse({"created": int(time.time()), "data": data, "output_format": "png", "size": size})


# ---------------------------------------------------------------------- fields
async def _json_object(request: Request) -> dict:
    """The JSON body, read up to MAX_JSON_BYTES (a prompt and a few numbers; more is refused as it arrives)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_JSON_BYTES:
            raise _too_large(size, MAX_JSON_BYTES)
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except Exception as error:  # not JSON, or not UTF-8
        raise ApiError(400, "The body must be a JSON object (Content-Type: application/json).") from error
    if not isinstance(body, dict):
        raise ApiError(400, "The body must be a JSON object.")
    return body


def _text(fields, name: str, required: bool = False) -> str:
    value = fields.get(name)
    if value is None:
        if required:
            raise ApiError(
                400, f"Missing required parameter: '{name}'.", param=name, code="missing_required_parameter"
            )
        return ""
    if not isinstance(value, str):
        raise ApiError(400, f"{name} must be a string; got {type(value).__name__}.", param=name, code="invalid_type")
    return value


def _number(fields, name: str, kind: type, default):
    """A number from JSON (a number) or a form (its text); the default when absent."""
    value = fields.get(name)
    if value is None or value == "":
        return default
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise TypeError
        number = float(value)
        if kind is int and number != int(number):
            raise ValueError
        return kind(number)
    except (TypeError, ValueError, OverflowError) as error:
        what = "a whole number" if kind is int else "a number"
        raise ApiError(400, f"{name} must be {what}; got {str(value)[:40]!r}.", param=name,
                       code="invalid_type") from error  # fmt: skip


def _size(value) -> tuple[int | None, int | None]:
    """'WxH' -> (W, H); None or 'auto' -> the model's native size (or the input image's shape)."""
    if value is None or value == "auto":
        return None, None
    found = _SIZE.match(value) if isinstance(value, str) else None
    if not found:
        raise ApiError(400, f"size must be WIDTHxHEIGHT (e.g. 512x512, multiples of {SIZE_STEP}, at least {MIN_SIZE}) "
                            f"or auto; got {str(value)[:40]!r}.", param="size", code="invalid_size")  # fmt: skip
    return int(found.group(1)), int(found.group(2))


async def _image(form) -> object:
    """The uploaded image (`image`, or the first `image[]`), decoded by inputs.load_image."""
    upload = form.get("image") or form.get("image[]")
    if upload is None:
        raise ApiError(400, "Missing required parameter: 'image' (a file).", param="image",
                       code="missing_required_parameter")  # fmt: skip
    if not isinstance(upload, UploadFile):
        raise ApiError(400, "image must be a file upload (multipart/form-data).", param="image", code="invalid_type")
    data = await upload.read()
    try:
        return await asyncio.to_thread(load_image, io.BytesIO(data))
    except InputError as error:
        raise ApiError(400, public_text(str(error)), param="image", code="invalid_image") from error


def _fields(request: ImageRequest) -> dict:
    return {name: getattr(request, name) for name in ("prompt", "negative_prompt", "steps", "guidance_scale",
                                                      "seed", "width", "height", "strength", "decoder")}  # fmt: skip


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(413, f"The request is over {size / 1e6:.1f} MB; the limit is {limit / 1e6:.1f} MB.",
                    code="request_too_large")  # fmt: skip


async def _while_connected(request: Request, awaitable):
    """Await `awaitable`; cancel it once the client hangs up (the live loop then drops or stops its job)."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=GONE_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise ApiError(499, "The client closed the connection.")
    except asyncio.CancelledError:
        task.cancel()
        raise
