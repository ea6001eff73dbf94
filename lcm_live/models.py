"""Which model serves: the embedded demo model at once, the requested one as soon as it has loaded.

Start-up never waits on the network. The page comes up on the embedded model in about a second; the requested
hub model loads (downloading if it must) on a background thread, with its progress shown, and takes over when
ready. When it cannot be had (offline, nothing cached), the embedded model stays and the page says why.

Switching is the operator's: visitors may switch (for everyone) only as far as the SwitchPolicy lets them, never
to a file they uploaded, and a visitor's failed load says the same whatever the cause; details go to the log.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .device import Runtime
from .engine import Engine
from .presets import PRESETS, ModelSpec, resolve_spec
from .request import ModelLoadError
from .text import display_name, markdown_text, public_text


log = logging.getLogger("lcm_live")


class ModelRefused(ValueError):
    """A visitor asked for a switch the policy does not allow; the message says what is allowed."""


@dataclass(frozen=True)
class SwitchPolicy:
    """What visitors may load. The default: nothing; the model is the operator's."""

    presets: bool = False  # visitors may switch everyone's model among the presets
    custom: bool = False  # ... and to any hub id or local folder (then presets too)
    refused_roots: tuple[str, ...] = ()  # folders nothing is ever loaded from: uploads, Gradio's cache, outputs

    @property
    def enabled(self) -> bool:
        return self.presets or self.custom

    def refuses(self, reference: str | None) -> bool:
        """True when `reference`, read as a local path, lies in a refused folder (whether or not it exists)."""
        if not reference:
            return False
        try:
            path = Path(os.path.realpath(os.path.expanduser(reference)))
            return any(path.is_relative_to(os.path.realpath(root)) for root in self.refused_roots)
        except (OSError, ValueError):  # e.g. a NUL byte: not a path anything may load
            return True


def labelled(spec: ModelSpec) -> ModelSpec:
    """`spec` with the name the page shows: its preset label, else its references without server paths."""
    if spec.label:
        return spec
    name = display_name(spec.base) + (f" + {display_name(spec.lora)}" if spec.lora else "")
    return replace(spec, label=name)


@dataclass
class LoadStatus:
    loading: str | None = None  # the model being loaded, if any
    fraction: float = 0.0
    message: str = ""
    error: str | None = None  # what the page says about the last failed load (the log has why)
    seconds: float = 0.0  # how long the last load took
    by_visitor: bool = False  # a visitor asked for this load (its failure then says nothing more than that)


class ModelManager:
    """Loads models off the request path and hands each finished one to the live loop."""

    def __init__(self, runtime: Runtime, taesd: bool = False, offline: bool = False, auto_dtype: bool = False,
                 compile: bool = False, policy: SwitchPolicy | None = None):  # fmt: skip
        self.runtime, self.taesd, self.compile = runtime, taesd, compile
        self.policy = policy or SwitchPolicy()
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

    def switch(self, spec: ModelSpec, by_visitor: bool = False) -> bool:
        """Start loading `spec` in the background; False if a load is already running."""
        spec = labelled(spec)
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return False
            self.status = LoadStatus(loading=spec.name, message="Starting", by_visitor=by_visitor)
            self._thread = threading.Thread(target=self._load, args=(spec, by_visitor), name="lcm-live-loader",
                                            daemon=True)  # fmt: skip
            self._thread.start()
            return True

    def switch_for_visitor(self, preset: str | None, base: str | None = None, lora: str | None = None) -> bool:
        """Load what a visitor picked, as far as the policy allows (ModelRefused otherwise); False if busy.

        A reference in a refused folder (an upload) fails exactly as a model that does not load: same message.
        """
        base, lora = (base or "").strip() or None, (lora or "").strip() or None
        if not self.policy.enabled:
            raise ModelRefused("This server does not let visitors switch the model.")
        if (base or lora) and not self.policy.custom:
            raise ModelRefused(f"This server loads its presets only: {', '.join(PRESETS)}.")
        try:
            spec = labelled(resolve_spec(preset or None, base, lora))
        except ValueError as error:
            raise ModelRefused(str(error)) from error
        if any(self.policy.refuses(reference) for reference in (base, lora)):
            with self._lock:
                if self._thread is not None and self._thread.is_alive():
                    return False
                log.warning("refused a visitor's model in a refused folder: base=%r lora=%r", base, lora)
                self.status = LoadStatus(error=self._failure(spec, True), by_visitor=True)
            return True
        return self.switch(spec, by_visitor=True)

    def wait(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _progress(self, fraction: float, message: str) -> None:
        self.status.fraction, self.status.message = fraction, message

    def _load(self, spec: ModelSpec, by_visitor: bool = False) -> None:
        start = time.perf_counter()
        try:
            engine = Engine.load(spec, self.runtime_for(spec), taesd=self.taesd and not spec.is_embedded,
                                 local_files_only=self.offline, progress=self._progress, warmup=False,
                                 compile=self.compile)  # fmt: skip
            # The warm-up and CUDA-graph captures run on the loop's worker between two steps of the current
            # model (GPU work on one thread); this thread waits until the new model serves.
            warm = functools.partial(engine.warm_up, self._progress)  # a compiled UNet compiles here too
            self.loop.swap_engine(engine, prepare=warm).result()
        except Exception as error:  # a failed load must not kill the server: the page says so, the log says why
            expected = isinstance(error, ModelLoadError)
            log.warning("could not load %s (base=%r, lora=%r): %s", spec.name, spec.base, spec.lora,
                        error if expected else f"{type(error).__name__}: {error}", exc_info=not expected)  # fmt: skip
            self.status = LoadStatus(error=self._failure(spec, by_visitor, error), by_visitor=by_visitor,
                                     seconds=time.perf_counter() - start)  # fmt: skip
            return
        self.status = LoadStatus(seconds=time.perf_counter() - start, message=f"Loaded {spec.name}")

    def _failure(self, spec: ModelSpec, by_visitor: bool, error: Exception | None = None) -> str:
        """What the page says about a failed load: for a visitor's, the name only, whatever went wrong (so that
        nobody learns what exists on the server); for the operator's own, why, without server paths."""
        if by_visitor or error is None:
            return f"Could not load {spec.name}; the current model keeps serving."
        reason = str(error) if isinstance(error, ModelLoadError) else f"{type(error).__name__}: {error}"
        return public_text(f"Could not load {spec.name}. {reason}")

    def status_markdown(self) -> str:
        """One line for the page: what serves, what loads, what failed. Every name in it is shown as text."""
        info = self.engine.info
        lines = [f"**Model:** {markdown_text(public_text(info['model']))} · {markdown_text(info['runtime'])} · "
                 f"{markdown_text(info['decoder'])}"]  # fmt: skip
        status = self.status
        lines += [f"Note: {markdown_text(public_text(note))}" for note in self.engine.notes]
        worker = self.loop.info.get("worker_note")  # the live loop's worker had to restart
        if worker:
            lines.append(f"**{markdown_text(worker)}**")
        if status.loading:
            lines.append(f"Loading **{markdown_text(status.loading)}**: {markdown_text(public_text(status.message))} "
                         f"({status.fraction:.0%})")  # fmt: skip
        elif status.error:
            lines.append(f"**{markdown_text(status.error)}**")
        if info["embedded"]:
            failed = status.error and not status.by_visitor
            unloaded = "the requested model could not be loaded" + (" (offline and not cached)" if self.offline else "")
            why = unloaded if failed else (
                "it was chosen" if not status.loading else "the requested model is still loading")  # fmt: skip
            lines.append(
                f"Serving the **embedded demo model** because {why}. It is a tiny model trained on simple "
                "shapes: try *a yellow triangle on a purple background*."
            )
        return "  \n".join(lines)
