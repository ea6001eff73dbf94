"""The benchmark CLI in its fast mode: every subcommand runs and writes its JSON. Speed is not asserted."""

import json

import pytest
import torch

from lcm_live.bench.__main__ import main


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def run(tmp_path, *argv):
    data = main([*argv, "--smoke", "--threads", "1", "--out", str(tmp_path)])
    assert json.loads((tmp_path / f"{argv[0]}.json").read_text())["command"]
    assert (tmp_path / f"{argv[0]}.md").read_text().startswith("###")
    return data


def test_engine(tmp_path):
    data = run(tmp_path, "engine")
    modes = {(r["mode"], r["decoder"]) for r in data["rows"]}
    assert modes == {("txt2img", "TAESD"), ("txt2img", "VAE"), ("img2img", "TAESD"), ("img2img", "VAE")}
    for row in data["rows"]:
        assert row["total_ms"] > 0 and row["peak_memory_mb"] > 0 and row["step_ms"]
    assert (tmp_path / "engine.png").exists()


def test_engine_samples_as_a_presets_recipe(tmp_path):
    data = run(tmp_path, "engine", "--recipe", "hyper-sd15-2step", "--decoder", "tiny")
    assert (data["recipe"], data["steps"]) == ("ddim-trailing", 2)  # the preset's scheduler and default steps
    assert all(len(row["step_ms"]) == (2 if row["mode"] == "txt2img" else 1) for row in data["rows"])
    with pytest.raises(SystemExit, match="Unknown preset 'nope'"):
        run(tmp_path, "engine", "--recipe", "nope")


def test_compare(tmp_path):
    data = run(tmp_path, "compare")
    assert data["ratio"] > 0
    for path in ("blog", "lcm-live"):
        result = data["results"][path]
        assert result["floor_s"] > 0 and result["x_floor"] > 0 and result["peak"]["peak_gflops"] > 0
    assert data["flops"]["lcm-live"]["unet_step"] > 0


def test_live_never_shows_a_stale_image(tmp_path):
    data = run(tmp_path, "live")
    policies = {r["policy"] for r in data["results"]}
    assert policies == {"LiveLoop", "always_last"}
    assert {r["engine"] for r in data["results"]} >= {"calibrated"}
    assert len({r["engine"] for r in data["results"]}) == 2  # and a real model
    for row in data["results"]:
        assert row["stale_shown"] == 0
        assert row["settled"] >= 1 and row["latency_T_median"] > 0 and row["steps_per_burst"] > 0


def test_table(tmp_path):
    data = run(tmp_path, "table")
    assert data["lcm4_s"] > 0 and data["standard_s"] > 0 and data["speedup"] > 0


def test_sweep(tmp_path):
    data = run(tmp_path, "sweep")
    assert [r["steps"] for r in data["rows"]] == list(range(1, 9))
    from PIL import Image

    assert Image.open(data["image"]).size == (8 * 128, 128 + 16)


def test_img2img_preview_encodes_with_taesd():
    from PIL import Image

    from lcm_live.bench.core import make_engine
    from lcm_live.device import Runtime
    from lcm_live.request import Request

    engine = make_engine("tiny-sd15", Runtime("cpu", torch.float32, False), taesd=True)
    calls = []
    engine.tiny_vae.encoder.register_forward_pre_hook(lambda *_: calls.append("tiny"))
    engine.full_vae.encoder.register_forward_pre_hook(lambda *_: calls.append("full"))
    image = Image.new("RGB", (64, 64), (200, 40, 40))
    for decoder in ("tiny", "full"):
        result = engine.generate(Request(prompt="red", image=image, steps=2, strength=1.0, decoder=decoder))
        assert result.params["decoder"] == decoder and result.image.size == (64, 64)
    assert calls == ["tiny", "full"]
    assert engine.img2img.vae is engine.full_vae


def test_transport_old_and_new_path_side_by_side(tmp_path):
    """The simulated app in its own process; one client on each path (the smoke run leaves Chromium out)."""
    data = run(tmp_path, "transport")
    rows = {row["path"]: row for row in data["rows"]}
    old, new = rows["old: /webcam_frame API (Gradio queue, PNG)"], rows["new: live socket (JPEG both ways)"]
    for row in (old, new):
        assert row["fps"] > 0 and row["latency_p50_ms"] > 0 and row["cpu_ms_per_frame"] > 0 and row["kib_down"] > 0
    assert rows["loop alone (no transport)"]["fps"] > 0
