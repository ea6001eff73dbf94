"""Loading a model the way its users do: `from_pretrained`, `load_lora_weights`, `fuse_lora`, `LCMScheduler`.

Errors name the id and the fix; nothing here runs per request.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderTiny,
    DiffusionPipeline,
    LCMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

from .device import Runtime
from .presets import ASSETS, TAESD, ModelSpec
from .request import ModelLoadError


def public_id(model: str | None) -> str | None:
    """A model id fit to leave the server: hub ids as they are, local folders without the server's own path."""
    if model is None or not Path(model).exists():
        return model
    path = Path(model).resolve()
    if path.is_relative_to(ASSETS.parent):
        return str(path.relative_to(ASSETS.parent))  # e.g. assets/demo-model/base
    return "/".join(path.parts[-2:])


def _load_error(model_id: str, what: str, error: Exception) -> ModelLoadError:
    path = Path(model_id).expanduser()
    if path.exists():
        how = f"the path exists but is not a diffusers {what}"
    elif path.is_absolute() or model_id.startswith((".", "~")) or model_id.count("/") > 1:
        how = f"no such file or folder: {path}"
    else:
        how = f"download it once with network (`hf download {model_id}`), or pass a local folder"
    return ModelLoadError(f"Could not load {what} '{model_id}': {type(error).__name__}: {error}. To fix: {how}.")


def detect_family(base: str, local_files_only: bool = False) -> str:
    """'sdxl' or 'sd15', read from the pipeline's model_index.json."""
    try:
        index = DiffusionPipeline.load_config(base, local_files_only=local_files_only)
    except Exception as error:  # hub errors, missing folders, bad JSON: all mean "cannot load"
        raise _load_error(base, "base model", error) from error
    name = index.get("_class_name", "")
    if "XL" in name:
        return "sdxl"
    if name in ("StableDiffusionPipeline", "LatentConsistencyModelPipeline", "StableDiffusionImg2ImgPipeline"):
        return "sd15"
    raise ModelLoadError(f"'{base}' is a {name or 'unknown pipeline'}; lcm-live runs SD 1.5 and SDXL family models.")


def load_pipeline(spec: ModelSpec, runtime: Runtime, local_files_only: bool = False, progress=None):
    """The text-to-image pipeline for `spec`, LoRA fused, LCMScheduler in, on the runtime's device."""
    report = progress or (lambda fraction, message: None)
    # 1. Which family: decides the pipeline class and what it is given.
    report(0.05, f"Reading {spec.base}")
    family = detect_family(spec.base, local_files_only)
    pipeline_class = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    extra = {} if family == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    # 2. The base weights, in the runtime's dtype; the fp16 variant where the runtime computes in fp16.
    report(0.15, f"Loading {spec.base}")
    kwargs = dict(dtype=runtime.dtype, local_files_only=local_files_only, **extra)
    try:
        try:
            pipe = pipeline_class.from_pretrained(spec.base, variant=runtime.variant, **kwargs)
        except (OSError, ValueError) as error:
            if runtime.variant is None or "variant" not in str(error).lower():
                raise
            pipe = pipeline_class.from_pretrained(spec.base, **kwargs)  # no fp16 files published
    except Exception as error:
        raise _load_error(spec.base, "base model", error) from error
    # 3. The LCM-LoRA, fused into the weights then unloaded: no adapter cost per step.
    if spec.lora:
        report(0.7, f"Loading LCM-LoRA {spec.lora}")
        folder, weight_name = spec.lora, None
        if spec.lora.endswith(".safetensors") and Path(spec.lora).is_file():
            folder, weight_name = str(Path(spec.lora).parent), Path(spec.lora).name
        try:
            pipe.load_lora_weights(folder, weight_name=weight_name, adapter_name="lcm",
                                   local_files_only=local_files_only)  # fmt: skip
        except Exception as error:
            raise _load_error(spec.lora, "LCM-LoRA", error) from error
        pipe.fuse_lora(lora_scale=1.0)
        pipe.unload_lora_weights()
    # 4. The LCM scheduler, built from the base's own schedule.
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    report(0.85, f"Moving to {runtime.label}")
    pipe.to(runtime.device)
    if runtime.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    return pipe, family


def load_taesd(family: str, runtime: Runtime, local_files_only: bool = False) -> AutoencoderTiny:
    """The tiny TAESD autoencoder for `family` (a fast, slightly softer stand-in for the VAE)."""
    model_id = TAESD[family]
    try:
        tiny = AutoencoderTiny.from_pretrained(model_id, dtype=runtime.dtype, local_files_only=local_files_only)
    except Exception as error:
        raise _load_error(model_id, "TAESD decoder", error) from error
    tiny.to(runtime.device)
    if runtime.channels_last:
        tiny.to(memory_format=torch.channels_last)
    return tiny
