"""Reading file content: BLAKE3 digests of open files, read in large chunks into one reused buffer."""

from __future__ import annotations

import os
from typing import Callable

import blake3

#: Bytes per read: large enough that system calls cost little against the copying.
CHUNK = 1 << 20


def hash_fd(fd: int, on_chunk: Callable[[], None] | None = None) -> tuple[str, int]:
    """The BLAKE3 hex digest and the size of what ``fd`` reads from its offset to its end.

    ``on_chunk`` runs after every chunk (a long file keeps a range's
    heartbeat going); whatever it raises stops the read.
    """
    hasher = blake3.blake3()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    size = 0
    while True:
        n = os.readv(fd, [buffer])
        if not n:
            return hasher.hexdigest(), size
        hasher.update(view[:n])
        size += n
        if on_chunk is not None:
            on_chunk()
