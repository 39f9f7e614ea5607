"""The ``relinker`` command's entry point: the stop signals mean exit 3 from its first moment to its outcome.

Importing the command's modules (psycopg among them) takes a few tenths of a
second; a signal meanwhile would otherwise end in a traceback, or, in a
script's background job (which inherits SIGINT ignored), do nothing at all.
Once the command's outcome is decided and told, the stop signals are
ignored: Python puts their default actions back as it shuts down, and a
signal then killed the process (exit 130, 143 or 129, after a summary that
said "complete").
"""

import sys

from relinker.errors import EXIT_INTERRUPTED, StopSignal, ignore_stop_signals, stop_on_signals


def main() -> int:
    """Run the command line in ``sys.argv``; returns the exit code."""
    stop_on_signals()
    try:
        try:
            from relinker.cli import main as run_command

            return run_command(sys.argv[1:])
        finally:
            ignore_stop_signals()
    except (KeyboardInterrupt, StopSignal):
        from relinker.logs import say

        say("relinker: interrupted")
        return EXIT_INTERRUPTED
