"""The page's own bookkeeping of its slots when replicas serve them: each slot's newest input (a sequence number),
the newest one shown, and the send time of the newest event. Slots idle for a while are dropped. No Ray here."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


SLOT_IDLE_S = 900.0  # a slot neither sent to nor shown for this long is dropped (far longer than any run)


@dataclass
class _Slot:
    seq: int = 0  # the newest input's number
    shown: int = 0  # the newest input whose image was shown
    order: float = -math.inf  # when the client sent the newest event (Gradio's enqueue time), if known
    seen: float = 0.0  # last sent to or shown, on `clock`


class PageSlots:
    """Newest-wins numbers per slot, thread-safe; a slot idle past `idle_s`, or forgotten, loses its entry."""

    def __init__(self, idle_s: float = SLOT_IDLE_S, clock: Callable[[], float] = time.monotonic):
        self.idle_s, self._clock = idle_s, clock
        self._slots: dict[str, _Slot] = {}
        self._swept = clock()
        self._lock = threading.Lock()

    def admit(self, slot: str, order: float | None = None) -> int | None:
        """A new input for `slot`: its sequence number, or None when it was sent before the slot's newest."""
        with self._lock:
            now = self._clock()
            self._sweep(now)
            entry = self._slots.setdefault(slot, _Slot())
            entry.seen = now
            if order is not None:
                if order < entry.order:
                    return None
                entry.order = order
            entry.seq += 1
            return entry.seq

    def show(self, slot: str, seq: int) -> bool:
        """Whether input `seq`'s image may be shown (no newer one was); it then is the newest shown."""
        with self._lock:
            entry = self._slots.setdefault(slot, _Slot())
            entry.seen = self._clock()
            if seq < entry.shown:
                return False
            entry.shown = seq
            return True

    def latest(self, slot: str) -> int:
        """The newest input's number (0 for an unknown slot)."""
        with self._lock:
            entry = self._slots.get(slot)
            return entry.seq if entry is not None else 0

    def forget(self, slot_prefix: str) -> None:
        """Drop every slot starting with `slot_prefix` (a leaving session's)."""
        with self._lock:
            for slot in [s for s in self._slots if s.startswith(slot_prefix)]:
                del self._slots[slot]

    def __len__(self) -> int:
        with self._lock:
            return len(self._slots)

    def _sweep(self, now: float) -> None:
        if now - self._swept < self.idle_s / 10:  # at most ten sweeps per idle period
            return
        self._swept = now
        for slot in [s for s, entry in self._slots.items() if now - entry.seen > self.idle_s]:
            del self._slots[slot]
