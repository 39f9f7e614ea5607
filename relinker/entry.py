"""The ``relinker`` command's entry point: SIGINT and SIGTERM mean exit 3 from its first moment.

Importing the command's modules (psycopg among them) takes a few tenths of a
second; a signal meanwhile would otherwise end in a traceback, or, in a
script's background job (which inherits SIGINT ignored), do nothing at all.
"""

import signal
import sys
import threading

from relinker.errors import EXIT_INTERRUPTED, StopSignal, interrupt


def main() -> int:
    """Run the command line in ``sys.argv``; returns the exit code."""
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, interrupt)
    try:
        from relinker.cli import main as run_command

        return run_command(sys.argv[1:])
    except (KeyboardInterrupt, StopSignal):
        from relinker.logs import say

        say("relinker: interrupted")
        return EXIT_INTERRUPTED
