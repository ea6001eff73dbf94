"""Start-up: join or start Ray, deploy the replicas (or attach to running ones), and hand the page its loop."""

from __future__ import annotations

import math
import os
import socket

import ray
from ray import serve

from ..presets import ModelSpec
from ..settings import Settings, replica_range
from .deploy import APP_NAME, Deployment, application, stop
from .manager import RemoteManager
from .remote import RemoteLoop


FIRST_REPLICA_S = 600.0  # start-up gives up when no replica is ready after this long
CONNECT_S = 5.0  # a cluster address that does not answer a TCP connect within this is "unreachable"


class ScaleOutError(RuntimeError):
    """Ray Serve mode could not start; the message says why and what to do. Nothing was left running."""


def connect(settings: Settings, deployment: Deployment) -> None:
    """Join the cluster at settings.ray_address, or start Ray on this machine (unless this process already is)."""
    if ray.is_initialized():
        return
    address = settings.ray_address
    if address and address != "auto":
        _reachable(address)
    if address:
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise ScaleOutError(f"Could not join the Ray cluster at {address!r}: {error}") from error
        deployment.connected = True
        return
    high = replica_range(settings.replicas or "1")[1]
    # No dashboard, and Serve's HTTP proxy stays off (start() below): the page is the only ingress. Ray's own
    # ports use token authentication, Ray's default for a new local instance (unless RAY_AUTH_MODE says otherwise).
    ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(high * settings.replica_cpus)), include_dashboard=False,
             log_to_driver=False)  # fmt: skip
    deployment.connected = deployment.started_ray = True


def _reachable(address: str) -> None:
    """ScaleOutError unless host:port (or ray://host:port) answers a TCP connect within CONNECT_S."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=CONNECT_S):
            return
    except (OSError, ValueError) as error:
        raise ScaleOutError(f"The Ray cluster at {address!r} is unreachable ({error}). Start it (`ray start --head`),"
                            " fix --ray-address / RAY_ADDRESS, or leave both unset to start Ray here.") from error


def start(settings: Settings, spec: ModelSpec) -> tuple[RemoteManager, RemoteLoop]:
    """Join or start Ray, deploy the replicas (or attach to running ones), and return once one replica serves.

    On any failure, what was brought up is taken down again and a ScaleOutError says why.
    """
    deployment = Deployment(settings)
    try:
        connect(settings, deployment)
        serve.start(proxy_location="Disabled")
        if settings.replicas is None and APP_NAME in serve.status().applications:
            deployment.settings = None
            handle = serve.get_app_handle(APP_NAME)
        else:
            deployment.deployed = True
            target = serve.RunTarget(application(settings, spec), name=APP_NAME, route_prefix=None)
            handle = serve.run_many([target], wait_for_applications_running=False)[0]
        # The page is up as soon as one replica answers; the others keep loading in parallel.
        info = handle.info.remote().result(timeout_s=FIRST_REPLICA_S)
    except Exception as error:
        stop(deployment)
        if isinstance(error, ScaleOutError):
            raise
        raise ScaleOutError(f"Could not start the replicas: {type(error).__name__}: {error}") from error
    loop = RemoteLoop(handle, info)
    loop.update_info(info, 1)
    return RemoteManager(loop, deployment), loop
