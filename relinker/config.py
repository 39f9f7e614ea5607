"""Command-line, environment and config-file settings (ConfigArgParse).

Precedence is command line, then environment (``RELINKER_*``), then the
config file (``--config FILE`` or ``RELINKER_CONFIG``), then defaults. Global
options may be written before or after the command name. Every long option is
also a config-file key (``db-url = ...``, ``workers = 4``); keys that belong to
another command are ignored, so one file serves every command; a key no
command knows is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
from typing import Sequence

import configargparse

from relinker.errors import EXIT_USAGE, UserError
from relinker.logs import say

CONFIG_ENV = "RELINKER_CONFIG"


def path_argument(text: str) -> str:
    """An argparse type for a file or directory option: not empty, no NUL (a config file may hold one, no
    path can)."""
    if not text:
        # os.path.abspath("") is the working directory: `scan --medium m "$UNSET"` would catalogue it.
        raise argparse.ArgumentTypeError("an empty path names nothing (a variable not set?)")
    if "\0" in text:
        raise argparse.ArgumentTypeError("a NUL cannot be part of a path")
    return text

#: (flags, kwargs, environment variable) of the options every command accepts.
GLOBAL_OPTIONS: list[tuple[tuple[str, ...], dict, str | None]] = [
    (("--config",), dict(metavar="FILE", help=f"config file (also ${CONFIG_ENV})"), None),
    (
        ("--db-url",),
        dict(
            metavar="DSN",
            help="catalogue database, a libpq URL or key=value string; "
            "empty means libpq's PG* variables",
        ),
        "RELINKER_DB_URL",
    ),
    (("--by-hash-root",), dict(metavar="DIR", type=path_argument, help="root of the content-addressed store"),
     "RELINKER_BY_HASH_ROOT"),
    (("--archive-root",), dict(metavar="DIR", type=path_argument, help="root under which archive hardlinks live"),
     "RELINKER_ARCHIVE_ROOT"),
    (("-v", "--verbose"), dict(action="count", help="more log output (-vv for debug)"), "RELINKER_VERBOSE"),
    (("--log-file",), dict(metavar="FILE", type=path_argument, help="also write log lines to FILE"),
     "RELINKER_LOG_FILE"),
]


@dataclasses.dataclass(frozen=True)
class Settings:
    """The global settings every command works with; roots are bytes."""

    db_url: str
    by_hash_root: bytes | None
    archive_root: bytes | None
    verbose: int = 0
    log_file: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Settings":
        db_url = args.db_url or ""
        try:
            db_url.encode("utf-8")
        except UnicodeEncodeError:
            raise UserError("--db-url (or RELINKER_DB_URL, or db-url in the config file) is not UTF-8") from None
        return cls(
            db_url=db_url,
            by_hash_root=_root(args.by_hash_root),
            archive_root=_root(args.archive_root),
            verbose=args.verbose or 0,
            log_file=args.log_file,
        )


def _root(value: str | None) -> bytes | None:
    # argparse hands us str decoded with surrogateescape; fsencode restores
    # the exact bytes the user typed.
    return os.fsencode(value) if value else None


class _Parser(configargparse.ArgumentParser):
    """A parser whose usage errors end in one line (the usage block is ``--help``'s)."""

    def error(self, message: str):
        say(f"{self.prog}: error: {message} (see {self.prog} --help)")
        raise SystemExit(EXIT_USAGE)


class _CommandParser(_Parser):
    """A subcommand parser that reads its own keys from the shared config file.

    The copies of the global options it carries (so ``relinker relink
    --db-url X`` works) are not config keys here: the top-level parser already
    resolved them from environment and file, and reading them twice would let
    the file override the environment.
    """

    def get_possible_config_keys(self, action):
        if getattr(action, "relinker_global", False):
            return []
        return super().get_possible_config_keys(action)


def options_of(argv: Sequence[str]) -> Sequence[str]:
    """The part of a command line options may be in: before a ``--`` (after it, ``--config=x`` is a path)."""
    return argv[:argv.index("--")] if "--" in argv else argv


def config_files_from(argv: Sequence[str], environ=os.environ) -> list[str]:
    """Find ``--config FILE`` on the command line (anywhere before ``--``) or in the environment."""
    path = None
    argv = options_of(argv)
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
    if path is None:
        path = environ.get(CONFIG_ENV)
        if path == "":
            raise UserError(f"{CONFIG_ENV} is set but empty: an empty path names nothing (unset it)")
    elif path == "":
        # "$UNSET" must not fall back to RELINKER_CONFIG, a production file perhaps.
        raise UserError("--config: an empty path names nothing (a variable not set?)")
    if path is None:
        return []
    if os.path.isdir(path):
        raise UserError(f"config file {path} is a directory")
    if not os.path.exists(path):
        dangling = " (a symbolic link whose target does not exist)" if os.path.lexists(path) else ""
        raise UserError(f"config file not found: {path}{dangling}")
    if not os.path.isfile(path):
        raise UserError(f"config file {path} is not a regular file")
    return [path]


def typed_options(argv: Sequence[str]) -> frozenset[str]:
    """The destinations of the long options given on the command line itself (not by the environment
    or a config file): where two options choose the same thing, the one typed beats the file's."""
    typed = set()
    for arg in options_of(argv):
        if arg.startswith("--"):
            typed.add(arg[2:].partition("=")[0].replace("-", "_"))
    return frozenset(typed)


def unset(args, dest: str) -> None:
    """Option ``dest`` as if nothing had given it (a flag off, a value None)."""
    setattr(args, dest, False if isinstance(getattr(args, dest, None), bool) else None)


def prefer_typed(args, typed: frozenset[str], one: tuple[str, ...], other: tuple[str, ...]) -> None:
    """Where options of ``one`` and of ``other`` exclude each other and only one side was typed on the
    command line, the other side's values (from the environment or a config file) are dropped."""
    for kept, dropped in ((one, other), (other, one)):
        if typed.intersection(kept) and not typed.intersection(dropped):
            for dest in dropped:
                unset(args, dest)


def new_parser(config_files: list[str], **kwargs) -> configargparse.ArgumentParser:
    """The top-level parser, before any commands are added."""
    # No abbreviations: --conf would be taken for --config by the parser but not by config_files_from,
    # and a resume command repeats the options by their full names.
    parser = _Parser(
        prog="relinker",
        default_config_files=config_files,
        ignore_unknown_config_file_keys=True,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
        **kwargs,
    )
    for flags, options, env_var in GLOBAL_OPTIONS:
        parser.add_argument(*flags, env_var=env_var, **options)
    return parser


def add_command(subparsers, name: str, config_files: list[str], **kwargs) -> configargparse.ArgumentParser:
    """Add a command parser that also accepts the global options."""
    command = subparsers.add_parser(
        name,
        default_config_files=config_files,
        ignore_unknown_config_file_keys=True,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
        **kwargs,
    )
    group = command.add_argument_group("global options (also accepted before the command)")
    for flags, options, _env_var in GLOBAL_OPTIONS:
        action = group.add_argument(*flags, default=argparse.SUPPRESS, **options)
        action.relinker_global = True
    return command


#: Beyond this, more verbosity says nothing more; ConfigArgParse would expand
#: RELINKER_VERBOSE (or a config file's verbose) into that many -v flags, in a
#: time that grows with its square (a million: hours).
MAX_VERBOSITY = 10


def check_verbosity(value: str | None, where: str) -> None:
    """UserError for a verbosity setting above MAX_VERBOSITY (one that is no number, parse() refuses)."""
    try:
        level = int(value)
    except (TypeError, ValueError):
        return
    if level > MAX_VERBOSITY:
        raise UserError(f"{where} must be at most {MAX_VERBOSITY}, not {level}")


def check_config_keys(parser: configargparse.ArgumentParser, config_files: list[str]) -> None:
    """UserError for a config-file key that no command knows: a misspelt ``db_url`` must not be ignored.

    Keys of other commands are fine (one file serves every command). A
    verbosity above MAX_VERBOSITY is refused too, before it is expanded.
    """
    known = {option.removeprefix("--") for option in _long_options(parser)}
    for path in config_files:
        try:
            with open(path, encoding="utf-8") as stream:
                lines = stream.read().split("\n")  # as iterating the file splits it
        except OSError as exc:
            raise UserError(f"config file {path}: {exc.strerror}") from None
        if lines[0].startswith("\ufeff"):
            # The file's parser would read its first key with the mark, and drop it as unknown.
            raise UserError(f"config file {path} begins with a byte-order mark: save it without one")
        keys = {}
        for number, line in enumerate(lines, 1):
            # Line by line, by the parser that reads the file: it keeps the last of a key given twice.
            try:
                items = parser._config_file_parser.parse([line])
            except configargparse.ConfigFileParserException:
                raise UserError(f"config file {path}: line {number} is not `key = value`: {line.strip()}") from None
            for written, value in items.items():
                key = written.removeprefix("--")  # the file's parser reads `--db-url x` as `db-url = x`
                if isinstance(value, list) and not _json_list(line):
                    # The parser takes `[*]` for a list of `*`: scan's literal-star pattern, excluding all.
                    raise UserError(f"config file {path}: line {number}: a value in brackets is a list, and "
                                    f"this one is no JSON list: {line.strip()} (write a list as JSON, "
                                    f'["a", "b"]; a pattern in brackets as a list of it, ["[*]"])')
                if key in keys:
                    raise UserError(f"config file {path}: {key!r} is given twice (lines {keys[key][0]} and "
                                    f"{number}): keep the one meant")
                keys[key] = number, value
        for key, (_, value) in keys.items():
            if key not in known:
                close = difflib.get_close_matches(key.replace("_", "-"), sorted(known), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise UserError(f"config file {path}: unknown key {key!r}{hint}")
            if key == "verbose":
                check_verbosity(value, f"config file {path}: verbose")


def refuse_abbreviations(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """UserError for an option given by the start of its name (``--conf``): argparse, told not to
    abbreviate, takes it for an unknown option and its value for the command, and says that instead."""
    args = options_of(argv)
    commands = next((action.choices for action in parser._actions
                     if isinstance(action, argparse._SubParsersAction)), {})
    command = next((commands[arg] for arg in args if arg in commands), None)
    # The command's options (the global ones among them) and the top level's: no other command's.
    known = set(_long_options(parser, into_commands=False))
    known |= set(_long_options(command if command is not None else parser))
    for arg in args:
        name = arg.partition("=")[0]
        if name.startswith("--") and name not in known:
            meant = sorted(option for option in known if option.startswith(name))
            if meant:
                raise UserError(f"{name}: options are never abbreviated (did you mean {' or '.join(meant)}?)")


def _json_list(line: str) -> bool:
    """Whether the bracketed value of a config line is a JSON list (the parser splits any other at commas)."""
    try:
        return isinstance(json.loads(line[line.index("["):line.rindex("]") + 1]), list)
    except ValueError:
        return False


def _long_options(parser: argparse.ArgumentParser, into_commands: bool = True):
    for action in parser._actions:
        yield from (option for option in action.option_strings if option.startswith("--"))
        if into_commands and isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                yield from _long_options(command)


def new_subparsers(parser: configargparse.ArgumentParser):
    """The commands of ``parser``, each a parser that reads its options' defaults from the config files too."""
    return parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_CommandParser)
