"""All GPU measurements in one go: SD 1.5 512 and SDXL 1024 (random weights, real architectures) in fp16.

Per architecture: the engine's per-stage times for 4 LCM steps with TAESD and with the full VAE, the standard
25-step guided run (the LCM-LoRA release's comparison), FLOPs per stage, and the lean loop (`FastLCM`) eager,
as one CUDA graph, and (optionally) with the UNet compiled, for latency and images/s.
A time guard skips what would not fit in `--budget-s`. `--tiny` runs the same code on tiny models (a CPU check).

    python bench/gpu.py --out DIR [--budget-s 330] [--no-compile] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lcm_live.bench.core import (  # noqa: E402
    PROMPT,
    device_name,
    machine_peak,
    make_engine,
    stage_flops,
    standard_call,
    time_request,
    timed,
)
from lcm_live.bench.fast import prepared  # noqa: E402
from lcm_live.device import Runtime  # noqa: E402
from lcm_live.request import Request  # noqa: E402


START = time.perf_counter()


def left(budget: float) -> float:
    return budget - (time.perf_counter() - START)


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f}s] {message}", flush=True)


def fast_numbers(engine, size: int, batch: int, mode: str, repeats: int, compile_mode: str | None = None) -> dict:
    fast, setup = prepared(engine, size, batch, mode, compile_mode)
    result = dict(batch=batch, mode=mode, **setup)
    seconds = timed(fast.run, repeats, engine.runtime.device)
    result.update(latency_ms=round(seconds * 1e3, 2), images_per_s=round(batch / seconds, 1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-results"))
    parser.add_argument("--budget-s", type=float, default=330)
    parser.add_argument("--tiny", action="store_true", help="tiny architectures, small sizes: checks the script")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--compile-mode", default="default")
    args = parser.parse_args()
    budget = args.budget_s
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.float16 if cuda else torch.float32
    runtime = Runtime(device, dtype, True)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    report = dict(device=device_name(device), torch=torch.__version__, dtype=str(dtype), archs={})
    log(f"device: {report['device']}, torch {torch.__version__}")
    report["peak"] = machine_peak(device, dtype, seconds=0.5, small=args.tiny)
    log(f"achieved peak: {report['peak']}")
    plan = [("tiny-sd15", 64), ("tiny-sdxl", 128)] if args.tiny else [("sd15", 512), ("sdxl", 1024)]
    reps = 2 if args.tiny else 5
    for arch, size in plan:
        if left(budget) < 40:
            log(f"skip {arch}: out of time")
            continue
        log(f"{arch} {size}x{size}: building")
        if cuda:
            torch.cuda.empty_cache()
        engine = make_engine(arch, runtime)
        entry = dict(size=size)
        request = Request(prompt=PROMPT, steps=4, width=size, height=size, decoder="tiny")
        entry["lcm4_taesd"] = time_request(engine, request, repeats=reps)
        log(f"lcm4 taesd {entry['lcm4_taesd']}")
        entry["lcm4_vae"] = time_request(engine, Request(prompt=PROMPT, steps=4, width=size, height=size,
                                                         decoder="full"), repeats=max(2, reps // 2))  # fmt: skip
        log(f"lcm4 vae {entry['lcm4_vae']}")
        entry["standard25_s"] = round(timed(standard_call(engine, size), 2, device), 3)
        log(f"standard 25 steps: {entry['standard25_s']} s")
        entry["flops"] = stage_flops(engine, size, size)
        runs = [(1, "eager", reps * 2)] + ([(1, "graph", reps * 4)] if cuda else [])
        runs += [(8, "graph", reps * 2)] if cuda and arch.endswith("sd15") else []
        entry["fast"] = []
        for batch, mode, repeats in runs:
            try:
                entry["fast"].append(fast_numbers(engine, size, batch, mode, repeats))
            except Exception as error:  # report it; the other numbers stand
                entry[f"{mode}_{batch}_error"] = f"{type(error).__name__}: {str(error)[:300]}"
                log(entry[f"{mode}_{batch}_error"])
        for row in entry["fast"]:
            log(f"fast {row}")
        report["archs"][arch] = entry
        del engine
        save(report, args.out)
    print(save(report, args.out))
    # Compilation last: it is the slow, optional part; everything above is already saved.
    for arch, size in plan:
        if args.no_compile or not (cuda or args.tiny) or arch not in report["archs"]:
            continue
        entry = report["archs"][arch]
        if left(budget) < (120 if arch.endswith("sd15") else 200):
            entry["compile_skipped"] = f"{left(budget):.0f} s of the time budget left"
            save(report, args.out)
            continue
        log(f"{arch}: compiling the UNet ({args.compile_mode})")
        engine = make_engine(arch, runtime)
        try:
            row = fast_numbers(engine, size, 1, "graph" if cuda else "eager", reps * 4, args.compile_mode)
            entry["fast"].append({**row, "compiled": args.compile_mode})
            log(f"compiled {entry['fast'][-1]}")
        except Exception as error:  # report it; the other numbers stand
            entry["compile_error"] = f"{type(error).__name__}: {str(error)[:300]}"
            log(entry["compile_error"])
        del engine
        print(save(report, args.out))
    log("done")


def save(report: dict, out: str) -> str:
    Path(out).mkdir(parents=True, exist_ok=True)
    Path(out, "gpu.json").write_text(json.dumps(report, indent=1))
    markdown = to_markdown(report)
    Path(out, "gpu.md").write_text(markdown)
    return markdown


def to_markdown(report: dict) -> str:
    peak = report["peak"]
    lines = [f"Device: **{report['device']}**, torch {report['torch']}, {report['dtype']}; achieved peak "
             f"{peak['matmul_gflops'] / 1e3:.0f} TFLOP/s (matmul), {peak['conv_gflops'] / 1e3:.0f} TFLOP/s (3x3 conv)",
             "", "| architecture | size | text (ms) | UNet step (ms) | decode TAESD / VAE (ms) | LCM 4 steps + TAESD (s) "
             "| LCM 4 steps + VAE (s) | standard 25 steps, CFG 7.5 + VAE (s) | speed-up | peak mem (MiB) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for arch, e in report["archs"].items():
        t, v = e["lcm4_taesd"], e["lcm4_vae"]
        step = statistics.median(t["step_ms"]) if t["step_ms"] else 0
        lines.append(
            f"| {arch} | {e['size']} | {t['text_ms']} | {step:.1f} | {t['decode_ms']} / {v['decode_ms']} | "
            f"{t['total_ms'] / 1e3:.3f} | {v['total_ms'] / 1e3:.3f} | {e['standard25_s']:.3f} | "
            f"{e['standard25_s'] * 1e3 / v['total_ms']:.1f}x | {max(t['peak_memory_mb'], v['peak_memory_mb']):.0f} |"
        )  # fmt: skip
    lines += ["", "Lean loop (4 LCM steps + TAESD decode to a uint8 tensor on the device; no PNG):", "",
              "| architecture | size | batch | mode | latency (ms) | images/s | compile/capture (s) | x floor |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for arch, e in report["archs"].items():
        flops = e["flops"]["unet_step"] * 4 + e["flops"]["decode"]
        for row in e["fast"]:
            floor_ms = flops * row["batch"] / (peak["peak_gflops"] * 1e9) * 1e3
            mode = row["mode"] + (f" + compile ({row['compiled']})" if row.get("compiled") else "")
            setup = row.get("compile_s", row.get("capture_s", ""))
            lines.append(f"| {arch} | {e['size']} | {row['batch']} | {mode} | {row['latency_ms']} | "
                         f"{row['images_per_s']} | {setup} | {row['latency_ms'] / floor_ms:.1f} |")  # fmt: skip
        for key in [k for k in e if k.endswith(("_error", "_skipped"))]:
            if key in e:
                lines.append(f"\n{arch} compile: {e[key]}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
