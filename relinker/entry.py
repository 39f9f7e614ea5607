"""The ``relinker`` command's entry point: the stop signals mean exit 3 from its first moment.

Importing the command's modules (psycopg among them) takes a few tenths of a
second; a signal meanwhile would otherwise end in a traceback, or, in a
script's background job (which inherits SIGINT ignored), do nothing at all.
"""

import sys

from relinker.errors import EXIT_INTERRUPTED, StopSignal, stop_on_signals


def main() -> int:
    """Run the command line in ``sys.argv``; returns the exit code."""
    stop_on_signals()
    try:
        from relinker.cli import main as run_command

        return run_command(sys.argv[1:])
    except (KeyboardInterrupt, StopSignal):
        from relinker.logs import say

        say("relinker: interrupted")
        return EXIT_INTERRUPTED
