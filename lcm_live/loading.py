"""Loading a model the way its users do: `from_pretrained` or `from_single_file`, `load_lora_weights`, `set_adapters`
and `fuse_lora`, then the recipe's scheduler.

Errors name the id and the fix; nothing here runs per request.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from diffusers import AutoencoderTiny, DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from .device import Runtime
from .presets import ASSETS, TAESD, ModelSpec
from .request import ModelLoadError
from .single_file import FAMILY_CONFIGS, is_single_file, single_file_family


FAMILY_NAMES = {"sd15": "SD 1.5", "sdxl": "SDXL"}
# The files of a diffusers folder that describe it without its weights (what from_single_file needs).
CONFIG_FILES = ["*.json", "**/*.json", "*.txt", "**/*.txt", "**/*.model"]
T = TypeVar("T")
_HUB_FILE = re.compile(r"^[\w.-]+/[\w.-]+/.+\.safetensors$")  # owner/repo/path/in/repo.safetensors


def public_id(model: str | None) -> str | None:
    """A model id fit to leave the server: hub ids as they are, local folders without the server's own path."""
    if model is None or not Path(model).exists():
        return model
    path = Path(model).resolve()
    if path.is_relative_to(ASSETS.parent):
        return str(path.relative_to(ASSETS.parent))  # e.g. assets/demo-model/base
    return "/".join(path.parts[-2:])


def _is_hub_file(model: str) -> bool:
    """`owner/repo/file.safetensors` that is not a local path: one file of a hub repository."""
    return bool(_HUB_FILE.match(model)) and not Path(model).expanduser().exists()


def adapter_source(lora: str) -> tuple[str, str | None]:
    """(folder or hub id, file name or None) for `load_lora_weights`, from a LoRA as the operator wrote it."""
    path = Path(lora).expanduser()
    if path.is_file():
        return str(path.parent), path.name
    if _is_hub_file(lora):
        owner, repo, file = lora.split("/", 2)
        return f"{owner}/{repo}", file
    return lora, None


def _load_error(model_id: str, what: str, error: Exception) -> ModelLoadError:
    path = Path(model_id).expanduser()
    if path.exists():
        how = f"the path exists but is not a diffusers {what}"
    elif _is_hub_file(model_id):
        repo, file = adapter_source(model_id)
        how = f"download it once with network (`hf download {repo} {file}`), or pass a local file"
    elif path.is_absolute() or model_id.startswith((".", "~")) or model_id.count("/") > 1:
        how = f"no such file or folder: {path}"
    else:
        how = f"download it once with network (`hf download {model_id}`), or pass a local folder"
    return ModelLoadError(f"Could not load {what} '{model_id}': {type(error).__name__}: {error}. To fix: {how}.")


# ---------------------------------------------------------------------------------------------- families
def _single_file_path(base: str, local_files_only: bool) -> str:
    """The local path of a single-file base: the file itself, or the hub file from the cache (or downloaded)."""
    if Path(base).expanduser().is_file():
        return str(Path(base).expanduser())
    if _is_hub_file(base):
        from huggingface_hub import hf_hub_download

        repo, file = adapter_source(base)
        try:
            return hf_hub_download(repo, file, local_files_only=local_files_only)
        except Exception as error:
            raise _load_error(base, "base model", error) from error
    raise ModelLoadError(f"Could not load base model '{base}': no such file.")


def detect_family(base: str, local_files_only: bool = False) -> str:
    """'sdxl' or 'sd15': a single file's tensor names, or a diffusers folder's model_index.json."""
    if is_single_file(base):
        try:
            return single_file_family(_single_file_path(base, local_files_only))
        except ValueError as error:
            raise ModelLoadError(f"Could not load base model '{base}': {error}") from error
    try:
        index = DiffusionPipeline.load_config(base, local_files_only=local_files_only)
    except Exception as error:  # hub errors, missing folders, bad JSON: all mean "cannot load"
        raise _load_error(base, "base model", error) from error
    return _family_of_index(index, base)


def _family_of_index(index: dict, base: str) -> str:
    name = index.get("_class_name", "")
    if "XL" in name:
        return "sdxl"
    if name in ("StableDiffusionPipeline", "LatentConsistencyModelPipeline", "StableDiffusionImg2ImgPipeline"):
        return "sd15"
    raise ModelLoadError(f"'{base}' is a {name or 'unknown pipeline'}; lcm-live runs SD 1.5 and SDXL family models.")


def _config_folder(spec: ModelSpec, family: str, local_files_only: bool) -> str:
    """A local diffusers folder with the configs (and tokenizers) for a single file of `family`.

    diffusers' from_single_file downloads missing configs even when told local_files_only; resolving the folder
    here first keeps an offline start offline, with an error that says what to download."""
    config = spec.config or FAMILY_CONFIGS[family]
    if Path(config).expanduser().is_dir():
        folder = str(Path(config).expanduser())
    else:
        from huggingface_hub import snapshot_download

        try:
            folder = snapshot_download(config, allow_patterns=CONFIG_FILES, local_files_only=local_files_only)
        except Exception as error:
            raise ModelLoadError(
                f"Could not load the {FAMILY_NAMES[family]} configs '{config}' that a single-file checkpoint needs: "
                f"{type(error).__name__}. To fix: download them once with network (`hf download {config} "
                f"--include '*.json' '*.txt'`), or pass a diffusers folder of the same family as the config."
            ) from error
    try:
        config_family = _family_of_index(DiffusionPipeline.load_config(folder), config)
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"The config '{config}' is not a diffusers pipeline folder ({type(error).__name__})."
        ) from error
    if config_family != family:
        raise ModelLoadError(f"The config '{config}' is an {FAMILY_NAMES[config_family]} pipeline but '{spec.base}' "
                             f"is an {FAMILY_NAMES[family]} checkpoint; pass a config of the same family.")  # fmt: skip
    return folder


# ---------------------------------------------------------------------------------------------- adapters
def _lora_layers_in_file(state: dict) -> int:
    """Layers a LoRA state dict (as diffusers' lora_state_dict returns it) adapts: one down/A matrix each."""
    return sum(key.endswith(("lora.down.weight", "lora_A.weight", "lora_down.weight")) for key in state)


def _lora_layers_in_model(pipe, adapter_name: str) -> int:
    from peft.tuners.lora import LoraLayer

    total = 0
    for name in ("unet", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            total += sum(isinstance(m, LoraLayer) and adapter_name in m.lora_A for m in module.modules())
    return total


def _mismatch(error: Exception) -> str:
    """The first 'size mismatch for X: ... shape A ... shape B' of a load_state_dict error, in a few words."""
    found = re.search(r"size mismatch for ([\w.]+): copying a param with shape (torch\.Size\(\[[^\]]*\]\)) from "
                      r"checkpoint, the shape in current model is (torch\.Size\(\[[^\]]*\]\))", str(error))  # fmt: skip
    if found is None:
        return f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
    layer = re.sub(r"\.lora_[AB]\.[\w-]+\.weight$", "", found[1])
    count = str(error).count("size mismatch for")
    return f"{count} of its matrices have other shapes than the model's, e.g. {layer}: {found[2]} in the LoRA, {found[3]} in the model"


def load_adapter(pipe, lora: str, adapter_name: str, what: str, family: str, local_files_only: bool) -> None:
    """Load one LoRA as `adapter_name`; ModelLoadError naming it when it cannot be had or does not fit the base."""
    folder, weight_name = adapter_source(lora)
    kwargs = dict(weight_name=weight_name, local_files_only=local_files_only)
    try:
        if local_files_only and weight_name is None and not Path(folder).expanduser().exists():
            # diffusers refuses a hub id without a file name offline ("you must specify a weight_name"); its
            # cached snapshot is a local folder, where diffusers finds the file itself, as it does online.
            from huggingface_hub import snapshot_download

            folder = snapshot_download(folder, local_files_only=True)
        in_file = _lora_layers_in_file(pipe.lora_state_dict(folder, **kwargs)[0])
    except Exception as error:
        raise _load_error(lora, what, error) from error
    does_not_fit = f"The {what} '{lora}' does not fit this {FAMILY_NAMES[family]} base"
    try:
        pipe.load_lora_weights(folder, adapter_name=adapter_name, **kwargs)
    except (RuntimeError, ValueError) as error:  # shapes that differ, or no layer of the LoRA in this model
        raise ModelLoadError(f"{does_not_fit}: {_mismatch(error)}.") from error
    in_model = _lora_layers_in_model(pipe, adapter_name)
    if in_model < in_file:
        raise ModelLoadError(f"{does_not_fit}: only {in_model} of its {in_file} layers are in this model "
                             "(a LoRA made for another model family?).")  # fmt: skip


def fuse_adapters(pipe, spec: ModelSpec, family: str, local_files_only: bool, report) -> list[str]:
    """Load the speed adapter and the style LoRA, weight them (`set_adapters`), fuse them into the weights and
    unload them: no adapter cost per step. Returns the adapter names fused."""
    speed = "LCM-LoRA" if spec.recipe.name == "lcm" else "speed LoRA"
    wanted = [
        ("speed", spec.lora, spec.lora_weight, speed, 0.6),
        ("style", spec.style_lora, spec.style_weight, "style LoRA", 0.7),
    ]
    names, weights = [], []
    for name, lora, weight, what, fraction in wanted:
        if lora:
            report(fraction, f"Loading {what} {lora}")
            load_adapter(pipe, lora, name, what, family, local_files_only)
            names.append(name)
            weights.append(weight)
    if names:
        pipe.set_adapters(names, adapter_weights=weights)
        pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
        pipe.unload_lora_weights()
    return names


def cache_first(load: Callable[[bool], T], local_files_only: bool = False) -> T:
    """`load(local_files_only)` from the local files first: a cached model loads without the network (without
    one, each hub request is retried for half a minute); the network only when that fails."""
    if local_files_only:
        return load(True)
    try:
        return load(True)
    except ModelLoadError:
        return load(False)


# ---------------------------------------------------------------------------------------------- pipeline
def load_pipeline(spec: ModelSpec, runtime: Runtime, local_files_only: bool = False, progress=None):
    """The text-to-image pipeline for `spec`: adapters fused, the recipe's scheduler in, on the runtime's device."""
    report = progress or (lambda fraction, message: None)
    # 1. Which family: decides the pipeline class and what it is given.
    report(0.05, f"Reading {spec.base}")
    family = detect_family(spec.base, local_files_only)
    pipeline_class = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    extra = {} if family == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    # 2. The base weights, in the runtime's dtype: a single file with its family's configs, or a diffusers folder
    #    (the fp16 variant where the runtime computes in fp16).
    report(0.15, f"Loading {spec.base}")
    if is_single_file(spec.base):
        path, config = _single_file_path(spec.base, local_files_only), _config_folder(spec, family, local_files_only)
        try:
            pipe = pipeline_class.from_single_file(path, config=config, dtype=runtime.dtype, local_files_only=True,
                                                   **extra)  # fmt: skip
        except Exception as error:  # a truncated or mislabelled file: say which, not where it lives
            raise ModelLoadError(f"Could not load base model '{spec.base}' as an {FAMILY_NAMES[family]} single file: "
                                 f"{type(error).__name__}: {str(error).splitlines()[0][:300]}") from error  # fmt: skip
    else:
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
    # 3. The speed adapter and the style LoRA, weighted, fused into the weights, then unloaded.
    fuse_adapters(pipe, spec, family, local_files_only, report)
    # 4. The recipe's scheduler, built from the base's own schedule.
    try:
        pipe.scheduler = spec.recipe.make_scheduler(pipe.scheduler.config)
    except ValueError as error:
        raise ModelLoadError(str(error)) from error
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
