"""Training: VAE, then UNet + text encoder teacher, then LCM-LoRA distillation. Seeded and resumable."""

from __future__ import annotations

import copy
import json
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import world
from .models import SMOKE, ModelConfig, make_scheduler, make_text_encoder, make_unet, make_vae
from .tokenizer import make_tokenizer


LORA_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
]
SAMPLE_PROMPTS = [
    "a large red circle in the center, blue background",
    "a small yellow square on the left, black background",
    "a large white triangle at the bottom, green background",
    "a small cyan circle on the right, purple background",
    "a large orange square at the top, white background",
    "a large magenta triangle on the left, yellow background",
    "a small blue triangle in the center, orange background",
    "a large green circle on the right, red background",
]


@dataclass
class TrainConfig:
    """Everything a training run depends on (saved next to the checkpoints)."""

    seed: int = 0
    device: str = "cpu"
    batch: int = 32
    vae_steps: int = 2500
    vae_lr: float = 2e-3
    vae_minutes: float = 12.0
    teacher_steps: int = 20000
    teacher_lr: float = 3e-4
    teacher_minutes: float = 60.0
    distill_steps: int = 4000
    distill_lr: float = 2e-4
    distill_minutes: float = 25.0
    lora_rank: int = 16
    guidance: tuple[float, float] = (3.0, 7.0)  # teacher CFG scale range during distillation
    ema: float = 0.999
    caption_drop: float = 0.1  # empty caption, for classifier-free guidance
    word_drop: float = 0.15  # chance each optional word is left out of a caption
    min_snr: float = 5.0
    ckpt_seconds: float = 150.0
    data_workers: int = 1
    model: ModelConfig = field(default_factory=ModelConfig)

    @classmethod
    def smoke(cls) -> TrainConfig:
        """A few steps of each phase with tiny networks."""
        return cls(batch=4, vae_steps=3, teacher_steps=3, distill_steps=3, lora_rank=4, model=SMOKE, ckpt_seconds=0.0)


def log(workdir: Path, msg: str) -> None:
    """Print and append to workdir/log.txt."""
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    with open(workdir / "log.txt", "a") as f:
        f.write(line + "\n")


def save_atomic(obj, path: Path) -> None:
    """torch.save through a temp file, so a kill never leaves half a checkpoint."""
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def to_tensor(images: np.ndarray, device) -> torch.Tensor:
    """(n, 64, 64, 3) uint8 -> (n, 3, 64, 64) float in [-1, 1]."""
    x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


class Batches:
    """Fresh world batches, made ahead in threads; batch `step` depends only on (seed, phase, step)."""

    def __init__(self, cfg: TrainConfig, phase: int, start: int):
        workers = cfg.data_workers
        self.cfg, self.phase, self.next = cfg, phase, start
        self.q: queue.Queue = queue.Queue(maxsize=8)
        self.lock = threading.Lock()
        self.pending: dict[int, tuple] = {}
        self.threads = [threading.Thread(target=self._work, daemon=True) for _ in range(workers)]
        self.counter = start
        for t in self.threads:
            t.start()

    def _work(self) -> None:
        while True:
            with self.lock:
                step, self.counter = self.counter, self.counter + 1
            rng = np.random.default_rng([self.cfg.seed, self.phase, step])
            self.q.put((step, world.batch(rng, self.cfg.batch, self.cfg.word_drop)))

    def get(self) -> tuple[np.ndarray, list[str], list[dict]]:
        """The batch for the next step, in order."""
        while self.next not in self.pending:
            step, b = self.q.get()
            self.pending[step] = b
        b = self.pending.pop(self.next)
        self.next += 1
        return b


class Phase:
    """Step/time bookkeeping and periodic checkpointing for one training phase."""

    def __init__(self, name: str, workdir: Path, steps: int, minutes: float, cfg: TrainConfig):
        self.name, self.workdir, self.steps, self.minutes, self.cfg = name, workdir, steps, minutes, cfg
        self.path = workdir / f"{name}.pt"
        self.state = torch.load(self.path, map_location="cpu", weights_only=False) if self.path.exists() else None
        self.step = self.state["step"] if self.state else 0
        self.elapsed = self.state["elapsed"] if self.state else 0.0
        self.t0 = time.time() - self.elapsed
        self.last_ckpt = time.time()

    @property
    def done(self) -> bool:
        return bool(self.state and self.state.get("done"))

    def running(self) -> bool:
        """False once the step count or the time budget is reached."""
        over = self.minutes > 0 and time.time() - self.t0 > 60 * self.minutes
        return self.step < self.steps and not over

    def progress(self) -> float:
        """Fraction of the phase done, by steps or by time, whichever is further."""
        by_time = (time.time() - self.t0) / (60 * self.minutes) if self.minutes > 0 else 0.0
        return min(1.0, max(self.step / self.steps, by_time))

    def maybe_save(self, make_state, force: bool = False, done: bool = False) -> bool:
        """Checkpoint when due; returns True if it saved."""
        if not force and time.time() - self.last_ckpt < self.cfg.ckpt_seconds:
            return False
        state = make_state()
        state.update(step=self.step, elapsed=time.time() - self.t0, done=done)
        save_atomic(state, self.path)
        self.last_ckpt = time.time()
        return True


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * model."""
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


def encode_text(tokenizer, text_encoder, captions: list[str], device) -> torch.Tensor:
    """Captions -> (n, 77, hidden) last hidden states, as StableDiffusionPipeline does."""
    ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    return text_encoder(ids.input_ids.to(device))[0]


# ---------------------------------------------------------------- VAE
def train_vae(cfg: TrainConfig, workdir: Path):
    """Phase 1: autoencoder on the latent mean plus a little noise, tiny KL; then the scaling factor."""
    dev = torch.device(cfg.device)
    vae = make_vae(cfg.model).to(dev)
    ph = Phase("vae", workdir, cfg.vae_steps, cfg.vae_minutes, cfg)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    if ph.state:
        vae.load_state_dict(ph.state["vae"])
        if "opt" in ph.state:
            opt.load_state_dict(ph.state["opt"])
    if ph.done:
        vae.register_to_config(scaling_factor=ph.state["scaling_factor"])
        log(workdir, f"vae: done earlier ({ph.step} steps), scaling {vae.config.scaling_factor:.4f}")
        return vae
    batches = Batches(cfg, 1, ph.step)
    torch.manual_seed(cfg.seed * 7 + ph.step)
    mse_avg = None
    while ph.running():
        lr = cfg.vae_lr * min(1.0, (ph.step + 1) / 100) * (0.1 if ph.progress() > 0.8 else 1.0)
        for g in opt.param_groups:
            g["lr"] = lr
        x = to_tensor(batches.get()[0], dev)  # (B, 3, 64, 64)
        post = vae.encode(x).latent_dist
        z = post.mean + 0.05 * torch.randn_like(post.mean)  # (B, 4, 16, 16)
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, x)
        loss = mse + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ph.step += 1
        mse_avg = mse.item() if mse_avg is None else 0.98 * mse_avg + 0.02 * mse.item()
        if ph.step % 50 == 0 or ph.step == 1:
            log(workdir, f"vae step {ph.step} mse {mse_avg:.4f} ({time.time() - ph.t0:.0f}s)")
        ph.maybe_save(lambda: {"vae": vae.state_dict(), "opt": opt.state_dict()})
    # scaling factor: 1 / std of the latent means over fresh samples
    with torch.no_grad():
        rng = np.random.default_rng([cfg.seed, 99])
        zs = [vae.encode(to_tensor(world.batch(rng, 64)[0], dev)).latent_dist.mean for _ in range(16)]
        sf = float(1.0 / torch.cat(zs).std())
    vae.register_to_config(scaling_factor=sf)
    ph.maybe_save(lambda: {"vae": vae.state_dict(), "scaling_factor": sf}, force=True, done=True)
    log(
        workdir,
        f"vae: finished {ph.step} steps, mse {mse_avg:.4f}, scaling factor {sf:.4f}, {time.time() - ph.t0:.0f}s",
    )
    return vae


# ---------------------------------------------------------------- teacher
def train_teacher(cfg: TrainConfig, workdir: Path, vae):
    """Phase 2: UNet + text encoder, epsilon prediction, CFG dropout, min-SNR weights, EMA."""
    dev = torch.device(cfg.device)
    tok = make_tokenizer()
    te, unet = make_text_encoder(cfg.model, tok).to(dev), make_unet(cfg.model).to(dev)
    sched = make_scheduler()
    ph = Phase("teacher", workdir, cfg.teacher_steps, cfg.teacher_minutes, cfg)
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.teacher_lr, weight_decay=1e-2)
    if ph.state:
        unet.load_state_dict(ph.state["unet"])
        te.load_state_dict(ph.state["te"])
    ema_unet, ema_te = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(te).requires_grad_(False)
    if ph.state:
        ema_unet.load_state_dict(ph.state["ema_unet"])
        ema_te.load_state_dict(ph.state["ema_te"])
        if "opt" in ph.state:
            opt.load_state_dict(ph.state["opt"])
    if ph.done:
        log(workdir, f"teacher: done earlier ({ph.step} steps)")
        return tok, ema_te, ema_unet
    vae.requires_grad_(False).eval()
    ac = sched.alphas_cumprod.to(dev)
    snr = ac / (1 - ac)
    batches = Batches(cfg, 2, ph.step)
    gen = torch.Generator(dev).manual_seed(cfg.seed * 1000 + ph.step)
    loss_avg = None

    def state():
        return {
            "unet": unet.state_dict(),
            "te": te.state_dict(),
            "ema_unet": ema_unet.state_dict(),
            "ema_te": ema_te.state_dict(),
            "opt": opt.state_dict(),
        }

    while ph.running():
        lr = cfg.teacher_lr * min(1.0, (ph.step + 1) / 500)
        lr *= 0.5 * (1 + np.cos(np.pi * ph.progress())) * 0.9 + 0.1
        for g in opt.param_groups:
            g["lr"] = lr
        images, caps, _ = batches.get()
        keep = torch.rand(len(caps), generator=gen, device=dev) >= cfg.caption_drop
        caps = [c if k else "" for c, k in zip(caps, keep.tolist())]
        with torch.no_grad():
            lat = vae.encode(to_tensor(images, dev)).latent_dist.mean * vae.config.scaling_factor  # (B,4,16,16)
        noise = torch.randn(lat.shape, generator=gen, device=dev)
        t = torch.randint(0, 1000, (len(caps),), generator=gen, device=dev)
        noisy = sched.add_noise(lat, noise, t)
        eps = unet(noisy, t, encode_text(tok, te, caps, dev)).sample
        w = torch.clamp(snr[t], max=cfg.min_snr) / snr[t]  # min-SNR-gamma for epsilon prediction
        loss = (w * ((eps - noise) ** 2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ph.step += 1
        decay = min(cfg.ema, (1 + ph.step) / (10 + ph.step))
        ema_update(ema_unet, unet, decay)
        ema_update(ema_te, te, decay)
        loss_avg = loss.item() if loss_avg is None else 0.99 * loss_avg + 0.01 * loss.item()
        if ph.step % 100 == 0 or ph.step == 1:
            rate = ph.step / max(1e-9, time.time() - ph.t0)
            log(
                workdir,
                f"teacher step {ph.step} loss {loss_avg:.4f} lr {lr:.2e} ({time.time() - ph.t0:.0f}s, "
                f"{rate:.2f} it/s)",
            )
        if ph.maybe_save(state):
            save_samples(workdir / f"teacher_{ph.step:06d}.png", tok, ema_te, ema_unet, vae, dev)
    ph.maybe_save(state, force=True, done=True)
    save_samples(workdir / f"teacher_{ph.step:06d}.png", tok, ema_te, ema_unet, vae, dev)
    log(workdir, f"teacher: finished {ph.step} steps, loss {loss_avg}, {time.time() - ph.t0:.0f}s")
    return tok, ema_te, ema_unet


@torch.no_grad()
def save_samples(path: Path, tok, te, unet, vae, dev, steps: int = 25, guidance: float = 5.0, lcm: bool = False):
    """A strip of the sample prompts (DDIM + CFG, or LCM 4 steps) to watch training."""
    from diffusers import LCMScheduler
    from PIL import Image

    sched = make_scheduler()
    if lcm:
        sched, steps, guidance = LCMScheduler.from_config(sched.config), 4, 1.0
    sched.set_timesteps(steps)
    n = len(SAMPLE_PROMPTS)
    cond = encode_text(tok, te, SAMPLE_PROMPTS, dev)
    uncond = encode_text(tok, te, [""] * n, dev)
    x = torch.randn((n, 4, 16, 16), generator=torch.Generator(dev).manual_seed(0), device=dev)
    for t in sched.timesteps:
        if guidance > 1:
            e = unet(torch.cat([x, x]), t, torch.cat([uncond, cond])).sample
            eu, ec = e.chunk(2)
            e = eu + guidance * (ec - eu)
        else:
            e = unet(x, t, cond).sample
        x = sched.step(e, t, x, generator=torch.Generator(dev).manual_seed(1)).prev_sample
    img = vae.decode(x / vae.config.scaling_factor).sample  # (n, 3, 64, 64)
    img = ((img.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    Image.fromarray(np.concatenate(list(img), axis=1)).save(path)


# ---------------------------------------------------------------- LCM-LoRA distillation
def boundary(t: torch.Tensor, sigma_data: float = 0.5, scaling: float = 10.0):
    """LCM boundary-condition scalings c_skip, c_out (as in LCMScheduler), shaped (n,1,1,1)."""
    t = t.float() * scaling
    c_skip = sigma_data**2 / (t**2 + sigma_data**2)
    c_out = t / (t**2 + sigma_data**2) ** 0.5
    return c_skip[:, None, None, None], c_out[:, None, None, None]


def lora_config(rank: int):
    """The LoRA over the same layers as the published LCM-LoRAs."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS, init_lora_weights="gaussian")


def distill(cfg: TrainConfig, workdir: Path, vae, tok, te, teacher):
    """Phase 3: LCM-LoRA: skipping-step DDIM teacher with CFG, frozen-student target, Huber loss."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    dev = torch.device(cfg.device)
    ph = Phase("distill", workdir, cfg.distill_steps, cfg.distill_minutes, cfg)
    student = copy.deepcopy(teacher)
    student.add_adapter(lora_config(cfg.lora_rank))
    if ph.state:
        set_peft_model_state_dict(student, ph.state["lora"])
    lora_params = [p for n, p in student.named_parameters() if "lora_" in n]
    for n, p in student.named_parameters():
        p.requires_grad_("lora_" in n)
    opt = torch.optim.AdamW(lora_params, lr=cfg.distill_lr, weight_decay=1e-2)
    if ph.state and "opt" in ph.state:
        opt.load_state_dict(ph.state["opt"])
    if ph.done:
        log(workdir, f"distill: done earlier ({ph.step} steps)")
        return student
    for m in (vae, te, teacher):
        m.requires_grad_(False).eval()
    sched = make_scheduler()
    ac = sched.alphas_cumprod.to(dev)
    skip = 1000 // 50
    ddim_t = torch.arange(1, 51, device=dev) * skip - 1  # 19, 39, ..., 999
    uncond1 = encode_text(tok, te, [""], dev)
    batches = Batches(cfg, 3, ph.step)
    gen = torch.Generator(dev).manual_seed(cfg.seed * 3000 + ph.step)
    loss_avg = None

    def x0_from_eps(eps, x, t):
        a = ac[t][:, None, None, None]
        return (x - (1 - a).sqrt() * eps) / a.sqrt()

    def state():
        return {"lora": get_peft_model_state_dict(student), "opt": opt.state_dict()}

    while ph.running():
        lr = cfg.distill_lr * min(1.0, (ph.step + 1) / 200)
        for g in opt.param_groups:
            g["lr"] = lr
        images, caps, _ = batches.get()
        n = len(caps)
        with torch.no_grad():
            lat = vae.encode(to_tensor(images, dev)).latent_dist.mean * vae.config.scaling_factor
            cond = encode_text(tok, te, caps, dev)
        uncond = uncond1.expand(n, -1, -1)
        idx = torch.randint(0, 50, (n,), generator=gen, device=dev)
        t_start = ddim_t[idx]
        t_prev = (t_start - skip).clamp(min=0)
        cs0, co0 = boundary(t_start)
        cs1, co1 = boundary(t_prev)
        noise = torch.randn(lat.shape, generator=gen, device=dev)
        x_t = sched.add_noise(lat, noise, t_start)
        w = torch.empty(n, device=dev).uniform_(*cfg.guidance, generator=gen)[:, None, None, None]
        # student: one consistency-function evaluation
        eps_s = student(x_t, t_start, cond).sample
        pred = cs0 * x_t + co0 * x0_from_eps(eps_s, x_t, t_start)
        with torch.no_grad():
            # teacher: one DDIM step t_start -> t_prev with classifier-free guidance
            e = teacher(torch.cat([x_t, x_t]), torch.cat([t_start, t_start]), torch.cat([cond, uncond])).sample
            ec, eu = e.chunk(2)
            x0c, x0u = x0_from_eps(ec, x_t, t_start), x0_from_eps(eu, x_t, t_start)
            x0 = x0c + (w - 1) * (x0c - x0u)
            eps = ec + (w - 1) * (ec - eu)
            a_prev = torch.where(t_start - skip < 0, ac[0], ac[t_prev])[:, None, None, None]
            x_prev = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
            # target: the (frozen copy of the) student at the earlier point
            eps_t = student(x_prev, t_prev, cond).sample
            target = cs1 * x_prev + co1 * x0_from_eps(eps_t, x_prev, t_prev)
        c = 0.001
        loss = (torch.sqrt((pred.float() - target.float()) ** 2 + c**2) - c).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora_params, 1.0)
        opt.step()
        ph.step += 1
        loss_avg = loss.item() if loss_avg is None else 0.99 * loss_avg + 0.01 * loss.item()
        if ph.step % 100 == 0 or ph.step == 1:
            log(workdir, f"distill step {ph.step} huber {loss_avg:.5f} ({time.time() - ph.t0:.0f}s)")
        if ph.maybe_save(state):
            save_samples(workdir / f"lcm_{ph.step:06d}.png", tok, te, student, vae, dev, lcm=True)
    ph.maybe_save(state, force=True, done=True)
    save_samples(workdir / f"lcm_{ph.step:06d}.png", tok, te, student, vae, dev, lcm=True)
    log(workdir, f"distill: finished {ph.step} steps, huber {loss_avg}, {time.time() - ph.t0:.0f}s")
    return student


def train_all(cfg: TrainConfig, workdir: str | Path) -> dict:
    """Run (or resume) all three phases; returns the trained modules."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    vae = train_vae(cfg, workdir)
    log(workdir, f"phase vae: {time.time() - t0:.0f}s elapsed")
    tok, te, unet = train_teacher(cfg, workdir, vae)
    log(workdir, f"phase teacher: {time.time() - t0:.0f}s elapsed")
    student = distill(cfg, workdir, vae, tok, te, unet)
    log(workdir, f"phase distill: {time.time() - t0:.0f}s elapsed")
    return {"vae": vae, "tokenizer": tok, "text_encoder": te, "unet": unet, "student": student, "config": cfg}
