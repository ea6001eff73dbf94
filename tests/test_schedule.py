"""The live loop's scheduler and slot book, driven step by step: no threads, no clocks, no torch."""

from dataclasses import dataclass

import pytest

from lcm_live.request import Request, RequestRefused, checked
from lcm_live.schedule import Job, Limits, Scheduler, Settle
from lcm_live.slots import SlotBook


pytestmark = pytest.mark.unit
ENGINE = type("Engine", (), {"native_size": 64})()  # all the scheduler reads of an engine


@dataclass(eq=False)
class Row:
    prompt: str
    steps: int
    pixels: int
    index: int = 0

    @property
    def done(self) -> bool:
        return self.index >= self.steps

    @property
    def last_step(self) -> bool:
        return self.index == self.steps - 1


class Driver:
    """Executes plans as the worker does, minus the engine: rows count their steps, finished jobs leave."""

    def __init__(self, max_batch: int = 8):
        self.scheduler = Scheduler(max_batch)
        self.calls: list[list[str]] = []  # the prompts of each UNet call
        self.done: list[str] = []
        self.seq = 0

    def submit(self, slot: str, *requests: Request, address: str | None = None, preempt: bool = True) -> Job:
        self.seq += 1
        job = Job(slot, requests, self.seq, address, submitted=self.seq)
        self.scheduler.add(job, preempt)
        return job

    def step(self):
        plan = self.scheduler.schedule(ENGINE)
        for job in plan.admitted:
            job.rows = [
                Row(r.prompt, r.unet_steps, r.width * r.height) for r in (checked(q, 64)[0] for q in job.requests)
            ]
        pairs = [(job, row) for job in plan.step for row in job.rows if not row.done]
        for _, row in pairs:
            row.index += 1
        if pairs:
            self.calls.append([row.prompt for _, row in pairs])
        self.scheduler.stepped(pairs)
        for job in plan.step:
            if all(row.done for row in job.rows):
                self.scheduler.remove(job)
                self.done.append(job.requests[0].prompt)
        return plan

    def run(self, limit: int = 100) -> None:
        while self.scheduler.pending or self.scheduler.running:
            self.step()
            limit -= 1
            assert limit, "the scheduler never ran out of work"


def generate(prompt: str, steps: int = 4, side: int = 64) -> Request:
    return Request(prompt=prompt, steps=steps, width=side, height=side)


def test_a_slots_newer_job_drops_its_pending_one_unrun():
    driver = Driver()
    first = driver.submit("s:t", generate("first"))
    assert driver.scheduler.add(second := Job("s:t", (generate("second"),), 2), True) is first
    assert driver.step().admitted == [second]
    driver.run()
    assert driver.done == ["second"] and not any("first" in call for call in driver.calls)


def test_a_superseded_running_job_leaves_at_the_next_boundary_and_the_newer_one_joins():
    driver = Driver()
    other, old = driver.submit("b:t", generate("other", 8)), driver.submit("a:t", generate("old", 8))
    driver.step(), driver.step()
    new = driver.submit("a:t", generate("new", 2))
    plan = driver.step()
    assert plan.stopped == [old] and plan.admitted == [new] and driver.calls[-1] == ["other", "new"]
    driver.run()
    assert driver.done == ["new", "other"] and other.rows[0].index == 8


def test_a_job_in_its_last_step_is_let_finish():
    driver = Driver()
    old = driver.submit("a:t", generate("old", 2))
    driver.step()
    driver.submit("a:t", generate("new", 2))
    assert old.finishing and old.should_stop()
    assert driver.step().stopped == [] and driver.calls[-1] == ["old", "new"] and driver.done == ["old"]


def test_a_webcam_frame_does_not_preempt_the_running_one():
    driver = Driver()
    driver.submit("cam:webcam", generate("frame 1", 2), preempt=False)
    driver.step()
    driver.submit("cam:webcam", generate("frame 2", 2), preempt=False)
    driver.run()
    assert driver.done == ["frame 1", "frame 2"]


def test_a_new_request_joins_the_running_batch_at_the_next_step():
    driver = Driver()
    driver.submit("a:t", generate("first", 8))
    driver.step(), driver.step()
    driver.submit("b:t", generate("second", 4))
    driver.step()
    assert driver.calls == [["first"], ["first"], ["first", "second"]]


def test_a_full_batch_makes_a_newcomer_wait_for_a_row_to_leave_not_for_the_batch():
    driver = Driver(max_batch=2)
    driver.submit("a:t", generate("short", 2)), driver.submit("b:t", generate("long", 8))
    driver.step()
    driver.submit("c:t", generate("late", 2))
    driver.run()
    assert driver.calls[:4] == [["short", "long"], ["short", "long"], ["long", "late"], ["long", "late"]]
    assert max(map(len, driver.calls)) == 2


def test_sizes_that_cannot_share_a_call_take_turns_by_pixel_steps_served():
    """A 64x64 row costs a quarter of a 128x128 one per step: it gets four steps for each of the big one's."""
    driver = Driver()
    driver.submit("a:t", generate("big", 8, side=128)), driver.submit("b:t", generate("small", 8))
    driver.run()
    assert all(len(call) == 1 for call in driver.calls)  # never mixed in one call
    order = [call[0] for call in driver.calls]
    assert order[:11] == ["big"] + ["small"] * 4 + ["big"] + ["small"] * 4 + ["big"]
    assert driver.done == ["small", "big"]


def test_the_least_served_visitor_is_admitted_first_whoever_asked_first():
    driver = Driver(max_batch=1)
    driver.submit("cam:webcam", generate("frame 1", 2), preempt=False)
    driver.step()
    driver.submit("cam:webcam", generate("frame 2", 2), preempt=False)  # asked before the typist
    driver.submit("typist:t", generate("typed", 2))
    driver.run()
    assert driver.done == ["frame 1", "typed", "frame 2"]


def test_an_address_with_many_sessions_is_one_visitor():
    driver = Driver(max_batch=1)
    for i in range(3):
        driver.submit(f"crowd{i}:t", generate(f"crowd {i}", 1), address="10.0.0.1")
    driver.submit("alone:t", generate("alone", 1), address="10.0.0.2")
    driver.run()
    assert driver.done.index("alone") == 1  # right after the crowd's first, not behind all three


def test_a_sweep_is_one_batch_whose_rows_leave_as_they_finish():
    driver = Driver()
    driver.submit("a:sweep", *[generate("sweep", n) for n in range(1, 9)])
    driver.run()
    assert list(map(len, driver.calls)) == [8, 7, 6, 5, 4, 3, 2, 1]


def test_a_settle_job_is_admitted_but_never_stepped():
    driver = Driver()
    settle = Job("a:t", Settle(latents=None, params={}), 1)
    driver.scheduler.add(settle)
    plan = driver.scheduler.schedule(ENGINE)
    assert plan.admitted == [settle] and plan.step == []


def test_waiters_that_left_are_dropped_or_stopped():
    driver = Driver()
    running = driver.submit("a:t", generate("running", 4))
    driver.step()
    waiting = driver.submit("b:t", generate("waiting", 4, side=128))
    running.future.cancel(), waiting.future.cancel()
    plan = driver.step()
    assert plan.stopped == [running] and plan.dropped == [waiting] and plan.step == []


def test_forget_stops_running_jobs_and_returns_pending_ones():
    driver = Driver()
    running = driver.submit("gone:webcam", generate("running"))
    driver.step()
    pending = driver.submit("gone:txt2img", generate("pending", side=128))
    kept = driver.submit("stays:txt2img", generate("kept", side=128))
    assert driver.scheduler.forget("gone:") == [pending]
    assert running.should_stop() and not kept.should_stop()


def test_a_forgotten_visitor_charged_for_its_last_step_is_not_made_again():
    driver = Driver()
    driver.submit("gone:t", generate("last", 1), address="198.51.100.7")
    assert len(driver.scheduler.fair) == 2
    plan = driver.scheduler.schedule(ENGINE)
    driver.scheduler.fair.forget(["gone", "198.51.100.7"])  # the session left during the step
    driver.scheduler.stepped([(plan.admitted[0], Row("last", 1, 64 * 64, 1))])
    assert len(driver.scheduler.fair) == 0


def test_shares_count_live_jobs_of_other_slots():
    driver = Driver()
    limits = Limits(session_jobs=2, address_jobs=3)
    driver.submit("a:1", generate("a1"), address="x")
    driver.submit("a:2", generate("a2"), address="x")
    driver.scheduler.check_shares("a:2", "x", limits)  # its own slot's job does not count
    with pytest.raises(RequestRefused, match="from this session"):
        driver.scheduler.check_shares("a:3", "x", limits)
    driver.submit("b:1", generate("b1"), address="x")
    with pytest.raises(RequestRefused, match="from your address"):
        driver.scheduler.check_shares("c:1", "x", limits)
    driver.scheduler.check_shares("c:1", "y", limits)


# ---------------------------------------------------------------------------------------------- the slot book
def test_sequence_numbers_and_late_arrivals():
    book = SlotBook()
    assert book.claim("s:t", now=1.0, order=10.0) == 1
    assert book.claim("s:t", now=2.0, order=12.0) == 2
    assert book.claim("s:t", now=3.0, order=11.0) is None  # sent before the newest: superseded at once
    assert book.latest("s:t") == 2


def test_results_never_go_back():
    book = SlotBook()
    book.claim("s:t", 0.0), book.claim("s:t", 0.0)
    assert book.deliver("s:t", 2) and not book.deliver("s:t", 1)


def test_a_preview_is_taken_once_and_only_while_it_is_the_newest():
    book = SlotBook()
    book.claim("s:t", 0.0)
    book.keep_preview("s:t", 1, "latents", {"p": 1})
    assert book.take_preview("s:t") == ("latents", {"p": 1}) and book.take_preview("s:t") is None
    book.keep_preview("s:t", 1, "latents", {})
    book.claim("s:t", 0.0)  # newer input came
    assert book.take_preview("s:t") is None


def test_silent_slots_expire_unless_busy_and_say_who_left():
    book = SlotBook()
    book.claim("a:t", now=1.0, address="x")
    book.claim("a:w", now=5.0, address="x")
    book.claim("b:t", now=1.0, address="y")
    assert book.expire(horizon=2.0, busy={"b:t"}) == []  # a:t left, but session a and address x still have a:w
    assert book.expire(horizon=6.0, busy=set()) == ["a", "x", "b", "y"]
    assert len(book) == 0


def test_forget_drops_a_session_and_a_late_result_makes_nothing_again():
    book = SlotBook()
    book.claim("gone:t", 0.0, address="x")
    book.claim("gone:w", 0.0)
    assert sorted(book.forget("gone:")) == ["gone", "x"]
    book.keep_preview("gone:t", 1, "latents", {})
    assert book.deliver("gone:t", 1) and len(book) == 0


def test_the_live_loop_and_its_test_doubles_do_not_import_torch():
    """The unit tier stays fast only while the loop's modules stay torch-free."""
    import subprocess
    import sys

    modules = "lcm_live.live, lcm_live.schedule, lcm_live.slots, lcm_live.worker, lcm_live.interfaces, tests.fakes"
    code = f"import sys, {modules}; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr
