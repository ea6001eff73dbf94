"""Measuring the engine: build one on a real architecture, time each stage, count FLOPs, read peak memory."""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..architectures import ARCHITECTURES, build_pipeline
from ..device import Runtime
from ..engine import Engine
from ..presets import PRESETS, ModelSpec
from ..request import Request


PROMPT = "close-up photography of old man standing in the rain at night, in a street lit by lamps, leica 35mm summilux"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def random_taesd(runtime: Runtime):
    """TAESD's architecture (diffusers AutoencoderTiny, default config = madebyollin/taesd) with random weights."""
    from diffusers import AutoencoderTiny

    with torch.device(runtime.device):
        tiny = AutoencoderTiny()
    tiny.to(dtype=runtime.dtype)
    if runtime.channels_last:
        tiny.to(memory_format=torch.channels_last)
    return tiny.eval()


def make_engine(arch: str, runtime: Runtime, taesd: bool = True, model: str | None = None, seed: int = 0,
                recipe=None) -> Engine:  # fmt: skip
    """An Engine on `arch` with random weights (or on `model`, a hub id or folder, when given); `recipe` (a
    presets.Recipe) sets the random-weight engine's scheduler, its settings and defaults (default: LCM)."""
    if model or arch == "embedded":
        if model:
            spec = ModelSpec(model, None)
        elif PRESETS["demo"].base and os.path.isdir(PRESETS["demo"].base):
            spec = PRESETS["demo"]
        else:
            return make_engine("tiny-sd15", runtime, taesd, seed=seed)
        engine = Engine.load(spec, runtime, taesd=False, local_files_only=True, warmup=False)
        if taesd:
            engine.tiny_vae = random_taesd(runtime)
        return engine
    from diffusers import LCMScheduler

    with torch.device(runtime.device), default_dtype(runtime.dtype):  # SDXL in fp32 would need 14 GB
        pipe = build_pipeline(arch, seed=seed, dtype=runtime.dtype)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    if recipe is not None:
        pipe.scheduler = recipe.make_scheduler(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if runtime.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    info = ARCHITECTURES[arch]
    label = f"{arch} (random weights)" + (f", {recipe.name}" if recipe is not None else "")
    spec = ModelSpec(f"random-weights:{arch}", None, info.native_size, label, **({"recipe": recipe} if recipe else {}))
    return Engine(pipe, spec, runtime, info.family, random_taesd(runtime) if taesd else None)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """New parameters in `dtype` (weights are built in the dtype they run in: half the peak memory)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


class StepClock:
    """Times every UNet call of `unet` (synchronising the device), while installed."""

    def __init__(self, unet, device: str):
        self.unet, self.device, self.times_ms = unet, device, []
        self._start = 0.0

    def __enter__(self):
        def before(module, args, kwargs):
            sync(self.device)
            self._start = time.perf_counter()

        def after(module, args, kwargs, output):
            sync(self.device)
            self.times_ms.append((time.perf_counter() - self._start) * 1e3)

        self._hooks = [self.unet.register_forward_pre_hook(before, with_kwargs=True),
                       self.unet.register_forward_hook(after, with_kwargs=True)]  # fmt: skip
        return self

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mb(device: str) -> float:
    """Peak device memory on CUDA; on CPU the process's peak resident set (since start)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def median(values: list[float]) -> float:
    return round(statistics.median(values), 1) if values else 0.0


def time_request(engine: Engine, request: Request, repeats: int = 2, cached_text: bool = False) -> dict:
    """Per-stage times (ms, medians of `repeats` runs after one warm-up) for `request`.

    text_ms is the text encoder's time (its cache is cleared before each run unless `cached_text`).
    """
    device = engine.runtime.device
    engine.generate(replace(request, steps=min(request.steps, 2)))  # warm-up
    runs = []
    reset_peak(device)
    for _ in range(repeats):
        if not cached_text:
            engine.prompts.clear()
        with StepClock(engine.txt2img.unet, device) as clock:
            result = engine.generate(request)
        runs.append((result.timings, clock.times_ms))
    steps = [statistics.median(col) for col in zip(*(t for _, t in runs))]
    out = dict(
        text_ms=median([t.text_ms for t, _ in runs]),
        step_ms=[round(s, 1) for s in steps],
        denoise_ms=median([t.denoise_ms for t, _ in runs]),
        decode_ms=median([t.decode_ms for t, _ in runs]),
        total_ms=median([t.total_ms for t, _ in runs]),
        unet_steps=runs[0][0].unet_steps,
        decoder=result.params["decoder"],
        peak_memory_mb=round(peak_memory_mb(device), 1),
    )
    out["total_cached_text_ms"] = round(out["total_ms"] - out["text_ms"], 1)
    return out


# ---------------------------------------------------------------------- FLOPs and the machine's peak
def count_flops(fn) -> int:
    """FLOPs of `fn()`. Attention runs as plain matmuls here: the counter does not see every fused CPU kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode(), sdpa_kernel(SDPBackend.MATH):
        fn()
    return counter.get_total_flops()


def stage_flops(engine: Engine, width: int, height: int, decoder: str = "tiny") -> dict:
    """FLOPs of one text encoding, one UNet step (batch 1, no guidance) and one decode at width x height."""
    rt, pipe = engine.runtime, engine.txt2img
    latents = torch.randn(1, 4, height // 8, width // 8, device=rt.device, dtype=rt.dtype)
    ids = torch.zeros(1, pipe.tokenizer.model_max_length, dtype=torch.long, device=rt.device)
    text = count_flops(lambda: pipe.text_encoder(ids))
    if engine.family == "sdxl":
        text += count_flops(lambda: pipe.text_encoder_2(ids))
    kwargs, *_ = engine.encode_text(PROMPT, "", False)
    added = {}
    if engine.family == "sdxl":
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=rt.device, dtype=rt.dtype)
        added = {"added_cond_kwargs": {"text_embeds": kwargs["pooled_prompt_embeds"], "time_ids": time_ids}}
    t = torch.tensor(999, device=rt.device)
    step = count_flops(lambda: pipe.unet(latents, t, encoder_hidden_states=kwargs["prompt_embeds"], **added))
    vae = engine.tiny_vae if decoder == "tiny" and engine.tiny_vae is not None else engine.full_vae
    decode = count_flops(lambda: vae.decode(latents.to(vae.dtype)))
    return dict(text=text, unet_step=step, decode=decode)


def _best_rate(fn, flops: float, device: str, seconds: float = 1.0) -> float:
    fn()
    sync(device)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        fn()
        sync(device)
        best = max(best, flops / (time.perf_counter() - start))
    return best


def machine_peak(device: str, dtype: torch.dtype, seconds: float = 1.0, small: bool = False) -> dict:
    """Achieved FLOP/s of a large matmul and a UNet-like 3x3 conv (channels_last) in `dtype` on `device`."""
    n = 256 if small else (8192 if device.startswith("cuda") else 2048)
    with torch.device(device), torch.inference_mode():
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        matmul = _best_rate(lambda: a @ b, 2 * n**3, device, seconds)
        c, hw = (64, 16) if small else (320, 64)
        x = torch.randn(1, c, hw, hw, dtype=dtype).to(memory_format=torch.channels_last)
        conv = torch.nn.Conv2d(c, c, 3, padding=1).to(dtype=dtype, memory_format=torch.channels_last)
        conv_rate = _best_rate(lambda: conv(x), 2 * c * c * 9 * hw * hw, device, seconds)
    return dict(matmul_gflops=round(matmul / 1e9, 1), conv_gflops=round(conv_rate / 1e9, 1),
                peak_gflops=round(max(matmul, conv_rate) / 1e9, 1))  # fmt: skip


@contextlib.contextmanager
def threads(count: int | None):
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def timed(fn, repeats: int, device: str, warmup: bool = True) -> float:
    """Median seconds of `fn` over `repeats` runs (after one warm-up run unless `warmup` is False)."""
    if warmup:
        fn()
        sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def standard_call(engine: Engine, size: int, steps: int = 25, guidance: float = 7.5):
    """The classic pipeline call, as a function: `steps` Euler steps with classifier-free guidance (the UNet
    sees a batch of 2), full VAE decode, a PIL image out. The engine's LCM scheduler is restored after each call."""
    from diffusers import EulerDiscreteScheduler

    pipe = engine.txt2img
    euler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)

    def call():
        lcm, pipe.scheduler = pipe.scheduler, euler
        try:
            return pipe(prompt=PROMPT, negative_prompt="", num_inference_steps=steps, guidance_scale=guidance,
                        width=size, height=size).images[0]  # fmt: skip
        finally:
            pipe.scheduler = lcm

    return call
