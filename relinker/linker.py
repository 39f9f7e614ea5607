"""Create archive hardlinks safely: the only module that changes the archive tree.

Every operation is relative to a directory file descriptor opened with
``O_NOFOLLOW``, starting at the archive root, so a symlink planted anywhere in
the archive tree is reported, never followed, and no catalogue path can make
relinker create anything outside the root. Existing directories are never
removed; a stale regular file is replaced atomically (link to a temporary
name, then rename over it).

Callers feed paths sorted by archive path: the linker keeps the chain of open
directories of the previous path and reuses its common prefix, so a directory
is opened (or created) once per run of paths below it, not once per link.
"""

from __future__ import annotations

import enum
import errno
import os
import stat

import blake3

from relinker.paths import display

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
DIRECTORY_MODE = 0o755
TEMP_PREFIX = b".relinker-"
TEMP_SUFFIX = b".tmp"


class Outcome(enum.Enum):
    CREATED = "created"
    PRESENT = "present"
    REPLACED = "replaced"


class LinkProblem(Exception):
    """A path that cannot (or must not) be linked; recorded, never fatal."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


class ArchiveLinker:
    """Links catalogue paths below one archive root.

    ``on_conflict`` decides what happens to a regular file that is not the
    blob's inode: ``replace`` it (default) or ``keep`` it and report a problem.
    With ``dry_run`` nothing is created, renamed or removed; outcomes are
    predicted from what is on disk.
    """

    def __init__(self, archive_root: bytes, *, on_conflict: str = "replace", dry_run: bool = False):
        if on_conflict not in ("replace", "keep"):
            raise ValueError(f"on_conflict must be 'replace' or 'keep', not {on_conflict!r}")
        self.on_conflict = on_conflict
        self.dry_run = dry_run
        self._root_fd = os.open(archive_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        # (name, fd) of the open directory chain below the root. fd None: a
        # directory a dry run would have created (everything below is new).
        self._chain: list[tuple[bytes, int | None]] = []

    def close(self) -> None:
        """Close every directory descriptor; the linker cannot be used afterwards."""
        self._truncate_chain(0)
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    def __enter__(self) -> "ArchiveLinker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def link(self, source: bytes, source_id: tuple[int, int], components: list[bytes]) -> Outcome:
        """Make ``components`` (an archive path) a hardlink of ``source``.

        ``source_id`` is the ``(st_dev, st_ino)`` of ``source``, stat'ed once
        per blob by the caller. Raises :class:`LinkProblem` for anything that
        is not an ordinary link operation.
        """
        dir_fd = self._directory(components[:-1])
        name = components[-1]
        if dir_fd is None:
            return Outcome.CREATED  # dry run, inside a directory that would be created
        if self.dry_run:
            try:
                existing = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                return Outcome.CREATED
            except OSError as exc:
                raise _link_problem(exc, source, components) from None
            return self._existing(source, source_id, dir_fd, name, existing)
        try:
            os.link(source, name, dst_dir_fd=dir_fd, follow_symlinks=False)
            return Outcome.CREATED
        except FileExistsError:
            pass
        except OSError as exc:
            raise _link_problem(exc, source, components) from None
        try:
            existing = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError as exc:
            raise _link_problem(exc, source, components) from None
        return self._existing(source, source_id, dir_fd, name, existing)

    def probe(self, components: list[bytes]) -> os.stat_result | None:
        """lstat an archive path without following symlinks; None if absent.

        Raises :class:`LinkProblem` when a parent is not a plain directory.
        Creates nothing, even outside dry-run mode.
        """
        dir_fd = self._directory(components[:-1], create=False)
        if dir_fd is None:
            return None
        try:
            return os.stat(components[-1], dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _link_problem(exc, None, components) from None

    def _existing(self, source, source_id, dir_fd, name, existing: os.stat_result) -> Outcome:
        if (existing.st_dev, existing.st_ino) == source_id:
            return Outcome.PRESENT
        mode = existing.st_mode
        if stat.S_ISDIR(mode):
            raise LinkProblem("is-a-directory", "a directory is in the way (never removed)")
        if stat.S_ISLNK(mode):
            raise LinkProblem("symlink-in-archive", "a symlink is in the way (not followed, not removed)")
        if not stat.S_ISREG(mode):
            raise LinkProblem("not-a-regular-file", f"a special file (mode {mode:o}) is in the way")
        if self.on_conflict == "keep":
            raise LinkProblem("existing-file", "a different regular file is there (kept: --on-conflict keep)")
        if self.dry_run:
            return Outcome.REPLACED
        # Deterministic temporary name: a redo after a crash between link and
        # rename reuses (and so cleans up) the same temporary.
        temp = TEMP_PREFIX + blake3.blake3(name).hexdigest()[:16].encode() + TEMP_SUFFIX
        try:
            try:
                os.link(source, temp, dst_dir_fd=dir_fd, follow_symlinks=False)
            except FileExistsError:
                os.unlink(temp, dir_fd=dir_fd)
                os.link(source, temp, dst_dir_fd=dir_fd, follow_symlinks=False)
            os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except OSError as exc:
            try:
                os.unlink(temp, dir_fd=dir_fd)
            except OSError:
                pass
            raise _link_problem(exc, source, [name]) from None
        return Outcome.REPLACED

    def _directory(self, parents: list[bytes], create: bool = True) -> int | None:
        """Descriptor of the directory holding the path (opening/creating it)."""
        chain = self._chain
        shared = 0
        limit = min(len(chain), len(parents))
        # A directory a dry run or probe found missing (fd None) must be
        # looked up again before a real link goes below it.
        reuse_missing = self.dry_run or not create
        while shared < limit and chain[shared][0] == parents[shared] and (
            chain[shared][1] is not None or reuse_missing
        ):
            shared += 1
        self._truncate_chain(shared)
        fd = chain[-1][1] if chain else self._root_fd
        for depth in range(shared, len(parents)):
            fd = self._open_directory(fd, parents[depth], parents[: depth + 1], create)
            chain.append((parents[depth], fd))
        return fd

    def _truncate_chain(self, keep: int) -> None:
        for _name, fd in self._chain[keep:]:
            if fd is not None:
                os.close(fd)
        del self._chain[keep:]

    def _open_directory(self, parent_fd: int | None, name: bytes, where: list[bytes], create: bool) -> int | None:
        if parent_fd is None:
            return None
        try:
            try:
                return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
            except FileNotFoundError:
                if self.dry_run or not create:
                    return None
            try:
                os.mkdir(name, DIRECTORY_MODE, dir_fd=parent_fd)
            except FileExistsError:
                pass  # another worker made it first
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
            # Whatever the umask, archive directories are rwxr-xr-x.
            os.fchmod(fd, DIRECTORY_MODE)
            return fd
        except OSError as exc:
            raise _directory_problem(exc, parent_fd, name, where) from None


def _directory_problem(exc: OSError, parent_fd: int, name: bytes, where: list[bytes]) -> LinkProblem:
    location = display(b"/".join(where))
    if exc.errno in (errno.ENOTDIR, errno.ELOOP):
        try:
            is_link = stat.S_ISLNK(os.stat(name, dir_fd=parent_fd, follow_symlinks=False).st_mode)
        except OSError:
            is_link = False
        if is_link:
            return LinkProblem("symlink-in-archive", f"{location} is a symlink (not followed)")
        return LinkProblem("not-a-directory", f"{location} is not a directory")
    if exc.errno == errno.ENAMETOOLONG:
        return LinkProblem("name-too-long", f"a component of {location} is too long")
    return LinkProblem("os-error", f"{location}: {exc.strerror}")


def _link_problem(exc: OSError, source: bytes | None, components: list[bytes]) -> LinkProblem:
    if exc.errno == errno.EMLINK:
        return LinkProblem("too-many-links", "the by-hash file has as many links as the filesystem allows")
    if exc.errno == errno.ENAMETOOLONG:
        return LinkProblem("name-too-long", "the file name is too long for the filesystem")
    if exc.errno == errno.ENOENT and source is not None and not os.path.lexists(source):
        return LinkProblem("missing-by-hash", f"{display(source)} vanished")
    if exc.errno == errno.EISDIR:
        return LinkProblem("is-a-directory", "a directory is in the way (never removed)")
    return LinkProblem("os-error", f"{display(b'/'.join(components))}: {exc.strerror}")
