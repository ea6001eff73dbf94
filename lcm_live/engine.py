"""The engine: one cached LCM-LoRA pipeline, loaded once, shared by text-to-image and image-to-image.

Loading follows the diffusers docs for LCM-LoRA: `from_pretrained`, `load_lora_weights`, `fuse_lora`,
`LCMScheduler.from_config`. Per request only the work that request needs runs: text embeddings are cached by
prompt, and a generation can be stopped at any step boundary.
"""

from __future__ import annotations

import copy
import functools
import inspect
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderTiny, AutoPipelineForImage2Image
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
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


@dataclass(eq=False)
class Row:
    """One request in flight: its embeddings, generator, scheduler state, timesteps and latents."""

    request: Request  # checked: every default filled in
    warnings: list[str]
    strength: float  # the strength actually used (img2img)
    text: dict  # prompt_embeds (1, 77, D) [, negative_prompt_embeds, pooled_prompt_embeds, ...]
    scheduler: Any  # this row's own copy: its step index and noise are its own
    timesteps: list  # the timesteps this row runs, in order
    generator: torch.Generator  # seeded per request: its image is the same alone or batched
    latents: torch.Tensor | None  # (1, 4, h, w); None until the row's initial latents are made
    text_cached: bool = False
    index: int = 0  # steps done
    batch: int = 1  # the most rows it shared a UNet call with
    text_ms: float = 0.0
    began: float = 0.0

    @property
    def guided(self) -> bool:
        return self.request.guidance_scale > 1.0

    @property
    def key(self) -> tuple:
        """Rows with equal keys can share a UNet call."""
        return tuple(self.latents.shape[1:]), self.latents.dtype

    @property
    def done(self) -> bool:
        return self.index >= len(self.timesteps)

    @property
    def last_step(self) -> bool:
        """The next step is this row's last."""
        return self.index == len(self.timesteps) - 1

    @property
    def pixels(self) -> int:
        return self.request.width * self.request.height


def _scaled(latents: torch.Tensor, config) -> torch.Tensor:
    """Encoder output -> the UNet's latent space (as the pipelines scale it)."""
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        mean = torch.tensor(mean, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
        std = torch.tensor(std, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
        return (latents - mean) * config.scaling_factor / std
    return config.scaling_factor * latents


@functools.cache
def _step_parameters(scheduler_class: type) -> frozenset[str]:
    return frozenset(inspect.signature(scheduler_class.step).parameters)


@contextmanager
def _swapped(pipe, **components):
    """Give `pipe` other components (a row's scheduler, the tiny VAE) for the duration of a block."""
    before = {name: getattr(pipe, name) for name in components}
    for name, value in components.items():
        setattr(pipe, name, value)
    try:
        yield pipe
    finally:
        for name, value in before.items():
            setattr(pipe, name, value)


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
        self.step_options: dict = {}  # extra scheduler.step options of the model's recipe (e.g. eta)

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

    # ------------------------------------------------------------------ rows
    def start(self, request: Request) -> Row:
        """A row for `request`: checked, text encoded, its own generator, scheduler copy, timesteps and latents."""
        row = self.start_many([request])[0]
        if isinstance(row, Exception):
            raise row
        return row

    def start_many(self, requests: list[Request]) -> list[Row | Exception]:
        """Rows for several requests (a ValueError in place of a bad one); their input images encode together."""
        rows: list[Row | Exception] = []
        for request in requests:
            try:
                rows.append(self._new_row(request))
            except ValueError as error:
                rows.append(error)
        ready = [row for row in rows if isinstance(row, Row)]
        with torch.inference_mode():
            encoded = self._encode_inputs([row for row in ready if row.request.image is not None])
            for row in ready:
                row.latents = self._initial_latents(row, encoded.get(id(row)))
        return rows

    def _new_row(self, request: Request) -> Row:
        began = time.perf_counter()
        # 1. Check the request and fill in its defaults.
        request, warnings = self.check(request)
        # 2. Text embeddings (cached by prompt: a slider move does not re-run the text encoder).
        guided = request.guidance_scale > 1.0
        text, cached, text_warnings = self.encode_text(request.prompt, request.negative_prompt, guided)
        text_ms = (time.perf_counter() - began) * 1e3
        # 3. This row's own scheduler and timesteps (img2img runs the last int(steps * strength) of them).
        scheduler = copy.deepcopy(self.txt2img.scheduler)
        scheduler.set_timesteps(request.steps, device=self.runtime.device)
        strength = effective_strength(request) if request.image is not None else request.strength
        if request.image is None:
            timesteps = scheduler.timesteps
        else:
            with _swapped(self.img2img, scheduler=scheduler):  # sets the scheduler's begin index
                timesteps, _ = self.img2img.get_timesteps(request.steps, strength, self.runtime.device)
        return Row(request=request, warnings=warnings + text_warnings, strength=strength, text=text,
                   scheduler=scheduler, timesteps=list(timesteps), generator=torch.Generator("cpu").manual_seed(
                       request.seed), latents=None, text_cached=cached, text_ms=text_ms, began=began)  # fmt: skip

    def _encode_inputs(self, rows: list[Row]) -> dict[int, torch.Tensor]:
        """Input images of img2img rows -> their scaled latents (1, 4, h, w), one encoder call per size and VAE.

        Each row samples its latent from its own generator, as the pipeline's prepare_latents does alone.
        """
        encoded = {}
        groups: dict[tuple, list[Row]] = {}
        for row in rows:
            groups.setdefault((row.request.pixel_size, self._decoder_for(row)), []).append(row)
        for (size, decoder), group in groups.items():
            vae = self.tiny_vae if decoder == "tiny" else self.full_vae
            processor = self.img2img.image_processor
            pixels = torch.cat([processor.preprocess(_fill_crop(row.request.image.convert("RGB"), *size))
                                for row in group])  # fmt: skip  # (N, 3, H, W) in [-1, 1]
            dtype = group[0].text["prompt_embeds"].dtype
            upcast = self.family == "sdxl" and getattr(vae.config, "force_upcast", False) and vae.dtype != torch.float32
            if upcast:  # SDXL's VAE overflows in fp16 (the SDXL pipeline encodes in fp32 too)
                vae.to(torch.float32)
            try:
                output = vae.encode(pixels.to(self.runtime.device, torch.float32 if upcast else dtype))
            finally:
                if upcast:
                    vae.to(dtype)
            for i, row in enumerate(group):
                if hasattr(output, "latent_dist"):
                    latent = DiagonalGaussianDistribution(output.latent_dist.parameters[i : i + 1]).sample(row.generator)
                else:  # TAESD encodes to the latents themselves
                    latent = output.latents[i : i + 1]
                encoded[id(row)] = _scaled(latent.to(dtype), vae.config)
        return encoded

    def _initial_latents(self, row: Row, encoded: torch.Tensor | None) -> torch.Tensor:
        """Noise (txt2img) or the encoded input noised to the row's first timestep (img2img), via the pipeline."""
        dtype, device, pipe = row.text["prompt_embeds"].dtype, self.runtime.device, self.txt2img
        with _swapped(pipe, scheduler=row.scheduler), _swapped(self.img2img, scheduler=row.scheduler):
            if encoded is None:
                latents = pipe.prepare_latents(1, pipe.unet.config.in_channels, row.request.height,
                                               row.request.width, dtype, device, row.generator)  # fmt: skip
            else:  # a 4-channel "image" is taken as latents as they are: only the noise is added
                latents = self.img2img.prepare_latents(encoded, row.timesteps[0].reshape(1), 1, 1, dtype, device,
                                                       row.generator)  # fmt: skip
        return latents.contiguous()  # (1, 4, h, w)

    def step(self, rows: list[Row], should_abort: Callable[[], bool] | None = None) -> bool:
        """One denoising step for `rows` (same latent size) in one UNet call; False if `should_abort` stopped it.

        `should_abort()` is asked between UNet blocks (a step can take seconds on a CPU); when it says True the
        step is abandoned and every row keeps its state from before it.
        """
        unet = self.txt2img.unet
        # 1. The batch: a guided row adds its unconditional half; each entry has its own timestep.
        samples, timesteps, embeds, pooled, time_ids, guidance = [], [], [], [], [], []
        for row in rows:
            t = row.timesteps[row.index]
            scaled = row.scheduler.scale_model_input(row.latents, t)  # (1, 4, h, w)
            halves = [("negative_prompt_embeds", "negative_pooled_prompt_embeds")] if row.guided else []
            for embed_key, pooled_key in [*halves, ("prompt_embeds", "pooled_prompt_embeds")]:
                samples.append(scaled)
                timesteps.append(t)
                embeds.append(row.text[embed_key])
                if self.family == "sdxl":
                    pooled.append(row.text[pooled_key])
                    time_ids.append(self._time_ids(row))
                guidance.append(row.request.guidance_scale)
        sample = torch.cat(samples)  # (B, 4, h, w), B = rows + guided rows
        t_vec = torch.stack([torch.as_tensor(t, device=sample.device) for t in timesteps]).reshape(-1)  # (B,)
        added = {"text_embeds": torch.cat(pooled), "time_ids": torch.cat(time_ids)} if pooled else None
        timestep_cond = None
        if unet.config.time_cond_proj_dim is not None:  # LCM-distilled full models embed w = guidance - 1
            w = torch.tensor(guidance, device=sample.device) - 1
            timestep_cond = self.txt2img.get_guidance_scale_embedding(
                w, embedding_dim=unet.config.time_cond_proj_dim).to(device=sample.device, dtype=sample.dtype)  # fmt: skip
        # 2. One UNet call for all of them.
        hooks = self._abort_hooks(should_abort) if should_abort is not None and not self.compiled else []
        try:
            with torch.inference_mode():
                noise = unet(sample, t_vec, encoder_hidden_states=torch.cat(embeds), timestep_cond=timestep_cond,
                             added_cond_kwargs=added, return_dict=False)[0]  # fmt: skip  # (B, 4, h, w)
        except GenerationStopped:
            return False
        except torch.OutOfMemoryError as error:
            self.free_memory()
            raise GenerationError(f"Out of memory at batch {len(rows)}: try a smaller size.") from error
        finally:
            for hook in hooks:
                hook.remove()
        # 3. Each row steps its own scheduler (classifier-free guidance first for guided rows).
        entry = 0
        with torch.inference_mode():
            for row in rows:
                if row.guided:
                    uncond, cond = noise[entry : entry + 1], noise[entry + 1 : entry + 2]
                    prediction = uncond + row.request.guidance_scale * (cond - uncond)
                    entry += 2
                else:
                    prediction = noise[entry : entry + 1]
                    entry += 1
                t = row.timesteps[row.index]
                row.latents = row.scheduler.step(prediction, t, row.latents, **self._step_kwargs(row),
                                                 return_dict=False)[0]  # fmt: skip
                row.index += 1
                row.batch = max(row.batch, len(rows))
        return True

    def finish(self, rows: list[Row]) -> list[Result]:
        """Decode finished rows together (one call per decoder); a Result each, or GenerationError for NaN."""
        results: list[Result | None] = [None] * len(rows)
        for decoder in {self._decoder_for(row) for row in rows}:
            picked = [i for i, row in enumerate(rows) if self._decoder_for(row) == decoder]
            began = time.perf_counter()
            latents = torch.cat([rows[i].latents for i in picked])  # (N, 4, h, w)
            images, finite = self._decode(latents, decoder)
            decode_ms = (time.perf_counter() - began) * 1e3
            for i, image, ok in zip(picked, images, finite):
                row = rows[i]
                if not ok:
                    results[i] = GenerationError("The model produced NaN or infinite values; try another seed, "
                                                 "or dtype float32.")  # fmt: skip
                    continue
                denoise_ms = (began - row.began) * 1e3 - row.text_ms
                timings = Timings(text_ms=row.text_ms, denoise_ms=denoise_ms, decode_ms=decode_ms,
                                  total_ms=row.text_ms + denoise_ms + decode_ms, unet_steps=row.index,
                                  text_cached=row.text_cached, batch=row.batch)  # fmt: skip
                params = self.params_for(row.request, row.strength, decoder)
                results[i] = Result(image, params, timings, row.latents, row.warnings)
        return results

    def generate(self, request: Request, should_stop: Callable[[], bool] | None = None) -> Result:
        """Run one request alone. `should_stop()` is asked between UNet blocks; True raises GenerationStopped.

        A run in its last denoising step always finishes: its image is nearly done.
        """
        with self._lock:
            row = self.start(request)
            while not row.done:
                stop = should_stop if should_stop is not None and not row.last_step else None
                if (stop is not None and stop()) or not self.step([row], stop):
                    raise GenerationStopped(row.index)
            result = self.finish([row])[0]
        if isinstance(result, Exception):
            raise result
        return result

    # ------------------------------------------------------------------ helpers of the step loop
    def _time_ids(self, row: Row) -> torch.Tensor:
        """SDXL's size conditioning: original size, crop (0, 0), target size; (1, 6)."""
        size = (row.request.height, row.request.width)
        pipe = self.txt2img
        projection = pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None else int(
            row.text["pooled_prompt_embeds"].shape[-1])  # fmt: skip
        ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=row.latents.dtype,
                                     text_encoder_projection_dim=projection)  # fmt: skip
        return ids.to(row.latents.device)

    def _step_kwargs(self, row: Row) -> dict:
        """What the pipeline passes to scheduler.step: the row's generator, and eta where the scheduler takes one."""
        accepted = _step_parameters(type(row.scheduler))
        kwargs = {}
        if "generator" in accepted:
            kwargs["generator"] = row.generator
        if "eta" in accepted:
            kwargs["eta"] = self.step_options.get("eta", 0.0)
        return kwargs

    def _abort_hooks(self, should_abort: Callable[[], bool]) -> list:
        def check_block(module, args):
            if should_abort():
                raise GenerationStopped(0)

        unet = self.txt2img.unet
        blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
        return [block.register_forward_pre_hook(check_block) for block in blocks if block is not None]

    def _decoder_for(self, row: Row) -> str:
        return "tiny" if self._uses_tiny(row.request.decoder) else "full"

    # ------------------------------------------------------------------ decode
    def _uses_tiny(self, decoder: str) -> bool:
        return self.tiny_vae is not None and decoder in ("auto", "tiny")

    def _decode(self, latents: torch.Tensor, decoder: str) -> tuple[list[Image.Image], list[bool]]:
        """latents (N, 4, h, w) -> N RGB images, and whether each was finite (latents and pixels)."""
        vae = self.tiny_vae if decoder == "tiny" else self.full_vae
        with torch.inference_mode():
            scaled = latents / vae.config.scaling_factor
            if getattr(vae.config, "shift_factor", None):
                scaled = scaled + vae.config.shift_factor
            upcast = decoder == "full" and vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
            if upcast:  # SDXL's VAE overflows in fp16
                vae.to(torch.float32)
            try:
                pixels = vae.decode(scaled.to(vae.dtype), return_dict=False)[0]  # (N, 3, H, W) in [-1, 1]
            finally:
                if upcast:
                    vae.to(torch.float16)
            finite = torch.isfinite(latents).flatten(1).all(1) & torch.isfinite(pixels).flatten(1).all(1)  # (N,)
            arrays = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1)  # (N, H, W, 3)
            arrays, finite = arrays.cpu().numpy(), finite.cpu().tolist()
        return [Image.fromarray(np.ascontiguousarray(a)) for a in arrays], finite

    def decode(self, latents: torch.Tensor, decoder: str = "auto") -> tuple[Image.Image, str]:
        """latents (1, 4, h, w) -> RGB image, with the tiny decoder when asked and loaded; (image, decoder used)."""
        used = "tiny" if self._uses_tiny(decoder) else "full"
        images, finite = self._decode(latents, used)
        if not finite[0]:
            raise GenerationError("The decoder produced NaN or infinite values; try another seed or dtype float32.")
        return images[0], used

    def refine(self, latents: torch.Tensor, params: dict) -> Result:
        """A preview's latents decoded again with the full VAE (the settle upgrade once input is still)."""
        start = time.perf_counter()
        image, decoder = self.decode(latents, "full")
        decode_ms = (time.perf_counter() - start) * 1e3
        return Result(image, {**params, "decoder": decoder}, Timings(decode_ms=decode_ms, total_ms=decode_ms))

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
