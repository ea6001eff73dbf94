"""The model manager's API for the page (engine.info, status_markdown, switch), over all replicas."""

from __future__ import annotations

import threading
from types import SimpleNamespace

from ray import serve

from ..presets import ModelSpec
from ..settings import replica_range
from ..text import markdown_text, public_text
from .deploy import APP_NAME, DEPLOYMENT, STATUS_EVERY_S, Deployment, application, stop
from .remote import RemoteLoop
from .router import _ROUTERS


class RemoteManager:
    """The model manager's API for the page (engine.info, status_markdown, switch), over all replicas."""

    def __init__(self, loop: RemoteLoop, deployment: Deployment):
        self.loop, self.deployment = loop, deployment
        self.replicas: list[dict] = []  # the router's view: one dict per live replica
        self.states: dict[str, int] = {}  # Serve's replica states: RUNNING, STARTING, ...
        self._stop = threading.Event()
        self._switching = threading.Lock()
        self._thread = threading.Thread(target=self._watch, name="lcm-live-replicas", daemon=True)
        self.refresh()
        self._thread.start()

    @property
    def engine(self):
        return SimpleNamespace(info=self.loop.info, notes=[])

    def refresh(self) -> None:
        """Read Serve's replica states and each replica's last report (the page reads these, never blocking)."""
        try:
            deployments = serve.status().applications[APP_NAME].deployments
            self.states = dict(deployments[DEPLOYMENT].replica_states)
        except Exception:  # the controller is busy or restarting: keep the last figures
            pass
        router = _ROUTERS.get(APP_NAME)
        if router is not None:
            self.replicas = router.snapshot()
            infos = [r["info"] for r in self.replicas if r.get("info")]
            if infos:
                self.loop.update_info(infos[0], self.serving)

    @property
    def serving(self) -> int:
        return int(self.states.get("RUNNING", len(self.replicas)))

    def _watch(self) -> None:
        while not self._stop.wait(STATUS_EVERY_S):
            self.refresh()

    def switch(self, spec: ModelSpec) -> bool:
        """Load `spec` on every replica, and on each one started later (Serve's user_config); False while loading.

        Each replica loads in the background, serving its current model until the new one is ready, and reports
        its progress (shown by status_markdown).
        """
        if self.deployment.settings is None:
            raise ValueError("This page attached to replicas deployed by the operator: change the model in their "
                             "Serve config.")  # fmt: skip
        with self._switching:
            if any(r.get("loading") for r in self.replicas):
                return False
            serve.run(application(self.deployment.settings, spec), name=APP_NAME, route_prefix=None)
        return True

    def status_markdown(self) -> str:
        """What serves, how many replicas, and each replica's load progress or error."""
        info = self.loop.info
        lines = [f"**Model:** {markdown_text(public_text(info['model']))} · {markdown_text(info['runtime'])} · "
                 f"{markdown_text(info['decoder'])}"]  # fmt: skip
        others = ", ".join(f"{n} {state.lower()}" for state, n in sorted(self.states.items()) if state != "RUNNING")
        scale = ""
        if self.deployment.settings is not None:
            low, high = replica_range(self.deployment.settings.replicas or "1")
            scale = f" (autoscaling {low}-{high})" if low != high else ""
        lines.append(f"**Replicas:** {self.serving} serving{', ' + others if others else ''}{scale}")
        for report in self.replicas:
            if report.get("loading"):
                lines.append(f"Replica {report['replica']}: loading **{markdown_text(public_text(report['loading']))}**: "
                             f"{markdown_text(public_text(report['message']))} ({report['fraction']:.0%})")  # fmt: skip
            elif report.get("error"):
                lines.append(f"Replica {report['replica']}: **could not load the requested model.** "
                             f"{markdown_text(public_text(report['error']))}")  # fmt: skip
        if info.get("embedded"):
            lines.append("Serving the **embedded demo model**: a tiny model trained on simple shapes: try *a yellow "
                         "triangle on a purple background*.")  # fmt: skip
        return "  \n".join(lines)

    def close(self) -> None:
        """Stop watching, then take down what start() brought up."""
        self._stop.set()
        self.loop.close()
        stop(self.deployment)
