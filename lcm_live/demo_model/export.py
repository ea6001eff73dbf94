"""Export: a StableDiffusionPipeline folder (base/) and an LCM-LoRA folder (lcm-lora/)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch


MODEL_CARD = """# lcm-live embedded demo model

A tiny text-to-image latent diffusion model (Stable Diffusion 1.5 layout: CLIP text encoder, KL VAE,
UNet2DConditionModel, scaled-linear noise schedule) and its LCM-LoRA, made by the lcm-live project so the
app runs offline in realtime on a CPU. It only knows a procedurally drawn toy world: one circle, square or
triangle, small or large, on the left/right/top/bottom/center, in one of 10 colours, on a flat background
of another colour. Prompts like `a small red circle on the left, blue background` (words may be left out).

- `base/`: the teacher pipeline (64x64 images, 16x16x4 latents), fp16 safetensors.
- `lcm-lora/pytorch_lora_weights.safetensors`: the LCM-LoRA (peft format, with adapter metadata).

Load: `StableDiffusionPipeline.from_pretrained("base")`, `load_lora_weights("lcm-lora")`, `fuse_lora()`,
`unload_lora_weights()`, `LCMScheduler.from_config(...)`, 4 steps, guidance 1, 64x64.

Trained from scratch with `python -m lcm_live.demo_model train` (see docs/demo-model.md): VAE, then UNet +
text encoder (epsilon prediction, 10% caption dropout, EMA, min-SNR weights), then LCM-LoRA distillation
(skipping-step DDIM teacher with classifier-free guidance, Huber loss). No outside data or weights.

{stats}

License: MIT, made by the lcm-live project. The training data is synthetic and drawn by our own code.
"""


def load_workdir(workdir: str | Path) -> dict:
    """Rebuild the trained modules from a workdir's finished checkpoints."""
    from peft.utils import set_peft_model_state_dict

    from .models import ModelConfig, make_text_encoder, make_unet, make_vae
    from .tokenizer import make_tokenizer
    from .train import TrainConfig, lora_config

    workdir = Path(workdir)
    raw = json.loads((workdir / "config.json").read_text())
    raw["model"] = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw["model"].items()})
    raw["guidance"] = tuple(raw["guidance"])
    cfg = TrainConfig(**raw)
    tok = make_tokenizer()
    vae, te, unet = make_vae(cfg.model), make_text_encoder(cfg.model, tok), make_unet(cfg.model)
    v = torch.load(workdir / "vae.pt", map_location="cpu", weights_only=False)
    vae.load_state_dict(v["vae"])
    vae.register_to_config(scaling_factor=v["scaling_factor"])
    t = torch.load(workdir / "teacher.pt", map_location="cpu", weights_only=False)
    te.load_state_dict(t["ema_te"])
    unet.load_state_dict(t["ema_unet"])
    out = {"vae": vae, "tokenizer": tok, "text_encoder": te, "unet": unet, "student": None, "config": cfg}
    if (workdir / "distill.pt").exists():
        import copy

        student = copy.deepcopy(unet)
        student.add_adapter(lora_config(cfg.lora_rank))
        set_peft_model_state_dict(
            student, torch.load(workdir / "distill.pt", map_location="cpu", weights_only=False)["lora"]
        )
        out["student"] = student
    return out


def make_pipeline(vae, tokenizer, text_encoder, unet):
    """A StableDiffusionPipeline with no safety checker."""
    from diffusers import StableDiffusionPipeline

    from .models import make_scheduler

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=make_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def export(trained: dict, out: str | Path) -> Path:
    """Write out/base, out/lcm-lora, out/README.md; check the LoRA reloads to the same outputs."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    from .tokenizer import save_tokenizer_files
    from .train import lora_config

    out = Path(out)
    shutil.rmtree(out / "base", ignore_errors=True)
    shutil.rmtree(out / "lcm-lora", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    mods = {k: trained[k] for k in ("vae", "tokenizer", "text_encoder", "unet")}
    for k in ("vae", "text_encoder", "unet"):
        mods[k] = mods[k].to("cpu").eval()
    pipe = make_pipeline(**mods)
    pipe.to(torch.float16).save_pretrained(out / "base", safe_serialization=True)
    save_tokenizer_files(out / "base" / "tokenizer")  # the source vocab.json + merges.txt, beside tokenizer.json
    pipe.to(torch.float32)
    stats = ""
    student = trained.get("student")
    if student is not None:
        student = student.to("cpu").eval()
        cfg = trained["config"]
        StableDiffusionPipeline.save_lora_weights(
            out / "lcm-lora",
            unet_lora_layers=get_peft_model_state_dict(student),
            unet_lora_adapter_metadata=lora_config(cfg.lora_rank).to_dict(),
            safe_serialization=True,
        )
        check_lora_reload(out, student)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6
    stats = f"Export size: {size:.1f} MB."
    (out / "README.md").write_text(MODEL_CARD.format(stats=stats))
    print(f"export: {out} ({size:.1f} MB)")
    return out


@torch.no_grad()
def check_lora_reload(out: Path, student) -> None:
    """Reload base (fp16 -> fp32) + LoRA from disk; every LoRA layer must load, outputs must match."""
    import copy

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out / "base", dtype=torch.float32)
    pipe.load_lora_weights(out / "lcm-lora")
    n_mem = sum(1 for n, _ in student.named_modules() if n.endswith("lora_A.default"))
    n_disk = sum(1 for n, _ in pipe.unet.named_modules() if n.endswith(".lora_A.default_0"))
    mem = copy.deepcopy(student).to(torch.float16).to(torch.float32)  # same fp16 rounding as base/
    sd = {k: v for k, v in pipe.unet.state_dict().items() if "lora_" in k}
    x, t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([999, 259])
    e = torch.randn(2, 77, pipe.text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(1))
    a, b = mem(x, t, e).sample, pipe.unet(x, t, e).sample
    diff = (a - b).abs().max().item()
    print(f"export: LoRA layers in memory {n_mem}, loaded {n_disk} ({len(sd)} tensors), max |diff| {diff:.2e}")
    if n_mem != n_disk or diff > 1e-3:
        raise RuntimeError(f"LCM-LoRA did not reload exactly: {n_disk}/{n_mem} layers, diff {diff}")
