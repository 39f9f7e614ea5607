"""Lists of blob IDs (``--from-file``, ``verify --failed-ids``): one ID per line, ``#`` comments."""

from __future__ import annotations

import errno
import hashlib
import io
import sys
from typing import Iterable, Iterator

from relinker.errors import UserError


def read_blob_ids(source: Iterable[str]) -> list[str]:
    """Blob IDs listed one per line (blank lines and # comments ignored)."""
    ids = []
    for line in source:
        # A NUL is no character PostgreSQL's text takes: U+FFFD, as for bytes that are not UTF-8.
        line = line.split("#", 1)[0].strip().replace("\0", "\ufffd")
        if line:
            ids.append(line.lower())
    return ids


#: The longest line a list may have: an ID (64 hex digits) with room for a comment. A longer one is
#: no list (a disk image, /dev/zero), read whole into memory otherwise.
MAX_LINE = 4096


def blob_ids_from(file_argument: str) -> list[str]:
    """IDs from ``--from-file FILE`` (``-`` for stdin); UserError for a line longer than MAX_LINE."""
    if file_argument == "-":
        if sys.stdin is None:  # started with stdin closed (<&-)
            raise OSError(errno.EBADF, "standard input is closed")
        # Bytes that are not UTF-8 read as U+FFFD, as from a file: such a
        # line is an unknown blob, never a string the database cannot take.
        return read_blob_ids(_lines(io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8-sig", errors="replace"),
                                    file_argument))
    with open(file_argument, encoding="utf-8-sig", errors="replace") as f:  # an editor's byte-order mark
        return read_blob_ids(_lines(f, file_argument))


def _lines(stream, name: str) -> Iterator[str]:
    number = 0
    while line := stream.readline(MAX_LINE + 1):
        number += 1
        if len(line) > MAX_LINE and not line.endswith("\n"):
            raise UserError(f"--from-file {name}: line {number} is longer than {MAX_LINE} characters: "
                            "not a list of blob IDs")
        yield line


def listing_fingerprint(blobids: list[str]) -> str:
    """What a run planned from a list keeps of it: enough to tell the same list again on a resume."""
    distinct = sorted(set(blobids))
    return f"{len(distinct)} blobs, sha256 {hashlib.sha256(chr(10).join(distinct).encode()).hexdigest()[:16]}"
