"""Per-step cost of a ControlNet (or an SDXL T2I-Adapter) in the engine's step loop: one denoising step without and
with a control, on a random-weight architecture (speed does not depend on weight values).

    python -m lcm_live.bench.control --arch sd15 --size 512 --threads 2
    python -m lcm_live.bench.control --arch tiny-sdxl --adapter --repeats 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from PIL import Image


def _adapter(arch: str):
    """A T2I-Adapter shaped for `arch`: SDXL's published adapters' layout, or the tiny test model's."""
    from diffusers import T2IAdapter

    channels = [32, 64] if arch.startswith("tiny") else [320, 640, 1280, 1280]
    return T2IAdapter(in_channels=3, channels=channels, num_res_blocks=1 if arch.startswith("tiny") else 2,
                      downscale_factor=16, adapter_type="full_adapter_xl")  # fmt: skip


def measure(arch: str, size: int | None, repeats: int, batch: int, dtype: str = "float32",
            adapter: bool = False) -> dict:  # fmt: skip
    """Median milliseconds of one step for `batch` rows, without control, with control on every row, and with it
    on half of them (the zero-residual path)."""
    from ..architectures import ARCHITECTURES, build_pipeline, random_controlnet
    from ..device import pick_runtime
    from ..engine import Engine
    from ..presets import ModelSpec
    from ..request import Request

    runtime = pick_runtime("cpu", dtype)
    pipe = build_pipeline(arch)
    net = (_adapter(arch) if adapter else random_controlnet(pipe.unet)).eval().to(runtime.dtype)
    pipe.to(dtype=runtime.dtype)
    side = size or ARCHITECTURES[arch].native_size
    engine = Engine(pipe, ModelSpec(arch, None, native_size=side), runtime,
                    ARCHITECTURES[arch].family, controls={"scribble": net})  # fmt: skip
    strokes = np.zeros((side, side, 3), np.uint8)
    strokes[side // 4 : side // 4 + max(1, side // 64), :] = 255
    drawing = Image.fromarray(strokes)

    def step_ms(controlled: int) -> float:
        requests = [Request(prompt="a red circle", seed=i, steps=8, control="scribble" if i < controlled else None,
                            control_image=drawing if i < controlled else None) for i in range(batch)]  # fmt: skip
        engine.step(engine.start_many(requests))  # warm-up
        times = []
        for _ in range(repeats):
            rows = engine.start_many(requests)
            began = time.perf_counter()
            engine.step(rows)
            times.append((time.perf_counter() - began) * 1e3)
        return statistics.median(times)

    cases = {"none": 0, "all": batch, "half": batch // 2} if batch > 1 else {"none": 0, "all": 1}
    once = {}
    if adapter:  # its once-per-image cost: the features a row gets at its start
        began = time.perf_counter()
        engine.start_many([Request(prompt="a red circle", control="scribble", control_image=drawing)])
        once["adapter_ms_per_image"] = round((time.perf_counter() - began) * 1e3, 1)
    return {**once, "control": "T2I-Adapter" if adapter else "ControlNet", "arch": arch, "size": side, "batch": batch, "threads": torch.get_num_threads(), "dtype": dtype,
            **{f"step_ms_{name}": round(step_ms(n), 1) for name, n in cases.items()}}  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lcm_live.bench.control", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="tiny-sd15")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--adapter", action="store_true", help="a T2I-Adapter (SDXL architectures) instead")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(measure(args.arch, args.size, args.repeats, args.batch, args.dtype, args.adapter)))


if __name__ == "__main__":
    main()
