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


def pytest_configure(config):
    """Serve a random-weight stand-in when the trained demo model is not in assets/ (a fresh checkout of a fork)."""
    from pathlib import Path

    assets_model = Path(__file__).resolve().parent.parent / "assets" / "demo-model" / "base" / "model_index.json"
    if os.environ.get("LCM_LIVE_DEMO_MODEL") or assets_model.exists():
        return
    import tempfile

    from lcm_live.architectures import save_model_with_lora

    folder = tempfile.mkdtemp(prefix="lcm-live-demo-")
    save_model_with_lora("tiny-sd15", folder)
    os.environ["LCM_LIVE_DEMO_MODEL"] = folder


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def live_server(tmp_path_factory):
    """The real app, launched in this process on the embedded model; yields (url, app)."""
    os.environ["GRADIO_TEMP_DIR"] = str(tmp_path_factory.mktemp("gradio-cache"))
    from app import launch
    from lcm_live.settings import Settings

    settings = Settings(preset="demo", offline=True, port=_free_port(), max_file_size="2mb", queue_size=64)
    demo, app = launch(settings, prevent_thread_lock=True)
    yield f"http://127.0.0.1:{settings.port}/", app
    demo.close()
    app.loop.close()


@pytest.fixture(scope="session")
def client(live_server):
    from gradio_client import Client

    return Client(live_server[0], verbose=False)


CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
    "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
]  # fmt: skip


@pytest.fixture(scope="module")  # Playwright's sync API keeps an event loop running on this thread while open
def browser():
    playwright = pytest.importorskip("playwright.sync_api")
    if not os.path.exists("/usr/bin/chromium"):
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    with playwright.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, live_server):
    """A Chromium page on the launched app, once its first image (generated on page load) is shown."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.goto(live_server[0])
    page.wait_for_selector("#t2i-image img", timeout=60_000)
    yield page
    context.close()


@pytest.fixture(scope="session")
def artifacts():
    from pathlib import Path

    folder = Path(os.environ.get("LCM_LIVE_ARTIFACTS", "artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder
