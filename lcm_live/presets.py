"""Model presets: a base model, a speed adapter (or a distilled model) and the recipe it samples with.

Every fact here (file names, scheduler settings, steps, licences) is taken from the model's card on the Hugging Face
Hub; the README's preset table lists them with the card's address.
"""

from __future__ import annotations

import inspect
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .request import CONTROLS, MAX_GUIDANCE, MAX_STEPS, MIN_GUIDANCE, MIN_STEPS


ASSETS = Path(__file__).resolve().parent.parent / "assets"
# The offline model (a diffusers folder `base/` + an LCM-LoRA in `lcm-lora/`); LCM_LIVE_DEMO_MODEL points elsewhere.
EMBEDDED_MODEL = Path(os.environ.get("LCM_LIVE_DEMO_MODEL") or ASSETS / "demo-model")

# The schedulers a recipe may name (all in diffusers), and the `scheduler.step` settings with their ranges.
SCHEDULERS = ("LCMScheduler", "TCDScheduler", "DDIMScheduler", "EulerDiscreteScheduler",
              "EulerAncestralDiscreteScheduler")  # fmt: skip
STEP_SETTING_RANGES = {"eta": (0.0, 1.0)}  # TCD's gamma and DDIM's eta: 0 deterministic, 1 fully stochastic
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
STEP_INPUTS = {"self", "model_output", "timestep", "sample", "generator", "return_dict"}  # the engine passes these
MIN_ADAPTER_WEIGHT, MAX_ADAPTER_WEIGHT = -2.0, 2.0


@dataclass(frozen=True)
class Recipe:
    """How a few-step model samples: the scheduler, its settings, and the defaults a request starts from."""

    name: str  # short id, shown in image parameters: "lcm", "tcd", "ddim-trailing", "euler-trailing", ...
    scheduler: str  # diffusers scheduler class, built from the base's own scheduler config
    scheduler_config: dict[str, Any] = field(default_factory=dict)  # overrides on that config, e.g. timestep_spacing
    step_kwargs: dict[str, Any] = field(default_factory=dict)  # extra kwargs of scheduler.step, e.g. {"eta": 0.3}
    steps: int = 4  # default number of denoising steps (the N of an N-step adapter)
    guidance_scale: float = 1.0  # default guidance; 1.0 means no classifier-free guidance (the cards' 0.0)

    def __post_init__(self):
        """ValueError naming the setting that is out of range (no torch needed: presets load with the page)."""
        if self.scheduler not in SCHEDULERS:
            raise ValueError(
                f"Recipe {self.name!r}: unknown scheduler {self.scheduler!r}; use one of {', '.join(SCHEDULERS)}."
            )
        spacing = self.scheduler_config.get("timestep_spacing", "leading")
        if spacing not in TIMESTEP_SPACINGS:
            raise ValueError(
                f"Recipe {self.name!r}: timestep_spacing must be one of {', '.join(TIMESTEP_SPACINGS)}; got {spacing!r}."
            )
        for key, value in self.step_kwargs.items():
            low, high = STEP_SETTING_RANGES.get(key, (-math.inf, math.inf))
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ValueError(f"Recipe {self.name!r}: {key} must be a number from {low} to {high}; got {value!r}.")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or not MIN_STEPS <= self.steps <= MAX_STEPS:
            raise ValueError(
                f"Recipe {self.name!r}: steps must be a whole number from {MIN_STEPS} to {MAX_STEPS}; got {self.steps!r}."
            )
        if not MIN_GUIDANCE <= self.guidance_scale <= MAX_GUIDANCE:
            raise ValueError(
                f"Recipe {self.name!r}: guidance_scale must be from {MIN_GUIDANCE} to {MAX_GUIDANCE}; got {self.guidance_scale}."
            )

    def __hash__(self):
        return hash((self.name, self.scheduler, tuple(sorted(self.scheduler_config.items())),
                     tuple(sorted(self.step_kwargs.items())), self.steps, self.guidance_scale))  # fmt: skip

    def make_scheduler(self, base_config):
        """The recipe's scheduler, built from the base's scheduler config (its training schedule) + the overrides.

        ValueError when the scheduler has no such setting (diffusers would ignore it silently)."""
        import diffusers

        scheduler_class = getattr(diffusers, self.scheduler)
        settings = set(inspect.signature(scheduler_class.__init__).parameters)
        step_settings = set(inspect.signature(scheduler_class.step).parameters) - STEP_INPUTS
        for key in self.scheduler_config:
            if key not in settings - {"self"}:
                raise ValueError(f"Recipe {self.name!r}: {self.scheduler} has no setting {key!r}.")
        for key in self.step_kwargs:
            if key not in step_settings:
                raise ValueError(f"Recipe {self.name!r}: {self.scheduler}.step has no setting {key!r}.")
        return scheduler_class.from_config(base_config, **self.scheduler_config)

    @property
    def description(self) -> str:
        """One line for people and image parameters: `TCDScheduler(eta=0.3)`."""
        settings = {**self.scheduler_config, **self.step_kwargs}
        return f"{self.scheduler}({', '.join(f'{k}={v}' for k, v in settings.items())})"


# The recipes, as each card gives them.
LCM = Recipe("lcm", "LCMScheduler")
# TCD: "eta (gamma in the paper) ... 0.3 often yields good results; a higher eta for more steps" (h1t/TCD-*-LoRA).
TCD = Recipe("tcd", "TCDScheduler", step_kwargs={"eta": 0.3})
# Hyper-SD's 1-step unified LoRA runs 1 to 8 steps with TCD, eta=1.0 for one step (ByteDance/Hyper-SD).
HYPER_TCD = Recipe("hyper-tcd", "TCDScheduler", step_kwargs={"eta": 1.0}, steps=1)


def ddim_trailing(steps: int) -> Recipe:
    """Hyper-SD's N-step LoRAs: "Ensure ddim scheduler timestep spacing set as trailing"."""
    return Recipe("ddim-trailing", "DDIMScheduler", {"timestep_spacing": "trailing"}, steps=steps)


def euler_trailing(steps: int, ancestral: bool = False) -> Recipe:
    """SDXL-Lightning ("Ensure sampler uses trailing timesteps") and the Turbo models' own scheduler configs."""
    scheduler = "EulerAncestralDiscreteScheduler" if ancestral else "EulerDiscreteScheduler"
    return Recipe("euler-a-trailing" if ancestral else "euler-trailing", scheduler, {"timestep_spacing": "trailing"},
                  steps=steps)  # fmt: skip


def _check_weight(what: str, weight: float) -> None:
    if not isinstance(weight, (int, float)) or not MIN_ADAPTER_WEIGHT <= weight <= MAX_ADAPTER_WEIGHT:
        raise ValueError(f"{what} must be from {MIN_ADAPTER_WEIGHT} to {MAX_ADAPTER_WEIGHT}; got {weight!r}.")


@dataclass(frozen=True)
class ModelSpec:
    base: str  # hub id or local folder of a diffusers pipeline, or a single-file .safetensors (SD 1.5 or SDXL family)
    lora: str | None  # the speed adapter: hub id, folder, .safetensors file or hub `owner/repo/file.safetensors`
    native_size: int | None = None  # default image side; None: read from the model
    label: str = ""  # what the UI shows
    recipe: Recipe = LCM  # scheduler, its settings, default steps and guidance
    licence: str = ""  # the licences of the base and the adapter, as their cards give them
    lora_weight: float = 1.0  # the speed adapter's weight when fused
    style_lora: str | None = None  # any LoRA stacked on the speed adapter (same forms as `lora`)
    style_weight: float = 1.0  # its weight when fused
    config: str | None = None  # single-file base only: a diffusers folder or hub id with the family's configs
    controls: tuple[tuple[str, str | None], ...] = ()  # (control, ControlNet id/folder/file or None: the family's)

    def __post_init__(self):
        _check_weight("The speed adapter's weight", self.lora_weight)
        _check_weight("The style LoRA's weight", self.style_weight)
        object.__setattr__(self, "controls", tuple((kind, source) for kind, source in self.controls))  # from JSON

    @property
    def name(self) -> str:
        if self.label:
            name = self.label
        else:
            name = f"{self.base} + {self.lora}" if self.lora else self.base
        if self.style_lora:
            name += f" + style {self.style_lora} ({self.style_weight:g})"
        return name

    @property
    def is_embedded(self) -> bool:
        return Path(self.base).resolve() == (EMBEDDED_MODEL / "base").resolve()

    def to_dict(self) -> dict:
        """Plain data (JSON-able), e.g. for a Ray Serve user_config; `from_dict` makes the spec again."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelSpec:
        recipe = data.get("recipe", LCM)
        return cls(**{**data, "recipe": Recipe(**recipe) if isinstance(recipe, dict) else recipe})

    @property
    def adapters(self) -> list[tuple[str, float]]:
        """(id, weight) of each LoRA fused into the base, speed adapter first."""
        pairs = [(self.lora, self.lora_weight), (self.style_lora, self.style_weight)]
        return [(lora, weight) for lora, weight in pairs if lora]


def embedded_controls() -> tuple[tuple[str, str], ...]:
    """The embedded model's own scribble ControlNet, where it ships (`python -m lcm_live.demo_model train-control`)."""
    folder = EMBEDDED_MODEL / "controlnet-scribble"
    return (("scribble", str(folder)),) if (folder / "config.json").exists() else ()


SD15, SDXL = "stable-diffusion-v1-5/stable-diffusion-v1-5", "stabilityai/stable-diffusion-xl-base-1.0"
SD15_LICENCE, SDXL_LICENCE = "CreativeML Open RAIL-M", "CreativeML Open RAIL++-M"
STABILITY_NC = "Stability AI Non-Commercial Research Community License (sai-nc-community)"

PRESETS: dict[str, ModelSpec] = {
    "sd15": ModelSpec(SD15, "latent-consistency/lcm-lora-sdv1-5", 512, "SD 1.5 + LCM-LoRA",
                      licence=f"{SD15_LICENCE}; LCM-LoRA: openrail++"),
    "sdxl": ModelSpec(SDXL, "latent-consistency/lcm-lora-sdxl", 1024, "SDXL + LCM-LoRA",
                      licence=f"{SDXL_LICENCE}; LCM-LoRA: openrail++"),
    "ssd-1b": ModelSpec("segmind/SSD-1B", "latent-consistency/lcm-lora-ssd-1b", 1024, "SSD-1B + LCM-LoRA",
                        licence="Apache 2.0; LCM-LoRA: openrail++"),
    "collage": ModelSpec("wavymulder/collage-diffusion", "latent-consistency/lcm-lora-sdv1-5", 512,
                         "Collage Diffusion + LCM-LoRA", licence=f"{SD15_LICENCE}; LCM-LoRA: openrail++"),
    "demo": ModelSpec(str(EMBEDDED_MODEL / "base"), str(EMBEDDED_MODEL / "lcm-lora"), None, "embedded demo model",
                      licence="Apache 2.0 (this project)", controls=embedded_controls()),
    "tcd-sd15": ModelSpec(SD15, "h1t/TCD-SD15-LoRA", 512, "SD 1.5 + TCD-LoRA", recipe=TCD,
                          licence=f"{SD15_LICENCE}; TCD-LoRA: MIT"),
    "tcd-sdxl": ModelSpec(SDXL, "h1t/TCD-SDXL-LoRA", 1024, "SDXL + TCD-LoRA", recipe=TCD,
                          licence=f"{SDXL_LICENCE}; TCD-LoRA: MIT"),
    "sd-turbo": ModelSpec("stabilityai/sd-turbo", None, 512, "SD-Turbo", recipe=euler_trailing(1),
                          licence=STABILITY_NC),
    "sdxl-turbo": ModelSpec("stabilityai/sdxl-turbo", None, 512, "SDXL-Turbo",
                            recipe=euler_trailing(1, ancestral=True), licence=STABILITY_NC),
}  # fmt: skip
# Hyper-SD: one LoRA file per step count; 1 step is the unified LoRA sampled with TCD, the others with DDIM.
for _family, _base, _size, _licence in (("sd15", SD15, 512, SD15_LICENCE), ("sdxl", SDXL, 1024, SDXL_LICENCE)):
    for _steps in (1, 2, 4, 8):
        _file = f"{_steps}step" if _steps == 1 else f"{_steps}steps"
        _prefix = "SD15" if _family == "sd15" else "SDXL"
        PRESETS[f"hyper-{_family}-{_steps}step"] = ModelSpec(
            _base, f"ByteDance/Hyper-SD/Hyper-{_prefix}-{_file}-lora.safetensors", _size,
            f"{'SD 1.5' if _family == 'sd15' else 'SDXL'} + Hyper-SD {_steps}-step LoRA",
            recipe=HYPER_TCD if _steps == 1 else ddim_trailing(_steps), licence=f"{_licence}; Hyper-SD: openrail++",
        )  # fmt: skip
# SDXL-Lightning: LoRAs for 2, 4 and 8 steps (its 1-step model is a full UNet, not a LoRA).
for _steps in (2, 4, 8):
    PRESETS[f"lightning-sdxl-{_steps}step"] = ModelSpec(
        SDXL, f"ByteDance/SDXL-Lightning/sdxl_lightning_{_steps}step_lora.safetensors", 1024,
        f"SDXL + Lightning {_steps}-step LoRA", recipe=euler_trailing(_steps),
        licence=f"{SDXL_LICENCE}; SDXL-Lightning: openrail++",
    )  # fmt: skip
# SDXS: one-step distilled models with their own tiny VAE in `vae/` (as the pipeline loads them), sampled as the cards
# say: "the same inference steps as the loaded model and CFG set to 0". Euler with trailing spacing puts that one
# step at the last timestep (999), as for SD-Turbo, SDXS's teacher. The sketch variant is a ControlNet for
# SDXS-512-DreamShaper (IDKiro/sdxs, demo_sketch.py: the strokes inverted to white on black).
PRESETS["sdxs"] = ModelSpec("IDKiro/sdxs-512-0.9", None, 512, "SDXS-512-0.9 (1 step)", recipe=euler_trailing(1),
                            licence="openrail++")  # fmt: skip
PRESETS["sdxs-sketch"] = ModelSpec(
    "IDKiro/sdxs-512-dreamshaper", None, 512, "SDXS-512-DreamShaper + sketch ControlNet (1 step)",
    recipe=euler_trailing(1), licence="openrail++", controls=(("scribble", "IDKiro/sdxs-512-dreamshaper-sketch"),),
)  # fmt: skip
DEFAULT_PRESET = "sd15"

# What a control name loads by default, per family: the lllyasviel v1.1 ControlNets for SD 1.5, TencentARC's
# T2I-Adapters for SDXL (an adapter runs once per image, not once per step).
CONTROL_IDS = {
    "sd15": {"scribble": "lllyasviel/control_v11p_sd15_scribble", "edges": "lllyasviel/control_v11p_sd15_canny",
             "depth": "lllyasviel/control_v11f1p_sd15_depth"},
    "sdxl": {"scribble": "TencentARC/t2i-adapter-sketch-sdxl-1.0", "edges": "TencentARC/t2i-adapter-canny-sdxl-1.0",
             "depth": "TencentARC/t2i-adapter-depth-midas-sdxl-1.0"},
}  # fmt: skip
_CONTROL_HINTS = {"scribble": ("scribble", "sketch"), "edges": ("canny", "edge", "lineart"), "depth": ("depth",)}


def parse_controls(text: str | None) -> tuple[tuple[str, str | None], ...]:
    """`--control` as pairs: "scribble,edges" (the family's ControlNets), "depth=<id, folder or file>", or an id
    whose name says its control (`lllyasviel/control_v11p_sd15_canny`); ValueError saying what did not parse."""
    pairs = []
    for item in (part.strip() for part in (text or "").split(",")):
        if not item:
            continue
        kind, _, source = item.partition("=") if "=" in item else (item, "", "")
        if source or kind in CONTROLS:
            if kind not in CONTROLS:
                raise ValueError(f"--control {item!r}: the control must be one of {', '.join(CONTROLS)}.")
            pairs.append((kind, source or None))
            continue
        guessed = [name for name, hints in _CONTROL_HINTS.items() if any(hint in item.lower() for hint in hints)]
        if len(guessed) != 1:
            raise ValueError(f"--control {item!r}: say which control it is, e.g. scribble={item}.")
        pairs.append((guessed[0], item))
    kinds = [kind for kind, _ in pairs]
    if len(set(kinds)) < len(kinds):
        raise ValueError(f"--control names a control twice: {', '.join(kinds)}.")
    return tuple(pairs)

# TAESD decoders (diffusers AutoencoderTiny) per family.
TAESD = {"sd15": "madebyollin/taesd", "sdxl": "madebyollin/taesdxl"}


def resolve_spec(preset: str | None = None, base: str | None = None, lora: str | None = None,
                 style_lora: str | None = None, style_weight: float = 1.0,
                 config: str | None = None) -> ModelSpec:  # fmt: skip
    """The model to load: a preset by name, or a custom base (+ LoRA); custom ids override the preset's.

    A custom base keeps the named preset's adapter and recipe (`--preset tcd-sd15 --base finetune.safetensors`).
    """
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}.")
    spec = PRESETS[preset or DEFAULT_PRESET]
    style = dict(style_lora=style_lora or None, style_weight=style_weight, config=config or None)
    if base:
        kept = dict(recipe=spec.recipe, lora_weight=spec.lora_weight) if preset else {}
        return ModelSpec(base, lora if lora is not None else spec.lora if preset else None, **kept, **style)
    if lora:
        return ModelSpec(spec.base, lora, spec.native_size, recipe=spec.recipe, **style)
    if style_lora or config:
        return ModelSpec(spec.base, spec.lora, spec.native_size, spec.label, spec.recipe, spec.licence,
                         spec.lora_weight, **style)  # fmt: skip
    return spec


def preset_choices() -> list[tuple[str, str]]:
    """(label, key) pairs for a dropdown."""
    return [(spec.label, key) for key, spec in PRESETS.items()]
