"""The Serve application: the LiveReplica deployment, scaled and resourced as the settings say; taking it down."""

from __future__ import annotations

import contextlib
import os
import uuid
from dataclasses import dataclass

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig

from ..presets import ModelSpec
from ..settings import Settings, replica_range
from .replica import LiveReplica
from .router import SessionRouter


APP_NAME = "lcm-live"
DEPLOYMENT = "LiveReplica"
MAX_ONGOING = 512  # calls one replica holds at once: each live slot keeps about two (its running job, its newest)
TARGET_ONGOING = 4  # autoscaling: add replicas when each holds more calls than this (about two typing sessions)
STATUS_EVERY_S = 1.0  # replicas report their model and load progress this often (Serve's routing stats)
# One code version per page process, as `serve deploy` derives one from a config file's import path: a model
# switch (a new user_config) then reconfigures the running replicas in place; a new process gets new replicas.
CODE_VERSION = f"lcm-live-{uuid.uuid4().hex[:12]}"


@dataclass
class Deployment:
    """What `start` brought up, so that `stop` takes down exactly that."""

    settings: Settings | None  # None: attached to replicas an operator deployed (we never redeploy them)
    deployed: bool = False  # we deployed the application
    connected: bool = False  # we connected this process to Ray
    started_ray: bool = False  # we started Ray on this machine


def replica_options(settings: Settings) -> dict:
    """What each replica is built with (its init argument)."""
    return dict(device=settings.device, dtype=settings.dtype, taesd=settings.taesd, offline=settings.offline,
                compile=settings.compile, threads=max(1, int(settings.replica_cpus)), max_batch=settings.max_batch,
                limits=dict(max_cost=settings.max_cost, session_jobs=settings.session_jobs,
                            address_jobs=settings.address_jobs))  # fmt: skip


def application(settings: Settings, spec: ModelSpec):
    """The Serve application: the LiveReplica deployment, scaled and resourced as `settings` say, serving `spec`."""
    low, high = replica_range(settings.replicas or "1")
    scaling = dict(num_replicas=low) if low == high else dict(
        num_replicas="auto",
        autoscaling_config=dict(min_replicas=low, max_replicas=high, initial_replicas=low,
                                target_ongoing_requests=TARGET_ONGOING),
    )  # fmt: skip
    env = {name: os.environ[name] for name in ("HF_HUB_OFFLINE", "LCM_LIVE_DEMO_MODEL", "HF_HOME") if name in os.environ}
    deployment = serve.deployment(LiveReplica, name=DEPLOYMENT).options(
        max_ongoing_requests=MAX_ONGOING,
        ray_actor_options=dict(num_cpus=settings.replica_cpus, num_gpus=settings.replica_gpus,
                               runtime_env=dict(env_vars=env)),
        request_router_config=RequestRouterConfig(request_router_class=SessionRouter,
                                                  request_routing_stats_period_s=STATUS_EVERY_S),
        health_check_period_s=2.0,
        health_check_timeout_s=30.0,
        graceful_shutdown_timeout_s=5.0,
        user_config={"model": spec.to_dict()},
        **scaling,
    )  # fmt: skip
    # Ray keeps the code version an internal option for deploys from Python; without it a model switch restarts
    # the replicas (rolling), each on the new model.
    with contextlib.suppress(TypeError):
        deployment = deployment.options(version=CODE_VERSION, _internal=True)
    return deployment.bind(replica_options(settings))


def app_builder(args: dict):
    """For Serve config files (`import_path: lcm_live.replicas:app_builder`): args are app.py's settings by name."""
    from ..presets import resolve_spec

    settings = Settings(**{k: v for k, v in args.items() if k != "model"})
    return application(settings, resolve_spec(settings.preset, settings.base, settings.lora))


def stop(deployment: Deployment) -> None:
    """Take down what `start` brought up: our application, then Ray when we started it (or our connection)."""
    try:
        if deployment.deployed:
            serve.delete(APP_NAME)
        if deployment.started_ray:
            serve.shutdown()
    finally:
        if deployment.connected:
            ray.shutdown()
