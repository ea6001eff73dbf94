"""Shared fixtures: tiny random-weight models saved to disk and loaded through the real path."""

import os

import pytest


os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Folders of tiny SD 1.5- and SDXL-family pipelines with LCM-LoRAs in both file styles."""
    from lcm_live.architectures import save_model_with_lora

    root = tmp_path_factory.mktemp("models")
    return {
        "sd15": save_model_with_lora("tiny-sd15", str(root / "sd15"), seed=0, lora_style="peft"),
        "sd15-kohya": save_model_with_lora("tiny-sd15", str(root / "sd15-kohya"), seed=0, lora_style="kohya"),
        "sdxl": save_model_with_lora("tiny-sdxl", str(root / "sdxl"), seed=0, lora_style="kohya"),
    }


@pytest.fixture(scope="session")
def cpu32():
    from lcm_live.device import pick_runtime

    return pick_runtime("cpu", "float32")


@pytest.fixture(scope="session")
def sd15_engine(tiny_models, cpu32):
    from lcm_live.engine import Engine
    from lcm_live.presets import ModelSpec

    paths = tiny_models["sd15"]
    return Engine.load(ModelSpec(paths["base"], paths["lora"]), cpu32)
