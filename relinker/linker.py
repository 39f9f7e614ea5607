"""Create archive hardlinks safely: the only module that changes the archive tree.

Every operation is relative to a directory file descriptor, and every
directory is opened with ``O_NOFOLLOW`` one component at a time from the
archive root, so a symlink planted anywhere in the archive tree is reported,
never followed, and no catalogue path can make relinker create anything
outside the root. Existing directories are never removed; a stale regular
file is replaced atomically (link to a temporary name, then rename over it).

Directory descriptors (``O_PATH``) are cached, keyed as a catalogued path
spells its parent (``/mnt/ntt/x``), so a link into a directory seen before
costs one ``linkat`` and nothing else, and a re-run over a complete archive
one ``fstatat`` per path (the linker guesses which of the two to try first
from the previous outcome). That per-path loop is ``fast_route``: C from
relinker._speedups when it was built, else its Python twin
(:mod:`relinker.fastroute` holds the contract of both). When an archive has
more directories than descriptors may stay open, the cache keeps the ones it
has and a directory beyond it gets a descriptor for the one operation:
evicting and reopening cached descriptors costs far more. Ancestors, needed
only to open a directory seen for the first time, get at most a quarter of
the cache; the rest goes to the directories files are linked into. A
read-only check (an ``fstatat`` that finds the link already right) below a
directory this linker has already walked safely goes by its path from the
root instead, with no descriptor at all: nothing is created that way. A
directory swapped for a symlink behind our back after the walk is followed
by that path (only its last component is not): such a check can count a
link outside the archive as present, though nothing is ever written there. In checking mode the C
route reads a cached directory once and answers later checks of names found
there with the blob's inode from what it read (``DirectoryListings`` in
_speedups.c: a bounded cache; a name seen with another inode is forgotten,
so this linker's own changes are never answered from it).
"""

from __future__ import annotations

import enum
import errno
import functools
import os
import resource
import secrets
import stat
from typing import Callable

import blake3

from relinker.catalogue import content_matches
from relinker.content import hash_fd
from relinker.errors import unless_out_of_resources
from relinker.fastroute import DirectoryListings, RangeWalker, fast_route, lstat_identity
from relinker.paths import DIRECTORY_MODE, UnsafePath, display, split_archive_path

# O_PATH: a handle for *at() calls only, cheaper to open and close.
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: The detail of a ``too-many-links`` problem (relink's, and verify's for the same paths).
AT_LINK_LIMIT = "the by-hash file has as many links as the filesystem allows"
#: What glibc's pathconf answers for a filesystem it has no figure for
#: (LINUX_LINK_MAX): tmpfs, overlayfs, ZFS, whose real limit is far higher or none.
_UNKNOWN_LINK_MAX = 127
#: Bytes read at a time when a file in the way is compared with the by-hash file before a replace.
COMPARE_CHUNK = 1 << 20
TEMP_PREFIX = b".relinker-"
TEMP_SUFFIX = b".tmp"
#: Upper bound of directory descriptors kept open per linker; the real bound
#: also respects RLIMIT_NOFILE.
DIRECTORY_CACHE = 65536
#: Share of the cache open to directories only passed through on the way to
#: another (ancestors): they are needed once per directory below them, while
#: the directories files go into are needed once per file.
ANCESTOR_SHARE = 0.25
#: Directories remembered as walked safely (for descriptor-free checks).
VERIFIED_LIMIT = 1_000_000
#: Descriptors left for everything else (sockets, pipes, files being copied).
FD_RESERVE = 384
#: Cache value of a directory that does not exist (dry runs and probes only).
_MISSING = -1
#: Directory entries the C route may keep from reading cached directories
#: (16 bytes each, so at most 64MB per linker): a check of a name found there
#: with the blob's inode needs no fstatat. See DirectoryListings in _speedups.c.
LISTING_BUDGET = 4_000_000


class Outcome(enum.Enum):
    """What became of an archive path that is now a link of its blob's by-hash file."""

    CREATED = "created"
    PRESENT = "present"
    REPLACED = "replaced"

    # Outcomes key the tallies updated for every inode; Enum's own __hash__
    # is a Python-level call, and members are singletons anyway.
    __hash__ = object.__hash__


# Read once per inode in link_all/probe_all: on Python 3.11 an Enum class
# attribute lookup goes through EnumType's Python-level __getattr__ hook, a
# module global does not.
_CREATED, _PRESENT = Outcome.CREATED, Outcome.PRESENT


def new_tally() -> dict:
    """Zero counts of every outcome, ``None`` (not linked, for probes) included: what link_all and probe_all add to."""
    return {Outcome.CREATED: 0, Outcome.PRESENT: 0, Outcome.REPLACED: 0, None: 0}


class LinkProblem(Exception):
    """A path that cannot (or must not) be linked; recorded, never fatal."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


class ArchiveLinker:
    """Links catalogue paths below one archive root.

    Sources (by-hash files) are absolute paths, or paths relative to
    ``source_root`` when one is given: linking and stat'ing by a descriptor
    of the store saves walking its path for every link. ``on_conflict``
    decides what happens to a regular file that is not the blob's inode:
    ``replace`` it (default) or ``keep`` it and report a problem.
    With ``dry_run`` nothing is created, renamed or removed; outcomes are
    predicted from what is on disk. Paths are catalogued paths (bytes);
    unsafe ones raise :class:`relinker.paths.UnsafePath`.
    """

    def __init__(self, archive_root: bytes, *, source_root: bytes | None = None, on_conflict: str = "replace",
                 dry_run: bool = False):
        if on_conflict not in ("replace", "keep"):
            raise ValueError(f"on_conflict must be 'replace' or 'keep', not {on_conflict!r}")
        self.on_conflict = on_conflict
        self.dry_run = dry_run
        #: called after each chunk read when a file in the way is compared with the by-hash file
        #: (a range's heartbeat and stop check: a large file takes a while)
        self.while_reading: Callable[[], None] | None = None
        self._source_root = source_root
        # The store's root may be a symlink (to another pool, say): followed.
        self._source_fd = None if source_root is None else os.open(
            source_root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._root_fd = os.open(archive_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        # Keyed as a catalogued path's rpartition(b"/") spells its parent
        # (b"/mnt/ntt/x"; b"" for the root), so the fast route of link_all
        # finds a descriptor without slicing; see _directory_key.
        self._directories: dict[bytes, int] = {b"": self._root_fd}
        self._capacity = directory_cache_size()
        self._ancestor_capacity = int(self._capacity * ANCESTOR_SHARE)
        self._ancestors_cached = 0
        # Directories opened component by component with O_NOFOLLOW.
        self._verified: set[bytes] = set()
        # mkdir(0o755) gives rwxr-xr-x unless the umask takes more away: only
        # then is an fchmod worth its journal write.
        umask = os.umask(0)
        os.umask(umask)
        self._fix_mode = bool(umask & DIRECTORY_MODE)
        self._expect_present = False
        # Keyed by the descriptors of _directories: cleared before they close.
        self._listings = None if DirectoryListings is None else DirectoryListings(LISTING_BUDGET)
        # Indexes descriptors of _directories: told to forget them before they close.
        self._walker = None
        self._walker_kind = None
        #: by-hash files hashed this range before a replace: why each is unsound, or None
        self._soundness: dict[bytes, str | None] = {}
        #: the longest name the archive's filesystem takes (None where it does not say), for dry runs
        self._name_max = _name_limit(self._root_fd)

    def new_range(self) -> None:
        """Forget the directories found missing: another process may have made them since (a relink
        beside a count). Descriptors of directories that exist stay cached."""
        for key in [key for key, fd in self._directories.items() if fd == _MISSING]:
            del self._directories[key]
        self._soundness = {}

    def close(self) -> None:
        """Close every directory descriptor; the linker cannot be used afterwards."""
        if self._listings is not None:
            self._listings.clear()
        if self._walker is not None:
            self._walker.forget_directories()
            self._walker = None
        for fd in self._directories.values():
            if fd >= 0:
                os.close(fd)
        self._directories.clear()
        if self._source_fd is not None:
            os.close(self._source_fd)
            self._source_fd = None

    def source_identity(self, source: bytes) -> tuple[int, int, int]:
        """``(st_dev, st_ino, st_mode)`` of a source (relative to ``source_root`` when not absolute), by lstat.

        Raises OSError as :func:`os.stat` does.
        """
        return lstat_identity(source, self._source_fd)

    def stat_source(self, source: bytes) -> os.stat_result:
        """The lstat of a source, relative to ``source_root`` when not absolute (no read permission needed)."""
        return os.stat(source, dir_fd=self._source_fd, follow_symlinks=False)

    def open_source(self, source: bytes) -> int:
        """A read-only descriptor of a source (never through a symlink); the caller closes it."""
        return os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._source_fd)

    def source_path(self, source: bytes) -> bytes:
        """A source as a path from the filesystem root, for messages."""
        if self._source_root is None or source.startswith(b"/"):
            return source
        return self._source_root.rstrip(b"/") + b"/" + source

    def __enter__(self) -> "ArchiveLinker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def link(self, source: bytes, source_id: tuple[int, int], stored: bytes) -> Outcome:
        """Make the archive path of ``stored`` a hardlink of ``source``.

        ``source_id`` is the ``(st_dev, st_ino)`` of ``source``, stat'ed once
        per blob by the caller. Raises :class:`LinkProblem` for anything that
        is not an ordinary link operation.
        """
        parent, name = split_archive_path(stored)
        key = _directory_key(parent)
        dir_fd = self._directories.get(key)
        if dir_fd is not None and not (dir_fd == _MISSING and not self.dry_run):
            return self._link_at(source, source_id, dir_fd, name, stored)
        if self._expect_present and key in self._verified:
            found = self._stat_verified(parent, name)
            if found is not None and found.st_ino == source_id[1] and found.st_dev == source_id[0]:
                return Outcome.PRESENT
        dir_fd, transient = self._open_directories(parent, create=not self.dry_run)
        try:
            return self._link_at(source, source_id, dir_fd, name, stored)
        finally:
            if transient:
                os.close(dir_fd)

    def _link_at(self, source: bytes, source_id: tuple[int, int], dir_fd: int, name: bytes,
                 stored: bytes) -> Outcome:
        if dir_fd == _MISSING:
            # A dry run, below a directory that would be created: what mkdir and link would refuse.
            name_max = self._name_max
            if name_max is not None and any(len(c) > name_max for c in split_archive_path(stored)[0].split(b"/")
                                            + [name]):
                raise LinkProblem("name-too-long", "a component of the path is too long for the filesystem")
            return Outcome.CREATED
        if self._expect_present or self.dry_run:
            # Re-checking a complete archive: one fstatat answers most paths.
            try:
                existing = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                existing = None
            except OSError as exc:
                raise _link_problem(exc, self.source_path(source), stored) from None
            if existing is not None:
                if existing.st_ino == source_id[1] and existing.st_dev == source_id[0]:
                    return Outcome.PRESENT
                return self._existing(source, dir_fd, name, existing, stored)
            self._expect_present = False
            if self.dry_run:
                return Outcome.CREATED
        try:
            os.link(source, name, src_dir_fd=self._source_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
            self._changed(dir_fd, name)
            return Outcome.CREATED
        except FileExistsError:
            pass
        except OSError as exc:
            raise _link_problem(exc, self.source_path(source), stored) from None
        try:
            existing = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError as exc:
            raise _link_problem(exc, self.source_path(source), stored) from None
        if existing.st_ino == source_id[1] and existing.st_dev == source_id[0]:
            self._expect_present = True
            return Outcome.PRESENT
        return self._existing(source, dir_fd, name, existing, stored)

    def link_all(self, source: bytes, source_id: tuple[int, int], paths, tally: dict, problem) -> int:
        """Link every catalogued path of ``paths`` to ``source``.

        Adds each outcome to ``tally`` (a dict keyed by :class:`Outcome`),
        calls ``problem(path, kind, detail)`` for each path that cannot be
        linked, and returns how many paths are now correctly linked.
        """
        if self.dry_run:
            return _visit_all(paths, functools.partial(self.link, source, source_id), tally, problem)
        dev, ino = source_id
        created = present = done = 0
        count = len(paths)
        index = 0
        # Every path of a run goes through fast_route: a plain path below a
        # cached directory costs one system call (see _fast_route_python).
        # The first path it cannot settle takes the general route, which
        # repeats the operation and sorts the outcome out (and may change
        # what the linker expects next), then the fast route goes on after it.
        while True:
            more_created, more_present, index = fast_route(
                paths, index, self._directories, self._source_fd, source, dev, ino, self._expect_present,
                self._listings, self._verified, self._root_fd)
            created += more_created
            present += more_present
            if index >= count:
                break
            if self.link_one(source, source_id, paths[index], tally, problem):
                done += 1
            index += 1
        if created:
            tally[_CREATED] += created
        if present:
            tally[_PRESENT] += present
        return created + present + done

    def probe_all(self, source_id: tuple[int, int], paths, tally: dict, problem, general=None) -> int:
        """Count the paths of ``paths`` that are hardlinks of ``source_id``; create nothing.

        Correct links count as ``Outcome.PRESENT`` in ``tally``, the others
        under ``None``; returns how many are correct. ``general(path) ->
        bool`` replaces :meth:`probe_one` for the paths that are not simply
        links of the source.
        """
        dev, ino = source_id
        present = done = 0
        count = len(paths)
        index = 0
        # link_all's fast route in its checking mode; a path it stops at
        # (absent, another file, an unusual path) is probed by the general route.
        while True:
            _, more_present, index = fast_route(paths, index, self._directories, None, b"", dev, ino, True,
                                                self._listings, self._verified, self._root_fd)
            present += more_present
            if index >= count:
                break
            if (self.probe_one(source_id, paths[index], tally, problem) if general is None
                    else general(paths[index])):
                done += 1
            index += 1
        tally[_PRESENT] += present
        return present + done

    def link_one(self, source: bytes, source_id: tuple[int, int], stored: bytes, tally: dict, problem) -> bool:
        """The general route for one path: link it, tally the outcome or report its problem.

        Returns whether the path is now correctly linked.
        """
        return _visit(stored, functools.partial(self.link, source, source_id), tally, problem) is not _FAILED

    def probe_one(self, source_id: tuple[int, int], stored: bytes, tally: dict, problem) -> bool:
        """The general route of a probe: whether one path is a hardlink of ``source_id`` (tallied as probe_all does)."""
        return _visit(stored, functools.partial(self._probe_outcome, source_id), tally, problem) is _PRESENT

    def check_one(self, source_id: tuple[int, int], stored: bytes, tally: dict, problem) -> bool:
        """probe_one that also says why a path is not a hardlink of ``source_id``.

        An absent entry is a ``link-missing`` problem, another file a
        ``wrong-inode`` one; both are tallied under ``None`` as probe_one does.
        """
        def check(path: bytes) -> Outcome | None:
            found = self.probe(path)
            if found is not None and (found.st_dev, found.st_ino) == source_id:
                return _PRESENT
            if found is None:
                problem(path, "link-missing", "no archive entry")
            else:
                problem(path, "wrong-inode", "archive entry is not the by-hash file")
            return None

        return _visit(stored, check, tally, problem) is _PRESENT

    @property
    def expects_present(self) -> bool:
        """Whether the next link is expected to be there already (the fast route checks before it links)."""
        return self._expect_present

    def range_walker(self, *, probe: bool, tick_every: int):
        """A ``relinker._speedups.RangeWalker`` over this linker's caches, or None where it is not used.

        The walker takes a range's rows through the C fast route and hands
        back to Python (RelinkWork._walk_rows) whatever needs the general
        route. None without the C extension (or with RELINKER_PURE_PYTHON),
        in dry runs (every path goes by the general route) and without a
        by-hash store descriptor.
        """
        if RangeWalker is None or self.dry_run or self._source_fd is None:
            return None
        # One walker for the linker's life: it indexes the directory descriptors it looks up.
        if self._walker is None or self._walker_kind != (probe, tick_every):
            if self._walker is not None:
                self._walker.forget_directories()
            self._walker = RangeWalker(self._directories, self._source_fd, self._root_fd, self._expect_present,
                                       self._listings, self._verified, probe, tick_every)
            self._walker_kind = (probe, tick_every)
        else:
            self._walker.start(self._expect_present)
        return self._walker

    def _probe_outcome(self, source_id: tuple[int, int], stored: bytes) -> Outcome | None:
        st = self.probe(stored)
        return Outcome.PRESENT if st is not None and (st.st_dev, st.st_ino) == source_id else None

    def can_look_at(self, stored: bytes) -> bool:
        """Whether an lstat of the archive path of ``stored`` says if it is there (no os-error)."""
        try:
            self.probe(stored)
        except LinkProblem as problem:
            return problem.kind != "os-error"
        except UnsafePath:
            return True
        return True

    def probe(self, stored: bytes) -> os.stat_result | None:
        """lstat the archive path of ``stored`` (no symlink followed); None if absent.

        Raises :class:`LinkProblem` when a parent is not a plain directory.
        Creates nothing, whatever the linker's mode.
        """
        parent, name = split_archive_path(stored)
        key = _directory_key(parent)
        dir_fd = self._directories.get(key)
        transient = False
        if dir_fd is None:
            if key in self._verified:
                found = self._stat_verified(parent, name)
                if found is not None:
                    return found
            dir_fd, transient = self._open_directories(parent, create=False)
        try:
            if dir_fd == _MISSING:
                return None
            return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _link_problem(exc, None, stored) from None
        finally:
            if transient:
                os.close(dir_fd)

    def _stat_verified(self, parent: bytes, name: bytes) -> os.stat_result | None:
        """lstat by path from the root, below a directory walked safely before; None if that fails."""
        try:
            return os.stat(parent + b"/" + name, dir_fd=self._root_fd, follow_symlinks=False)
        except OSError:
            return None

    def _existing(self, source, dir_fd, name, existing: os.stat_result, stored: bytes) -> Outcome:
        mode = existing.st_mode
        if stat.S_ISDIR(mode):
            raise LinkProblem("is-a-directory", "a directory is in the way (never removed)")
        if stat.S_ISLNK(mode):
            raise LinkProblem("symlink-in-archive", "a symlink is in the way (not followed, not removed)")
        if not stat.S_ISREG(mode):
            raise LinkProblem("not-a-regular-file", f"a special file (mode {mode:o}) is in the way")
        if self.on_conflict == "keep":
            raise LinkProblem("existing-file", "a different regular file is there (kept: --on-conflict keep)")
        if existing.st_nlink == 1:
            # Its only name: replaced only if that loses nothing, i.e. it holds the by-hash file's very
            # bytes (the copier's orphaned copy). Anything else is another content, or the by-hash file
            # is damaged: verify --hash tells which. One of the two places relink reads content.
            differs = self._differs_from_source(source, dir_fd, name)
            if differs:
                raise LinkProblem("existing-file", f"a regular file that is its content's only name is there, "
                                  f"and {differs} (kept)")
        else:
            # Other names keep its content, but a damaged by-hash file (a copy put in its place)
            # would take the place of every good copy, name by name: replaced only from a sound one.
            unsound = self._unsound_source(source)
            if unsound:
                raise LinkProblem("existing-file", f"a regular file with other names is there, and {unsound} (kept)")
        if self.dry_run:
            return Outcome.REPLACED
        # Deterministic temporary name: a redo after a crash between link and
        # rename reuses (and so cleans up) the same temporary.
        temp = TEMP_PREFIX + blake3.blake3(name).hexdigest()[:16].encode() + TEMP_SUFFIX
        try:
            try:
                os.link(source, temp, src_dir_fd=self._source_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
            except FileExistsError:
                if self._own_leftover(source, dir_fd, temp):
                    os.unlink(temp, dir_fd=dir_fd)
                else:  # an archive file of that very name: never ours to remove
                    temp = TEMP_PREFIX + secrets.token_hex(8).encode() + TEMP_SUFFIX
                os.link(source, temp, src_dir_fd=self._source_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
            os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            self._changed(dir_fd, name)
            self._changed(dir_fd, temp)
        except OSError as exc:
            try:
                os.unlink(temp, dir_fd=dir_fd)
            except OSError:
                pass
            raise _link_problem(exc, self.source_path(source), stored) from None
        return Outcome.REPLACED

    def _differs_from_source(self, source: bytes, dir_fd: int, name: bytes) -> str | None:
        """How the file ``name`` (below ``dir_fd``) differs from the by-hash file ``source``; None if it holds
        the same bytes."""
        try:
            theirs = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
        except OSError as exc:
            unless_out_of_resources(exc)
            return f"it cannot be read to compare ({exc.strerror})"
        try:
            try:
                ours = self.open_source(source)
            except OSError as exc:
                unless_out_of_resources(exc)
                return f"the by-hash file cannot be read to compare ({exc.strerror})"
            try:
                their_size, our_size = os.fstat(theirs).st_size, os.fstat(ours).st_size
                if their_size != our_size:
                    return f"it has {their_size} bytes where the by-hash file has {our_size}"
                while True:
                    mine, other = os.read(ours, COMPARE_CHUNK), os.read(theirs, COMPARE_CHUNK)
                    if mine != other:
                        return "its bytes differ from the by-hash file's"
                    if not mine:
                        return None
                    if self.while_reading is not None:
                        self.while_reading()
            except OSError as exc:
                unless_out_of_resources(exc)
                return f"it cannot be compared with the by-hash file ({exc.strerror})"
            finally:
                os.close(ours)
        finally:
            os.close(theirs)

    def _unsound_source(self, source: bytes) -> str | None:
        """Why the by-hash file ``source`` (``ab/cd/<blobid>``) is not its blob's content, or None.

        Hashed once per source and range: called only before replacing a
        file that has other names, the one place besides the only-name
        comparison where relink reads content.
        """
        if source not in self._soundness:
            blobid = os.fsdecode(source.rpartition(b"/")[2])
            try:
                fd = self.open_source(source)
                try:
                    digest, size = hash_fd(fd, self.while_reading)
                finally:
                    os.close(fd)
            except OSError as exc:
                unless_out_of_resources(exc)
                verdict = f"the by-hash file cannot be read to check it ({exc.strerror})"
            else:
                verdict = None if content_matches(blobid, digest, size) else "the by-hash file does not hash to its ID"
            self._soundness[source] = verdict
        return self._soundness[source]

    def _own_leftover(self, source: bytes, dir_fd: int, temp: bytes) -> bool:
        """Whether ``temp`` is a link of ``source`` that a replace interrupted before its rename left."""
        try:
            found = os.stat(temp, dir_fd=dir_fd, follow_symlinks=False)
            ours = self.stat_source(source)
        except OSError as exc:
            unless_out_of_resources(exc)
            return False
        return stat.S_ISREG(found.st_mode) and (found.st_dev, found.st_ino) == (ours.st_dev, ours.st_ino)

    def _changed(self, dir_fd: int, name: bytes) -> None:
        # A listing read before this process linked or replaced the name
        # would answer for what was there then: a catalogue can give one
        # archive path to two blobs, the second one's check must see the first's link.
        if self._listings is not None:
            self._listings.forget(dir_fd, name)

    def _open_directories(self, parent: bytes, create: bool) -> tuple[int, bool]:
        """Open (creating if asked) every directory from the root down to ``parent``.

        Each component is opened with O_NOFOLLOW relative to the one above, so
        no symlink in the archive tree is ever followed. Returns the
        descriptor (or _MISSING when a directory does not exist and may not be
        created) and whether it is transient: not cached, for the caller to
        close after its one operation.
        """
        cache = self._directories
        fd = self._root_fd
        transient = None  # an uncached descriptor still to close
        key = b""
        components = parent.split(b"/") if parent else []
        last = len(components) - 1
        try:
            for depth, component in enumerate(components):
                key = key + b"/" + component
                cached = cache.get(key)
                if cached is not None and not (cached == _MISSING and create):
                    opened = cached
                else:
                    opened = self._open_directory(fd, component, key[1:], create)
                    if opened == _MISSING:
                        cache[key] = opened
                    elif len(cache) < self._capacity and (
                            depth == last or self._ancestors_cached < self._ancestor_capacity):
                        cache[key] = opened
                        if depth != last:
                            self._ancestors_cached += 1
                if transient is not None:
                    os.close(transient)
                    transient = None
                if opened != _MISSING:
                    if cache.get(key) != opened:
                        transient = opened
                    if len(self._verified) < VERIFIED_LIMIT:
                        self._verified.add(key)
                fd = opened
                if fd == _MISSING:
                    break
        except BaseException:
            if transient is not None:
                os.close(transient)
            raise
        return fd, transient is not None

    def _open_directory(self, parent_fd: int, name: bytes, where: bytes, create: bool) -> int:
        try:
            try:
                return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
            except FileNotFoundError:
                if not create:
                    return _MISSING
            try:
                os.mkdir(name, DIRECTORY_MODE, dir_fd=parent_fd)
            except FileExistsError:
                return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)  # another worker made it first
            if not self._fix_mode:
                return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
            # fchmod needs a real descriptor, not an O_PATH one.
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
            try:
                os.fchmod(fd, DIRECTORY_MODE)  # whatever the umask, rwxr-xr-x
            except BaseException:
                os.close(fd)
                raise
            return fd
        except OSError as exc:
            raise _directory_problem(exc, parent_fd, name, where) from None


#: What _visit returns for a path whose problem it reported.
_FAILED = object()


def _visit(stored: bytes, visit, tally: dict, problem):
    """Apply ``visit`` to one path and tally its outcome, or report its problem (and return _FAILED)."""
    try:
        outcome = visit(stored)
    except UnsafePath as exc:
        problem(stored, "unsafe-path", str(exc))
        return _FAILED
    except LinkProblem as exc:
        problem(stored, exc.kind, exc.detail)
        return _FAILED
    tally[outcome] += 1
    return outcome


def _visit_all(paths, visit, tally: dict, problem) -> int:
    """:func:`_visit` each path; return how many are correctly linked (outcome not None)."""
    done = 0
    for stored in paths:
        outcome = _visit(stored, visit, tally, problem)
        if outcome is not _FAILED and outcome is not None:
            done += 1
    return done


def _directory_key(parent: bytes) -> bytes:
    """The cache key of a directory given relative to the root (``b"mnt/x"`` -> ``b"/mnt/x"``)."""
    return b"/" + parent if parent else b""


def directory_cache_size() -> int:
    """How many directory descriptors a linker may keep open: the fd limit, less a reserve."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return DIRECTORY_CACHE
    # Below the reserve, a quarter of the limit: a fixed floor could take every descriptor left.
    return max(4, min(DIRECTORY_CACHE, max(soft // 4, soft - FD_RESERVE)))


def raise_open_file_limit(wanted: int = DIRECTORY_CACHE + FD_RESERVE) -> None:
    """Raise this process's soft RLIMIT_NOFILE towards the hard limit (worker start-up).

    Desktop defaults (1024) would otherwise make the directory cache thrash
    on archives spread over thousands of directories.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass


def _directory_problem(exc: OSError, parent_fd: int, name: bytes, where: bytes) -> LinkProblem:
    unless_out_of_resources(exc)
    location = display(where)
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


def _name_limit(fd: int) -> int | None:
    try:
        limit = os.fpathconf(fd, "PC_NAME_MAX")
    except (OSError, ValueError):
        return None
    return limit if limit > 0 else None


def filesystem_link_limit(path: bytes) -> int | None:
    """The most links a file may have on ``path``'s filesystem, or None where that is not known."""
    try:
        limit = os.pathconf(path, "PC_LINK_MAX")
    except (OSError, ValueError):
        return None
    return None if limit in (-1, _UNKNOWN_LINK_MAX) else limit


def _link_problem(exc: OSError, source: bytes | None, stored: bytes) -> LinkProblem:
    unless_out_of_resources(exc)
    if exc.errno == errno.EMLINK:
        return LinkProblem("too-many-links", AT_LINK_LIMIT)
    if exc.errno == errno.ENAMETOOLONG:
        return LinkProblem("name-too-long", "the file name is too long for the filesystem")
    if exc.errno == errno.ENOENT and source is not None and not os.path.lexists(source):
        return LinkProblem("missing-by-hash", f"{display(source)} vanished")
    if exc.errno == errno.EISDIR:
        return LinkProblem("is-a-directory", "a directory is in the way (never removed)")
    return LinkProblem("os-error", exc.strerror)  # the problem names its path
