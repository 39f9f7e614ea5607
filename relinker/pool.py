"""The coordinator's process pool: workers that claim ranges until none is left.

Mode-agnostic: a mode (relink, copy, count, verify) supplies a ``RangeWork`` class
that processes one range; this module runs it in ``--workers`` processes,
each with its own database connections, feeds the parent's progress bar,
replaces workers that die, and turns the stop signals (SIGINT, SIGTERM, SIGHUP) into a clean stop (the
first signal: stop claiming, give unfinished ranges back; the second: stop at
once, the next run still resumes correctly).

Workers talk to the parent over one pipe each, never a shared queue: a
worker killed in the middle of a write can corrupt only its own pipe, and
every message is far below PIPE_BUF, so writes are atomic anyway.

Workers are forked from the coordinator, which by then holds no database
connection and runs no other thread: a spawned worker would import psycopg
and relinker again, a fixed cost per worker that a short content run on two
cores cannot hide. The stop signals are blocked across the fork, so a
signal reaches a new worker only once its own handlers are in place.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import fcntl
import gc
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Protocol

import psycopg

from relinker import db
from relinker.checkpoint import DEFAULT_LEASE, CheckpointStore, Counters, LostRange, ModeClash, Problem, Range
from relinker.errors import EXIT_INTERRUPTED, stop_signals
from relinker.logs import say

log = logging.getLogger(__name__)

#: How often a worker with nothing to claim looks again (s): soon at first (the
#: last ranges of a run are about to finish), then less and less often.
POLL_INTERVAL = (0.05, 1.0)
#: How often a worker reports progress to the parent (s).
PROGRESS_INTERVAL = 0.25
#: Problems shown in a dry run's summary.
DRY_RUN_SAMPLES = 20


class Interrupted(Exception):
    """The coordinator asked this worker to stop; give the range back."""


@dataclasses.dataclass
class WorkSpec:
    """Everything a worker process needs; pickled into each worker as it starts."""

    work: Callable[["WorkSpec"], "RangeWork"]
    dsn: str
    by_hash_root: bytes
    archive_root: bytes
    options: dict
    #: settings of this invocation only, never stored with the run (e.g. where media are mounted here)
    local: dict = dataclasses.field(default_factory=dict)
    run_id: int | None = None
    since: datetime.datetime | None = None
    dry_ranges: list[Range] | None = None
    #: the store's shard directories (``ab``, ``ab/cd``) that are symlinks: never gone through
    symlinked_shards: frozenset = frozenset()
    #: the run's mode, and the modes whose runs it must not overlap (see checkpoint.hold_mode)
    mode: str | None = None
    excludes: frozenset = frozenset()
    #: the mode counts a path not linked as missing alone (see jobs.Mode)
    missing_apart: bool = False
    lease: float = DEFAULT_LEASE
    retry_timeout: float = db.DEFAULT_RETRY_TIMEOUT
    verbose: int = 0

    @property
    def dry_run(self) -> bool:
        return self.run_id is None

    @property
    def heartbeat_interval(self) -> float:
        return max(0.2, min(10.0, self.lease / 4))


class RangeWork(Protocol):
    """What a mode implements: process one range, then commit its catalogue changes."""

    def process(self, r: Range, ctx: "RangeContext") -> Callable[[psycopg.Connection], None]:
        """Do the range's filesystem work; return the finalize step that
        writes the range's catalogue updates inside the commit transaction."""

    def connect(self) -> None:
        """Open the database connections ``process`` uses (before a range is claimed)."""

    def reset(self) -> None:
        """Drop database connections after a transient error."""

    def close(self) -> None:
        """Release everything."""


#: Problems that record a limit of the filesystem, not damage: they fail no
#: blob (verify passes it, ``--failed-ids`` leaves it out).
LIMIT_KINDS = frozenset({"too-many-links", "name-too-long"})


class RangeContext:
    """Per-range bookkeeping handed to ``RangeWork.process``.

    Counts outcomes, buffers problems (flushed with heartbeats), reports
    progress to the parent and notices stop requests and lost claims.
    """

    def __init__(self, worker: "_Worker", r: Range):
        self._worker = worker
        self.range = r
        self.counters = Counters()
        self.problems: list[Problem] = []
        self.problem_kinds: collections.Counter[str] = collections.Counter()
        #: blob IDs some problem of this range names as the blob's failure
        self.problem_blobs: set[str] = set()
        self._next_check = 0.0

    def problem(self, kind: str, detail: str, *, blobid: str | None = None, path: bytes | None = None) -> None:
        """Record a per-path (or per-blob) problem: counted, never fatal.

        A kind of LIMIT_KINDS (a limit of the filesystem, not something wrong
        with the blob) is recorded all the same, but fails no blob.
        """
        self.counters.problems += 1
        self.problem_kinds[kind] += 1
        if blobid is not None and kind not in LIMIT_KINDS:
            self.problem_blobs.add(blobid)
        if self._worker.spec.dry_run:
            if len(self._worker.samples) < DRY_RUN_SAMPLES:
                self._worker.samples.append(Problem(kind, detail, blobid, path))
        else:
            self.problems.append(Problem(kind, detail, blobid, path))

    def keep_alive(self) -> None:
        """Call every few seconds while the range's finishing step waits (inside its transaction)."""
        if self._worker.store is not None:
            self._worker.store.keep_alive(self.range)

    def tick(self) -> None:
        """Call often (every few hundred paths): stop, progress and heartbeat checks."""
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + PROGRESS_INTERVAL
        self._worker.check_stop()
        self._worker.send("progress", self.range.range_no, self.counters.looked_at(self._worker.spec.missing_apart),
                          self.counters.bytes_read)
        self._worker.maybe_heartbeat(self, now)


# --- the worker process -------------------------------------------------------

_signals_received = 0


def _on_worker_signal(signum, frame) -> None:
    global _signals_received
    _signals_received += 1
    if _signals_received > 1:
        os._exit(EXIT_INTERRUPTED)  # second signal: stop at once


class _SharedCounter:
    """A counter the pool's processes draw from, whose lock dies with a process killed holding it.

    multiprocessing's locks are semaphores: a worker killed while holding
    one leaves every other process blocked on it for good. POSIX record
    locks are the kernel's, released with their process.
    """

    def __init__(self, context):
        self._value = context.RawValue("q", 0)
        self._lock_file = tempfile.TemporaryFile()

    def next(self) -> int:
        fd = self._lock_file.fileno()
        fcntl.lockf(fd, fcntl.LOCK_EX)
        try:
            value = self._value.value
            self._value.value = value + 1
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN)
        return value

    def close(self) -> None:
        self._lock_file.close()


class _Worker:
    def __init__(self, spec: WorkSpec, pipe, stop_flag, dry_next: _SharedCounter | None):
        self.spec = spec
        self.pipe = pipe
        #: set by the parent on the first stop signal; a lock-free byte (see _SharedCounter)
        self.stop_flag = stop_flag
        self.dry_next = dry_next
        self.parent = os.getppid()
        self.samples: list[Problem] = []
        self.name = db.worker_name()
        self.store = None if spec.dry_run else CheckpointStore(
            spec.dsn, spec.run_id, worker=self.name, lease=spec.lease,
            retry_timeout=spec.retry_timeout, since=spec.since, mode=spec.mode, excludes=spec.excludes,
        )
        if self.store is not None:
            self.store.before_retry = self.check_stop
        self.work = spec.work(spec)
        self._last_heartbeat = time.monotonic()

    def send(self, *message: Any) -> None:
        try:
            self.pipe.send(message)
        except (BrokenPipeError, OSError):
            pass  # the parent is gone; check_stop() will notice

    def check_stop(self) -> None:
        if _signals_received or self.stop_flag.value or os.getppid() != self.parent:
            raise Interrupted()

    def maybe_heartbeat(self, ctx: RangeContext, now: float) -> None:
        if self.store is not None and now - self._last_heartbeat >= self.spec.heartbeat_interval:
            self.store.heartbeat(ctx.range, ctx.counters, ctx.problems)
            self._last_heartbeat = now

    def claim(self) -> Range | None:
        if self.store is not None:
            return self.store.claim()
        index = self.dry_next.next()
        return self.spec.dry_ranges[index] if index < len(self.spec.dry_ranges) else None

    def nothing_left(self) -> bool:
        return self.store is None or self.store.open_ranges() == 0

    def wait_for_news(self, pause: float) -> None:
        """Idle until the parent says a range of this pool ended, or ``pause`` passes.

        The ranges still open are other workers' (or lost by a dead one):
        when the last of this pool's ends, the run is over at once rather
        than at the next poll. The poll itself stays for ranges whose lease
        runs out.
        """
        self.send("idle", -1)
        try:
            if self.pipe.poll(pause):
                while self.pipe.poll(0):
                    self.pipe.recv()
        except (EOFError, OSError):
            time.sleep(pause)  # the parent is gone; check_stop() will notice

    def run(self) -> None:
        shortest, longest = POLL_INTERVAL
        pause = shortest
        try:
            while True:
                self.check_stop()
                if not self.ready():
                    return
                r = self.claim()
                if r is None:
                    if self.nothing_left():
                        return
                    self.wait_for_news(pause)
                    pause = min(longest, pause * 2)
                    continue
                pause = shortest
                self.run_range(r)
        except Interrupted:
            return
        finally:
            self.work.close()
            if self.store is not None:
                self.store.close()

    def ready(self) -> bool:
        """Open the work's and the control connections before a range is claimed; False if the run has
        nothing left meanwhile.

        A worker the server has no second session for (``max_connections``, a
        role's connection limit) must not hold a range it cannot work until
        its lease runs out: it waits with none, as long as --retry-timeout.
        Nor does it hold either session while it waits: workers each holding
        one, waiting for a second, would wait on each other that long, with
        the run's work long done.
        """
        try:
            for attempt in db.retrying(self.spec.retry_timeout):
                with attempt:
                    if attempt.retry_state.attempt_number > 1:  # refused before: still wanted?
                        self.check_stop()
                        if self.nothing_left():
                            return False
                    try:
                        self.work.connect()
                        if self.store is not None:
                            self.store.connect()
                    except Exception as exc:
                        if db.is_transient(exc):
                            self.work.reset()
                            if self.store is not None:
                                self.store.close()
                        raise
        except Exception as exc:
            if db.outage_over_timeout(exc):
                raise _GaveUp(db.first_line(exc)) from exc
            raise
        return True

    def run_range(self, r: Range) -> None:
        self._last_heartbeat = time.monotonic()
        try:
            with _collector_paused():
                for attempt in db.retrying(self.spec.retry_timeout):
                    with attempt:
                        self.check_stop()  # a range redone again and again must still hear a signal
                        ctx = RangeContext(self, r)
                        try:
                            finalize = self.work.process(r, ctx)
                            if self.store is not None:
                                self.store.finish(r, ctx.counters, ctx.problems, finalize)
                        except Exception as exc:
                            if db.is_transient(exc):
                                # Redo the whole range on fresh connections, if it is still ours.
                                self.work.reset()
                                if self.store is not None:
                                    self.store.reassert(r)
                            raise
        except Interrupted:
            if self.store is not None:
                self.store.give_back(r)
            self.send("progress", r.range_no, 0, 0)
            raise
        except ModeClash:
            # Found on reconnecting mid-range: the range goes back for this run's resume.
            if self.store is not None:
                with contextlib.suppress(Exception):
                    self.store.abandon(r)
            self.send("progress", r.range_no, 0, 0)
            raise
        except LostRange as exc:
            log.warning("range %d: %s; leaving it to its new owner", r.range_no, exc)
            self.send("progress", r.range_no, 0, 0)
            return
        except Exception as exc:
            if db.outage_over_timeout(exc):
                # The database's trouble, not the range's (its own connection refused for --retry-timeout,
                # while this worker's control session may work): given back, and this worker gives up.
                if self.store is not None:
                    with contextlib.suppress(Exception):
                        self.store.give_back(r)
                raise _GaveUp(db.first_line(exc)) from exc
            log.error("range %d failed: %s", r.range_no, db.first_line(exc), exc_info=self.spec.verbose > 1)
            if self.store is not None:
                self.store.fail(r, f"{type(exc).__name__}: {db.first_line(exc)}")
            self.send("failed", r.range_no, db.first_line(exc))
            return
        self.send("done", r.range_no, ctx.counters.as_dict(), dict(ctx.problem_kinds),
                  [dataclasses.astuple(p) for p in self.samples] if self.spec.dry_run else [])
        self.samples.clear()


@contextlib.contextmanager
def _collector_paused():
    """No cyclic garbage collection while a range is worked.

    A range allocates a row tuple and a path list per inode, never in a
    cycle, yet every 700 such allocations start a young-generation
    collection that traverses them, a share of a re-check's time worth
    saving. Whatever cycles a range does leave (tracebacks of retried
    errors) are collected soon after the collector is back on.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


#: How long a process told to stop waits for a database that does not answer (to give its range
#: back, to read the run's figures) before it stops all the same.
STOP_PATIENCE = 10.0
#: A worker's exit status when the database stayed out of reach for --retry-timeout (EX_TEMPFAIL):
#: a new worker would only wait as long again.
EXIT_DATABASE_GONE = 75
#: A worker's exit code when a run that must not overlap this one is at work.
EXIT_MODE_CLASH = 76


class _GaveUp(Exception):
    """A worker's database calls failed for the whole --retry-timeout: it exits EXIT_DATABASE_GONE."""


def _open_descriptors() -> set[int]:
    """This process's open descriptors (none known where /proc is not there)."""
    try:
        listed = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return set()
    return {fd for fd in listed if _is_open(fd)}  # not the one the listing itself used


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _worker_main(spec: WorkSpec, pipe, stop_flag, dry_next: _SharedCounter, inherited=()) -> None:
    # Forked with the stop signals blocked (see start_worker): handlers first, then let them in.
    stops = stop_signals()
    for signum in stops:
        signal.signal(signum, _on_worker_signal)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
    for fd in inherited:  # the parent's ends of the other workers' pipes (see start_worker)
        with contextlib.suppress(OSError):
            os.close(fd)
    from relinker.linker import raise_open_file_limit

    raise_open_file_limit()

    def stopping() -> bool:
        return bool(_signals_received or stop_flag.value)

    db.give_up_retrying_once(stopping, STOP_PATIENCE)
    try:
        _Worker(spec, pipe, stop_flag, dry_next).run()
        if _signals_received and not stop_flag.value:
            # Stopped on its own (a SIGTERM to this worker alone): the run is not over, and the
            # coordinator must hear it from the exit code, which is otherwise that of a worker
            # with nothing left to do.
            sys.exit(EXIT_INTERRUPTED)
    except ModeClash as exc:
        log.warning("%s: this worker stops", exc)
        sys.exit(EXIT_MODE_CLASH)
    except Exception as exc:  # a worker must never die silently
        if stopping() and (isinstance(exc, _GaveUp) or db.is_transient(exc)):
            # Told to stop, it gave up on an outage after STOP_PATIENCE (no --retry-timeout went by):
            # the range it held is free for the next claim once its session is gone.
            log.warning("worker stopped without the database (%s)", exc if isinstance(exc, _GaveUp)
                        else db.first_line(exc))
            sys.exit(0 if stop_flag.value else EXIT_INTERRUPTED)
        if isinstance(exc, _GaveUp):
            log.error("worker failed: %s", exc)
            sys.exit(EXIT_DATABASE_GONE)
        log.error("worker failed: %s", db.first_line(exc), exc_info=spec.verbose > 1)
        sys.exit(EXIT_DATABASE_GONE if db.outage_over_timeout(exc) else 1)


# --- the parent ---------------------------------------------------------------

@dataclasses.dataclass
class PoolOutcome:
    """What the pool saw: whether it was interrupted, and what workers reported."""

    interrupted: bool = False
    counters: Counters = dataclasses.field(default_factory=Counters)
    problem_kinds: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    samples: list[Problem] = dataclasses.field(default_factory=list)
    failed_ranges: int = 0
    #: ranges its workers reported done (a dry run has no other record of them)
    ranges_done: int = 0
    #: a worker gave up on the database after --retry-timeout: no new one was started
    database_gone: bool = False
    #: why a worker process could not be started (fork refused: the process limit, memory)
    start_failure: str | None = None
    #: a worker found a run at work that this one must not overlap: no new one was started
    clash: bool = False


class _ForcedStop(Exception):
    pass


class Progress(Protocol):
    """What run_pool tells of the work done as it goes (relinker.report.ProgressBar)."""

    def update(self, paths_done: int, ranges_done: int, bytes_done: int, finished_work: tuple[int, int]) -> None:
        """Work done this session; see ProgressBar.update."""


def run_pool(spec: WorkSpec, workers: int, progress: Progress | None = None) -> PoolOutcome:
    """Run ``workers`` processes until the run has no open range, or a signal stops it.

    Call it from the main thread of a process that runs no other thread
    and holds no open database connection: the workers are forked from it.
    """
    if threading.active_count() > 1:
        log.warning("forking workers from a process that runs %d threads: a lock one of them holds "
                    "stays held in every worker", threading.active_count())
    context = multiprocessing.get_context("fork")
    stop_flag = context.RawValue("b", 0)
    dry_next = _SharedCounter(context)
    outcome = PoolOutcome()
    live: dict[Any, multiprocessing.Process] = {}  # pipe reader -> process
    parents_ends: dict[Any, set[int]] = {}  # pipe reader -> this process's descriptors for that worker
    in_flight: dict[int, tuple[int, int]] = {}  # range_no -> (paths, bytes) so far (this coordinator)
    idle: set = set()  # pipes of workers waiting for a range to end
    finished_paths = finished_bytes = 0
    ranges_done = 0
    respawns_left = 2 * workers + 5
    lost_to_outage = 0  # workers that gave up on the database, not replaced while it seems gone
    stopping = False
    # A worker ends on its own (exit 0) only once the run has nothing left for anyone: from then on,
    # one still there after a lease is stopped or hung, its range long taken over. (In a dry run it
    # ends once nothing is left to claim, while others may still work theirs.)
    ran_out_at: float | None = None
    killed: set[int] = set()

    def start_worker() -> None:
        reader, writer = context.Pipe(duplex=True)  # the parent answers "idle" with "wake"
        # The child closes the parent's ends of every pipe it inherits: a worker forked late would
        # otherwise start with three descriptors for each one before it.
        inherited = sorted(set().union(*parents_ends.values()) | {reader.fileno()})
        process = context.Process(target=_worker_main, args=(spec, writer, stop_flag, dry_next, inherited),
                                  name="relinker-worker", daemon=False)
        before = _open_descriptors()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals())
        try:
            process.start()
        except OSError as exc:
            # The run goes on with the workers it has; with none, it stops resumable.
            log.warning("cannot start a worker process: %s", exc.strerror)
            outcome.start_failure = exc.strerror
            reader.close()
            return
        finally:
            writer.close()
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        live[reader] = process
        # This worker's pipe, and what multiprocessing keeps to watch it (two more pipe ends).
        parents_ends[reader] = (_open_descriptors() - before) | {reader.fileno()}

    forced = False

    def on_signal(signum, frame) -> None:
        nonlocal stopping, forced
        if forced:
            return  # a third signal while the workers are being killed: that is under way
        if stopping:
            forced = True
            raise _ForcedStop()
        stopping = True
        stop_flag.value = 1
        say(f"\nrelinker: {signal.Signals(signum).name} received: finishing up and giving unfinished "
            "ranges back (send it again to stop at once)")  # dropped if stderr is gone with the same Ctrl-C

    previous = {s: signal.signal(s, on_signal) for s in stop_signals()}
    try:
        for _ in range(max(1, workers)):
            start_worker()
        while live:
            for reader in multiprocessing.connection.wait(list(live), timeout=0.5):
                try:
                    message = reader.recv()
                except (EOFError, OSError, ValueError):
                    process = live.pop(reader)
                    parents_ends.pop(reader, None)
                    process.join()
                    reader.close()
                    if process.pid in killed:
                        continue
                    if process.exitcode == 0 and not stopping and not spec.dry_run and ran_out_at is None:
                        ran_out_at = time.monotonic()
                    if process.exitcode == EXIT_DATABASE_GONE:
                        if not outcome.database_gone:
                            log.warning("the database stayed out of reach for --retry-timeout (%.0f s): "
                                        "no new worker is started", spec.retry_timeout)
                        outcome.database_gone = True  # the others find the same: let them end
                        lost_to_outage += 1
                    elif process.exitcode == EXIT_MODE_CLASH:
                        outcome.clash = True
                    elif process.exitcode != 0 and not stopping:
                        if process.exitcode == EXIT_INTERRUPTED:
                            log.warning("worker %d was stopped by a signal: another takes its place (a signal to "
                                        "the coordinator stops the run)", process.pid)
                        else:
                            log.warning("worker %d exited with %s", process.pid, process.exitcode)
                        if respawns_left > 0 and not outcome.database_gone:
                            respawns_left -= 1
                            start_worker()
                    continue
                kind, range_no, *rest = message
                if kind == "idle":
                    idle.add(reader)
                elif kind == "progress":
                    in_flight[range_no] = (rest[0], rest[1])
                elif kind == "done":
                    if outcome.database_gone and not stopping:
                        # A range committed: the database is there (only that worker could not reach it).
                        outcome.database_gone = False
                        for _ in range(min(lost_to_outage, respawns_left)):
                            respawns_left -= 1
                            start_worker()
                        lost_to_outage = 0
                    counters, kinds, samples = rest
                    in_flight.pop(range_no, None)
                    done = Counters(**counters)
                    finished_paths += done.looked_at(spec.missing_apart)
                    finished_bytes += done.bytes_read
                    ranges_done += 1
                    outcome.counters.add(done)
                    outcome.problem_kinds.update(kinds)
                    outcome.samples.extend(Problem(*s) for s in samples)
                elif kind == "failed":
                    in_flight.pop(range_no, None)
                    outcome.failed_ranges += 1
                if kind in ("done", "failed"):
                    for waiting in idle & live.keys():
                        with contextlib.suppress(OSError):
                            waiting.send(("wake",))
                    idle.clear()
            # A stop signal after that changes nothing: a stopped worker would never give anything back.
            if ran_out_at is not None and time.monotonic() - ran_out_at > spec.lease:
                for process in live.values():
                    if process.pid not in killed:
                        log.warning("worker %d has not ended %.0f s after the run ran out of work (stopped or "
                                    "hung; nothing is left for it to do): killed", process.pid, spec.lease)
                        process.kill()
                        killed.add(process.pid)
            if progress is not None:
                progress.update(finished_paths + sum(p for p, _ in in_flight.values()), ranges_done,
                                finished_bytes + sum(b for _, b in in_flight.values()),
                                (finished_paths, finished_bytes))
    except _ForcedStop:
        for process in live.values():
            process.kill()
        for process in live.values():
            process.join()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        dry_next.close()
    outcome.interrupted = stopping
    outcome.ranges_done = ranges_done
    del outcome.samples[DRY_RUN_SAMPLES:]
    return outcome
