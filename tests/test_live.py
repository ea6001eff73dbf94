"""The live loop with its worker thread, on fake engines whose steps the test lets run (no sleeps, no clocks).

The scheduling policy itself is tested step by step, without threads, in test_schedule.py; the loop on the real
engine in test_engine.py. No torch here: this module is in the unit tier.
"""

import threading

import pytest

from lcm_live.live import SUPERSEDED, Limits, LiveLoop, Outcome
from lcm_live.request import GenerationError, Request, RequestRefused
from tests.fakes import FakeEngine, GatedEngine


pytestmark = pytest.mark.unit


def generate(prompt, steps=4, **fields):
    return Request(prompt=prompt, steps=steps, **fields)


@pytest.fixture
def engine():
    return GatedEngine()


@pytest.fixture
def loop(engine):
    live = LiveLoop(engine, max_batch=8)
    yield live
    engine.open()
    live.close()


def test_a_job_runs_and_reports_its_times():
    loop = LiveLoop(FakeEngine(step_s=0.0))
    try:
        outcome = loop.run_sync("s1", generate("hello"), timeout=5)
        assert isinstance(outcome, Outcome) and outcome.seq == 1
        assert outcome.result.params["prompt"] == "hello" and outcome.result.timings.unet_steps == 4
        assert outcome.wait_ms >= outcome.run_ms >= 0
    finally:
        loop.close()


def test_superseded_before_start_never_runs(loop, engine):
    blocker = loop.submit("other", generate("blocker", steps=2))
    engine.wait_in_step()  # the worker is busy: the next two wait in line
    first = loop.submit("s1", generate("first"))
    second = loop.submit("s1", generate("second"))
    assert first.future.result(timeout=5) == SUPERSEDED  # at once, not when the worker gets to it
    engine.open()
    assert second.future.result(timeout=5).result.params["prompt"] == "second"
    assert blocker.future.result(timeout=5).result.params["prompt"] == "blocker"
    assert "first" not in engine.started and loop.stats.dropped == 1


def test_superseded_while_running_stops_at_the_next_step(loop, engine):
    old = loop.submit("s1", generate("old", steps=8))
    engine.wait_in_step()
    engine.go()
    engine.wait_in_step()  # in the old job's second step
    new = loop.submit("s1", generate("new", steps=4))
    engine.open()
    assert old.future.result(timeout=5) == SUPERSEDED
    assert new.future.result(timeout=5).result.params["prompt"] == "new"
    assert engine.calls == [["old"]] + [["new"]] * 4  # its second step was left as soon as it was stale
    assert loop.stats.stopped == 1 and loop.stats.aborted_steps == 1


def test_another_session_does_not_stop_a_running_job(loop, engine):
    mine = loop.submit("s1", generate("mine", steps=6))
    engine.wait_in_step()
    theirs = loop.submit("s2", generate("theirs"))
    engine.open()
    assert mine.future.result(timeout=5).result.params["prompt"] == "mine"
    assert theirs.future.result(timeout=5).result.params["prompt"] == "theirs"
    assert engine.calls[1] == ["mine", "theirs"]  # joined its batch at the next step


def test_results_never_go_back_in_order():
    loop = LiveLoop(FakeEngine(step_s=0.0))
    try:
        jobs = []
        for i in range(40):  # some keys come faster than a job, some after it ended
            jobs.append(loop.submit("s1", generate(f"prompt {i}", steps=2)))
            if i % 7 == 0:
                jobs[-1].future.result(timeout=5)
        outcomes = [job.future.result(timeout=10) for job in jobs]
        shown = [o.seq for o in outcomes if o != SUPERSEDED]
        assert shown == sorted(shown) and len(set(shown)) == len(shown)
        assert outcomes[-1] != SUPERSEDED and outcomes[-1].result.params["prompt"] == "prompt 39"
    finally:
        loop.close()


def test_a_typist_is_served_before_a_webcams_next_frame(engine):
    """With one row per call, the less-served session goes first when a row leaves, whoever asked first."""
    loop = LiveLoop(engine, max_batch=1)
    try:
        frame = loop.submit("cam:webcam", generate("frame 1", steps=2))
        engine.wait_in_step()
        following = loop.submit("cam:webcam", generate("frame 2", steps=2), preempt=False)
        typed = loop.submit("typist:txt2img", generate("typed", steps=2))
        engine.open()
        for job in (frame, following, typed):
            job.future.result(timeout=5)
        order = [call[0] for call in engine.calls]
        assert order == ["frame 1", "frame 1", "typed", "typed", "frame 2", "frame 2"]
    finally:
        loop.close()


def test_a_failing_row_reports_its_error_and_the_loop_keeps_serving():
    loop = LiveLoop(FakeEngine(step_s=0.0))
    try:
        job = loop.submit("s1", generate("fail: pretend out of memory"))
        with pytest.raises(GenerationError, match="MemoryError: pretend out of memory"):
            job.future.result(timeout=5)
        assert loop.run_sync("s1", generate("after"), timeout=5).result.params["prompt"] == "after"
    finally:
        loop.close()


def test_a_waiter_that_gives_up_does_not_stop_the_worker(loop, engine):
    running = loop.submit("s1", generate("running", steps=6))
    engine.wait_in_step()
    waiting = loop.submit("s2", generate("never wanted"))
    running.future.cancel()  # a closed tab cancels its wait
    waiting.future.cancel()
    engine.open()
    assert loop.run_sync("s3", generate("next"), timeout=5).result.params["prompt"] == "next"
    assert "never wanted" not in engine.started
    assert sum("running" in call for call in engine.calls) <= 2  # it left at the next boundary


def test_a_request_over_the_cost_cap_is_refused_before_it_queues():
    loop = LiveLoop(FakeEngine(step_s=0.0), Limits(max_cost=64 * 64 * 4))
    try:
        with pytest.raises(RequestRefused, match="128x128 at 4 steps is more than this server runs"):
            loop.submit("s1", Request(prompt="big", width=128, height=128))
        outcome = loop.run_sync("s1", Request(prompt="small", width=64, height=64), timeout=5)
        assert outcome.result.params["prompt"] == "small" and "big" not in loop.engine.started
    finally:
        loop.close()


def test_one_visitor_cannot_queue_more_than_its_share(engine):
    loop = LiveLoop(engine, Limits(session_jobs=2, address_jobs=3))
    try:
        loop.submit("a:1", generate("a1", steps=8), address="10.0.0.1")
        engine.wait_in_step()  # nothing finishes while the test submits
        loop.submit("a:2", generate("a2"), address="10.0.0.1")
        with pytest.raises(RequestRefused, match="from this session"):
            loop.submit("a:3", generate("a3"), address="10.0.0.1")
        loop.submit("a:2", generate("a2 newer"), address="10.0.0.1")  # superseding its own slot is always fine
        loop.submit("b:1", generate("b1"), address="10.0.0.1")
        with pytest.raises(RequestRefused, match="from your address"):
            loop.submit("c:1", generate("c1"), address="10.0.0.1")
        other = loop.submit("d:1", generate("another visitor"))
        engine.open()
        assert other.future.result(timeout=5) != SUPERSEDED
    finally:
        engine.open()
        loop.close()


def test_bookkeeping_of_silent_slots_expires():
    loop = LiveLoop(FakeEngine(step_s=0.0), Limits(idle_forget_s=0.0))  # silent since before now: expired
    try:
        for i in range(20):  # twenty visitors, each from an address of its own
            loop.run_sync(f"session{i}:txt2img", generate(f"p{i}", steps=1), timeout=5, address=f"10.0.0.{i}")
        loop.run_sync("last:txt2img", generate("last", steps=1), timeout=5)
        assert loop.slot_names() == {"last:txt2img"}
        assert loop.tables_size() == 4  # the last slot's own: sequence, last seen, last delivered, its fair share
    finally:
        loop.close()


# ---------------------------------------------------------------------------------------------- continuous batching
def test_a_step_whose_rows_are_all_stale_is_abandoned_mid_call(loop, engine):
    old = loop.submit("a:t", generate("old", steps=4))
    engine.wait_in_step()
    new = loop.submit("a:t", generate("new", steps=1))
    engine.open()  # the call in progress asks should_abort: every row in it is stale
    assert old.future.result(timeout=5) == SUPERSEDED
    assert new.future.result(timeout=5).result.params["prompt"] == "new"
    assert loop.stats.aborted_steps == 1 and engine.calls == [["new"]]


def test_a_sweep_runs_as_one_batch_and_returns_one_result_per_request():
    engine = FakeEngine(step_s=0.0)
    loop = LiveLoop(engine, max_batch=8)
    try:
        outcome = loop.run_sync("a:sweep", [generate("sweep", steps=n) for n in range(1, 9)], timeout=5)
        assert [r.params["steps"] for r in outcome.result] == list(range(1, 9))
        assert [len(call) for call in engine.calls] == [8, 7, 6, 5, 4, 3, 2, 1]  # each row leaves when done
    finally:
        loop.close()


def test_webcam_frames_faster_than_a_generation_still_come_back(loop, engine):
    """preempt=False: a new frame replaces the pending one but lets the running one finish (else none would)."""
    running = loop.submit("cam:webcam", generate("frame 0"), preempt=False)
    engine.wait_in_step()
    waiting = [loop.submit("cam:webcam", generate(f"frame {i}"), preempt=False) for i in range(1, 6)]
    engine.open()
    assert running.future.result(timeout=5).result.params["prompt"] == "frame 0"
    assert [job.future.result(timeout=5) for job in waiting[:-1]] == [SUPERSEDED] * 4
    assert waiting[-1].future.result(timeout=5).result.params["prompt"] == "frame 5"  # the newest comes back
    assert loop.stats.stopped == 0 and loop.stats.dropped == 4


# ---------------------------------------------------------------------------------------------- leaving and closing
def test_forget_drops_a_leaving_sessions_pending_and_running_jobs(loop, engine):
    running = loop.submit("gone:webcam", generate("running", steps=4))
    engine.wait_in_step()
    pending = loop.submit("gone:txt2img", generate("pending", steps=4))
    loop.forget("gone:")
    assert pending.future.result(timeout=5) == SUPERSEDED
    engine.open()
    assert running.future.result(timeout=5) == SUPERSEDED  # left at the next boundary
    assert "pending" not in engine.started


def test_a_session_that_leaves_during_its_last_step_leaves_no_bookkeeping(loop, engine):
    """Its last step still runs (the image is nearly done), but its fair share and slot are not made again."""
    job = loop.submit("gone:txt2img", generate("last step", steps=1), address="198.51.100.7")
    engine.wait_in_step()
    loop.forget("gone:")
    engine.go()
    job.future.result(timeout=5)
    assert loop.tables_size() == 0 and loop.slot_names() == set()


def test_close_during_a_step_tells_every_waiter_and_ends_the_worker(engine):
    loop = LiveLoop(engine)
    running = loop.submit("a:t", generate("running", steps=8))
    engine.wait_in_step()
    pending = loop.submit("b:t", generate("pending"))
    closing = threading.Thread(target=loop.close)
    closing.start()
    assert running.future.result(timeout=5) == SUPERSEDED  # at once, while the step is still running
    assert pending.future.result(timeout=5) == SUPERSEDED
    engine.go()  # the step sees its rows are stale and stops
    closing.join(timeout=10)
    assert not closing.is_alive() and not loop.alive
    with pytest.raises(RuntimeError, match="closed"):
        loop.submit("c:t", generate("too late"))
    assert "pending" not in engine.started


# ---------------------------------------------------------------------------------------------- the worker cannot die
class WorkerExit(BaseException):
    """Not an Exception: it ends the worker thread, as a bug in the loop itself would."""


def _raising(method, error: BaseException, when=None):
    """`method`, except that it raises `error` whenever `when(args)` holds; without `when`, on its first call."""
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(args)
        if when(args) if when is not None else len(calls) == 1:
            raise error
        return method(*args, **kwargs)

    return wrapped


def _names_boom(args) -> bool:
    """The call's requests or rows include the prompt "boom"."""
    return any(getattr(item, "request", item).prompt == "boom" for item in args[0])


@pytest.mark.parametrize("where", ["start_many", "step", "finish"])
@pytest.mark.parametrize("error", [MemoryError("out of memory"), RuntimeError("CUDA error: illegal memory access")])
def test_an_engine_error_fails_only_the_jobs_it_touched(where, error, caplog):
    engine = FakeEngine(step_s=0.0)
    setattr(engine, where, _raising(getattr(engine, where), error, _names_boom))
    loop = LiveLoop(engine, Limits(max_cost=128 * 128 * 8))
    try:
        bad = loop.submit("a:t", generate("boom", steps=2))
        good = loop.submit("b:t", generate("fine", steps=2, width=128, height=128))  # its own batch
        with pytest.raises(GenerationError, match=type(error).__name__):
            bad.future.result(timeout=5)
        assert good.future.result(timeout=5).result.params["prompt"] == "fine"
        assert loop.run_sync("a:t", generate("after"), timeout=5).result.params["prompt"] == "after"
        assert loop.alive and loop.stats.failed == 1 and "worker_note" not in loop.info
        assert len([r for r in caplog.records if type(error).__name__ in r.getMessage()]) == 1  # logged once
    finally:
        loop.close()


@pytest.mark.parametrize("error", [MemoryError("CUDA out of memory while capturing"), RuntimeError("capture failed")])
def test_a_failed_graph_capture_between_steps_is_logged_and_the_worker_goes_on(error, caplog):
    engine = FakeEngine(step_s=0.0)
    engine.warm = _raising(engine.warm, error)
    loop = LiveLoop(engine)
    try:
        assert loop.run_sync("a:t", generate("first", steps=1), timeout=5) != SUPERSEDED
        assert loop.run_sync("a:t", generate("second", steps=1), timeout=5).result.params["prompt"] == "second"
        assert loop.alive
        assert [r.getMessage() for r in caplog.records if "capturing" in r.getMessage()] == [
            f"capturing a CUDA graph failed (0 job(s) told): {type(error).__name__}: {error}"
        ]
    finally:
        loop.close()


def test_a_worker_thread_that_ends_anyway_is_restarted_and_the_status_says_so():
    engine = FakeEngine(step_s=0.0)
    engine.step = _raising(engine.step, WorkerExit("a bug in /srv/app/lcm_live/worker.py"))
    loop = LiveLoop(engine)
    try:
        lost = loop.submit("a:t", generate("lost", steps=2))
        with pytest.raises(GenerationError, match="worker restarted"):
            lost.future.result(timeout=5)
        assert loop.run_sync("b:t", generate("after"), timeout=5).result.params["prompt"] == "after"
        note = loop.info["worker_note"]
        assert note.startswith("The worker restarted once") and "WorkerExit" in note and "/srv" not in note
        assert loop.alive and loop.info["model"] == "simulated"
    finally:
        loop.close()
    assert not loop.alive


# ---------------------------------------------------------------------------------------------- switching the model
def test_a_new_engine_warms_up_on_the_worker_between_steps_while_the_old_one_serves():
    old, new = GatedEngine("old"), GatedEngine("new")
    old.open(), new.open()
    loop = LiveLoop(old)
    seen, stop = [], threading.Event()

    def webcam():  # traffic all along: a frame as soon as the last one came back
        while not stop.is_set():
            seen.append(loop.run_sync("cam:webcam", generate("frame", steps=2), timeout=5, address="192.0.2.1"))

    warmed = []

    def warm_up():
        steps_before = len(old.calls)
        warmed.append((threading.current_thread().name, old.in_step.is_set()))
        new.generate(generate("warm-up", steps=2))
        warmed.append(len(old.calls) - steps_before)  # no step of the old engine ran meanwhile

    camera = threading.Thread(target=webcam)
    camera.start()
    try:
        while len(seen) < 3 and camera.is_alive():
            camera.join(0.01)
        assert loop.swap_engine(new, prepare=warm_up).result(timeout=5) is None
        count = len(seen)
        while len(seen) < count + 3 and camera.is_alive():
            camera.join(0.01)
    finally:
        stop.set()
        camera.join(timeout=10)
        loop.close()
    assert warmed == [("lcm-live-worker", False), 0]
    engines = [outcome.result.params["engine"] for outcome in seen]  # every frame came back, from one model
    assert engines[:3] == ["old"] * 3 and engines[-1] == "new" and engines == sorted(engines, reverse=True)
    assert "warm-up" in new.started and "warm-up" not in old.started


def test_a_new_engine_whose_warm_up_fails_is_not_served():
    old, new = FakeEngine(step_s=0.0), FakeEngine(step_s=0.0)
    loop = LiveLoop(old)
    try:
        ready = loop.swap_engine(new, prepare=_raising(lambda: None, MemoryError("out of memory in the warm-up")))
        assert isinstance(ready.exception(timeout=5), MemoryError)
        assert loop.engine is old and loop.run_sync("a:t", generate("still"), timeout=5) != SUPERSEDED
        assert loop.alive and not new.calls
    finally:
        loop.close()


def test_a_warm_up_that_ends_the_worker_thread_still_answers_the_loader():
    old, new = FakeEngine(step_s=0.0), FakeEngine(step_s=0.0)
    loop = LiveLoop(old)
    try:
        ready = loop.swap_engine(new, prepare=_raising(lambda: None, WorkerExit("capture went wrong")))
        assert isinstance(ready.exception(timeout=5), WorkerExit)  # the loader is not left waiting
        assert loop.run_sync("a:t", generate("still"), timeout=5) != SUPERSEDED and loop.engine is old
        assert loop.info["worker_note"].startswith("The worker restarted once")
    finally:
        loop.close()
