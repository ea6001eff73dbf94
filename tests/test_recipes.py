"""Recipes, style LoRAs and single-file checkpoints, loaded through the real path on tiny random-weight models.

The presets load exactly as shipped (hub ids, file names) from a Hugging Face cache this module writes: tiny
pipelines stand in for the bases, and each adapter is written in its published file's key format.
"""

import copy
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from lcm_live.architectures import SD_SCHEDULER, build_pipeline, random_controlnet, random_lcm_lora_state, save_lora
from lcm_live.engine import Engine
from lcm_live.loading import detect_family, load_pipeline
from lcm_live.presets import PRESETS, ModelSpec, Recipe, resolve_spec
from lcm_live.request import GenerationStopped, ModelLoadError, Request
from lcm_live.settings import Settings
from lcm_live.single_file import save_single_file


COMMIT = "0" * 40
# Key format of each published speed adapter (see save_lora) and the alpha its file carries (None: alpha = rank).
ADAPTER_FORMATS = {
    "latent-consistency/": ("kohya", 4),
    "h1t/": ("diffusers", None),
    "ByteDance/Hyper-SD/": ("kohya", 2),  # alpha 2 on rank 4: the fused delta is scaled by 0.5
    "ByteDance/SDXL-Lightning/": ("kohya", 4),
}
STEP_INPUTS = ("model_output", "timestep", "sample")


def _snapshot(cache: Path, repo: str) -> Path:
    """The snapshot folder of `repo` in a Hugging Face cache at `cache` (created, with refs/main)."""
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(COMMIT)
    return root / "snapshots" / COMMIT


def _family(spec: ModelSpec) -> str:
    return "sdxl" if "xl" in spec.base.lower() else "sd15"


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A Hugging Face cache holding every preset's base (tiny) and speed adapter (random, in its file's format)."""
    cache = tmp_path_factory.mktemp("hub-cache")
    bases = {}
    for seed, spec in enumerate(spec for key, spec in PRESETS.items() if key != "demo"):
        if spec.base not in bases:
            bases[spec.base] = build_pipeline("tiny-sdxl" if _family(spec) == "sdxl" else "tiny-sd15", seed=seed)
            if "sdxs" in spec.base:  # SDXS ships its own tiny VAE as the pipeline's `vae`
                bases[spec.base].vae = _tiny_vae()
            bases[spec.base].save_pretrained(_snapshot(cache, spec.base))
        for _, source in spec.controls:  # the published ControlNets, as diffusers folders
            random_controlnet(bases[spec.base].unet, seed=seed).save_pretrained(_snapshot(cache, source))
        if spec.lora is None:
            continue
        pipe = bases[spec.base]
        style, alpha = next(f for prefix, f in ADAPTER_FORMATS.items() if spec.lora.startswith(prefix))
        parts = spec.lora.split("/")
        repo, file = "/".join(parts[:2]), "/".join(parts[2:]) or None
        state, config = random_lcm_lora_state(pipe.unet, rank=4, seed=100 + seed)
        config = copy.copy(config)
        config.lora_alpha = alpha or 4
        save_lora(pipe, state, config, str(_snapshot(cache, repo)), style, file)
    return cache


def _tiny_vae():
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    return AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                           num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1))  # fmt: skip


@pytest.fixture
def offline_hub(hub_cache, monkeypatch):
    """Point the Hugging Face cache at `hub_cache` for one test (the tests run with HF_HUB_OFFLINE=1)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
    return hub_cache


# ------------------------------------------------------------------------------------------------ the presets' facts
# From the model cards: file, scheduler, its settings, steps. A changed fact must change here too.
CARDS = {
    "tcd-sd15": ("h1t/TCD-SD15-LoRA", "TCDScheduler", {}, {"eta": 0.3}, 4),
    "tcd-sdxl": ("h1t/TCD-SDXL-LoRA", "TCDScheduler", {}, {"eta": 0.3}, 4),
    "hyper-sd15-1step": ("ByteDance/Hyper-SD/Hyper-SD15-1step-lora.safetensors", "TCDScheduler", {}, {"eta": 1.0}, 1),
    "hyper-sd15-2step": ("ByteDance/Hyper-SD/Hyper-SD15-2steps-lora.safetensors", "DDIMScheduler", {"timestep_spacing": "trailing"}, {}, 2),
    "hyper-sd15-4step": ("ByteDance/Hyper-SD/Hyper-SD15-4steps-lora.safetensors", "DDIMScheduler", {"timestep_spacing": "trailing"}, {}, 4),
    "hyper-sd15-8step": ("ByteDance/Hyper-SD/Hyper-SD15-8steps-lora.safetensors", "DDIMScheduler", {"timestep_spacing": "trailing"}, {}, 8),
    "hyper-sdxl-1step": ("ByteDance/Hyper-SD/Hyper-SDXL-1step-lora.safetensors", "TCDScheduler", {}, {"eta": 1.0}, 1),
    "hyper-sdxl-2step": ("ByteDance/Hyper-SD/Hyper-SDXL-2steps-lora.safetensors", "DDIMScheduler", {"timestep_spacing": "trailing"}, {}, 2),
    "hyper-sdxl-4step": ("ByteDance/Hyper-SD/Hyper-SDXL-4steps-lora.safetensors", "DDIMScheduler", {"timestep_spacing": "trailing"}, {}, 4),
    "hyper-sdxl-8step": ("ByteDance/Hyper-SD/Hyper-SDXL-8steps-lora.safetensors", "DDIMScheduler", {"timestep_spacing": "trailing"}, {}, 8),
    "lightning-sdxl-2step": ("ByteDance/SDXL-Lightning/sdxl_lightning_2step_lora.safetensors", "EulerDiscreteScheduler", {"timestep_spacing": "trailing"}, {}, 2),
    "lightning-sdxl-4step": ("ByteDance/SDXL-Lightning/sdxl_lightning_4step_lora.safetensors", "EulerDiscreteScheduler", {"timestep_spacing": "trailing"}, {}, 4),
    "lightning-sdxl-8step": ("ByteDance/SDXL-Lightning/sdxl_lightning_8step_lora.safetensors", "EulerDiscreteScheduler", {"timestep_spacing": "trailing"}, {}, 8),
    "sd-turbo": (None, "EulerDiscreteScheduler", {"timestep_spacing": "trailing"}, {}, 1),
    "sdxl-turbo": (None, "EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}, {}, 1),
    "sdxs": (None, "EulerDiscreteScheduler", {"timestep_spacing": "trailing"}, {}, 1),
    "sdxs-sketch": (None, "EulerDiscreteScheduler", {"timestep_spacing": "trailing"}, {}, 1),
}  # fmt: skip


@pytest.mark.parametrize("key", sorted(CARDS))
def test_presets_carry_their_cards_settings(key):
    lora, scheduler, config, step_kwargs, steps = CARDS[key]
    spec = PRESETS[key]
    assert (spec.lora, spec.recipe.scheduler, spec.recipe.scheduler_config) == (lora, scheduler, config)
    assert (spec.recipe.step_kwargs, spec.recipe.steps, spec.recipe.guidance_scale) == (step_kwargs, steps, 1.0)
    assert spec.licence and spec.native_size == (512 if "sd15" in key or "turbo" in key or "sdxs" in key else 1024)


def test_lcm_presets_are_unchanged():
    for key in ("sd15", "sdxl", "ssd-1b", "collage", "demo"):
        recipe = PRESETS[key].recipe
        assert (recipe.scheduler, recipe.scheduler_config, recipe.step_kwargs, recipe.steps) == (
            "LCMScheduler",
            {},
            {},
            4,
        )
    assert PRESETS["sd15"].lora == "latent-consistency/lcm-lora-sdv1-5"


def test_readme_lists_every_preset_with_steps_guidance_and_licence():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    rows = {
        m[1]: [c.strip() for c in m[2].split("|")] for m in re.finditer(r"^\| `([\w.-]+)` \|(.+)\|$", readme, re.M)
    }
    for key, spec in PRESETS.items():
        assert key in rows, f"README's preset table has no row for {key}"
        base, adapter, scheduler, steps, guidance, licence = rows[key]
        assert spec.recipe.description in scheduler.replace("`", ""), key
        assert steps == str(spec.recipe.steps) and guidance.startswith(f"{spec.recipe.guidance_scale:g}"), key
        assert licence == spec.licence, key


# ------------------------------------------------------------------------------------------------ loading recipes
# Timesteps each recipe's scheduler takes at its default steps; "trailing" ends at 999, "leading" would not.
TIMESTEPS = {
    "lcm": [999, 759, 499, 259], "tcd": [999, 759, 499, 259], "hyper-tcd": [999], "euler-trailing": [999],
    "euler-a-trailing": [999], "ddim-trailing": [999, 499],
}  # fmt: skip


@pytest.mark.parametrize("key", ["sd15", "tcd-sd15", "hyper-sd15-1step", "hyper-sd15-2step", "sd-turbo", "sdxl-turbo"])
def test_each_recipe_sets_its_scheduler_from_the_base_schedule(key):
    from diffusers import LCMScheduler

    recipe = PRESETS[key].recipe
    scheduler = recipe.make_scheduler(LCMScheduler(**SD_SCHEDULER).config)
    assert type(scheduler).__name__ == recipe.scheduler
    assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.beta_end == 0.012  # the base's
    scheduler.set_timesteps(recipe.steps)
    assert [round(float(t)) for t in scheduler.timesteps] == TIMESTEPS[recipe.name]


@pytest.mark.parametrize("key", [key for key in PRESETS if key != "demo"])
def test_every_preset_loads_offline_from_its_hub_files_and_generates(offline_hub, cpu32, key):
    spec = PRESETS[key]
    engine = Engine.load(spec, cpu32, local_files_only=True, warmup=False)
    assert type(engine.txt2img.scheduler).__name__ == spec.recipe.scheduler
    assert engine.family == _family(spec)
    assert not any("lora" in name for name, _ in engine.txt2img.unet.named_parameters())  # fused and unloaded
    result = engine.generate(Request(prompt="a red circle", steps=spec.recipe.steps, width=64, height=64))
    assert result.timings.unet_steps == spec.recipe.steps and result.image.size == (64, 64)


@pytest.mark.parametrize("key", ["tcd-sd15", "hyper-sd15-8step", "lightning-sdxl-4step", "sdxl-turbo"])
def test_recipes_stop_at_a_step_boundary_and_run_image_to_image(offline_hub, cpu32, key):
    from PIL import Image

    engine = Engine.load(PRESETS[key], cpu32, local_files_only=True, warmup=False)
    calls = []
    engine.txt2img.unet.register_forward_hook(lambda *args: calls.append(1))
    with pytest.raises(GenerationStopped) as stopped:
        engine.generate(Request(prompt="stop", steps=4, width=64, height=64), should_stop=lambda: len(calls) >= 2)
    assert stopped.value.steps_done == 2
    edited = engine.generate(
        Request(prompt="edit", image=Image.new("RGB", (64, 64), "red"), steps=4, strength=0.5, width=64, height=64)
    )
    assert edited.timings.unet_steps == 2 and edited.image.size == (64, 64)


# Latents of the pipeline's own __call__ with each recipe's scheduler and step settings (seed 7, 64x64 px):
# out[0, 0, :3, :3].flatten(), stored from this code on random weights. A changed recipe changes them.
EXPECTED_LATENTS = {
    "tcd-sd15": [-10.7186, 3.5889, 10.1164, 5.0102, -11.911, -16.6278, -22.8114, 3.3049, 29.1531],
    "hyper-sd15-1step": [-11.7246, 7.2403, 14.3501, 10.2845, -7.704, -19.4784, -20.8561, -3.976, 26.8257],
    "hyper-sd15-2step": [-10.9724, 8.1703, 14.9166, 8.1156, -7.1804, -19.0674, -21.8806, -4.6504, 28.0457],
    "sd-turbo": [-11.8814, 6.274, 16.2474, 11.3531, -5.1121, -24.8917, -22.8745, -3.4847, 35.2556],
    "lightning-sdxl-4step": [-15.1861, 5.5876, 14.3385, 11.353, -5.558, -13.2007, -24.9489, -2.0564, 29.3307],
    "sdxl-turbo": [-7.7772, 11.2196, 15.6146, 16.997, -12.9352, -16.8257, -21.6825, -7.4788, 27.5457],
}


@pytest.mark.parametrize("key", sorted(EXPECTED_LATENTS))
def test_recipe_outputs_match_stored_numbers(offline_hub, cpu32, key):
    spec = PRESETS[key]
    pipe, _ = load_pipeline(spec, cpu32, local_files_only=True)
    with torch.inference_mode():
        out = pipe("a red circle", num_inference_steps=spec.recipe.steps, guidance_scale=spec.recipe.guidance_scale,
                   width=64, height=64, output_type="latent", generator=torch.Generator("cpu").manual_seed(7),
                   **spec.recipe.step_kwargs).images  # fmt: skip
    got = out[0, 0, :3, :3].flatten().tolist()
    np.testing.assert_allclose(got, EXPECTED_LATENTS[key], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("key", sorted(EXPECTED_LATENTS))
def test_the_engine_steps_each_recipe_as_the_pipeline_does(offline_hub, cpu32, key):
    """The engine's own step loop (each row a scheduler copy, the recipe's step settings) gives the same numbers."""
    spec = PRESETS[key]
    engine = Engine.load(spec, cpu32, local_files_only=True, warmup=False)
    request = Request(prompt="a red circle", steps=spec.recipe.steps, guidance_scale=spec.recipe.guidance_scale,
                      width=64, height=64, seed=7)  # fmt: skip
    alone = engine.start(request)
    while not alone.done:
        engine.step([alone])
    np.testing.assert_allclose(alone.latents[0, 0, :3, :3].flatten().tolist(), EXPECTED_LATENTS[key], rtol=1e-3,
                               atol=1e-3)  # fmt: skip
    rows = engine.start_many([request, Request(prompt="another", steps=spec.recipe.steps, seed=8, width=64,
                                               height=64)])  # fmt: skip
    while active := [row for row in rows if not row.done]:
        engine.step(active)
    torch.testing.assert_close(rows[0].latents, alone.latents, rtol=1e-4, atol=1e-4)  # the same in a batch


# ------------------------------------------------------------------------------------------------ style LoRAs
def _lora_matrices(path: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """module -> (down, up, alpha / rank) of a kohya or peft LoRA file on the UNet."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    state, out = load_file(path), {}
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
    peft_alpha = json.loads(metadata.get("lora_adapter_metadata", "{}")).get("unet.lora_alpha")
    for key, down in state.items():
        if key.startswith("lora_unet_") and key.endswith(".lora_down.weight"):
            name = key[: -len(".lora_down.weight")]
            up, alpha = state[f"{name}.lora_up.weight"], float(state[f"{name}.alpha"])
            out[name[len("lora_unet_") :]] = (down, up, alpha / down.shape[0])
        elif key.startswith("unet.") and key.endswith(".lora_A.weight"):
            name = key[len("unet.") : -len(".lora_A.weight")]
            out[name.replace(".", "_")] = (down, state[f"unet.{name}.lora_B.weight"], peft_alpha / down.shape[0])
    return out


def _delta(down, up, scale):
    """W += scale * up @ down, for linear (out, in) and conv (out, in, k, k) layers."""
    if down.ndim == 4:
        return scale * torch.einsum("or,rihw->oihw", up.flatten(1), down)
    return scale * up @ down


def test_two_adapters_fuse_to_the_sum_of_their_weighted_deltas(offline_hub, cpu32, tmp_path):
    base = PRESETS["hyper-sd15-2step"]
    plain = build_pipeline("tiny-sd15")
    style_state, style_config = random_lcm_lora_state(plain.unet, rank=2, seed=42)
    style_config = copy.copy(style_config)
    style_config.lora_alpha = 1  # scale 0.5, in the peft metadata
    style = save_lora(plain, style_state, style_config, str(tmp_path / "style"), "peft", "watercolour.safetensors")
    spec = ModelSpec(base.base, base.lora, recipe=base.recipe, lora_weight=0.8, style_lora=style, style_weight=0.6)

    pipe, _ = load_pipeline(spec, cpu32, local_files_only=True)
    original, _ = load_pipeline(ModelSpec(base.base, None, recipe=base.recipe), cpu32, local_files_only=True)

    speed_file = (
        offline_hub / "models--ByteDance--Hyper-SD" / "snapshots" / COMMIT / "Hyper-SD15-2steps-lora.safetensors"
    )
    speed, styled = _lora_matrices(str(speed_file)), _lora_matrices(style)
    assert next(iter(speed.values()))[2] == 0.5 and next(iter(styled.values()))[2] == 0.5  # alpha / rank in the files
    fused, before = dict(pipe.unet.named_parameters()), dict(original.unet.named_parameters())
    checked = 0
    for module in ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "down_blocks.1.resnets.0.conv1",
                   "up_blocks.0.attentions.0.proj_in", "mid_block.resnets.0.time_emb_proj"):  # fmt: skip
        name = module.replace(".", "_")
        expected = before[f"{module}.weight"].clone()
        for lora, weight in ((speed, 0.8), (styled, 0.6)):
            down, up, scale = lora[name]
            expected += weight * _delta(down, up, scale).reshape(expected.shape)
        torch.testing.assert_close(fused[f"{module}.weight"], expected, rtol=1e-5, atol=1e-6, msg=module)
        checked += 1
    assert checked == 4


def test_style_lora_on_a_preset_from_settings(offline_hub, cpu32, tmp_path):
    plain = build_pipeline("tiny-sd15")
    state, config = random_lcm_lora_state(plain.unet, rank=2, seed=9)
    style = save_lora(plain, state, config, str(tmp_path / "kohya-style"), "kohya", "ink.safetensors")
    settings = Settings.from_args(["--preset", "tcd-sd15", "--style-lora", style, "--style-weight", "0.7"], environ={})
    spec = resolve_spec(settings.preset, settings.base, settings.lora, settings.style_lora, settings.style_weight)
    assert (spec.style_lora, spec.style_weight, spec.recipe.name, spec.lora) == (
        style,
        0.7,
        "tcd",
        "h1t/TCD-SD15-LoRA",
    )
    assert spec.adapters == [("h1t/TCD-SD15-LoRA", 1.0), (style, 0.7)]
    assert "style" in spec.name and "0.7" in spec.name
    engine = Engine.load(spec, cpu32, local_files_only=True, warmup=False)
    assert engine.generate(Request(prompt="ink", width=64, height=64)).image.size == (64, 64)
    env = Settings.from_env({"LCM_LIVE_STYLE_LORA": style, "LCM_LIVE_STYLE_WEIGHT": "0.25"})
    assert (env.style_lora, env.style_weight) == (style, 0.25)


# ------------------------------------------------------------------------------------------------ single files
@pytest.fixture(scope="module")
def single_files(tmp_path_factory):
    """Tiny SD 1.5 and SDXL pipelines, each as a diffusers folder and as one original-layout .safetensors."""
    root = tmp_path_factory.mktemp("single-files")
    out = {}
    for family in ("sd15", "sdxl"):
        pipe = build_pipeline(f"tiny-{family}", seed=11)
        pipe.save_pretrained(root / f"{family}-folder")
        out[family] = (
            pipe,
            save_single_file(pipe, str(root / f"{family}-finetune.safetensors")),
            str(root / f"{family}-folder"),
        )
    return out


def _assert_same_weights(pipe, loaded):
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is None:
            continue
        theirs = getattr(loaded, name).state_dict()
        for key, value in getattr(pipe, name).state_dict().items():
            if not key.endswith("position_ids"):
                assert torch.equal(theirs[key], value), f"{name}.{key}"


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_single_file_loads_with_a_local_config_folder(single_files, cpu32, family):
    pipe, path, folder = single_files[family]
    assert detect_family(path) == family
    loaded, detected = load_pipeline(ModelSpec(path, None, config=folder), cpu32, local_files_only=True)
    assert detected == family and type(loaded.scheduler).__name__ == "LCMScheduler"
    _assert_same_weights(pipe, loaded)


def test_single_file_takes_its_family_config_from_the_hub_cache_offline(single_files, offline_hub, cpu32):
    """`--base finetune.safetensors --preset tcd-sd15`: SD 1.5's configs from the cache, the preset's TCD-LoRA."""
    _, path, _ = single_files["sd15"]
    spec = resolve_spec("tcd-sd15", base=path)
    assert spec.config is None and spec.recipe.name == "tcd"
    engine = Engine.load(spec, cpu32, local_files_only=True, warmup=False)
    assert engine.family == "sd15" and type(engine.txt2img.scheduler).__name__ == "TCDScheduler"
    assert engine.generate(Request(prompt="fine-tuned", width=64, height=64)).image.size == (64, 64)


def test_single_file_without_cached_configs_says_what_to_download(single_files, cpu32, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    _, path, _ = single_files["sdxl"]
    with pytest.raises(
        ModelLoadError, match=r"SDXL configs 'stabilityai/stable-diffusion-xl-base-1.0'.*hf download"
    ) as error:
        load_pipeline(ModelSpec(path, None), cpu32, local_files_only=True)
    assert str(tmp_path) not in str(error.value)


def test_single_file_config_of_another_family_is_refused(single_files, cpu32):
    _, path, _ = single_files["sd15"]
    with pytest.raises(ModelLoadError, match="is an SDXL pipeline but .* is an SD 1.5 checkpoint"):
        load_pipeline(ModelSpec(path, None, config=single_files["sdxl"][2]), cpu32, local_files_only=True)


def _write_safetensors(path, tensors):
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    return str(path)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: _write_safetensors(d / "mystery.safetensors", {"encoder.weight": torch.zeros(2)}),
         r"'mystery.safetensors' is not an SD 1.5 or SDXL checkpoint"),
        (lambda d: _write_safetensors(d / "sd2.safetensors", {"cond_stage_model.model.token_embedding.weight": torch.zeros(2),
                                                              "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}),
         r"'sd2.safetensors' is a Stable Diffusion 2.x checkpoint"),
        (lambda d: _write_safetensors(d / "inpaint.safetensors", {
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(2),
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 9, 3, 3)}),
         r"'inpaint.safetensors' is an inpainting checkpoint \(9 input channels\)"),
        (lambda d: (d / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json") and str(d / "broken.safetensors"),
         r"'broken.safetensors' is not a readable .safetensors file"),
        (lambda d: (d / "old.ckpt").write_bytes(b"PK") and str(d / "old.ckpt"),
         r"'old.ckpt' is not a .safetensors file"),
    ],
    ids=["unknown-family", "sd2", "inpainting", "corrupt", "pickle"],
)  # fmt: skip
def test_bad_single_files_get_one_clear_message(cpu32, tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(ModelLoadError, match=message) as error:
        load_pipeline(ModelSpec(path, None), cpu32, local_files_only=True)
    assert str(error.value).count(str(tmp_path)) <= 1  # the path the operator typed, nothing of the server's beyond it


# ------------------------------------------------------------------------------------------------ bad input
def test_an_sd15_lora_on_sdxl_names_the_layer_that_does_not_fit(tiny_models, cpu32):
    spec = ModelSpec(tiny_models["sdxl"]["base"], tiny_models["sdxl"]["lora"], style_lora=tiny_models["sd15"]["lora"])
    with pytest.raises(ModelLoadError, match=r"The style LoRA '.*' does not fit this SDXL base: \d+ of its matrices "
                                             r"have other shapes than the model's, e\.g\. [\w.]+: torch\.Size"):  # fmt: skip
        load_pipeline(spec, cpu32, local_files_only=True)


def test_a_lora_with_layers_the_base_lacks_is_refused(tiny_models, cpu32, tmp_path):
    plain = build_pipeline("tiny-sd15")
    state, config = random_lcm_lora_state(plain.unet, seed=3)
    extra = {
        k.replace("down_blocks.1.", "down_blocks.7.", 1): v.clone()
        for k, v in state.items()
        if k.startswith("down_blocks.1.")
    }
    path = save_lora(plain, {**state, **extra}, config, str(tmp_path / "odd"), "kohya", "odd.safetensors")
    spec = ModelSpec(tiny_models["sd15"]["base"], tiny_models["sd15"]["lora"], style_lora=path)
    with pytest.raises(
        ModelLoadError, match=r"does not fit this SD 1.5 base: only \d+ of its \d+ layers are in this model"
    ):
        load_pipeline(spec, cpu32, local_files_only=True)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(step_kwargs={"eta": 1.5}), r"eta must be a number from 0.0 to 1.0; got 1.5"),
        (dict(step_kwargs={"eta": -0.1}), r"eta must be a number from 0.0 to 1.0"),
        (dict(steps=0), r"steps must be a whole number from 1 to 8; got 0"),
        (dict(steps=2.5), r"steps must be a whole number"),
        (dict(guidance_scale=0.0), r"guidance_scale must be from 1.0 to 2.0; got 0.0"),
        (dict(scheduler_config={"timestep_spacing": "sideways"}), r"timestep_spacing must be one of leading"),
        (dict(scheduler="DPMSolverSDEScheduler"), r"unknown scheduler 'DPMSolverSDEScheduler'"),
    ],
)  # fmt: skip
def test_recipe_settings_out_of_range_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Recipe(**{"name": "bad", "scheduler": "TCDScheduler", **kwargs})


def test_a_setting_the_scheduler_does_not_have_is_refused_at_load(tiny_models, cpu32):
    recipe = Recipe("typo", "DDIMScheduler", {"timestep_spacin": "trailing"})
    with pytest.raises(ModelLoadError, match="DDIMScheduler has no setting 'timestep_spacin'"):
        load_pipeline(ModelSpec(tiny_models["sd15"]["base"], None, recipe=recipe), cpu32, local_files_only=True)
    with pytest.raises(ModelLoadError, match=r"LCMScheduler.step has no setting 'eta'"):
        recipe = Recipe("no-eta", "LCMScheduler", step_kwargs={"eta": 0.5})
        load_pipeline(ModelSpec(tiny_models["sd15"]["base"], None, recipe=recipe), cpu32, local_files_only=True)


@pytest.mark.parametrize(
    "field, value", [("lora_weight", 2.5), ("style_weight", -3.0), ("style_weight", float("nan"))]
)
def test_adapter_weights_out_of_range_are_refused(field, value):
    with pytest.raises(ValueError, match=r"weight must be from -2.0 to 2.0"):
        ModelSpec("base", "lora", **{field: value})


def test_a_misfit_style_lora_leaves_the_current_model_serving(tiny_models):
    from lcm_live.device import pick_runtime
    from lcm_live.live import LiveLoop
    from lcm_live.models import ModelManager

    manager = ModelManager(pick_runtime("cpu", "float32"), offline=True)
    loop = LiveLoop(manager.load_now(PRESETS["demo"]))
    manager.attach(loop)
    try:
        bad = ModelSpec(
            tiny_models["sdxl"]["base"], tiny_models["sdxl"]["lora"], style_lora=tiny_models["sd15"]["lora"]
        )
        assert manager.switch(bad)
        manager.wait(60)
        assert manager.engine.info["embedded"] and "does not fit this SDXL base" in manager.status_markdown()
        assert manager.loop.run_sync("s", Request(prompt="still here"), 30).result.image.size == (64, 64)
    finally:
        loop.close()


def test_hub_adapter_ids_resolve_to_repo_and_file(tmp_path):
    from lcm_live.loading import adapter_source

    assert adapter_source("ByteDance/Hyper-SD/Hyper-SD15-1step-lora.safetensors") == (
        "ByteDance/Hyper-SD", "Hyper-SD15-1step-lora.safetensors")  # fmt: skip
    assert adapter_source("h1t/TCD-SD15-LoRA") == ("h1t/TCD-SD15-LoRA", None)
    local = tmp_path / "a" / "b.safetensors"
    local.parent.mkdir()
    local.write_bytes(b"")
    assert adapter_source(str(local)) == (str(local.parent), "b.safetensors")
    assert adapter_source(str(local.parent)) == (str(local.parent), None)


def test_every_preset_goes_through_plain_data_and_back():
    """Specs cross process boundaries as JSON (Ray Serve's user_config): recipe included."""
    import json

    for key, spec in PRESETS.items():
        assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec, key


def test_sdxs_presets_decode_with_their_own_tiny_vae_and_sketch_with_their_controlnet(offline_hub, cpu32):
    """SDXS as its card loads it (the tiny VAE in `vae/`), one step, no CFG; the sketch variant's ControlNet steers."""
    from diffusers import AutoencoderTiny
    from PIL import Image, ImageDraw

    engine = Engine.load(PRESETS["sdxs"], cpu32, local_files_only=True, warmup=False)
    assert isinstance(engine.full_vae, AutoencoderTiny) and engine.controls == {}
    result = engine.generate(Request(prompt="a cat", steps=1, width=64, height=64))
    assert result.timings.unet_steps == 1 and [float(t) for t in engine.start(Request(steps=1)).timesteps] == [999.0]
    sketch = Engine.load(PRESETS["sdxs-sketch"], cpu32, local_files_only=True, warmup=False)
    assert list(sketch.controls) == ["scribble"] and isinstance(sketch.full_vae, AutoencoderTiny)
    drawing = Image.new("RGB", (64, 64))
    ImageDraw.Draw(drawing).ellipse((16, 16, 48, 48), outline="white", width=3)
    plain = sketch.generate(Request(prompt="a cat", steps=1, seed=1, width=64, height=64))
    steered = sketch.generate(Request(prompt="a cat", steps=1, seed=1, width=64, height=64, control="scribble",
                                      control_image=drawing, control_scale=0.8))  # fmt: skip
    assert steered.params["control"]["kind"] == "scribble"
    assert (steered.latents - plain.latents).abs().max() > 1e-3
