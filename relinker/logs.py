"""Where relinker's log lines go: stderr (and a file), timestamped, in every process."""

from __future__ import annotations

import logging
import os
import sys

from relinker.errors import UserError


def say(text: str) -> None:
    """A line on stderr. One that cannot be written (a full disk, its reader gone with the same
    Ctrl-C) is dropped, and stderr becomes /dev/null: the flush at exit must not fail again (exit 120)."""
    if sys.stderr is None:
        return
    try:
        print(text, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        silence(2)
    except RuntimeError:
        # A signal handler's line while the main thread is blocked writing to stderr (a full pipe):
        # its buffered writer is taken; past it, straight to the descriptor.
        try:
            os.write(2, (text + "\n").encode("utf-8", "backslashreplace"))
        except OSError:
            pass


def in_log_file(text: str) -> None:
    """Write ``text`` to the ``--log-file`` alone (whatever the verbosity): how a command ended, for
    the operator who watches the log rather than the terminal."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, _LogFile):
            handler.handle(logging.LogRecord("relinker", logging.INFO, __file__, 0, text, None, None))


def say_and_log(text: str) -> None:
    """:func:`say`, and the same line in the ``--log-file``."""
    say(text)
    in_log_file(text)


def emit(text: str, *, log: bool = False) -> None:
    """Print a line of output; output that cannot be written (a reader gone, ``| head``; a full disk)
    changes nothing of the exit code. ``log``: the ``--log-file`` gets it too (how a command ended)."""
    if log:
        in_log_file(text)
    try:
        print(text, flush=True)
    except OSError as exc:
        # Whatever is printed after, and the flush at exit, go nowhere instead of failing again.
        silence(1)
        if not isinstance(exc, BrokenPipeError):
            say(f"relinker: cannot write the output: {exc.strerror}")


def silence(fd: int) -> None:
    """Point a standard descriptor that cannot be written at /dev/null (what was buffered goes there)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


class _LogFile(logging.FileHandler):
    """The ``--log-file``: a line it cannot take (a full disk) is dropped, said once per process on stderr."""

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        if not self.failed:
            self.failed = True
            say(f"relinker: cannot write the log file {self.baseFilename} ({sys.exc_info()[1]}): "
                "its lines are dropped")


def setup_logging(verbose: int, log_file: str | None) -> None:
    """Timestamped log lines on stderr (warnings by default) and optionally a file."""
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    # A line stderr cannot take is dropped (say() has made it /dev/null): never a traceback in its place.
    logging.raiseExceptions = False
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        try:
            handlers.append(_LogFile(log_file))
        except OSError as exc:
            raise UserError(f"cannot write the log file {log_file}: {exc.strerror}") from None
    logging.basicConfig(
        level=level, handlers=handlers, force=True,
        format="%(asctime)s %(levelname)s %(processName)s %(message)s",
    )
    # psycopg's own warnings are errors ignored while it cleans up after one relinker reports in its
    # line ("error ignored terminating <psycopg.Copy [BAD] at 0x...>"): for debugging only.
    logging.getLogger("psycopg").setLevel(logging.DEBUG if verbose >= 2 else logging.ERROR)
