"""Evaluate the exported demo model: judged prompt-following, step sweep, speed; writes docs."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from . import judge, world


SWEEP_PROMPTS = [
    "a large red circle in the center, blue background",
    "a small yellow square on the left, black background",
    "a large white triangle at the bottom, green background",
    "a small cyan circle on the right, purple background",
]


def load(model: str | Path, lcm: bool, device: str = "cpu", dtype=torch.float32):
    """The app's loading path: base pipeline, plus the fused LCM-LoRA and LCMScheduler if lcm."""
    from diffusers import LCMScheduler, StableDiffusionPipeline

    model = Path(model)
    pipe = StableDiffusionPipeline.from_pretrained(model / "base", dtype=dtype).to(device)
    if lcm:
        pipe.load_lora_weights(model / "lcm-lora")
        pipe.fuse_lora()
        pipe.unload_lora_weights()
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(
    pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float, size: int = 64, chunk: int = 100
) -> np.ndarray:
    """(n, size, size, 3) uint8 images, one seeded generator per prompt."""
    out = []
    dev = pipe.device
    for i in range(0, len(prompts), chunk):
        gens = [torch.Generator(dev).manual_seed(s) for s in seeds[i : i + chunk]]
        with torch.no_grad():
            img = pipe(
                prompts[i : i + chunk],
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=gens,
                height=size,
                width=size,
                output_type="np",
            ).images
        out.append((np.clip(img, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(out)


def grid(images: np.ndarray, cols: int = 8) -> np.ndarray:
    """Tile (n, h, w, 3) images into one (rows*h, cols*w, 3) picture."""
    n = len(images) // cols * cols
    rows = [np.concatenate(list(images[i : i + cols]), axis=1) for i in range(0, n, cols)]
    return np.concatenate(rows, axis=0)


def save_png(arr: np.ndarray, path: Path, scale: int = 2) -> None:
    """Save a uint8 array, upscaled with nearest neighbour."""
    from PIL import Image

    Image.fromarray(arr).resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.NEAREST).save(path, optimize=True)


def judged(images: np.ndarray, attrs: list[dict]) -> dict:
    """Rates of all-correct and per attribute."""
    return judge.rates([judge.score(i, a) for i, a in zip(images, attrs)])


def measure_speed(model, threads: int, runs: int = 20) -> list[dict]:
    """End-to-end txt2img images/s, batch 1, fused LCM-LoRA, 4 steps (fp32/bf16, channels_last)."""
    torch.set_num_threads(threads)
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        pipe = load(model, lcm=True, dtype=dtype)
        for cl in (False, True):
            if cl:
                pipe.unet.to(memory_format=torch.channels_last)
                pipe.vae.to(memory_format=torch.channels_last)
            for size in (64, 128):
                for i in range(3 + runs):
                    if i == 3:
                        t0 = time.perf_counter()
                    pipe(
                        "a small red circle on the left, blue background",
                        num_inference_steps=4,
                        guidance_scale=1.0,
                        height=size,
                        width=size,
                        generator=torch.Generator().manual_seed(i),
                    ).images[0]
                dt = (time.perf_counter() - t0) / runs
                out.append(
                    {
                        "dtype": str(dtype).split(".")[-1],
                        "channels_last": cl,
                        "size": size,
                        "images_per_s": round(1 / dt, 1),
                        "ms": round(1000 * dt, 1),
                        "threads": threads,
                        "load_avg_1min": round(os.getloadavg()[0], 2),
                    }
                )
                print("speed", out[-1], flush=True)
    return out


def evaluate(
    model: str | Path,
    docs: str | Path,
    n: int = 200,
    device: str = "cpu",
    speed: bool = True,
    threads: int = 1,
    guidances=(3.0, 5.0, 7.5),
    lcm_only: bool = False,
) -> dict:
    """Run every method on the fixed prompt set; write docs/demo-model.md tables, JSON and grids."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    docs, images = Path(docs), Path(docs) / "images"
    images.mkdir(parents=True, exist_ok=True)
    items = world.eval_set(n)
    prompts, seeds, attrs = [p for p, _, _ in items], [s for _, s, _ in items], [a for _, _, a in items]
    real = world.render_batch(attrs, np.random.default_rng(0))
    results = {"n": n, "device": device, "judge_on_real": judged(real, attrs), "methods": {}}
    t0 = time.time()

    def run(name, pipe, steps, guidance):
        t = time.time()
        imgs = generate(pipe, prompts, seeds, steps, guidance)
        r = judged(imgs, attrs)
        r.update(steps=steps, guidance=guidance, seconds=round(time.time() - t, 1))
        results["methods"][name] = r
        save_png(grid(imgs[:32]), images / f"demo-grid-{name}.png")
        print(f"eval {name}: all {r['all']:.3f} {r}", flush=True)
        return r

    old = images / "demo-eval.json"
    if lcm_only and old.exists():  # keep the teacher rows of an earlier run (the teacher did not change)
        prev = json.loads(old.read_text())
        results["methods"] = {k: v for k, v in prev["methods"].items() if k.startswith("teacher")}
        results["best_guidance"] = prev["best_guidance"]
    else:
        pipe = load(model, lcm=False, device=device)
        base_cfg = pipe.scheduler.config
        pipe.scheduler = DDIMScheduler.from_config(base_cfg)
        best = max(guidances, key=lambda g: run(f"teacher-ddim25-g{g:g}", pipe, 25, g)["all"])
        results["best_guidance"] = best
        run("teacher-ddim50", pipe, 50, best)
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(base_cfg)
        run("teacher-dpm25", pipe, 25, best)
        run("teacher-dpm50", pipe, 50, best)
        results["methods"]["teacher-ddim25"] = results["methods"][f"teacher-ddim25-g{best:g}"]
    lcm = load(model, lcm=True, device=device)
    for steps in (1, 2, 4, 8):
        run(f"lcm{steps}", lcm, steps, 1.0)
    # step sweep: rows = prompts, columns = steps 1..8, seed 1337
    rows = [generate(lcm, SWEEP_PROMPTS, [1337] * len(SWEEP_PROMPTS), s, 1.0) for s in range(1, 9)]
    save_png(grid(np.stack(rows, 1).reshape(-1, 64, 64, 3), cols=8), images / "demo-steps.png", scale=3)
    results["eval_seconds"] = round(time.time() - t0, 1)
    if speed:
        results["speed"] = [row for t in sorted({1, 2, threads}) for row in measure_speed(model, t)]
        torch.set_num_threads(threads)
    old.write_text(json.dumps(results, indent=1))
    write_doc(results, docs / "demo-model.md")
    return results


def write_doc(res: dict, path: Path) -> None:
    """The results section of docs/demo-model.md (between markers, the rest of the file is kept)."""
    cols = ["all", "color", "background", "shape", "size", "position"]
    lines = [
        f"Fixed set: {res['n']} (prompt, seed) pairs; judge on the real drawings: "
        f"{res['judge_on_real']['all']:.1%} all-correct. Device: {res['device']}.",
        "",
        "| method | steps | guidance | " + " | ".join(cols) + " |",
        "|---|---|---|" + "---|" * len(cols),
    ]
    for name, r in res["methods"].items():
        if name == "teacher-ddim25":
            continue
        lines.append(
            f"| {name} | {r['steps']} | {r['guidance']:g} | " + " | ".join(f"{r[c]:.1%}" for c in cols) + " |"
        )
    t25 = res["methods"]["teacher-ddim25"]["all"]
    l4 = res["methods"]["lcm4"]["all"]
    lines += [
        "",
        f"LCM-LoRA 4 steps / teacher DDIM 25 steps (all-correct): {l4 / max(t25, 1e-9):.1%} "
        f"(teacher best guidance {res['best_guidance']:g}).",
    ]
    if "speed" in res:
        lines += [
            "",
            "Speed: txt2img with the fused LCM-LoRA, 4 steps, batch 1, end to end (prompt encoding, UNet, VAE decode,"
            " PIL image) on this 2-core CPU shared with other jobs; the 1-minute load average shows how busy it was.",
            "",
            "| dtype | channels_last | size | images/s | ms/image | torch threads | load avg |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {s['dtype']} | {s['channels_last']} | {s['size']} | {s['images_per_s']} | {s['ms']} | {s['threads']} |"
            f" {s.get('load_avg_1min', '')} |"
            for s in res["speed"]
        ]
    block = "\n".join(lines)
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    text = path.read_text() if path.exists() else f"# Demo model\n\n{start}\n{end}\n"
    if start not in text:
        text += f"\n{start}\n{end}\n"
    head, rest = text.split(start, 1)
    text = head + start + "\n" + block + "\n" + end + rest.split(end, 1)[1]
    path.write_text(text)
    print(f"wrote {path}; cpu count {os.cpu_count()}")
