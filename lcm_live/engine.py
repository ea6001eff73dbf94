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
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderTiny, AutoPipelineForImage2Image, LCMScheduler
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from .cuda_graphs import GraphCache
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
    image_digest,
)


EMBEDDING_CACHE_SIZE = 64


def _fill_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """Resize to cover (width, height), then crop the centre."""
    if image.size == (width, height):
        return image
    scale = max(width / image.width, height / image.height)
    resized = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))),
                           Image.Resampling.LANCZOS, reducing_gap=3.0)  # fmt: skip  # a box reduction first: ~6x faster
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
    plan: list | None = None  # LCM rows: per step (t, sqrt a, sqrt(1-a), c_out, c_skip, sqrt a_prev, sqrt(1-a_prev))
    noise: list = field(default_factory=list)  # LCM rows: the noise each step adds, drawn up front from `generator`
    text_cached: bool = False
    index: int = 0  # steps done
    batch: int = 1  # the most rows it shared a UNet call with
    eager_steps: int = 0  # steps run without a CUDA graph where graphs are on (a shape's first runs)
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


def _to_pixels(vae, latents: torch.Tensor, original: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode -> (uint8 pixels (N, H, W, 3), finite flags (N,) of latents and pixels), all on the device."""
    scaled = latents / vae.config.scaling_factor
    if getattr(vae.config, "shift_factor", None):
        scaled = scaled + vae.config.shift_factor
    pixels = vae.decode(scaled.to(vae.dtype), return_dict=False)[0]  # (N, 3, H, W) in [-1, 1]
    finite = torch.isfinite(original).flatten(1).all(1) & torch.isfinite(pixels).flatten(1).all(1)
    uint8 = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return uint8, finite


def _lcm_plan(scheduler, timesteps: list) -> list[tuple[float, ...]] | None:
    """Per step of an LCMScheduler row (epsilon prediction, no clipping): the numbers its step uses, from the
    scheduler itself; None for any other scheduler (it then steps through scheduler.step)."""
    config = scheduler.config
    if not isinstance(scheduler, LCMScheduler) or config.prediction_type != "epsilon" or config.thresholding or (
            config.clip_sample):  # fmt: skip
        return None
    alphas, plan = scheduler.alphas_cumprod, []
    schedule = [int(t) for t in scheduler.timesteps]
    for t in (int(t) for t in timesteps):
        following = schedule.index(t) + 1
        prev = schedule[following] if following < len(schedule) else t
        last = following == len(schedule)
        a = float(alphas[t])
        a_prev = float(alphas[prev]) if prev >= 0 else float(scheduler.final_alpha_cumprod)
        c_skip, c_out = (float(v) for v in scheduler.get_scalings_for_boundary_condition_discrete(torch.tensor(t)))
        noise_in = (1.0, 0.0) if last else (a_prev**0.5, (1 - a_prev) ** 0.5)
        plan.append((float(t), a**0.5, (1 - a) ** 0.5, c_out, c_skip, *noise_in))
    return plan


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
        self.step_options = dict(spec.recipe.step_kwargs)  # extra scheduler.step options of the recipe (e.g. eta)
        self.frame_ms: float | None = None  # a webcam frame's time, measured at load (the page paces frames by it)
        # Graphs on CUDA; not for LCM-distilled full models, whose guidance embedding is made per call.
        graphs = runtime.device.startswith("cuda") and pipe.unet.config.time_cond_proj_dim is None
        self.unet_graphs = GraphCache(self._unet_forward, enabled=graphs)  # one UNet call of a batch
        self.decode_graphs = GraphCache(self._tiny_decode, enabled=graphs and tiny_vae is not None)  # previews
        self._time_ids_by_size: dict[tuple[int, int], torch.Tensor] = {}
        self._zeros_by_shape: dict[tuple, torch.Tensor] = {}

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
            if engine.unet_graphs.enabled:
                if progress:
                    progress(0.97, "Capturing CUDA graphs")
                seconds = engine.prepare_graphs()
                engine.notes.append(f"CUDA graphs captured for {engine.native_size}px batches in {seconds:.1f} s.")
            engine.frame_ms = engine.time_frame()
        return engine

    def time_frame(self) -> float:
        """Milliseconds for one webcam frame at the native size (image to image, 2 steps at strength 0.5)."""
        side = self.native_size
        frame = Request(prompt="warm-up", image=Image.new("RGB", (side, side), (90, 120, 150)), steps=2, strength=0.5)
        self.generate(frame)  # the first one of a shape warms up (and, on a GPU, queues its graphs)
        self.warm(limit=None)
        times = []
        while len(times) < 3 and sum(times) < 1.0:  # fast models: the median of three; slow ones: one
            start = time.perf_counter()
            self.generate(frame)
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2] * 1e3

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
                self._initial_latents(row, encoded.get(id(row)))
        return rows

    def _new_row(self, request: Request) -> Row:
        began = time.perf_counter()
        # 1. Check the request and fill in its defaults.
        request, warnings = self.check(request)
        # 2. Text embeddings (cached by prompt: a slider move does not re-run the text encoder).
        guided = request.guidance_scale > 1.0
        text, cached, text_warnings = self.encode_text(request.prompt, request.negative_prompt, guided)
        text_ms = (time.perf_counter() - began) * 1e3
        # 3. This row's own scheduler and timesteps (img2img runs the last int(steps * strength) of them). The
        #    schedule stays on the CPU: nothing in the step loop waits for the GPU to read it.
        scheduler = copy.deepcopy(self.txt2img.scheduler)
        scheduler.set_timesteps(request.steps, device="cpu")
        strength = effective_strength(request) if request.image is not None else request.strength
        if request.image is None:
            timesteps = scheduler.timesteps
        else:
            with _swapped(self.img2img, scheduler=scheduler):  # also sets the scheduler's begin index
                timesteps, _ = self.img2img.get_timesteps(request.steps, strength, "cpu")
        row = Row(request=request, warnings=warnings + text_warnings, strength=strength, text=text,
                  scheduler=scheduler, timesteps=list(timesteps), generator=torch.Generator("cpu").manual_seed(
                      request.seed), latents=None, text_cached=cached, text_ms=text_ms, began=began)  # fmt: skip
        row.plan = _lcm_plan(scheduler, row.timesteps)
        return row

    def _encode_inputs(self, rows: list[Row]) -> dict[int, torch.Tensor]:
        """Input images of img2img rows -> their scaled latents (1, 4, h, w), one encoder call per size and VAE.

        Each row samples its latent with its own generator, as the pipeline's prepare_latents does alone.
        """
        encoded = {}
        groups: dict[tuple, list[Row]] = {}
        for row in rows:
            groups.setdefault((row.request.pixel_size, self._decoder_for(row)), []).append(row)
        for (size, decoder), group in groups.items():
            vae = self.tiny_vae if decoder == "tiny" else self.full_vae
            pixels = self._pixels([_fill_crop(row.request.image.convert("RGB"), *size) for row in group])
            dtype = group[0].text["prompt_embeds"].dtype
            upcast = self.family == "sdxl" and getattr(vae.config, "force_upcast", False) and vae.dtype != torch.float32
            if upcast:  # SDXL's VAE overflows in fp16 (the SDXL pipeline encodes in fp32 too)
                vae.to(torch.float32)
            try:
                output = vae.encode(pixels.to(torch.float32 if upcast else dtype))
            finally:
                if upcast:
                    vae.to(dtype)
            for i, row in enumerate(group):
                if hasattr(output, "latent_dist"):  # sample = mean + std * noise, the noise from the row's generator
                    dist = DiagonalGaussianDistribution(output.latent_dist.parameters[i : i + 1])
                    noise = randn_tensor(dist.mean.shape, generator=row.generator, dtype=dist.mean.dtype)
                    latent = dist.mean + dist.std * self._to_device(noise)
                else:  # TAESD encodes to the latents themselves
                    latent = output.latents[i : i + 1]
                encoded[id(row)] = _scaled(latent.to(dtype), vae.config)
        return encoded

    def _pixels(self, images: list[Image.Image]) -> torch.Tensor:
        """RGB images -> (N, 3, H, W) in [-1, 1] on the device, as the pipeline's image processor makes them
        (x / 255 * 2 - 1 in float32), but sent as bytes and converted there."""
        array = torch.from_numpy(np.stack([np.asarray(image) for image in images]))  # (N, H, W, 3) uint8
        pixels = self._to_device(array).permute(0, 3, 1, 2).float() / 255.0
        return (2.0 * pixels - 1.0).contiguous()

    def _initial_latents(self, row: Row, encoded: torch.Tensor | None) -> None:
        """The row's starting latents: noise (txt2img) or its encoded input noised to its first timestep (img2img).

        LCM rows draw every noise they will need now, in the order the pipeline draws it, and send it to the
        device in one copy; other schedulers go through the pipeline's own prepare_latents.
        """
        dtype, device, pipe = row.text["prompt_embeds"].dtype, self.runtime.device, self.txt2img
        shape = (1, pipe.unet.config.in_channels, row.request.height // pipe.vae_scale_factor,
                 row.request.width // pipe.vae_scale_factor)  # fmt: skip
        if row.plan is None:
            with _swapped(pipe, scheduler=row.scheduler), _swapped(self.img2img, scheduler=row.scheduler):
                if encoded is None:
                    latents = pipe.prepare_latents(1, shape[1], row.request.height, row.request.width, dtype, device,
                                                   row.generator)  # fmt: skip
                else:  # a 4-channel "image" is taken as latents as they are: only the noise is added
                    latents = self.img2img.prepare_latents(encoded, row.timesteps[0].reshape(1), 1, 1, dtype, device,
                                                           row.generator)  # fmt: skip
            row.latents = latents.contiguous()
            return
        # first the starting noise, then one per step but the last (LCMScheduler.step adds none in its last)
        drawn = torch.cat([randn_tensor(shape, generator=row.generator, dtype=dtype) for _ in row.timesteps])
        drawn = self._to_device(drawn)  # (steps, 4, h, w)
        row.noise = [drawn[i : i + 1] for i in range(1, len(drawn))]
        if encoded is None:
            row.latents = drawn[:1] * row.scheduler.init_noise_sigma
        else:  # LCMScheduler.add_noise: sqrt(a) x + sqrt(1 - a) noise, with a in the latents' dtype
            alpha = row.scheduler.alphas_cumprod.to(dtype)[int(row.timesteps[0])]
            row.latents = float(alpha**0.5) * encoded + float((1 - alpha) ** 0.5) * drawn[:1]

    def step(self, rows: list[Row], should_abort: Callable[[], bool] | None = None) -> bool:
        """One denoising step for `rows` (same latent size) in one UNet call; False if `should_abort` stopped it.

        `should_abort()` is asked between UNet blocks on a CPU, where a step can take seconds; when it says True
        the step is abandoned and every row keeps its state from before it.
        """
        # 1. The batch: every row's conditional entry, then the unconditional entries of guided rows.
        guided = [row for row in rows if row.guided]
        entries = [(row, "") for row in rows] + [(row, "negative_") for row in guided]
        control = self._control(rows)  # (B, 8) on the device: t, guidance and the LCM coefficients per row
        sample = torch.cat([row.scheduler.scale_model_input(row.latents, row.timesteps[row.index]) if row.plan is None
                            else row.latents for row in rows])  # fmt: skip  # (B, 4, h, w)
        t = control[:, 0]
        if guided:  # slices, not a list index: indexing a GPU tensor with a list would wait for the GPU
            at = [rows.index(row) for row in guided]
            sample = torch.cat([sample, *(sample[i : i + 1] for i in at)])  # (E, 4, h, w)
            t = torch.cat([t, *(t[i : i + 1] for i in at)])  # (E,)
        inputs = [sample, t, torch.cat([row.text[f"{half}prompt_embeds"] for row, half in entries])]
        if self.family == "sdxl":
            inputs.append(torch.cat([row.text[f"{half}pooled_prompt_embeds"] for row, half in entries]))
            inputs.append(torch.cat([self._time_ids(row) for row, _ in entries]))
        # 2. One UNet call for all of them (a captured CUDA graph on a GPU).
        warming = self.unet_graphs.enabled and not self.unet_graphs.is_captured(*inputs)
        stoppable = should_abort is not None and not self.unet_graphs.enabled and not self.compiled
        hooks = self._abort_hooks(should_abort) if stoppable else []
        try:
            with torch.inference_mode():
                (eps,) = self.unet_graphs(*inputs)  # (E, 4, h, w)
                # 3. Guidance, then each row's scheduler step (all LCM rows at once).
                self._update(rows, eps, control)
        except GenerationStopped:
            return False
        except torch.OutOfMemoryError as error:
            self.free_memory()
            raise GenerationError(f"Out of memory at batch {len(rows)}: try a smaller size.") from error
        finally:
            for hook in hooks:
                hook.remove()
        for row in rows:
            row.index += 1
            row.batch = max(row.batch, len(rows))
            row.eager_steps += warming
        return True

    def _unet_forward(self, sample, t, embeds, pooled=None, time_ids=None) -> tuple[torch.Tensor]:
        unet = self.txt2img.unet
        added = {"text_embeds": pooled, "time_ids": time_ids} if pooled is not None else None
        timestep_cond = None
        if unet.config.time_cond_proj_dim is not None:  # LCM-distilled full models embed w = guidance - 1
            timestep_cond = self.txt2img.get_guidance_scale_embedding(
                self._w - 1, embedding_dim=unet.config.time_cond_proj_dim).to(sample.dtype)  # fmt: skip
        return (unet(sample, t, encoder_hidden_states=embeds, timestep_cond=timestep_cond, added_cond_kwargs=added,
                     return_dict=False)[0],)  # fmt: skip

    def _control(self, rows: list[Row]) -> torch.Tensor:
        """Per row: timestep, guidance scale and LCM coefficients of its current step, sent in one copy; (B, 8)."""
        values = []
        for row in rows:
            plan = row.plan[row.index] if row.plan is not None else (float(row.timesteps[row.index]),) + (0.0,) * 6
            values.append((plan[0], row.request.guidance_scale, *plan[1:]))
        control = self._to_device(torch.tensor(values, dtype=torch.float32))
        self._w = torch.cat([control[:, 1], *(control[i : i + 1, 1] for i, r in enumerate(rows) if r.guided)])
        return control

    def _update(self, rows: list[Row], eps: torch.Tensor, control: torch.Tensor) -> None:
        """Classifier-free guidance, then the scheduler step: vectorised LCMScheduler.step for LCM rows."""
        count = len(rows)
        guided_at = {id(row): count + j for j, row in enumerate(r for r in rows if r.guided)}
        uncond = torch.cat([eps[guided_at.get(id(row), i)].unsqueeze(0) for i, row in enumerate(rows)])
        cond = eps[:count]
        g = control[:, 1].view(-1, 1, 1, 1)
        prediction = (uncond + g * (cond - uncond)).float()  # (B, 4, h, w); unguided rows: cond exactly
        fast = [i for i, row in enumerate(rows) if row.plan is not None]
        if fast:
            picked = (lambda tensor: tensor) if len(fast) == count else (
                lambda tensor: torch.cat([tensor[i : i + 1] for i in fast]))  # fmt: skip
            x = torch.cat([rows[i].latents for i in fast]).float()
            c = picked(control).view(len(fast), 8, 1, 1, 1)  # t, g, sqrt a, sqrt(1-a), c_out, c_skip, prev a, prev 1-a
            noise = torch.cat([self._noise_for(rows[i]) for i in fast]).float()
            denoised = c[:, 4] * ((x - c[:, 3] * picked(prediction)) / c[:, 2]) + c[:, 5] * x
            new = (c[:, 6] * denoised + c[:, 7] * noise).to(rows[fast[0]].latents.dtype)
            for j, i in enumerate(fast):
                rows[i].latents = new[j : j + 1]
        for i, row in enumerate(rows):
            if row.plan is None:
                out = row.scheduler.step(prediction[i : i + 1].to(row.latents.dtype), row.timesteps[row.index],
                                         row.latents, **self._step_kwargs(row), return_dict=False)  # fmt: skip
                row.latents = out[0]

    def _noise_for(self, row: Row) -> torch.Tensor:
        if row.index < len(row.noise):
            return row.noise[row.index]
        shape = tuple(row.latents.shape)
        if shape not in self._zeros_by_shape:  # the last step adds no noise (its coefficient is 0 too)
            self._zeros_by_shape[shape] = torch.zeros(shape, device=row.latents.device, dtype=row.latents.dtype)
        return self._zeros_by_shape[shape]

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
                                  text_cached=row.text_cached, batch=row.batch,
                                  warming_up=row.eager_steps > 0)  # fmt: skip
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
        """SDXL's size conditioning: original size, crop (0, 0), target size; (1, 6), made once per size."""
        size = (row.request.height, row.request.width)
        if size not in self._time_ids_by_size:
            pipe = self.txt2img
            projection = pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None else int(
                row.text["pooled_prompt_embeds"].shape[-1])  # fmt: skip
            ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=row.latents.dtype,
                                         text_encoder_projection_dim=projection)  # fmt: skip
            self._time_ids_by_size[size] = ids.to(self.runtime.device)
        return self._time_ids_by_size[size]

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A CPU tensor on the engine's device; on CUDA through pinned memory, without waiting for the GPU."""
        if not self.runtime.device.startswith("cuda"):
            return tensor.to(self.runtime.device)
        return tensor.pin_memory().to(self.runtime.device, non_blocking=True)

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
        with torch.inference_mode():
            if decoder == "tiny":
                pixels, finite = self.decode_graphs(latents)  # (N, H, W, 3) uint8, (N,)
            else:
                pixels, finite = self._full_decode(latents)
            if self.runtime.device.startswith("cuda"):  # one wait for both, through pinned memory
                host_pixels = torch.empty(pixels.shape, dtype=pixels.dtype, pin_memory=True)
                host_finite = torch.empty(finite.shape, dtype=finite.dtype, pin_memory=True)
                host_pixels.copy_(pixels, non_blocking=True)
                host_finite.copy_(finite, non_blocking=True)
                torch.cuda.current_stream().synchronize()
                pixels, finite = host_pixels, host_finite
            arrays, flags = pixels.cpu().numpy(), finite.cpu().tolist()
        return [Image.fromarray(np.ascontiguousarray(a)) for a in arrays], flags

    def _tiny_decode(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _to_pixels(self.tiny_vae, latents, latents)

    def _full_decode(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vae = self.full_vae
        upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        if upcast:  # SDXL's VAE overflows in fp16
            vae.to(torch.float32)
        try:
            return _to_pixels(vae, latents.float() if upcast else latents, latents)
        finally:
            if upcast:
                vae.to(torch.float16)

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

    # ------------------------------------------------------------------ CUDA graphs
    def warm(self, limit: int | None = 1) -> int:
        """Capture CUDA graphs for shapes that ran eagerly so far (at most `limit` of each kind); how many."""
        return self.unet_graphs.capture_pending(limit) + self.decode_graphs.capture_pending(limit)

    def prepare_graphs(self, size: int | None = None, batches: tuple[int, ...] = (1, 2, 4, 8, 16)) -> float:
        """Capture the UNet step and the preview decode at `size` (default native) for these batches; seconds."""
        if not self.unet_graphs.enabled:
            return 0.0
        start, side = time.perf_counter(), size or self.native_size
        for batch in batches:
            rows = self.start_many([Request(prompt="warm-up", seed=i, steps=1, width=side, height=side)
                                    for i in range(batch)])  # fmt: skip
            self.step(rows)
            self.finish(rows)
        self.warm(limit=None)
        return time.perf_counter() - start

    def params_for(self, request: Request, strength: float, decoder: str) -> dict:
        """The parameters that exactly reproduce an image (with the same model and software)."""
        params = dict(
            mode=request.mode, prompt=request.prompt, steps=request.steps, guidance_scale=request.guidance_scale,
            seed=request.seed, width=request.width, height=request.height, recipe=self.spec.recipe.name,
            scheduler=self.spec.recipe.description, model=public_id(self.spec.base), lora=public_id(self.spec.lora),
            adapters=[{"id": public_id(lora), "weight": weight} for lora, weight in self.spec.adapters],
            decoder=decoder, runtime=self.runtime.label,
        )  # fmt: skip
        if request.guidance_scale > 1.0:
            params["negative_prompt"] = request.negative_prompt
        if request.image is not None:
            params["strength"] = round(strength, 4)
            params["input"] = image_digest(request.image)
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
                    decoder="TAESD" if self.tiny_vae is not None else "VAE", frame_ms=self.frame_ms,
                    steps=self.spec.recipe.steps, guidance_scale=self.spec.recipe.guidance_scale)  # fmt: skip


def timings_dict(timings: Timings) -> dict:
    return {k: round(v, 1) if isinstance(v, float) else v for k, v in asdict(timings).items()}
