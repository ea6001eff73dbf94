"""The live loop's slot book: per-slot sequence numbers (newest wins), send order, the last result delivered,
the last preview (for the full-VAE decode once input is still), when each slot was last heard from and its
address. Silent slots expire; a session that leaves is forgotten. Not locked: the loop holds its lock around it.
"""

from __future__ import annotations

from typing import Any

from .schedule import session_of


class SlotBook:
    def __init__(self):
        self.seq: dict[str, int] = {}  # slot -> seq of its newest job
        self.order: dict[str, float] = {}  # slot -> send time of its newest job, when the caller knows it
        self.delivered: dict[str, int] = {}  # slot -> seq of the newest job whose result went out
        self.previews: dict[str, tuple[int, Any, dict]] = {}  # slot -> (seq, latents, params) of its last preview
        self.touched: dict[str, float] = {}  # slot -> when it last submitted (its bookkeeping expires)
        self.addresses: dict[str, str] = {}  # slot -> the address it last came from (its fair share expires too)

    def claim(self, slot: str, now: float, order: float | None = None, address: str | None = None) -> int | None:
        """The slot's next sequence number; None when `order` is older than its newest job's (a late arrival)."""
        self.touched[slot] = now
        if address is not None:
            self.addresses[slot] = address
        if order is not None:
            if order < self.order.get(slot, float("-inf")):
                return None
            self.order[slot] = order
        self.seq[slot] = self.seq.get(slot, 0) + 1
        return self.seq[slot]

    def latest(self, slot: str) -> int:
        return self.seq.get(slot, 0)

    def deliver(self, slot: str, seq: int) -> bool:
        """Record that `seq`'s result goes out; False when a newer one already went (results never go back).
        A slot forgotten while its job ran gets no entry back."""
        if self.delivered.get(slot, 0) > seq:
            return False
        if slot in self.seq:
            self.delivered[slot] = seq
        return True

    def keep_preview(self, slot: str, seq: int, latents: Any, params: dict) -> None:
        if slot in self.seq:  # not for a slot forgotten meanwhile
            self.previews[slot] = (seq, latents, params)

    def drop_preview(self, slot: str) -> None:
        self.previews.pop(slot, None)

    def take_preview(self, slot: str) -> tuple[Any, dict] | None:
        """The slot's last preview, once, if no newer input came after it."""
        preview = self.previews.get(slot)
        if preview is None or preview[0] != self.latest(slot):
            return None
        del self.previews[slot]
        return preview[1], preview[2]

    def expire(self, horizon: float, busy: set[str]) -> list[str]:
        """Drop slots silent since before `horizon` that have no job; the sessions and addresses that left."""
        gone = []
        for slot in [s for s, t in self.touched.items() if t < horizon and s not in busy]:
            gone += self._drop(slot)
        return gone

    def forget(self, slot_prefix: str) -> list[str]:
        """Drop every slot under `slot_prefix`; the sessions and addresses that left."""
        gone = []
        for slot in [s for s in dict.fromkeys([*self.touched, *self.seq]) if s.startswith(slot_prefix)]:
            gone += self._drop(slot)
        return gone

    def _drop(self, slot: str) -> list[str]:
        for table in (self.seq, self.order, self.previews, self.touched, self.delivered):
            table.pop(slot, None)
        session, address = session_of(slot), self.addresses.pop(slot, None)
        gone = [] if any(session_of(s) == session for s in self.touched) else [session]
        if address is not None and address not in self.addresses.values():
            gone.append(address)
        return gone

    def __len__(self) -> int:
        tables = (self.seq, self.order, self.previews, self.touched, self.delivered, self.addresses)
        return sum(map(len, tables))
