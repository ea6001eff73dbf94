"""Single-file (Civitai-style) SD 1.5 and SDXL checkpoints: which family a file is, and writing one.

A single file holds the whole pipeline in the original Stable Diffusion key layout (`model.diffusion_model.*`,
`first_stage_model.*`, `cond_stage_model.*` or `conditioner.embedders.*`). diffusers' `from_single_file` reads it
with the configs of a diffusers folder of the same family. `to_single_file` writes that layout from a diffusers
pipeline (the inverse of diffusers' conversion), so tests can make small checkpoints of their own.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch


SINGLE_FILE_SUFFIXES = (".safetensors",)  # pickled .ckpt files can run code when loaded: not accepted
# The diffusers folder whose configs (not weights) describe each family's single files; the ones diffusers uses.
FAMILY_CONFIGS = {
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
}
# Keys that tell the families apart whatever the model's size (layer counts differ in small models).
_SDXL_KEYS = ("conditioner.embedders.1.model.", "model.diffusion_model.label_emb.")
_SD15_KEYS = ("cond_stage_model.transformer.text_model.", "model.diffusion_model.input_blocks.")
_SD2_KEY = "cond_stage_model.model."  # OpenCLIP ViT-H text encoder: SD 2.x
_SDXL_REFINER_KEY = "conditioner.embedders.0.model."  # the refiner has only the OpenCLIP bigG encoder, at index 0
_UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"  # (C, in_channels, 3, 3); 9 input channels: inpainting


def is_single_file(model: str | None) -> bool:
    return model is not None and model.lower().endswith((*SINGLE_FILE_SUFFIXES, ".ckpt", ".pt", ".bin"))


def single_file_family(path: str) -> str:
    """'sd15' or 'sdxl', from the tensor names in a .safetensors header (no weights are read); ValueError otherwise."""
    from safetensors import SafetensorError, safe_open

    name = Path(path).name
    if not name.lower().endswith(SINGLE_FILE_SUFFIXES):
        raise ValueError(f"'{name}' is not a .safetensors file; convert it to .safetensors (pickled checkpoints "
                         "can run code when loaded, so lcm-live does not open them).")  # fmt: skip
    try:
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
            shape = f.get_slice(_UNET_IN).get_shape() if _UNET_IN in keys else []
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"'{name}' is not a readable .safetensors file ({error}).") from error

    in_channels = shape[1] if len(shape) == 4 else None

    def has(prefix: str) -> bool:
        return any(key.startswith(prefix) for key in keys)

    if all(has(prefix) for prefix in _SDXL_KEYS):
        family = "sdxl"
    elif all(has(prefix) for prefix in _SD15_KEYS):
        family = "sd15"
    elif has(_SD2_KEY):
        raise ValueError(f"'{name}' is a Stable Diffusion 2.x checkpoint; single files of the SD 1.5 and SDXL "
                         "families are supported (load SD 2.x models from a diffusers folder).")  # fmt: skip
    elif has(_SDXL_REFINER_KEY):
        raise ValueError(f"'{name}' is an SDXL refiner checkpoint; it cannot make images from text on its own.")
    else:
        raise ValueError(f"'{name}' is not an SD 1.5 or SDXL checkpoint: none of its {len(keys)} tensor names "
                         "are those of a Stable Diffusion single file (model.diffusion_model.*).")  # fmt: skip
    if in_channels is not None and in_channels != 4:
        raise ValueError(f"'{name}' is an inpainting checkpoint ({in_channels} input channels); lcm-live runs "
                         "text-to-image models with 4 latent channels.")  # fmt: skip
    return family


# ---------------------------------------------------------------------------------------------- writing
_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
           ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]  # fmt: skip
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}  # fmt: skip
_VAE_ATTENTION = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def _resnet(rest: str) -> str:
    for new, old in _RESNET:
        if rest.startswith(new + "."):
            return old + rest[len(new) :]
    raise KeyError(rest)


def _unet_key(key: str, layers_per_block: int, attended_up: set[int]) -> str:
    """A diffusers UNet key -> its `model.diffusion_model.*` name."""
    n = layers_per_block
    top, _, leaf = key.rpartition(".")
    if top in _UNET_TOP:
        return f"{_UNET_TOP[top]}.{leaf}"
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        i = 1 + b * (n + 1) + j
        return f"input_blocks.{i}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{i}.1.{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{1 + int(m[1]) * (n + 1) + n}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.match(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        i = b * (n + 1) + j
        return f"output_blocks.{i}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{i}.1.{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        b = int(m[1])
        return f"output_blocks.{b * (n + 1) + n}.{2 if b in attended_up else 1}.conv.{m[2]}"
    raise KeyError(f"no single-file name for UNet key {key}")


def _vae_key(key: str, num_up: int) -> str:
    """A diffusers AutoencoderKL key -> its `first_stage_model.*` name."""
    key = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.{m[2]}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(.+)", key):
        return f"decoder.up.{num_up - 1 - int(m[1])}.block.{m[2]}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
        return f"decoder.up.{num_up - 1 - int(m[1])}.upsample.{m[2]}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        rest = m[2]
        for new, old in _VAE_ATTENTION:
            rest = re.sub(rf"^{re.escape(new)}\.", old + ".", rest)
        return f"{m[1]}.mid.attn_1.{rest}"
    return key  # conv_in, conv_out, norm_out, quant_conv, post_quant_conv keep their names


def _text_model_keys(state: dict) -> dict:
    """CLIP text model keys with the `text_model.` prefix (transformers may store them without it)."""
    return {
        (k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}"): v for k, v in state.items()
    }


def _open_clip(state: dict, prefix: str) -> dict:
    """A transformers CLIPTextModelWithProjection state dict in OpenCLIP's layout (fused q/k/v, resblocks)."""
    state, out, qkv = _text_model_keys(state), {}, {}
    for key, value in state.items():
        if key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()  # OpenCLIP multiplies x @ P
            continue
        if key == "text_model.embeddings.position_embedding.weight":
            out[prefix + "positional_embedding"] = value
            continue
        if key == "text_model.embeddings.token_embedding.weight":
            out[prefix + "token_embedding.weight"] = value
            continue
        if key.startswith("text_model.final_layer_norm."):
            out[prefix + "ln_final." + key.rsplit(".", 1)[1]] = value
            continue
        m = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
        if m is None:
            continue  # position_ids and other buffers
        layer, module, leaf = m[1], m[2], m[3]
        base = f"{prefix}transformer.resblocks.{layer}."
        if (p := re.match(r"self_attn\.([qkv])_proj", module)) is not None:
            qkv.setdefault((base, leaf), {})[p[1]] = value
            continue
        name = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}[module]  # fmt: skip
        out[f"{base}{name}.{leaf}"] = value
    for (base, leaf), parts in qkv.items():
        out[f"{base}attn.in_proj_{leaf}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def to_single_file(pipe) -> dict[str, torch.Tensor]:
    """The original single-file state dict of an SD 1.5 or SDXL diffusers pipeline."""
    unet = pipe.unet
    attended_up = {i for i, block in enumerate(unet.up_blocks) if getattr(block, "attentions", None)}
    lpb = unet.config.layers_per_block
    out = {f"model.diffusion_model.{_unet_key(k, lpb, attended_up)}": v for k, v in unet.state_dict().items()}
    num_up = len(pipe.vae.config.up_block_types)
    for key, value in pipe.vae.state_dict().items():
        name = _vae_key(key, num_up)
        if ".mid.attn_1." in name and name.endswith("weight") and value.ndim == 2 and ".norm." not in name:
            value = value[:, :, None, None]  # the original VAE attention uses 1x1 convolutions
        out[f"first_stage_model.{name}"] = value
    text = _text_model_keys(pipe.text_encoder.state_dict())
    if getattr(pipe, "text_encoder_2", None) is not None:  # SDXL: CLIP ViT-L (HF layout) + OpenCLIP bigG
        out.update({f"conditioner.embedders.0.transformer.{k}": v for k, v in text.items()})
        out.update(_open_clip(pipe.text_encoder_2.state_dict(), "conditioner.embedders.1.model."))
    else:
        out.update({f"cond_stage_model.transformer.{k}": v for k, v in text.items()})
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items() if not k.endswith("position_ids")}


def save_single_file(pipe, path: str) -> str:
    """Write `pipe` as one .safetensors file in the original layout; returns `path`."""
    from safetensors.torch import save_file

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(to_single_file(pipe), path)
    return path
