"""lcm-live: read settings, start on the embedded model, load the requested one in the background, serve."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
import time
from dataclasses import replace

from lcm_live.settings import Settings


CACHE_RETENTION_S = 900  # uploads and outputs older than this are deleted (Blocks.delete_cache)
UPLOAD_WINDOW_S = 600  # the window of --upload-quota
MAX_FILES_PER_UPLOAD = 16  # files in one upload request (the page sends one)
MAX_EVENTS = 256  # events in progress at once (Gradio's max_threads); more wait in the queue, up to --queue-size
PRIVATE_NETWORKS = "10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,fc00::/7"  # where a Space's own proxies live
log = logging.getLogger("lcm_live")


def build(settings: Settings):
    """The Blocks page and its handlers for `settings`; the embedded model serves until the requested one loads."""
    if settings.offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    if settings.ray_mode:
        return build_on_replicas(settings)
    from lcm_live import zerogpu

    zero = zerogpu.wanted(settings)
    if zero:
        zerogpu.gpu_decorator()  # imports `spaces` before torch: on ZeroGPU it patches torch for the start-up load
    from gradio.utils import get_upload_folder

    from lcm_live.device import pick_runtime
    from lcm_live.handlers import LiveApp, OutputStore
    from lcm_live.live import Limits, LiveLoop
    from lcm_live.models import ModelManager, SwitchPolicy
    from lcm_live.presets import PRESETS, parse_controls, resolve_spec
    from lcm_live.ui import build_ui

    runtime = pick_runtime(settings.device, settings.dtype)
    wanted = resolve_spec(settings.preset, settings.base, settings.lora, settings.style_lora, settings.style_weight,
                          settings.base_config)  # fmt: skip
    if settings.control:
        wanted = replace(wanted, controls=parse_controls(settings.control))
    store = OutputStore()
    # Visitors use the operator's model unless told otherwise; nothing loads from uploads or outputs.
    uploads = (get_upload_folder(), os.path.join(tempfile.gettempdir(), "gradio"))  # GRADIO_TEMP_DIR, its default
    # No switching in ZeroGPU mode: its one model is loaded at start-up, where ZeroGPU moves models to its GPUs.
    policy = SwitchPolicy(presets=settings.allow_model_switch and not zero,
                          custom=settings.allow_custom_models and not zero,
                          refused_roots=(*uploads, str(store.folder)))  # fmt: skip
    manager = ModelManager(runtime, taesd=settings.taesd, offline=settings.offline,
                           auto_dtype=settings.dtype == "auto", compile=settings.compile, policy=policy)  # fmt: skip
    # Up in about a second on the embedded model, whatever the network does.
    limits = Limits(max_cost=settings.max_cost, session_jobs=settings.session_jobs,
                    address_jobs=settings.address_jobs)  # fmt: skip
    if zero:  # the requested model at start-up, as ZeroGPU expects; each visitor's GPU work in calls of their own
        loop = zerogpu.ZeroGpuLoop(zerogpu.load_engine(manager, wanted), limits, settings.zerogpu_duration,
                                   settings.zerogpu_idle)  # fmt: skip
    else:
        loop = LiveLoop(manager.load_now(PRESETS["demo"], compile=settings.compile and wanted.is_embedded), limits,
                        max_batch=settings.max_batch)  # fmt: skip
    manager.attach(loop)
    if wanted != PRESETS["demo"] and not zero:  # another model, or the embedded one with other adapters or controls
        manager.switch(wanted)
        log.info("serving the embedded demo model while %s loads in the background (the page shows its progress)",
                 wanted.name)  # fmt: skip
    else:
        log.info("serving %s", wanted.name if zero else "the embedded demo model")
    app = LiveApp(manager, loop, store)
    if settings.live_socket:
        attach_sockets(app, settings)
    demo = build_ui(app)
    demo.queue(max_size=settings.queue_size, default_concurrency_limit=None)
    return demo, app


def build_on_replicas(settings: Settings):
    """The page, served by Ray Serve replicas that each own an engine; SystemExit saying why when Ray cannot serve."""
    from lcm_live.handlers import LiveApp
    from lcm_live.live import Limits
    from lcm_live.presets import resolve_spec
    from lcm_live.ui import build_ui

    try:
        from lcm_live import replicas
    except ImportError as error:
        raise SystemExit(f"lcm-live: --replicas and --ray-address need Ray Serve ({error}). Install it with "
                         "`pip install -r requirements-ray.txt`, or run without them (one process).") from error  # fmt: skip
    try:
        manager, loop = replicas.start(settings, resolve_spec(settings.preset, settings.base, settings.lora))
    except replicas.ScaleOutError as error:
        raise SystemExit(f"lcm-live: {error}") from error
    # The page's own share of the limits (one-shot places per address, slider bounds); no visitor switches models here.
    limits = Limits(max_cost=settings.max_cost, session_jobs=settings.session_jobs,
                    address_jobs=settings.address_jobs)  # fmt: skip
    app = LiveApp(manager, loop, limits=limits)
    if settings.live_socket:
        attach_sockets(app, settings)
    try:
        demo = build_ui(app)
    except BaseException:
        manager.close()  # nothing half-up
        raise
    demo.queue(max_size=settings.queue_size, default_concurrency_limit=None)
    return demo, app


def attach_sockets(app, settings: Settings) -> None:
    """The live WebSocket for webcam frames (lcm_live/stream.py), capped as uploads are."""
    from lcm_live.stream import attach

    attach(app, settings.max_file_size, settings.live_quality)


def launch(settings: Settings, built=None, **options):
    """Build (or take `built`, a (demo, app) pair) and start the server; `options` go to `Blocks.launch` (the tests
    pass prevent_thread_lock)."""
    from starlette.middleware import Middleware

    from lcm_live.connections import guarded_server
    from lcm_live.guard import RequestGuard
    from lcm_live.ui import CSS

    demo, app = built or build(settings)
    if app.sockets is not None:  # the live socket, served beside the page's own routes
        from lcm_live.stream import routes

        kwargs = dict(options.pop("app_kwargs", None) or {})
        kwargs["routes"] = [*kwargs.get("routes", []), *routes(app.sockets)]
        options["app_kwargs"] = kwargs
    proxies = trusted_proxies(settings)
    if proxies is not None:  # uvicorn reads it when Gradio starts the server, below
        os.environ["FORWARDED_ALLOW_IPS"] = proxies
    # Every request is bounded before Gradio's routes see it; connections by the server's protocol (slowloris).
    guard = Middleware(RequestGuard, bounds=request_bounds(settings), blocks=demo)
    kwargs = dict(options.pop("app_kwargs", None) or {})
    kwargs["middleware"] = [guard, *kwargs.get("middleware", [])]  # the outermost of the app's own middleware
    options["app_kwargs"] = kwargs
    sweep_upload_folder(demo.delete_cache[1] if demo.delete_cache else CACHE_RETENTION_S)
    # Gradio runs at most `max_threads` events at once (40 by default), whatever the concurrency limits; a live
    # keystroke holds one until the loop answers it, so 20 people typing filled them and then the queue (503s).
    options.setdefault("max_threads", MAX_EVENTS)
    options.setdefault("quiet", not settings.verbose)  # Gradio's own start lines: ours below say the URL
    block = not options.pop("prevent_thread_lock", False)
    add_protocols(settings, app, options)
    # show_error=False: visitors see the app's own messages (gr.Error), never an internal exception's text,
    # which can name server paths ("Cannot move /srv/app/x.png ..."); those go to the server log.
    try:
        with guarded_server(connection_limits(settings)):
            demo.launch(server_name=settings.host, server_port=settings.port, share=settings.share,
                        max_file_size=settings.max_file_size, show_error=False, css=CSS, prevent_thread_lock=True,
                        **options)  # fmt: skip
    except BaseException:
        close(app)  # nothing half-up: replicas started for this page go too
        raise
    if demo.delete_cache:
        start_cache_sweeper(demo, *demo.delete_cache)
    log.info("open %s", demo.share_url or demo.local_url)
    if block:
        demo.block_thread()
    return demo, app


def request_bounds(settings: Settings):
    """What any one request may cost (lcm_live/guard.py), from the settings."""
    from lcm_live.guard import Bounds
    from lcm_live.request import MAX_TEXT_CHARS
    from lcm_live.settings import byte_size

    upload = byte_size(settings.max_file_size)
    body = byte_size(settings.max_body_size) if settings.max_body_size else 4 * upload
    waiting = min(max(8, settings.address_jobs), max(1, settings.queue_size // 4))  # the queue stays open to others
    return Bounds(max_body=body, max_text_chars=MAX_TEXT_CHARS, upload_quota=byte_size(settings.upload_quota),
                  upload_window_s=UPLOAD_WINDOW_S, max_files=MAX_FILES_PER_UPLOAD, address_events=waiting,
                  verbose=settings.verbose)  # fmt: skip


def connection_limits(settings: Settings):
    """The server's connection bounds (lcm_live/connections.py); trusted proxies as uvicorn will read them."""
    from lcm_live.connections import ConnectionLimits

    trusted = os.environ.get("FORWARDED_ALLOW_IPS") or "127.0.0.1,::1"
    return ConnectionLimits(settings.header_timeout, settings.address_connections, trusted)


def sweep_upload_folder(age: float, folder: str | None = None) -> int:
    """Delete files older than `age` seconds from Gradio's upload cache, whichever process wrote them; how many.

    Gradio sweeps only the files its own process cached, so a process that crashed or was stopped left its
    uploads behind for good."""
    from gradio.utils import get_upload_folder

    root, removed, now = folder or get_upload_folder(), 0, time.time()
    for directory, _, names in os.walk(root, topdown=False):
        for name in names:
            path = os.path.join(directory, name)
            try:
                if now - os.lstat(path).st_mtime > age:
                    os.remove(path)
                    removed += 1
            except OSError:
                continue
        if directory != root:
            with contextlib.suppress(OSError):
                os.rmdir(directory)  # only when empty
    return removed


def add_protocols(settings: Settings, app, options: dict) -> None:
    """The opt-in protocols, on the page's own server: the OpenAI-style API's routes; MCP and its key guard."""
    app_kwargs = options.setdefault("app_kwargs", {})
    if settings.openai_api:
        from lcm_live.openai_api import routes, upload_limit

        app_kwargs["routes"] = [*app_kwargs.get("routes", []),
                                *routes(app, settings.api_key, upload_limit(settings.max_file_size))]  # fmt: skip
    if settings.mcp:
        from starlette.middleware import Middleware

        from lcm_live.mcp_server import McpGuard, check_installed

        check_installed()
        options.setdefault("mcp_server", True)
        app_kwargs["middleware"] = [*app_kwargs.get("middleware", []), Middleware(McpGuard, api_key=settings.api_key)]


def close(app) -> None:
    """Stop the app's live loop, or its replicas (and the Ray instance started for them)."""
    closing = getattr(app.manager, "close", None)  # Ray mode: the replicas' manager takes all down
    if closing is not None:
        closing()
    else:
        app.loop.close()


def trusted_proxies(settings: Settings, environ=os.environ) -> str | None:
    """The proxies whose X-Forwarded-For names a visitor's address, for uvicorn's FORWARDED_ALLOW_IPS.

    --trusted-proxies if given; else FORWARDED_ALLOW_IPS if set; else on a Hugging Face Space (where every request
    comes through the Space's proxies, so that all visitors would share one address) loopback and private networks;
    else None: uvicorn's default, 127.0.0.1 and ::1. Uvicorn takes the last address that is not a trusted proxy.
    """
    if settings.trusted_proxies:
        return settings.trusted_proxies
    if environ.get("FORWARDED_ALLOW_IPS"):
        return None
    if environ.get("SPACE_ID") or environ.get("SYSTEM") == "spaces":
        return f"127.0.0.1,::1,{PRIVATE_NETWORKS}"
    return None


def sweep_cache(blocks, age: float) -> int:
    """Delete the app's cached files older than `age` seconds; how many went.

    Gradio's own sweep (delete_cache) iterates the live sets of cached files, so under steady traffic it dies
    at once with "Set changed size during iteration" and the cache then only grows. This one iterates copies.
    """
    keep = set().union(*(getattr(block, "keep_in_cache", set()) for block in list(blocks.blocks.values())))
    removed, now = 0, time.time()
    for files in list(blocks.temp_file_sets):
        gone = set()
        for name in list(files):
            if name in keep:
                continue
            try:
                if now - os.lstat(name).st_ctime > age:
                    os.remove(name)
                    removed += 1
                    gone.add(name)
            except FileNotFoundError:
                gone.add(name)
        files.difference_update(gone)
    return removed


def start_cache_sweeper(demo, frequency: float, age: float) -> threading.Thread:
    """Every `frequency` seconds, while `demo` runs, delete its cached files older than `age` seconds."""

    def sweep_forever():
        while True:
            time.sleep(frequency)
            if not demo.is_running:
                return
            try:
                sweep_cache(demo, age)
            except Exception as error:  # a bad pass must not end the sweeping
                print(f"cache sweep: {type(error).__name__}: {error}", file=sys.stderr)

    thread = threading.Thread(target=sweep_forever, name="lcm-live-cache-sweeper", daemon=True)
    thread.start()
    return thread


if __name__ == "__main__":
    from lcm_live import console

    settings = Settings.from_args(sys.argv[1:])
    console.setup(settings.verbose)  # before diffusers and transformers are first imported
    launch(settings)
