"""Model presets: a base model + the LCM-LoRA that matches it, as published with the LCM-LoRA release."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


ASSETS = Path(__file__).resolve().parent.parent / "assets"
# The offline model (a diffusers folder `base/` + an LCM-LoRA in `lcm-lora/`); LCM_LIVE_DEMO_MODEL points elsewhere.
EMBEDDED_MODEL = Path(os.environ.get("LCM_LIVE_DEMO_MODEL") or ASSETS / "demo-model")


@dataclass(frozen=True)
class ModelSpec:
    base: str  # hub id or local folder of a diffusers pipeline (SD 1.5 or SDXL family)
    lora: str | None  # hub id, local folder or .safetensors file of an LCM-LoRA; None for a full LCM model
    native_size: int | None = None  # default image side; None: read from the model
    label: str = ""  # what the UI shows

    @property
    def name(self) -> str:
        return self.label or (f"{self.base} + {self.lora}" if self.lora else self.base)

    @property
    def is_embedded(self) -> bool:
        return Path(self.base).resolve() == (EMBEDDED_MODEL / "base").resolve()


PRESETS: dict[str, ModelSpec] = {
    "sd15": ModelSpec(
        "stable-diffusion-v1-5/stable-diffusion-v1-5", "latent-consistency/lcm-lora-sdv1-5", 512, "SD 1.5 + LCM-LoRA"
    ),
    "sdxl": ModelSpec(
        "stabilityai/stable-diffusion-xl-base-1.0", "latent-consistency/lcm-lora-sdxl", 1024, "SDXL + LCM-LoRA"
    ),
    "ssd-1b": ModelSpec("segmind/SSD-1B", "latent-consistency/lcm-lora-ssd-1b", 1024, "SSD-1B + LCM-LoRA"),
    "collage": ModelSpec(
        "wavymulder/collage-diffusion", "latent-consistency/lcm-lora-sdv1-5", 512, "Collage Diffusion + LCM-LoRA"
    ),
    "demo": ModelSpec(str(EMBEDDED_MODEL / "base"), str(EMBEDDED_MODEL / "lcm-lora"), None, "embedded demo model"),
}
DEFAULT_PRESET = "sd15"

# TAESD decoders (diffusers AutoencoderTiny) per family.
TAESD = {"sd15": "madebyollin/taesd", "sdxl": "madebyollin/taesdxl"}


def resolve_spec(preset: str | None = None, base: str | None = None, lora: str | None = None) -> ModelSpec:
    """The model to load: a preset by name, or a custom base (+ LoRA); custom ids override the preset's."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}.")
    spec = PRESETS[preset or DEFAULT_PRESET]
    if base:
        return ModelSpec(base, lora if lora is not None else spec.lora if preset else None)
    if lora:
        return ModelSpec(spec.base, lora, spec.native_size)
    return spec


def preset_choices() -> list[tuple[str, str]]:
    """(label, key) pairs for a dropdown."""
    return [(spec.label, key) for key, spec in PRESETS.items()]
