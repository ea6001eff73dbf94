"""ControlNets and T2I-Adapters in the engine's batched step: loading them as diffusers' docs do, refusing one of
another family, and one batch's residuals, each row with its own control image and conditioning scale.

A batch makes one ControlNet call per ControlNet its rows use (over those rows' entries only) and one UNet call for
all rows: rows without that ControlNet get zero residuals, which leave the UNet's sums exactly as they were. So rows
with different controls, or none, still share the UNet call, its larger cost. A T2I-Adapter runs once per row, when
the row starts (its features do not depend on the step); each step only adds them, zeros for rows without.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import ControlNetModel, T2IAdapter

from .device import Runtime
from .loading import FAMILY_NAMES, _is_hub_file, _load_error, adapter_source, cache_first
from .presets import CONTROL_IDS, ModelSpec
from .request import ModelLoadError
from .rows import Row


def load_controlnets(spec: ModelSpec, family: str, unet, runtime: Runtime, local_files_only: bool = False,
                     report=None) -> dict[str, ControlNetModel | T2IAdapter]:  # fmt: skip
    """The spec's ControlNets by control name, on the runtime's device; ModelLoadError naming one that cannot load
    or does not fit this base."""
    nets = {}
    for kind, source in spec.controls:
        source = source or CONTROL_IDS.get(family, {}).get(kind)
        if source is None:
            raise ModelLoadError(f"There is no default {FAMILY_NAMES[family]} ControlNet for {kind}; name one with "
                                 f"--control {kind}=<hub id, folder or file>.")  # fmt: skip
        if report:
            report(0.8, f"Loading the {kind} ControlNet {source}")
        net = cache_first(lambda local, source=source: load_controlnet(source, runtime, local), local_files_only)
        check_fits(net, unet, source, family)
        net.to(runtime.device)
        if runtime.channels_last:
            net.to(memory_format=torch.channels_last)
        nets[kind] = net.eval()
    return nets


def load_controlnet(source: str, runtime: Runtime, local_files_only: bool = False) -> ControlNetModel | T2IAdapter:
    """One ControlNet or T2I-Adapter: a diffusers folder or hub id (`from_pretrained`, the fp16 variant where there
    is one; its config says which), or a single ControlNet .safetensors file, local or `owner/repo/file.safetensors`
    (`from_single_file`)."""
    try:
        path = Path(source).expanduser()
        if path.is_file() or _is_hub_file(source):
            if not path.is_file():
                from huggingface_hub import hf_hub_download

                path = Path(hf_hub_download(*adapter_source(source), local_files_only=local_files_only))
            return ControlNetModel.from_single_file(str(path), torch_dtype=runtime.dtype,
                                                    local_files_only=local_files_only)  # fmt: skip
        kwargs = dict(torch_dtype=runtime.dtype, local_files_only=local_files_only)
        kind = ControlNetModel.load_config(source, local_files_only=local_files_only).get("_class_name")
        model_class = T2IAdapter if kind == "T2IAdapter" else ControlNetModel
        try:
            return model_class.from_pretrained(source, variant=runtime.variant, **kwargs)
        except (OSError, ValueError) as error:
            if runtime.variant is None or "variant" not in str(error).lower():
                raise
            return model_class.from_pretrained(source, **kwargs)  # no fp16 files published
    except Exception as error:
        raise _load_error(source, "ControlNet", error) from error


def family_of(config) -> str:
    """'sdxl' for a ControlNet (or UNet) with SDXL's size conditioning or an SDXL T2I-Adapter, else 'sd15'."""
    if "adapter_type" in config:
        return "sdxl" if config.adapter_type == "full_adapter_xl" else "sd15"
    return "sdxl" if config.addition_embed_type == "text_time" else "sd15"


def check_fits(net: ControlNetModel | T2IAdapter, unet, source: str, family: str) -> None:
    """ModelLoadError when the ControlNet (or adapter) was made for another family or another shape of UNet."""
    made_for, what = family_of(net.config), type(net).__name__.replace("Model", "")
    if made_for != family:
        raise ModelLoadError(f"The {what} '{source}' is made for {FAMILY_NAMES[made_for]} models, but this model "
                             f"is {FAMILY_NAMES[family]}; use an {FAMILY_NAMES[family]} {what}.")  # fmt: skip
    if isinstance(net, T2IAdapter):
        return  # its features' shapes are checked by the UNet on the first step
    for name in ("cross_attention_dim", "block_out_channels", "in_channels"):
        mine, theirs = _plain(getattr(net.config, name)), _plain(getattr(unet.config, name))
        if mine != theirs:
            raise ModelLoadError(f"The ControlNet '{source}' does not fit this {FAMILY_NAMES[family]} model: its "
                                 f"{name} is {mine}, the model's {theirs}.")  # fmt: skip


def _plain(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


def control_tensor(image, width: int, height: int, to_device, channels: int = 3) -> torch.Tensor:
    """A control image -> (1, C, H, W) in [0, 1] on the device, as the ControlNet and adapter pipelines make it
    (RGB, or grey for a 1-channel adapter; no normalisation); cropped to the image's shape first, as inputs are."""
    import numpy as np

    from .rows import fill_crop

    array = np.array(fill_crop(image.convert("RGB" if channels == 3 else "L"), width, height))  # (H, W[, 3]) uint8
    array = torch.from_numpy(array.reshape(height, width, -1))
    return (to_device(array).permute(2, 0, 1).unsqueeze(0).float() / 255.0).contiguous()


def adapter_features(adapter: T2IAdapter, control: torch.Tensor, scale: float) -> list[torch.Tensor]:
    """A T2I-Adapter's features for one row, scaled, as the adapter pipelines make them once per image."""
    with torch.inference_mode():
        return [feature * scale for feature in adapter(control.to(adapter.dtype))]


def residuals(nets: dict[str, ControlNetModel], rows: list[Row], inputs: list[torch.Tensor]) -> dict | None:
    """The UNet's extra kwargs for this batch: every entry's down and mid residuals (zeros where its row has no
    control), each scaled by its row's conditioning scale; None when no row has a control."""
    entries = rows + [row for row in rows if row.guided]  # the order of unet_inputs: conditional, then unconditional
    used = [kind for kind in nets if any(row.request.control == kind for row in rows)]
    adapted = [kind for kind in used if isinstance(nets[kind], T2IAdapter)]
    used = [kind for kind in used if kind not in adapted]
    extra = {"down_intrablock_additional_residuals": _intrablock(entries, adapted)} if adapted else {}
    if not used:
        return extra or None
    sample, t, embeds = inputs[:3]
    outputs: dict[str, tuple[list[torch.Tensor], torch.Tensor]] = {}
    for kind in used:  # one call per ControlNet, over its rows' entries
        at = [e for e, row in enumerate(entries) if row.request.control == kind]
        pick = _picker(at, len(entries))
        added = {"text_embeds": pick(inputs[3]), "time_ids": pick(inputs[4])} if len(inputs) > 3 else None
        cond = torch.cat([entries[e].control for e in at]).to(sample.dtype)  # (n, 3, H, W)
        down, mid = nets[kind](pick(sample), pick(t), encoder_hidden_states=pick(embeds), controlnet_cond=cond,
                               conditioning_scale=1.0, added_cond_kwargs=added, return_dict=False)  # fmt: skip
        scale = torch.tensor([entries[e].request.control_scale for e in at], dtype=sample.dtype)
        scale = scale.to(sample.device).view(-1, 1, 1, 1)
        outputs[kind] = ([d * scale for d in down], mid * scale)
    return {**_assembled(entries, used, outputs), **extra}


def _intrablock(entries: list[Row], adapted: list[str]) -> list[torch.Tensor]:
    """Every entry's adapter features, per level (zeros for rows without an adapter); a new list per UNet call (the
    UNet takes its items out)."""
    model = next(row.features for row in entries if row.request.control in adapted)
    levels = [[row.features[k] if row.request.control in adapted else torch.zeros_like(feature) for row in entries]
              for k, feature in enumerate(model)]  # fmt: skip
    return [torch.cat(level) if len(level) > 1 else level[0] for level in levels]


def _picker(at: list[int], count: int):
    """Entries `at` of a batch tensor, by slices (a list index on a GPU tensor would wait for the GPU)."""
    if at == list(range(count)):
        return lambda tensor: tensor
    return lambda tensor: torch.cat([tensor[e : e + 1] for e in at])


def _assembled(entries: list[Row], used: list[str], outputs: dict) -> dict:
    """Per-ControlNet outputs back in entry order, zeros for entries of rows without control."""
    if len(used) == 1 and all(row.request.control == used[0] for row in entries):
        down, mid = outputs[used[0]]
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
    taken = dict.fromkeys(used, 0)
    parts: list[list[torch.Tensor]] = []  # per entry: its down residuals, then its mid residual
    any_down, any_mid = outputs[used[0]]
    for row in entries:
        kind = row.request.control if row.request.control in outputs else None
        if kind is None:
            parts.append([torch.zeros_like(d[:1]) for d in any_down] + [torch.zeros_like(any_mid[:1])])
            continue
        j = taken[kind]
        taken[kind] += 1
        down, mid = outputs[kind]
        parts.append([d[j : j + 1] for d in down] + [mid[j : j + 1]])
    columns = [torch.cat(column) for column in zip(*parts)]
    return {"down_block_additional_residuals": columns[:-1], "mid_block_additional_residual": columns[-1]}
