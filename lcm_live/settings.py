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
    # What any one request or connection may cost, before Gradio or a handler sees it (lcm_live/guard.py).
    max_body_size: str | None = None  # any request body; None: 4x max_file_size (a data: URL is 4/3 of its file)
    upload_quota: str = "200mb"  # bytes one address may upload per 10 minutes (files and sketch canvases)
    header_timeout: float = 10.0  # seconds a connection has to send a request's headers (slowloris)
    address_connections: int = 64  # open connections per address (trusted proxies are not counted)
    verbose: bool = False  # the libraries' warnings, progress bars and full tracebacks (failed loads and requests)
    live_socket: bool = True  # webcam frames over a WebSocket (/live/ws); off: the Gradio stream only
    live_quality: int = 80  # JPEG quality (1-95) of the frames the live socket sends
    openai_api: bool = False  # serve an OpenAI-style images API under /v1 (lcm_live/openai_api.py)
    api_key: str | None = None  # a bearer key the OpenAI-style API (and MCP) require; None: open like the page
    mcp: bool = False  # serve the API endpoints as MCP tools (Gradio's MCP server, gradio[mcp])
    zerogpu: bool = False  # ZeroGPU mode (lcm_live/zerogpu.py); on by itself where SPACES_ZERO_GPU is set
    zerogpu_duration: int = 30  # seconds of GPU each visitor's call declares (and is charged at most)
    zerogpu_idle: float = 2.0  # a visitor's call lets the GPU go after this long without input

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
        parser.add_argument("--max-body-size", default=env.max_body_size,
                            help="largest request body (default: 4x --max-file-size)")  # fmt: skip
        parser.add_argument("--upload-quota", default=env.upload_quota,
                            help="bytes one address may upload per 10 minutes (default 200mb)")  # fmt: skip
        parser.add_argument("--header-timeout", type=float, default=env.header_timeout,
                            help="seconds a connection has to send a request's headers")  # fmt: skip
        parser.add_argument("--address-connections", type=int, default=env.address_connections,
                            help="open connections one address may hold (trusted proxies are not counted)")  # fmt: skip
        parser.add_argument("--live-socket", action=argparse.BooleanOptionalAction, default=env.live_socket,
                            help="stream webcam frames over a WebSocket (off: the slower Gradio stream only)")  # fmt: skip
        parser.add_argument("--live-quality", type=int, default=env.live_quality,
                            help="JPEG quality (1-95) of the frames the live socket sends back")  # fmt: skip
        parser.add_argument("--openai-api", action=argparse.BooleanOptionalAction, default=env.openai_api,
                            help="serve an OpenAI-style images API at /v1 (generations, edits, models)")  # fmt: skip
        parser.add_argument("--api-key", default=env.api_key,
                            help="a key API clients must send as `Authorization: Bearer <key>` (or LCM_LIVE_API_KEY)")  # fmt: skip
        parser.add_argument("--mcp", action=argparse.BooleanOptionalAction, default=env.mcp,
                            help="serve the API endpoints as MCP tools at /gradio_api/mcp/ (needs gradio[mcp])")  # fmt: skip
        parser.add_argument("--zerogpu", action=argparse.BooleanOptionalAction, default=env.zerogpu,
                            help="serve each visitor from GPU calls of their own (default: on where SPACES_ZERO_GPU "
                                 "is set, i.e. on a ZeroGPU Space)")  # fmt: skip
        parser.add_argument("--zerogpu-duration", type=int, default=env.zerogpu_duration,
                            help="GPU seconds each visitor's call declares (ZeroGPU admits it if their quota covers it)")  # fmt: skip
        parser.add_argument("--zerogpu-idle", type=float, default=env.zerogpu_idle,
                            help="seconds without input after which a visitor's call lets the GPU go")  # fmt: skip
        parser.add_argument("--replicas", default=env.replicas, metavar="N|MIN:MAX",
                            help="serve from N Ray Serve replicas (or autoscale MIN:MAX); needs ray[serve]")  # fmt: skip
        parser.add_argument("--ray-address", default=env.ray_address or environ.get("RAY_ADDRESS") or None,
                            help="join this Ray cluster (default: RAY_ADDRESS; else start Ray here)")  # fmt: skip
        parser.add_argument("--replica-gpus", type=float, default=env.replica_gpus, help="GPUs per replica")
        parser.add_argument("--replica-cpus", type=float, default=env.replica_cpus, help="CPUs per replica")
        parser.add_argument("--verbose", action=argparse.BooleanOptionalAction, default=env.verbose,
                            help="also the libraries' warnings and progress bars, and full tracebacks")  # fmt: skip
        args = parser.parse_args(argv)
        try:
            if args.replicas is not None:
                replica_range(args.replicas)
            if not 1 <= args.live_quality <= 95:
                raise ValueError(f"--live-quality must be from 1 to 95; got {args.live_quality}.")
            if args.zerogpu_duration < 1 or args.zerogpu_idle <= 0:
                raise ValueError("--zerogpu-duration must be at least 1 and --zerogpu-idle above 0.")
            if args.replica_gpus < 0 or args.replica_cpus <= 0:
                raise ValueError("--replica-gpus must be at least 0 and --replica-cpus above 0.")
            for flag in ("max_file_size", "max_body_size", "upload_quota"):
                if getattr(args, flag) is not None:
                    byte_size(getattr(args, flag), "--" + flag.replace("_", "-"))
            if args.header_timeout <= 0 or args.address_connections < 1:
                raise ValueError("--header-timeout must be above 0 and --address-connections at least 1.")
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


def byte_size(text: str | int, name: str = "size") -> int:
    """'20mb' -> 20971520 (Gradio's units: b, kb, mb, gb, tb); a ValueError naming the form for anything else."""
    if isinstance(text, int):
        return text
    from gradio.utils import _parse_file_size

    try:
        return int(_parse_file_size(str(text)))
    except (ValueError, TypeError):
        raise ValueError(f"{name} must be a size such as 20mb or 500kb; got {text!r}.") from None


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
