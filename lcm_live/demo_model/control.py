"""A scribble ControlNet for the embedded model: outlines drawn from the shapes world's geometry -> the scene.

Input: a scribbled outline (white strokes on black) of each shape, drawn from its geometry with jitter in place,
size and stroke width; target: the scene. The shapes go anywhere (not only the world's five places), so a drawing
decides where the shape is and the prompt what it is. Trained on the base UNet with its LCM-LoRA fused, on the
latent the LCM step predicts (x0), at the timesteps the 1- to 8-step LCM schedules use. Seeded and resumable.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import world
from .judge import flood, read


@dataclass(frozen=True)
class ControlTrainConfig:
    seed: int = 0
    batch: int = 24
    lr: float = 3e-4
    steps: int = 100_000  # the time limit usually ends it first
    minutes: float = 22.0
    free_placement: float = 0.6  # share of scenes placed anywhere (the rest at the world's five places)
    caption_drop: float = 0.05  # empty caption: the control alone must carry the layout
    ckpt_seconds: float = 120.0
    cond_channels: tuple[int, ...] = (16, 32, 64)  # two stride-2 convs: 64 px -> the 16x16 latent


# ---------------------------------------------------------------------------------------------- geometry
def shape_masks(kinds: np.ndarray, cx: np.ndarray, cy: np.ndarray, r: np.ndarray, size: int = world.SIZE) -> np.ndarray:
    """(n, size, size) bool masks of circles (0), squares (1) and upright triangles (2), as world.render draws them."""
    cx, cy, r = (np.asarray(v, np.float32)[:, None, None] for v in (cx, cy, r))
    yy, xx = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5)[:, None]
    dx, dy = xx - cx, yy - cy
    circle = dx * dx + dy * dy <= r * r
    square = (np.abs(dx) <= 0.9 * r) & (np.abs(dy) <= 0.9 * r)
    t = (dy + r) / (2 * r)
    triangle = (t >= 0) & (t <= 1) & (np.abs(dx) <= t * r)
    kinds = np.asarray(kinds)[:, None, None]
    return np.where(kinds == 0, circle, np.where(kinds == 1, square, triangle))


def outline(masks: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """The boundary strokes of each mask, `widths` pixels wide, inside the mask: (n, H, W) bool."""
    inner = masks.copy()
    strokes = np.zeros_like(masks)
    for w in range(1, int(widths.max()) + 1):
        shrunk = inner.copy()
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        shrunk[:, :, 1:] &= inner[:, :, :-1]
        shrunk[:, :, :-1] &= inner[:, :, 1:]
        ring = inner & ~shrunk
        strokes |= ring & (widths >= w)[:, None, None]
        inner = shrunk
    return strokes


def scenes(rng: np.random.Generator, n: int, cfg: ControlTrainConfig):
    """n training scenes: images (n, 64, 64, 3) uint8, outlines (n, 64, 64, 3) uint8, captions."""
    attrs = [world.sample_attrs(rng) for _ in range(n)]
    free = rng.random(n) < cfg.free_placement
    r = np.array([world.SIZES[a["size"]] for a in attrs], np.float32) + rng.uniform(-1, 1, n)
    r[free] = rng.uniform(6, 16, int(free.sum()))
    centre = np.array([world.POSITIONS[a["position"]] for a in attrs], np.float32) + rng.uniform(-2, 2, (n, 2))
    centre[free] = rng.uniform(0, 1, (int(free.sum()), 2)) * (64 - 2 * r[free, None] - 4) + r[free, None] + 2
    kinds = np.array([world.SHAPES.index(a["shape"]) for a in attrs])
    masks = shape_masks(kinds, centre[:, 0], centre[:, 1], r)
    # the drawing is a little off the scene: place, size and stroke width jittered
    drawn = shape_masks(kinds, centre[:, 0] + rng.uniform(-1.5, 1.5, n), centre[:, 1] + rng.uniform(-1.5, 1.5, n),
                        r * rng.uniform(0.9, 1.1, n))  # fmt: skip
    strokes = outline(drawn, rng.integers(1, 4, n))
    fg = np.array([world.COLORS[a["color"]] for a in attrs], np.uint8)[:, None, None]
    bg = np.array([world.COLORS[a["background"]] for a in attrs], np.uint8)[:, None, None]
    images = np.where(masks[..., None], fg, bg)
    captions = []
    for a, placed_freely in zip(attrs, free):
        said = dict(a, position=None if placed_freely or rng.random() < 0.3 else a["position"])
        for key in ("color", "background", "size"):
            if rng.random() < 0.1:
                said[key] = None
        captions.append("" if rng.random() < cfg.caption_drop else world.caption(said))
    return images, np.repeat(strokes[..., None] * np.uint8(255), 3, axis=-1), captions


# ---------------------------------------------------------------------------------------------- training
def _load_student(model_dir: Path):
    """The embedded pipeline in float32 with its LCM-LoRA fused (what the ControlNet will steer)."""
    from diffusers import LCMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir / "base"), torch_dtype=torch.float32,
                                                   safety_checker=None, requires_safety_checker=False)  # fmt: skip
    pipe.load_lora_weights(str(model_dir / "lcm-lora"))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        part.requires_grad_(False)
    return pipe


def lcm_timesteps(scheduler) -> list[int]:
    """Every timestep the 1- to 8-step LCM schedules visit."""
    seen = set()
    for steps in range(1, 9):
        scheduler.set_timesteps(steps)
        seen.update(int(t) for t in scheduler.timesteps)
    return sorted(seen)


def train_control(model_dir: str | Path, workdir: str | Path, out: str | Path | None = None,
                  cfg: ControlTrainConfig = ControlTrainConfig()) -> Path:  # fmt: skip
    """Train (or resume) the scribble ControlNet; export it to `out` (default model_dir/controlnet-scribble)."""
    from diffusers import ControlNetModel

    from .train import log, save_atomic

    model_dir, workdir = Path(model_dir), Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    pipe = _load_student(model_dir)
    unet, vae = pipe.unet, pipe.vae
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=cfg.cond_channels)
    net.train()
    optimiser = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=0.0)
    ckpt, step = workdir / "control.pt", 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        net.load_state_dict(state["net"])
        optimiser.load_state_dict(state["optimiser"])
        step = state["step"]
        log(workdir, f"control: resumed at step {step}")
    alphas = pipe.scheduler.alphas_cumprod
    timesteps = torch.tensor(lcm_timesteps(pipe.scheduler))
    text_cache: dict[str, torch.Tensor] = {}

    def embed(captions: list[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in text_cache]
        if missing:
            with torch.no_grad():
                ids = pipe.tokenizer(missing, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                     truncation=True, return_tensors="pt").input_ids  # fmt: skip
                for caption, e in zip(missing, pipe.text_encoder(ids)[0]):
                    text_cache[caption] = e
        return torch.stack([text_cache[c] for c in captions])

    began, saved, losses = time.time(), time.time(), []

    def save():
        save_atomic({"net": net.state_dict(), "optimiser": optimiser.state_dict(), "step": step}, ckpt)

    while step < cfg.steps and time.time() - began < cfg.minutes * 60:
        rng = np.random.default_rng([cfg.seed, step])
        images, strokes, captions = scenes(rng, cfg.batch, cfg)
        with torch.no_grad():
            x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            z = vae.encode(x).latent_dist.mean * vae.config.scaling_factor  # (B, 4, 16, 16)
        cond = torch.from_numpy(strokes).permute(0, 3, 1, 2).float() / 255.0  # (B, 3, 64, 64)
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        t = timesteps[torch.randint(len(timesteps), (cfg.batch,), generator=generator)]
        noise = torch.randn(z.shape, generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * z + (1 - a).sqrt() * noise
        text = embed(captions)
        down, mid = net(noisy, t, encoder_hidden_states=text, controlnet_cond=cond, return_dict=False)
        eps = unet(noisy, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                   mid_block_additional_residual=mid).sample  # fmt: skip
        x0 = (noisy - (1 - a).sqrt() * eps) / a.sqrt()  # what the LCM step predicts
        loss = F.mse_loss(x0, z)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimiser.step()
        step += 1
        losses.append(float(loss))
        if step % 50 == 0:
            log(workdir, f"control: step {step} loss {np.mean(losses[-50:]):.4f} ({time.time() - began:.0f} s)")
        if time.time() - saved > cfg.ckpt_seconds:
            save()
            saved = time.time()
    save()
    log(workdir, f"control: stopped at step {step} after {time.time() - began:.0f} s")
    return export_control(net, Path(out) if out else model_dir / "controlnet-scribble")


def export_control(net, out: Path) -> Path:
    """The ControlNet as a diffusers folder of fp16 safetensors."""
    out.mkdir(parents=True, exist_ok=True)
    net.to(torch.float16).save_pretrained(str(out), safe_serialization=True)
    net.to(torch.float32)
    return out


# ---------------------------------------------------------------------------------------------- judging
def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def filled(strokes: np.ndarray) -> np.ndarray:
    """An outline's filled region: every pixel that the strokes enclose (not reachable from the border), strokes
    included."""
    border = np.zeros_like(strokes)
    border[[0, -1], :], border[:, [0, -1]] = True, True
    return ~flood(border, ~strokes)


def shape_mask(image, colour: str) -> np.ndarray:
    """Where an image shows `colour` (nearest palette colour), as a boolean mask at the image's size."""
    from .judge import _NAMES, _PALETTE, largest_component

    pixels = np.asarray(image, np.float32)[..., :3]
    labels = ((pixels[:, :, None, :] - _PALETTE) ** 2).sum(-1).argmin(-1)
    return largest_component(labels == _NAMES.index(colour))


def evaluate_control(engine, n: int = 40, seed: int = 7, scale: float = 1.0) -> dict:
    """Mean IoU of the generated shape with the drawn outline's filled region, with the control on and off (same
    prompt, no position words), and the colour judge's rate (shape and background colours as asked) for each."""
    from PIL import Image

    from ..request import Request

    rng = np.random.default_rng(seed)
    results = {"iou_on": [], "iou_off": [], "colours_on": [], "colours_off": []}
    for i in range(n):
        attrs = world.sample_attrs(rng)
        r = float(rng.uniform(8, 15))
        cx, cy = (float(v) for v in rng.uniform(r + 2, 62 - r, 2))
        kind = np.array([world.SHAPES.index(attrs["shape"])])
        filled = shape_masks(kind, [cx], [cy], [r])[0]
        strokes = outline(filled[None], np.array([2]))[0]
        drawing = Image.fromarray(np.repeat(strokes[..., None] * np.uint8(255), 3, axis=-1))
        prompt = world.caption(dict(attrs, position=None, size=None))
        for key, control in (("on", "scribble"), ("off", None)):
            request = Request(prompt=prompt, seed=i, control=control, control_scale=scale,
                              control_image=drawing if control else None)  # fmt: skip
            image = engine.generate(request).image
            results[f"iou_{key}"].append(iou(shape_mask(image, attrs["color"]), filled))
            seen = read(image)
            results[f"colours_{key}"].append(seen["color"] == attrs["color"] and seen["background"] ==
                                             attrs["background"])  # fmt: skip
    return {key: float(np.mean(values)) for key, values in results.items()}
