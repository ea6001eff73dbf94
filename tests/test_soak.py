"""A shortened soak against the launched app: a webcam-style stream must not leak memory, descriptors or threads.

The full run is `python scripts/soak.py --minutes 10` (docs/safety.md has its curve).
"""

import os
import sys
from pathlib import Path

import pytest


sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from soak import run_soak  # noqa: E402


pytestmark = pytest.mark.app
SOAK_SECONDS = float(os.environ.get("LCM_LIVE_SOAK_SECONDS", "60"))


def test_webcam_stream_soak(live_server, artifacts):
    url, app = live_server
    cache = os.environ["GRADIO_TEMP_DIR"]
    result = run_soak(url, SOAK_SECONDS, cache, str(app.store.folder), every=5.0)
    import json

    (artifacts / "soak-short.json").write_text(json.dumps(result, indent=2))
    summary = {k: v for k, v in result.items() if k != "samples"}
    print("\nsoak:", json.dumps(summary))
    assert result["errors"] == 0 and result["frames"] >= 10
    assert result["rss_growth_pct"] < 5, summary
    assert result["fds_growth"] <= 8 and result["threads_growth"] <= 4, summary
    assert result["store_files_end"] <= 256  # OutputStore keeps the newest 256 PNGs
    # Gradio's cache holds each frame's upload and result until delete_cache=(300, 900) sweeps them: bounded by
    # rate x 900 s x size: two files a frame at most (the upload and the result) until then.
    start = result["samples"][0]
    assert result["cache_files_end"] - start["cache_files"] <= 2 * result["frames"] + 8


def test_cache_sweep_survives_steady_traffic(tmp_path):
    """Gradio's delete_cache pass dies on "Set changed size during iteration" under traffic; ours must not."""
    import threading
    import time
    from types import SimpleNamespace

    from app import sweep_cache

    old = []
    for index in range(200):
        path = tmp_path / f"old-{index}.png"
        path.write_bytes(b"x")
        old.append(str(path))
    files = set(old)
    blocks = SimpleNamespace(blocks={}, temp_file_sets=[files])
    stop = threading.Event()

    def traffic():  # new files arrive while the sweep runs, as frames do
        index = 0
        while not stop.is_set():
            path = tmp_path / f"new-{index}.png"
            path.write_bytes(b"y")
            files.add(str(path))
            index += 1

    writer = threading.Thread(target=traffic)
    writer.start()
    time.sleep(0.05)
    try:
        removed = sweep_cache(blocks, age=0.02)
    finally:
        stop.set()
        writer.join()
    assert removed >= len(old) and not any(os.path.exists(path) for path in old)
