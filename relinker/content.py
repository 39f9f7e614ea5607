"""Reading file content: BLAKE3 digests of open files, and copies made while hashing.

Content is read in 1 MiB chunks into one buffer per process, reused for every
file, so that neither hashing nor copying allocates per chunk. One thread
per file: BLAKE3's threads only pay off hashing from a memory map, and a
mapped file that cannot be read kills its reader with SIGBUS, where a
verifier must report it (benchmarks/README.md has the figures).

A large copy goes to its target with direct I/O (``O_DIRECT``, from a
page-aligned buffer) where the filesystem allows it: written through the
page cache, gigabytes of new content make the kernel throttle the writer
until its dirty pages are written back, and the copy runs at a fraction of
the disk's speed.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
from typing import Callable

import blake3

#: Bytes per read: large enough that system calls cost little against the copying.
CHUNK = 1 << 20

#: Bytes per read and write of a direct copy.
DIRECT_CHUNK = 4 << 20
#: Direct writes must be whole blocks: a chunk of another length (the file's
#: tail) is written through the page cache.
DIRECT_ALIGNMENT = 4096

_buffer = bytearray(CHUNK)
_view = memoryview(_buffer)
_direct_buffer: mmap.mmap | None = None  # page-aligned, as direct I/O needs; made on first use


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


def read_small(fd: int, size: int) -> tuple[str, memoryview] | None:
    """Read ``fd``'s content of ``size`` bytes into this process's buffer; its BLAKE3 hex digest and the bytes.

    Reading stops at the end, or once ``size`` bytes (more than none) are
    in: the caller compares the file's size and mtime afterwards, so a
    content that grows after the read is noticed without one more read.
    None when it is ``CHUNK`` bytes or more: what was read is then lost,
    and the caller knows the content is larger than it was told. The bytes
    stay valid until the next call of this module. A failed read raises
    :class:`SourceReadError`.
    """
    got = 0
    while got < CHUNK:
        try:
            n = os.readv(fd, [_view[got:]])
        except OSError as exc:
            raise SourceReadError(exc) from None
        got += n
        if not n or got == size:
            return blake3.blake3(_view[:got]).hexdigest(), _view[:got]
    return None


def write_all(fd: int, data: memoryview) -> None:
    """Write all of ``data`` to ``fd`` (an OSError stops it)."""
    written = 0
    while written < len(data):
        written += os.write(fd, data[written:])


def copy_hashing(source_fd: int, target_fd: int, on_chunk: Callable[[], None] | None = None) -> tuple[str, int]:
    """Copy what ``source_fd`` reads to ``target_fd``; return its BLAKE3 hex digest and size.

    A target opened with ``O_DIRECT`` is written in whole blocks from an
    aligned buffer, its tail through the page cache. A failed read raises
    :class:`SourceReadError`; a failed write raises its OSError. ``on_chunk``
    as for :func:`hash_fd`.
    """
    global _direct_buffer
    direct = bool(fcntl.fcntl(target_fd, fcntl.F_GETFL) & os.O_DIRECT)
    if direct:
        if _direct_buffer is None:
            _direct_buffer = mmap.mmap(-1, DIRECT_CHUNK)
        buffer, view = _direct_buffer, memoryview(_direct_buffer)
    else:
        buffer, view = _buffer, _view
    hasher = blake3.blake3()
    size = 0
    try:
        while True:
            try:
                n = os.readv(source_fd, [buffer])
            except OSError as exc:
                raise SourceReadError(exc) from None
            if not n:
                return hasher.hexdigest(), size
            hasher.update(view[:n])
            if direct and n % DIRECT_ALIGNMENT:
                direct = _buffered(target_fd)
            written = 0
            while written < n:
                try:
                    written += os.write(target_fd, view[written:n])
                except OSError as exc:
                    if not (direct and exc.errno == errno.EINVAL):
                        raise
                    direct = _buffered(target_fd)  # a device whose blocks are larger than ours
            size += n
            if on_chunk is not None:
                on_chunk()
    finally:
        if view is not _view:
            view.release()


def _buffered(fd: int) -> bool:
    """Write ``fd`` through the page cache from now on; False."""
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
    return False
