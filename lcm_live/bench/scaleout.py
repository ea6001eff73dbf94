"""Ray Serve scale-out (`python -m lcm_live.bench replicas`): N streams against 1, 2, ... replicas in one run, with the same streams in one process.

Each stream is a session that asks for its next frame as soon as the last one arrives (a webcam at full speed),
so the figures are the serving tier's capacity: aggregate frames per second and per-frame latency. Replica
counts alternate round by round (1, 2, 1, 2, ...), so each sees the same machine load; each round's figures
come from `seconds` of streaming after a warm-up.
"""

from __future__ import annotations

import statistics
import threading
import time

from ..live import SUPERSEDED, LiveLoop
from ..request import Request


BENCH_APP = "lcm-live-bench"  # its own application: a page on the same cluster keeps serving


def stream(loop, streams: int, seconds: float, warmup_s: float, size: int, steps: int, tag: str = "bench") -> dict:
    """`streams` closed-loop sessions (`tag`0, `tag`1, ...) through `loop`; frames/s and latency of the timed part."""
    stop, start_at = threading.Event(), time.perf_counter() + warmup_s
    latencies: list[list[float]] = [[] for _ in range(streams)]
    lost: list[int] = [0] * streams
    replicas: list[set] = [set() for _ in range(streams)]

    def session(index: int):
        frame = 0
        while not stop.is_set():
            request = Request(prompt=f"stream {index}: a red circle on white", steps=steps, seed=frame, width=size,
                              height=size)  # fmt: skip
            sent = time.perf_counter()
            outcome = loop.run_sync(f"{tag}{index}:webcam", request, timeout=300)
            done = time.perf_counter()
            frame += 1
            if outcome == SUPERSEDED:
                lost[index] += 1
            elif sent >= start_at and not stop.is_set():
                latencies[index].append(done - sent)
                replicas[index].add(outcome.result.params.get("replica"))

    threads = [threading.Thread(target=session, args=(i,), daemon=True) for i in range(streams)]
    for thread in threads:
        thread.start()
    time.sleep(warmup_s + seconds)
    stop.set()
    for thread in threads:
        thread.join(timeout=120)
    for index in range(streams):
        loop.forget(f"{tag}{index}:")  # these sessions are over: they no longer count on their replicas
    every = sorted(t for per in latencies for t in per)
    return dict(
        frames=len(every),
        fps=round(len(every) / seconds, 2),
        latency_p50_ms=round(1e3 * statistics.median(every), 1) if every else None,
        latency_p95_ms=round(1e3 * every[int(0.95 * (len(every) - 1))], 1) if every else None,
        per_stream_fps=[round(len(per) / seconds, 2) for per in latencies],
        superseded=sum(lost),
        replicas_per_stream=[len(r) for r in replicas],
    )


def in_process(args, streams: int) -> dict:
    """The same streams on one engine and live loop in this process (1 thread): the single-process mode."""
    import torch

    from ..device import pick_runtime
    from ..models import ModelManager
    from ..presets import PRESETS

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(args.replica_cpus)))
    runtime = pick_runtime(args.device, args.dtype)
    loop = LiveLoop(ModelManager(runtime, auto_dtype=args.dtype == "auto").load_now(PRESETS["demo"]))
    try:
        return stream(loop, streams, args.seconds, args.warmup_s, args.size, args.steps)
    finally:
        loop.close()
        torch.set_num_threads(before)


def on_replicas(args, counts: list[int], streams: int) -> list[dict]:
    """Rounds over `counts` replicas of one deployment (rescaled in place), alternating; one row per round."""
    import ray
    from ray import serve

    from .. import replicas
    from ..presets import PRESETS
    from ..settings import Settings

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=max(counts) * args.replica_cpus, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        for round_index in range(args.rounds):
            for count in counts:
                settings = Settings(preset="demo", offline=True, replicas=str(count), replica_cpus=args.replica_cpus,
                                    device=args.device, dtype=args.dtype)  # fmt: skip
                handle = serve.run(replicas.application(settings, PRESETS["demo"]), name=BENCH_APP, route_prefix=None)
                info = handle.info.remote().result(timeout_s=600)
                _wait_routed(replicas, count)
                loop = replicas.RemoteLoop(handle, info)
                try:
                    tag = f"r{round_index}n{count}s"  # new sessions: they spread over this round's replicas
                    row = stream(loop, streams, args.seconds, args.warmup_s, args.size, args.steps, tag)
                finally:
                    loop.close()
                rows.append(dict(mode=f"Ray Serve, {count} replica{'s' * (count > 1)}", replicas=count,
                                 round=round_index + 1, **row))  # fmt: skip
    finally:
        serve.delete(BENCH_APP)
        if started:
            serve.shutdown()
            ray.shutdown()
    return rows


def _wait_routed(replicas, count: int, timeout: float = 120.0) -> None:
    """Until this process's router knows `count` replicas (it hears of new ones shortly after Serve starts them)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        router = replicas._ROUTERS.get(BENCH_APP)
        if router is not None and len(router.curr_replicas) == count:
            return
        time.sleep(0.2)
    raise TimeoutError(f"the router did not see {count} replicas within {timeout:.0f} s")


def summary(rows: list[dict]) -> list[dict]:
    """Per mode: the median over rounds of fps and p95 (rounds alternate, so each mode saw the same load)."""
    out = []
    for mode in dict.fromkeys(r["mode"] for r in rows):
        mine = [r for r in rows if r["mode"] == mode]
        fps = statistics.median(r["fps"] for r in mine)
        p95 = statistics.median(r["latency_p95_ms"] for r in mine if r["latency_p95_ms"] is not None)
        p50 = statistics.median(r["latency_p50_ms"] for r in mine if r["latency_p50_ms"] is not None)
        out.append(dict(mode=mode, replicas=mine[0].get("replicas"), rounds=len(mine), fps=round(fps, 2),
                        latency_p50_ms=round(p50, 1), latency_p95_ms=round(p95, 1),
                        fps_per_round=[r["fps"] for r in mine]))  # fmt: skip
    one = next((r["fps"] for r in out if r["replicas"] == 1), None)
    for row in out:
        row["x_one_replica"] = round(row["fps"] / one, 2) if one and row["replicas"] else None
    return out
