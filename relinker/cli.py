"""The ``relinker`` command line: parse, call the library, report.

Exit codes (see :mod:`relinker.errors` and the README): 0 success, 1 done with
problems, 2 usage/configuration/preflight error, 3 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import signal
import sys
from typing import Sequence

import psycopg

from relinker import (__version__, bloblist, catalogue, checkpoint, copy, count, db, jobs, migrations, relink, scan,
                      verify)
from relinker.config import (Settings, add_command, check_config_keys, check_verbosity, config_files_from, new_parser,
                             new_subparsers, options_of, path_argument, prefer_typed, refuse_abbreviations,
                             typed_options, unset)
from relinker.errors import (EXIT_INTERRUPTED, EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, RunStopped, StopSignal,
                             UserError, outcome_told, stop_on_signals)
from relinker.logs import emit, in_log_file, say_and_log, setup_logging
from relinker.report import Summary

log = logging.getLogger("relinker")

DESCRIPTION = """\
Rebuild lost archive hardlinks from an NTT catalogue without reading file content.

exit codes: 0 success; 1 finished with problems recorded, ranges failed or entries
skipped, or stopped short (the database out of reach: resumable; a copy superseded by
a scan: planned anew); 2 usage, configuration or preflight error; 3 interrupted
(resumable).

Every long option is also a config-file key (--config FILE or RELINKER_CONFIG); the
global options below also come from RELINKER_* variables. The command line beats
the environment, which beats the config file.
"""


def build_parser(config_files: list[str]) -> argparse.ArgumentParser:
    """The command line's parser: every command and option, with ``config_files`` read for their defaults."""
    parser = new_parser(config_files, description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"relinker {__version__}")
    commands = new_subparsers(parser)

    migrate = add_command(
        commands, "migrate", config_files,
        help="add relinker's columns, checkpoint tables, views and indexes to a catalogue",
        description="Apply relinker's numbered SQL migrations (idempotent; safe to run twice).",
        epilog="examples:\n  relinker migrate\n  relinker --db-url postgresql:///copyjob migrate --base",
    )
    migrate.add_argument(
        "--base", action="store_true",
        help="first create the NTT base tables (medium, inode, path, blobs) in a new, empty database",
    )
    migrate.set_defaults(handler=cmd_migrate)

    scan_cmd = add_command(
        commands, "scan", config_files,
        help="catalogue a directory tree as one medium (metadata only)",
        description="Catalogue a real directory tree as one medium: medium, inode and path rows. "
        "File content is not read. Re-scanning a medium replaces its rows.",
        epilog="example:\n  relinker scan --medium photos-2019 /mnt/photos",
    )
    scan_cmd.add_argument("--medium", required=True, type=medium_name, metavar="NAME", help="medium name (its hash derives from it)")
    scan_cmd.add_argument("--exclude", action="append", default=[], metavar="PATTERN", type=name_pattern,
                          help="leave out entries whose name (not path) matches PATTERN: *, ? and [...], where "
                               "[*] is a literal * (Python's fnmatch: no backslash escapes); repeatable")
    scan_cmd.add_argument("directory", metavar="DIR", type=path_argument, help="root of the tree to catalogue")
    scan_cmd.set_defaults(handler=cmd_scan)

    relink_cmd = add_command(
        commands, "relink", config_files,
        help="put back every missing archive hardlink (checkpointed, resumable, parallel)",
        description="Re-create missing archive hardlinks from the catalogue without reading file content "
        "(the seed's --re-hardlink mode). Work is split into ranges of blob IDs recorded in "
        "relinker_range; an interrupted run resumes exactly its unfinished ranges.",
        epilog="""examples:
  relinker relink --dry-run --limit 100     what would happen to the first 100 blobs
  relinker relink                           resume the last unfinished run, or start one
  relinker relink --new --workers 4         a fresh run over every blob
  relinker relink --run 7                   join run 7 (from another host or terminal)
  relinker relink --from-file broken.txt    only the blobs listed (say, by verify --failed-ids)

exit codes: 0 complete, no problems; 1 problems recorded, ranges failed, or stopped
short (the database out of reach: resume with --run RUN_ID); 2 usage, configuration
or preflight error; 3 interrupted (resume with --run RUN_ID).""",
    )
    add_job_options(relink_cmd)
    relink_cmd.add_argument("--from-file", metavar="FILE", type=path_argument,
                            help="only the blob IDs listed in FILE ('-': stdin), one per line, # comments")
    relink_cmd.add_argument("--only-incomplete", action="store_true",
                            help="only blobs with n_hardlinks < expected_hardlinks (expected computed where NULL)")
    relink_cmd.add_argument("--on-conflict", choices=("replace", "keep"),
                            help="a different regular file at an archive path: replace it atomically "
                            "(default; never the only name of a file whose bytes differ from the by-hash "
                            "file's) or keep it and record a problem")
    relink_cmd.set_defaults(handler=cmd_relink)

    copy_cmd = add_command(
        commands, "copy", config_files,
        help="normal mode: content into by-hash, then every archive link of the inode",
        description="The seed's normal mode: for every regular-file inode whose content is not stored "
        "(blobid NULL), read its content once, store it under by-hash/ab/cd/<blake3> "
        "(deduplicated), link all its paths into the archive, and record blobid, by_hash_created, "
        "n_hardlinks (and the NTT status model's columns, where the catalogue has them) in batched "
        "statements. Inodes already stored are never read or written. Checkpointed and resumable like relink.",
        epilog="""examples:
  relinker copy --dry-run                           what would be copied (reads only the catalogue)
  relinker copy --medium photos-2019
  relinker copy --source-prefix /mnt/ntt/abc=/media/usb1   the medium is mounted elsewhere now

exit codes: 0 complete, no problems; 1 problems recorded (inodes not stored, links not
made), ranges failed, stopped short (the database out of reach: resume with --run
RUN_ID), or superseded by a scan (planned anew); 2 usage, configuration or preflight
error; 3 interrupted (resume with --run RUN_ID).""",
    )
    add_job_options(copy_cmd, limit="only the first N inodes to store (by medium, then inode number)",
                    dry_run="read the catalogue alone (no medium; the roots are checked all the same), report "
                            "what would be copied, write nothing")
    copy_cmd.add_argument("--medium", type=medium_name, metavar="NAME_OR_HASH", help="only this medium")
    copy_cmd.add_argument("--source-prefix", action="append", default=[], metavar="OLD=NEW",
                          help="read paths under OLD from NEW instead (repeatable; the longest OLD that matches "
                          "applies, so one partition may move apart from its medium)")
    copy_cmd.add_argument("--retry-permanent", action="store_true",
                          help="also try inodes whose status is failed_permanent (left alone by default)")
    copy_cmd.set_defaults(handler=cmd_copy)

    count_cmd = add_command(
        commands, "count", config_files,
        help="count the archive links of each blob by stat alone; fix n_hardlinks",
        description="The seed's hardlink counter: for each blob (or the first N) count, by lstat alone, "
        "the archive paths that are hardlinks of its by-hash file, and compare with n_hardlinks. "
        "Blobs that disagree are reported (count-mismatch); without --dry-run the true counts are "
        "written to n_hardlinks and expected_hardlinks. Reads no file content.",
        epilog="examples:\n  relinker count --limit 100 --dry-run\n  relinker count --workers 4",
    )
    add_job_options(count_cmd)
    count_cmd.set_defaults(handler=cmd_count)

    verify_cmd = add_command(
        commands, "verify", config_files, help="check blobs end to end (checkpointed, resumable, parallel)",
        description="The seed's verifier: for each blob check the by-hash file (exists, regular, size, "
        "and with --hash its content), every archive link (same inode) and n_hardlinks. Blobs that pass "
        "get last_checked = now(); failures are problems of the verify run. Which blobs: --all, the IDs "
        "in --from-file, or --count N chosen by --mode, fixed when the run is planned.",
        epilog="""examples:
  relinker verify --count 100 --mode never
  relinker verify --all --hash --workers 4          every blob, every byte (an overnight job)
  relinker verify --count 1000 --mode random --hash --failed-ids broken.txt
  relinker relink --from-file broken.txt            then repair what failed

exit codes: 0 every blob passed; 1 some failed, or paths over the filesystem's limits
(too-many-links, name-too-long); 2 usage or preflight error; 3 interrupted.""",
    )
    add_job_options(verify_cmd, limit=None)
    which_blobs = verify_cmd.add_mutually_exclusive_group()
    which_blobs.add_argument("--all", action="store_true", help="every blob of the catalogue")
    which_blobs.add_argument("--from-file", metavar="FILE", type=path_argument, help="the blob IDs listed in FILE ('-': stdin)")
    verify_cmd.add_argument("--count", type=at_most(catalogue.BIGINT_MAX), metavar="N",
                            help=f"how many blobs (default {verify.DEFAULT_COUNT})")
    verify_cmd.add_argument("--mode", choices=verify.SELECTIONS,
                            help="never checked (default), least recently checked, or a random sample")
    verify_cmd.add_argument("--hash", action="store_true", help="also re-hash the content (reads every byte)")
    verify_cmd.add_argument("--failed-ids", metavar="FILE", type=path_argument,
                            help="write the IDs of the blobs that failed to FILE, as --from-file reads them")
    verify_cmd.set_defaults(handler=cmd_verify)

    status = add_command(
        commands, "status", config_files, help="show a run's progress, open ranges and problems",
        description="Show the figures of a run (default: the newest): ranges, links, problems by kind, "
        "rate, ETA, and the ranges not yet done.",
        epilog="examples:\n  relinker status\n  relinker status 7 --json",
    )
    status.add_argument("run_id", nargs="?", type=whole_number, metavar="RUN_ID", help="run to show (default: newest)")
    status.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    status.set_defaults(handler=cmd_status)

    demo = add_command(
        commands, "demo", config_files,
        help="the whole story on real files and an embedded PostgreSQL",
        description="Start an embedded PostgreSQL under DIR (always its own: a catalogue named by --db-url, "
        "RELINKER_DB_URL or a config file is never touched), catalogue a real tree (default: this Python's "
        "standard library), copy it into DIR/by-hash and an archive in DIR/archive (the root options are not "
        "used), break a quarter of the archive's links, relink, verify, and print the psql command to look "
        "around. Running it again starts over. Ctrl-C stops it with exit 3.",
        epilog="examples:\n  relinker demo\n  relinker demo /tmp/demo --source /usr/share/doc --keep",
    )
    demo.add_argument("demo_dir", nargs="?", default="relinker-demo", metavar="DIR", type=path_argument,
                      help="where the demo lives (default: ./relinker-demo)")
    demo.add_argument("--source", metavar="TREE", type=path_argument, help="tree to catalogue (default: the standard library)")
    demo.add_argument("--keep", action="store_true", help="leave the embedded server running at the end")
    demo.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1, metavar="N",
                      help="worker processes (default: CPU count)")
    demo.set_defaults(handler=cmd_demo)
    return parser


def name_pattern(text: str) -> str:
    """An argparse type: a pattern an entry's name can match (no '/': it would match nothing)."""
    if "/" in text:
        raise argparse.ArgumentTypeError(f"{text!r} has a '/': it is matched against each entry's name, "
                                         "never a path (it would match nothing)")
    return text


def medium_name(text: str) -> str:
    """An argparse type: a medium's name, text the catalogue can hold (UTF-8, no NUL)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"{text.encode('utf-8', 'surrogateescape')!r} is not UTF-8") from None
    if "\0" in text:
        raise argparse.ArgumentTypeError("a NUL is no character of a name")
    if not text:
        raise argparse.ArgumentTypeError("a medium's name cannot be empty")
    return text


def whole_number(text: str) -> int:
    """An argparse type: an integer, refused in words a user reads."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def positive_int(text: str) -> int:
    """An argparse type: a whole number, 1 or more."""
    value = whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def non_negative_int(text: str) -> int:
    """An argparse type: a whole number, 0 or more (and a bigint)."""
    value = whole_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, not {value}")
    if value > catalogue.BIGINT_MAX:
        raise argparse.ArgumentTypeError(f"must be at most {catalogue.BIGINT_MAX}, not {value}")
    return value


def at_most(maximum: int):
    """An argparse type: a whole number from 1 to ``maximum``."""
    def parse_count(text: str) -> int:
        value = positive_int(text)
        if value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, not {value}")
        return value
    parse_count.__name__ = "count"
    return parse_count


def seconds_at_least(minimum: float, maximum: float = math.inf):
    """An argparse type: a number of seconds from ``minimum`` to ``maximum``."""
    def parse_seconds(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
        if math.isnan(value):
            raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum:g} s, not {text}")
        if value > maximum or math.isinf(value):
            raise argparse.ArgumentTypeError(f"must be at most {maximum:g} s, not {text}" if math.isfinite(maximum)
                                             else f"must be a finite number of seconds, not {text}")
        return value
    parse_seconds.__name__ = "seconds"
    return parse_seconds


#: Workers heartbeat every lease/4 (0.2 s at least): a shorter lease would
#: take ranges away from workers that are alive and well.
MINIMUM_LEASE = 1.0
#: A week: the server takes the lease as an interval, and a stalled range should not wait longer.
MAXIMUM_LEASE = 7 * 24 * 3600.0


def add_job_options(command: argparse.ArgumentParser, *,
                    limit: str | None = "only the first N blobs (in blob-ID order)",
                    dry_run: str = "read catalogue and disk, report what would happen, write nothing") -> None:
    """Options shared by the checkpointed commands (relink, copy, count, verify)."""
    command.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1, metavar="N",
                         help="worker processes (default: CPU count)")
    command.add_argument("--ranges", type=at_most(checkpoint.MAX_RANGES), metavar="N",
                         help="split a new run into N ranges (default: scales with the number of blobs)")
    which = command.add_mutually_exclusive_group()
    which.add_argument("--run", type=whole_number, metavar="RUN_ID", dest="run_id",
                       help="work on this run (also while other coordinators work on it)")
    which.add_argument("--new", action="store_true", help="start a new run even if one is unfinished")
    if limit:
        command.add_argument("--limit", type=non_negative_int, metavar="N", help=limit)
    command.add_argument("--dry-run", action="store_true", help=dry_run)
    command.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")
    command.add_argument("--no-progress", action="store_true", help="no progress bar")
    command.add_argument("--lease", type=seconds_at_least(MINIMUM_LEASE, MAXIMUM_LEASE),
                         default=checkpoint.DEFAULT_LEASE,
                         metavar="SECONDS",
                         help="heartbeat age after which a stalled worker's range is taken over (default %(default)s)")
    command.add_argument("--retry-timeout", type=seconds_at_least(0), default=db.DEFAULT_RETRY_TIMEOUT,
                         metavar="SECONDS",
                         help="how long to keep retrying transient database errors (default %(default)s)")


def job_request(args: argparse.Namespace, settings: Settings, options: dict) -> jobs.JobRequest:
    """What a checkpointed command asks of the coordinator: the shared options parsed, ``options`` its mode's."""
    return jobs.JobRequest(
        settings=settings, options=options, resume_arguments=list(getattr(args, "resume_globals", [])),
        workers=args.workers, run_id=args.run_id, new=args.new,
        dry_run=args.dry_run, ranges=args.ranges, lease=args.lease, retry_timeout=args.retry_timeout,
        progress=not args.no_progress and not args.json and sys.stderr is not None and sys.stderr.isatty(),
    )


def _standard_descriptors_open() -> None:
    """/dev/null in place of a closed stdin, stdout or stderr (``2>&-``): else the next file or socket
    opened would take that number, and whatever writes to stderr would write into it."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            opened = os.open(os.devnull, os.O_RDWR)  # the lowest free number: this one
            if opened != fd:
                os.close(opened)
                return
    # Python found them closed at its start: no sys.stdout or sys.stderr (print would write elsewhere).
    if sys.stdout is None:
        sys.stdout = open(1, "w", closefd=False)
    if sys.stderr is None:
        sys.stderr = open(2, "w", closefd=False)


def _resume_globals(argv: Sequence[str], args: argparse.Namespace, settings: Settings) -> list[str]:
    """The global options given on this command line that a resume must repeat (the run keeps neither
    its database nor, for preflight, its roots); a DSN given here is named, never printed."""
    given = {option for option in ("--config", "--db-url", "--by-hash-root", "--archive-root", "--log-file")
             if any(arg == option or arg.startswith(option + "=") for arg in options_of(argv))}
    repeat = []
    if "--config" in given:
        repeat += ["--config", os.path.abspath(args.config)]
    for option, root in (("--by-hash-root", settings.by_hash_root), ("--archive-root", settings.archive_root)):
        if option in given and root:
            repeat += [option, os.fsdecode(os.path.abspath(root))]
    if "--db-url" in given:
        repeat += ["--db-url", "DSN"]
    # The log an operator watches goes on through the resume, as verbose as it was.
    if "--log-file" in given and settings.log_file:
        repeat += ["--log-file", os.path.abspath(settings.log_file)]
    if settings.verbose and any(arg == "--verbose" or re.fullmatch(r"-v+", arg) for arg in options_of(argv)):
        repeat.append("-" + "v" * settings.verbose)
    return repeat


def report(summary: Summary, exit_code: int, as_json: bool, request: jobs.JobRequest) -> int:
    """Print a run's summary, and how to resume it if it stopped short; return ``exit_code``."""
    outcome_told()
    emit(summary.as_json() if as_json else summary.as_text())
    in_log_file(summary.as_text())
    resume_hint = jobs.resume_command(summary.mode, summary.run_id, request)
    if summary.status == checkpoint.SUPERSEDED:
        say_and_log(f"relinker: run {summary.run_id} was superseded by a scan meanwhile: "
                    f"`{jobs.replan_command(summary.mode, summary.options, request)}` plans what is left")
        return exit_code
    if summary.mode == copy.MODE and summary.counters.links_missing and not summary.dry_run:
        say_and_log(f"relinker: {summary.counters.links_missing:,} links of stored contents could not be made "
                    "(see the problems); copy stores a content once: `relinker relink --only-incomplete` makes "
                    "them once that is mended")
    if summary.stopped:
        say_and_log(f"relinker: {summary.stopped}; resume with: {resume_hint}")
    elif exit_code == EXIT_INTERRUPTED:
        if summary.run_id is None:
            say_and_log("relinker: interrupted (a dry run keeps nothing to resume)")
        else:
            say_and_log(f"relinker: interrupted; resume with: {resume_hint}")
    return exit_code


#: The options of relink, copy, count and verify that say which work a run does (the run keeps them).
RUN_SHAPING = frozenset({"on_conflict", "only_incomplete", "limit", "from_file", "medium", "retry_permanent",
                         "hash", "all", "count", "mode"})


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, Settings]:
    """Parse a command line (with environment and config file) into settings."""
    argv = list(argv)
    config_files = config_files_from(argv)
    parser = build_parser(config_files)
    try:
        check_verbosity(os.environ.get("RELINKER_VERBOSE"), "RELINKER_VERBOSE")
        check_config_keys(parser, config_files)
        refuse_abbreviations(parser, argv)
        args = parser.parse_args(argv)
    except UnicodeDecodeError as exc:
        raise UserError(f"the config file is not UTF-8 text ({exc})") from None
    except ValueError as exc:
        # ConfigArgParse turns a count setting (RELINKER_VERBOSE, verbose in
        # a config file) into repeated flags with int(), unchecked.
        raise UserError(f"RELINKER_VERBOSE or 'verbose' in the config file must be a whole number ({exc})") from None
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        raise SystemExit(EXIT_USAGE)
    args.typed = typed_options(argv)
    if getattr(args, "run_id", None) is not None:
        # The run goes on with the work it was planned for: what a config file says of that work (a
        # nightly count, a trial limit) is no option given with --run, which refuses one planned otherwise.
        for dest in RUN_SHAPING - args.typed:
            if hasattr(args, dest):
                unset(args, dest)
    return args, Settings.from_args(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (``sys.argv[1:]`` if None); returns the exit code (the console
    script enters through relinker.entry, which makes the stop signals exit 3 from its first moment)."""
    argv = sys.argv[1:] if argv is None else argv
    _standard_descriptors_open()
    # SIGINT, SIGTERM and SIGHUP stop a command with exit 3 wherever they land
    # (planning, preflight, the summary), as the process pool's own handlers
    # do while it runs: SIGINT too, which a script's background job inherits
    # ignored and Python would then leave ignored.
    previous = stop_on_signals()
    args = None
    try:
        args, settings = parse(argv)
        args.resume_globals = _resume_globals(argv, args, settings)
        setup_logging(settings.verbose, settings.log_file)
        return args.handler(args, settings)
    except RunStopped as exc:
        # A run that went this far answers --json, as one interrupted does: not complete, and why.
        if getattr(args, "json", False):
            emit(json.dumps({"mode": exc.mode, "run_id": exc.run_id, "complete": False, "stopped": str(exc)}))
        say_and_log(f"relinker: {exc}" if exc.exit_code == EXIT_INTERRUPTED else f"relinker: error: {exc}")
        return exc.exit_code
    except UserError as exc:
        say_and_log(f"relinker: error: {exc}")
        return exc.exit_code
    except psycopg.Error as exc:
        say_and_log(f"relinker: database error: {db.first_line(exc)}")
        return EXIT_USAGE
    except (KeyboardInterrupt, StopSignal):
        say_and_log("relinker: interrupted")
        return EXIT_INTERRUPTED
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    """`relinker migrate`: bring the catalogue's relinker tables to this version; the exit code."""
    with db.connect_for_user(settings.db_url, autocommit=True) as conn:
        applied = migrations.migrate(conn, base=args.base)
    outcome_told()
    # Every migration this relinker knows is applied now (a newer catalogue was refused); this role
    # may not read the table that says so (a member migrating as the owner, inheriting nothing).
    version = max(m.version for m in migrations.available())
    if applied:
        emit(f"applied: {', '.join(applied)}", log=True)
    emit(f"catalogue schema is at version {version}", log=True)
    return EXIT_OK


def cmd_scan(args: argparse.Namespace, settings: Settings) -> int:
    """`relinker scan`: catalogue a tree as a medium; the exit code."""
    with db.connect_for_user(settings.db_url, autocommit=True) as conn:
        result = scan.scan_tree(conn, args.medium, os.fsencode(args.directory),
                                [os.fsencode(pattern) for pattern in args.exclude])
    outcome_told()
    skipped = result.unreadable + result.changed + result.other_filesystem + result.unrepresentable
    emit(
        f"medium {args.medium} ({result.medium_hash}): {result.paths} paths, "
        f"{result.inodes} inodes, {result.files} regular files"
        + (f", {result.excluded} entries excluded" if result.excluded else ""),
        log=True,
    )
    if skipped:
        emit(
            f"skipped: {result.unreadable} unreadable, {result.other_filesystem} on other filesystems, "
            f"{result.unrepresentable} not storable as text"
            + (f", {result.changed} gone or replaced while the tree was walked (scan it again for one "
               "moment's tree)" if result.changed else ""),
            log=True,
        )
    if result.superseded:
        emit(f"superseded: unfinished copy run {', '.join(map(str, result.superseded))}, planned before this "
             "scan of a medium it covers (a copy asked for the same work plans what is left)", log=True)
    return EXIT_PROBLEMS if skipped else EXIT_OK


def listed_blobs(file_argument: str) -> list[str]:
    """The blob IDs of ``--from-file`` (UserError when the file cannot be read)."""
    try:
        return bloblist.blob_ids_from(file_argument)
    except OSError as exc:
        raise UserError(f"--from-file {file_argument}: {exc.strerror}") from None


def cmd_relink(args: argparse.Namespace, settings: Settings) -> int:
    """`relinker relink`: a relink run, new or resumed; the exit code."""
    # A config file's trial --limit gives way to a list typed on the command line, and the other way round.
    prefer_typed(args, getattr(args, "typed", frozenset()), ("from_file",), ("limit",))
    options = {"on_conflict": args.on_conflict, "only_incomplete": args.only_incomplete, "limit": args.limit}
    request = job_request(args, settings, options)
    if args.from_file:
        if args.limit is not None:
            raise UserError("--limit and --from-file cannot be combined: the list says which blobs")
        request.blobids = listed_blobs(args.from_file)
        options["from_file"] = bloblist.listing_fingerprint(request.blobids)
    summary, code = jobs.run_job(relink.MODE_SPEC, request)
    return report(summary, code, args.json, request)


def cmd_copy(args: argparse.Namespace, settings: Settings) -> int:
    """`relinker copy`: a copy run, new or resumed; the exit code."""
    from relinker.paths import parse_source_prefix

    # A resume may be typed in another directory: NEW as this one reads it.
    given = [_absolute_target(option) for option in args.source_prefix]
    try:
        remaps = [parse_source_prefix(option) for option in given]
    except ValueError as exc:
        raise UserError(str(exc)) from None
    options = {"medium": args.medium, "limit": args.limit, "retry_permanent": args.retry_permanent}
    local = {"source_prefix": remaps}
    request = job_request(args, settings, options)
    request.local = local
    # Where the media are mounted is this invocation's, not the run's: a resume must say it again.
    request.resume_arguments += [argument for option in given for argument in ("--source-prefix", option)]
    summary, code = jobs.run_job(copy.MODE_SPEC, request)
    return report(summary, code, args.json, request)


def cmd_count(args: argparse.Namespace, settings: Settings) -> int:
    """`relinker count`: a count run, new or resumed; the exit code."""
    request = job_request(args, settings, {"limit": args.limit})
    summary, code = jobs.run_job(count.MODE_SPEC, request)
    return report(summary, code, args.json, request)


def _absolute_target(option: str) -> str:
    """``--source-prefix OLD=NEW`` with NEW made absolute (from the current directory)."""
    old, sep, new = option.partition("=")
    return f"{old}={os.path.abspath(new)}" if sep and new and not new.startswith("/") else option


def cmd_verify(args: argparse.Namespace, settings: Settings) -> int:
    """`relinker verify`: a verify run, new or resumed, and its --failed-ids list; the exit code."""
    if args.failed_ids and args.dry_run:
        raise UserError("--failed-ids needs a recorded run: a --dry-run keeps no list of failures")
    if args.failed_ids:
        # Checked now: an overnight run must not end unable to write its list.
        directory = os.path.dirname(os.path.abspath(args.failed_ids))
        if not os.path.isdir(directory) or not os.access(directory, os.W_OK | os.X_OK):
            raise UserError(f"--failed-ids {args.failed_ids}: cannot write into {directory}")
        try:
            there = os.lstat(args.failed_ids)
        except FileNotFoundError:
            there = None
        except OSError as exc:  # a name too long for its filesystem, ...
            raise UserError(f"--failed-ids {args.failed_ids}: {exc.strerror}") from None
        if there is not None and not os.path.isfile(args.failed_ids):
            raise UserError(f"--failed-ids {args.failed_ids}: not a file (the list replaces a file, nothing else)")
    # A nightly config's --count and --mode give way to --all or a list typed, and the other way round.
    prefer_typed(args, getattr(args, "typed", frozenset()), ("all", "from_file"), ("count", "mode"))
    if (args.all or args.from_file) and (args.count or args.mode):
        chooser = "--count" if args.count else "--mode"
        raise UserError(f"{chooser} chooses which blobs: not with {'--all' if args.all else '--from-file'}")
    options = {"hash": args.hash}
    request = job_request(args, settings, options)
    if args.from_file:
        request.blobids = listed_blobs(args.from_file)
        options.update(selection="from-file", from_file=bloblist.listing_fingerprint(request.blobids))
    elif args.all:
        options["selection"] = "all"
    else:
        options.update(selection=args.mode, count=args.count)
    if args.failed_ids:
        # A resume may be typed in another directory: the list goes where this one would have put it.
        request.resume_arguments += ["--failed-ids", os.path.abspath(args.failed_ids)]
    summary, code = jobs.run_job(verify.MODE_SPEC, request)
    if args.failed_ids and summary.run_id is not None and not summary.complete:
        # A list of part of the run would pass for the whole one in a repair.
        log.warning("--failed-ids %s not written: run %d is not complete", args.failed_ids, summary.run_id)
    elif args.failed_ids and summary.run_id is not None:
        try:
            written = verify.save_failed_ids(settings.db_url, summary.run_id, args.failed_ids)
        except (verify.FailedIdsNotWritten, KeyboardInterrupt, StopSignal) as exc:
            # The run is recorded: its summary still goes out, and the list can be written later.
            why = exc if isinstance(exc, verify.FailedIdsNotWritten) else "interrupted"
            log.error("--failed-ids %s: %s (the run is recorded: relinker verify --run %d --failed-ids "
                      "FILE writes it)", args.failed_ids, why, summary.run_id)
            code = max(code, EXIT_PROBLEMS)
        else:
            log.info("wrote %d failed blob IDs to %s", written, args.failed_ids)
    return report(summary, code, args.json, request)


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    """`relinker status`: a run's figures, read in one snapshot; the exit code."""
    with db.connect_for_user(settings.db_url) as conn:
        # One snapshot for every figure: the run's totals and its ranges' list of one moment.
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        migrations.require_migrated(conn)
        run = checkpoint.get_run(conn, args.run_id) if args.run_id is not None else checkpoint.newest_run(conn)
        if run is None and args.run_id is None:
            # A catalogue just migrated is no error: a monitoring script reads it as it is.
            outcome_told()
            emit(json.dumps({"run_id": None}) if args.json else "no runs yet", log=True)
            return EXIT_OK
        if run is None:
            raise UserError(f"unknown run {args.run_id}")
        summary = Summary.from_run(conn, run.run_id, open_ranges=True)
    outcome_told()
    emit(summary.as_json() if args.json else summary.as_text(), log=True)
    return EXIT_OK


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    """`relinker demo`: the whole job on a throwaway archive and embedded database; the exit code."""
    from relinker import demo

    return demo.run_demo(args.demo_dir, args.source, args.keep, settings, args.workers)
