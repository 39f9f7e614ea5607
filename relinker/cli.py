"""The ``relinker`` command line: parse, call the library, report.

Exit codes (see :mod:`relinker.errors` and the README): 0 success, 1 done with
problems, 2 usage/configuration/preflight error, 3 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

import psycopg

from relinker import __version__, checkpoint, db, jobs, migrations, relink, scan
from relinker.config import Settings, add_command, config_files_from, new_parser, new_subparsers
from relinker.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, UserError
from relinker.report import Summary

log = logging.getLogger("relinker")

DESCRIPTION = """\
Rebuild lost archive hardlinks from an NTT catalogue without reading file content.

exit codes: 0 success; 1 finished with problems recorded; 2 usage, configuration
or preflight error; 3 interrupted (resumable).
"""


def build_parser(config_files: list[str]) -> argparse.ArgumentParser:
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
    scan_cmd.add_argument("--medium", required=True, metavar="NAME", help="medium name (its hash derives from it)")
    scan_cmd.add_argument("directory", metavar="DIR", help="root of the tree to catalogue")
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

exit codes: 0 complete, no problems; 1 complete with problems recorded; 2 usage,
configuration or preflight error; 3 interrupted (resume with --run RUN_ID).""",
    )
    add_job_options(relink_cmd)
    relink_cmd.add_argument("--only-incomplete", action="store_true",
                            help="only blobs with n_hardlinks < expected_hardlinks (expected computed where NULL)")
    relink_cmd.add_argument("--on-conflict", choices=("replace", "keep"), default="replace",
                            help="a different regular file at an archive path: replace it atomically "
                            "(default) or keep it and record a problem")
    relink_cmd.set_defaults(handler=cmd_relink)

    status = add_command(
        commands, "status", config_files, help="show a run's progress, open ranges and problems",
        description="Show the figures of a run (default: the newest): ranges, links, problems by kind, "
        "rate, ETA, and the ranges not yet done.",
        epilog="examples:\n  relinker status\n  relinker status 7 --json",
    )
    status.add_argument("run_id", nargs="?", type=int, metavar="RUN_ID", help="run to show (default: newest)")
    status.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    status.set_defaults(handler=cmd_status)

    demo = add_command(commands, "demo", config_files, help="run the whole story on an embedded database")
    demo.set_defaults(handler=cmd_demo)
    return parser


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def add_job_options(command: argparse.ArgumentParser) -> None:
    """Options shared by the checkpointed commands (relink, copy, count)."""
    command.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1, metavar="N",
                         help="worker processes (default: CPU count)")
    command.add_argument("--ranges", type=positive_int, metavar="N",
                         help="split a new run into N ranges (default: scales with the number of blobs)")
    which = command.add_mutually_exclusive_group()
    which.add_argument("--run", type=int, metavar="RUN_ID", dest="run_id",
                       help="work on this run (also while other coordinators work on it)")
    which.add_argument("--new", action="store_true", help="start a new run even if one is unfinished")
    command.add_argument("--limit", type=int, metavar="N", help="only the first N blobs (in blob-ID order)")
    command.add_argument("--dry-run", action="store_true",
                         help="read catalogue and disk, report what would happen, write nothing")
    command.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")
    command.add_argument("--no-progress", action="store_true", help="no progress bar")
    command.add_argument("--lease", type=float, default=checkpoint.DEFAULT_LEASE, metavar="SECONDS",
                         help="heartbeat age after which a stalled worker's range is taken over (default %(default)s)")
    command.add_argument("--retry-timeout", type=float, default=db.DEFAULT_RETRY_TIMEOUT, metavar="SECONDS",
                         help="how long to keep retrying transient database errors (default %(default)s)")


def job_request(args: argparse.Namespace, settings: Settings, options: dict) -> jobs.JobRequest:
    return jobs.JobRequest(
        settings=settings, options=options, workers=args.workers, run_id=args.run_id, new=args.new,
        dry_run=args.dry_run, ranges=args.ranges, lease=args.lease, retry_timeout=args.retry_timeout,
        progress=not args.no_progress and not args.json and sys.stderr.isatty(),
    )


def report(summary: Summary, exit_code: int, as_json: bool, resume_hint: str) -> int:
    print(summary.as_json() if as_json else summary.as_text())
    if exit_code == EXIT_INTERRUPTED:
        print(f"relinker: interrupted; resume with: {resume_hint}", file=sys.stderr)
    return exit_code


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, Settings]:
    """Parse a command line (with environment and config file) into settings."""
    argv = list(argv)
    parser = build_parser(config_files_from(argv))
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        raise SystemExit(EXIT_USAGE)
    return args, Settings.from_args(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``relinker`` console script; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        args, settings = parse(argv)
        setup_logging(settings.verbose, settings.log_file)
        return args.handler(args, settings)
    except UserError as exc:
        print(f"relinker: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except psycopg.Error as exc:
        print(f"relinker: database error: {db.first_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("relinker: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def setup_logging(verbose: int, log_file: str | None) -> None:
    """Timestamped log lines on stderr (warnings by default) and optionally a file."""
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(
        level=level, handlers=handlers, force=True,
        format="%(asctime)s %(levelname)s %(processName)s %(message)s",
    )


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    with db.connect_for_user(settings.db_url, autocommit=True) as conn:
        applied = migrations.migrate(conn, base=args.base)
        version = max(migrations.applied_versions(conn))
    if applied:
        print(f"applied: {', '.join(applied)}")
    print(f"catalogue schema is at version {version}")
    return EXIT_OK


def cmd_scan(args: argparse.Namespace, settings: Settings) -> int:
    with db.connect_for_user(settings.db_url) as conn:
        result = scan.scan_tree(conn, args.medium, os.fsencode(args.directory))
    skipped = result.unreadable + result.other_filesystem + result.unrepresentable
    print(
        f"medium {args.medium} ({result.medium_hash}): {result.paths} paths, "
        f"{result.inodes} inodes, {result.files} regular files"
    )
    if skipped:
        print(
            f"skipped: {result.unreadable} unreadable, {result.other_filesystem} on other filesystems, "
            f"{result.unrepresentable} not storable as text"
        )
    return EXIT_PROBLEMS if skipped else EXIT_OK


def cmd_relink(args: argparse.Namespace, settings: Settings) -> int:
    options = {"on_conflict": args.on_conflict, "only_incomplete": args.only_incomplete, "limit": args.limit}
    summary, code = jobs.run_job(relink.MODE_SPEC, job_request(args, settings, options))
    return report(summary, code, args.json, f"relinker relink --run {summary.run_id}")


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    with db.connect_for_user(settings.db_url) as conn:
        migrations.require_migrated(conn)
        run = checkpoint.get_run(conn, args.run_id) if args.run_id is not None else checkpoint.newest_run(conn)
        if run is None:
            raise UserError(f"unknown run {args.run_id}" if args.run_id is not None else "no runs yet")
        summary = Summary.from_run(conn, run.run_id, open_ranges=True)
    print(summary.as_json() if args.json else summary.as_text())
    return EXIT_OK


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    print("relinker demo: not yet available")
    return EXIT_OK
