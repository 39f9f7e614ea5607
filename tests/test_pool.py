"""The process pool's own mechanics (runs, resumes and signals are tested end to end elsewhere)."""

import gc
import logging
import multiprocessing
import os
import signal
import threading
import time

import psycopg
import pytest

from relinker import checkpoint, linker, pool
from relinker.checkpoint import Range, split_blob_space
from relinker.pool import WorkSpec, _collector_paused


@pytest.fixture
def collector_on():
    was = gc.isenabled()
    gc.enable()
    yield
    if not was:
        gc.disable()


def test_the_collector_is_off_while_a_range_is_worked_and_back_on_after(collector_on):
    with _collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_the_collector_is_back_on_after_a_range_that_failed(collector_on):
    with pytest.raises(RuntimeError), _collector_paused():
        raise RuntimeError("range failed")
    assert gc.isenabled()


def test_a_collector_switched_off_by_the_caller_stays_off(collector_on):
    gc.disable()
    with _collector_paused():
        pass
    assert not gc.isenabled()


# --- runs of a real pool, with a stand-in for a mode's work ------------------------------

class _SlowRangeZero:
    """Range 0 takes a few seconds, the others nothing; each notes the signals it runs with blocked."""

    SECONDS = 2.0

    def __init__(self, spec: WorkSpec):
        self.notes = os.fsencode(spec.local["notes"])

    def process(self, r, ctx):
        blocked = sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, []))
        with open(os.path.join(self.notes, b"%d" % r.range_no), "w") as f:
            f.write(" ".join(map(str, blocked)))
        with open(os.path.join(self.notes, b"route-%d" % r.range_no), "w") as f:
            f.write("python" if linker.RangeWalker is None else "c")
        if r.range_no == 0:
            time.sleep(self.SECONDS)
        return lambda conn: None

    def connect(self):
        pass

    def reset(self):
        pass

    def close(self):
        pass


def _pool_run(catalogue_url, tmp_path, n_ranges: int) -> tuple[WorkSpec, str]:
    notes = tmp_path / "notes"
    notes.mkdir()
    with psycopg.connect(catalogue_url, autocommit=True) as conn:
        run_id = checkpoint.create_run(conn, "relink", b"/nowhere", b"/nowhere", {}, split_blob_space(n_ranges))
    spec = WorkSpec(work=_SlowRangeZero, dsn=catalogue_url, by_hash_root=b"/nowhere", archive_root=b"/nowhere",
                    options={}, local={"notes": str(notes)}, run_id=run_id)
    return spec, notes


def test_an_idle_worker_leaves_as_soon_as_the_last_range_ends_not_at_its_next_poll(catalogue_url, tmp_path,
                                                                                   monkeypatch):
    # Two workers, two ranges: one worker is done at once and finds nothing
    # left to claim while range 0 is still worked. Were it to wait out its
    # poll (made very long here), the run would end that much later.
    monkeypatch.setattr(pool, "POLL_INTERVAL", (60.0, 60.0))
    spec, _ = _pool_run(catalogue_url, tmp_path, 2)
    started = time.monotonic()
    outcome = pool.run_pool(spec, workers=2)
    took = time.monotonic() - started
    assert not outcome.interrupted and outcome.failed_ranges == 0
    assert _SlowRangeZero.SECONDS <= took < 30, took
    with psycopg.connect(catalogue_url) as conn:
        assert conn.execute("SELECT array_agg(DISTINCT status) FROM relinker_range WHERE run_id = %s",
                            (spec.run_id,)).fetchone()[0] == ["done"]


def test_a_dry_run_worker_at_its_range_outlives_a_lease_after_another_found_nothing_to_claim(catalogue_url,
                                                                                               tmp_path):
    # In a dry run a worker ends once nothing is left to claim, while others may still work theirs:
    # that is no sign of a stuck worker, whatever the lease.
    notes = tmp_path / "notes"
    notes.mkdir()
    spec = WorkSpec(work=_SlowRangeZero, dsn=catalogue_url, by_hash_root=b"/nowhere", archive_root=b"/nowhere",
                    options={}, local={"notes": str(notes)}, lease=0.2,
                    dry_ranges=[Range.of(None, n, b) for n, b in enumerate(split_blob_space(2))])
    outcome = pool.run_pool(spec, workers=2)
    assert not outcome.interrupted and outcome.ranges_done == 2


class _SlowToEnd(_SlowRangeZero):
    """As _SlowRangeZero, and the worker of range 0 takes a while to end once the run is over."""

    worked_range_zero = False

    def process(self, r, ctx):
        self.worked_range_zero = self.worked_range_zero or r.range_no == 0
        return super().process(r, ctx)

    def close(self):
        if self.worked_range_zero:
            time.sleep(1.5)


def test_a_worker_slow_to_end_after_the_run_is_given_its_lease_before_it_is_killed(catalogue_url, tmp_path,
                                                                                   caplog):
    # The other worker ends as the last range does; the one that worked it, later, well inside the lease.
    spec, _ = _pool_run(catalogue_url, tmp_path, 2)
    spec.work, spec.lease = _SlowToEnd, 10.0
    with caplog.at_level(logging.WARNING, logger="relinker.pool"):
        outcome = pool.run_pool(spec, workers=2)
    assert not outcome.interrupted and outcome.ranges_done == 2
    assert not [r.getMessage() for r in caplog.records if "has not ended" in r.getMessage()]


def test_workers_run_with_stop_signals_let_in_and_the_coordinator_gets_its_mask_back(catalogue_url, tmp_path):
    # The stop signals are blocked across the fork (a worker must not run
    # the coordinator's handler): blocked in no worker afterwards, nor in
    # the coordinator.
    spec, notes = _pool_run(catalogue_url, tmp_path, 3)
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    pool.run_pool(spec, workers=2)
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
    masks = {name: (notes / name).read_text().split() for name in os.listdir(notes) if name.isdigit()}
    assert sorted(masks) == ["0", "1", "2"]
    for blocked in masks.values():
        assert str(int(signal.SIGINT)) not in blocked and str(int(signal.SIGTERM)) not in blocked


def test_the_route_a_test_asks_for_is_the_route_forked_workers_take(catalogue_url, tmp_path, worker_route):
    spec, notes = _pool_run(catalogue_url, tmp_path, 2)
    pool.run_pool(spec, workers=2)
    assert {(notes / f"route-{n}").read_text() for n in range(2)} == {worker_route}


def test_a_pool_started_beside_other_threads_says_so(catalogue_url, tmp_path, caplog):
    # Workers are forked: a lock another thread holds at that moment stays held in every worker.
    spec, _ = _pool_run(catalogue_url, tmp_path, 1)
    release = threading.Event()
    bystander = threading.Thread(target=release.wait)
    bystander.start()
    try:
        with caplog.at_level(logging.WARNING, logger="relinker.pool"):
            pool.run_pool(spec, workers=1)
    finally:
        release.set()
        bystander.join()
    assert any("forking workers from a process that runs 2 threads" in r.getMessage() for r in caplog.records)


class _KilledHoldingTheDrawLock:
    """Dry range 0: its worker dies by SIGKILL while it holds the lock the pool's workers draw ranges under."""

    def __init__(self, spec: WorkSpec):
        pass

    def process(self, r, ctx):
        if r.range_no == 0:
            import fcntl
            fcntl.lockf(ctx._worker.dry_next._lock_file.fileno(), fcntl.LOCK_EX)
            os.kill(os.getpid(), signal.SIGKILL)
        ctx.tick()  # reads the stop flag: no lock to be left held either
        return lambda conn: None

    def connect(self):
        pass

    def reset(self):
        pass

    def close(self):
        pass


def test_a_worker_killed_holding_a_shared_lock_leaves_none_held(catalogue_url):
    """A kill -9 (or the OOM killer) may land while a worker holds a lock the pool shares: the others go on.

    multiprocessing's own locks would stay held by the dead worker and stop every other process for good.
    """
    from relinker.checkpoint import Range

    spec = WorkSpec(work=_KilledHoldingTheDrawLock, dsn=catalogue_url, by_hash_root=b"/nowhere",
                    archive_root=b"/nowhere", options={},
                    dry_ranges=[Range.of(None, n, b) for n, b in enumerate(split_blob_space(6))])
    # In a process of its own: a pool that hangs must not hang the test.
    reader, writer = multiprocessing.get_context("fork").Pipe(duplex=False)
    coordinator = multiprocessing.get_context("fork").Process(
        target=lambda: writer.send(pool.run_pool(spec, 2).ranges_done))
    coordinator.start()
    coordinator.join(30)
    hung = coordinator.is_alive()
    if hung:
        for child in _children(coordinator.pid):
            os.kill(child, signal.SIGKILL)
        coordinator.kill()
        coordinator.join()
    assert not hung, "the pool hung on a lock its dead worker held"
    assert reader.poll(1) and reader.recv() == 5


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(child) for child in f.read().split()]


class _NotesItsDescriptors(_SlowRangeZero):
    """Notes how many descriptors its worker has open as it starts."""

    def __init__(self, spec: WorkSpec):
        super().__init__(spec)
        with open(os.path.join(self.notes, b"fds-%d" % os.getpid()), "w") as f:
            f.write(str(len(os.listdir("/proc/self/fd"))))

    def process(self, r, ctx):
        return lambda conn: None


def test_a_worker_forked_late_inherits_none_of_the_others_pipes(catalogue_url, tmp_path):
    """Each worker would otherwise start with three descriptors more than the one before it: under a
    low open-file limit the last ones of many could not work."""
    spec, notes = _pool_run(catalogue_url, tmp_path, 6)
    spec.work = _NotesItsDescriptors
    outcome = pool.run_pool(spec, workers=6)
    assert not outcome.interrupted and outcome.failed_ranges == 0
    counts = [int((notes / name).read_text()) for name in os.listdir(notes) if name.startswith("fds-")]
    assert len(counts) == 6 and max(counts) - min(counts) <= 1, counts
