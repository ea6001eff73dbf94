"""VAE encode and decode, with one upcast rule: fp32 only where the VAE needs it (SDXL's `force_upcast` in fp16).

SDXL's original VAE overflows in fp16, so its pipelines run it in fp32 when its config says `force_upcast`; the
SD 1.5 pipelines never upcast (diffusers' AutoencoderKL defaults `force_upcast` to True, so the config alone is
not the rule). The same rule holds for encoding and decoding.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image


def needs_upcast(vae, family: str) -> bool:
    """Whether `vae` runs in fp32 for `family`: SDXL's fp16 VAE whose config asks for it, nothing else."""
    return family == "sdxl" and vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))


@contextmanager
def upcast(vae, family: str) -> Iterator[torch.dtype]:
    """Run `vae` in fp32 for the block where it needs it; yields the dtype its inputs take."""
    if not needs_upcast(vae, family):
        yield vae.dtype
        return
    dtype = vae.dtype
    vae.to(torch.float32)
    try:
        yield torch.float32
    finally:
        vae.to(dtype)


def scaled(latents: torch.Tensor, config) -> torch.Tensor:
    """Encoder output -> the UNet's latent space (as the pipelines scale it)."""
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        mean = torch.tensor(mean, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
        std = torch.tensor(std, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
        return (latents - mean) * config.scaling_factor / std
    return config.scaling_factor * latents


def encode(vae, family: str, pixels: torch.Tensor, generators: list, dtype: torch.dtype, to_device) -> list:
    """Pixels (N, 3, H, W) in [-1, 1] -> N scaled latents (1, 4, h, w) in `dtype`, one encoder call.

    A KL VAE's latent is sampled per image with that image's generator (mean + std * noise, as the pipeline's
    prepare_latents does alone); TAESD encodes to the latents themselves.
    """
    with upcast(vae, family) as vae_dtype:
        output = vae.encode(pixels.to(vae_dtype))
    latents = []
    for i, generator in enumerate(generators):
        if hasattr(output, "latent_dist"):
            dist = DiagonalGaussianDistribution(output.latent_dist.parameters[i : i + 1])
            noise = randn_tensor(dist.mean.shape, generator=generator, dtype=dist.mean.dtype)
            latent = dist.mean + dist.std * to_device(noise)
        else:
            latent = output.latents[i : i + 1]
        latents.append(scaled(latent.to(dtype), vae.config))
    return latents


def to_pixels(vae, latents: torch.Tensor, original: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode -> (uint8 pixels (N, H, W, 3), finite flags (N,) of latents and pixels), all on the device."""
    scaled_back = latents / vae.config.scaling_factor
    if getattr(vae.config, "shift_factor", None):
        scaled_back = scaled_back + vae.config.shift_factor
    pixels = vae.decode(scaled_back.to(vae.dtype), return_dict=False)[0]  # (N, 3, H, W) in [-1, 1]
    finite = torch.isfinite(original).flatten(1).all(1) & torch.isfinite(pixels).flatten(1).all(1)
    uint8 = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return uint8, finite


def decode(vae, family: str, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The full VAE's decode under the upcast rule; (uint8 pixels (N, H, W, 3), finite flags (N,))."""
    with upcast(vae, family) as dtype:
        return to_pixels(vae, latents.to(dtype), latents)


def to_images(pixels: torch.Tensor, finite: torch.Tensor) -> tuple[list[Image.Image], list[bool]]:
    """Device pixels (N, H, W, 3) uint8 and flags -> PIL images and bools; on CUDA one wait, via pinned memory."""
    if pixels.device.type == "cuda":
        host_pixels = torch.empty(pixels.shape, dtype=pixels.dtype, pin_memory=True)
        host_finite = torch.empty(finite.shape, dtype=finite.dtype, pin_memory=True)
        host_pixels.copy_(pixels, non_blocking=True)
        host_finite.copy_(finite, non_blocking=True)
        torch.cuda.current_stream().synchronize()
        pixels, finite = host_pixels, host_finite
    arrays, flags = pixels.cpu().numpy(), finite.cpu().tolist()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arrays], flags
