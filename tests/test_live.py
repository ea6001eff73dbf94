"""The live loop with a fake engine whose steps take a known time."""

import threading
import time

import pytest

from lcm_live.live import SUPERSEDED, Limits, LiveLoop, Outcome
from lcm_live.request import GenerationError, Request, RequestRefused
from tests.fakes import FakeEngine


def generate(prompt, steps=4):
    return Request(prompt=prompt, steps=steps)


@pytest.fixture
def loop():
    engine = FakeEngine(step_s=0.02)
    live = LiveLoop(engine)
    yield live
    live.close()


def test_a_job_runs_and_reports_its_times(loop):
    outcome = loop.run_sync("s1", generate("hello"), timeout=5)
    assert isinstance(outcome, Outcome)
    assert outcome.result.params["prompt"] == "hello"
    assert outcome.run_ms >= 4 * 20 * 0.9 and outcome.wait_ms >= outcome.run_ms


def test_superseded_before_start_never_runs(loop):
    blocker = loop.submit("other", generate("blocker", steps=8))  # holds the worker ~160 ms
    time.sleep(0.03)
    first = loop.submit("s1", generate("first"))
    second = loop.submit("s1", generate("second"))
    assert first.future.result(timeout=5) == SUPERSEDED
    assert second.future.result(timeout=5).result.params["prompt"] == "second"
    blocker.future.result(timeout=5)
    assert "first" not in loop.engine.started
    assert loop.stats.dropped == 1


def test_superseded_while_running_stops_early(loop):
    old = loop.submit("s1", generate("old", steps=8))
    time.sleep(0.05)  # ~2 steps in
    new = loop.submit("s1", generate("new", steps=4))
    assert old.future.result(timeout=5) == SUPERSEDED
    assert new.future.result(timeout=5).result.params["prompt"] == "new"
    assert loop.engine.steps_run < 8 + 4  # the old job did not run all its steps
    assert loop.stats.stopped == 1


def test_another_session_does_not_stop_a_running_job(loop):
    mine = loop.submit("s1", generate("mine", steps=6))
    time.sleep(0.03)
    theirs = loop.submit("s2", generate("theirs"))
    assert mine.future.result(timeout=5).result.params["prompt"] == "mine"
    assert theirs.future.result(timeout=5).result.params["prompt"] == "theirs"


def test_results_never_go_back_in_order(loop):
    jobs = []
    for i in range(40):  # typing at irregular speed, faster and slower than a job
        jobs.append(loop.submit("s1", generate(f"prompt {i}", steps=2)))
        time.sleep(0.005 * (i % 7))
    outcomes = [job.future.result(timeout=10) for job in jobs]
    shown = [o.seq for o in outcomes if o != SUPERSEDED]
    assert shown == sorted(shown) and len(set(shown)) == len(shown)
    assert outcomes[-1] != SUPERSEDED and outcomes[-1].result.params["prompt"] == "prompt 39"


def test_sessions_take_turns(loop):
    """A session that resubmits as fast as it can (a webcam) does not starve one that types."""
    stop = threading.Event()

    def webcam():
        while not stop.is_set():
            loop.run_sync("cam", generate("frame"), timeout=5)

    streamer = threading.Thread(target=webcam)
    streamer.start()
    time.sleep(0.1)
    waits = []
    for i in range(5):
        start = time.perf_counter()
        loop.run_sync("typist", generate(f"typed {i}"), timeout=5)
        waits.append(time.perf_counter() - start)
    stop.set()
    streamer.join()
    # at worst the typist waits for the frame in progress, then runs: ~2 job-times (4 steps x 20 ms each)
    assert max(waits) < 2 * 0.08 * 3


def test_a_failing_job_reports_its_error_and_the_loop_keeps_serving(loop):
    job = loop.submit("s1", generate("fail: pretend out of memory"))
    with pytest.raises(GenerationError, match="MemoryError: pretend out of memory"):
        job.future.result(timeout=5)
    assert loop.run_sync("s1", generate("after"), timeout=5).result.params["prompt"] == "after"


def test_forget_drops_a_leaving_sessions_jobs(loop):
    loop.submit("other", generate("blocker", steps=8))
    time.sleep(0.02)
    pending = loop.submit("gone:txt2img", generate("pending"))
    loop.forget("gone:")
    assert pending.future.result(timeout=5) == SUPERSEDED


def test_the_real_engine_stops_when_superseded(sd15_engine):
    loop = LiveLoop(sd15_engine)
    try:
        calls = []

        def count_and_supersede(*args):
            calls.append(1)
            if len(calls) == 2:  # a newer input arrives during the second UNet call
                loop.submit("s1", Request(prompt="newer", steps=1))

        hook = sd15_engine.txt2img.unet.register_forward_hook(count_and_supersede)
        first = loop.submit("s1", Request(prompt="slow", steps=8))
        assert first.future.result(timeout=30) == SUPERSEDED
        hook.remove()
        assert len(calls) <= 3  # the slow request stopped at its next boundary, the newer one ran one step
    finally:
        loop.close()


def test_a_waiter_that_gives_up_does_not_stop_the_worker(loop):
    running = loop.submit("s1", generate("running", steps=6))
    time.sleep(0.03)
    waiting = loop.submit("s2", generate("never wanted"))
    running.future.cancel()  # a closed tab cancels its wait
    waiting.future.cancel()
    time.sleep(0.2)
    assert "never wanted" not in loop.engine.started
    assert loop.run_sync("s3", generate("next"), timeout=5).result.params["prompt"] == "next"


def test_a_request_over_the_cost_cap_is_refused_before_it_queues():
    loop = LiveLoop(FakeEngine(step_s=0.01), Limits(max_cost=64 * 64 * 4))
    try:
        with pytest.raises(RequestRefused, match="128x128 at 4 steps is more than this server runs"):
            loop.submit("s1", Request(prompt="big", width=128, height=128))
        assert loop.run_sync("s1", Request(prompt="small", width=64, height=64), timeout=5).result.params[
            "prompt"
        ] == "small"
        assert "big" not in loop.engine.started
    finally:
        loop.close()


def test_one_visitor_cannot_queue_more_than_its_share():
    loop = LiveLoop(FakeEngine(step_s=0.05), Limits(session_jobs=2, address_jobs=3))
    try:
        loop.submit("a:1", generate("a1", steps=8), address="10.0.0.1")
        loop.submit("a:2", generate("a2"), address="10.0.0.1")
        with pytest.raises(RequestRefused, match="from this session"):
            loop.submit("a:3", generate("a3"), address="10.0.0.1")
        loop.submit("a:2", generate("a2 newer"), address="10.0.0.1")  # superseding its own slot is always fine
        loop.submit("b:1", generate("b1"), address="10.0.0.1")
        with pytest.raises(RequestRefused, match="from your address"):
            loop.submit("c:1", generate("c1"), address="10.0.0.1")
        assert loop.run_sync("d:1", generate("another visitor"), timeout=5) != SUPERSEDED
    finally:
        loop.close()


def test_bookkeeping_of_silent_slots_expires():
    loop = LiveLoop(FakeEngine(step_s=0.001), Limits(idle_forget_s=0.05))
    try:
        for i in range(20):  # twenty visitors, each from an address of its own
            loop.run_sync(f"session{i}:txt2img", generate(f"p{i}", steps=1), timeout=5, address=f"10.0.0.{i}")
        time.sleep(0.1)
        loop.run_sync("last:txt2img", generate("last", steps=1), timeout=5)
        assert loop.tables_size() <= 4  # the last slot's own: sequence, last seen, last delivered, its fair share
    finally:
        loop.close()


# ---------------------------------------------------------------------------------------------- continuous batching
def _call_with(engine: FakeEngine, prompt: str) -> int:
    return next(i for i, call in enumerate(engine.calls) if prompt in call)


def test_a_new_request_joins_the_running_batch_at_the_next_step():
    engine = FakeEngine(step_s=0.03)
    loop = LiveLoop(engine, max_batch=8)
    try:
        first = loop.submit("a:t", generate("first", steps=8))
        time.sleep(0.07)  # ~2 steps in
        second = loop.submit("b:t", generate("second", steps=4))
        assert second.future.result(timeout=5).result.timings.batch == 2
        assert first.future.result(timeout=5).result.params["prompt"] == "first"
        joined = _call_with(engine, "second")
        assert "first" in engine.calls[joined]  # one UNet call for both
        assert joined <= 3  # it waited for the step in progress, not for the first request's 8 steps
    finally:
        loop.close()


def test_a_superseded_row_leaves_at_the_next_boundary_and_its_slots_newer_request_joins():
    engine = FakeEngine(step_s=0.03)
    loop = LiveLoop(engine, max_batch=8)
    try:
        other = loop.submit("b:t", generate("other", steps=8))
        old = loop.submit("a:t", generate("old", steps=8))
        time.sleep(0.07)
        new = loop.submit("a:t", generate("new", steps=2))
        assert old.future.result(timeout=5) == SUPERSEDED
        assert new.future.result(timeout=5).result.params["prompt"] == "new"
        assert other.future.result(timeout=5).result.timings.unet_steps == 8
        old_calls = [i for i, call in enumerate(engine.calls) if "old" in call]
        assert len(old_calls) <= 4 and "old" not in engine.calls[_call_with(engine, "new")]
        assert loop.stats.stopped == 1
    finally:
        loop.close()


def test_a_full_batch_makes_a_newcomer_wait_for_a_row_to_leave_not_for_the_batch():
    engine = FakeEngine(step_s=0.02)
    loop = LiveLoop(engine, max_batch=2)
    try:
        short = loop.submit("a:t", generate("short", steps=2))
        long = loop.submit("b:t", generate("long", steps=8))
        time.sleep(0.01)
        late = loop.submit("c:t", generate("late", steps=2))
        late.future.result(timeout=5)
        assert max(len(call) for call in engine.calls) == 2
        assert _call_with(engine, "late") == _call_with(engine, "short") + 2  # joined as soon as "short" left
        long.future.result(timeout=5)
        short.future.result(timeout=5)
    finally:
        loop.close()


def test_sizes_that_cannot_share_a_call_take_turns():
    engine = FakeEngine(step_s=0.01)
    loop = LiveLoop(engine, max_batch=8, limits=Limits(max_cost=128 * 128 * 8))
    try:
        big = loop.submit("a:t", Request(prompt="big", steps=8, width=128, height=128))
        small = loop.submit("b:t", Request(prompt="small", steps=8, width=64, height=64))
        small.future.result(timeout=5)
        big.future.result(timeout=5)
        assert all(len(call) == 1 for call in engine.calls)  # never mixed in one call
        # The 64x64 rows cost a quarter of the 128x128 ones per step: it got its 8 steps in while the big one
        # was still running, not after all of the big one's.
        assert _call_with(engine, "small") < 3
        last_small = max(i for i, call in enumerate(engine.calls) if "small" in call)
        big_before = sum("big" in call for call in engine.calls[: last_small + 1])
        assert big_before <= 4
    finally:
        loop.close()


def test_a_step_whose_rows_are_all_stale_is_abandoned_mid_call():
    engine = FakeEngine(step_s=0.4, slices=40)
    loop = LiveLoop(engine, max_batch=8)
    try:
        old = loop.submit("a:t", generate("old", steps=4))
        time.sleep(0.1)  # a quarter into its first step
        started = time.perf_counter()
        new = loop.submit("a:t", generate("new", steps=1))
        assert old.future.result(timeout=5) == SUPERSEDED
        new.future.result(timeout=5)
        assert time.perf_counter() - started < 0.4 + 0.3  # the new one's step, not the rest of the old one's too
        assert loop.stats.aborted_steps == 1
        assert engine.calls == [["new"]]
    finally:
        loop.close()


def test_a_sweep_runs_as_one_batch_and_returns_one_result_per_request():
    engine = FakeEngine(step_s=0.01)
    loop = LiveLoop(engine, max_batch=8)
    try:
        outcome = loop.run_sync("a:sweep", [generate("sweep", steps=n) for n in range(1, 9)], timeout=5)
        assert [r.params["steps"] for r in outcome.result] == list(range(1, 9))
        assert len(engine.calls) == 8 and len(engine.calls[0]) == 8  # the 1-step row left after the first call
    finally:
        loop.close()


def test_webcam_frames_faster_than_a_generation_still_come_back():
    """preempt=False: a new frame replaces the pending one but lets the running one finish (else none would)."""
    engine = FakeEngine(step_s=0.02)
    loop = LiveLoop(engine, max_batch=8)
    try:
        jobs = []
        for i in range(30):  # a frame every 10 ms; a frame takes 4 steps x 20 ms
            jobs.append(loop.submit("cam:webcam", generate(f"frame {i}"), preempt=False))
            time.sleep(0.01)
        outcomes = [job.future.result(timeout=5) for job in jobs]
        shown = [o.seq for o in outcomes if o != SUPERSEDED]
        assert len(shown) >= 3 and shown == sorted(shown)
        assert outcomes[-1] != SUPERSEDED  # the newest frame always comes back
        assert loop.stats.stopped == 0
    finally:
        loop.close()
