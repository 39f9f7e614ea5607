"""Pure path logic: where a blob and a catalogued path live on disk.

Everything here works on bytes and never touches the filesystem, so it can be
tested exhaustively without one. ``display`` is the only place a path becomes
text, and only for humans.
"""

from __future__ import annotations

import os
import re

BLOBID = re.compile(r"[0-9a-f]{64}")
#: The mode of every directory relinker makes, in the store and in the archive, whatever the umask.
DIRECTORY_MODE = 0o755


class UnsafePath(ValueError):
    """A catalogued path that must not be turned into a filesystem operation."""


_CONTROL_ESCAPES = {code: f"\\x{code:02x}" for code in [*range(32), 127]}


def display(path: bytes) -> str:
    """A printable, one-line rendering of a bytes path, for messages only.

    Invalid UTF-8 and control bytes (``Icon\\r``) appear as ``\\xNN``, a
    backslash as two: no two paths look alike (a JSON reader can tell the
    byte 0xff from the four characters ``\\xff``).
    """
    return path.replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace").translate(_CONTROL_ESCAPES)


def is_blobid(blobid: str) -> bool:
    """True for a well-formed blob ID: lowercase hex BLAKE3-256."""
    return BLOBID.fullmatch(blobid) is not None


def by_hash_relpath(blobid: str) -> bytes:
    """``ab/cd/abcd…``: where a blob lives below the by-hash root.

    Callers must check :func:`is_blobid` first; a malformed ID could otherwise
    name a path outside the store.
    """
    return f"{blobid[0:2]}/{blobid[2:4]}/{blobid}".encode("ascii")


def below_any(relpath: bytes, shards: frozenset[bytes]) -> bool:
    """Whether a by-hash path (``ab/cd/abcd…``) lies below one of ``shards`` (``ab`` or ``ab/cd`` names)."""
    return bool(shards) and (relpath[:2] in shards or relpath[:5] in shards)


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


def split_archive_path(stored: bytes) -> tuple[bytes, bytes]:
    """``(parent, name)`` of a catalogued path's archive path, below the root.

    ``parent`` is the relative directory (``b"mnt/ntt/x/dir"``, ``b""`` for the
    root itself). Same rules as :func:`archive_components`, with a fast path
    for the common, plain form (no '.' components, no '//', no NUL).
    """
    if (stored[:1] == b"/" and stored[-1:] != b"/" and b"/." not in stored
            and b"//" not in stored and b"\0" not in stored):
        slash = stored.rfind(b"/")
        return stored[1:slash], stored[slash + 1:]
    components = archive_components(stored)
    return b"/".join(components[:-1]), components[-1]


#: Where NTT mounts a medium while it is enumerated and copied.
NTT_MOUNT_BASE = b"/mnt/ntt"
_LEGACY_PARTITION_PREFIX = re.compile(rb"^p\d+:(?=/)")


def parse_source_prefix(option: str) -> tuple[bytes, bytes]:
    """``OLD=NEW`` (as given to ``--source-prefix``) as a pair of bytes prefixes."""
    old, sep, new = option.partition("=")
    if not sep or not old or not new:
        raise ValueError(f"--source-prefix wants OLD=NEW, not {option!r}")
    if "\0" in option:
        raise ValueError("--source-prefix: a NUL cannot be part of a path")
    return os.fsencode(old).rstrip(b"/"), os.fsencode(new).rstrip(b"/")


def _ntt_mount(medium_hash: str) -> bytes:
    return NTT_MOUNT_BASE + b"/" + medium_hash.encode("ascii", "replace")


def is_under(path: bytes, directory: bytes) -> bool:
    """Whether ``path`` is ``directory`` or below it (neither resolved here; ``/`` and ``b""`` are the root)."""
    return path == directory or path.startswith(directory.rstrip(b"/") + b"/")


def order_remaps(remaps: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``--source-prefix`` pairs, the most specific OLD first: a partition's move wins over its medium's."""
    return sorted(remaps, key=lambda pair: len(pair[0]), reverse=True)


def source_location(stored: bytes, medium_hash: str, remaps: list[tuple[bytes, bytes]] = (),
                    scanned_root: bytes | None = None) -> tuple[bytes, bytes]:
    """Where the content of a catalogued path lies now: ``(top, below)``.

    ``top`` is the directory it is read beneath (the medium's mount, or the
    tree ``relinker scan`` catalogued where it lies, ``scanned_root``), and
    ``below`` its path from there, never leaving it. Stored paths come in
    three forms: the full mount path (``/mnt/ntt/<medium>/file``), a path
    relative to the medium's mount with a leading slash (``/file``), and a
    legacy form with a partition prefix (``p5:/mnt/ntt/<medium>/p5/file``).
    Any path not under the mount is read under it: ``/etc/hostname`` is the
    disk's, never this machine's. ``remaps`` (``--source-prefix OLD=NEW``;
    the first whose OLD matches applies, see order_remaps) move the whole
    medium, or a part of it such as one partition, to where it is now.

    Raises :class:`UnsafePath` for a path that could leave its top ('..'),
    that no system call takes (NUL), that names no file below the top, or a
    scanned medium's path outside its tree.
    """
    # Called for every inode copy reads: the pattern only where it can match.
    path = _LEGACY_PARTITION_PREFIX.sub(b"", stored) if stored[:1] == b"p" else stored
    base = _ntt_mount(medium_hash) if scanned_root is None else scanned_root.rstrip(b"/")
    if not is_under(path, base):
        if scanned_root is not None:
            raise UnsafePath("not in the scanned tree")
        path = base + path if path[:1] == b"/" else base + b"/" + path
    if b"\0" in path:
        raise UnsafePath("NUL byte in path")
    components = [c for c in path[len(base):].split(b"/") if c and c != b"."]
    if b".." in components:
        raise UnsafePath("'..' component")
    if not components:
        raise UnsafePath("path names no file")
    for old, new in remaps:
        if is_under(path, old):
            if len(old) > len(base):  # a part of the medium, moved on its own
                below = [c for c in path[len(old):].split(b"/") if c and c != b"."]
                if below:
                    return new or b"/", b"/".join(below)
                continue
            return new + base[len(old):] or b"/", b"/".join(components)
    return base or b"/", b"/".join(components)

