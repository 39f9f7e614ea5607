"""Reading file content: BLAKE3 digests of open files, and copies made while hashing.

Content is read in 1 MiB chunks into one buffer per process, reused for every
file, so that neither hashing nor copying allocates per chunk. One thread
per file: BLAKE3's threads only pay off hashing from a memory map, and a
mapped file that cannot be read kills its reader with SIGBUS, where a
verifier must report it (benchmarks/README.md has the figures).
"""

from __future__ import annotations

import os
from typing import Callable

import blake3

#: Bytes per read: large enough that system calls cost little against the copying.
CHUNK = 1 << 20

_buffer = bytearray(CHUNK)
_view = memoryview(_buffer)


class SourceReadError(Exception):
    """Reading the source failed (``error``: the OSError); writing problems stay OSErrors."""

    def __init__(self, error: OSError):
        super().__init__(error.strerror)
        self.error = error


def hash_fd(fd: int, on_chunk: Callable[[], None] | None = None) -> tuple[str, int]:
    """The BLAKE3 hex digest and the size of what ``fd`` reads from its offset to its end.

    ``on_chunk`` runs after every chunk (a long file keeps a range's
    heartbeat going); whatever it raises stops the read.
    """
    hasher = blake3.blake3()
    size = 0
    while True:
        n = os.readv(fd, [_buffer])
        if not n:
            return hasher.hexdigest(), size
        hasher.update(_view[:n])
        size += n
        if on_chunk is not None:
            on_chunk()


def copy_hashing(source_fd: int, target_fd: int, on_chunk: Callable[[], None] | None = None) -> tuple[str, int]:
    """Copy what ``source_fd`` reads to ``target_fd``; return its BLAKE3 hex digest and size.

    A failed read raises :class:`SourceReadError`; a failed write raises its OSError.
    ``on_chunk`` as for :func:`hash_fd`.
    """
    hasher = blake3.blake3()
    size = 0
    while True:
        try:
            n = os.readv(source_fd, [_buffer])
        except OSError as exc:
            raise SourceReadError(exc) from None
        if not n:
            return hasher.hexdigest(), size
        hasher.update(_view[:n])
        written = 0
        while written < n:
            written += os.write(target_fd, _view[written:n])
        size += n
        if on_chunk is not None:
            on_chunk()
