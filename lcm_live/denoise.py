"""The step loop's parts: one batch's UNet inputs, classifier-free guidance and the scheduler step (vectorised
LCMScheduler.step for LCM rows), and the hooks that stop a UNet call between blocks."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .request import GenerationStopped
from .rows import Row, step_kwargs


class StepCache:
    """What every step of a size reuses: SDXL's size conditioning (1, 6) and the last step's zero noise."""

    def __init__(self, pipe, device: str):
        self.pipe, self.device = pipe, device
        self._time_ids: dict[tuple[int, int], torch.Tensor] = {}
        self._zeros: dict[tuple, torch.Tensor] = {}

    def time_ids(self, row: Row) -> torch.Tensor:
        """Original size, crop (0, 0), target size, made once per size."""
        size = (row.request.height, row.request.width)
        if size not in self._time_ids:
            pipe = self.pipe
            projection = pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None else int(
                row.text["pooled_prompt_embeds"].shape[-1])  # fmt: skip
            ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=row.latents.dtype,
                                         text_encoder_projection_dim=projection)  # fmt: skip
            self._time_ids[size] = ids.to(self.device)
        return self._time_ids[size]

    def noise_for(self, row: Row) -> torch.Tensor:
        """The noise this row's step adds; the last step adds none (its coefficient is 0 too)."""
        if row.index < len(row.noise):
            return row.noise[row.index]
        shape = tuple(row.latents.shape)
        if shape not in self._zeros:
            self._zeros[shape] = torch.zeros(shape, device=row.latents.device, dtype=row.latents.dtype)
        return self._zeros[shape]


def control_values(rows: list[Row]) -> list[tuple[float, ...]]:
    """Per row: timestep, guidance scale and the LCM coefficients of its current step (8 numbers)."""
    values = []
    for row in rows:
        plan = row.plan[row.index] if row.plan is not None else (float(row.timesteps[row.index]),) + (0.0,) * 6
        values.append((plan[0], row.request.guidance_scale, *plan[1:]))
    return values


def unet_inputs(rows: list[Row], control: torch.Tensor, family: str, time_ids: Callable) -> list[torch.Tensor]:
    """[sample, t, embeds (, pooled, time_ids)]: every row's conditional entry, then the unconditional entries
    of guided rows (E entries in all)."""
    guided = [row for row in rows if row.guided]
    entries = [(row, "") for row in rows] + [(row, "negative_") for row in guided]
    sample = torch.cat([row.scheduler.scale_model_input(row.latents, row.timesteps[row.index]) if row.plan is None
                        else row.latents for row in rows])  # fmt: skip  # (B, 4, h, w)
    t = control[:, 0]
    if guided:  # slices, not a list index: indexing a GPU tensor with a list would wait for the GPU
        at = [rows.index(row) for row in guided]
        sample = torch.cat([sample, *(sample[i : i + 1] for i in at)])  # (E, 4, h, w)
        t = torch.cat([t, *(t[i : i + 1] for i in at)])  # (E,)
    inputs = [sample, t, torch.cat([row.text[f"{half}prompt_embeds"] for row, half in entries])]
    if family == "sdxl":
        inputs.append(torch.cat([row.text[f"{half}pooled_prompt_embeds"] for row, half in entries]))
        inputs.append(torch.cat([time_ids(row) for row, _ in entries]))
    return inputs


def update(rows: list[Row], eps: torch.Tensor, control: torch.Tensor, noise_for: Callable, options: dict) -> None:
    """Classifier-free guidance, then each row's scheduler step: all LCM rows at once, others one by one."""
    count = len(rows)
    guided_at = {id(row): count + j for j, row in enumerate(r for r in rows if r.guided)}
    uncond = torch.cat([eps[guided_at.get(id(row), i)].unsqueeze(0) for i, row in enumerate(rows)])
    cond = eps[:count]
    g = control[:, 1].view(-1, 1, 1, 1)
    prediction = (uncond + g * (cond - uncond)).float()  # (B, 4, h, w); unguided rows: cond exactly
    fast = [i for i, row in enumerate(rows) if row.plan is not None]
    if fast:
        picked = (lambda tensor: tensor) if len(fast) == count else (
            lambda tensor: torch.cat([tensor[i : i + 1] for i in fast]))  # fmt: skip
        x = torch.cat([rows[i].latents for i in fast]).float()
        c = picked(control).view(len(fast), 8, 1, 1, 1)  # t, g, sqrt a, sqrt(1-a), c_out, c_skip, prev a, prev 1-a
        noise = torch.cat([noise_for(rows[i]) for i in fast]).float()
        denoised = c[:, 4] * ((x - c[:, 3] * picked(prediction)) / c[:, 2]) + c[:, 5] * x
        new = (c[:, 6] * denoised + c[:, 7] * noise).to(rows[fast[0]].latents.dtype)
        for j, i in enumerate(fast):
            rows[i].latents = new[j : j + 1]
    for i, row in enumerate(rows):
        if row.plan is None:
            out = row.scheduler.step(prediction[i : i + 1].to(row.latents.dtype), row.timesteps[row.index],
                                     row.latents, **step_kwargs(row, options), return_dict=False)  # fmt: skip
            row.latents = out[0]


def abort_hooks(unet, should_abort: Callable[[], bool]) -> list:
    """Hooks that raise GenerationStopped before a UNet block when `should_abort()` says so; remove them after."""

    def check_block(module, args):
        if should_abort():
            raise GenerationStopped(0)

    blocks = [*unet.down_blocks, unet.mid_block, *getattr(unet, "up_blocks", [])]  # a ControlNet has no up blocks
    return [block.register_forward_pre_hook(check_block) for block in blocks if block is not None]
