"""The engine: one cached LCM-LoRA pipeline, loaded once, shared by text-to-image and image-to-image.

Loading follows the diffusers docs for LCM-LoRA: `from_pretrained`, `load_lora_weights`, `fuse_lora`,
`LCMScheduler.from_config`. Per request only the work that request needs runs: text embeddings are cached by
prompt, and a generation can be stopped at any step boundary. The parts are in the diffusers helper style:
prompts.py (the prompt cache), rows.py (rows and latents), denoise.py (the step loop), vae.py (encode and
decode, one upcast rule), cuda_graphs.py (graphs); this class holds them together.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import torch
from diffusers import AutoencoderTiny, AutoPipelineForImage2Image
from PIL import Image

from . import controlnets, denoise, vae
from .cuda_graphs import GraphCache
from .device import Runtime
from .loading import cache_first, load_pipeline, load_taesd, public_id
from .presets import ModelSpec
from .prompts import PromptCache
from .request import (
    GenerationError,
    GenerationStopped,
    ModelLoadError,
    Request,
    Result,
    Timings,
    checked,
    image_digest,
)
from .rows import Row, encode_inputs, initial_latents, lcm_plan, schedule


__all__ = ["Engine", "Row"]
log = logging.getLogger("lcm_live")


class Engine:
    """Owns one pipeline; `generate` runs a Request. Callers serialise their calls (the live loop does)."""

    def __init__(self, pipe, spec: ModelSpec, runtime: Runtime, family: str, tiny_vae: AutoencoderTiny | None = None,
                 controls: dict | None = None):  # fmt: skip
        self.txt2img = pipe
        self.img2img = AutoPipelineForImage2Image.from_pipe(pipe)  # same UNet, VAE and text encoders
        self.img2img.set_progress_bar_config(disable=True)
        self.spec, self.runtime, self.family = spec, runtime, family
        self.full_vae = pipe.vae
        self.tiny_vae = tiny_vae
        self.controls = controls or {}  # control name -> its ControlNet (run in the same step as the UNet)
        self.native_size = spec.native_size or pipe.unet.config.sample_size * pipe.vae_scale_factor
        self.prompts = PromptCache(pipe, family, runtime.device)
        self._lock = threading.Lock()  # generate() runs one request at a time
        self.notes: list[str] = []  # things the user should know about this load (shown on the page)
        self.compiled = False  # a compiled UNet stops at step boundaries only (hooks would force recompiles)
        self.step_options = dict(spec.recipe.step_kwargs)  # extra scheduler.step options of the recipe (e.g. eta)
        self.frame_ms: float | None = None  # a webcam frame's time, measured at load (the page paces frames by it)
        # Graphs on CUDA; not for LCM-distilled full models, whose guidance embedding is made per call.
        graphs = runtime.device.startswith("cuda") and pipe.unet.config.time_cond_proj_dim is None
        self.unet_graphs = GraphCache(self._unet_forward, enabled=graphs)  # one UNet call of a batch
        self.decode_graphs = GraphCache(self._tiny_decode, enabled=graphs and tiny_vae is not None)  # previews
        self.step_cache = denoise.StepCache(pipe, runtime.device)  # SDXL's size conditioning, the last step's zeros
        self._w: torch.Tensor | None = None  # the batch's guidance scales (LCM-distilled full models embed them)

    @classmethod
    def load(cls, spec: ModelSpec, runtime: Runtime, taesd: bool = False, local_files_only: bool = False,
             warmup: bool = True, progress=None, compile: bool = False) -> Engine:  # fmt: skip
        """Load `spec` once: weights, LoRA fused, LCMScheduler; optional TAESD and torch.compile; one warm-up run.

        Local files first, the network only for what is missing. Each stage is one line of the "lcm_live" log."""
        stage = _stages(spec, progress)
        try:
            # 1. The pipeline (weights, LoRA fused, the recipe's scheduler), optionally compiled on the warm-up run,
            #    and its ControlNets.
            pipe, family = cache_first(lambda local: load_pipeline(spec, runtime, local, stage), local_files_only)
            if compile:  # a new image size compiles again
                pipe.unet = torch.compile(pipe.unet)
            controls = controlnets.load_controlnets(spec, family, pipe.unet, runtime, local_files_only, stage)
            # 2. The tiny decoder for previews; the full VAE serves without it, saying so.
            tiny, notes = None, []
            if taesd:
                try:
                    tiny = cache_first(lambda local: load_taesd(family, runtime, local), local_files_only)
                except ModelLoadError as error:
                    notes.append(f"TAESD unavailable, decoding with the full VAE. {error}")
                    log.info("%s: %s", spec.name, notes[-1])
            engine = cls(pipe, spec, runtime, family, tiny, controls)
            engine.notes, engine.compiled = notes, compile
            # 3. A warm-up run (compiles), CUDA graphs for the native size, and a webcam frame's time.
            if warmup:
                engine.warm_up(stage)
        except Exception:
            log.debug("loading %s failed", spec.name, exc_info=True)  # the full traceback with --verbose
            raise
        log.info("%s: ready on %s", spec.name, runtime.label)
        return engine

    def warm_up(self, progress: Callable[[float, str], None] | None = None) -> None:
        """The load's last stage, for a loader that defers it (warmup=False): a warm-up run (compiles a compiled
        UNet), CUDA graphs for the native size, and a webcam frame's time (frame_ms)."""
        stage = progress or (lambda fraction, message: None)
        stage(0.95, "Compiling the UNet (once per image size)" if self.compiled else "Warming up")
        start = time.perf_counter()
        self.generate(Request(prompt="warm-up", steps=2))
        if self.compiled:
            self.notes.append(f"UNet compiled with torch.compile in {time.perf_counter() - start:.0f} s.")
        if self.unet_graphs.enabled:
            stage(0.97, "Capturing CUDA graphs")
            seconds = self.prepare_graphs()
            self.notes.append(f"CUDA graphs captured for {self.native_size}px batches in {seconds:.1f} s.")
        self.frame_ms = self.time_frame()

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

    # ------------------------------------------------------------------ checks and text
    def check(self, request: Request) -> tuple[Request, list[str]]:
        """The request with defaults filled in, plus warnings; ValueError with the bound for bad values."""
        request, warnings = checked(request, self.native_size)
        if request.control is not None and request.control not in self.controls:
            loaded = ", ".join(self.controls) or "none"
            raise ValueError(f"This model has no {request.control} control (loaded: {loaded}); start it with "
                             f"--control {request.control}, or turn the control off.")  # fmt: skip
        return request, warnings

    def encode_text(self, prompt: str, negative_prompt: str, guided: bool) -> tuple[dict, bool, list[str]]:
        """Prompt embeddings as pipeline kwargs, from the cache when this prompt was seen; (kwargs, cached, warnings)."""
        return self.prompts.get(prompt, negative_prompt, guided)

    # ------------------------------------------------------------------ rows
    def start(self, request: Request) -> Row:
        """A row for `request`: checked, text encoded, its own generator, scheduler copy, timesteps and latents."""
        row = self.start_many([request])[0]
        if isinstance(row, Exception):
            raise row
        return row

    def start_many(self, requests: list[Request]) -> list[Row | Exception]:
        """Rows for several requests, their input images encoded together; any error in place of its own row only."""
        # 1. Each row: checked, text encoded, its schedule.
        rows: list[Row | Exception] = [_or_error(self._new_row, request) for request in requests]
        # 2. Input images: one encoder call per size and decoder (a failing group retries row by row).
        encoded = self._encode_inputs([row for row in rows if isinstance(row, Row) and row.request.image is not None])
        # 3. Each row's starting latents.
        for i, row in enumerate(rows):
            if isinstance(row, Row):
                latents = encoded.get(id(row))
                rows[i] = latents if isinstance(latents, Exception) else _or_error(self._initial_latents, row, latents)
        return rows

    def _new_row(self, request: Request) -> Row:
        began = time.perf_counter()
        request, warnings = self.check(request)
        text, cached, text_warnings = self.encode_text(request.prompt, request.negative_prompt,
                                                       request.guidance_scale > 1.0)  # fmt: skip
        text_ms = (time.perf_counter() - began) * 1e3
        scheduler, timesteps, strength = schedule(self.txt2img, self.img2img, request)
        control, features = self._control_input(request)
        return Row(control=control, features=features, request=request, warnings=warnings + text_warnings, strength=strength, text=text,
                   scheduler=scheduler, timesteps=timesteps, generator=torch.Generator("cpu").manual_seed(request.seed),
                   latents=None, plan=lcm_plan(scheduler, timesteps), text_cached=cached, text_ms=text_ms,
                   began=began)  # fmt: skip

    def _control_input(self, request: Request) -> tuple[torch.Tensor | None, list | None]:
        """(what the row's ControlNet sees, or its T2I-Adapter's features: made once here) for a controlled row."""
        if request.control is None:
            return None, None
        net = self.controls[request.control]
        channels = getattr(net.config, "in_channels", 3) if isinstance(net, controlnets.T2IAdapter) else 3
        control = controlnets.control_tensor(request.control_image, request.width, request.height, self._to_device,
                                             channels)  # fmt: skip
        if isinstance(net, controlnets.T2IAdapter):
            return control, controlnets.adapter_features(net, control, request.control_scale)
        return control, None

    def _encode_inputs(self, rows: list[Row]) -> dict[int, torch.Tensor | Exception]:
        """Input images of img2img rows -> their scaled latents (1, 4, h, w) by id(row), or the row's error."""
        with torch.inference_mode():
            return encode_inputs(rows, self._decoder_for, {"tiny": self.tiny_vae, "full": self.full_vae}, self.family,
                                 self._to_device)  # fmt: skip

    def _initial_latents(self, row: Row, encoded: torch.Tensor | None) -> Row:
        with torch.inference_mode():
            initial_latents(row, self.txt2img, self.img2img, encoded, self.runtime.device, self._to_device)
        return row

    # ------------------------------------------------------------------ the step loop
    def step(self, rows: list[Row], should_abort: Callable[[], bool] | None = None) -> bool:
        """One denoising step for `rows` (same latent size) in one UNet call; False if `should_abort` stopped it.

        `should_abort()` is asked between UNet blocks on a CPU, where a step can take seconds; when it says True
        the step is abandoned and every row keeps its state from before it.
        """
        # 1. The batch: every row's conditional entry, then the unconditional entries of guided rows.
        control = self._control(rows)  # (B, 8) on the device: t, guidance and the LCM coefficients per row
        inputs = denoise.unet_inputs(rows, control, self.family, self.step_cache.time_ids)
        controlled = any(row.control is not None for row in rows)
        # 2. One UNet call for all of them (a captured CUDA graph on a GPU; eager with ControlNets), after one call
        #    of each ControlNet the rows use.
        graphs = self.unet_graphs.enabled and not controlled
        warming = graphs and not self.unet_graphs.is_captured(*inputs)
        stoppable = should_abort is not None and not self.unet_graphs.enabled and not self.compiled
        nets = [net for net in self.controls.values() if isinstance(net, controlnets.ControlNetModel)]
        modules = [self.txt2img.unet, *nets] if controlled else [self.txt2img.unet]
        hooks = [h for module in modules for h in denoise.abort_hooks(module, should_abort)] if stoppable else []
        try:
            with torch.inference_mode():
                if graphs:
                    (eps,) = self.unet_graphs(*inputs)  # (E, 4, h, w)
                else:
                    extra = controlnets.residuals(self.controls, rows, inputs) or {}
                    (eps,) = self._unet_forward(*inputs, **extra)
                # 3. Guidance, then each row's scheduler step (all LCM rows at once).
                denoise.update(rows, eps, control, self.step_cache.noise_for, self.step_options)
        except GenerationStopped:
            return False
        except torch.OutOfMemoryError as error:
            self.free_memory()
            raise GenerationError(f"Out of memory at batch {len(rows)}: try a smaller size.") from error
        finally:
            for hook in hooks:
                hook.remove()
        # 4. Bookkeeping: steps done, the batch each row shared, and whether it ran before its graph existed.
        for row in rows:
            row.index += 1
            row.batch = max(row.batch, len(rows))
            row.eager_steps += warming
        return True

    def _unet_forward(self, sample, t, embeds, pooled=None, time_ids=None, **residuals) -> tuple[torch.Tensor]:
        unet = self.txt2img.unet
        added = {"text_embeds": pooled, "time_ids": time_ids} if pooled is not None else None
        timestep_cond = None
        if unet.config.time_cond_proj_dim is not None:  # LCM-distilled full models embed w = guidance - 1
            timestep_cond = self.txt2img.get_guidance_scale_embedding(
                self._w - 1, embedding_dim=unet.config.time_cond_proj_dim).to(sample.dtype)  # fmt: skip
        return (unet(sample, t, encoder_hidden_states=embeds, timestep_cond=timestep_cond, added_cond_kwargs=added,
                     return_dict=False, **residuals)[0],)  # fmt: skip

    def _control(self, rows: list[Row]) -> torch.Tensor:
        """The rows' control values sent in one copy; (B, 8)."""
        control = self._to_device(torch.tensor(denoise.control_values(rows), dtype=torch.float32))
        self._w = torch.cat([control[:, 1], *(control[i : i + 1, 1] for i, r in enumerate(rows) if r.guided)])
        return control

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A CPU tensor on the engine's device; on CUDA through pinned memory, without waiting for the GPU."""
        if not self.runtime.device.startswith("cuda"):
            return tensor.to(self.runtime.device)
        return tensor.pin_memory().to(self.runtime.device, non_blocking=True)

    def finish(self, rows: list[Row]) -> list[Result]:
        """Decode finished rows together (one call per decoder); a Result each, or GenerationError for NaN."""
        results: list[Result | None] = [None] * len(rows)
        for decoder in {self._decoder_for(row) for row in rows}:
            picked = [i for i, row in enumerate(rows) if self._decoder_for(row) == decoder]
            began = time.perf_counter()
            images, finite = self._decode(torch.cat([rows[i].latents for i in picked]), decoder)  # (N, 4, h, w)
            decode_ms = (time.perf_counter() - began) * 1e3
            for i, image, ok in zip(picked, images, finite):
                results[i] = self._result(rows[i], image, decoder, began, decode_ms) if ok else GenerationError(
                    "The model produced NaN or infinite values; try another seed, or dtype float32.")  # fmt: skip
        return results

    def _result(self, row: Row, image: Image.Image, decoder: str, decode_began: float, decode_ms: float) -> Result:
        denoise_ms = (decode_began - row.began) * 1e3 - row.text_ms
        timings = Timings(text_ms=row.text_ms, denoise_ms=denoise_ms, decode_ms=decode_ms,
                          total_ms=row.text_ms + denoise_ms + decode_ms, unet_steps=row.index,
                          text_cached=row.text_cached, batch=row.batch, warming_up=row.eager_steps > 0)  # fmt: skip
        return Result(image, self.params_for(row.request, row.strength, decoder), timings, row.latents, row.warnings)

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

    # ------------------------------------------------------------------ decode
    def _uses_tiny(self, decoder: str) -> bool:
        return self.tiny_vae is not None and decoder in ("auto", "tiny")

    def _decoder_for(self, row: Row) -> str:
        return "tiny" if self._uses_tiny(row.request.decoder) else "full"

    def _decode(self, latents: torch.Tensor, decoder: str) -> tuple[list[Image.Image], list[bool]]:
        """latents (N, 4, h, w) -> N RGB images, and whether each was finite (latents and pixels)."""
        with torch.inference_mode():
            if decoder == "tiny":
                pixels, finite = self.decode_graphs(latents)  # (N, H, W, 3) uint8, (N,)
            else:
                pixels, finite = vae.decode(self.full_vae, self.family, latents)
            return vae.to_images(pixels, finite)

    def _tiny_decode(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return vae.to_pixels(self.tiny_vae, latents, latents)

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

    # ------------------------------------------------------------------ what serves
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
        if request.control is not None:
            params["control"] = dict(kind=request.control, scale=request.control_scale,
                                     image=image_digest(request.control_image),
                                     model=public_id(dict(self.spec.controls).get(request.control)))  # fmt: skip
        return params

    def free_memory(self) -> None:
        """Drop cached embeddings and the accelerator's cached blocks (after an out-of-memory error)."""
        self.prompts.clear()
        if self.runtime.device.startswith("cuda"):
            torch.cuda.empty_cache()

    @property
    def info(self) -> dict:
        return dict(model=self.spec.name, family=self.family, runtime=self.runtime.label,
                    native_size=self.native_size, embedded=self.spec.is_embedded,
                    decoder="TAESD" if self.tiny_vae is not None else "VAE", frame_ms=self.frame_ms,
                    steps=self.spec.recipe.steps, guidance_scale=self.spec.recipe.guidance_scale,
                    controls=list(self.controls))  # fmt: skip


def _stages(spec: ModelSpec, progress=None) -> Callable[[float, str], None]:
    """A load's progress callback that also logs each stage once (a retry from the network repeats none)."""
    said: set[str] = set()

    def stage(fraction: float, message: str) -> None:
        if message not in said:
            said.add(message)
            log.info("%s: %s", spec.name, message)
        if progress:
            progress(fraction, message)

    return stage


def _or_error(fn: Callable, *args):
    """fn(*args), or the exception it raised: one row's failure is that row's alone."""
    try:
        return fn(*args)
    except Exception as error:
        return error
