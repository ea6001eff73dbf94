"""ZeroGPU mode through the real `spaces.GPU` wrapper, against a local fake of ZeroGPU's device API.

Run as a script (it sets SPACES_ZERO_GPU, which makes `spaces` patch torch: never in the test process itself):
prints one JSON line with what the device API saw and what each visitor got. tests/test_zerogpu.py runs it.
The parts of the wrapper that need a CUDA device (`spaces.zero.torch.init` / `move`: make CUDA real in the worker and
move the packed weights there) are stubbed; everything else is the package's: scheduling per visitor token over
HTTP, the forked worker, arguments and yields through its queues, allow / release, refusals as gr.Error.
"""

import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import parse_qs, urlparse


REFUSED = "bob"  # the visitor whose quota is spent


class DeviceApi(BaseHTTPRequestHandler):
    """ZeroGPU's device API as the `spaces` client calls it: /startup-report, /schedule, /allow, /release."""

    schedules: Counter = Counter()
    calls: Counter = Counter()

    def do_POST(self):
        url = urlparse(self.path)
        DeviceApi.calls[url.path] += 1
        if url.path != "/schedule":
            return self._reply(200, {})
        token = parse_qs(url.query).get("token", [None])[0]
        DeviceApi.schedules[token] += 1
        if token == REFUSED:
            return self._reply(429, {"left": 12, "wait": 2460})
        self._reply(200, {"idle": False, "nvidiaIndex": 0, "nvidiaUUID": "GPU-fake", "allowToken": f"allow-{token}"})

    def _reply(self, status: int, body: dict):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def never() -> bool:
    return False


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), DeviceApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    folder = Path(tempfile.mkdtemp(prefix="zerogpu-"))
    (folder / "cgroup").write_text("0::/lcm-live-test\n")
    os.environ.update(SPACES_ZERO_GPU="true", SPACES_ZERO_DEVICE_API_URL=f"http://127.0.0.1:{server.server_port}",
                      ZEROGPU_PROC_SELF_CGROUP_PATH=str(folder / "cgroup"), ZEROGPU_OFFLOAD_DIR=str(folder / "t"))  # fmt: skip
    import torch

    if torch.version.cuda is None:  # a CPU build: the package's torch patching reads these at import
        torch.version.cuda = "12.8"
        torch._C._cuda_init = lambda: None
        torch.cuda._is_in_bad_fork = never  # the CPU build's is a lambda, which the check cannot send to its fork
    import spaces  # before torch is used: it patches torch as on a ZeroGPU Space
    import spaces.zero.torch as zero_torch
    import spaces.zero.wrappers as wrappers

    zero_torch.init = lambda nvidia_uuid: None  # needs a CUDA device
    zero_torch.move = lambda callback=None: None
    zero_torch.size = lambda: 0

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from gradio.context import LocalContext
    from PIL import Image

    from lcm_live.live import Limits
    from lcm_live.request import Request, Result, Timings, checked
    from lcm_live.zerogpu import ZeroGpuLoop

    class Engine:
        native_size = 64
        info = {"model": "fake", "native_size": 64}
        outside = 0

        def generate(self, request, should_stop=None):
            if not wrappers.forked:  # True only in the wrapper's worker process
                Engine.outside += 1
                raise AssertionError("an engine call outside a GPU call")
            request, _ = checked(request, self.native_size)
            params = {"prompt": request.prompt, "pid": os.getpid()}
            return Result(Image.new("RGB", (request.width, request.height)), params, Timings())

    class Headers(dict):  # the `spaces` client wants a headers object with a __dict__
        pass

    loop = ZeroGpuLoop(Engine(), Limits(), duration=20, idle_s=1.0, gpu=spaces.GPU)

    async def burst(visitor: str, text: str):
        LocalContext.request.set(SimpleNamespace(session_hash=visitor, headers=Headers({"x-ip-token": visitor})))
        calls = []
        for end in range(1, len(text) + 1):
            calls.append(asyncio.ensure_future(loop.run(f"{visitor}:txt2img", Request(prompt=text[:end], steps=2))))
            await asyncio.sleep(0.03)
        return await asyncio.gather(*calls, return_exceptions=True)

    async def visitors():
        return await asyncio.gather(burst("alice", "a red fox"), burst(REFUSED, "hi"))

    alice, bob = asyncio.run(visitors())
    time.sleep(1.6)  # alice's call goes idle, returns and releases its GPU
    again = asyncio.run(burst("alice", "a blue fox"))
    time.sleep(1.6)
    report = {
        "schedules": dict(DeviceApi.schedules),
        "calls": dict(DeviceApi.calls),
        "alice": [o.result.params if hasattr(o, "result") else repr(o) for o in (alice[-1], again[-1])],
        "bob": str(bob[-1]),
        "bob_error": type(bob[-1]).__name__,
        "outside": Engine.outside,
        "pid": os.getpid(),
    }
    loop.close()
    print(json.dumps(report))
    server.shutdown()


if __name__ == "__main__":
    main()
