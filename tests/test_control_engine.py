"""ControlNets in the engine's batched step: one row matches diffusers' ControlNet pipeline; mixed batches match each
row alone; ControlNets of another family and bad control requests are refused with a clear message."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionControlNetPipeline
from PIL import Image

from lcm_live.architectures import build_pipeline, random_controlnet
from lcm_live.engine import Engine
from lcm_live.presets import ModelSpec
from lcm_live.request import ModelLoadError, Request


def _strokes(seed: int, width: int = 64, height: int = 64) -> Image.Image:
    """White strokes on black, as the scribble preprocessor makes them."""
    rng = np.random.default_rng(seed)
    array = np.zeros((height, width, 3), dtype=np.uint8)
    for _ in range(4):
        x, y = rng.integers(0, width - 16), rng.integers(0, height - 16)
        array[y : y + 16, x : x + 2] = 255
        array[y : y + 2, x : x + 16] = 255
    return Image.fromarray(array)


@pytest.fixture(scope="module")
def controls(tiny_models, tmp_path_factory):
    """Two random ControlNets for the tiny SD 1.5 model, and one for the tiny SDXL model, saved as diffusers folders."""
    root = tmp_path_factory.mktemp("controlnets")
    folders = {}
    for name, arch, seed in (("scribble", "tiny-sd15", 1), ("edges", "tiny-sd15", 2), ("sdxl", "tiny-sdxl", 3)):
        net = random_controlnet(build_pipeline(arch, seed=0).unet, seed=seed)
        net.save_pretrained(str(root / name))
        folders[name] = str(root / name)
    return folders


@pytest.fixture(scope="module")
def control_engine(tiny_models, controls, cpu32):
    paths = tiny_models["sd15"]
    spec = ModelSpec(paths["base"], paths["lora"], controls=(("scribble", controls["scribble"]),
                                                             ("edges", controls["edges"])))  # fmt: skip
    return Engine.load(spec, cpu32, warmup=False)


def _alone(engine: Engine, request: Request) -> torch.Tensor:
    row = engine.start(request)
    while not row.done:
        engine.step([row])
    return row.latents


CASES = {
    "scribble": Request(prompt="a red circle", seed=3, control="scribble", control_image=_strokes(0),
                        control_scale=0.7),  # fmt: skip
    "edges guided": Request(prompt="a square", negative_prompt="blue", guidance_scale=1.5, seed=4, steps=3,
                            control="edges", control_image=_strokes(1), control_scale=1.3),  # fmt: skip
    "scribble 96x64": Request(prompt="wide", seed=5, width=96, height=64, steps=2, control="scribble",
                              control_image=_strokes(2, 96, 64), control_scale=2.0),  # fmt: skip
}


@pytest.mark.parametrize("case", CASES)
def test_one_controlled_row_matches_the_diffusers_controlnet_pipeline(control_engine, case):
    request, _ = control_engine.check(CASES[case])
    pipe = StableDiffusionControlNetPipeline(**{k: v for k, v in control_engine.txt2img.components.items()
                                                if k != "image_encoder"},
                                             controlnet=control_engine.controls[request.control])  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    extra = {"negative_prompt": request.negative_prompt} if request.guidance_scale > 1 else {}
    with torch.inference_mode():
        reference = pipe(prompt=request.prompt, image=request.control_image, num_inference_steps=request.steps,
                         guidance_scale=request.guidance_scale, controlnet_conditioning_scale=request.control_scale,
                         width=request.width, height=request.height, output_type="latent",
                         generator=torch.Generator("cpu").manual_seed(request.seed), **extra).images  # fmt: skip
    torch.testing.assert_close(_alone(control_engine, request), reference, rtol=1e-4, atol=1e-4)


def test_the_control_changes_the_image_and_its_scale_matters(control_engine):
    with_control = CASES["scribble"]
    off = _alone(control_engine, Request(prompt=with_control.prompt, seed=with_control.seed))
    on = _alone(control_engine, with_control)
    zero = _alone(control_engine, Request(**{**with_control.__dict__, "control_scale": 0.0}))
    assert (on - off).abs().max() > 1e-2
    torch.testing.assert_close(zero, off, rtol=1e-5, atol=1e-5)  # scale 0: exactly no control


def test_each_row_of_a_mixed_batch_matches_itself_alone(control_engine):
    requests = [
        CASES["scribble"],
        Request(prompt="another", seed=8, control="edges", control_image=_strokes(3), control_scale=1.0),
        Request(prompt="no control at all", seed=9),
        Request(prompt="guided, scribble", negative_prompt="x", guidance_scale=2.0, seed=10, control="scribble",
                control_image=_strokes(4), control_scale=0.5),  # fmt: skip
        Request(prompt="guided, none", guidance_scale=1.5, seed=11),
    ]
    rows = control_engine.start_many(requests)
    while not all(row.done for row in rows):
        control_engine.step([row for row in rows if not row.done])
    for row, request in zip(rows, requests):
        torch.testing.assert_close(row.latents, _alone(control_engine, request), rtol=1e-4, atol=1e-4)


def test_a_controlnet_of_another_family_is_refused(tiny_models, controls, cpu32):
    paths = tiny_models["sd15"]
    spec = ModelSpec(paths["base"], paths["lora"], controls=(("scribble", controls["sdxl"]),))
    with pytest.raises(ModelLoadError, match="made for SDXL models, but this model is SD 1.5"):
        Engine.load(spec, cpu32, warmup=False)


def test_a_missing_controlnet_names_it(tiny_models, cpu32, tmp_path):
    paths = tiny_models["sd15"]
    spec = ModelSpec(paths["base"], paths["lora"], controls=(("depth", str(tmp_path / "nowhere")),))
    with pytest.raises(ModelLoadError, match="Could not load ControlNet .*nowhere"):
        Engine.load(spec, cpu32, warmup=False)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(control="depth"), "no depth control \\(loaded: scribble, edges\\)"),
        (dict(control_scale=2.5), "control_scale must be from 0 to 2"),
        (dict(control_image=None), "scribble control needs a control image"),
        (dict(control_image=Image.new("RGBA", (64, 64))), "RGB or greyscale image; got RGBA"),
        (dict(control_image=Image.new("RGB", (32, 32))), "is 32x32; each side must be from 64"),
        (dict(control_image=Image.new("RGB", (64, 256)), width=64, height=64), "shapes differ too much"),
        (dict(control=None), "control image was given without a control"),
    ],
)
def test_bad_control_requests_get_a_clear_message(control_engine, change, message):
    request = Request(**{**CASES["scribble"].__dict__, **change})
    with pytest.raises(ValueError, match=message):
        control_engine.start(request)


def test_the_parameters_record_the_control(control_engine):
    result = control_engine.generate(CASES["scribble"])
    assert result.params["control"]["kind"] == "scribble"
    assert result.params["control"]["scale"] == 0.7
    assert len(result.params["control"]["image"]) == 16


# ------------------------------------------------------------------------------------------------ SDXL T2I-Adapters
@pytest.fixture(scope="module")
def adapter_engine(tiny_models, tmp_path_factory, cpu32):
    """The tiny SDXL model with a random T2I-Adapter (features at the tiny UNet's two down blocks) as `scribble`."""
    from diffusers import T2IAdapter

    torch.manual_seed(5)
    adapter = T2IAdapter(in_channels=3, channels=[32, 64], num_res_blocks=1, downscale_factor=16,
                         adapter_type="full_adapter_xl")  # fmt: skip
    folder = tmp_path_factory.mktemp("adapter") / "sketch-xl"
    adapter.save_pretrained(str(folder))
    paths = tiny_models["sdxl"]
    return Engine.load(ModelSpec(paths["base"], paths["lora"], controls=(("scribble", str(folder)),)), cpu32,
                       warmup=False)  # fmt: skip


ADAPTER_CASES = {
    "adapter": Request(prompt="a red circle", seed=3, control="scribble", control_image=_strokes(5), control_scale=0.8),
    "adapter guided": Request(prompt="a square", negative_prompt="blue", guidance_scale=1.5, seed=4, steps=3,
                              control="scribble", control_image=_strokes(6), control_scale=1.6),  # fmt: skip
}


@pytest.mark.parametrize("case", ADAPTER_CASES)
def test_one_adapter_row_matches_the_diffusers_sdxl_adapter_pipeline(adapter_engine, case):
    from diffusers import StableDiffusionXLAdapterPipeline

    request, _ = adapter_engine.check(ADAPTER_CASES[case])
    parts = {k: v for k, v in adapter_engine.txt2img.components.items() if k not in ("image_encoder", "feature_extractor")}
    pipe = StableDiffusionXLAdapterPipeline(**parts, adapter=adapter_engine.controls["scribble"])
    pipe.set_progress_bar_config(disable=True)
    extra = {"negative_prompt": request.negative_prompt} if request.guidance_scale > 1 else {}
    with torch.inference_mode():
        reference = pipe(prompt=request.prompt, image=request.control_image, num_inference_steps=request.steps,
                         guidance_scale=request.guidance_scale, adapter_conditioning_scale=request.control_scale,
                         width=request.width, height=request.height, output_type="latent",
                         generator=torch.Generator("cpu").manual_seed(request.seed), **extra).images  # fmt: skip
    torch.testing.assert_close(_alone(adapter_engine, request), reference, rtol=1e-4, atol=1e-4)


def test_adapter_rows_batch_with_rows_without_it(adapter_engine):
    requests = [ADAPTER_CASES["adapter"], Request(prompt="plain", seed=12),
                ADAPTER_CASES["adapter guided"]]  # fmt: skip
    rows = adapter_engine.start_many(requests)
    assert rows[0].features is not None and rows[1].features is None  # made once, at the row's start
    while not all(row.done for row in rows):
        adapter_engine.step([row for row in rows if not row.done])
    for row, request in zip(rows, requests):
        torch.testing.assert_close(row.latents, _alone(adapter_engine, request), rtol=1e-4, atol=1e-4)
    off = _alone(adapter_engine, Request(prompt="a red circle", seed=3))
    assert (rows[0].latents - off).abs().max() > 1e-2  # the adapter changed the image


def test_an_sd15_controlnet_on_sdxl_is_refused(tiny_models, controls, cpu32):
    paths = tiny_models["sdxl"]
    spec = ModelSpec(paths["base"], paths["lora"], controls=(("edges", controls["edges"]),))
    with pytest.raises(ModelLoadError, match="made for SD 1.5 models, but this model is SDXL"):
        Engine.load(spec, cpu32, warmup=False)


def test_a_model_whose_controlnet_does_not_fit_is_refused_and_the_current_one_keeps_serving(tiny_models, controls):
    from lcm_live.device import pick_runtime
    from lcm_live.live import LiveLoop
    from lcm_live.models import ModelManager
    from lcm_live.presets import PRESETS

    manager = ModelManager(pick_runtime("cpu", "float32"), taesd=False, offline=True)
    loop = LiveLoop(manager.load_now(PRESETS["demo"]))
    manager.attach(loop)
    try:
        paths = tiny_models["sd15"]
        assert manager.switch(ModelSpec(paths["base"], paths["lora"], controls=(("scribble", controls["sdxl"]),)))
        manager.wait(60)
        text = manager.status_markdown().replace("\\", "")
        assert manager.engine.info["embedded"]  # still the model that served before
        assert "is made for SDXL models, but this model is SD 1.5" in text
        assert manager.engine.generate(Request(prompt="still serving", steps=1)).image.size == (64, 64)
    finally:
        loop.close()
