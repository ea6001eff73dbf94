"""A quiet, honest start: `python app.py` says where to open it, what serves, one line per load stage, and
nothing from the libraries below it (no warnings, no progress bars, no hub retries without network)."""

import os
import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lcm_live.settings import Settings


pytestmark = pytest.mark.app
ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_lines(args: list[str], after_url_s: float = 3.0, limit_s: float = 60.0) -> list[str]:
    """What app.py prints (stdout and stderr) until its URL line and `after_url_s` more; then it is stopped."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}  # the hub is tried where files are missing
    process = subprocess.Popen([sys.executable, "app.py", "--port", str(_free_port()), *args], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    seen, deadline = [], time.monotonic() + limit_s
    try:
        while time.monotonic() < deadline:
            try:
                seen.append(lines.get(timeout=0.2).rstrip("\n"))
            except queue.Empty:
                continue
            if seen[-1].startswith("lcm-live: open http"):
                deadline = min(deadline, time.monotonic() + after_url_s)
    finally:
        process.terminate()
        process.wait(10)
    return seen


def test_the_start_says_what_serves_and_nothing_else():
    # A model that is on no disk: loading it tries the hub (here without network, or with one: no such repo).
    lines = _start_lines(["--base", "lcm-live-tests/no-such-model", "--lora", "lcm-live-tests/no-such-lora"])
    text = "\n".join(lines)
    assert any(line.startswith("lcm-live: open http://127.0.0.1:") for line in lines), text
    assert "serving the embedded demo model while" in text and "embedded demo model: Warming up" in text, text
    assert all(line.startswith("lcm-live: ") for line in lines), text  # ours only
    for noise in ("Retrying", "it/s]", "%|", "torchvision", "No LoRA keys", "Running on local URL", "Traceback"):
        assert noise not in text, (noise, text)


def test_verbose_is_a_flag_and_a_setting():
    assert Settings.from_args(["--verbose"], environ={}).verbose
    assert Settings.from_args([], environ={"LCM_LIVE_VERBOSE": "1"}).verbose
    assert not Settings.from_args([], environ={}).verbose
