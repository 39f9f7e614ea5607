"""The ``relinker`` command line: parse, call the library, report.

Exit codes (see :mod:`relinker.errors` and the README): 0 success, 1 done with
problems, 2 usage/configuration/preflight error, 3 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

import psycopg

from relinker import __version__, db, migrations, scan
from relinker.config import Settings, add_command, config_files_from, new_parser, new_subparsers
from relinker.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, UserError

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

    demo = add_command(commands, "demo", config_files, help="run the whole story on an embedded database")
    demo.set_defaults(handler=cmd_demo)
    return parser


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
    import os

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


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    print("relinker demo: not yet available")
    return EXIT_OK
