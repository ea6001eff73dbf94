"""Fair shares of the worker: each session and each address is charged the pixel-steps its rows use.

Whoever has been served least goes first (start-time fair queuing, as in a CPU scheduler): a 64x64 typist is
charged 64x64 per step, a 512x512 request 64 times that, so the typist gets many steps for each of the big one's.
A newcomer starts at the current floor, not at zero, so it cannot claim a whole history of credit.
Entries are made only by `join` (a submit): charging or asking about a name that was forgotten (a session that
left while its last step ran) makes no new entry, so nothing is left behind that nobody would remove.
"""

from __future__ import annotations


class FairShare:
    def __init__(self):
        self._served: dict[str, float] = {}  # session or address -> pixel-steps charged
        self._floor = 0.0  # the least charge among those with work (newcomers start here)

    def join(self, session: str, address: str | None) -> None:
        """A visitor with work: an entry at the current floor unless it has one."""
        for name in (session, address):
            if name is not None:
                self._served.setdefault(name, self._floor)

    def priority(self, session: str, address: str | None) -> tuple[float, float]:
        """Lower goes first: the address's charge, then the session's (an address with many sessions is one)."""
        return self._get(address or session), self._get(session)

    def charge(self, session: str, address: str | None, cost: float) -> None:
        """Add `cost` to the entries that exist (a forgotten visitor stays forgotten)."""
        for name in (session, address):
            if name in self._served:
                self._served[name] += cost

    def settle_floor(self, waiting: list[tuple[str, str | None]]) -> None:
        """Raise the floor to the least charge among (session, address) pairs that still have work."""
        if waiting:
            self._floor = max(self._floor, min(min(self.priority(s, a)) for s, a in waiting))

    def forget(self, names) -> None:
        for name in names:
            self._served.pop(name, None)

    def __len__(self) -> int:
        return len(self._served)

    def _get(self, name: str) -> float:
        return self._served.get(name, self._floor)
