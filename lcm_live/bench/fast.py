"""A lean LCM loop for throughput: fixed shapes, no Python per op that a CUDA graph cannot replay.

`FastLCM(engine, batch, width, height)` holds static input/output tensors; `run()` does the 4 (or n) LCM steps
and the decode into a uint8 image tensor on the device. On CUDA, `capture()` records the whole thing once as a
CUDA graph, so a generation is one graph launch. The step math is LCMScheduler.step (epsilon prediction),
with its per-step coefficients precomputed as numbers.
"""

from __future__ import annotations

import time

import torch
from diffusers import LCMScheduler

from ..vae import needs_upcast


def lcm_coefficients(
    scheduler: LCMScheduler, steps: int
) -> list[tuple[int, float, float, float, float, float, float]]:
    """Per step: (timestep, sqrt(1-a), sqrt(a), c_out, c_skip, sqrt(a_prev), sqrt(1-a_prev))."""
    scheduler.set_timesteps(steps)
    timesteps = [int(t) for t in scheduler.timesteps]
    out = []
    for index, t in enumerate(timesteps):
        prev = timesteps[index + 1] if index + 1 < len(timesteps) else t
        a = float(scheduler.alphas_cumprod[t])
        a_prev = float(scheduler.alphas_cumprod[prev]) if prev >= 0 else float(scheduler.final_alpha_cumprod)
        c_skip, c_out = (float(v) for v in scheduler.get_scalings_for_boundary_condition_discrete(t))
        out.append((t, (1 - a) ** 0.5, a**0.5, c_out, c_skip, a_prev**0.5, (1 - a_prev) ** 0.5))
    return out


class FastLCM:
    def __init__(self, engine, batch: int = 1, width: int = 512, height: int = 512, steps: int = 4,
                 decoder: str = "tiny", seed: int = 0):  # fmt: skip
        rt, pipe = engine.runtime, engine.txt2img
        self.device, self.dtype = rt.device, rt.dtype
        self.unet = pipe.unet
        self.vae = engine.tiny_vae if decoder == "tiny" and engine.tiny_vae is not None else engine.full_vae
        upcast = self.vae is engine.full_vae and needs_upcast(self.vae, engine.family)
        self.vae_dtype = torch.float32 if upcast else self.vae.dtype
        if upcast:  # the engine's one rule (vae.py): SDXL's VAE overflows in fp16, so keep it in fp32 here
            self.vae.to(self.vae_dtype)
        self.coefficients = lcm_coefficients(LCMScheduler.from_config(pipe.scheduler.config), steps)
        kwargs, *_ = engine.encode_text("a photo", "", False)
        g = torch.Generator(rt.device).manual_seed(seed)
        shape = (batch, 4, height // 8, width // 8)
        self.noise = [torch.randn(shape, generator=g, device=rt.device, dtype=rt.dtype) for _ in range(steps + 1)]
        self.embeds = kwargs["prompt_embeds"].expand(batch, -1, -1).contiguous()
        self.added = None
        if engine.family == "sdxl":
            time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=rt.device, dtype=rt.dtype)
            self.added = {"text_embeds": kwargs["pooled_prompt_embeds"].expand(batch, -1).contiguous(),
                          "time_ids": time_ids.expand(batch, -1).contiguous()}  # fmt: skip
        # float timesteps, as the engine passes them (the same embedding; a compiled UNet serves both)
        self.timesteps = [torch.full((batch,), c[0], device=rt.device, dtype=torch.float32) for c in self.coefficients]
        self.image: torch.Tensor | None = None
        self.graph = None

    def _forward(self) -> torch.Tensor:
        x = self.noise[0]
        last = len(self.coefficients) - 1
        for index, (_, sb, sa, c_out, c_skip, sa_prev, sb_prev) in enumerate(self.coefficients):
            eps = self.unet(x, self.timesteps[index], encoder_hidden_states=self.embeds,
                            added_cond_kwargs=self.added, return_dict=False)[0]  # fmt: skip
            denoised = c_out * (x - sb * eps) / sa + c_skip * x
            x = denoised if index == last else sa_prev * denoised + sb_prev * self.noise[index + 1]
        scaled = x / self.vae.config.scaling_factor
        if getattr(self.vae.config, "shift_factor", None):
            scaled = scaled + self.vae.config.shift_factor
        pixels = self.vae.decode(scaled.to(self.vae_dtype), return_dict=False)[0]
        return ((pixels.clamp(-1, 1) + 1) * 127.5).to(torch.uint8)

    @torch.inference_mode()
    def run(self) -> torch.Tensor:
        if self.graph is not None:
            self.graph.replay()
            return self.image
        return self._forward()

    @torch.inference_mode()
    def capture(self) -> None:
        """Record one generation as a CUDA graph (after warm-up runs on a side stream)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.image = self._forward()
        torch.cuda.synchronize()


def prepared(engine, size: int, batch: int, mode: str, compile_mode: str | None = None) -> tuple[FastLCM, dict]:
    """A FastLCM ready to time: its UNet compiled when `compile_mode` is given, the whole generation captured as a
    CUDA graph when `mode` is "graph" on CUDA (else run once to warm up); with the seconds that setup took."""
    fast = FastLCM(engine, batch=batch, width=size, height=size)
    setup: dict = {}
    if compile_mode:
        fast.unet = torch.compile(engine.txt2img.unet, mode=compile_mode)
        start = time.perf_counter()
        fast.run()
        if fast.device.startswith("cuda"):
            torch.cuda.synchronize()
        setup["compile_s"] = round(time.perf_counter() - start, 1)
    if mode == "graph" and fast.device.startswith("cuda"):
        start = time.perf_counter()
        fast.capture()
        setup["capture_s"] = round(time.perf_counter() - start, 2)
    else:
        fast.run()
    return fast, setup
