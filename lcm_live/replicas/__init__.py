"""Scale-out on Ray Serve: replicas that each own one engine and one live loop, behind the one Gradio page.

    browser -> Gradio page (ui.LiveApp) -> RemoteLoop --handle(session_id)--> SessionRouter -> LiveReplica x N
                                                                                             (engine + LiveLoop)

All of a session's inputs reach one replica (SessionRouter), so newest-wins superseding and stopping work there
exactly as in one process. When a replica dies its calls fail with ActorDiedError: RemoteLoop resends the slot's
newest input, the router moves the session to the replica with the fewest sessions, and Serve starts a new one.
Results cross Ray as an image and its parameters; latents stay on the replica, which does the settle decode.

    router.py   SessionRouter: sticky sessions            remote.py   RemoteLoop: the page-side loop
    replica.py  LiveReplica: engine + live loop           manager.py  RemoteManager: status and model switch
    deploy.py   the Serve application, stop()             startup.py  start(): join or start Ray, deploy, connect
"""

from .deploy import (
    APP_NAME,
    CODE_VERSION,
    DEPLOYMENT,
    MAX_ONGOING,
    STATUS_EVERY_S,
    TARGET_ONGOING,
    Deployment,
    app_builder,
    application,
    replica_options,
    stop,
)
from .manager import RemoteManager
from .remote import RESENDS, RemoteLoop
from .replica import LiveReplica
from .router import _ROUTERS, SESSION_IDLE_S, SessionRouter, session_of
from .startup import CONNECT_S, FIRST_REPLICA_S, ScaleOutError, connect, start


__all__ = [
    "APP_NAME", "CODE_VERSION", "CONNECT_S", "DEPLOYMENT", "FIRST_REPLICA_S", "MAX_ONGOING", "RESENDS",
    "SESSION_IDLE_S", "STATUS_EVERY_S", "TARGET_ONGOING", "_ROUTERS", "Deployment", "LiveReplica", "RemoteLoop",
    "RemoteManager", "ScaleOutError", "SessionRouter", "app_builder", "application", "connect", "replica_options",
    "session_of", "start", "stop",
]  # fmt: skip
