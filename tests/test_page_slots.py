"""Ray mode's page-side bookkeeping: newest-wins numbers per slot that expire (no Ray, no torch)."""

import asyncio
from types import SimpleNamespace

import pytest

from lcm_live.page_slots import PageSlots


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_newest_wins_numbers_per_slot():
    slots = PageSlots(clock=Clock())
    assert slots.admit("a:txt2img", order=2.0) == 1
    assert slots.admit("a:txt2img", order=1.0) is None  # sent before the newest: never run
    assert slots.admit("a:txt2img", order=3.0) == 2 and slots.latest("a:txt2img") == 2
    assert slots.show("a:txt2img", 2) and not slots.show("a:txt2img", 1)  # an older image never replaces a newer
    assert slots.admit("b:webcam") == 1 and slots.latest("unknown") == 0


def test_idle_slots_expire_and_a_leaving_session_is_forgotten():
    clock = Clock()
    slots = PageSlots(idle_s=100.0, clock=clock)
    for session in ("gone", "stays", "leaves"):
        slots.admit(f"{session}:txt2img")
    slots.admit("leaves:webcam")
    slots.forget("leaves:")
    assert len(slots) == 2 and slots.latest("leaves:webcam") == 0
    clock.now = 60.0
    slots.show("stays:txt2img", 1)  # shown: still in use
    clock.now = 150.0
    slots.admit("new:txt2img")  # the next admission sweeps
    assert slots.latest("gone:txt2img") == 0 and slots.latest("stays:txt2img") == 1 and len(slots) == 2


class FakeHandle:
    """`handle.options(session_id=s).<method>.remote(...)`: run answers an Outcome; forget is recorded."""

    def __init__(self):
        self.calls = []

    def options(self, session_id):
        def method(name):
            async def answer(*args):
                from PIL import Image

                from lcm_live.live import Outcome
                from lcm_live.request import Result, Timings

                return Outcome(Result(Image.new("RGB", (8, 8)), {"prompt": args[1]}, Timings()), 1.0, 1.0, 1)

            def remote(*args, **kwargs):
                self.calls.append((session_id, name))
                return answer(*args) if name == "run" else None

            return SimpleNamespace(remote=remote)

        return SimpleNamespace(run=method("run"), forget=method("forget"))


def test_the_remote_loop_drops_its_tables_on_forget_and_when_idle():
    pytest.importorskip("ray")
    from lcm_live.replicas import RemoteLoop

    clock = Clock()
    handle = FakeHandle()
    loop = RemoteLoop(handle, info={}, slots=PageSlots(idle_s=100.0, clock=clock))

    async def visit(session: str):
        return await loop.run(f"{session}:txt2img", "a prompt", order=clock.now)

    for session in ("left", "idle", "active"):
        assert asyncio.run(visit(session)).seq == 1
    loop.forget("left:")
    assert ("left", "forget") in handle.calls and loop.latest_seq("left:txt2img") == 0
    clock.now = 60.0
    assert asyncio.run(visit("active")).seq == 2
    clock.now = 150.0
    assert asyncio.run(visit("newcomer")).seq == 1  # its admission sweeps the slots idle for over 100 s
    assert loop.latest_seq("idle:txt2img") == 0 and loop.latest_seq("active:txt2img") == 2 and len(loop.slots) == 2
