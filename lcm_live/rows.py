"""Rows and latents: one request in flight (its scheduler copy, timesteps, generator, latents), made as the
pipelines' prepare_latents makes them, so that an image is the same alone or batched."""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers import LCMScheduler
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from . import vae
from .request import Request, effective_strength


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
    control: torch.Tensor | None = None  # (1, 3, H, W) in [0, 1]: what the row's ControlNet sees (request.control)
    features: list | None = None  # a T2I-Adapter row: the adapter's features, scaled, made once at its start
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


@contextmanager
def swapped(pipe, **components) -> Iterator:
    """Give `pipe` other components (a row's scheduler) for the duration of a block."""
    before = {name: getattr(pipe, name) for name in components}
    for name, value in components.items():
        setattr(pipe, name, value)
    try:
        yield pipe
    finally:
        for name, value in before.items():
            setattr(pipe, name, value)


def schedule(txt2img, img2img, request: Request) -> tuple[Any, list, float]:
    """(a scheduler copy, the timesteps this request runs, its strength): img2img runs the last int(steps *
    strength) of them. The schedule stays on the CPU: nothing in the step loop waits for the GPU to read it."""
    scheduler = copy.deepcopy(txt2img.scheduler)
    scheduler.set_timesteps(request.steps, device="cpu")
    if request.image is None:
        return scheduler, list(scheduler.timesteps), request.strength
    strength = effective_strength(request)
    with swapped(img2img, scheduler=scheduler):  # also sets the scheduler's begin index
        timesteps, _ = img2img.get_timesteps(request.steps, strength, "cpu")
    return scheduler, list(timesteps), strength


def lcm_plan(scheduler, timesteps: list) -> list[tuple[float, ...]] | None:
    """Per step of an LCMScheduler row (epsilon prediction, no clipping): the numbers its step uses, from the
    scheduler itself; None for any other scheduler (it then steps through scheduler.step)."""
    config = scheduler.config
    if not isinstance(scheduler, LCMScheduler) or config.prediction_type != "epsilon" or config.thresholding or (
            config.clip_sample):  # fmt: skip
        return None
    alphas, plan = scheduler.alphas_cumprod, []
    order = [int(t) for t in scheduler.timesteps]
    for t in (int(t) for t in timesteps):
        following = order.index(t) + 1
        prev = order[following] if following < len(order) else t
        last = following == len(order)
        a = float(alphas[t])
        a_prev = float(alphas[prev]) if prev >= 0 else float(scheduler.final_alpha_cumprod)
        c_skip, c_out = (float(v) for v in scheduler.get_scalings_for_boundary_condition_discrete(torch.tensor(t)))
        noise_in = (1.0, 0.0) if last else (a_prev**0.5, (1 - a_prev) ** 0.5)
        plan.append((float(t), a**0.5, (1 - a) ** 0.5, c_out, c_skip, *noise_in))
    return plan


@functools.cache
def _step_parameters(scheduler_class: type) -> frozenset[str]:
    return frozenset(inspect.signature(scheduler_class.step).parameters)


def step_kwargs(row: Row, options: dict) -> dict:
    """What the pipeline passes to scheduler.step: the row's generator, and eta where the scheduler takes one."""
    accepted = _step_parameters(type(row.scheduler))
    kwargs = {}
    if "generator" in accepted:
        kwargs["generator"] = row.generator
    if "eta" in accepted:
        kwargs["eta"] = options.get("eta", 0.0)
    return kwargs


def fill_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """Resize to cover (width, height), then crop the centre."""
    if image.size == (width, height):
        return image
    scale = max(width / image.width, height / image.height)
    resized = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))),
                           Image.Resampling.LANCZOS, reducing_gap=3.0)  # fmt: skip  # a box reduction first: ~6x faster
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height))


def pixel_batch(images: list[Image.Image], to_device) -> torch.Tensor:
    """RGB images -> (N, 3, H, W) in [-1, 1] on the device, as the pipeline's image processor makes them
    (x / 255 * 2 - 1 in float32), but sent as bytes and converted there."""
    array = torch.from_numpy(np.stack([np.asarray(image) for image in images]))  # (N, H, W, 3) uint8
    pixels = to_device(array).permute(0, 3, 1, 2).float() / 255.0
    return (2.0 * pixels - 1.0).contiguous()


def initial_latents(row: Row, txt2img, img2img, encoded: torch.Tensor | None, device: str, to_device) -> None:
    """The row's starting latents: noise (txt2img) or its encoded input noised to its first timestep (img2img).

    LCM rows draw every noise they will need now, in the order the pipeline draws it, and send it to the
    device in one copy; other schedulers go through the pipeline's own prepare_latents.
    """
    dtype = row.text["prompt_embeds"].dtype
    shape = (1, txt2img.unet.config.in_channels, row.request.height // txt2img.vae_scale_factor,
             row.request.width // txt2img.vae_scale_factor)  # fmt: skip
    if row.plan is None:
        with swapped(txt2img, scheduler=row.scheduler), swapped(img2img, scheduler=row.scheduler):
            if encoded is None:
                latents = txt2img.prepare_latents(1, shape[1], row.request.height, row.request.width, dtype, device,
                                                  row.generator)  # fmt: skip
            else:  # a 4-channel "image" is taken as latents as they are: only the noise is added
                latents = img2img.prepare_latents(encoded, row.timesteps[0].reshape(1), 1, 1, dtype, device,
                                                  row.generator)  # fmt: skip
        row.latents = latents.contiguous()
        return
    # first the starting noise, then one per step but the last (LCMScheduler.step adds none in its last)
    drawn = torch.cat([randn_tensor(shape, generator=row.generator, dtype=dtype) for _ in row.timesteps])
    drawn = to_device(drawn)  # (steps, 4, h, w)
    row.noise = [drawn[i : i + 1] for i in range(1, len(drawn))]
    if encoded is None:
        row.latents = drawn[:1] * row.scheduler.init_noise_sigma
    else:  # LCMScheduler.add_noise: sqrt(a) x + sqrt(1 - a) noise, with a in the latents' dtype
        alpha = row.scheduler.alphas_cumprod.to(dtype)[int(row.timesteps[0])]
        row.latents = float(alpha**0.5) * encoded + float((1 - alpha) ** 0.5) * drawn[:1]


def encode_inputs(
    rows: list[Row], decoder_for, vaes: dict, family: str, to_device
) -> dict[int, torch.Tensor | Exception]:
    """Input images of img2img rows -> their scaled latents (1, 4, h, w) by id(row): one encoder call per size and
    VAE; a group that fails is encoded again row by row, so that only the failing row gets its error."""
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        groups.setdefault((row.request.pixel_size, decoder_for(row)), []).append(row)
    encoded: dict[int, torch.Tensor | Exception] = {}
    for (size, decoder), group in groups.items():
        for attempt in [group] if len(group) == 1 else [group, *([row] for row in group)]:
            try:  # a failed group drew no noise from its rows' generators: each alone starts as it would have
                pixels = pixel_batch(
                    [fill_crop(row.request.image.convert("RGB"), *size) for row in attempt], to_device
                )
                latents = vae.encode(vaes[decoder], family, pixels, [row.generator for row in attempt],
                                     attempt[0].text["prompt_embeds"].dtype, to_device)  # fmt: skip
            except Exception as error:
                if len(attempt) == 1:
                    encoded[id(attempt[0])] = error
                continue
            encoded.update({id(row): latent for row, latent in zip(attempt, latents)})
            if attempt is group:
                break
    return encoded
