"""The linker's per-path loop and by-hash lstat: C from relinker._speedups, or their Python twins.

The twins are the contract: the same outcomes, the same arguments refused in
the same order (tests/test_speedups*.py run both). ``RELINKER_PURE_PYTHON``
takes the twins whatever is built; ``RELINKER_NO_DIRECTORY_LISTINGS`` turns
the C route's directory listings off.
"""

from __future__ import annotations

import os
import sys

#: No entry in the directory cache (None is a value like any other not an int, as for the C route).
_NOT_CACHED = object()


def _fast_route_python(paths, start: int, directories: dict[bytes, int], source_fd: int | None, source: bytes,
                       dev: int, ino: int, expect_present: bool, listings=None, verified: set[bytes] | None = None,
                       root_fd: int | None = None) -> tuple[int, int, int]:
    """Link (or, with ``expect_present``, check) ``paths[start:]`` until one needs the general route.

    Returns ``(created, present, stop)``: ``stop`` is the index of the first
    path not handled, ``len(paths)`` when all were. A path is handled when
    its parent is cached and the one system call succeeds: ``linkat`` of
    ``source`` (relative to ``source_fd``), or an ``fstatat`` that finds the
    inode ``(dev, ino)``. relinker._speedups holds the same function in C.

    ``directories`` is keyed as ``stored.rpartition(b"/")`` spells a parent
    (:func:`_directory_key`): ``b"/"`` and a directory opened component by
    component (no '..', no symlink, no empty or '.' component), or ``b""``
    for the root. A parent found there with a descriptor (not _MISSING) and
    a last component that is a plain name make a path that is safe as it
    stands. Anything else ('//', a relative path with a directory, a
    trailing '/') is not found; a one-component relative path ('f') names an
    entry of the root, as on the general route. A NUL byte in the name makes
    the system call raise ValueError.

    A check (``expect_present``) below a directory that is not cached but
    whose key is in ``verified`` (directories walked safely before) is one
    ``fstatat`` by the path from ``root_fd``, as the general route does
    (``ArchiveLinker._stat_verified``): on archives with more directories
    than descriptors, most checks.

    ``listings`` (a ``relinker._speedups.DirectoryListings``, or None) lets
    the C route settle a check from a directory it has read once instead of
    by one ``fstatat`` per path: the same outcomes, fewer system calls. This
    twin has no such cache and ignores it.

    Both twins refuse the same arguments, in the same order: ``paths`` an
    exact list or tuple of bytes (TypeError at the first that is not),
    ``start`` not negative (one beyond the end is the end), ``directories``
    an exact dict, descriptors None or an int up to INT_MAX, ``dev`` and
    ``ino`` from 0 to 2**64 - 1, no NUL in ``source``. Code that a lookup
    runs (a key that is not exactly bytes) may change ``paths``: both read
    it afresh at each step, so ``stop`` is at most its length at the end.
    """
    # Each check is a cheap test of the usual case first (this runs once per
    # inode); the helpers sort out subclasses and say what is wrong.
    if type(paths) is not list and type(paths) is not tuple:
        raise TypeError(f"paths must be a list or a tuple, not {type(paths).__name__}")
    if type(start) is not int or start < 0:
        _check_start(start)
    if type(directories) is not dict:
        raise TypeError("directories must be a dict")
    if source_fd is not None and (type(source_fd) is not int or not 0 <= source_fd <= _FD_MAX):
        _check_descriptor(source_fd, "source_fd")
    if type(source) is not bytes:
        source = _as_bytes(source, "source")
    if type(dev) is not int or not 0 <= dev <= _U64_MAX:
        _check_unsigned(dev, "dev")
    if type(ino) is not int or not 0 <= ino <= _U64_MAX:
        _check_unsigned(ino, "ino")
    expect_present = True if expect_present else False
    if 0 in source:  # (an int: one memchr, cheaper than a substring search for b"\0")
        raise ValueError("embedded null byte")
    if listings is not None:
        c_route = sys.modules.get("relinker._speedups")  # a DirectoryListings exists only once it is imported
        if c_route is None or not isinstance(listings, c_route.DirectoryListings):
            raise TypeError("listings must be a DirectoryListings or None")
    if verified is not None and type(verified) is not set and type(verified) is not frozenset:
        raise TypeError("verified must be a set or None")
    if root_fd is not None and (type(root_fd) is not int or not 0 <= root_fd <= _FD_MAX):
        _check_descriptor(root_fd, "root_fd")
    if verified is not None and root_fd is None:
        raise ValueError("verified needs root_fd")
    created = present = 0
    stat, make_link = os.stat, os.link
    index, count = start, len(paths)
    # A for loop over a range is the cheap one; code run by a lookup may
    # shorten the list (IndexError) or lengthen it (the while loop goes on).
    while index < count:
        for index in range(index, count):
            try:
                stored = paths[index]
            except IndexError:
                return created, present, len(paths)
            if type(stored) is not bytes:
                stored = _as_bytes(stored, "paths")
            parent, _, name = stored.rpartition(b"/")
            if not name or name == b"." or name == b"..":
                return created, present, index
            dir_fd = directories.get(parent, _NOT_CACHED)
            if (dir_fd is _NOT_CACHED and expect_present and verified is not None and parent[:1] == b"/"
                    and parent in verified):
                # by the path from the root, as ArchiveLinker._stat_verified does
                dir_fd, name = root_fd, stored[1:]
            elif type(dir_fd) is not int or dir_fd < 0:
                # as the C route: only an exact int is a descriptor (anything else could run code)
                return created, present, index
            try:
                if expect_present:
                    found = stat(name, dir_fd=dir_fd, follow_symlinks=False)
                    if found.st_ino != ino or found.st_dev != dev:
                        return created, present, index
                    present += 1
                else:
                    make_link(source, name, src_dir_fd=source_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
                    created += 1
            except (OSError, ValueError, OverflowError):  # OverflowError: a descriptor beyond INT_MAX
                return created, present, index
        index, count = count, len(paths)
    return created, present, len(paths)


def _lstat_identity_python(path: bytes, dir_fd: int | None) -> tuple[int, int, int]:
    """``(st_dev, st_ino, st_mode)`` of ``path`` (relative to ``dir_fd``), no symlink followed.

    Refuses what the C twin refuses: a path that is not bytes, a NUL in it, a
    descriptor that is not None or an int up to INT_MAX.
    """
    path = _as_bytes(path, "path")
    if 0 in path:
        raise ValueError("embedded null byte")
    _check_descriptor(dir_fd, "dir_fd")
    found = os.stat(path, dir_fd=dir_fd, follow_symlinks=False)
    return found.st_dev, found.st_ino, found.st_mode


#: The largest descriptor number (a C int), and the largest st_dev or st_ino.
_FD_MAX = 2**31 - 1
_U64_MAX = 2**64 - 1


def _as_bytes(value, what: str) -> bytes:
    """A bytes argument as the C route reads it: its bytes, whatever a subclass's methods would say."""
    if type(value) is bytes:
        return value
    if not isinstance(value, bytes):
        raise TypeError(f"{what} must be bytes, not {type(value).__name__}")
    return bytes.__getitem__(value, slice(None))  # an exact copy; runs none of the subclass's code


def _check_start(start) -> None:
    """A start index as both twins take it: an int, not negative."""
    if not isinstance(start, int):
        raise TypeError(f"start must be an int, not {type(start).__name__}")
    if start < 0:
        raise ValueError("start must not be negative")


def _check_descriptor(fd, what: str) -> None:
    """A descriptor argument as both twins take it: None, or an int from 0 to INT_MAX."""
    if fd is None:
        return
    if not isinstance(fd, int):
        raise TypeError(f"{what} must be an int or None, not {type(fd).__name__}")
    if not 0 <= fd <= _FD_MAX:
        raise ValueError(f"{what}: not a file descriptor")


def _check_unsigned(value, what: str) -> None:
    """An st_dev or st_ino argument as both twins take it: an int from 0 to 2**64 - 1."""
    if not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if not 0 <= value <= _U64_MAX:
        raise ValueError(f"{what} must be from 0 to 2**64 - 1")


# What a RangeWalker's step() hands back (see relinker._speedups); no walker, no events.
EVENT_SOURCE = EVENT_PATH = None
#: The C extension was not built (no compiler at install time): the runs say so (see jobs.run_job).
NOT_BUILT = False
if os.environ.get("RELINKER_PURE_PYTHON"):
    fast_route, lstat_identity, DirectoryListings, RangeWalker = _fast_route_python, _lstat_identity_python, None, None
else:
    try:
        from relinker._speedups import (EVENT_PATH, EVENT_SOURCE, DirectoryListings, RangeWalker, fast_route,
                                        lstat_identity)
    except ImportError:  # built without a compiler: same behaviour, slower
        fast_route, lstat_identity, DirectoryListings = _fast_route_python, _lstat_identity_python, None
        RangeWalker = None
        NOT_BUILT = True
    # The benchmark's baseline for the listings, and a way out should a
    # filesystem ever report entries' inode numbers unlike stat().
    if os.environ.get("RELINKER_NO_DIRECTORY_LISTINGS"):
        DirectoryListings = None
