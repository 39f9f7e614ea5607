"""Kill and resume: workers and whole jobs killed mid-run, two coordinators on one run."""

import contextlib
import json
import os
import random
import signal

import psutil
import pytest

from processes import children, finish, kill_group, range_states, running_worker_pids, start, wait_for

pytestmark = pytest.mark.reliability



def relink_argv(world, *args):
    return world.argv("relink", "--no-progress", "--json", "--workers", "2", *args)


def test_worker_killed_mid_range_is_replaced_and_its_range_redone(busy):
    job = start(relink_argv(busy, "--ranges", "6", "--lease", "2"))
    victim = wait_for(lambda: running_worker_pids(busy.conn), what="a running range")[0]
    os.kill(victim, signal.SIGKILL)
    code, out, err = finish(job)
    assert code == 0, err
    summary = json.loads(out)
    busy.assert_complete(summary["run_id"])
    assert summary["links_created"] + summary["links_present"] == 60000
    retried = busy.conn.execute("SELECT count(*) FROM relinker_range WHERE run_id = %s AND attempts > 1",
                                (summary["run_id"],)).fetchone()[0]
    assert retried >= 1
    assert "exited with -9" in err


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_whole_job_killed_at_random_moments_then_resumed(busy, seed):
    rng = random.Random(seed)
    for _ in range(2):
        job = start(relink_argv(busy, "--ranges", "30"))
        # somewhere between "a range is running" and "most ranges are done"
        wait_for(lambda: range_states(busy.conn).get("running"), what="a running range")
        target = rng.randint(0, 20)
        wait_for(lambda: range_states(busy.conn).get("done", 0) >= target, what=f"{target} ranges done")
        kill_group(job)
        job.wait()
    assert range_states(busy.conn).get("done", 0) < 30
    code, out, err = finish(start(relink_argv(busy)))  # plain `relink` resumes the unfinished run
    assert code == 0, err
    summary = json.loads(out)
    assert summary["run_id"] == 1
    busy.assert_complete(1)
    # every path counted exactly once across the attempts
    assert summary["links_created"] + summary["links_present"] == 60000


def test_two_coordinators_share_one_run(busy):
    first = start(relink_argv(busy, "--ranges", "40"))
    wait_for(lambda: range_states(busy.conn).get("running"), what="the run to start")
    # Freeze the first coordinator (well inside its lease) until the second
    # has done ranges of its own: otherwise a fast first one may finish the
    # whole run before the second has even started.
    kill_group(first, signal.SIGSTOP)
    try:
        done_before = range_states(busy.conn).get("done", 0)
        second = start(relink_argv(busy, "--run", "1"))
        wait_for(lambda: range_states(busy.conn).get("done", 0) >= done_before + 3, what="the second at work")
    finally:
        kill_group(first, signal.SIGCONT)
    results = [finish(first), finish(second)]
    for code, _out, err in results:
        assert code == 0, err
    busy.assert_complete(1)
    rows = busy.conn.execute("SELECT attempts, worker FROM relinker_range WHERE run_id = 1").fetchall()
    assert all(attempts == 1 for attempts, _ in rows), "a range was worked twice"
    assert len({worker for _, worker in rows}) >= 3, "the second coordinator did not take part"
    # both report the whole run, counted once, and each its own rate: the links its workers made
    summaries = [json.loads(out) for _code, out, _err in results]
    assert all(s["links_created"] == 60000 for s in summaries)
    own = [s["links_per_second"] * s["elapsed_seconds"] for s in summaries]
    assert all(links > 0 for links in own) and abs(sum(own) - 60000) < 600, own


def test_survivor_takes_over_from_a_killed_coordinator(busy):
    first = start(relink_argv(busy, "--ranges", "40", "--lease", "2"))
    wait_for(lambda: range_states(busy.conn).get("running"), what="the run to start")
    second = start(relink_argv(busy, "--run", "1", "--lease", "2"))
    wait_for(lambda: range_states(busy.conn).get("done", 0) >= 5, what="some ranges done")
    kill_group(first)
    first.wait()
    code, out, err = finish(second)
    assert code == 0, err
    busy.assert_complete(1)


def test_stalled_worker_loses_its_range_after_the_lease(busy):
    first = start(relink_argv(busy, "--ranges", "12", "--lease", "1.5", "--workers", "1"))
    victim = wait_for(lambda: running_worker_pids(busy.conn), what="a running range")[0]
    os.kill(victim, signal.SIGSTOP)  # alive, connected, silent
    try:
        second = start(relink_argv(busy, "--run", "1", "--lease", "1.5"))
        code, out, err = finish(second)
        assert code == 0, err
        assert "terminating stalled session" in err
    finally:
        os.kill(victim, signal.SIGCONT)
    code, out, err = finish(first)
    assert code == 0, err
    busy.assert_complete(1)
    assert "taken over" in err or "locked by another worker" in err


@pytest.mark.parametrize("ctrl_c_meanwhile", [False, True])
def test_a_stopped_worker_is_killed_a_lease_after_its_run_ran_out_of_work(busy, ctrl_c_meanwhile):
    """A worker stopped mid-range (SIGSTOP) and never continued: the other worker takes its range over after
    the lease and finishes the run; the coordinator waits one more lease for it, then kills it and ends (a
    Ctrl-C meanwhile changes nothing: the stopped worker would never give anything back)."""
    job = start(relink_argv(busy, "--ranges", "6", "--lease", "1.5"))
    victim = wait_for(lambda: running_worker_pids(busy.conn), what="a running range")[0]
    os.kill(victim, signal.SIGSTOP)
    try:
        if ctrl_c_meanwhile:
            wait_for(lambda: children(job) == [victim], what="the other worker to end")
            os.kill(job.pid, signal.SIGINT)
        code, out, err = finish(job, timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGCONT)
    assert code == 0, err
    busy.assert_complete(json.loads(out)["run_id"])
    assert f"worker {victim} has not ended 2 s after the run ran out of work" in err
    assert f"worker {victim} exited" not in err  # killed on purpose: neither reported again nor replaced
    assert not psutil.pid_exists(victim)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_worker_sent_sigterm_alone_gives_its_range_back_and_is_replaced(busy, workers):
    """`kill <worker pid>` of a worker that looks stuck: its range is given back and another worker
    takes its place, as for one killed with SIGKILL; the run ends complete."""
    job = start(busy.argv("relink", "--no-progress", "--json", "--workers", workers, "--ranges", "8"))
    victim = wait_for(lambda: running_worker_pids(busy.conn), what="a running range")[0]
    os.kill(victim, signal.SIGTERM)
    code, out, err = finish(job)
    assert code == 0, err
    assert f"worker {victim} was stopped by a signal" in err
    busy.assert_complete(json.loads(out)["run_id"])


def test_the_only_worker_killed_is_replaced(busy):
    """With one worker, no other takes its range over: the coordinator starts a new one."""
    job = start(busy.argv("relink", "--no-progress", "--json", "--workers", "1", "--ranges", "6", "--lease", "2"))
    victim = wait_for(lambda: running_worker_pids(busy.conn), what="a running range")[0]
    os.kill(victim, signal.SIGKILL)
    code, out, err = finish(job)
    assert code == 0, err
    busy.assert_complete(json.loads(out)["run_id"])
