"""Reading a medium's files for copy: opened beneath where the medium is now, never outside it.

A catalogued path says where a file was when its medium was enumerated
(:func:`relinker.paths.source_location` says where it lies now). Each file
is opened relative to a descriptor of that directory, taken for that file
alone (a medium mounted or unmounted meanwhile is seen, and never held
busy), with ``openat2``'s ``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS``: a
symlink on the medium, in the file's place or in a directory's, is never
followed (an absolute one would name this machine's files). Where the
kernel (before Linux 5.6), the architecture or a sandbox has no
``openat2``, the directories are opened one by one without following a symlink.

A file that cannot be opened is gone for good only while the medium is
there to hold it (:func:`holds_place`), judged when it fails: an unmounted
medium or partition leaves its mount point behind, empty.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import stat

from relinker.paths import display, source_location

SOURCE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
#: openat2's number where the architecture takes it from the common table (not alpha, not MIPS).
_SYS_OPENAT2 = 437
_COMMON_SYSCALL_TABLE = ("x86_64", "i386", "i486", "i586", "i686", "aarch64", "arm", "riscv64", "ppc64",
                         "ppc64le", "s390x", "loongarch64")


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _openat2_function():
    machine = platform.machine()
    if not machine.startswith(_COMMON_SYSCALL_TABLE):
        return None
    try:
        syscall = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        return None
    syscall.restype = ctypes.c_long
    syscall.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_OpenHow), ctypes.c_size_t]
    return syscall


_SYSCALL = _openat2_function()
_HOW = _OpenHow(SOURCE_FLAGS, 0, _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS)


def open_beneath(dir_fd: int, below: bytes) -> int:
    """A read-only descriptor of ``below`` beneath ``dir_fd``, through no symlink.

    ``below`` holds no '..' (source_location refuses it). Raises OSError
    (ELOOP for a symlink on the way).
    """
    global _SYSCALL
    if _SYSCALL is not None:
        fd = _SYSCALL(_SYS_OPENAT2, dir_fd, below, ctypes.byref(_HOW), ctypes.sizeof(_HOW))
        if fd >= 0:
            return fd
        code = ctypes.get_errno()
        if code == errno.ENAMETOOLONG:
            # Longer than PATH_MAX as a whole: each component is not.
            return _open_component_by_component(dir_fd, below)
        if code not in (errno.ENOSYS, errno.EPERM):
            raise OSError(code, os.strerror(code), below)
        # An older kernel (ENOSYS), or a sandbox that refuses system calls it does not know (EPERM):
        # from now on without, once the way without works.
        fd = _open_component_by_component(dir_fd, below)
        _SYSCALL = None
        return fd
    return _open_component_by_component(dir_fd, below)


def _open_component_by_component(dir_fd: int, below: bytes) -> int:
    # One directory's descriptor at a time, not one per level: a tree thousands of levels deep would
    # take every descriptor the process may have.
    *directories, name = below.split(b"/")
    current = None  # the last directory opened here (the caller's dir_fd is the caller's to close)
    try:
        for directory in directories:
            at = dir_fd if current is None else current
            try:
                opened = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=at)
            except NotADirectoryError:
                # A symlink in a directory's place says ENOTDIR here: ELOOP, as openat2 says it.
                if stat.S_ISLNK(os.stat(directory, dir_fd=at, follow_symlinks=False).st_mode):
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), below) from None
                raise
            if current is not None:
                os.close(current)
            current = opened
        return os.open(name, SOURCE_FLAGS, dir_fd=dir_fd if current is None else current)
    finally:
        if current is not None:
            os.close(current)


def source_path(top: bytes, below: bytes) -> bytes:
    """The path of a source from the filesystem's root, for messages."""
    return top.rstrip(b"/") + b"/" + below


def holds_place(top: bytes, below: bytes) -> bool:
    """Whether the medium is there to hold ``below`` now, so that a file missing from it is gone for good.

    Yes if a directory from ``top`` down to the deepest of ``below``'s that
    exists is a mount point, or if the file's own directory is there with
    other files in it. An unmounted medium, or one partition of it, leaves
    its mount points behind, empty; a directory missing from a tree that is
    no mount point proves nothing either.
    """
    chain = [top]
    for part in below.split(b"/")[:-1]:
        chain.append(source_path(chain[-1], part))
    for deepest in range(len(chain) - 1, -1, -1):
        try:
            found = os.stat(chain[deepest], follow_symlinks=deepest == 0)
        except OSError:
            continue
        if not stat.S_ISDIR(found.st_mode):
            return deepest > 0  # the medium holds something else where a directory was
        break
    else:
        return False
    if any(os.path.ismount(directory) for directory in chain[:deepest + 1]):
        return True
    return deepest == len(chain) - 1 and _holds_files(chain[deepest])


def _holds_files(directory: bytes) -> bool:
    """Whether ``directory`` holds more than mount points and empty directories (a partition's, unmounted)."""
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                if not entry.is_dir(follow_symlinks=False):
                    return True
                if not os.path.ismount(entry.path):
                    with os.scandir(entry.path) as inside:
                        if next(inside, None) is not None:
                            return True
    except OSError:
        return False
    return False


class MediumSources:
    """Where copy reads one medium's files now."""

    def __init__(self, medium_hash: str, scanned_root: bytes | None, remaps: list[tuple[bytes, bytes]]):
        self.medium_hash = medium_hash
        self.scanned_root = scanned_root
        self.remaps = remaps

    def locate(self, stored: bytes) -> tuple[bytes, bytes]:
        """``(top, below)`` of a catalogued path (see source_location); raises UnsafePath."""
        return source_location(stored, self.medium_hash, self.remaps, self.scanned_root)

    def open(self, top: bytes, below: bytes) -> int:
        """A read-only descriptor of the file ``below`` beneath ``top``; raises OSError."""
        # The top itself may be reached through symlinks (a --source-prefix target).
        top_fd = os.open(top, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return open_beneath(top_fd, below)
        finally:
            os.close(top_fd)

    def absent(self, top: bytes) -> str:
        """What an inode's problem says while the medium is not there to hold its file."""
        if self.scanned_root is not None:
            return f"scanned tree not found at {display(top)}"
        return f"medium not mounted at {display(top)}"
