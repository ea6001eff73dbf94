"""Engine tests on tiny pipelines built from configs, saved to disk and loaded through the real path."""

import numpy as np
import pytest
import torch
from diffusers import LCMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

from lcm_live.engine import Engine
from lcm_live.live import SUPERSEDED, LiveLoop
from lcm_live.pngmeta import read_params, save_png
from lcm_live.presets import ModelSpec, resolve_spec
from lcm_live.request import GenerationStopped, ModelLoadError, Request


@pytest.fixture
def count_calls():
    """`count_calls(module)`: a list that grows by one per forward call; the hooks come off after the test (the
    engine is shared by the whole session)."""
    handles = []

    def attach(module):
        calls = []
        handles.append(module.register_forward_hook(lambda *args: calls.append(1)))
        return calls

    yield attach
    for handle in handles:
        handle.remove()


@pytest.mark.parametrize(
    "family, pipeline_class", [("sd15", StableDiffusionPipeline), ("sdxl", StableDiffusionXLPipeline)]
)
def test_loads_through_the_real_path(tiny_models, cpu32, family, pipeline_class):
    paths = tiny_models[family]
    engine = Engine.load(ModelSpec(paths["base"], paths["lora"]), cpu32, warmup=False)
    plain = pipeline_class.from_pretrained(paths["base"])

    assert engine.family == family
    assert isinstance(engine.txt2img.scheduler, LCMScheduler)
    assert engine.img2img.unet is engine.txt2img.unet  # one copy of the weights
    assert engine.img2img.vae is engine.txt2img.vae
    fused = dict(engine.txt2img.unet.named_parameters())
    changed = [n for n, p in plain.unet.named_parameters() if not torch.equal(p, fused[n])]
    assert any("to_q" in n for n in changed), "attention LoRA was not fused"
    assert any("conv1" in n for n in changed), "conv LoRA was not fused"
    assert not any("lora" in n for n in fused), "LoRA layers should be unloaded after fusing"


def test_kohya_and_peft_files_fuse_to_the_same_weights(tiny_models, cpu32):
    engines = [
        Engine.load(ModelSpec(tiny_models[k]["base"], tiny_models[k]["lora"]), cpu32, warmup=False)
        for k in ("sd15", "sd15-kohya")
    ]
    peft_weights = dict(engines[0].txt2img.unet.named_parameters())
    for name, param in engines[1].txt2img.unet.named_parameters():
        torch.testing.assert_close(param, peft_weights[name], rtol=1e-4, atol=1e-5, msg=name)


def test_slider_changes_reuse_the_text_embeddings(sd15_engine, count_calls):
    calls = count_calls(sd15_engine.txt2img.text_encoder)
    sd15_engine.generate(Request(prompt="a cached prompt", seed=1))
    assert len(calls) == 1
    for change in (dict(seed=2), dict(steps=2), dict(width=72), dict(seed=3, height=80)):
        result = sd15_engine.generate(Request(prompt="a cached prompt", **change))
        assert result.timings.text_cached
    assert len(calls) == 1
    sd15_engine.generate(Request(prompt="a new prompt"))
    assert len(calls) == 2


def test_negative_prompt_is_encoded_only_with_guidance(sd15_engine):
    a = sd15_engine.generate(Request(prompt="p", negative_prompt="blue", guidance_scale=1.0, seed=4))
    b = sd15_engine.generate(Request(prompt="p", negative_prompt="red", guidance_scale=1.0, seed=4))
    c = sd15_engine.generate(Request(prompt="p", negative_prompt="red", guidance_scale=2.0, seed=4))
    assert a.image.tobytes() == b.image.tobytes()
    assert c.image.tobytes() != b.image.tobytes()
    assert "negative_prompt" not in a.params and c.params["negative_prompt"] == "red"


def test_stop_at_step_boundary_runs_fewer_unet_steps(sd15_engine, count_calls):
    calls = count_calls(sd15_engine.txt2img.unet)
    sd15_engine.generate(Request(prompt="stop me", steps=8))
    full = len(calls)
    assert full == 8
    calls.clear()
    with pytest.raises(GenerationStopped) as stopped:
        sd15_engine.generate(Request(prompt="stop me", steps=8), should_stop=lambda: len(calls) >= 2)
    assert len(calls) == 2 and stopped.value.steps_done == 2


def test_stop_is_not_honoured_in_the_last_step(sd15_engine, count_calls):
    calls = count_calls(sd15_engine.txt2img.unet)
    # asks to stop from the end of the first step on: only the last step sees it, and finishes anyway
    result = sd15_engine.generate(Request(prompt="last", steps=2), should_stop=lambda: len(calls) >= 1)
    assert result.timings.unet_steps == 2 and len(calls) == 2


def test_same_seed_same_image_other_seed_other_image(sd15_engine):
    a = sd15_engine.generate(Request(prompt="determinism", seed=7))
    b = sd15_engine.generate(Request(prompt="determinism", seed=7))
    c = sd15_engine.generate(Request(prompt="determinism", seed=8))
    assert a.image.tobytes() == b.image.tobytes()
    assert a.image.tobytes() != c.image.tobytes()


def test_img2img_runs_at_least_one_step(sd15_engine, count_calls):
    source = sd15_engine.generate(Request(prompt="source", seed=1)).image
    calls = count_calls(sd15_engine.img2img.unet)
    result = sd15_engine.generate(Request(prompt="edit", image=source, strength=0.05, steps=4))
    assert len(calls) == 1 and result.timings.unet_steps == 1
    assert result.params["mode"] == "img2img" and result.params["strength"] >= 0.25


def test_img2img_keeps_the_input_aspect(sd15_engine):
    from PIL import Image

    wide = Image.new("RGB", (640, 480), "orange")
    result = sd15_engine.generate(Request(prompt="wide", image=wide, strength=0.5))
    assert result.image.width > result.image.height
    assert result.image.width % 8 == 0 and result.image.height % 8 == 0


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(steps=0), "steps must be a whole number from 1 to 8"),
        (dict(steps=100), "steps must be a whole number from 1 to 8"),
        (dict(guidance_scale=7.5), "guidance_scale must be from 1.0 to 2.0"),
        (dict(width=100), "width must be a multiple of 8"),
        (dict(height=4096), "height must be a multiple of 8 from 64 to 2048"),
        (dict(seed=-1), "seed must be a whole number from 0"),
    ],
)
def test_bad_arguments_give_a_clear_error(sd15_engine, change, message):
    with pytest.raises(ValueError, match=message):
        sd15_engine.generate(Request(prompt="x", **change))


def test_zero_strength_is_refused(sd15_engine):
    from PIL import Image

    with pytest.raises(ValueError, match="strength must be above 0"):
        sd15_engine.generate(Request(prompt="x", image=Image.new("RGB", (64, 64)), strength=0))


def test_unknown_preset_is_refused():
    with pytest.raises(ValueError, match="Unknown preset 'sd3'; choose one of: sd15, sdxl"):
        resolve_spec("sd3")


def test_missing_model_names_the_id_and_the_fix(cpu32):
    with pytest.raises(ModelLoadError, match=r"'nobody/no-such-model'.*hf download nobody/no-such-model"):
        Engine.load(ModelSpec("nobody/no-such-model", None), cpu32, local_files_only=True)


def test_missing_lora_names_the_lora(tiny_models, cpu32):
    spec = ModelSpec(tiny_models["sd15"]["base"], "nobody/no-such-lora")
    with pytest.raises(ModelLoadError, match="LCM-LoRA 'nobody/no-such-lora'"):
        Engine.load(spec, cpu32, local_files_only=True)


def test_long_prompt_warns_and_still_generates(sd15_engine):
    result = sd15_engine.generate(Request(prompt="word " * 5000))
    assert result.image.size == (64, 64)
    assert any("tokens long" in w for w in result.warnings)
    assert len(result.params["prompt"]) <= 1000


def test_empty_prompt_works(sd15_engine):
    assert sd15_engine.generate(Request(prompt="")).image.size == (64, 64)


def test_parameters_round_trip_through_png(sd15_engine, tmp_path):
    result = sd15_engine.generate(Request(prompt="round trip ✓", seed=42, guidance_scale=1.5, negative_prompt="n"))
    path = save_png(result.image, result.params, tmp_path / "out.png")
    assert read_params(path) == result.params
    assert read_params(path)["prompt"] == "round trip ✓"


def test_sdxl_generates_with_guidance(tiny_models, cpu32):
    paths = tiny_models["sdxl"]
    engine = Engine.load(ModelSpec(paths["base"], paths["lora"]), cpu32, warmup=False)
    result = engine.generate(Request(prompt="xl", negative_prompt="bad", guidance_scale=1.5, width=64, height=96))
    assert result.image.size == (64, 96) and result.timings.unet_steps == 4
    edited = engine.generate(Request(prompt="xl edit", image=result.image, strength=0.5))
    assert edited.params["mode"] == "img2img" and edited.timings.unet_steps == 2


@pytest.mark.slow
def test_compiled_unet_generates_the_same_image_and_stops_at_step_boundaries(tiny_models, cpu32):
    paths = tiny_models["sd15"]
    spec = ModelSpec(paths["base"], paths["lora"])
    eager = Engine.load(spec, cpu32).generate(Request(prompt="compiled", seed=5))
    engine = Engine.load(spec, cpu32, compile=True)
    assert any("torch.compile" in note for note in engine.notes)
    compiled = engine.generate(Request(prompt="compiled", seed=5))
    difference = np.abs(np.asarray(compiled.image, dtype=int) - np.asarray(eager.image, dtype=int))
    assert difference.max() <= 2
    asked = []  # True from the second question on: the first is asked before the UNet runs
    with pytest.raises(GenerationStopped) as stopped:
        engine.generate(Request(prompt="compiled", steps=6), should_stop=lambda: asked.append(1) or len(asked) > 1)
    assert stopped.value.steps_done == 1


def test_the_real_engine_stops_when_superseded(sd15_engine):
    loop = LiveLoop(sd15_engine)
    calls, newer = [], []

    def count_and_supersede(*args):
        calls.append(1)
        if len(calls) == 2:  # a newer input arrives during the second UNet call
            newer.append(loop.submit("s1", Request(prompt="newer", steps=1)))

    hook = sd15_engine.txt2img.unet.register_forward_hook(count_and_supersede)
    try:
        first = loop.submit("s1", Request(prompt="slow", steps=8))
        assert first.future.result(timeout=30) == SUPERSEDED
        assert newer[0].future.result(timeout=30).result.params["prompt"] == "newer"
        assert len(calls) == 2 + 1  # slow stopped at its next boundary; newer ran its one step
    finally:
        hook.remove()
        loop.close()
