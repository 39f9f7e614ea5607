"""Where relinker's log lines go: stderr (and a file), timestamped, in every process."""

from __future__ import annotations

import logging
import sys

from relinker.errors import UserError


def setup_logging(verbose: int, log_file: str | None) -> None:
    """Timestamped log lines on stderr (warnings by default) and optionally a file."""
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        try:
            handlers.append(logging.FileHandler(log_file))
        except OSError as exc:
            raise UserError(f"cannot write the log file {log_file}: {exc.strerror}") from None
    logging.basicConfig(
        level=level, handlers=handlers, force=True,
        format="%(asctime)s %(levelname)s %(processName)s %(message)s",
    )
