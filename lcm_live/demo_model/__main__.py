"""CLI: python -m lcm_live.demo_model {train,export,evaluate,train-control,evaluate-control} ..."""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time

import torch


def main(argv=None) -> None:
    """Parse arguments and run one command."""
    p = argparse.ArgumentParser(prog="python -m lcm_live.demo_model")
    sub = p.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train VAE, teacher, LCM-LoRA and export (resumable)")
    tr.add_argument("--out", default="assets/demo-model")
    tr.add_argument("--workdir", default="runs/demo-model")
    tr.add_argument("--smoke", action="store_true", help="a few steps of everything in a temp dir")
    tr.add_argument("--threads", type=int, default=1)
    tr.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override TrainConfig fields")
    ex = sub.add_parser("export", help="export the workdir's checkpoints")
    ex.add_argument("--out", default="assets/demo-model")
    ex.add_argument("--workdir", default="runs/demo-model")
    ev = sub.add_parser("evaluate", help="quality table, speed, grids")
    ev.add_argument("--model", default="assets/demo-model")
    ev.add_argument("--docs", default="docs")
    ev.add_argument("--n", type=int, default=200)
    ev.add_argument("--threads", type=int, default=1)
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--skip-speed", action="store_true")
    ev.add_argument("--lcm-only", action="store_true", help="reuse the teacher rows of docs' demo-eval.json")
    tc = sub.add_parser("train-control", help="train the scribble ControlNet for the embedded model (resumable)")
    tc.add_argument("--model", default="assets/demo-model")
    tc.add_argument("--workdir", default="runs/demo-control")
    tc.add_argument("--out", default=None, help="default: MODEL/controlnet-scribble")
    tc.add_argument("--threads", type=int, default=1)
    tc.add_argument("--minutes", type=float, default=22.0)
    tc.add_argument("--steps", type=int, default=100_000)
    ec = sub.add_parser("evaluate-control", help="the scribble control's IoU with the drawing, on and off")
    ec.add_argument("--model", default="assets/demo-model")
    ec.add_argument("--n", type=int, default=40)
    ec.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)

    if a.cmd == "train":
        from .export import export
        from .train import TrainConfig, train_all

        torch.set_num_threads(a.threads)
        cfg = TrainConfig.smoke() if a.smoke else TrainConfig()
        for kv in a.set:
            k, v = kv.split("=", 1)
            old = getattr(cfg, k)
            val = tuple(float(x) for x in v.split(",")) if isinstance(old, tuple) else type(old)(v)
            cfg = dataclasses.replace(cfg, **{k: val})
        t0 = time.time()
        if a.smoke:
            tmp = tempfile.mkdtemp(prefix="demo_smoke_")
            a.workdir, a.out = f"{tmp}/work", f"{tmp}/out"
        trained = train_all(cfg, a.workdir)
        export(trained, a.out)
        print(f"train: done in {time.time() - t0:.0f}s -> {a.out}")
    elif a.cmd == "train-control":
        from .control import ControlTrainConfig, train_control

        torch.set_num_threads(a.threads)
        out = train_control(a.model, a.workdir, a.out, ControlTrainConfig(minutes=a.minutes, steps=a.steps))
        print(f"train-control: exported to {out}")
    elif a.cmd == "evaluate-control":
        from ..device import pick_runtime
        from ..engine import Engine
        from ..presets import ModelSpec
        from .control import evaluate_control

        torch.set_num_threads(a.threads)
        spec = ModelSpec(f"{a.model}/base", f"{a.model}/lcm-lora", controls=(("scribble",
                                                                             f"{a.model}/controlnet-scribble"),))  # fmt: skip
        print(evaluate_control(Engine.load(spec, pick_runtime("cpu", "float32"), warmup=False), n=a.n))
    elif a.cmd == "export":
        from .export import export, load_workdir

        export(load_workdir(a.workdir), a.out)
    else:
        from .evaluate import evaluate

        torch.set_num_threads(a.threads)
        evaluate(
            a.model, a.docs, n=a.n, device=a.device, speed=not a.skip_speed, threads=a.threads, lcm_only=a.lcm_only
        )


if __name__ == "__main__":
    main()
