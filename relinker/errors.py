"""Exit codes and the exceptions that map onto them.

Every error a user can cause ends in one line on stderr and one of these exit
codes, never a traceback (see README "Exit codes").
"""

import errno
import signal
import threading

EXIT_OK = 0
#: The run completed, but problems were recorded (or verify found failures).
EXIT_PROBLEMS = 1
#: Usage, configuration or preflight error; nothing was done.
EXIT_USAGE = 2
#: Interrupted by SIGINT, SIGTERM or SIGHUP; the run can be resumed.
EXIT_INTERRUPTED = 3

#: errno values that say this process (or the system) is out of a resource, not that a path is wrong:
#: the range that meets one fails and is redone. Recorded against each path, every path would fail.
OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM})


def unless_out_of_resources(exc: OSError) -> None:
    """Raise ``exc`` if it says this process is out of a resource: the range's trouble, no path's."""
    if exc.errno in OUT_OF_RESOURCES:
        raise exc


class StopSignal(SystemExit):
    """A stop signal (SIGINT, SIGTERM, SIGHUP) arrived while a command ran: it stops where it is (exit 3).

    Not KeyboardInterrupt: one that passed through code run by exec (a
    dataclass being made) makes ``python -m`` kill itself with SIGINT at
    exit, whatever caught it. A SystemExit, so that psycopg cancels a query
    it interrupts, as it does for KeyboardInterrupt.
    """

    def __init__(self):
        super().__init__(EXIT_INTERRUPTED)


#: Set once the command's outcome is decided and being told (see outcome_told).
_outcome_told = False


def interrupt(signum, frame) -> None:
    """The handler of the stop signals while a command runs: stop where it is (exit 3), unless its
    outcome is being told already."""
    if not _outcome_told:
        raise StopSignal()


class HeldStopSignals:
    """While it lasts, the stop signals are only noted; ``release()`` afterwards raises StopSignal if one
    came. For a step that must not be cut short: a server being started, whose process a signal
    landing there would leave running without a handle on it to stop. Main thread only."""

    def __enter__(self) -> "HeldStopSignals":
        self.received: list[int] = []
        self._previous = {} if threading.current_thread() is not threading.main_thread() else {
            signum: signal.signal(signum, lambda signum, frame: self.received.append(signum))
            for signum in stop_signals()}
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def release(self) -> None:
        """Raise StopSignal if a stop signal came while the signals were held."""
        if self.received:
            raise StopSignal()


def outcome_told() -> None:
    """The command's outcome is decided and being told: a stop signal from now on changes nothing (a
    summary that says "complete" is never followed by "interrupted")."""
    global _outcome_told
    _outcome_told = True


def stop_signals() -> set[int]:
    """The signals that stop a command (exit 3): SIGINT, SIGTERM, and SIGHUP (its terminal or ssh session
    gone) unless the process was started ignoring it, as ``nohup`` starts it."""
    signals = {signal.SIGINT, signal.SIGTERM}
    if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:
        signals.add(signal.SIGHUP)
    return signals


def stop_on_signals() -> dict:
    """Make the stop signals raise StopSignal (SIGINT too where it was inherited ignored, as a script's
    background job has it); the handlers they had, to put back. Signals are the main thread's only."""
    global _outcome_told
    if threading.current_thread() is not threading.main_thread():
        return {}
    _outcome_told = False
    return {signum: signal.signal(signum, interrupt) for signum in stop_signals()}


def ignore_stop_signals() -> None:
    """Ignore the stop signals from now on (the command's outcome is decided). Main thread only."""
    if threading.current_thread() is threading.main_thread():
        for signum in stop_signals():
            signal.signal(signum, signal.SIG_IGN)


class UserError(Exception):
    """Something the user can fix: bad DSN, missing root, unmigrated catalogue.

    The CLI prints the message as one line and exits with ``exit_code``.
    """

    exit_code = EXIT_USAGE


class RunStopped(UserError):
    """A run that could not go on (its database out of reach): not complete, and resumable."""

    exit_code = EXIT_PROBLEMS

    def __init__(self, message: str, *, run_id: int, mode: str, exit_code: int = EXIT_PROBLEMS):
        super().__init__(message)
        self.run_id = run_id
        self.mode = mode
        self.exit_code = exit_code
