"""One Serve replica: an engine and a live loop, as in one process, called through a handle."""

from __future__ import annotations

import os
from dataclasses import replace

from ray import serve

from ..live import Outcome
from ..presets import ModelSpec


class LiveReplica:
    """One Serve replica: the model manager and live loop of a single-process lcm-live, called through a handle."""

    def __init__(self, options: dict):
        import torch

        from ..device import pick_runtime
        from ..live import Limits, LiveLoop
        from ..models import ModelManager
        from ..presets import PRESETS

        torch.set_num_threads(options["threads"])
        if options["offline"]:
            os.environ["HF_HUB_OFFLINE"] = "1"
        self.id = serve.get_replica_context().replica_id.unique_id
        runtime = pick_runtime(options["device"], options["dtype"])
        self.manager = ModelManager(runtime, taesd=options["taesd"], offline=options["offline"],
                                    auto_dtype=options["dtype"] == "auto", compile=options["compile"])  # fmt: skip
        limits = Limits(**options["limits"])
        self.loop = LiveLoop(self.manager.load_now(PRESETS["demo"]), limits, max_batch=options["max_batch"])
        self.manager.attach(self.loop)
        self.wanted: ModelSpec | None = None

    def reconfigure(self, config: dict) -> None:
        """The model to serve (Serve's user_config): reaches every replica, and each one started later."""
        spec = ModelSpec.from_dict(config["model"])
        if spec == self.wanted:
            return
        self.wanted = spec
        if not (spec.is_embedded and self.manager.engine.spec.is_embedded):
            self.manager.switch(spec)  # in the background: the current model serves until it is ready

    async def run(self, slot: str, requests, order: float | None = None, **options):
        return self._portable(await self.loop.run(slot, requests, order, **options))

    async def settle(self, slot: str):
        return self._portable(await self.loop.settle(slot))

    def forget(self, slot_prefix: str) -> None:
        self.loop.forget(slot_prefix)

    def info(self) -> dict:
        return {**self.loop.info, "replica": self.id, "pid": os.getpid()}

    def check_health(self) -> None:
        """Serve restarts a replica whose check fails: here, one whose live loop stopped serving."""
        worker = getattr(self.loop, "_worker", None)
        if worker is not None and not worker.is_alive():
            raise RuntimeError(f"replica {self.id}: the live loop's worker thread has stopped")

    def record_routing_stats(self) -> dict:
        """What the page shows for this replica (Serve hands it to the router every STATUS_EVERY_S)."""
        status = self.manager.status
        return dict(info=self.loop.info, pid=os.getpid(), loading=status.loading, fraction=status.fraction,
                    message=status.message, error=status.error)  # fmt: skip

    def _portable(self, outcome):
        """The outcome without tensors (latents stay here, for the settle decode), each result naming this replica."""
        if not isinstance(outcome, Outcome):
            return outcome
        many = isinstance(outcome.result, list)
        results = [replace(result, latents=None, params={**result.params, "replica": self.id})
                   for result in (outcome.result if many else [outcome.result])]  # fmt: skip
        return replace(outcome, result=results if many else results[0])
