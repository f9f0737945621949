"""BackgroundJob: stages, progress, callbacks, captured errors and cancellation, on its executor."""

import subprocess
import sys
import threading
import time
from concurrent.futures import Future

import pytest

from tda_explorer.jobs import BackgroundJob, JobCancelled, check_cancelled


def test_stages_chain_their_results_and_report_progress():
    seen = []
    job = BackgroundJob([("one", lambda _: 1), ("two", lambda r: r + 1), ("three", lambda r: r * 10)],
                        on_update=lambda j: seen.append((j.label, j.progress, j.state)))
    assert job.state == "pending" and job.future is None and not job.done
    assert job.start() is job and isinstance(job.future, Future)
    assert job.join(10) is job
    assert job.state == "done" and job.done and job.result == 20 and job.error is None and job.progress == 1.0
    assert seen[0] == ("one", 0.0, "running") and seen[-1] == ("done", 1.0, "done")
    assert [label for label, _, _ in seen] == ["one", "two", "three", "done"]
    assert job.future.done() and job.future.result() is None
    with pytest.raises(RuntimeError, match="only be started once"):
        job.start()
    with pytest.raises(RuntimeError, match="before it is started"):
        BackgroundJob([]).join()


def test_an_error_is_kept_with_its_traceback_and_a_broken_view_does_not_kill_the_job():
    def broken_view(job):
        raise RuntimeError("view failed")

    failing = BackgroundJob([("ok", lambda _: 1), ("bad", lambda _: 1 / 0)]).start().join(10)
    assert failing.state == "failed" and isinstance(failing.error, ZeroDivisionError)
    assert failing.label.startswith("ZeroDivisionError") and "ZeroDivisionError" in failing.traceback
    assert failing.progress == 0.5
    viewed = BackgroundJob([("ok", lambda _: 7)], on_update=broken_view).start().join(10)
    assert viewed.state == "done" and viewed.result == 7 and "view failed" in viewed.traceback


def test_cancel_stops_inside_a_stage_and_between_stages():
    started, ran_after = threading.Event(), []

    def long_stage(_):
        started.set()
        while True:
            check_cancelled()
            time.sleep(0.005)

    job = BackgroundJob([("long", long_stage), ("after", lambda _: ran_after.append(1))]).start()
    assert started.wait(10) and not job.done
    job.cancel()
    job.join(10)
    assert job.state == "cancelled" and isinstance(job.error, JobCancelled) and "long" in job.label
    assert not ran_after
    check_cancelled()  # the worker thread is free again; outside a job this is a no-op

    entered, gate = threading.Event(), threading.Event()
    between = BackgroundJob([("first", lambda _: (entered.set(), gate.wait(10))),
                             ("second", lambda _: ran_after.append(1))]).start()
    assert entered.wait(10)
    between.cancel()
    gate.set()
    between.join(10)
    assert between.state == "cancelled" and "before 'second'" in between.label and not ran_after


def test_jobs_run_concurrently_and_the_interpreter_exits_while_one_runs():
    gate = threading.Event()
    waiting = BackgroundJob([("wait", lambda _: gate.wait(10))]).start()
    other = BackgroundJob([("quick", lambda _: "ok")]).start().join(10)
    assert other.state == "done" and not waiting.done
    gate.set()
    assert waiting.join(10).state == "done"

    code = ("import time\nfrom tda_explorer.jobs import BackgroundJob, check_cancelled\n"
            "def forever(_):\n    while True:\n        check_cancelled()\n        time.sleep(0.01)\n"
            "job = BackgroundJob([('forever', forever)], on_update=lambda j: print(j.state, flush=True)).start()\n"
            "time.sleep(0.2)\n")
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and time.perf_counter() - t0 < 30
    assert done.stdout.split() == ["running", "cancelled"]


def test_a_time_limit_stops_the_loops_that_check_within_one_chunk():
    from tda_explorer.jobs import TimeLimitExceeded, check_cancelled, time_limit

    check_cancelled()  # no limit, no job: nothing happens
    with time_limit(0.05):
        check_cancelled()  # before the deadline
        time.sleep(0.06)
        with pytest.raises(TimeLimitExceeded):
            check_cancelled()
        with time_limit(10.0), pytest.raises(TimeLimitExceeded):  # an outer limit that ends sooner still holds
            check_cancelled()
    check_cancelled()  # the limit ended with its block
