"""Pure path logic: where a blob and a catalogued path live on disk.

Everything here works on bytes and never touches the filesystem, so it can be
tested exhaustively without one. ``display`` is the only place a path becomes
text, and only for humans.
"""

from __future__ import annotations

import re

BLOBID = re.compile(r"[0-9a-f]{64}")


class UnsafePath(ValueError):
    """A catalogued path that must not be turned into a filesystem operation."""


_CONTROL_ESCAPES = {code: f"\\x{code:02x}" for code in [*range(32), 127]}


def display(path: bytes) -> str:
    """A printable, one-line rendering of a bytes path, for messages only.

    Invalid UTF-8 and control bytes (``Icon\\r``) appear as ``\\xNN``.
    """
    return path.decode("utf-8", "backslashreplace").translate(_CONTROL_ESCAPES)


def is_blobid(blobid: str) -> bool:
    """True for a well-formed blob ID: lowercase hex BLAKE3-256."""
    return BLOBID.fullmatch(blobid) is not None


def by_hash_relpath(blobid: str) -> bytes:
    """``ab/cd/abcd…``: where a blob lives below the by-hash root.

    Callers must check :func:`is_blobid` first; a malformed ID could otherwise
    name a path outside the store.
    """
    hexid = blobid.encode("ascii")
    return b"%s/%s/%s" % (hexid[0:2], hexid[2:4], hexid)


def by_hash_path(root: bytes, blobid: str) -> bytes:
    """Absolute path of a blob's by-hash file."""
    return root.rstrip(b"/") + b"/" + by_hash_relpath(blobid)


def archive_components(stored: bytes) -> list[bytes]:
    """Split a catalogued path into the components of its archive path.

    The archive path is the stored path below the archive root, leading '/'
    removed. Empty and '.' components collapse exactly as the kernel would
    collapse them. Raises :class:`UnsafePath` for anything that could leave
    the root or that the kernel cannot name: '..', NUL bytes, nothing left.
    """
    if not stored:
        raise UnsafePath("empty path")
    if b"\0" in stored:
        raise UnsafePath("NUL byte in path")
    components = [c for c in stored.split(b"/") if c and c != b"."]
    if b".." in components:
        raise UnsafePath("'..' component")
    if not components:
        raise UnsafePath("path names no file")
    return components
