"""Scale-out on Ray Serve: replicas that each own one engine and one live loop, behind the one Gradio page.

    browser -> Gradio page (ui.LiveApp) -> RemoteLoop --handle(session_id)--> SessionRouter -> LiveReplica x N
                                                                                             (engine + LiveLoop)

All of a session's inputs reach one replica (SessionRouter), so newest-wins superseding and stopping work there
exactly as in one process. When a replica dies its calls fail with ActorDiedError: RemoteLoop resends the slot's
newest input, the router moves the session to the replica with the fewest sessions, and Serve starts a new one.
Results cross Ray as an image and its parameters; latents stay on the replica, which does the settle decode.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import math
import os
import socket
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, replace
from types import SimpleNamespace

import ray
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import RequestRouter

from .live import SUPERSEDED, Job, Outcome
from .presets import ModelSpec
from .request import GenerationError
from .settings import Settings, replica_range
from .text import markdown_text, public_text


APP_NAME = "lcm-live"
DEPLOYMENT = "LiveReplica"
API_PREFIX = "api:"  # ui.API_SLOT: a plain API call's slot, used once; each is its own session
MAX_ONGOING = 512  # calls one replica holds at once: each live slot keeps about two (its running job, its newest)
TARGET_ONGOING = 4  # autoscaling: add replicas when each holds more calls than this (about two typing sessions)
SESSION_IDLE_S = 3600.0  # a session unseen this long no longer counts towards its replica's share
RESENDS = 3  # a slot's newest input is resent at most this often when replicas die under it
STATUS_EVERY_S = 1.0  # replicas report their model and load progress this often (Serve's routing stats)
FIRST_REPLICA_S = 600.0  # start-up gives up when no replica is ready after this long
CONNECT_S = 5.0  # a cluster address that does not answer a TCP connect within this is "unreachable"
# One code version per page process, as `serve deploy` derives one from a config file's import path: a model
# switch (a new user_config) then reconfigures the running replicas in place; a new process gets new replicas.
CODE_VERSION = f"lcm-live-{uuid.uuid4().hex[:12]}"


class ScaleOutError(RuntimeError):
    """Ray Serve mode could not start; the message says why and what to do. Nothing was left running."""


def session_of(slot: str) -> str:
    """The session of a slot or slot prefix ('<session>:<tab>' -> '<session>'); an API call's slot is its own."""
    return slot if slot.startswith(API_PREFIX) else slot.split(":", 1)[0]


# ---------------------------------------------------------------------- routing
class SessionRouter(RequestRouter):
    """Sticky sessions: a session's requests all go to one replica; a new session goes to the one with the fewest.

    Strict while the replica lives: a busy replica makes the request wait, never go elsewhere (superseding needs
    all of a session's inputs in one live loop). A dead replica's sessions move to the others, one by one, as
    their next requests arrive. The session is the handle's `session_id` option.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._sessions: dict[str, tuple] = {}  # session -> (ReplicaID, last used)
        self._turn = 0  # ties between replicas go round in turn (one-call API sessions leave at once)
        # Serve may load this class by value (a copy of this module); publish to the module the page imported.
        importlib.import_module("lcm_live.replicas")._ROUTERS[self._deployment_id.app_name] = self

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        if pending_request is None or not pending_request.metadata.session_id:
            return [candidate_replicas]
        pending_request.routing_context.should_backoff = True  # a full replica: wait between tries, do not spin
        live = {replica.replica_id: replica for replica in candidate_replicas}
        if not live:
            return []
        session, now = pending_request.metadata.session_id, time.time()
        chosen = self._sessions.get(session, (None, 0.0))[0]
        if chosen not in live:
            chosen = self._fewest_sessions(live, now)
        if pending_request.metadata.call_method == "forget":
            self._sessions.pop(session, None)  # the session left: it no longer counts
        else:
            self._sessions[session] = (chosen, now)
        return [[live[chosen]]]

    def _fewest_sessions(self, live: dict, now: float):
        for session, (_, used) in list(self._sessions.items()):
            if now - used > SESSION_IDLE_S:
                del self._sessions[session]
        counts = dict.fromkeys(live, 0)
        for replica, _ in self._sessions.values():
            if replica in counts:
                counts[replica] += 1
        fewest = sorted((r for r in counts if counts[r] == min(counts.values())), key=lambda r: r.unique_id)
        self._turn += 1
        return fewest[self._turn % len(fewest)]

    def replica_of(self, session: str) -> str | None:
        """The id of the replica that serves `session`, if it has one."""
        home = self._sessions.get(session)
        return home[0].unique_id if home else None

    def snapshot(self) -> list[dict]:
        """Each live replica: its id, its sessions, and what it last reported (model, load progress)."""
        sessions = [replica for replica, _ in list(self._sessions.values())]
        return [dict(replica=replica_id.unique_id, sessions=sessions.count(replica_id), **(replica.routing_stats or {}))
                for replica_id, replica in sorted(self.curr_replicas.items(), key=lambda item: item[0].unique_id)]  # fmt: skip


_ROUTERS: dict[str, SessionRouter] = {}  # app name -> the router of this process's handle


# ---------------------------------------------------------------------- replica
class LiveReplica:
    """One Serve replica: the model manager and live loop of a single-process lcm-live, called through a handle."""

    def __init__(self, options: dict):
        import torch

        from .device import pick_runtime
        from .live import Limits, LiveLoop
        from .models import ModelManager
        from .presets import PRESETS

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


# ---------------------------------------------------------------------- ingress
class RemoteLoop:
    """The live loop's API for the page (run, submit, settle, forget, info), served by replicas through a handle.

    The page's own bookkeeping stays here: every slot's newest input has a sequence number, so a replica lost
    under it gets the newest input resent, and an older result never replaces a newer one.
    """

    def __init__(self, handle, info: dict):
        self.handle = handle
        self._info = info
        self._seq: dict[str, int] = {}
        self._shown: dict[str, int] = {}
        self._order: dict[str, float] = {}
        self._lock = threading.Lock()
        self.stats = SimpleNamespace(resent=0)  # inputs resent after a replica was lost
        self._runner: asyncio.AbstractEventLoop | None = None  # for submit/run_sync from plain threads

    def _method(self, slot: str, name: str):
        return getattr(self.handle.options(session_id=session_of(slot)), name)

    async def run(self, slot: str, requests, order: float | None = None, **options) -> Outcome | str:
        """Run `requests` as `slot`'s newest input on the session's replica; an Outcome, or SUPERSEDED."""
        with self._lock:
            if order is not None:
                if order < self._order.get(slot, -math.inf):
                    return SUPERSEDED  # sent before the slot's newest: never run
                self._order[slot] = order
            seq = self._seq[slot] = self._seq.get(slot, 0) + 1
        for attempt in range(RESENDS + 1):
            try:
                outcome = await self._method(slot, "run").remote(slot, requests, order, **options)
                break
            except RayActorError:  # the replica died under this call; the router has dropped it
                if self.latest_seq(slot) != seq:
                    return SUPERSEDED  # a newer input is on its way to a live replica
                with self._lock:
                    self.stats.resent += 1
                await asyncio.sleep(0.05 * attempt)  # the newest input again, to the session's next replica
            except RayTaskError as error:
                raise _unwrapped(error) from None
        else:
            raise GenerationError("No replica could serve this request; try again in a moment.")
        if not isinstance(outcome, Outcome):
            return outcome
        with self._lock:
            if seq < self._shown.get(slot, 0):
                return SUPERSEDED
            self._shown[slot] = seq
        return replace(outcome, seq=seq)

    def submit(self, slot: str, requests, order: float | None = None, **options) -> Job:
        """`run` from a plain thread; the Job's future holds the Outcome or SUPERSEDED."""
        future: Future = asyncio.run_coroutine_threadsafe(self.run(slot, requests, order, **options), self._loop())
        return Job(slot, requests, future=future)

    def run_sync(self, slot: str, requests, timeout: float | None = None) -> Outcome | str:
        return self.submit(slot, requests).future.result(timeout)

    async def settle(self, slot: str) -> Outcome | str | None:
        """The slot's last preview decoded with the full VAE, on the replica that holds it; None if there is none."""
        seq = self.latest_seq(slot)
        try:
            outcome = await self._method(slot, "settle").remote(slot)
        except RayActorError:
            return None  # the preview was on a lost replica: the page keeps the preview it shows
        except RayTaskError as error:
            raise _unwrapped(error) from None
        if not isinstance(outcome, Outcome):
            return outcome
        return replace(outcome, seq=seq) if self.latest_seq(slot) == seq else SUPERSEDED

    def latest_seq(self, slot: str) -> int:
        with self._lock:
            return self._seq.get(slot, 0)

    def forget(self, slot_prefix: str) -> None:
        """Drop a leaving session's jobs and bookkeeping, here and on its replica (not waited for)."""
        with self._lock:
            for table in (self._seq, self._shown, self._order):
                for slot in [s for s in table if s.startswith(slot_prefix)]:
                    del table[slot]
        self._method(slot_prefix, "forget").remote(slot_prefix)

    @property
    def info(self) -> dict:
        """What serves (model, runtime, ...), the runtime naming how many replicas serve."""
        return self._info

    def update_info(self, info: dict, replicas: int) -> None:
        self._info = {**info, "runtime": f"{info['runtime']} x {replicas} replica{'s' * (replicas != 1)}"}

    def swap_engine(self, engine) -> None:
        raise NotImplementedError("replicas load models themselves: use the manager's switch")

    def close(self) -> None:
        if self._runner is not None:
            self._runner.call_soon_threadsafe(self._runner.stop)

    def _loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._runner is None:
                self._runner = asyncio.new_event_loop()
                threading.Thread(target=self._runner.run_forever, name="lcm-live-remote", daemon=True).start()
            return self._runner


def _unwrapped(error: RayTaskError) -> BaseException:
    """The replica's own exception (its message, without Ray's traceback and the server's paths)."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, Exception) else GenerationError("A replica failed to run this request.")


@dataclass
class Deployment:
    """What `start` brought up, so that `stop` takes down exactly that."""

    settings: Settings | None  # None: attached to replicas an operator deployed (we never redeploy them)
    deployed: bool = False  # we deployed the application
    connected: bool = False  # we connected this process to Ray
    started_ray: bool = False  # we started Ray on this machine


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


# ---------------------------------------------------------------------- deploying
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
    from .presets import resolve_spec

    settings = Settings(**{k: v for k, v in args.items() if k != "model"})
    return application(settings, resolve_spec(settings.preset, settings.base, settings.lora))


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
