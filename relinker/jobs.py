"""The coordinator: preflight, pick or plan a run, run the pool, summarise.

Shared by every checkpointed mode (relink, copy, count, verify). A mode provides its
name, its ``RangeWork`` class and a planner that splits its work into ranges.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shlex
import stat
import time
from typing import Callable

import psycopg

from relinker import checkpoint, db, dbtext, fastroute, migrations, store
from relinker.checkpoint import Bounds, Counters, Range, RunInfo
from relinker.config import Settings
from relinker.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_PROBLEMS, RunStopped, StopSignal, UserError
from relinker.paths import display
from relinker.pool import STOP_PATIENCE, WorkSpec, run_pool
from relinker.preflight import check_privileges, check_roots
from relinker.report import ProgressBar, Summary

log = logging.getLogger(__name__)

# A run's ranges, and what its done ranges did before this invocation.
SQL_RANGES_SO_FAR = """
SELECT count(*),
       count(*) FILTER (WHERE status = 'done'),
       coalesce(sum(links_created + links_present + links_replaced) FILTER (WHERE status = 'done'), 0)::bigint,
       coalesce(sum(problems) FILTER (WHERE status = 'done'), 0)::bigint,
       coalesce(sum(bytes_read) FILTER (WHERE status = 'done'), 0)::bigint,
       sum(bytes_planned)::bigint,
       coalesce(sum(links_missing) FILTER (WHERE status = 'done'), 0)::bigint
FROM relinker_range WHERE run_id = %s
"""
SQL_NOW = "SELECT now()"
# A look at a run's progress while it works must not hold up the coordinator when the server is slow.
SQL_QUICK_STATEMENTS = "SET statement_timeout = 2000"


@dataclasses.dataclass
class Mode:
    """What a checkpointed mode plugs into the coordinator."""

    name: str
    work: Callable[[WorkSpec], object]
    #: plan(conn, options, blobids, workers, n_ranges) -> [Bounds]; may add to
    #: ``options`` what a resumed run must know (``blobids``: the IDs listed
    #: with --from-file, or None).
    plan: Callable[[psycopg.Connection, dict, list[str] | None, int, int | None], list[Bounds]]
    #: What a run of this mode writes to (outside dry runs): "archive", "by-hash".
    writes: frozenset = frozenset({"archive"})
    #: Whether a run with these options is content work, measured in bytes (copy, verify --hash).
    in_bytes: Callable[[dict], bool] = lambda options: False
    #: Whether a path not linked is counted as missing alone, no problem of its own (count): its
    #: progress and rate count those too.
    missing_apart: bool = False
    #: The catalogue's tables a run writes, how (as has_table_privilege names it) and which columns
    #: (a role granted those columns alone may run it; a column the catalogue lacks is not asked for).
    catalogue_writes: tuple[tuple[str, str, tuple[str, ...]], ...] = (
        ("blobs", "UPDATE", ("n_hardlinks", "expected_hardlinks")),)
    #: The catalogue's tables and views a run reads.
    catalogue_reads: tuple[str, ...] = ("blobs", "inode", "relinker_path")
    #: Fills in, in place, the options a request did not give (run_job notes first which it gave).
    complete_options: Callable[[dict], None] = lambda options: None
    #: canonical_options(conn, options): in place, each option as runs keep and compare it (the same
    #: work asked two ways is one: a medium by its name or by its hash).
    canonical_options: Callable[[psycopg.Connection, dict], None] = lambda conn, options: None
    #: Whether a scan of a medium a run covers supersedes the run (its ranges name the medium's inodes).
    superseded_by_scan: bool = False
    #: The modes whose runs may not be at work while one of this mode is: a run is refused at its
    #: start, and a worker stops, while one is (see checkpoint.hold_mode).
    excludes: frozenset = frozenset()


@dataclasses.dataclass
class JobRequest:
    """One invocation of a checkpointed command, as the CLI parsed it."""

    settings: Settings
    options: dict
    #: this invocation's settings for the workers, never stored with the run (see WorkSpec.local)
    local: dict = dataclasses.field(default_factory=dict)
    #: the command-line arguments a resume must repeat: those of ``local``, and what the CLI does after
    #: the run (verify's --failed-ids)
    resume_arguments: list[str] = dataclasses.field(default_factory=list)
    #: blob IDs listed with --from-file: what a new run is planned from, never handed to the workers
    blobids: list[str] | None = None
    workers: int = os.cpu_count() or 1
    run_id: int | None = None
    new: bool = False
    dry_run: bool = False
    ranges: int | None = None
    progress: bool = False
    lease: float = checkpoint.DEFAULT_LEASE
    retry_timeout: float = db.DEFAULT_RETRY_TIMEOUT
    #: the options of ``options`` given on the command line (or in a config file), before the mode's
    #: defaults filled in the others (run_job notes them)
    given: dict = dataclasses.field(default_factory=dict)


def run_job(mode: Mode, request: JobRequest) -> tuple[Summary, int]:
    """Run (or resume) a checkpointed job; return its summary and exit code.

    ``request.blobids`` is consumed: planning is its only use. ``request.options`` holds
    what was given; the mode's defaults complete it.
    """
    settings = request.settings
    request.given = given_options(request.options)
    mode.complete_options(request.options)
    by_hash_root, archive_root = check_roots(settings, frozenset() if request.dry_run else mode.writes)
    started = time.monotonic()
    with db.connect_for_user(settings.db_url, autocommit=True) as conn:
        migrations.require_migrated(conn)
        check_privileges(conn, mode, writes=not request.dry_run, reads_checkpoints=request.run_id is not None)
        mode.canonical_options(conn, request.options)
        mode.canonical_options(conn, request.given)
        spec = WorkSpec(
            work=mode.work, dsn=settings.db_url, by_hash_root=by_hash_root, archive_root=archive_root,
            options=dict(request.options), local=request.local, lease=request.lease, retry_timeout=request.retry_timeout,
            verbose=settings.verbose, symlinked_shards=store.symlinked_shards(by_hash_root),
            mode=mode.name, excludes=mode.excludes, missing_apart=mode.missing_apart,
        )
        if spec.symlinked_shards:
            log.warning("%d directories of the store are symlinks (%s): relinker does not follow them, "
                        "and records each content below them as a problem", len(spec.symlinked_shards),
                        ", ".join(display(name) for name in sorted(spec.symlinked_shards)[:3]))
        if request.dry_run:
            if request.run_id is not None:
                # What resuming that run would do: its own options, its ranges not done.
                run = _named_run(conn, mode, request, by_hash_root, archive_root)
                spec.options = run.options
                spec.dry_ranges = checkpoint.unfinished_ranges(conn, run.run_id)
            else:
                bounds = mode.plan(conn, spec.options, request.blobids, request.workers, request.ranges)
                spec.dry_ranges = [Range.of(None, n, b) for n, b in enumerate(bounds)]
            ranges_total, done_before, paths_before, bytes_before = len(spec.dry_ranges), 0, 0, 0
            bytes_total = sum(r.bytes_planned or 0 for r in spec.dry_ranges)
        else:
            clash = checkpoint.clashing_modes(conn, mode.excludes)
            if clash is not None:
                raise UserError(f"{clash}: a {mode.name} run must not overlap it (run one after the other; "
                                "a session stuck in a stopped process holds it until it ends)")
            with conn.transaction():
                if request.run_id is None:
                    checkpoint.gate_planning(conn)  # two coordinators starting at once: one plans, one resumes
                run = _select_run(conn, mode, request, spec, by_hash_root, archive_root)
            spec.run_id = run.run_id
            spec.options = run.options
            spec.since = conn.execute(SQL_NOW).fetchone()[0]
            ranges_total, done_before, paths_before, bytes_before, bytes_total = \
                _ranges_so_far(conn, run.run_id, mode.missing_apart)
            if run.status == "done":
                summary = Summary.from_run(conn, run.run_id)
                return summary, _exit_code(summary)
    if fastroute.NOT_BUILT and not request.dry_run:
        _say_not_built()
    # Planned. The workers are forked from this process: a list of millions
    # of IDs would count in every worker's memory.
    request.blobids = None
    bar = ProgressBar(ranges_total, done_before, paths_before, enabled=request.progress,
                      bytes_done_before=bytes_before, in_bytes=mode.in_bytes(spec.options), bytes_total=bytes_total,
                      run_so_far=None if request.dry_run else functools.partial(
                          _run_so_far, settings.db_url, spec.run_id, mode.missing_apart),
                      # other hosts join the run by its ID
                      description=f"{mode.name} (dry run)" if request.dry_run else f"{mode.name} run {spec.run_id}")
    try:
        # No more workers than ranges left: each would fork only to find nothing to do.
        outcome = run_pool(spec, max(1, min(request.workers, ranges_total - done_before)), bar)
        elapsed = time.monotonic() - started
        # The bar's last look at the run (another host's last ranges) is inside this try too.
        bar.close(look=not outcome.interrupted)
        summary = _close_run(mode, request, spec, outcome, ranges_total, bytes_total)
    except (StopSignal, KeyboardInterrupt):
        # From the pool's end (its own handlers gone) to the closing figures: still resumable, unless
        # the catalogue has the run complete (its last range done as the signal came).
        if request.dry_run:
            raise
        summary = _complete_after_all(settings.db_url, spec.run_id)
        if summary is None:
            raise RunStopped(f"interrupted as run {spec.run_id} ended; resume it with "
                             f"`{resume_command(mode.name, spec.run_id, request)}`",
                             run_id=spec.run_id, mode=mode.name, exit_code=EXIT_INTERRUPTED) from None
        elapsed = time.monotonic() - started
    finally:
        bar.close(look=False)
    summary.elapsed_seconds = elapsed
    summary.working_seconds = None  # this session's rate: its links over its own time
    return summary, _exit_code(summary)


def _closing_figures(db_url: str, run_id: int) -> Summary:
    """A run's figures as its pool has ended: marked done first if every range is."""
    with db.connect(db_url, autocommit=True) as conn:
        with conn.transaction():
            checkpoint.finish_run_if_complete(conn, run_id)
        return Summary.from_run(conn, run_id, open_ranges=True)


def _complete_after_all(db_url: str, run_id: int) -> Summary | None:
    """The summary of a run a signal stopped as it ended, if the catalogue has it complete; else None.

    One try, no retry: the user asked to stop (a second signal ends this too).
    """
    try:
        summary = _closing_figures(db_url, run_id)
    except psycopg.Error:
        return None
    return summary if summary.complete else None


def _close_run(mode: Mode, request: JobRequest, spec: WorkSpec, outcome, ranges_total: int,
               bytes_total: int | None) -> Summary:
    """The summary of a run whose pool has ended: the run's figures from the catalogue (a dry run's
    from what its workers reported), and why it stopped short if it did."""
    settings = request.settings
    if request.dry_run:
        summary = Summary(
            mode=mode.name, dry_run=True, interrupted=outcome.interrupted, counters=outcome.counters,
            problems_by_kind=dict(outcome.problem_kinds.most_common()), problem_samples=outcome.samples,
            ranges_total=ranges_total, ranges_failed=outcome.failed_ranges,
            # A range whose worker died is not done: a dry run never hands it out again.
            ranges_done=0 if outcome.interrupted else outcome.ranges_done,
            options=spec.options,
        )
        summary.links_this_session = outcome.counters.links
        summary.paths_this_session = outcome.counters.looked_at(mode.missing_apart)
        summary.bytes_this_session = outcome.counters.bytes_read
        summary.bytes_planned = bytes_total or None
    else:
        closing_figures = functools.partial(_closing_figures, settings.db_url, spec.run_id)
        # The database may go away as the last range ends: retried like any worker's call, but a
        # run told to stop does not wait out an outage.
        patience = min(STOP_PATIENCE, request.retry_timeout) if outcome.interrupted else request.retry_timeout
        try:
            summary = closing_figures() if outcome.database_gone else db.retrying(patience)(closing_figures)
        except psycopg.Error as exc:
            resume = resume_command(mode.name, spec.run_id, request)
            if outcome.interrupted and db.is_transient(exc):
                raise RunStopped(f"interrupted, and the catalogue database could not be reached for the figures "
                                 f"of run {spec.run_id} ({db.first_line(exc)}); once it is back, resume it with "
                                 f"`{resume}`", run_id=spec.run_id, mode=mode.name,
                                 exit_code=EXIT_INTERRUPTED) from None
            if not (outcome.database_gone or db.is_transient(exc)):
                raise RunStopped(f"the figures of run {spec.run_id} could not be read as it ended "
                                 f"({db.first_line(exc)}): `relinker status {spec.run_id}` says whether it is "
                                 f"complete; if not, resume it with `{resume}`",
                                 run_id=spec.run_id, mode=mode.name) from None
            why = _database_gone(request) if outcome.database_gone else (
                f"the catalogue database could not be reached as the run ended ({db.first_line(exc)})")
            raise RunStopped(f"{why}: run {spec.run_id} stopped, not complete; once the database is back, "
                             f"resume it with `{resume}`", run_id=spec.run_id, mode=mode.name) from None
        if summary.status == checkpoint.SUPERSEDED:
            pass  # the summary says so; there is nothing to resume
        elif outcome.database_gone and not summary.complete:
            summary.stopped = _database_gone(request)
        elif outcome.start_failure and not summary.complete:
            summary.stopped = f"no worker process could be started ({outcome.start_failure})"
        elif outcome.clash and not summary.complete:
            others = sorted(mode.excludes)
            summary.stopped = (f"a {', '.join(others[:-1])} or {others[-1]} run began meanwhile, which a "
                               f"{mode.name} run must not overlap (the log names it): once it has ended")
            if mode.superseded_by_scan:
                summary.stopped += (f" (a scan of a medium the run covers supersedes it: then "
                                    f"`{replan_command(mode.name, spec.options, request)}` plans what is left)")
        summary.interrupted = outcome.interrupted and not summary.complete
        if not summary.complete and not summary.ranges_at_work:
            # This coordinator's workers have ended: a range it finished a moment ago is no one at work.
            summary.at_work, summary.eta_seconds = False, None
        # What this coordinator's workers finished: another host on the same run has a rate of its own.
        summary.links_this_session = outcome.counters.links
        summary.paths_this_session = outcome.counters.looked_at(mode.missing_apart)
        summary.bytes_this_session = outcome.counters.bytes_read
    return summary


@functools.cache
def _say_not_built() -> None:
    # pip hides the build's own warning unless asked (-v): an overnight run must not be slow unsaid.
    # Once a process (the demo runs three jobs).
    log.warning("relinker._speedups was not built (no C compiler at install time): the Python loop runs, "
                "with the same results, slower (README: The C fast route)")


def resume_command(mode_name: str, run_id: int | None, request: JobRequest) -> str:
    """The command that resumes ``run_id`` as this invocation would have gone on (shell-quoted)."""
    return " ".join(map(_shell_word, ["relinker", mode_name, "--run", str(run_id), *request.resume_arguments]))


def replan_command(mode_name: str, run_options: dict, request: JobRequest) -> str:
    """The command that plans anew the work a run was asked for (a superseded one), with what this
    invocation must say again (``--source-prefix``, the global options): shell-quoted."""
    words = ["relinker", mode_name]
    # A run planned before runs kept what they were asked keeps its medium by its hash, which --medium takes.
    for key, value in sorted(run_options.get(REQUESTED, run_options).items()):
        if _given_value(value) is not None and key in REPLANNED:
            words += [_flag(key)] + ([] if value is True else [str(value)])
    return " ".join(map(_shell_word, words + request.resume_arguments))


#: What a copy run is asked for, as replan_command repeats it.
REPLANNED = frozenset({"medium", "limit", "retry_permanent"})


def _shell_word(argument: str) -> str:
    """``argument`` as a shell reads it back: quoted; one with bytes that are not UTF-8, or characters
    that do not print (a newline, a terminal's escape sequences in a root's name), in bash's $'\\xHH'
    form, every byte beyond printable ASCII escaped."""
    raw = os.fsencode(argument)
    try:
        printable = raw.decode("utf-8").isprintable()
    except UnicodeDecodeError:
        printable = False
    if printable:
        return shlex.quote(argument)
    return "$'" + "".join(chr(b) if 0x20 <= b < 0x7f and b not in b"'\\" else f"\\x{b:02x}" for b in raw) + "'"


def _run_so_far(dsn: str, run_id: int, missing_apart: bool = False) -> tuple[int, int, int]:
    """(ranges, paths, bytes) of a run's finished ranges, on a session of its own, closed at once (the
    coordinator forks its workers: it holds no connection) and quick to give up on a database gone.
    ``missing_apart``: as Mode's."""
    with db.connect(dsn, autocommit=True, connect_timeout=2) as conn:
        conn.execute(SQL_QUICK_STATEMENTS)
        _, done, paths, bytes_read, _ = _ranges_so_far(conn, run_id, missing_apart)
    return done, paths, bytes_read


def _ranges_so_far(conn: psycopg.Connection, run_id: int,
                   missing_apart: bool) -> tuple[int, int, int, int, int | None]:
    """(ranges, ranges done, paths, bytes read, bytes planned) of a run: paths and bytes of its done ranges
    only (a range given back keeps partial counts). ``missing_apart``: as Mode's."""
    ranges, done, links, problems, bytes_read, bytes_planned, missing = \
        conn.execute(SQL_RANGES_SO_FAR, (run_id,)).fetchone()
    paths = Counters(links_present=links, problems=problems, links_missing=missing).looked_at(missing_apart)
    return ranges, done, paths, bytes_read, bytes_planned


def _database_gone(request: JobRequest) -> str:
    return f"the catalogue database stayed out of reach for more than --retry-timeout ({request.retry_timeout:g} s)"


def _exit_code(summary: Summary) -> int:
    if summary.interrupted:
        return EXIT_INTERRUPTED
    if summary.counters.problems or summary.ranges_failed or not summary.complete:
        return EXIT_PROBLEMS
    return EXIT_OK


def _named_run(conn, mode: Mode, request: JobRequest, by_hash_root: bytes, archive_root: bytes) -> RunInfo:
    """The run ``--run`` names, if it is one of this mode that the options given do not contradict."""
    run = checkpoint.get_run(conn, request.run_id)
    if run is None:
        raise UserError(f"unknown run {request.run_id} (see `relinker status`)")
    if run.mode != mode.name:
        raise UserError(f"run {run.run_id} is a {run.mode} run, not a {mode.name} run")
    if run.status == checkpoint.SUPERSEDED:
        raise UserError(f"run {run.run_id} was superseded: a scan of a medium it covers came after its plan "
                        f"(`{replan_command(mode.name, run.options, request)}` plans what is left)")
    conflicts = _conflicting_options(run, dbtext.storable(conn, request.given))
    if conflicts:
        # The run goes on as it was planned: an option asked for now
        # (--on-conflict keep) must never be ignored silently.
        raise UserError(f"run {run.run_id} was planned for other work ({conflicts}): resume it without "
                        f"those options, or plan a new run with --new")
    if (run.by_hash_root, run.archive_root) != (by_hash_root, archive_root):
        planned = [(run.by_hash_root, by_hash_root), (run.archive_root, archive_root)]
        if all(_same_directory(old, new) is not False for old, new in planned):
            # Its roots are gone from where they were (moved, mounted elsewhere): the ones given now.
            log.warning("run %d was planned with roots %s and %s; working with %s and %s",
                        run.run_id, display(run.by_hash_root), display(run.archive_root),
                        display(by_hash_root), display(archive_root))
        else:
            raise UserError(f"run {run.run_id} was planned for the roots {display(run.by_hash_root)} and "
                            f"{display(run.archive_root)}, which are there, not {display(by_hash_root)} and "
                            f"{display(archive_root)}: resume it with --by-hash-root {display(run.by_hash_root)} "
                            f"--archive-root {display(run.archive_root)}")
    return run


def _same_directory(planned: bytes, given: bytes) -> bool | None:
    """Whether a run's root and the one given now are one directory (None: the run's is not there any
    more, or is empty)."""
    try:
        was = os.stat(planned)
        if not stat.S_ISDIR(was.st_mode) or not os.listdir(planned):
            return None  # an empty directory (a mount point left behind) is no root of the run
    except OSError:
        return None
    now = os.stat(given)
    return (was.st_dev, was.st_ino) == (now.st_dev, now.st_ino)


def _select_run(conn, mode: Mode, request: JobRequest, spec: WorkSpec,
                by_hash_root: bytes, archive_root: bytes) -> RunInfo:
    if request.run_id is not None:
        return _named_run(conn, mode, request, by_hash_root, archive_root)
    asked = _as_stored(request.options, conn)
    if not request.new:
        for run in checkpoint.open_runs(conn, mode.name, by_hash_root, archive_root):
            differ = _changed_options(run, asked)
            # A plain command resumes the newest unfinished run asked for the
            # same work: ``relink --limit 5``, interrupted, must not be
            # finished by a later plain ``relink`` and reported complete over
            # five blobs. A run planned before runs kept what they were asked
            # is told apart by what narrows its work (its other options are
            # kept as planning resolved them: a medium's hash for its name).
            narrowed = differ if REQUESTED in run.options else _changed_options(run, asked, NARROWING)
            if narrowed:
                log.warning("run %d is unfinished but was asked for other work (%s): left for "
                            "`relinker %s --run %d`", run.run_id, narrowed, mode.name, run.run_id)
                continue
            log.warning("resuming run %d (started earlier, same roots); use --new for a fresh run", run.run_id)
            if differ:  # a run planned before runs kept what they were asked
                log.warning("run %d keeps the options it was planned with; ignoring %s", run.run_id, differ)
            return run
    # What was asked, before planning resolves it (a medium's name to its
    # hash, --limit to an upper blob ID): what a later plain resume compares.
    spec.options[REQUESTED] = asked
    bounds = mode.plan(conn, spec.options, request.blobids, request.workers, request.ranges)
    run_id = checkpoint.create_run(conn, mode.name, by_hash_root, archive_root, spec.options, bounds)
    log.info("planned run %d: %d ranges", run_id, len(bounds))
    return checkpoint.get_run(conn, run_id)


#: Key of a run's options holding the options it was asked for.
REQUESTED = "requested"


def _as_stored(options: dict, conn: psycopg.Connection | None = None) -> dict:
    """``options`` as the run's JSON keeps them (tuples become lists; in ``conn``'s database, characters
    its encoding lacks as text, see dbtext.storable), so that they compare."""
    return json.loads(json.dumps(dbtext.storable(conn, options)))


#: The options that make a run's work another one's (an older run's, see _select_run; a medium as
#: its hash, see Mode.canonical_options).
NARROWING = frozenset({"limit", "only_incomplete", "on_conflict", "from_file", "selection", "count", "hash",
                       "medium"})


def _changed_options(run: RunInfo, asked: dict, only: frozenset | None = None) -> str:
    """The options asked now (as stored, see _as_stored; of ``only``, if given) that differ from what
    ``run`` was asked for ('' when none does).

    Runs planned before runs kept what they were asked compare with their
    (planned) options.
    """
    if REQUESTED in run.options:
        planned_with = run.options[REQUESTED]
        # An option one of the two lacks was not given (a list of blobs
        # now, none then), or is newer than the run (a flag left off).
        keys = set(asked) | set(planned_with)
    else:
        planned_with, keys = run.options, set(asked)
    if only is not None:
        keys &= only
    return ", ".join(f"{_as_typed(key, planned_with.get(key))}, now {_as_typed(key, asked.get(key))}"
                     for key in sorted(keys) if not _as_planned(run, planned_with, key, asked.get(key)))


def given_options(options: dict) -> dict:
    """The options of ``options`` that were given (a value, a flag set), as a run keeps them."""
    return {key: value for key, value in _as_stored(options).items() if _given_value(value) is not None}


def _conflicting_options(run: RunInfo, given: dict) -> str:
    """The options given now that the run was planned otherwise ('' when none)."""
    planned_with = run.options.get(REQUESTED, run.options)
    return ", ".join(f"{_as_typed(key, planned_with.get(key))}, now {_as_typed(key, value)}"
                     for key, value in sorted(given.items()) if not _as_planned(run, planned_with, key, value))


def _as_planned(run: RunInfo, planned_with: dict, key: str, value) -> bool:
    """Whether ``value`` of option ``key`` is what ``run`` was asked for, or what its planning made of
    that (a medium asked by name is planned by its hash)."""
    resolved = _given_value(run.options.get(key))
    given = _given_value(value)
    return given == _given_value(planned_with.get(key)) or (resolved is not None and given == resolved)


#: verify's selections as the options that ask for them.
SELECTION_TYPED = {"all": "--all", "from-file": "--from-file"}


def _flag(key: str) -> str:
    """The command line's option for a key of a run's options ("--only-incomplete")."""
    return "--" + key.replace("_", "-")


def _as_typed(key: str, value) -> str:
    """An option of a run as the command line says it ("--limit 5", "no --only-incomplete")."""
    flag = _flag(key)
    if key == "selection":
        return SELECTION_TYPED.get(value) or (f"--mode {value}" if value else "no --mode")
    if _given_value(value) is None:
        return f"no {flag}"
    if value is True:
        return flag
    if key == "from_file":
        return f"{flag} ({value})"  # what the run keeps of a list
    return f"{flag} {value}"


def _given_value(value):
    """An option's value, with "not given" and "off" as one (None)."""
    return None if value is None or value is False else value

