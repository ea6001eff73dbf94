"""The engine: one cached LCM-LoRA pipeline, loaded once, shared by text-to-image and image-to-image.

Loading follows the diffusers docs for LCM-LoRA: `from_pretrained`, `load_lora_weights`, `fuse_lora`,
`LCMScheduler.from_config`. Per request only the work that request needs runs: text embeddings are cached by
prompt, and a generation can be stopped at any step boundary.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict

import numpy as np
import torch
from diffusers import AutoencoderTiny, AutoPipelineForImage2Image
from PIL import Image

from .device import Runtime
from .loading import load_pipeline, load_taesd, public_id
from .presets import ModelSpec
from .request import (
    GenerationError,
    GenerationStopped,
    ModelLoadError,
    Request,
    Result,
    Timings,
    checked,
    effective_strength,
)


EMBEDDING_CACHE_SIZE = 64


def _fill_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """Resize to cover (width, height), then crop the centre."""
    scale = max(width / image.width, height / image.height)
    resized = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))),
                           Image.Resampling.LANCZOS)  # fmt: skip
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Engine:
    """Owns one pipeline; `generate` runs a Request. Callers serialise their calls (the live loop does)."""

    def __init__(self, pipe, spec: ModelSpec, runtime: Runtime, family: str, tiny_vae: AutoencoderTiny | None = None):
        self.txt2img = pipe
        self.img2img = AutoPipelineForImage2Image.from_pipe(pipe)  # same UNet, VAE and text encoders
        self.img2img.set_progress_bar_config(disable=True)
        self.spec, self.runtime, self.family = spec, runtime, family
        self.full_vae = pipe.vae
        self.tiny_vae = tiny_vae
        self.native_size = spec.native_size or pipe.unet.config.sample_size * pipe.vae_scale_factor
        self._embeddings: OrderedDict[tuple, tuple[dict, list[str]]] = OrderedDict()  # key -> (kwargs, warnings)
        self._lock = threading.Lock()
        self.notes: list[str] = []  # things the user should know about this load (shown on the page)
        self.compiled = False  # a compiled UNet stops at step boundaries only (hooks would force recompiles)

    @classmethod
    def load(cls, spec: ModelSpec, runtime: Runtime, taesd: bool = False, local_files_only: bool = False,
             warmup: bool = True, progress=None, compile: bool = False) -> Engine:  # fmt: skip
        """Load `spec` once: weights, LoRA fused, LCMScheduler; optional TAESD and torch.compile; one warm-up run."""
        pipe, family = load_pipeline(spec, runtime, local_files_only, progress)
        if compile:  # compiled on the warm-up run below; a new image size compiles again
            pipe.unet = torch.compile(pipe.unet)
        tiny, notes = None, []
        if taesd:
            try:
                tiny = load_taesd(family, runtime, local_files_only)
            except ModelLoadError as error:  # the full VAE still works: serve with it and say so
                notes.append(f"TAESD unavailable, decoding with the full VAE. {error}")
        engine = cls(pipe, spec, runtime, family, tiny)
        engine.notes = notes
        engine.compiled = compile
        if warmup or compile:
            if progress:
                progress(0.95, "Compiling the UNet (once per image size)" if compile else "Warming up")
            start = time.perf_counter()
            engine.generate(Request(prompt="warm-up", steps=2))
            if compile:
                engine.notes.append(f"UNet compiled with torch.compile in {time.perf_counter() - start:.0f} s.")
        return engine

    # ------------------------------------------------------------------ checks
    def check(self, request: Request) -> tuple[Request, list[str]]:
        """The request with defaults filled in, plus warnings; ValueError with the bound for bad values."""
        return checked(request, self.native_size)

    # ------------------------------------------------------------------ text
    def encode_text(self, prompt: str, negative_prompt: str, guided: bool) -> tuple[dict, bool, list[str]]:
        """Prompt embeddings as pipeline kwargs, from the cache when this prompt was seen; (kwargs, cached, warnings).

        A cached prompt costs nothing: neither the text encoder nor the tokenizer runs again (a slider move, a
        webcam frame)."""
        key = (prompt, negative_prompt if guided else "", guided)
        if key in self._embeddings:
            self._embeddings.move_to_end(key)
            kwargs, warnings = self._embeddings[key]
            return kwargs, True, warnings
        device = self.runtime.device
        with torch.inference_mode():
            if self.family == "sdxl":
                embeds, negative, pooled, negative_pooled = self.txt2img.encode_prompt(
                    prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=guided,
                    negative_prompt=negative_prompt if guided else None,
                )  # fmt: skip
                kwargs = dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled)
                if guided:
                    kwargs.update(negative_prompt_embeds=negative, negative_pooled_prompt_embeds=negative_pooled)
            else:
                embeds, negative = self.txt2img.encode_prompt(
                    prompt, device, 1, guided, negative_prompt=negative_prompt if guided else None
                )
                kwargs = dict(prompt_embeds=embeds)
                if guided:
                    kwargs["negative_prompt_embeds"] = negative
        warnings = []
        tokenizer = self.txt2img.tokenizer
        tokens = len(tokenizer(prompt, truncation=False).input_ids)
        if tokens > tokenizer.model_max_length:
            warnings.append(
                f"The prompt is {tokens} tokens long; the text encoder reads the first {tokenizer.model_max_length}"
                " (including start and end), so the rest is ignored."
            )
        self._embeddings[key] = (kwargs, warnings)
        if len(self._embeddings) > EMBEDDING_CACHE_SIZE:
            self._embeddings.popitem(last=False)
        return kwargs, False, warnings

    # ------------------------------------------------------------------ decode
    def _uses_tiny(self, decoder: str) -> bool:
        return self.tiny_vae is not None and decoder in ("auto", "tiny")

    def decode(self, latents: torch.Tensor, decoder: str = "auto") -> tuple[Image.Image, str]:
        """latents (1, 4, h, w) -> RGB image, with the tiny decoder when asked and loaded; (image, decoder used)."""
        use_tiny = self._uses_tiny(decoder)
        vae = self.tiny_vae if use_tiny else self.full_vae
        with torch.inference_mode():
            scaled = latents / vae.config.scaling_factor
            if getattr(vae.config, "shift_factor", None):
                scaled = scaled + vae.config.shift_factor
            upcast = not use_tiny and vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
            if upcast:  # SDXL's VAE overflows in fp16
                vae.to(torch.float32)
            try:
                pixels = vae.decode(scaled.to(vae.dtype), return_dict=False)[0]  # (1, 3, H, W) in [-1, 1]
            finally:
                if upcast:
                    vae.to(torch.float16)
        if not torch.isfinite(pixels).all():
            raise GenerationError("The decoder produced NaN or infinite values; try another seed or dtype float32.")
        array = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(np.ascontiguousarray(array)), "tiny" if use_tiny else "full"

    def refine(self, latents: torch.Tensor, params: dict) -> Result:
        """A preview's latents decoded again with the full VAE (the settle upgrade once input is still)."""
        start = time.perf_counter()
        image, decoder = self.decode(latents, "full")
        _sync(self.runtime.device)
        decode_ms = (time.perf_counter() - start) * 1e3
        return Result(image, {**params, "decoder": decoder}, Timings(decode_ms=decode_ms, total_ms=decode_ms))

    # ------------------------------------------------------------------ generate
    def generate(self, request: Request, should_stop: Callable[[], bool] | None = None) -> Result:
        """Run `request`. `should_stop()` is asked between UNet blocks; True raises GenerationStopped.

        A run in its last denoising step always finishes: its image is nearly done.
        """
        with self._lock:
            return self._generate(request, should_stop)

    def _generate(self, request: Request, should_stop: Callable[[], bool] | None) -> Result:
        device = self.runtime.device
        # 1. Check the request and fill in its defaults.
        request, warnings = self.check(request)
        start = time.perf_counter()
        # 2. Text embeddings (cached by prompt: a slider move does not re-run the text encoder).
        guided = request.guidance_scale > 1.0
        text_kwargs, cached, text_warnings = self.encode_text(request.prompt, request.negative_prompt, guided)
        warnings = warnings + text_warnings
        _sync(device)
        text_done = time.perf_counter()
        if should_stop is not None and should_stop():
            raise GenerationStopped(0)
        # 3. Denoise: 4 LCM steps by default; image-to-image runs int(steps * strength) of them.
        strength = effective_strength(request) if request.image is not None else request.strength
        planned = request.unet_steps
        steps_done = 0

        def on_step_end(pipe, index, timestep, tensors):
            nonlocal steps_done
            steps_done = index + 1
            if should_stop is not None and steps_done < planned and should_stop():
                raise GenerationStopped(steps_done)
            return {}

        common = dict(
            num_inference_steps=request.steps, guidance_scale=request.guidance_scale, output_type="latent",
            generator=torch.Generator("cpu").manual_seed(request.seed), callback_on_step_end=on_step_end,
            **text_kwargs,
        )  # fmt: skip
        hooks = []
        if should_stop is not None and not self.compiled:  # also stop inside a step: a step can take seconds

            def check_block(module, args):
                if steps_done < planned - 1 and should_stop():
                    raise GenerationStopped(steps_done)

            unet = self.txt2img.unet
            blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
            hooks = [block.register_forward_pre_hook(check_block) for block in blocks if block is not None]
        try:
            with torch.inference_mode():
                if request.image is None:
                    out = self.txt2img(width=request.width, height=request.height, **common)
                else:
                    init = _fill_crop(request.image.convert("RGB"), request.width, request.height)
                    # A preview decoded by TAESD is also encoded by it: ~15x fewer FLOPs than the full VAE.
                    if self._uses_tiny(request.decoder):
                        self.img2img.vae = self.tiny_vae
                    out = self.img2img(image=init, strength=strength, **common)
        except torch.OutOfMemoryError as error:
            self.free_memory()
            raise GenerationError(f"Out of memory at {request.width}x{request.height}: try a smaller size.") from error
        finally:
            self.img2img.vae = self.full_vae
            for hook in hooks:
                hook.remove()
        latents = out.images  # (1, 4, H/8, W/8)
        if not torch.isfinite(latents).all():
            raise GenerationError("The model produced NaN latents; try another seed, or dtype float32.")
        _sync(device)
        denoise_done = time.perf_counter()
        # 4. Decode: the tiny decoder for live frames when loaded, else the full VAE.
        image, decoder_used = self.decode(latents, request.decoder)
        _sync(device)
        end = time.perf_counter()
        timings = Timings(
            text_ms=(text_done - start) * 1e3, denoise_ms=(denoise_done - text_done) * 1e3,
            decode_ms=(end - denoise_done) * 1e3, total_ms=(end - start) * 1e3, unet_steps=steps_done,
            text_cached=cached,
        )  # fmt: skip
        return Result(image, self.params_for(request, strength, decoder_used), timings, latents, warnings)

    def params_for(self, request: Request, strength: float, decoder: str) -> dict:
        """The parameters that exactly reproduce an image (with the same model and software)."""
        params = dict(
            mode=request.mode, prompt=request.prompt, steps=request.steps, guidance_scale=request.guidance_scale,
            seed=request.seed, width=request.width, height=request.height, scheduler="LCMScheduler",
            model=public_id(self.spec.base), lora=public_id(self.spec.lora), decoder=decoder, runtime=self.runtime.label,
        )  # fmt: skip
        if request.guidance_scale > 1.0:
            params["negative_prompt"] = request.negative_prompt
        if request.image is not None:
            params["strength"] = round(strength, 4)
        return params

    def free_memory(self) -> None:
        """Drop cached embeddings and the accelerator's cached blocks (after an out-of-memory error)."""
        self._embeddings.clear()
        if self.runtime.device.startswith("cuda"):
            torch.cuda.empty_cache()

    @property
    def info(self) -> dict:
        return dict(model=self.spec.name, family=self.family, runtime=self.runtime.label,
                    native_size=self.native_size, embedded=self.spec.is_embedded,
                    decoder="TAESD" if self.tiny_vae is not None else "VAE")  # fmt: skip


def timings_dict(timings: Timings) -> dict:
    return {k: round(v, 1) if isinstance(v, float) else v for k, v in asdict(timings).items()}
