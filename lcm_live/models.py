"""Which model serves: the embedded demo model at once, the requested one as soon as it has loaded.

Start-up never waits on the network. The page comes up on the embedded model in about a second; the requested
hub model loads (downloading if it must) on a background thread, with its progress shown, and takes over when
ready. When it cannot be had (offline, nothing cached), the embedded model stays and the page says why.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, replace

import torch

from .device import Runtime
from .engine import Engine
from .presets import ModelSpec
from .request import ModelLoadError


@dataclass
class LoadStatus:
    loading: str | None = None  # the model being loaded, if any
    fraction: float = 0.0
    message: str = ""
    error: str | None = None  # why the last load failed
    seconds: float = 0.0  # how long the last load took


class ModelManager:
    """Loads models off the request path and hands each finished one to the live loop."""

    def __init__(self, runtime: Runtime, taesd: bool = False, offline: bool = False, auto_dtype: bool = False,
                 compile: bool = False):  # fmt: skip
        self.runtime, self.taesd, self.compile = runtime, taesd, compile
        self.auto_dtype = auto_dtype  # the dtype was picked for the user, not asked for
        self.offline = offline or os.environ.get("HF_HUB_OFFLINE", "") in ("1", "true", "True")
        self.loop = None  # set by attach()
        self.status = LoadStatus()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def attach(self, loop) -> None:
        self.loop = loop

    @property
    def engine(self) -> Engine:
        return self.loop.engine

    def runtime_for(self, spec: ModelSpec) -> Runtime:
        """The runtime for `spec`: the tiny embedded model runs faster in fp32 than in bf16 on a CPU."""
        if spec.is_embedded and self.runtime.device == "cpu" and self.auto_dtype:
            return replace(self.runtime, dtype=torch.float32)
        return self.runtime

    def load_now(self, spec: ModelSpec, compile: bool = False) -> Engine:
        """Load `spec` on this thread (used for the embedded model at start-up)."""
        embedded = spec.is_embedded
        return Engine.load(spec, self.runtime_for(spec), taesd=self.taesd and not embedded,
                           local_files_only=self.offline, compile=compile)  # fmt: skip

    def switch(self, spec: ModelSpec) -> bool:
        """Start loading `spec` in the background; False if a load is already running."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return False
            self.status = LoadStatus(loading=spec.name, message="Starting")
            self._thread = threading.Thread(target=self._load, args=(spec,), name="lcm-live-loader", daemon=True)
            self._thread.start()
            return True

    def wait(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _progress(self, fraction: float, message: str) -> None:
        self.status.fraction, self.status.message = fraction, message

    def _load(self, spec: ModelSpec) -> None:
        start = time.perf_counter()
        try:
            engine = Engine.load(spec, self.runtime_for(spec), taesd=self.taesd and not spec.is_embedded,
                                 local_files_only=self.offline, progress=self._progress,
                                 compile=self.compile)  # fmt: skip
        except ModelLoadError as error:
            self.status = LoadStatus(error=str(error), seconds=time.perf_counter() - start)
            return
        except Exception as error:  # an unexpected failure must not kill the server: report it
            self.status = LoadStatus(error=f"{type(error).__name__}: {error}", seconds=time.perf_counter() - start)
            return
        self.loop.swap_engine(engine)
        self.status = LoadStatus(seconds=time.perf_counter() - start, message=f"Loaded {spec.name}")

    def status_markdown(self) -> str:
        """One line for the page: what serves, what loads, what failed."""
        info = self.engine.info
        lines = [f"**Model:** {info['model']} · {info['runtime']} · {info['decoder']}"]
        status = self.status
        lines += [f"Note: {note}" for note in self.engine.notes]
        if status.loading:
            lines.append(f"Loading **{status.loading}**: {status.message} ({status.fraction:.0%})")
        elif status.error:
            lines.append(f"**Could not load the requested model.** {status.error}")
        if info["embedded"]:
            why = "the requested model could not be loaded (offline and not cached)" if status.error else (
                "it was chosen" if not status.loading else "the requested model is still loading")  # fmt: skip
            lines.append(
                f"Serving the **embedded demo model** because {why}. It is a tiny model trained on simple "
                "shapes: try *a yellow triangle on a purple background*."
            )
        return "  \n".join(lines)
