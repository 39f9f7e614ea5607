"""Reading file content: BLAKE3 digests of open files, and copies made while hashing.

Content is read in large chunks into one buffer per process, reused for
every file, so that neither hashing nor copying allocates per chunk. Files
of at least ``THREADED_SIZE`` are hashed on every core (BLAKE3's own
threads): a worker that meets a few large files alone still uses the
machine.
"""

from __future__ import annotations

import os
from typing import Callable

import blake3

#: Bytes per read: large enough that system calls cost little against the copying.
CHUNK = 1 << 20
#: From this size on a file is hashed by BLAKE3's threads, in chunks this large.
THREADED_SIZE = 16 << 20
THREADED_CHUNK = 16 << 20

_buffers: dict[int, bytearray] = {}


class SourceReadError(Exception):
    """Reading the source failed (``error``: the OSError); writing problems stay OSErrors."""

    def __init__(self, error: OSError):
        super().__init__(error.strerror)
        self.error = error


def _buffer(size: int) -> tuple[bytearray, memoryview]:
    buffer = _buffers.get(size)
    if buffer is None:
        buffer = _buffers[size] = bytearray(size)
    return buffer, memoryview(buffer)


def _hasher(size_hint: int | None):
    if size_hint is not None and size_hint >= THREADED_SIZE:
        return blake3.blake3(max_threads=blake3.blake3.AUTO), THREADED_CHUNK
    return blake3.blake3(), CHUNK


def hash_fd(fd: int, on_chunk: Callable[[], None] | None = None, size_hint: int | None = None) -> tuple[str, int]:
    """The BLAKE3 hex digest and the size of what ``fd`` reads from its offset to its end.

    ``on_chunk`` runs after every chunk (a long file keeps a range's
    heartbeat going); whatever it raises stops the read. ``size_hint``: the
    expected size, which picks the way of hashing.
    """
    hasher, chunk = _hasher(size_hint)
    buffer, view = _buffer(chunk)
    size = 0
    while True:
        n = os.readv(fd, [buffer])
        if not n:
            return hasher.hexdigest(), size
        hasher.update(view[:n])
        size += n
        if on_chunk is not None:
            on_chunk()


def copy_hashing(source_fd: int, target_fd: int, on_chunk: Callable[[], None] | None = None,
                 size_hint: int | None = None) -> tuple[str, int]:
    """Copy what ``source_fd`` reads to ``target_fd``; return its BLAKE3 hex digest and size.

    A failed read raises :class:`SourceReadError`; a failed write raises its
    OSError. ``on_chunk`` and ``size_hint`` as for :func:`hash_fd`.
    """
    hasher, chunk = _hasher(size_hint)
    buffer, view = _buffer(chunk)
    size = 0
    while True:
        try:
            n = os.readv(source_fd, [buffer])
        except OSError as exc:
            raise SourceReadError(exc) from None
        if not n:
            return hasher.hexdigest(), size
        hasher.update(view[:n])
        written = 0
        while written < n:
            written += os.write(target_fd, view[written:n])
        size += n
        if on_chunk is not None:
            on_chunk()
