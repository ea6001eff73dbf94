"""The engine's own step loop: one request matches the diffusers pipeline's call; batched rows match themselves alone."""

import numpy as np
import pytest
import torch
from PIL import Image

from lcm_live.engine import Engine
from lcm_live.presets import ModelSpec
from lcm_live.request import Request


def _gradient(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def sdxl_engine(tiny_models, cpu32):
    paths = tiny_models["sdxl"]
    return Engine.load(ModelSpec(paths["base"], paths["lora"]), cpu32, warmup=False)


def _alone(engine: Engine, request: Request) -> torch.Tensor:
    row = engine.start(request)
    while not row.done:
        engine.step([row])
    return row.latents


def _pipeline_latents(engine: Engine, request: Request) -> torch.Tensor:
    """The same request through the diffusers pipeline's own __call__ (the reference)."""
    request, _ = engine.check(request)
    common = dict(prompt=request.prompt, num_inference_steps=request.steps, guidance_scale=request.guidance_scale,
                  generator=torch.Generator("cpu").manual_seed(request.seed), output_type="latent")  # fmt: skip
    if request.guidance_scale > 1:
        common["negative_prompt"] = request.negative_prompt
    with torch.inference_mode():
        if request.image is None:
            return engine.txt2img(width=request.width, height=request.height, **common).images
        init = request.image.resize((request.width, request.height))
        return engine.img2img(image=init, strength=request.strength, **common).images


CASES = {
    "txt2img": Request(prompt="a red circle", seed=3),
    "txt2img guided": Request(prompt="a red circle", negative_prompt="blue", guidance_scale=1.5, seed=4, steps=3),
    "txt2img 96x64": Request(prompt="a wide one", seed=5, width=96, height=64, steps=2),
    "img2img": Request(prompt="a green square", image=_gradient(64, 64, 0), strength=0.5, seed=6),
    "img2img guided": Request(prompt="square", image=_gradient(64, 64, 1), strength=0.75, guidance_scale=2.0,
                              negative_prompt="round", seed=7),  # fmt: skip
}


@pytest.mark.parametrize("case", CASES)
def test_one_request_matches_the_diffusers_pipeline(sd15_engine, case):
    request = CASES[case]
    reference = _pipeline_latents(sd15_engine, request)
    torch.testing.assert_close(_alone(sd15_engine, request), reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["txt2img", "txt2img guided", "img2img"])
def test_one_sdxl_request_matches_the_diffusers_pipeline(sdxl_engine, case):
    request = CASES[case]
    reference = _pipeline_latents(sdxl_engine, request)
    torch.testing.assert_close(_alone(sdxl_engine, request), reference, rtol=1e-4, atol=1e-4)


def _batched(engine: Engine, requests: list[Request]) -> list[torch.Tensor]:
    """All requests started together, stepped in shared UNet calls until each is done."""
    rows = engine.start_many(requests)  # input images encoded in one call
    batch_sizes = []
    while active := [row for row in rows if not row.done]:
        batch_sizes.append(len(active))
        engine.step(active)
    assert max(batch_sizes) == len(requests)
    return [row.latents for row in rows]


def test_rows_of_a_batch_match_themselves_alone(sd15_engine):
    """Per-row seeds, prompts, step counts, guidance and img2img strengths, all in shared UNet calls."""
    requests = [
        Request(prompt="a red circle", seed=1),
        Request(prompt="a blue triangle", seed=2, steps=2),
        Request(prompt="a red circle", seed=1, steps=8),
        Request(prompt="guided", negative_prompt="not this", guidance_scale=1.8, seed=3),
        Request(prompt="from an image", image=_gradient(64, 64, 2), strength=0.5, seed=4),
        Request(prompt="from an image", image=_gradient(64, 64, 2), strength=1.0, seed=4, steps=3),
    ]
    for request, latents in zip(requests, _batched(sd15_engine, requests)):
        torch.testing.assert_close(latents, _alone(sd15_engine, request), rtol=1e-4, atol=1e-4)


def test_sdxl_rows_of_a_batch_match_themselves_alone(sdxl_engine):
    requests = [Request(prompt="one", seed=1), Request(prompt="two", seed=2, guidance_scale=1.5, steps=2),
                Request(prompt="three", image=_gradient(64, 64, 3), strength=0.5, seed=3),
                Request(prompt="four", image=_gradient(64, 64, 4), strength=1.0, seed=4, steps=2)]
    for request, latents in zip(requests, _batched(sdxl_engine, requests)):
        torch.testing.assert_close(latents, _alone(sdxl_engine, request), rtol=1e-4, atol=1e-4)


def test_a_row_joins_a_running_batch_and_still_matches(sd15_engine):
    first, second = Request(prompt="early", seed=10), Request(prompt="late", seed=11)
    early = sd15_engine.start(first)
    sd15_engine.step([early])
    late = sd15_engine.start(second)
    while active := [row for row in (early, late) if not row.done]:
        sd15_engine.step(active)
    assert late.batch == 2
    torch.testing.assert_close(early.latents, _alone(sd15_engine, first), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(late.latents, _alone(sd15_engine, second), rtol=1e-4, atol=1e-4)


def test_finished_rows_decode_together_each_with_its_own_parameters(sd15_engine):
    rows = [sd15_engine.start(Request(prompt=f"row {i}", seed=i, steps=1)) for i in range(3)]
    sd15_engine.step(rows)
    results = sd15_engine.finish(rows)
    assert [r.params["prompt"] for r in results] == ["row 0", "row 1", "row 2"]
    assert all(r.timings.batch == 3 and r.timings.unet_steps == 1 for r in results)
    alone = sd15_engine.generate(Request(prompt="row 1", seed=1, steps=1))
    diff = np.abs(np.asarray(results[1].image, dtype=int) - np.asarray(alone.image, dtype=int))
    assert diff.max() <= 1


def test_an_abandoned_step_leaves_every_row_as_it_was(sd15_engine):
    rows = [sd15_engine.start(Request(prompt="kept", seed=s)) for s in (1, 2)]
    before = [row.latents.clone() for row in rows]
    assert not sd15_engine.step(rows, should_abort=lambda: True)
    assert [row.index for row in rows] == [0, 0]
    for row, latents in zip(rows, before):
        assert torch.equal(row.latents, latents)


def test_output_slice_matches_stored_numbers(sd15_engine):
    """A numeric regression guard: the tiny model's latents for a fixed request (random weights built with seed 0)."""
    latents = _alone(sd15_engine, Request(prompt="a stored slice", seed=42, steps=4))
    got = latents[0, :, 0, :3].flatten().tolist()
    assert got == pytest.approx(STORED_SLICE, rel=1e-3, abs=1e-3), got


STORED_SLICE = [25.3623, 15.73, 4.4759, 15.9217, 9.9845, 27.1079, 35.5019, 18.5723, -28.0081, 17.9307, -8.1234, 4.0363]
