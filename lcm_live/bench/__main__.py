"""python -m lcm_live.bench {engine,compare,live,table,sweep,serve,replicas,transport} [--smoke] [--out DIR]: see docs/benchmarks.md."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from . import core
from .report import bar_chart, table


SMOKE_ARCH, SMOKE_SIZE = "tiny-sd15", 64


def _runtime(args, dtype: str | None = None):
    from ..device import pick_runtime

    return pick_runtime(args.device, dtype or args.dtype)


def _save(args, name: str, data: dict, markdown: str) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = {"command": " ".join(["python -m lcm_live.bench", *sys.argv[1:]]), "torch": torch.__version__,
            "threads": torch.get_num_threads(), **data}  # fmt: skip
    (out / f"{name}.json").write_text(json.dumps(data, indent=1, default=str))
    (out / f"{name}.md").write_text(markdown)
    print(markdown)
    return data


# ---------------------------------------------------------------------- engine
def cmd_engine(args) -> dict:
    from PIL import Image

    from ..request import Request

    runtime = _runtime(args)
    recipe = _recipe(args.recipe)
    engine = core.make_engine(args.arch, runtime, taesd=True, model=args.model, recipe=recipe)
    size = args.size or engine.native_size
    steps = args.steps or (recipe.steps if recipe else 4)
    guidance = recipe.guidance_scale if recipe else 1.0
    decoders = ["tiny", "full"] if args.decoder == "both" else [args.decoder]
    init = Image.new("RGB", (size, size), (120, 90, 60))
    rows = []
    for mode in ("txt2img", "img2img"):
        for decoder in decoders:
            request = Request(prompt=core.PROMPT, steps=steps, guidance_scale=guidance, width=size, height=size,
                              decoder=decoder, image=init if mode == "img2img" else None,
                              strength=args.strength)  # fmt: skip
            stats = core.time_request(engine, request, repeats=args.repeats)
            rows.append({**stats, "mode": mode, "decoder": "TAESD" if decoder == "tiny" else "VAE"})
    device = core.device_name(runtime.device)
    header = ["mode", "decoder", "text (ms)", "UNet steps (ms)", "decode (ms)", "total (ms)",
              "total, prompt cached (ms)", "peak memory (MiB)"]  # fmt: skip
    body = [[r["mode"], r["decoder"], r["text_ms"], " / ".join(f"{s:.0f}" for s in r["step_ms"]), r["decode_ms"],
             r["total_ms"], r["total_cached_text_ms"], r["peak_memory_mb"]] for r in rows]  # fmt: skip
    title = f"engine: {engine.spec.name}, {size}x{size}, {steps} steps, {runtime.label}, {device}"
    bar_chart(Path(args.out) / "engine.png", title,
              [(f"{r['mode']} {r['decoder']}", _stages(r)) for r in rows])  # fmt: skip
    data = dict(arch=args.arch, model=args.model, recipe=recipe.name if recipe else None, size=size, steps=steps,
                guidance_scale=guidance, runtime=runtime.label, device=device, rows=rows)  # fmt: skip
    return _save(args, "engine", data, f"### {title}\n\n{table(header, body)}")


def _recipe(preset: str | None):
    """The sampling recipe of preset `preset` (None: LCM, the engine's default)."""
    if preset is None:
        return None
    from ..presets import PRESETS

    if preset not in PRESETS:
        raise SystemExit(f"Unknown preset {preset!r}; use one of {', '.join(PRESETS)}.")
    return PRESETS[preset].recipe


def _stages(row: dict) -> list[tuple[str, float]]:
    unet = sum(row["step_ms"])
    other = max(0.0, row["total_ms"] - row["text_ms"] - unet - row["decode_ms"])  # img2img encode, scheduler
    return [("text", row["text_ms"]), ("UNet", unet), ("decode", row["decode_ms"]), ("other", other)]


# ---------------------------------------------------------------------- compare
def cmd_compare(args) -> dict:
    from ..device import Runtime
    from ..request import Request

    size = args.size or (SMOKE_SIZE if args.smoke else 512)
    arch = args.arch
    live_rt = _runtime(args)
    blog_rt = Runtime("cpu", torch.float32, False)
    blog = core.make_engine(arch, blog_rt, taesd=False)
    live = core.make_engine(arch, live_rt, taesd=True)

    def blog_call():  # the LCM-LoRA blog's code path: a plain pipeline call, fp32, full VAE, 4 steps
        return blog.txt2img(prompt=core.PROMPT, num_inference_steps=4, guidance_scale=1.0, width=size,
                            height=size).images[0]  # fmt: skip

    request = Request(prompt=core.PROMPT, steps=4, width=size, height=size, decoder="tiny")

    def live_call():  # lcm-live's default CPU path; the prompt's embeddings are cached after the warm-up
        return live.generate(request)

    blog_call(), live_call()  # warm-up (also fills the embedding cache)
    times = {"blog": [], "lcm-live": []}
    for _ in range(args.rounds):  # A/B/A/B: both see the same machine load
        for name, call in (("blog", blog_call), ("lcm-live", live_call)):
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    fl_blog, fl_live = core.stage_flops(blog, size, size, "full"), core.stage_flops(live, size, size, "tiny")
    peak32 = core.machine_peak("cpu", torch.float32, seconds=args.peak_s, small=args.smoke)
    peak_live = core.machine_peak("cpu", live_rt.dtype, seconds=args.peak_s, small=args.smoke)
    flops_blog = fl_blog["text"] + 4 * fl_blog["unet_step"] + fl_blog["decode"]
    flops_live = 4 * fl_live["unet_step"] + fl_live["decode"]  # text cached
    results = {}
    for name, flops, peak in (("blog", flops_blog, peak32), ("lcm-live", flops_live, peak_live)):
        median = statistics.median(times[name])
        floor = flops / (peak["peak_gflops"] * 1e9)
        results[name] = dict(times_s=[round(t, 3) for t in times[name]], median_s=round(median, 3),
                             tflop=round(flops / 1e12, 3), peak=peak, floor_s=round(floor, 3),
                             x_floor=round(median / floor, 2))  # fmt: skip
    ratio = results["blog"]["median_s"] / results["lcm-live"]["median_s"]
    device = core.device_name("cpu")
    header = ["path", "runs (s)", "median (s)", "TFLOP", "achieved peak (GFLOP/s)", "floor (s)", "x floor"]
    labels = {"blog": "blog: fp32, full VAE, pipeline call", "lcm-live": f"lcm-live: {live_rt.label}, "
              "channels_last, TAESD, cached text"}  # fmt: skip
    body = [[labels[n], ", ".join(map(str, r["times_s"])), r["median_s"], r["tflop"], r["peak"]["peak_gflops"],
             r["floor_s"], r["x_floor"]] for n, r in results.items()]  # fmt: skip
    title = f"compare: {arch} {size}x{size}, 4 LCM steps, {device}"
    markdown = f"### {title}\n\n{table(header, body)}\n**lcm-live is {ratio:.2f}x faster than the blog path.**\n"
    bar_chart(Path(args.out) / "compare.png", title,
              [(labels[n], [("run", r["median_s"] * 1e3), ("floor", r["floor_s"] * 1e3)]) for n, r in results.items()],
              stacked=False)  # fmt: skip
    data = dict(arch=arch, size=size, device=device, rounds=args.rounds, ratio=round(ratio, 2), results=results,
                flops={"blog": fl_blog, "lcm-live": fl_live})  # fmt: skip
    return _save(args, "compare", data, markdown)


# ---------------------------------------------------------------------- live
def cmd_live(args) -> dict:
    from . import live

    step_s, decode_s, steps = args.step_ms / 1e3, args.decode_ms / 1e3, 4
    scale = args.scale
    model_s = steps * step_s + decode_s  # unscaled model-time T
    results = []
    from ..request import Request

    probe = live.CalibratedEngine(step_s / scale, decode_s / scale)
    measured = statistics.median(probe.generate(Request(steps=steps)).timings.total_ms / 1e3 for _ in range(3))
    for trace_name, events in live.traces(model_s, smoke=args.smoke).items():
        for policy in (live.LiveLoopPolicy, live.AlwaysLastPolicy):
            engine = live.CalibratedEngine(step_s / scale, decode_s / scale)
            row = live.replay(policy, engine, engine, events, scale, measured, steps, gap_s=model_s)
            results.append(dict(engine="calibrated", trace=trace_name, T_s=round(measured * scale, 3), **row))
    if args.real:
        results += _live_real(args, live)
    for engine_name in dict.fromkeys(r["engine"] for r in results):  # all bursts of each engine and policy
        for policy in ("LiveLoop", "always_last"):
            rows = [r for r in results if r["engine"] == engine_name and r["policy"] == policy and r["trace"] != "all"]
            results.append(dict(engine=engine_name, trace="all", T_s=rows[0]["T_s"], **live.pooled(rows)))
    goals = []
    for engine_name in dict.fromkeys(r["engine"] for r in results):
        ours, theirs = (next(r for r in results if r["engine"] == engine_name and r["trace"] == "all"
                             and r["policy"] == p) for p in ("LiveLoop", "always_last"))  # fmt: skip
        bound = 1.15 + 0.05 / ours["T_s"]
        p95, fewer = ours["latency_T_p95"], ours["steps_per_burst"] <= theirs["steps_per_burst"]
        goals.append(f"- {engine_name}: LiveLoop p95 {p95} T vs goal {bound:.2f} T (1.15 T + 50 ms): "
                     f"{'met' if p95 is not None and p95 <= bound else 'NOT met'}; UNet steps per burst "
                     f"{ours['steps_per_burst']} vs always_last {theirs['steps_per_burst']}: {'met' if fewer else 'NOT met'}; "
                     f"stale shown {ours['stale_shown']} / {theirs['stale_shown']}")  # fmt: skip
    header = ["engine", "trace", "policy", "bursts settled", "latency median (T)", "latency p95 (T)",
              "latency max (T)", "UNet steps per burst", "decodes per burst", "images shown", "stale shown"]  # fmt: skip
    body = [[r["engine"], r["trace"], r["policy"], f"{r['settled']}/{r['bursts']}", r["latency_T_median"],
             r["latency_T_p95"], r["latency_T_max"], r["steps_per_burst"], r["decodes_per_burst"], r["images_shown"], r["stale_shown"]]
            for r in results]  # fmt: skip
    title = (f"live: calibrated engine {args.step_ms:.0f} ms/step + {args.decode_ms:.0f} ms decode "
             f"(T = {model_s:.2f} s), time scale 1/{scale:g}")  # fmt: skip
    markdown = (f"### {title}\n\n{table(header, body)}\nT: one undisturbed generation (model-time).\n\n"
                + "\n".join(goals) + "\n")  # fmt: skip
    data = dict(
        step_ms=args.step_ms,
        decode_ms=args.decode_ms,
        scale=scale,
        model_s=model_s,
        measured_model_s=measured * scale,
        results=results,
    )
    return _save(args, "live", data, markdown)


def _live_real(args, live) -> list[dict]:
    from ..request import Request

    engine = core.make_engine("embedded", _runtime(args), taesd=False)
    size = SMOKE_SIZE if engine.native_size > 256 else engine.native_size
    counter = live.BlockCounter(engine)
    times = []
    for i in range(8):  # the first runs are slower (kernel selection): the median of the last 5
        start = time.perf_counter()
        engine.generate(Request(prompt=f"calibrate {i}", steps=4, width=size, height=size))
        times.append(time.perf_counter() - start)
    model_s = statistics.median(times[3:])
    rows = []
    for trace_name, events in live.traces(model_s, smoke=args.smoke).items():
        for policy in (live.LiveLoopPolicy, live.AlwaysLastPolicy):
            row = live.replay(policy, engine, counter, events, 1.0, model_s, 4, gap_s=model_s, size=size)
            name = f"{engine.spec.name} (T = {model_s * 1e3:.0f} ms)"
            rows.append(dict(engine=name, trace=trace_name, T_s=round(model_s, 4), **row))
    return rows


# ---------------------------------------------------------------------- table
def cmd_table(args) -> dict:
    arch = args.arch
    runtime = _runtime(args)
    engine = core.make_engine(arch, runtime, taesd=False, model=args.model)
    native = engine.native_size
    size = args.size or native
    from ..request import Request

    lcm = core.timed(lambda: engine.generate(Request(prompt=core.PROMPT, steps=4, width=size, height=size,
                                                     decoder="full")), args.repeats, runtime.device)  # fmt: skip
    # The LCM runs warmed the same weights up; on a CPU one standard run can take many minutes.
    standard_call = core.standard_call(engine, size, args.standard_steps)
    standard = core.timed(standard_call, args.repeats, runtime.device, warmup=runtime.device != "cpu")
    device = core.device_name(runtime.device)
    note = "" if size == native else f" (**size overridden**: the release's table uses {native}x{native})"
    header = ["hardware", "model", "size", "LCM-LoRA (4 steps)", f"standard ({args.standard_steps} steps, CFG 7.5)",
              "speed-up"]  # fmt: skip
    body = [[f"{device}, {runtime.label}", engine.spec.name, f"{size}x{size}", f"{lcm:.2f} s", f"{standard:.2f} s",
             f"{standard / lcm:.1f}x"]]  # fmt: skip
    markdown = f"### table: batch 1, full VAE decode{note}\n\n{table(header, body)}"
    data = dict(arch=arch, size=size, native_size=native, device=device, runtime=runtime.label, lcm4_s=round(lcm, 3),
                standard_s=round(standard, 3), standard_steps=args.standard_steps, speedup=round(standard / lcm, 2))  # fmt: skip
    return _save(args, "table", data, markdown)


# ---------------------------------------------------------------------- sweep
def cmd_sweep(args) -> dict:
    from PIL import Image, ImageDraw

    from ..request import Request

    engine = core.make_engine("embedded" if not args.smoke else SMOKE_ARCH, _runtime(args), taesd=False,
                              model=args.model)  # fmt: skip
    size = args.size or min(engine.native_size, 256)
    prompt = args.prompt or "a yellow triangle on a purple background"
    cells, rows = [], []
    for steps in range(1, 9):
        result = engine.generate(Request(prompt=prompt, steps=steps, seed=1337, width=size, height=size,
                                         decoder="full"))  # fmt: skip
        cells.append(result.image)
        rows.append(dict(steps=steps, total_ms=round(result.timings.total_ms, 1)))
    label_h, cell_px = 16, max(size, 128)  # small images are shown enlarged, pixels kept sharp
    grid = Image.new("RGB", (cell_px * 8, cell_px + label_h), "white")
    draw = ImageDraw.Draw(grid)
    for i, cell in enumerate(cells):
        grid.paste(cell.resize((cell_px, cell_px), Image.Resampling.NEAREST), (i * cell_px, label_h))
        draw.text((i * cell_px + 4, 2), f"{i + 1} step{'s' if i else ''}", fill="black")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid.save(out / "sweep.png")
    header = ["steps", "total (ms)"]
    markdown = (f"### sweep: {engine.spec.name}, '{prompt}', seed 1337, {size}x{size}\n\n"
                f"{table(header, [[r['steps'], r['total_ms']] for r in rows])}\nGrid: {out / 'sweep.png'}\n")  # fmt: skip
    return _save(args, "sweep", dict(model=engine.spec.name, prompt=prompt, size=size, seed=1337, rows=rows,
                                     image=str(out / "sweep.png")), markdown)  # fmt: skip


# ---------------------------------------------------------------------- serve
def cmd_serve(args) -> dict:
    from functools import partial

    from . import live, serve

    engine = core.make_engine(args.arch, _runtime(args), taesd=args.arch not in ("embedded", SMOKE_ARCH))
    counts = [int(n) for n in args.streams.split(",") if n]
    modes = [("on", args.max_batch), ("off", 1)]
    stream_rows = []
    for count in counts:
        for mode, max_batch in modes:  # on and off back to back: the same machine load
            row = serve.streams(engine, count, args.seconds, max_batch, args.frame_interval, warmup_s=args.warmup)
            stream_rows.append(dict(batching=mode, **row))
            print(f"streams {count} batching {mode}: {row}", flush=True)
    typing_rows = []
    for mode, max_batch in modes if args.typists else []:
        row = serve.typists(engine, args.typists, max_batch, text=serve.TYPED[: 8 if args.smoke else 28])
        typing_rows.append(dict(batching=mode, **row))
        print(f"typists batching {mode}: {row}", flush=True)
    app_rows = []
    for count in [int(n) for n in args.app_streams.split(",") if n]:
        for mode, max_batch in modes:
            row = serve.through_app(count, args.seconds, max_batch, warmup_s=max(args.warmup, 2.0), threads=args.threads)
            app_rows.append(dict(batching=mode, **row))
            print(f"through the app, {count} streams, batching {mode}: {row}", flush=True)
    model_s = serve.model_time(engine)
    alone_rows = []
    # bursts of 2 words at 8 keys/s, each followed by a pause: one latency per burst, the median over them
    text = core.PROMPT[: 20 if args.smoke else 75]
    events = live.bursts_and_pauses(text, 8, max(4 * model_s, 0.5), words_per_burst=1 if args.smoke else 2)
    for mode, max_batch in modes:
        policy = partial(live.LiveLoopPolicy, max_batch=max_batch)
        policy.name = f"LiveLoop, batching {mode}"
        counter = live.BlockCounter(engine)
        row = live.replay(policy, engine, counter, events, 1.0, model_s, 4, gap_s=model_s)
        counter.remove()
        alone_rows.append(dict(batching=mode, T_s=round(model_s, 4), **row))
    one = {r["batching"]: r["fps"] for r in stream_rows if counts and r["streams"] == counts[0]}
    header = ["streams", "batching", "frames/s (all)", f"x {counts[0] if counts else 1} stream(s)", "per session min / max",
              "latency p50 / p95 (ms)", "mean batch"]  # fmt: skip
    body = [[r["streams"], r["batching"], r["fps"], round(r["fps"] / one[r["batching"]], 2) if one.get(r["batching"])
             else "", f"{r['fps_min']} / {r['fps_max']}", f"{r['latency_p50_ms']} / {r['latency_p95_ms']}",
             r["mean_batch"]] for r in stream_rows]  # fmt: skip
    typing_header = ["typists + webcam", "batching", "last key -> final image p50 / p95 (s)", "max (s)",
                     "finals correct", "stale shown", "mean batch"]  # fmt: skip
    typing_body = [[r["typists"], r["batching"], f"{r['latency_p50_s']} / {r['latency_p95_s']}", r["latency_max_s"],
                    f"{r['finals_correct']}/{r['typists']}", r["stale_shown"], r["mean_batch"]]
                   for r in typing_rows]  # fmt: skip
    app_one = {r["batching"]: r["fps"] for r in app_rows if r["streams"] == min(r["streams"] for r in app_rows)}
    app_header = ["streams through the app", "batching", "frames/s (all)", "x fewest streams", "per session min / max",
                  "latency p50 / p95 (ms)"]  # fmt: skip
    app_body = [[r["streams"], r["batching"], r["fps"], round(r["fps"] / app_one[r["batching"]], 2)
                 if app_one.get(r["batching"]) else "", f"{r['fps_min']} / {r['fps_max']}",
                 f"{r['latency_p50_ms']} / {r['latency_p95_ms']}"] for r in app_rows]  # fmt: skip
    alone_header = ["one session typing", "batching", "bursts", "last key -> final image median / p95 (T)",
                    "stale shown"]  # fmt: skip
    alone_body = [[f"T = {r['T_s'] * 1e3:.0f} ms", r["batching"], r["settled"], f"{r['latency_T_median']} / {r['latency_T_p95']}",
                   r["stale_shown"]] for r in alone_rows]  # fmt: skip
    device = core.device_name(engine.runtime.device)
    title = f"serve: {engine.spec.name}, {engine.runtime.label}, {device}, max batch {args.max_batch}"
    markdown = (f"### {title}\n\nWebcam-style streams (img2img, 2 steps at strength 0.5, a frame every "
                f"{args.frame_interval * 1e3:g} ms, newest kept; {args.seconds:g} s each):\n\n{table(header, body)}\n"
                f"Through the app (`python app.py --preset demo`, its own process; page-like raw-HTTP sessions calling "
                f"/webcam_frame back to back, one address each):\n\n{table(app_header, app_body)}\n"
                f"{table(typing_header, typing_body)}\n{table(alone_header, alone_body)}")  # fmt: skip
    data = dict(model=engine.spec.name, runtime=engine.runtime.label, device=device, max_batch=args.max_batch,
                seconds=args.seconds, streams=stream_rows, app=app_rows, typists=typing_rows, alone=alone_rows)  # fmt: skip
    return _save(args, "serve", data, markdown)


# ---------------------------------------------------------------------- replicas
def cmd_replicas(args) -> dict:
    from . import scaleout as serve

    counts = sorted({int(n) for n in str(args.replicas).split(",")})
    args.size = args.size or SMOKE_SIZE  # the embedded model's own size
    rows = [dict(mode="one process (no Ray)", replicas=None, round=1,
                 **serve.in_process(args, args.streams))] if args.in_process else []  # fmt: skip
    rows += serve.on_replicas(args, counts, args.streams)
    summary = serve.summary(rows)
    device = core.device_name(args.device if args.device != "auto" else "cpu")
    header = ["mode", "rounds", "frames/s (median)", "x 1 replica", "latency p50 (ms)", "latency p95 (ms)",
              "frames/s per round"]  # fmt: skip
    body = [[r["mode"], r["rounds"], r["fps"], r["x_one_replica"], r["latency_p50_ms"], r["latency_p95_ms"],
             ", ".join(map(str, r["fps_per_round"]))] for r in summary]  # fmt: skip
    threads = max(1, int(args.replica_cpus))
    title = (f"replicas: {args.streams} streams, embedded model {args.size}x{args.size}, {args.steps} steps, "
             f"{threads} thread(s) per replica, {device}")  # fmt: skip
    markdown = f"### {title}\n\n{table(header, body)}"
    data = dict(streams=args.streams, size=args.size, steps=args.steps, seconds=args.seconds, rounds=args.rounds,
                replica_cpus=args.replica_cpus, device=device, summary=summary, rows=rows)  # fmt: skip
    return _save(args, "replicas", data, markdown)


# ---------------------------------------------------------------------- transport
def cmd_transport(args) -> dict:
    from . import transport

    args.size = args.size or 512
    if args.serve is not None:
        transport.serve(args.serve, args.step_ms, args.size, args.quality, args.host)
        return {}
    meta, rows = transport.run(args)
    header = ["path", "clients", "frames/s (all)", "per client min / max", "frame -> image p50 / p95 (ms)",
              "server CPU (ms/frame)", "KiB down/frame"]  # fmt: skip
    body = [[r["path"], r["clients"], r["fps"], f"{r['fps_min']} / {r['fps_max']}",
             f"{r['latency_p50_ms']} / {r['latency_p95_ms']}", r["cpu_ms_per_frame"], r["kib_down"]]
            for r in rows]  # fmt: skip
    title = (f"transport: simulated engine {args.step_ms:g} ms a UNet step, {args.size}x{args.size}, img2img "
             f"{args.steps} steps at strength {args.strength}, JPEG quality {args.quality}, clients at most "
             f"{args.client_fps:g} frames/s")  # fmt: skip
    markdown = (f"### {title}\n\n{table(header, body)}\nThe app (`python -m lcm_live.bench transport --serve PORT`) "
                "runs in its own process; its CPU time over the measured window is divided by the frames delivered. "
                "Latency: frame sent (captured, for Chromium) -> its image received (shown); the Gradio stream "
                "cannot tell which frame an image answers.\n")  # fmt: skip
    data = dict(step_ms=args.step_ms, size=args.size, steps=args.steps, strength=args.strength,
                quality=args.quality, seconds=args.seconds, client_fps=args.client_fps, rows=rows, **meta)  # fmt: skip
    return _save(args, "transport", data, markdown)


# ---------------------------------------------------------------------- CLI
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lcm_live.bench", description="lcm-live benchmarks")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", default="bench-results", help="folder for JSON, markdown and PNG results")
    common.add_argument("--smoke", action="store_true", help="tiny architecture, small sizes: a few seconds")
    common.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    common.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    common.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"])
    common.add_argument("--size", type=int, default=None, help="image side (default: the architecture's own)")
    common.add_argument("--model", default=None, help="a real model: hub id or diffusers folder")
    common.add_argument("--repeats", type=int, default=2)
    sub = p.add_subparsers(dest="command", required=True)
    archs = ["sd15", "sdxl", "tiny-sd15", "tiny-sdxl", "embedded"]
    e = sub.add_parser("engine", parents=[common], help="per-stage times, txt2img and img2img")
    e.add_argument("--arch", default="sd15", choices=archs)
    e.add_argument("--steps", type=int, default=None, help="default: the recipe's steps (LCM: 4)")
    e.add_argument("--recipe", default=None, metavar="PRESET",
                   help="sample as this preset does (its scheduler, settings, steps, guidance); weights stay random")
    e.add_argument("--strength", type=float, default=0.5)
    e.add_argument("--decoder", default="both", choices=["both", "tiny", "full"])
    c = sub.add_parser("compare", parents=[common], help="the LCM-LoRA blog's code path vs lcm-live's, A/B/A/B")
    c.add_argument("--arch", default="sd15", choices=archs)
    c.add_argument("--rounds", type=int, default=2)
    c.add_argument("--peak-s", type=float, default=2.0, help="seconds per achieved-peak measurement")
    lv = sub.add_parser("live", parents=[common], help="typing traces: LiveLoop vs always_last")
    lv.add_argument("--step-ms", type=float, default=1700.0, help="calibrated UNet step (SD 1.5 512 bf16 here)")
    lv.add_argument("--decode-ms", type=float, default=330.0, help="calibrated TAESD decode")
    lv.add_argument("--scale", type=float, default=40.0, help="divide all times by this to run faster")
    lv.add_argument("--real", action=argparse.BooleanOptionalAction, default=True,
                    help="also replay against the embedded (or a tiny) real model")  # fmt: skip
    t = sub.add_parser("table", parents=[common], help="LCM-LoRA 4 steps vs standard 25 steps, batch 1")
    t.add_argument("--arch", default="sdxl", choices=archs)
    t.add_argument("--standard-steps", type=int, default=25)
    sv = sub.add_parser("serve", parents=[common], help="many sessions on one engine: batching on vs off")
    sv.add_argument("--arch", default="embedded", choices=archs)
    sv.add_argument("--streams", default="1,2,4,8,16", help="numbers of webcam-style streams")
    sv.add_argument("--seconds", type=float, default=6.0, help="measured seconds per stream case")
    sv.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring, per case")
    sv.add_argument("--frame-interval", type=float, default=0.02, help="seconds between a stream's frames")
    sv.add_argument("--app-streams", default="1,8", help="stream counts through the launched app ('' skips it)")
    sv.add_argument("--typists", type=int, default=20)
    sv.add_argument("--max-batch", type=int, default=8, help="rows per UNet call with batching on")
    s = sub.add_parser("sweep", parents=[common], help="1..8 steps, seed 1337, as one grid image")
    s.add_argument("--prompt", default=None)
    rp = sub.add_parser("replicas", parents=[common], help="N streams on 1, 2, ... Ray Serve replicas (ray[serve])")
    rp.add_argument("--replicas", default="1,2", help="replica counts to compare, e.g. 1,2")
    rp.add_argument("--streams", type=int, default=8, help="sessions, each asking for its next frame at once")
    rp.add_argument("--seconds", type=float, default=20.0, help="timed streaming per round")
    rp.add_argument("--warmup-s", type=float, default=3.0)
    rp.add_argument("--rounds", type=int, default=2, help="rounds; replica counts alternate within each")
    rp.add_argument("--steps", type=int, default=4)
    rp.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs (and torch threads) per replica")
    rp.add_argument("--in-process", action=argparse.BooleanOptionalAction, default=True,
                    help="also the same streams in this process, without Ray")  # fmt: skip
    tr = sub.add_parser("transport", parents=[common],
                        help="frames through the launched app: Gradio's queue vs the live socket, clients and Chromium")  # fmt: skip
    tr.add_argument("--serve", type=int, default=None, metavar="PORT",
                    help="only start the simulated app on PORT and leave it running")  # fmt: skip
    tr.add_argument("--host", default=None, help="with --serve: address to listen on")
    tr.add_argument("--step-ms", type=float, default=0.0, help="simulated UNet step (0: a free engine)")
    tr.add_argument("--steps", type=int, default=2, help="img2img steps per frame")
    tr.add_argument("--strength", type=float, default=0.5, help="img2img strength (UNet steps: steps x strength)")
    tr.add_argument("--quality", type=int, default=80, help="the app's --live-quality")
    tr.add_argument("--clients", default="1,8", help="numbers of raw clients per path")
    tr.add_argument("--client-fps", type=float, default=30.0, help="most frames a socket client sends a second")
    tr.add_argument("--seconds", type=float, default=6.0, help="measured seconds per case")
    tr.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring, per case")
    tr.add_argument("--browser", action=argparse.BooleanOptionalAction, default=True,
                    help="also one Chromium page with the fake camera, old and new path")  # fmt: skip
    return p


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.smoke:
        if hasattr(args, "arch"):
            args.arch = SMOKE_ARCH if args.arch != "embedded" else "embedded"
        args.size = args.size or SMOKE_SIZE
        args.repeats = 1
        for name, value in (("rounds", 1), ("peak_s", 0.1), ("scale", 10.0), ("standard_steps", 3), ("seconds", 2.0),
                            ("warmup_s", 0.5)):
            if hasattr(args, name):
                setattr(args, name, value)
        if args.command == "live":
            args.step_ms, args.decode_ms = 100.0, 20.0
        if args.command == "serve":
            args.streams, args.seconds, args.warmup, args.typists, args.app_streams = "1,2", 1.0, 0.3, 2, ""
        if args.command == "transport":
            args.size, args.clients, args.seconds, args.warmup, args.browser = 128, "1", 1.0, 0.5, False
    with core.threads(args.threads), torch.inference_mode(False):
        return {"engine": cmd_engine, "compare": cmd_compare, "live": cmd_live, "table": cmd_table,
                "sweep": cmd_sweep, "serve": cmd_serve, "replicas": cmd_replicas,
                "transport": cmd_transport}[args.command](args)  # fmt: skip


if __name__ == "__main__":
    main()
