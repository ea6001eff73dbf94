"""All settings in one frozen dataclass, from command-line flags or LCM_LIVE_* environment variables (Spaces)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields

from .presets import PRESETS, parse_controls


@dataclass(frozen=True)
class Settings:
    preset: str = "sd15"  # a key of PRESETS; "demo" is the embedded model
    base: str | None = None  # custom base model id or folder (overrides the preset's)
    lora: str | None = None  # custom LCM-LoRA id, folder or .safetensors file
    style_lora: str | None = None  # a LoRA stacked on the speed adapter: hub id, folder or .safetensors file
    style_weight: float = 1.0  # the style LoRA's weight when fused
    base_config: str | None = None  # single-file base: a diffusers folder or hub id of its family's configs
    control: str | None = None  # ControlNets to load: "scribble,edges,depth", "scribble=<id, folder or file>"
    device: str = "auto"  # auto, cuda, mps, cpu
    dtype: str = "auto"  # auto, float16, bfloat16, float32
    taesd: bool = True  # decode live frames with TAESD (fast), the settled image with the full VAE
    host: str | None = None  # None: Gradio's default (127.0.0.1, or GRADIO_SERVER_NAME); 0.0.0.0 for the network
    port: int | None = None  # None: 7860 (or GRADIO_SERVER_PORT)
    share: bool = False  # a temporary public gradio.live link
    max_file_size: str = "20mb"  # uploads above this get HTTP 413
    queue_size: int = 64  # queued events above this get "busy, try again"
    offline: bool = False  # never contact the hub (same as HF_HUB_OFFLINE=1)
    compile: bool = False  # torch.compile the UNet of the requested model (slow start, faster steps on CUDA)
    max_cost: int | None = None  # pixels x steps one request may cost; None: the model's native size at 8 steps
    max_batch: int | None = None  # rows per UNet call; None: by device (CPU 8, CUDA 16), 1 turns batching off
    replicas: str | None = None  # Ray Serve mode: "N" replicas, or "MIN:MAX" autoscaled; None: one process
    ray_address: str | None = None  # join this Ray cluster (also RAY_ADDRESS); None: start Ray on this machine
    replica_gpus: float = 0.0  # GPUs per replica (1 on a multi-GPU box: one replica per GPU)
    replica_cpus: float = 1.0  # CPUs per replica; its torch threads are this, rounded down (at least 1)
    # Public by default: what visitors may do beyond generating, and how much of the server one of them may hold.
    allow_model_switch: bool = False  # a Model tab (and /load_model) that switches everyone among the presets
    allow_custom_models: bool = False  # ... and to any hub id or local folder (implies allow_model_switch)
    session_jobs: int = 6  # one browser session's (or API client's) queued + running jobs
    address_jobs: int = 12  # the same for every session from one client address
    trusted_proxies: str | None = None  # proxies whose X-Forwarded-For is believed; None: see app.trusted_proxies

    @property
    def ray_mode(self) -> bool:
        """Serve from Ray Serve replicas instead of this process."""
        return self.replicas is not None or self.ray_address is not None

    @classmethod
    def from_env(cls, environ=os.environ) -> Settings:
        values = {}
        for f in fields(cls):
            raw = environ.get(f"LCM_LIVE_{f.name.upper()}")
            if raw is not None and raw != "":
                values[f.name] = _parse(f.name, raw)
        return cls(**values)

    @classmethod
    def from_args(cls, argv=None, environ=os.environ) -> Settings:
        """Flags override environment variables, which override the defaults."""
        env = cls.from_env(environ)
        parser = argparse.ArgumentParser(prog="app.py", description="lcm-live: a realtime LCM-LoRA image playground")
        parser.add_argument("--preset", choices=sorted(PRESETS), default=env.preset, help="model preset")
        parser.add_argument("--base", default=env.base, help="custom base model: hub id or local folder")
        parser.add_argument("--lora", default=env.lora, help="custom LCM-LoRA: hub id, folder or .safetensors")
        parser.add_argument("--style-lora", default=env.style_lora,
                            help="a style LoRA fused on top of the speed adapter: hub id, folder or .safetensors")  # fmt: skip
        parser.add_argument("--style-weight", type=float, default=env.style_weight, help="the style LoRA's weight")
        parser.add_argument("--base-config", default=env.base_config,
                            help="for a single-file --base: a diffusers folder (or hub id) with its family's configs")  # fmt: skip
        parser.add_argument("--control", default=env.control,
                            help="ControlNets to load: scribble, edges, depth (comma-separated; the family's published "
                                 "ones) or control=<hub id, folder or file>")  # fmt: skip
        parser.add_argument("--device", default=env.device, choices=["auto", "cuda", "mps", "cpu"])
        parser.add_argument("--dtype", default=env.dtype, choices=["auto", "float16", "bfloat16", "float32"])
        parser.add_argument("--taesd", action=argparse.BooleanOptionalAction, default=env.taesd,
                            help="decode with TAESD (madebyollin/taesd, taesdxl)")  # fmt: skip
        parser.add_argument("--host", default=env.host, help="address to listen on (0.0.0.0 for the network)")
        parser.add_argument("--port", type=int, default=env.port)
        parser.add_argument("--share", action=argparse.BooleanOptionalAction, default=env.share)
        parser.add_argument("--max-file-size", default=env.max_file_size)
        parser.add_argument("--queue-size", type=int, default=env.queue_size)
        parser.add_argument("--offline", action=argparse.BooleanOptionalAction, default=env.offline,
                            help="never contact the model hub")  # fmt: skip
        parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=env.compile,
                            help="torch.compile the UNet (compile time is shown on the page)")  # fmt: skip
        parser.add_argument("--max-cost", type=int, default=env.max_cost,
                            help="most pixels x UNet steps one request may cost (default: native size at 8 steps)")  # fmt: skip
        parser.add_argument("--max-batch", type=int, default=env.max_batch,
                            help="most requests denoised together in one UNet call (1: no batching)")  # fmt: skip
        parser.add_argument("--allow-model-switch", action=argparse.BooleanOptionalAction,
                            default=env.allow_model_switch,
                            help="let visitors switch the model, for everyone, among the presets")  # fmt: skip
        parser.add_argument("--allow-custom-models", action=argparse.BooleanOptionalAction,
                            default=env.allow_custom_models,
                            help="let visitors load any hub id or local folder (implies --allow-model-switch)")  # fmt: skip
        parser.add_argument("--session-jobs", type=int, default=env.session_jobs,
                            help="queued + running jobs one session may have")  # fmt: skip
        parser.add_argument("--address-jobs", type=int, default=env.address_jobs,
                            help="queued + running jobs all sessions from one address may have")  # fmt: skip
        parser.add_argument("--trusted-proxies", default=env.trusted_proxies,
                            help="comma-separated addresses or networks of reverse proxies whose X-Forwarded-For "
                                 "names the visitor (default: 127.0.0.1,::1; on a Hugging Face Space also its "
                                 "private networks)")  # fmt: skip
        parser.add_argument("--replicas", default=env.replicas, metavar="N|MIN:MAX",
                            help="serve from N Ray Serve replicas (or autoscale MIN:MAX); needs ray[serve]")  # fmt: skip
        parser.add_argument("--ray-address", default=env.ray_address or environ.get("RAY_ADDRESS") or None,
                            help="join this Ray cluster (default: RAY_ADDRESS; else start Ray here)")  # fmt: skip
        parser.add_argument("--replica-gpus", type=float, default=env.replica_gpus, help="GPUs per replica")
        parser.add_argument("--replica-cpus", type=float, default=env.replica_cpus, help="CPUs per replica")
        args = parser.parse_args(argv)
        try:
            if args.replicas is not None:
                replica_range(args.replicas)
            if args.replica_gpus < 0 or args.replica_cpus <= 0:
                raise ValueError("--replica-gpus must be at least 0 and --replica-cpus above 0.")
            parse_controls(args.control)
        except ValueError as error:
            parser.error(str(error))
        return cls(**vars(args))


def replica_range(spec: str) -> tuple[int, int]:
    """'N' -> (N, N); 'MIN:MAX' -> (MIN, MAX), autoscaled; a ValueError naming the form for anything else."""
    low, _, high = str(spec).partition(":")
    try:
        bounds = int(low), int(high or low)
    except ValueError:
        bounds = (0, 0)
    if not 1 <= bounds[0] <= bounds[1]:
        raise ValueError(f"--replicas must be N or MIN:MAX with 1 <= MIN <= MAX; got {spec!r}.")
    return bounds


def _parse(name: str, raw: str):
    kind = {f.name: f.type for f in fields(Settings)}[name]
    if kind == "bool":
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"LCM_LIVE_{name.upper()} must be true or false; got {raw!r}.")
    if kind in ("int", "int | None"):
        return int(raw)
    if kind == "float":
        return float(raw)
    return raw
