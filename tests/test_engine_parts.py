"""The engine's parts: one upcast rule for the VAE, and one bad row failing only itself."""

import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from lcm_live import engine as engine_module
from lcm_live import rows as rows_module
from lcm_live import vae as vae_module
from lcm_live.request import Request
from lcm_live.rows import Row


def _tiny_vae(force_upcast: bool) -> AutoencoderKL:
    """A tiny KL VAE in fp16 (diffusers' AutoencoderKL defaults force_upcast to True, as SD 1.5's config leaves it)."""
    vae = AutoencoderKL(block_out_channels=(16, 32, 32, 32), latent_channels=4, norm_num_groups=16, sample_size=64,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        force_upcast=force_upcast)  # fmt: skip
    return vae.to(torch.float16).eval()


@pytest.mark.parametrize(
    "family, force_upcast, upcast",
    [("sd15", True, False), ("sdxl", True, True), ("sdxl", False, False)],
    ids=["sd15-config", "sdxl-force-upcast", "sdxl-fp16-fix"],
)
def test_the_full_vae_runs_in_fp32_only_where_sdxl_asks(family, force_upcast, upcast):
    vae = _tiny_vae(force_upcast)
    seen = []
    vae.decoder.register_forward_pre_hook(lambda module, args: seen.append(("decode", args[0].dtype)))
    vae.encoder.register_forward_pre_hook(lambda module, args: seen.append(("encode", args[0].dtype)))
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).half()
    with torch.inference_mode():
        pixels, finite = vae_module.decode(vae, family, latents)
        encoded = vae_module.encode(vae, family, torch.zeros(1, 3, 64, 64), [torch.Generator().manual_seed(1)],
                                    torch.float16, lambda tensor: tensor)  # fmt: skip
    wanted = torch.float32 if upcast else torch.float16
    assert seen == [("decode", wanted), ("encode", wanted)]
    assert vae.dtype == torch.float16  # back to its own dtype after an upcast block
    assert pixels.shape == (2, 64, 64, 3) and pixels.dtype == torch.uint8 and finite.tolist() == [True, True]
    assert encoded[0].shape == (1, 4, 8, 8) and encoded[0].dtype == torch.float16


def _raise_for(prompt: str, real):
    def picky(txt2img, img2img, request):
        if request.prompt == prompt:
            raise RuntimeError("this row broke")
        return real(txt2img, img2img, request)

    return picky


def test_a_row_that_raises_any_error_fails_alone(sd15_engine, monkeypatch):
    monkeypatch.setattr(engine_module, "schedule", _raise_for("broken", engine_module.schedule))
    requests = [Request(prompt="first", seed=1, steps=2), Request(prompt="broken", steps=2),
                Request(prompt="third", seed=3, steps=2)]  # fmt: skip
    rows = sd15_engine.start_many(requests)
    assert isinstance(rows[1], RuntimeError) and str(rows[1]) == "this row broke"
    ready = [rows[0], rows[2]]
    assert all(isinstance(row, Row) for row in ready)
    while not ready[0].done:
        sd15_engine.step(ready)
    results = sd15_engine.finish(ready)
    assert [r.params["prompt"] for r in results] == ["first", "third"]
    alone = sd15_engine.generate(requests[2])
    assert list(results[1].image.getdata()) == list(alone.image.getdata())  # untouched by its neighbour's failure


def test_an_input_image_that_fails_to_encode_fails_only_its_row(sd15_engine, monkeypatch):
    real = rows_module.fill_crop

    def picky(image, width, height):
        if image.getpixel((0, 0)) == (255, 0, 0):
            raise RuntimeError("unreadable pixels")
        return real(image, width, height)

    monkeypatch.setattr(rows_module, "fill_crop", picky)
    good = Request(prompt="a frame", image=Image.new("RGB", (64, 64), (20, 90, 200)), steps=2, strength=0.5, seed=4)
    bad = Request(prompt="a frame", image=Image.new("RGB", (64, 64), (255, 0, 0)), steps=2, strength=0.5)
    rows = sd15_engine.start_many([bad, good])  # same size and decoder: one encoder call, then row by row
    assert isinstance(rows[0], RuntimeError) and isinstance(rows[1], Row)
    while not rows[1].done:
        sd15_engine.step([rows[1]])
    (result,) = sd15_engine.finish([rows[1]])
    assert list(result.image.getdata()) == list(sd15_engine.generate(good).image.getdata())


def test_models_load_from_local_files_first_and_the_hub_only_for_what_is_missing():
    from lcm_live.loading import cache_first
    from lcm_live.request import ModelLoadError

    def load(cached: bool):
        def attempt(local_files_only: bool):
            tries.append(local_files_only)
            if local_files_only and not cached:
                raise ModelLoadError("not in the cache")
            return "pipe"

        return attempt

    for cached, offline, wanted in [(True, False, [True]), (False, False, [True, False]), (False, True, [True])]:
        tries = []
        try:
            cache_first(load(cached), local_files_only=offline)
        except ModelLoadError:
            assert offline  # offline and not cached: the local error, and no hub
        assert tries == wanted, (cached, offline)
