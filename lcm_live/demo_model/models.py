"""The tiny standard diffusers/transformers models: CLIP text encoder, VAE, UNet, SD scheduler."""

from __future__ import annotations

from dataclasses import dataclass

from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel


@dataclass
class ModelConfig:
    """Sizes of the three networks (the defaults are the shipped demo model)."""

    text_hidden: int = 128
    text_layers: int = 3
    unet_channels: tuple[int, ...] = (32, 64, 128)
    unet_heads: int = 4
    vae_channels: tuple[int, ...] = (16, 32, 64)


SMOKE = ModelConfig(text_hidden=32, text_layers=1, unet_channels=(32, 32, 32), unet_heads=2, vae_channels=(16, 16, 16))


def make_text_encoder(cfg: ModelConfig, tokenizer) -> CLIPTextModel:
    """A tiny causal CLIP text transformer over our vocabulary."""
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.text_hidden,
            intermediate_size=4 * cfg.text_hidden,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=cfg.text_hidden,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def make_vae(cfg: ModelConfig) -> AutoencoderKL:
    """64x64x3 <-> 16x16x4 KL autoencoder (two 2x downsamplings, no attention)."""
    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_channels,
        layers_per_block=1,
        norm_num_groups=min(16, cfg.vae_channels[0]),
        mid_block_add_attention=False,
    )


def make_unet(cfg: ModelConfig) -> UNet2DConditionModel:
    """UNet on 16x16x4 latents (~3M params), cross-attending to the text encoder's hidden states."""
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=cfg.unet_channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),  # 16 -> 8 -> 4
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),  # attention at 8x8 and 4x4 (mid)
        cross_attention_dim=cfg.text_hidden,
        attention_head_dim=cfg.unet_heads,
        norm_num_groups=16,
    )


def make_scheduler() -> DDIMScheduler:
    """Stable Diffusion 1.5's noise schedule (scaled_linear betas, epsilon prediction)."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
