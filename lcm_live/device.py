"""Where and in what precision the model runs: chosen for the user, overridable."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


DTYPES = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float32": torch.float32, "fp32": torch.float32}  # fmt: skip


@dataclass(frozen=True)
class Runtime:
    device: str  # "cuda", "mps" or "cpu"
    dtype: torch.dtype
    channels_last: bool  # NHWC memory layout for the UNet and VAE convolutions

    @property
    def label(self) -> str:
        return f"{self.device} {str(self.dtype).removeprefix('torch.')}"

    @property
    def variant(self) -> str | None:
        """The weight-file variant worth asking the hub for (fp16 files are half the download)."""
        return "fp16" if self.dtype == torch.float16 else None


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (AVX-512 BF16 or AMX), where bf16 beats fp32 ~2x."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_runtime(device: str = "auto", dtype: str = "auto", channels_last: bool | None = None) -> Runtime:
    """CUDA fp16, Apple MPS fp16, CPU bf16 where the CPU has it (else fp32); channels_last on CUDA and CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    if device not in ("cuda", "mps", "cpu") and not device.startswith("cuda:"):
        raise ValueError(f"Unknown device {device!r}; use auto, cuda, mps or cpu.")
    if dtype == "auto":
        if device == "cpu":
            chosen = torch.bfloat16 if cpu_supports_bf16() else torch.float32
        else:
            chosen = torch.float16
    elif dtype in DTYPES:
        chosen = DTYPES[dtype]
    else:
        raise ValueError(f"Unknown dtype {dtype!r}; use auto, float16, bfloat16 or float32.")
    if channels_last is None:
        channels_last = device != "mps"
    return Runtime(device, chosen, channels_last)
