"""Runs, ranges and claims: the checkpoint tables and who may work on what.

A run's work is split into ranges (``relinker_range``). Any worker of any
coordinator on any host claims the next open range with ``FOR UPDATE SKIP
LOCKED`` and holds a session advisory lock on it while it works, so:

- a worker that dies (SIGKILL, host crash, lost connection) frees its range
  the moment PostgreSQL notices the dropped session, and the next claim takes
  it over without waiting for a lease;
- a worker that hangs while its session stays open stops sending heartbeats;
  once ``heartbeat_at`` is older than the lease its worker claimed it with
  (not the claimer's own), a claimer terminates the stalled session and
  takes the range over;
- every write a worker makes for a range checks that it still owns the claim
  (same ``worker`` and ``attempts``), so a worker that lost its range can
  never mark it done or overwrite the new owner's counters.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable, Iterable

import psycopg
from psycopg import sql

from relinker import db, dbtext

log = logging.getLogger(__name__)

#: Seconds without a heartbeat after which a range held by a live session is taken over.
DEFAULT_LEASE = 120.0
#: Work planned per range by default: memory and redo time after a crash stay
#: small, and a range's fixed cost (a claim, its queries, a commit: tens of
#: milliseconds) stays a small part of it.
BLOBS_PER_RANGE = 10_000
MAX_RANGES = 1 << 20
#: Blob-ID prefixes used as range bounds: 8 hex digits split the space 2^32 ways.
PREFIX_DIGITS = 8


class LostRange(Exception):
    """The range was taken over by another worker; drop this attempt's results."""


@dataclasses.dataclass(frozen=True)
class Bounds:
    """What a planned range covers.

    Blob-keyed modes: ``lo <= blobid < hi`` ('' and None: unbounded), and
    only the listed ``blobids`` when the run works on a list. Copy: the
    inodes ``ino_lo <= ino < ino_hi`` of ``medium_hash``, holding
    ``bytes_planned`` bytes of content.
    """

    lo: str = ""
    hi: str | None = None
    medium_hash: str | None = None
    ino_lo: int | None = None
    ino_hi: int | None = None
    blobids: tuple[str, ...] | None = None
    bytes_planned: int | None = None


@dataclasses.dataclass(frozen=True)
class Range(Bounds):
    """One claimed (or, in a dry run, assigned) unit of work."""

    run_id: int | None = None
    range_no: int = 0
    attempt: int = 0

    @classmethod
    def of(cls, run_id: int | None, range_no: int, bounds: Bounds, attempt: int = 0) -> "Range":
        fields = {f.name: getattr(bounds, f.name) for f in dataclasses.fields(Bounds)}
        return cls(**fields, run_id=run_id, range_no=range_no, attempt=attempt)


@dataclasses.dataclass
class Counters:
    """What a range (or a whole run) did; mirrors relinker_range's counter columns."""

    blobs: int = 0
    links_created: int = 0
    links_present: int = 0
    links_replaced: int = 0
    problems: int = 0
    #: count/verify: catalogued paths not (correctly) linked
    links_missing: int = 0
    #: copy: by-hash files written, and their bytes
    files_copied: int = 0
    bytes_copied: int = 0
    #: copy, verify --hash: bytes of content read (the rate and ETA of content work)
    bytes_read: int = 0
    #: verify: blobs that failed a check
    blobs_failed: int = 0

    @property
    def links(self) -> int:
        """Paths now correctly linked (created, already there, or replaced)."""
        return self.links_created + self.links_present + self.links_replaced

    def looked_at(self, missing_apart: bool) -> int:
        """Paths looked at: linked, or a problem. ``missing_apart``: a mode that counts a path not linked
        as missing, not as a problem (count), whose problems are a blob's (count-mismatch) or a missing
        path's reason (too-many-links): linked, or missing."""
        return self.links + (self.links_missing if missing_apart else self.problems)

    def add(self, other: "Counters") -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Problem:
    """A path (or blob, or inode) that could not be handled; a relinker_problem row."""

    kind: str
    detail: str
    blobid: str | None = None
    path: bytes | None = None


# --- planning ---------------------------------------------------------------

def default_range_count(n_blobs: int, workers: int, *, heavy: bool = False) -> int:
    """Enough ranges to bound the work per range, and to keep every worker busy.

    ``heavy``: a blob may be a lot of work (its content is read), so even a
    few blobs are spread over every worker.
    """
    by_size = -(-n_blobs // BLOBS_PER_RANGE)
    by_workers = min(4 * workers, n_blobs if heavy else -(-n_blobs // 100))
    return max(1, min(MAX_RANGES, max(by_size, by_workers)))


def split_blob_space(n_ranges: int, upper: str | None = None) -> list[Bounds]:
    """Split the blob-ID space into ``n_ranges`` half-open ``[lo, hi)`` ranges.

    Blob IDs are uniformly distributed hex digests, so equal slices of the
    prefix space hold equal expected work. ``lo`` of the first range is ''
    (below every ID) and ``hi`` of the last is ``upper`` (None: unbounded), so
    the ranges cover every ID exactly once, well-formed or not.
    """
    space = 16**PREFIX_DIGITS
    if upper is not None:
        try:
            space = min(space, int(upper[:PREFIX_DIGITS].ljust(PREFIX_DIGITS, "0"), 16) + 1)
        except ValueError:
            space = 1  # not hex: one range up to upper
    bounds = sorted({f"{i * space // n_ranges:0{PREFIX_DIGITS}x}" for i in range(1, n_ranges)})
    if upper is not None:
        bounds = [b for b in bounds if b < upper]
    edges = [""] + [b for b in bounds if b] + [upper]
    return [Bounds(lo, hi) for lo, hi in zip(edges[:-1], edges[1:])]


def split_blob_list(blobids, per_range: int) -> list[Bounds]:
    """Ranges of ``per_range`` listed blob IDs each, in ID order, duplicates dropped.

    ``lo`` and ``hi`` bound each range's IDs (for people reading
    ``relinker_range``); the work is the list itself, whatever the IDs are.
    """
    ordered = sorted(set(blobids))
    chunks = [tuple(ordered[i:i + per_range]) for i in range(0, len(ordered), max(1, per_range))]
    return [Bounds(chunk[0], following[0] if following else None, blobids=chunk)
            for chunk, following in zip(chunks, chunks[1:] + [()])]


SQL_CREATE_RUN = """
INSERT INTO relinker_run (mode, by_hash_root, archive_root, options, created_by)
VALUES (%(mode)s, %(by_hash_root)s, %(archive_root)s, %(options)s, %(created_by)s)
RETURNING run_id
"""
SQL_COPY_RANGES = """
COPY relinker_range (run_id, range_no, lo, hi, medium_hash, ino_lo, ino_hi, blobids, bytes_planned) FROM STDIN
"""


def create_run(
    conn: psycopg.Connection,
    mode: str,
    by_hash_root: bytes,
    archive_root: bytes,
    options: dict,
    ranges: Iterable[Bounds],
) -> int:
    """Insert a run and its pending ranges in one transaction; return run_id."""
    with conn.transaction():
        run_id = conn.execute(SQL_CREATE_RUN, dict(
            mode=mode, by_hash_root=by_hash_root, archive_root=archive_root,
            options=dbtext.json_text(conn, options), created_by=db.worker_name(),
        )).fetchone()[0]
        with conn.cursor().copy(SQL_COPY_RANGES) as copy:
            for range_no, b in enumerate(ranges):
                copy.write_row((run_id, range_no, b.lo, b.hi, b.medium_hash, b.ino_lo, b.ino_hi,
                                None if b.blobids is None else list(b.blobids), b.bytes_planned))
    return run_id


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """A run as relinker_run records it."""

    run_id: int
    mode: str
    status: str
    by_hash_root: bytes
    archive_root: bytes
    options: dict


#: A run's status once a scan replaced the inodes its ranges name (see relinker.scan): no claim works it.
SUPERSEDED = "superseded"
# What claims and the look for what is left ask of the range's run (%(run_id)s).
RUN_OPEN = "EXISTS (SELECT 1 FROM relinker_run AS run WHERE run.run_id = %(run_id)s AND run.status = 'open')"

SQL_RUN = """
SELECT run_id, mode, status, by_hash_root, archive_root, options FROM relinker_run WHERE run_id = %s
"""
SQL_OPEN_RUNS = """
SELECT run_id, mode, status, by_hash_root, archive_root, options FROM relinker_run
WHERE mode = %s AND status = 'open' AND by_hash_root = %s AND archive_root = %s
ORDER BY run_id DESC
"""
SQL_NEWEST_RUN = """
SELECT run_id, mode, status, by_hash_root, archive_root, options FROM relinker_run
ORDER BY run_id DESC LIMIT 1
"""


def _run_info(row) -> RunInfo | None:
    if row is None:
        return None
    run_id, mode, status, by_hash_root, archive_root, options = row
    return RunInfo(run_id, mode, status, bytes(by_hash_root or b""), bytes(archive_root or b""), options or {})


def get_run(conn: psycopg.Connection, run_id: int) -> RunInfo | None:
    """The run ``run_id``, or None if there is none."""
    return _run_info(conn.execute(SQL_RUN, (run_id,)).fetchone())


def newest_run(conn: psycopg.Connection) -> RunInfo | None:
    """The run planned last, of any mode (None before the first)."""
    return _run_info(conn.execute(SQL_NEWEST_RUN).fetchone())


def open_runs(conn: psycopg.Connection, mode: str, by_hash_root: bytes, archive_root: bytes) -> list[RunInfo]:
    """Unfinished runs of ``mode`` over these roots, newest first (what a plain command may resume)."""
    return [_run_info(row) for row in conn.execute(SQL_OPEN_RUNS, (mode, by_hash_root, archive_root))]


SQL_UNFINISHED_RANGES = """
SELECT range_no, lo, hi, medium_hash, ino_lo, ino_hi, blobids, bytes_planned
FROM relinker_range WHERE run_id = %s AND status <> 'done' ORDER BY range_no
"""


def unfinished_ranges(conn: psycopg.Connection, run_id: int) -> list[Range]:
    """The ranges of a run not done yet, as planned (what resuming it would work)."""
    return [Range(lo, hi, medium_hash, ino_lo, ino_hi, None if blobids is None else tuple(blobids), bytes_planned,
                  run_id=None, range_no=range_no)
            for range_no, lo, hi, medium_hash, ino_lo, ino_hi, blobids, bytes_planned
            in conn.execute(SQL_UNFINISHED_RANGES, (run_id,))]


SQL_FINISH_RUN = """
UPDATE relinker_run SET status = 'done', finished_at = now()
WHERE run_id = %(run_id)s AND status = 'open'
  AND NOT EXISTS (SELECT 1 FROM relinker_range WHERE run_id = %(run_id)s AND status <> 'done')
"""


def finish_run_if_complete(conn: psycopg.Connection, run_id: int) -> bool:
    """Mark the run done once every one of its ranges is done; whether this marked it.

    Inside a transaction: one that marks the run commits synchronously, whatever the session's
    synchronous_commit, since "complete" is said once it has committed (durable, and every range's
    commit before it with it).
    """
    if conn.execute(SQL_FINISH_RUN, {"run_id": run_id}).rowcount != 1:
        return False
    conn.execute(SQL_SYNCHRONOUS_COMMIT)
    return True


# --- claims (worker side) ---------------------------------------------------

# Advisory lock keys: (run_id, range_no) as the two-int4 form, visible in
# pg_locks as classid = run_id, objid = range_no, objsubid = 2.
SQL_CLAIM_CANDIDATE = f"""
SELECT r.range_no, r.lo, r.hi, r.medium_hash, r.ino_lo, r.ino_hi, r.blobids, r.bytes_planned, r.status,
       r.heartbeat_at < now() - make_interval(secs => coalesce(r.lease_seconds, %(lease)s)) AS stale,
       coalesce(r.lease_seconds, %(lease)s) AS lease
FROM relinker_range r
WHERE r.run_id = %(run_id)s AND r.status <> 'done'
  -- a run a scan superseded while its coordinator started is worked no more
  AND {RUN_OPEN}
  AND (r.status = 'pending'
       OR (r.status = 'failed' AND r.finished_at < %(since)s)
       OR (r.status = 'running'
           AND (r.heartbeat_at < now() - make_interval(secs => coalesce(r.lease_seconds, %(lease)s))
                OR NOT EXISTS (
                    SELECT 1 FROM pg_locks l
                    WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
                      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                      AND l.classid = r.run_id::oid AND l.objid = r.range_no::oid))))
  AND r.range_no <> ALL(%(passed_over)s::int[])
ORDER BY r.range_no
LIMIT 1
FOR UPDATE SKIP LOCKED
"""
#: Ranges a claim tries in turn, one row lock at a time (so that a claim at
#: the same moment finds the others): the first may be locked by a session
#: that cannot be ended (another role) or has just given it back and not yet
#: unlocked it; the claim must not stall on it while others are free.
CLAIM_CANDIDATES = 8
SQL_TRY_LOCK = "SELECT pg_try_advisory_lock(%s::int, %s::int)"
SQL_UNLOCK = "SELECT pg_advisory_unlock(%s::int, %s::int)"
# Only relinker's own sessions (db.connect names them): another program
# using two-int advisory locks in this database may hold the same keys, and
# must never be terminated for a stale range of ours.
SQL_LOCK_HOLDERS = """
SELECT l.pid FROM pg_locks l
JOIN pg_stat_activity a ON a.pid = l.pid AND a.application_name = %s
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.classid = %s::bigint::oid AND l.objid = %s::oid AND l.pid <> pg_backend_pid()
"""
SQL_TERMINATE = "SELECT pg_terminate_backend(%s)"
# Rows the claim's SKIP LOCKED passes over for good: a worker stopped (SIGSTOP,
# a paused VM) inside a claim, a heartbeat or a range's commit keeps its rows
# of relinker_range locked, and nothing else would ever end its session. Such a
# session sits idle in its transaction, holding row locks on the table; a
# healthy worker never does for long (those transactions send their statements
# back to back; the one that waits, a range's commit for its syncs, locks the
# range's row only in its last statement). Only relinker's sessions are ended.
SQL_STALLED_ROW_HOLDERS = """
SELECT DISTINCT a.pid, extract(epoch FROM now() - a.state_change)::float8
FROM pg_stat_activity AS a
JOIN pg_locks AS l ON l.pid = a.pid AND l.locktype = 'relation' AND l.granted
                   AND l.relation = 'relinker_range'::regclass AND l.mode IN ('RowShareLock', 'RowExclusiveLock')
WHERE a.application_name = %(application)s AND a.pid <> pg_backend_pid() AND a.datname = current_database()
  AND a.state IN ('idle in transaction', 'idle in transaction (aborted)')
  AND a.state_change < now() - make_interval(secs => %(lease)s)
"""
_COUNTER_ASSIGNMENTS = ", ".join(f"{f.name} = %({f.name})s" for f in dataclasses.fields(Counters))
_COUNTERS_ZEROED = ", ".join(f"{f.name} = 0" for f in dataclasses.fields(Counters))
SQL_TAKE_RANGE = """
UPDATE relinker_range
SET status = 'running', worker = %(worker)s, attempts = attempts + 1, lease_seconds = %(lease)s,
    claimed_at = now(), heartbeat_at = now(), finished_at = NULL, """ + _COUNTERS_ZEROED + """
WHERE run_id = %(run_id)s AND range_no = %(range_no)s
RETURNING attempts
"""
SQL_CLEAR_PROBLEMS = "DELETE FROM relinker_problem WHERE run_id = %s AND range_no = %s"
SQL_SYNCHRONOUS_COMMIT = "SET LOCAL synchronous_commit = on"
SQL_ASYNCHRONOUS_COMMIT = "SET synchronous_commit = off"
_OWNED_WHERE = """
WHERE run_id = %(run_id)s AND range_no = %(range_no)s AND status = 'running'
  AND worker = %(worker)s AND attempts = %(attempt)s
"""
SQL_OWNED = "SELECT 1 FROM relinker_range" + _OWNED_WHERE
# A range redone by its owner after a transient error starts from nothing, as a claimed one does.
SQL_REDO_RANGE = "UPDATE relinker_range SET " + _COUNTERS_ZEROED + _OWNED_WHERE
# A heartbeat from outside the range's own session, counters unchanged (see CheckpointStore.keep_alive).
SQL_KEEP_ALIVE = "UPDATE relinker_range SET heartbeat_at = now()" + _OWNED_WHERE
SQL_HEARTBEAT = """
UPDATE relinker_range
SET heartbeat_at = now(), """ + _COUNTER_ASSIGNMENTS + """
""" + _OWNED_WHERE
# The clock, not now(): the range's commit transaction may have waited (a
# row lock, copy's syncs), and that wait was the range's work too.
SQL_RANGE_DONE = """
UPDATE relinker_range
SET status = 'done', finished_at = clock_timestamp(), heartbeat_at = clock_timestamp(), last_error = NULL,
    """ + _COUNTER_ASSIGNMENTS + """
""" + _OWNED_WHERE
# The problems a range's last heartbeat recorded: a retry of a heartbeat whose
# commit went through but whose reply was lost finds its own count there.
SQL_PROBLEMS_RECORDED = "SELECT problems FROM relinker_range" + _OWNED_WHERE + "FOR UPDATE"
# A finish retried after its commit's reply was lost: done already, by this very attempt.
SQL_DONE_BY_THIS_ATTEMPT = """
SELECT 1 FROM relinker_range
WHERE run_id = %(run_id)s AND range_no = %(range_no)s AND status = 'done'
  AND worker = %(worker)s AND attempts = %(attempt)s
"""
# finished_at of a given-back range is when its worker stopped: the span it
# worked counts in relinker_run_progress.working (its partial counters count
# in the links).
SQL_RANGE_GIVE_BACK = """
UPDATE relinker_range SET status = 'pending', worker = NULL, heartbeat_at = NULL, finished_at = now()
""" + _OWNED_WHERE
SQL_RANGE_FAILED = """
UPDATE relinker_range SET status = 'failed', finished_at = now(), last_error = %(error)s
""" + _OWNED_WHERE
SQL_COPY_PROBLEMS = "COPY relinker_problem (run_id, range_no, blobid, path, kind, detail) FROM STDIN"
# A run a scan superseded has nothing left for anyone (no claim takes its ranges).
SQL_OPEN_RANGES = f"""
SELECT count(*) FROM relinker_range
WHERE run_id = %(run_id)s AND status <> 'done'
  AND (status IN ('pending', 'running') OR (status = 'failed' AND finished_at < %(since)s))
  AND {RUN_OPEN}
"""


# Runs of modes that must not overlap (relink, copy and count all write n_hardlinks; verify checks
# links the first two make; scan replaces a medium's rows) are kept apart by advisory locks their
# workers' sessions (and scan's) hold shared, one per mode, taken and checked under a gate lock.
# The one-bigint form (objsubid 1) is never a range's two-int4 key.
_MODE_LOCK_CLASS = 0x524C4E4B  # "RLNK"
MODE_NUMBERS = {"relink": 1, "copy": 2, "count": 3, "verify": 4, "scan": 5}
_MODES_GATE, _PLANNING_GATE = 0, 100
# The modes gate is taken, checked and left in one statement the server runs from start to end: a
# worker stopped (Ctrl-Z, SIGSTOP, a paused VM) between two statements of its own would otherwise
# hold it, and every worker of every run would wait for as long as the stop lasted. Its wait is cut
# into short ones, so that a worker told to stop meanwhile does. 'RLK01' carries the clash found.
SQL_HOLD_MODE_GATED = """
DO $relinker$
DECLARE clash text; caller_lock_timeout text := current_setting('lock_timeout');
BEGIN
    PERFORM set_config('lock_timeout', {wait}, true);
    PERFORM pg_advisory_xact_lock({gate});
    SELECT string_agg(l.objid::bigint || ':' || l.pid, ',' ORDER BY l.pid) INTO clash
    FROM pg_locks AS l
    WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 AND l.classid::bigint = {lock_class}
      AND l.objid::bigint = ANY({excluded}) AND l.pid <> pg_backend_pid()
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database());
    IF clash IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'RLK01', MESSAGE = clash;
    END IF;
    PERFORM pg_advisory_lock_shared({mode});
    -- inside a caller's transaction, what follows waits as the caller's session would have
    PERFORM set_config('lock_timeout', caller_lock_timeout, true);
END
$relinker$
"""
SQLSTATE_MODE_CLASH = "RLK01"
#: Milliseconds of one wait for the modes gate, between two looks at whether to stop.
GATE_WAIT_MS = 1000
# The planning gate lasts a coordinator's whole planning, statements and its own work between them:
# it is polled for (a coordinator told to stop meanwhile does), and who holds it is named.
SQL_TRY_GATE = "SELECT pg_try_advisory_xact_lock(%s)"
SQL_GATE_HOLDERS = """
SELECT l.pid FROM pg_locks AS l
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.classid::bigint = %(lock_class)s AND l.objid::bigint = %(gate)s AND l.pid <> pg_backend_pid()
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""
#: Seconds between two tries for the planning gate, at most.
GATE_POLL = 0.25
#: Seconds of waiting for the planning gate before the wait is told.
GATE_PATIENCE = 5.0
SQL_MODES_AT_WORK = """
SELECT l.objid::bigint, l.pid FROM pg_locks AS l
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 AND l.classid::bigint = %s
  AND l.pid <> pg_backend_pid()
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
ORDER BY l.pid
"""
SQL_RELEASE_MODE = "SELECT pg_advisory_unlock_shared(%s)"


def _mode_key(number: int) -> int:
    return (_MODE_LOCK_CLASS << 32) | number


def gate_planning(conn: psycopg.Connection, patience: float = GATE_PATIENCE) -> None:
    """Inside a transaction: wait for other coordinators choosing or planning a run (the lock lasts
    until the transaction ends). A wait longer than ``patience`` seconds is told, with who holds the gate."""
    key, started, told, pause = _mode_key(_PLANNING_GATE), time.monotonic(), False, 0.01
    while not conn.execute(SQL_TRY_GATE, (key,)).fetchone()[0]:
        if not told and time.monotonic() - started >= patience:
            holders = [pid for (pid,) in conn.execute(SQL_GATE_HOLDERS, dict(
                lock_class=_MODE_LOCK_CLASS, gate=_PLANNING_GATE))]
            log.warning("waiting for another coordinator choosing or planning a run (database session %s; "
                        "one stopped meanwhile holds it up until its session ends)",
                        ", ".join(map(str, holders)) or "gone")
            told = True
        time.sleep(pause)
        pause = min(2 * pause, GATE_POLL)


def modes_at_work(conn: psycopg.Connection) -> dict[str, list[int]]:
    """The modes whose runs other sessions of this database are working now, with those sessions' pids."""
    return _by_mode(conn.execute(SQL_MODES_AT_WORK, (_MODE_LOCK_CLASS,)))


def _by_mode(held: Iterable[tuple[int, int]]) -> dict[str, list[int]]:
    """(mode number, pid) pairs of the modes' locks as {mode: [pids]}; numbers of no mode left out."""
    names = {number: name for name, number in MODE_NUMBERS.items()}
    found: dict[str, list[int]] = {}
    for number, pid in held:
        if number in names:
            found.setdefault(names[number], []).append(pid)
    return found


def end_session(conn: psycopg.Connection, pid: int) -> None:
    """Terminate the database session ``pid`` (a warning if this role may not)."""
    try:
        with conn.transaction():
            conn.execute(SQL_TERMINATE, (pid,))
    except psycopg.Error as exc:
        log.warning("cannot terminate session %d: %s", pid, db.first_line(exc))


class ModeClash(Exception):
    """A run of a mode that must not overlap this one is at work."""

    def __init__(self, at_work: dict[str, list[int]]):
        modes = sorted(at_work)
        pids = sorted(pid for mode in modes for pid in at_work[mode])
        super().__init__(f"a {' and a '.join(modes)} run {'is' if len(modes) == 1 else 'are'} at work on this "
                         f"catalogue (database session{'s' if len(pids) > 1 else ''} "
                         f"{', '.join(map(str, pids))})")
        self.modes = modes


def clashing_modes(conn: psycopg.Connection, excludes: frozenset[str]) -> ModeClash | None:
    """The clash with runs at work that a run must not overlap, if any (a check only: see hold_mode)."""
    at_work = {mode: pids for mode, pids in modes_at_work(conn).items() if mode in excludes}
    return ModeClash(at_work) if at_work else None


def hold_mode(conn: psycopg.Connection, mode: str, excludes: frozenset[str],
              while_waiting: Callable[[], None] | None = None) -> None:
    """Mark this session as working a run of ``mode`` until it ends or calls release_mode
    (ModeClash if a mode of ``excludes`` is at work). ``while_waiting`` is called about every second
    while another session holds the gate (whatever it raises ends the wait)."""
    statement = sql.SQL(SQL_HOLD_MODE_GATED).format(
        wait=sql.Literal(str(GATE_WAIT_MS)), gate=sql.Literal(_mode_key(_MODES_GATE)),
        lock_class=sql.Literal(_MODE_LOCK_CLASS), mode=sql.Literal(_mode_key(MODE_NUMBERS[mode])),
        excluded=sql.SQL("ARRAY[{}]::bigint[]").format(
            sql.SQL(", ").join(sql.Literal(MODE_NUMBERS[name]) for name in sorted(excludes))))
    while True:
        try:
            if db.in_callers_transaction(conn):
                with conn.transaction():  # a savepoint: the caller's transaction survives a clash
                    conn.execute(statement)
            else:
                conn.execute(statement)
            return
        except psycopg.errors.LockNotAvailable:
            if while_waiting is not None:
                while_waiting()
        except psycopg.Error as exc:
            if exc.sqlstate != SQLSTATE_MODE_CLASH:
                raise
            pairs = (map(int, pair.split(":")) for pair in exc.diag.message_primary.split(","))
            raise ModeClash(_by_mode(pairs)) from None


def release_mode(conn: psycopg.Connection, mode: str) -> None:
    """End what hold_mode began, in a session that lives on."""
    conn.execute(SQL_RELEASE_MODE, (_mode_key(MODE_NUMBERS[mode]),))


class CheckpointStore:
    """One worker's view of a run's ranges, over its own control connection.

    Every method retries transient database errors (reconnecting, and
    re-taking the advisory lock of the range it holds). ``since`` is when this
    coordinator started: ranges that failed before it are retried once by it.
    """

    def __init__(self, dsn: str, run_id: int, *, worker: str, lease: float, retry_timeout: float, since,
                 mode: str | None = None, excludes: frozenset[str] = frozenset()):
        """``mode``: the session holds that mode's lock (see :func:`hold_mode`) while it lasts."""
        self.mode = mode
        self.excludes = excludes
        #: called before each retry of a call; what it raises ends the call (a worker's stop)
        self.before_retry: Callable[[], None] | None = None
        self.dsn = dsn
        self.run_id = run_id
        self.worker = worker
        self.lease = lease
        self.retry_timeout = retry_timeout
        self.since = since
        self._conn: psycopg.Connection | None = None
        self._held: Range | None = None
        #: opened only when the control connection waits inside a finishing transaction (keep_alive)
        self._side: psycopg.Connection | None = None

    def connect(self) -> None:
        """Open the control session now, once: an error is the caller's to retry."""
        self._connection()

    def close(self) -> None:
        self._close_side()
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _close_side(self) -> None:
        # Opened for one long wait: not a third connection per worker for the rest of the run.
        if self._side is not None:
            self._side.close()
            self._side = None

    def keep_alive(self, r: Range) -> None:
        """Refresh ``r``'s heartbeat while the control connection waits in the range's finishing transaction.

        A wait there (for a sync) may outlast the lease, and a claimer would
        end the session in the middle of the commit. Best effort over a
        connection of its own: the finish itself says whether the range is still ours.
        """
        try:
            if not db.alive(self._side):
                self._side = db.connect(self.dsn, autocommit=True)
            self._side.execute(SQL_KEEP_ALIVE, self._owned_params(r))
        except psycopg.Error as exc:
            log.debug("range %d: keep-alive failed: %s", r.range_no, db.first_line(exc))

    # connection management -------------------------------------------------

    def _connection(self) -> psycopg.Connection:
        if not db.alive(self._conn):
            self.close()
            self._conn = db.connect(self.dsn, autocommit=True)
            try:
                # Every write here is safe to redo: a commit lost in a server
                # crash only means a range is done again. Not waiting for the WAL
                # flush takes a disk sync off every claim, heartbeat and commit.
                self._conn.execute(SQL_ASYNCHRONOUS_COMMIT)
                if self.mode is not None:
                    hold_mode(self._conn, self.mode, self.excludes, self.before_retry)
                if self._held is not None:
                    self._relock(self._held)
            except BaseException:
                # A session without its mode's lock, or its range's, must not be used: the next call
                # starts afresh (a LostRange has set _held aside first).
                self.close()
                raise
        return self._conn

    def _relock(self, held: Range) -> None:
        # A new session holds no advisory locks: take ours back, or learn we lost the range.
        conn = self._conn
        if not conn.execute(SQL_TRY_LOCK, (held.run_id, held.range_no)).fetchone()[0]:
            self._held = None
            raise LostRange(f"range {held.range_no} is locked by another worker")
        owned = self._owned_params(held)
        # Done by this attempt: a finish whose reply was lost (its retry finds it so).
        if (conn.execute(SQL_OWNED, owned).fetchone() is None
                and conn.execute(SQL_DONE_BY_THIS_ATTEMPT, owned).fetchone() is None):
            conn.execute(SQL_UNLOCK, (held.run_id, held.range_no))
            self._held = None
            raise LostRange(f"range {held.range_no} was taken over")

    def _call(self, operation: Callable[[psycopg.Connection], object], *, ends_outage: bool = True,
              stoppable: bool = False):
        """``operation`` on this store's session, transient errors retried (``ends_outage``: its success
        says the database is there for every call of this process; ``stoppable``: a wait for work, which
        ``before_retry`` may end; giving a range back or failing it never is, but a process told to stop
        waits no longer than its patience, see db.give_up_retrying_once)."""
        for attempt in db.retrying(self.retry_timeout):
            with attempt:
                if stoppable and attempt.retry_state.attempt_number > 1 and self.before_retry is not None:
                    self.before_retry()  # a worker told to stop does so, whatever the database does
                try:
                    result = operation(self._connection())
                    if ends_outage:
                        db.outage_ended()
                    return result
                except Exception:
                    # Only a lost session is replaced: closing one that is fine (a
                    # serialization failure, a deadlock) would drop the advisory lock
                    # of the range it holds, free for any claim before the retry.
                    if self._conn is not None and not db.alive(self._conn):
                        self.close()
                    raise
        raise AssertionError("unreachable")

    def _owned_params(self, r: Range, **extra) -> dict:
        return dict(run_id=r.run_id, range_no=r.range_no, worker=self.worker, attempt=r.attempt, **extra)

    # the claim protocol ------------------------------------------------------

    def claim(self) -> Range | None:
        """Claim the next open range of the run, or None if none is free now."""
        claimed = self._call(self._claim_once, stoppable=True)
        self._held = claimed
        return claimed

    def _claim_once(self, conn: psycopg.Connection) -> Range | None:
        locked = None
        try:
            with conn.transaction():
                passed_over: list[int] = []
                while len(passed_over) < CLAIM_CANDIDATES:
                    row = conn.execute(SQL_CLAIM_CANDIDATE, dict(
                        run_id=self.run_id, lease=self.lease, since=self.since, passed_over=passed_over)).fetchone()
                    if row is None:
                        self._end_stalled_row_holders(conn)
                        return None
                    range_no, *bounds, status, stale, lease = row
                    if conn.execute(SQL_TRY_LOCK, (self.run_id, range_no)).fetchone()[0]:
                        locked = range_no
                        break
                    # Held by a session that stopped heartbeating: end it; the
                    # range is free for a later claim once it is gone.
                    if stale:
                        self._terminate_holders(conn, range_no, lease)
                    passed_over.append(range_no)
                else:
                    return None
                if status == "running":
                    log.warning("taking over range %d of run %d (%s)", range_no, self.run_id,
                                f"its heartbeat is older than its {lease:g} s lease" if stale else "its worker is gone")
                attempt = conn.execute(SQL_TAKE_RANGE, dict(
                    worker=self.worker, run_id=self.run_id, range_no=range_no, lease=self.lease)).fetchone()[0]
                conn.execute(SQL_CLEAR_PROBLEMS, (self.run_id, range_no))
        except BaseException:
            # Session advisory locks survive a rollback: release ours.
            if locked is not None and not conn.broken:
                conn.execute(SQL_UNLOCK, (self.run_id, locked))
            raise
        lo, hi, medium_hash, ino_lo, ino_hi, blobids, bytes_planned = bounds
        return Range(lo, hi, medium_hash, ino_lo, ino_hi, None if blobids is None else tuple(blobids), bytes_planned,
                     run_id=self.run_id, range_no=range_no, attempt=attempt)

    def _terminate_holders(self, conn: psycopg.Connection, range_no: int, lease: float) -> None:
        for (pid,) in conn.execute(SQL_LOCK_HOLDERS, (db.APPLICATION_NAME, self.run_id, range_no)).fetchall():
            log.warning("range %d: heartbeat older than its %g s lease, terminating stalled session %d",
                        range_no, lease, pid)
            end_session(conn, pid)

    def _end_stalled_row_holders(self, conn: psycopg.Connection) -> None:
        """End the relinker sessions stopped inside a transaction holding rows of relinker_range (the
        claim skips those rows): idle in it for longer than this worker's lease."""
        for pid, idle in conn.execute(SQL_STALLED_ROW_HOLDERS, dict(
                lease=self.lease, application=db.APPLICATION_NAME)).fetchall():
            log.warning("terminating stalled session %d: idle for %.0f s in a transaction holding ranges "
                        "(longer than the %g s lease)", pid, idle, self.lease)
            end_session(conn, pid)

    def reassert(self, r: Range) -> None:
        """After a transient error, before ``r`` is redone: make sure we still own it (raises LostRange).

        Asks the server (a connection that died with it may not know yet; a
        new one takes the range's lock back), and deletes the problems and
        counters the failed attempt's heartbeats recorded: the redo finds
        them again (a heartbeat that found its count recorded would write none).
        """
        def still_ours(conn) -> bool:
            with conn.transaction():
                if conn.execute(SQL_REDO_RANGE, self._owned_params(r)).rowcount != 1:
                    return False
                conn.execute(SQL_CLEAR_PROBLEMS, (r.run_id, r.range_no))
                return True
        # Not the end of an outage: the range's own connection may still be refused (a connection
        # limit this session is within), and its redo must not wait --retry-timeout afresh each time.
        if (self._held is None or self._held.range_no != r.range_no
                or not self._call(still_ours, ends_outage=False)):
            self._release(r)
            raise LostRange(f"range {r.range_no} was taken over")

    def heartbeat(self, r: Range, counters: Counters, problems: list[Problem]) -> None:
        """Record liveness and partial counters; flush buffered problems."""
        def beat(conn):
            with conn.transaction():
                if problems:
                    # Durable before the buffer is cleared: a crash losing this commit would
                    # lose the rows for good (the redo-free reconnect carries on after them).
                    conn.execute(SQL_SYNCHRONOUS_COMMIT)
                recorded = conn.execute(SQL_PROBLEMS_RECORDED, self._owned_params(r)).fetchone()
                if recorded is None:
                    raise LostRange(f"range {r.range_no} was taken over")
                if recorded[0] != counters.problems:  # else written by this very heartbeat, its reply lost
                    self._write_problems(conn, r, problems)
                if conn.execute(SQL_HEARTBEAT, self._owned_params(r, **counters.as_dict())).rowcount != 1:
                    raise LostRange(f"range {r.range_no} was taken over")
        self._call(beat, stoppable=True)
        problems.clear()

    def finish(self, r: Range, counters: Counters, problems: list[Problem],
               finalize: Callable[[psycopg.Connection], None]) -> None:
        """Commit a range: its problems, the mode's catalogue updates and status done, atomically."""
        def commit(conn):
            with conn.transaction():
                if conn.execute(SQL_DONE_BY_THIS_ATTEMPT, self._owned_params(r)).fetchone():
                    return  # a retry: the commit went through, its reply was lost
                self._write_problems(conn, r, problems)
                finalize(conn)
                if conn.execute(SQL_RANGE_DONE, self._owned_params(r, **counters.as_dict())).rowcount != 1:
                    raise LostRange(f"range {r.range_no} was taken over")
                # The run is over with its last range, whatever its coordinator is waiting for (a stopped
                # worker whose range was taken over). Two last ranges committed at once leave it open:
                # the coordinator closes it as its pool ends.
                finish_run_if_complete(conn, r.run_id)
        self._call(commit)
        problems.clear()
        self._release(r)

    def abandon(self, r: Range) -> None:
        """Give ``r`` back over a session that takes no mode lock: this worker stops (a ModeClash)."""
        self.mode = None
        self.close()
        self.give_back(r)

    def give_back(self, r: Range) -> None:
        """Return a range to pending (interrupted): the next claim redoes it.

        A range taken over meanwhile is its new owner's: nothing to give back.
        """
        try:
            self._call(lambda conn: conn.execute(SQL_RANGE_GIVE_BACK, self._owned_params(r)))
        except LostRange:
            pass
        finally:
            self._release(r)

    def fail(self, r: Range, error: str) -> None:
        """Mark a range failed with ``last_error``; the run goes on without it (unless taken over meanwhile)."""
        try:
            self._call(lambda conn: conn.execute(SQL_RANGE_FAILED, self._owned_params(r, error=error)))
        except LostRange:
            pass
        finally:
            self._release(r)

    def open_ranges(self) -> int:
        """Ranges of the run still to be done by someone (pending, running, retryable)."""
        return self._call(lambda conn: conn.execute(
            SQL_OPEN_RANGES, dict(run_id=self.run_id, since=self.since)).fetchone()[0], stoppable=True)

    def _release(self, r: Range) -> None:
        self._held = None
        self._close_side()
        if not db.alive(self._conn):
            return  # the range's advisory lock ended with its session: no other session can release it
        try:
            self._call(lambda conn: conn.execute(SQL_UNLOCK, (r.run_id, r.range_no)))
        except LostRange:
            pass

    def _write_problems(self, conn: psycopg.Connection, r: Range, problems: list[Problem]) -> None:
        if not problems:
            return
        with conn.cursor().copy(SQL_COPY_PROBLEMS) as copy:
            for p in problems:
                copy.write_row((r.run_id, r.range_no, p.blobid, p.path, p.kind, p.detail))
