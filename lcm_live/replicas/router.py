"""Sticky sessions: all of a session's calls reach one replica, a new session the one with the fewest."""

from __future__ import annotations

import importlib
import time

from ray.serve.request_router import RequestRouter


SESSION_IDLE_S = 3600.0  # a session unseen this long no longer counts towards its replica's share


def session_of(slot: str) -> str:
    """The session of a slot or slot prefix ('<session>:<tab>' -> '<session>')."""
    return slot.split(":", 1)[0]


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
