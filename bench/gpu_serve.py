"""The GPU path through the product, in one run: the engine (CUDA graphs) against the lean loop, batches, streams.

On random-weight SD 1.5 (512) and SDXL (1024) architectures in fp16, per architecture:
- one image (4 LCM steps + TAESD) through the engine with its CUDA graphs, and with them off (eager);
- the lean loop (`FastLCM`: the whole generation as one graph) eager, as a graph, and compiled + graph;
- batches through the engine (start_many / step / finish), in images/s;
- SD 1.5 image-to-image at strength 0.5, and 1 and 8 webcam-style streams through the live loop;
- PNG / JPEG / WebP encoding of a 512 and a 1024 image on this machine's CPU.
Writes gpu-serve.json and gpu-serve.md to --out. A time guard skips what would not fit in --budget-s.

    python bench/gpu_serve.py --out DIR [--budget-s 420] [--tiny]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lcm_live.bench import serve  # noqa: E402
from lcm_live.bench.core import PROMPT, device_name, make_engine, sync  # noqa: E402
from lcm_live.bench.fast import prepared  # noqa: E402
from lcm_live.device import Runtime  # noqa: E402
from lcm_live.request import Request  # noqa: E402


START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f}s] {message}", flush=True)


def left(budget: float) -> float:
    return budget - (time.perf_counter() - START)


def median_ms(fn, repeats: int, device: str) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e3, 2)


def engine_batch(engine, requests: list[Request]):
    """One batch through the engine's own loop: rows started together, stepped together, decoded together."""
    rows = engine.start_many(requests)
    while active := [row for row in rows if not row.done]:
        engine.step(active)
    return engine.finish(rows)


def lean(engine, size: int, batch: int, mode: str, repeats: int, compile_mode: str | None = None) -> dict:
    fast, setup = prepared(engine, size, batch, mode, compile_mode)
    row = dict(batch=batch, mode=mode + (f" + compile ({compile_mode})" if compile_mode else ""), **setup)
    ms = median_ms(fast.run, repeats, engine.runtime.device)
    row.update(ms=ms, images_per_s=round(batch * 1e3 / ms, 1))
    return row


def encode_times(image, repeats: int = 5) -> list[dict]:
    """PIL encoders on this CPU for one image: PNG at several compress levels, JPEG and WebP for live frames."""
    rows = []
    for name, options in [("PNG", dict(compress_level=level)) for level in (0, 1, 3, 6, 9)] + [
        ("JPEG", dict(quality=90)), ("WEBP", dict(quality=80, method=0))]:  # fmt: skip
        times, size = [], 0
        for _ in range(repeats):
            buffer = io.BytesIO()
            start = time.perf_counter()
            image.save(buffer, format=name, **options)
            times.append(time.perf_counter() - start)
            size = buffer.tell()
        rows.append(dict(format=name, options=options, ms=round(statistics.median(times) * 1e3, 2), kb=size // 1024))
    return rows


def attempt(entry: dict, name: str, fn) -> None:
    """Run one measurement; a failure is recorded under `name`_error and the others go on."""
    try:
        fn()
    except Exception as error:
        entry[f"{name}_error"] = f"{type(error).__name__}: {str(error)[:400]}"
        log(f"{name} failed: {entry[f'{name}_error']}")


def run_arch(arch: str, size: int, runtime: Runtime, args, report: dict) -> None:
    device, tiny = runtime.device, args.tiny
    reps = 3 if tiny else 20
    few = max(3, reps // 4)
    entry = report["archs"].setdefault(arch, dict(size=size))
    log(f"{arch} {size}: building")
    engine = make_engine(arch, runtime, taesd=True)
    one = Request(prompt=PROMPT, steps=4, width=size, height=size, decoder="tiny")
    engine.generate(one)  # the prompt's embeddings are cached from here on
    sd15 = arch.endswith("sd15")
    batches = (1, 4, 8, 16) if sd15 else (1, 4, 8)

    def graphs():
        entry["graph_capture_s"] = round(engine.prepare_graphs(size, batches), 2)
        log(f"graphs captured in {entry['graph_capture_s']} s: {engine.unet_graphs.captures} UNet, "
            f"{engine.decode_graphs.captures} decode")  # fmt: skip

    def batch_one():
        entry["engine_ms"] = median_ms(lambda: engine.generate(one), reps, device)
        enabled = engine.unet_graphs.enabled, engine.decode_graphs.enabled
        engine.unet_graphs.enabled = engine.decode_graphs.enabled = False
        entry["engine_eager_ms"] = median_ms(lambda: engine.generate(one), few, device)
        engine.unet_graphs.enabled, engine.decode_graphs.enabled = enabled
        log(f"engine batch 1: {entry['engine_ms']} ms with graphs, {entry['engine_eager_ms']} ms eager")

    def lean_one():
        entry["lean"] = [lean(engine, size, 1, "eager", few), lean(engine, size, 1, "graph", reps)]
        entry["lean_graph_ms"] = entry["lean"][1]["ms"]
        entry["ratio_engine_to_lean_graph"] = round(entry["engine_ms"] / entry["lean_graph_ms"], 2)
        log(f"lean: {entry['lean']}")

    def batched():
        entry["engine_batches"] = []
        for batch in batches[1:]:
            requests = [Request(prompt=PROMPT, seed=i, steps=4, width=size, height=size, decoder="tiny")
                        for i in range(batch)]  # fmt: skip
            engine_batch(engine, requests)
            engine.warm(limit=None)
            ms = median_ms(lambda requests=requests: engine_batch(engine, requests), few, device)
            lean_ms = lean(engine, size, batch, "graph", few)["ms"] if left(args.budget_s) > 150 else None
            entry["engine_batches"].append(dict(batch=batch, ms=ms, images_per_s=round(batch * 1e3 / ms, 1),
                                                lean_graph_ms=lean_ms))  # fmt: skip
            log(f"engine batch {batch}: {entry['engine_batches'][-1]}")

    def img2img():
        i2i = Request(prompt=PROMPT, image=serve.webcam_frame(0, size, size), strength=0.5, steps=4, decoder="tiny")
        engine.generate(i2i)
        engine.warm(limit=None)
        entry["img2img_ms"] = median_ms(lambda: engine.generate(i2i), reps, device)
        log(f"img2img strength 0.5 (2 UNet steps): {entry['img2img_ms']} ms")

    def streams():
        entry["streams"] = []
        for steps in (4, 2):
            for count in (1, 8):
                if left(args.budget_s) < 100:
                    return
                row = serve.streams(engine, count, 1.0 if tiny else 3.0, max_batch=16, interval_s=args.frame_interval,
                                    steps=steps, strength=0.5, warmup_s=1.5, frame_size=(size, size))  # fmt: skip
                entry["streams"].append(dict(steps=steps, **row))
                if steps == 4 and count == 8:
                    entry["streams8_fps"] = row["fps"]
                log(f"streams: {entry['streams'][-1]}")

    def compiled():
        """The lean loop with the UNet compiled, then the engine on that same compiled UNet (its graphs anew)."""
        row = lean(engine, size, 1, "graph", reps, compile_mode="default")
        entry["lean"].append(row)
        entry["lean_compiled_graph_ms"] = row["ms"]
        log(f"lean compiled: {row}")
        engine.txt2img.unet = torch.compile(engine.txt2img.unet, mode="default")
        engine.compiled = True
        engine.unet_graphs = type(engine.unet_graphs)(engine._unet_forward, enabled=True)
        start = time.perf_counter()
        engine.generate(one)
        engine.warm(limit=None)
        entry["engine_compile_s"] = round(time.perf_counter() - start, 1)
        entry["engine_compiled_ms"] = median_ms(lambda: engine.generate(one), reps, device)
        log(f"engine compiled + graphs, batch 1: {entry['engine_compiled_ms']} ms ({entry['engine_compile_s']} s)")

    def encodings():
        entry["encode"] = encode_times(engine.generate(one).image)
        log(f"encode {size}: {entry['encode']}")

    attempt(entry, "graphs", graphs)
    attempt(entry, "engine", batch_one)
    attempt(entry, "lean", lean_one)
    attempt(entry, "batches", batched)
    attempt(entry, "encode", encodings)
    if sd15:
        attempt(entry, "img2img", img2img)
        attempt(entry, "streams", streams)
    if args.compile and not tiny and device.startswith("cuda") and left(args.budget_s) > (150 if sd15 else 240):
        attempt(entry, "compile", compiled)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--budget-s", type=float, default=420)
    parser.add_argument("--tiny", action="store_true", help="tiny architectures on any device: checks the script")
    parser.add_argument("--only", default=None, help="one architecture: sd15 or sdxl")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--frame-interval", type=float, default=1 / 30, help="seconds between a stream's frames")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    runtime = Runtime("cuda" if cuda else "cpu", torch.float16 if cuda else torch.float32, True)
    torch.backends.cudnn.benchmark = True
    report = dict(device=device_name(runtime.device), torch=torch.__version__, dtype=str(runtime.dtype), archs={})
    log(f"device: {report['device']}, torch {torch.__version__}")
    plan = [("tiny-sd15", 64), ("tiny-sdxl", 128)] if args.tiny else [("sd15", 512), ("sdxl", 1024)]
    for arch, size in plan:
        if args.only and not arch.endswith(args.only):
            continue
        if left(args.budget_s) < 60:
            log(f"skip {arch}: out of time")
            continue
        try:
            run_arch(arch, size, runtime, args, report)
            if cuda:
                torch.cuda.empty_cache()
        except Exception as error:  # report it; what was measured stands
            report["archs"].setdefault(arch, {})["error"] = f"{type(error).__name__}: {str(error)[:500]}"
            log(f"{arch} failed: {report['archs'][arch]['error']}")
        save(report, args.out)
    print(save(report, args.out))
    log("done")


def save(report: dict, out: str) -> str:
    Path(out).mkdir(parents=True, exist_ok=True)
    Path(out, "gpu-serve.json").write_text(json.dumps(report, indent=1))
    lines = [f"Device: **{report['device']}**, torch {report['torch']}, {report['dtype']}", "",
             "| architecture | size | engine, graphs (ms) | engine, eager (ms) | lean graph (ms) | engine / lean | "
             "8 streams (frames/s) |", "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for arch, e in report["archs"].items():
        if "engine_ms" in e and "lean_graph_ms" in e:
            lines.append(f"| {arch} | {e['size']} | {e['engine_ms']} | {e.get('engine_eager_ms')} | "
                         f"{e['lean_graph_ms']} | {e['engine_ms'] / e['lean_graph_ms']:.2f} | "
                         f"{e.get('streams8_fps')} |")  # fmt: skip
        if "error" in e:
            lines.append(f"| {arch} | failed: {e['error'][:200]} |")
    markdown = "\n".join(lines) + "\n"
    Path(out, "gpu-serve.md").write_text(markdown)
    return markdown


if __name__ == "__main__":
    main()
