"""Stable Diffusion architectures built from configs, with random weights: no download needed.

Tiny ones serve the tests and the random-weight demo model; the real SD 1.5 and SDXL configs serve the
benchmarks (speed does not depend on weight values).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from diffusers import (
    AutoencoderKL,
    LCMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer


# The modules the published LCM-LoRAs adapt.
LCM_LORA_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
]  # fmt: skip

# SD 1.5's scheduler settings (DDPM training schedule); the engine swaps in LCMScheduler from them.
SD_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
)  # fmt: skip


def byte_level_clip_tokenizer(words: list[str] = (), max_length: int = 77) -> CLIPTokenizer:
    """A real CLIPTokenizer from a vocabulary we make: every byte symbol, plus whole `words`, so any text tokenizes."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    merges = []
    for word in words:  # merge left to right: "red" -> "r e", "re d</w>"
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    merges = list(dict.fromkeys(merges))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def clip_text_config(tokenizer: CLIPTokenizer, **sizes) -> CLIPTextConfig:
    """A CLIP text config whose special ids match `tokenizer`."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=tokenizer.model_max_length,
        **sizes,
    )


@dataclass(frozen=True)
class Architecture:
    name: str
    family: str  # "sd15" or "sdxl"
    native_size: int  # image side in pixels the model was made for


ARCHITECTURES = {
    "tiny-sd15": Architecture("tiny-sd15", "sd15", 64),
    "tiny-sdxl": Architecture("tiny-sdxl", "sdxl", 64),
    "sd15": Architecture("sd15", "sd15", 512),
    "sdxl": Architecture("sdxl", "sdxl", 1024),
}


def _tiny_sd15(tokenizer):
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16,
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=(16, 32, 32, 32), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=16, sample_size=64,
    )  # fmt: skip
    text = CLIPTextModel(clip_text_config(
        tokenizer, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
    ))  # fmt: skip
    return dict(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer)


def _tiny_sdxl(tokenizer):
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=32 + 48, norm_num_groups=16,
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=(16, 32, 32, 32), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=16, sample_size=64, scaling_factor=0.13025,
    )  # fmt: skip
    # Two encoders of different widths, as in SDXL (768 and 1280): single-file loading tells them apart by width.
    sizes = dict(intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, projection_dim=32)
    return dict(
        unet=unet, vae=vae, tokenizer=tokenizer, tokenizer_2=tokenizer,
        text_encoder=CLIPTextModel(clip_text_config(tokenizer, hidden_size=32, **sizes)),
        text_encoder_2=CLIPTextModelWithProjection(clip_text_config(tokenizer, hidden_size=48, **sizes)),
    )  # fmt: skip


def _sd15(tokenizer):
    """SD 1.5's published configs (UNet 860M, VAE 84M, CLIP ViT-L/14 text encoder)."""
    unet = UNet2DConditionModel(
        sample_size=64, cross_attention_dim=768, attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), latent_channels=4, sample_size=512,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )  # fmt: skip
    text = CLIPTextModel(_clip_l(tokenizer))
    return dict(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer)


def _clip_l(tokenizer) -> CLIPTextConfig:
    """CLIP ViT-L/14's text tower; the vocabulary keeps the real 49408 rows so embedding cost is real."""
    config = clip_text_config(
        tokenizer, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
        hidden_act="quick_gelu", projection_dim=768,
    )  # fmt: skip
    config.vocab_size = 49408
    return config


def _sdxl(tokenizer):
    """SDXL base's published configs (UNet 2.6B, two text encoders: CLIP ViT-L and OpenCLIP ViT-bigG)."""
    unet = UNet2DConditionModel(
        sample_size=128, cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
        block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), latent_channels=4, sample_size=1024, scaling_factor=0.13025,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, force_upcast=True,
    )  # fmt: skip
    big_g = clip_text_config(
        tokenizer, hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
        hidden_act="gelu", projection_dim=1280,
    )  # fmt: skip
    big_g.vocab_size = 49408
    return dict(
        unet=unet, vae=vae, tokenizer=tokenizer, tokenizer_2=tokenizer,
        text_encoder=CLIPTextModel(_clip_l(tokenizer)), text_encoder_2=CLIPTextModelWithProjection(big_g),
    )  # fmt: skip


_BUILDERS = {"tiny-sd15": _tiny_sd15, "tiny-sdxl": _tiny_sdxl, "sd15": _sd15, "sdxl": _sdxl}


def build_pipeline(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A full pipeline of architecture `arch` with random weights, seeded."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"Unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}.")
    torch.manual_seed(seed)
    parts = _BUILDERS[arch](byte_level_clip_tokenizer())
    scheduler = LCMScheduler(**SD_SCHEDULER)
    if ARCHITECTURES[arch].family == "sdxl":
        pipe = StableDiffusionXLPipeline(**parts, scheduler=scheduler)
    else:
        pipe = StableDiffusionPipeline(
            **parts, scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def random_lcm_lora_state(unet: UNet2DConditionModel, rank: int = 4, seed: int = 0):
    """A random LoRA over the LCM-LoRA targets of `unet`, as (peft state dict, peft LoraConfig)."""
    import copy

    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=LCM_LORA_TARGETS, init_lora_weights=False)
    torch.manual_seed(seed)
    student = copy.deepcopy(unet).to(torch.float32)
    student.add_adapter(config)
    state = {k: v * 0.5 for k, v in get_peft_model_state_dict(student).items()}  # B random too: fusing changes weights
    return state, config


def save_lora(pipe, state: dict, config, folder: str, style: str = "peft", file_name: str | None = None) -> str:
    """Write `state` as a LoRA file that `load_lora_weights` reads, in one of the published key styles.

    "peft": diffusers' own (`unet.<module>.lora_A.weight`, alpha in the metadata); "kohya": the LCM-LoRA, Hyper-SD
    and SDXL-Lightning files (`lora_unet_<module>.lora_down.weight` + `.alpha`); "diffusers": diffusers' training
    scripts of early 2024, as in the TCD-LoRA files (`unet.<module>.lora.down.weight`, no alpha: alpha = rank).
    """
    os.makedirs(folder, exist_ok=True)
    if style == "peft":
        type(pipe).save_lora_weights(folder, unet_lora_layers=state, unet_lora_adapter_metadata=config.to_dict(),
                                     weight_name=file_name)  # fmt: skip
        return os.path.join(folder, file_name or "pytorch_lora_weights.safetensors")
    if style not in ("kohya", "diffusers"):
        raise ValueError(f"Unknown LoRA style {style!r}; use 'peft', 'kohya' or 'diffusers'.")
    from safetensors.torch import save_file

    out = {}
    for key, value in state.items():  # "down_blocks.1.attentions.0...to_q.lora_A.weight"
        module, kind = key.rsplit(".lora_", 1)
        down = kind.startswith("A")
        if style == "diffusers":
            out[f"unet.{module}.lora.{'down' if down else 'up'}.weight"] = value.contiguous()
            continue
        name = "lora_unet_" + module.replace(".", "_")
        out[f"{name}.lora_down.weight" if down else f"{name}.lora_up.weight"] = value.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(config.lora_alpha))
    default = "lcm_lora_kohya.safetensors" if style == "kohya" else "pytorch_lora_weights.safetensors"
    path = os.path.join(folder, file_name or default)
    save_file(out, path)
    return path


def save_model_with_lora(arch: str, folder: str, seed: int = 0, lora_style: str = "peft", rank: int = 4) -> dict:
    """Save a random `arch` pipeline to `folder/base` and a random LCM-LoRA for it to `folder/lcm-lora`."""
    pipe = build_pipeline(arch, seed=seed)
    pipe.save_pretrained(os.path.join(folder, "base"))
    state, config = random_lcm_lora_state(pipe.unet, rank=rank, seed=seed + 1)
    lora_path = save_lora(pipe, state, config, os.path.join(folder, "lcm-lora"), style=lora_style)
    return {"base": os.path.join(folder, "base"), "lora": lora_path}


def random_controlnet(unet: UNet2DConditionModel, seed: int = 0, scale: float = 0.05):
    """A ControlNet shaped for `unet` (diffusers' `from_unet`), its zero-initialised output convolutions made random
    so that it changes the image: the stand-in for a trained one."""
    from diffusers import ControlNetModel

    net = ControlNetModel.from_unet(unet)
    generator = torch.Generator().manual_seed(seed)
    zeros = [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]
    with torch.no_grad():
        for conv in zeros:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * scale)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator) * scale)
    return net
