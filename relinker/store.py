"""The by-hash store: content in, and never a by-hash name on a partial file.

Content is read into a temporary file and hashed on the way; a content
smaller than one read (``content.CHUNK``) is hashed first and gets a
temporary only if the store lacks it. A content whose by-hash name exists
already is dropped right there, its temporary (if any) removed without
ever being synced. The others wait in a batch; the batch is made durable
by one sync of the filesystem (``syncfs``), and only then does each
temporary get its name, ``ab/cd/<hex>`` (``renameat2`` with
``RENAME_NOREPLACE``, which never replaces what is there). A full batch is
sealed: its sync runs in a thread while the next batch is read, and its
names are made once that sync has returned. Before the catalogue may say
that a content is stored, :meth:`ByHashStore.start_sync` makes the new names
and the directories made for them durable with one more sync. A kill or a power
loss at any moment therefore leaves every by-hash name on a complete file:
a name is only ever made for data already on disk.

Temporaries live in a directory of their own per worker process,
``.relinker-tmp/<host>+<pid>+<random>/`` in the store's root (the same
filesystem); a worker removes its directory when it is done, and removes
the directories of this host's workers that are no longer alive when it
starts. Named, not unnamed (``O_TMPFILE``): ext4 keeps every unnamed file on
one orphan list under one lock, and two workers creating files queue on it.
The store names its files relative to descriptors of its root and of that
directory: a path from ``/`` costs a lookup per component on every call.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import fcntl
import itertools
import os
import queue
import resource
import secrets
import shutil
import socket
import stat
import threading
from typing import Callable

from relinker import catalogue, content
from relinker.catalogue import FAILED_PERMANENT, FAILED_RETRYABLE
from relinker.paths import DIRECTORY_MODE, below_any, by_hash_relpath, display

FILE_MODE = 0o444
#: The workers' temporaries live below this directory of the store's root.
TEMP_DIRECTORY = b".relinker-tmp"
#: Contents at least this large are written with direct I/O (see relinker.content).
DIRECT_SIZE = 8 << 20
#: A batch waits for its sync with at most this many temporaries (open descriptors; twice that
#: while a sealed batch syncs; fewer where RLIMIT_NOFILE is low) ...
BATCH_FILES = 128
#: ... and this much content.
BATCH_BYTES = 256 << 20
#: Descriptors a worker keeps for all but its batches (the linker's smallest cache, sockets, sources).
BATCH_FD_RESERVE = 48
#: The store's errors that concern one content's file or directories, not the store as a whole
#: (as ENOSPC or EIO do): that content is a problem of its own, the rest of the range is stored.
CONTENT_ERRORS = frozenset({errno.EACCES, errno.EPERM, errno.EFBIG, errno.ELOOP, errno.ENAMETOOLONG})


class InodeProblem(Exception):
    """An inode that cannot be stored: recorded as a problem; the inode stays not stored.

    ``permanent``: trying again cannot help, because the medium no longer
    holds what the catalogue describes (``failed_permanent`` in the status
    model); otherwise a later run may succeed (``failed_retryable``).
    """

    def __init__(self, kind: str, detail: str, *, permanent: bool = False):
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.permanent = permanent

    @property
    def state(self) -> str:
        """The inode's status in the NTT status model."""
        return FAILED_PERMANENT if self.permanent else FAILED_RETRYABLE


class SourceProblem(InodeProblem):
    """The inode's content could not be read as catalogued."""


class ByHashProblem(InodeProblem):
    """Something not this content's file holds its by-hash name, or its directory's (kept; retryable);
    or the store refuses this content's file (``os-error``: permissions, file size limit)."""


@dataclasses.dataclass(frozen=True)
class Stored:
    """A content under its by-hash name; ``written``: by this store (not found there)."""

    blobid: str
    path: bytes
    written: bool
    size: int
    #: (st_dev, st_ino) of the by-hash file: what its archive links must be
    identity: tuple[int, int]


@dataclasses.dataclass
class Pending:
    """A complete temporary, waiting for its batch's sync before it gets its by-hash name."""

    blobid: str
    final: bytes
    size: int
    fd: int
    #: ``final`` relative to the store's root
    relative: bytes
    #: the temporary's name in the worker's temporaries directory; None once it has its by-hash name
    temp_name: bytes | None


class ByHashStore:
    """Writes content into the by-hash store in batches (see the module's docstring)."""

    def __init__(self, root: bytes, empty_blobid: str = catalogue.EMPTY_SHA256,
                 symlinked_shards: frozenset[bytes] = frozenset()):
        """``symlinked_shards``: the store's ``ab`` and ``ab/cd`` that are symlinks (see
        :func:`symlinked_shards`); their contents are problems, never stored through them."""
        self.root = root
        self.empty_blobid = empty_blobid
        self._symlinked_shards = symlinked_shards
        self._batch_files = _batch_files_allowed()
        self._root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._pending: dict[str, Pending] = {}
        #: a batch whose sync runs in the background (seal_batch), and that sync
        self._sealed: dict[str, Pending] = {}
        self._sealed_sync: _Sync | None = None
        self._syncer = _Syncer(self._root_fd)
        self._pending_bytes = 0
        self._temp_directory: bytes | None = None
        self._temp_fd = -1
        self._temp_numbers = itertools.count()
        # Temporaries are created 0444; only a umask taking some of that away needs an fchmod.
        umask = os.umask(0)
        os.umask(umask)
        self._fix_mode = bool(umask & FILE_MODE)
        self._fix_directory_mode = bool(umask & DIRECTORY_MODE)

    def close(self) -> None:
        """Drop what waits for a sync and this worker's temporaries; the store cannot be used afterwards."""
        self.discard_pending()
        if self._temp_directory is not None:
            shutil.rmtree(self._temp_directory, ignore_errors=True)
            self._temp_directory = None
            os.close(self._temp_fd)
            self._temp_fd = -1
        # A worker killed meanwhile (this run's or another's) left its temporaries: a run that
        # writes nothing new (a resume) starts no store that would remove them.
        _remove_dead_workers_directories(self.root + b"/" + TEMP_DIRECTORY)
        self._syncer.stop()
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    @property
    def batch_full(self) -> bool:
        """Whether the waiting temporaries should be placed now (descriptors and memory stay bounded)."""
        return len(self._pending) >= self._batch_files or self._pending_bytes >= BATCH_BYTES

    def read_in(self, source_fd: int, expected_size: int | None,
                on_chunk: Callable[[], None] | None = None,
                same_file: tuple[int, int] | None = None) -> Stored | Pending:
        """Read an open source; return its content's by-hash file, or the temporary waiting for one.

        A content whose by-hash name exists is :class:`Stored` at once (and
        its temporary dropped, unsynced, or for a content smaller than a
        read never made); so is a content already waiting in this batch (the
        same :class:`Pending`). Trouble with the source is a
        :class:`SourceProblem`, a foreign entry under the by-hash name (or
        in the way of its directories) a :class:`ByHashProblem`; any other
        ``OSError`` is trouble with the store itself and propagates, naming
        the whole path. ``on_chunk`` is called after each chunk
        read (whatever it raises stops the copy and leaves nothing behind).
        ``same_file``: the ``(st_dev, st_ino)`` the source must be, if it is
        on that device (another inode there: ``source-replaced``).
        """
        before = os.fstat(source_fd)
        if not stat.S_ISREG(before.st_mode):
            raise SourceProblem("source-unreadable", "not a regular file", permanent=True)
        if same_file is not None and before.st_dev == same_file[0] and before.st_ino != same_file[1]:
            raise SourceProblem("source-replaced", "another file than the one catalogued (another inode)",
                                permanent=True)
        if expected_size is not None and before.st_size != expected_size:
            raise SourceProblem("source-changed", f"size is {before.st_size}, catalogued {expected_size}",
                                permanent=True)
        if before.st_size < content.CHUNK:
            return self._read_in_small(source_fd, before)
        temp_fd, temp_name = self._temporary(direct=before.st_size >= DIRECT_SIZE)
        kept = False
        try:
            try:
                digest, size = content.copy_hashing(source_fd, temp_fd, on_chunk)
            except content.SourceReadError as exc:
                raise SourceProblem("source-unreadable", exc.error.strerror) from None
            except OSError as exc:
                raise _store_error(exc, self._temp_directory + b"/" + temp_name) from None
            _unchanged(source_fd, before, size)
            blobid, final, relative = self._names(digest, size)
            known = self._known(blobid, final, relative, size)
            if known is not None:
                return known
            pending = self._wait(blobid, final, relative, size, temp_fd, temp_name)
            kept = True
            return pending
        finally:
            if not kept:
                _discard(temp_fd, temp_name, self._temp_fd)

    def _read_in_small(self, source_fd: int, before: os.stat_result) -> Stored | Pending:
        """read_in for a content that fits in one read: hashed before any temporary exists.

        A content the store holds then costs no file at all: creating a
        file and removing it again is most of what a duplicate small file
        would cost, and the removals slow down every file created after them.
        """
        try:
            read = content.read_small(source_fd, before.st_size)
        except content.SourceReadError as exc:
            raise SourceProblem("source-unreadable", exc.error.strerror) from None
        if read is None:
            raise SourceProblem("source-changed", "grew while being read")
        digest, data = read
        _unchanged(source_fd, before, len(data))
        blobid, final, relative = self._names(digest, len(data))
        known = self._known(blobid, final, relative, len(data))
        if known is not None:
            return known
        temp_fd, temp_name = self._temporary()
        try:
            try:
                content.write_all(temp_fd, data)
            except OSError as exc:
                raise _store_error(exc, self._temp_directory + b"/" + temp_name) from None
            return self._wait(blobid, final, relative, len(data), temp_fd, temp_name)
        except BaseException:
            _discard(temp_fd, temp_name, self._temp_fd)
            raise

    def _names(self, digest: str, size: int) -> tuple[str, bytes, bytes]:
        """A content's blob ID (the catalogue's empty blob for no bytes), its by-hash path, that below the root."""
        blobid = digest if size else self.empty_blobid
        relative = by_hash_relpath(blobid)
        final = self.root + b"/" + relative
        if below_any(relative, self._symlinked_shards):
            raise ByHashProblem("bad-by-hash", f"{display(final)}: a directory above it is a symlink "
                                "(not followed, kept)")
        return blobid, final, relative

    def _known(self, blobid: str, final: bytes, relative: bytes, size: int) -> Stored | Pending | None:
        """The content's by-hash file, or its temporary waiting in this batch; None if the store lacks it."""
        waiting = self._pending.get(blobid) or self._sealed.get(blobid)
        if waiting is not None:
            return waiting
        st = _holds_the_content(self._root_fd, relative, final, size)
        if st is not None:
            return Stored(blobid, final, False, size, (st.st_dev, st.st_ino))
        return None

    def _wait(self, blobid: str, final: bytes, relative: bytes, size: int, temp_fd: int, temp_name: bytes) -> Pending:
        """Keep a complete temporary in the batch, to be named ``final`` after the batch's sync."""
        if self._fix_mode:
            os.fchmod(temp_fd, FILE_MODE)
        pending = self._pending[blobid] = Pending(blobid, final, size, temp_fd, relative, temp_name)
        self._pending_bytes += size
        return pending

    def seal_batch(self) -> None:
        """Start the waiting temporaries' sync in a thread; what is read next waits in a new batch.

        A batch sealed before must have been placed (:meth:`place_sealed`).
        """
        if self._sealed:
            raise RuntimeError("the sealed batch must be placed before another is sealed")
        if not self._pending:
            return
        self._sealed, self._pending, self._pending_bytes = self._pending, {}, 0
        self._sealed_sync = self._syncer.request()

    def place_sealed(self, while_waiting: Callable[[], None] | None = None) -> dict[str, Stored | ByHashProblem]:
        """Wait for the sealed batch's sync (calling ``while_waiting`` now and then), then give each of
        its temporaries its by-hash name.

        Returns what became of each content, by blob ID: where it is
        stored, or the problem that kept it from its name.
        """
        if not self._sealed:
            return {}
        placed: dict[str, Stored | ByHashProblem] = {}
        try:
            self._sealed_sync.wait(while_waiting=while_waiting)
            for blobid, pending in self._sealed.items():
                try:
                    written = self._link_into_place(pending)
                    if written:
                        pending.temp_name = None  # nothing left to remove
                        st = os.fstat(pending.fd)
                    else:
                        st = _holds_the_content(self._root_fd, pending.relative, pending.final, pending.size)
                        if st is None:
                            raise ByHashProblem("bad-by-hash",
                                                f"{display(pending.final)} vanished while it was stored")
                    placed[blobid] = Stored(blobid, pending.final, written, pending.size, (st.st_dev, st.st_ino))
                except ByHashProblem as exc:
                    placed[blobid] = exc
        finally:
            self._discard_sealed()
        return placed

    def place_pending(self, while_waiting: Callable[[], None] | None = None) -> dict[str, Stored | ByHashProblem]:
        """Place the sealed batch, then make the waiting temporaries durable and give them their names.

        Returns what became of each content of both, by blob ID (as :meth:`place_sealed`).
        """
        placed = self.place_sealed(while_waiting)
        self.seal_batch()
        placed.update(self.place_sealed(while_waiting))
        return placed

    def start_sync(self) -> "_Sync":
        """Start making every name placed so far, and the directories made for them, durable.

        The sync runs in the store's sync thread; ``wait()`` on what this
        returns before anything may rely on those names.
        """
        return self._syncer.request()

    def discard_pending(self) -> None:
        """Drop the temporaries waiting for a sync, sealed or not (an attempt that will be redone)."""
        self._discard_sealed()
        _discard_all(self._pending, self._temp_fd)
        self._pending_bytes = 0

    def _discard_sealed(self) -> None:
        if self._sealed_sync is not None:
            self._sealed_sync.wait(raise_error=False)  # nothing of the batch left in flight
            self._sealed_sync = None
        _discard_all(self._sealed, self._temp_fd)

    def _link_into_place(self, pending: Pending) -> bool:
        """Give a complete, durable temporary its by-hash name; False if the name exists."""
        # The rename first: in a store of some size, ab/cd/ is there already.
        level2 = os.path.dirname(pending.relative)
        try:
            try:
                return _rename_noreplace(self._temp_fd, pending.temp_name, self._root_fd, pending.relative)
            except FileNotFoundError:
                _mkdir(os.path.dirname(level2), self._fix_directory_mode, self._root_fd)
                _mkdir(level2, self._fix_directory_mode, self._root_fd)
            return _rename_noreplace(self._temp_fd, pending.temp_name, self._root_fd, pending.relative)
        except (FileNotFoundError, NotADirectoryError) as exc:
            # A dangling symlink or a file where ab/ or ab/cd/ belongs: this content's trouble, not the range's.
            if not _is_directory(os.path.dirname(level2), self._root_fd) or not _is_directory(level2, self._root_fd):
                raise _blocked_directory(pending.final) from None
            raise _naming(exc, pending.final) from None
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM) and _may_write_into(level2, self._root_fd):
                raise _naming(exc, pending.final) from None  # refused whatever the directory: the store's trouble
            raise _store_error(exc, pending.final) from None

    def _temporary(self, direct: bool = False) -> tuple[int, bytes]:
        """A new temporary file, opened for direct I/O if asked and the filesystem allows it."""
        if self._temp_directory is None:
            self._temp_directory, self._temp_fd = _worker_directory(self.root + b"/" + TEMP_DIRECTORY)
        flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC
        while True:
            # The directory is this worker's alone: a counter names without collisions.
            name = b"%d" % next(self._temp_numbers)
            try:
                fd = os.open(name, flags, FILE_MODE, dir_fd=self._temp_fd)
            except FileExistsError:
                continue
            except OSError as exc:
                raise _naming(exc, self._temp_directory + b"/" + name) from None
            if direct:
                try:
                    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
                except OSError:
                    pass  # tmpfs and others: through the page cache
            return fd, name


class _Syncer:
    """The store's ``syncfs`` calls, one after another in one thread (the GIL is released meanwhile).

    One thread for the store's life: asking for a sync while every core is
    busy must not wait for a new thread to be scheduled.
    """

    def __init__(self, fd: int):
        self._fd = fd
        self._requests: queue.SimpleQueue[_Sync | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def request(self) -> "_Sync":
        """A sync of the filesystem, begun after this call: everything written before it is covered."""
        if self._thread is None:
            thread = threading.Thread(target=self._run, name="relinker-syncfs", daemon=True)
            thread.start()  # a thread that cannot start (the process limit) is no thread to stop
            self._thread = thread
        sync = _Sync()
        self._requests.put(sync)
        return sync

    def _run(self) -> None:
        while (sync := self._requests.get()) is not None:
            try:
                syncfs(self._fd)
            except OSError as exc:
                sync.error = exc
            sync.done.set()

    def stop(self) -> None:
        """Let the syncs asked for finish, then end the thread (before the store's descriptor is closed)."""
        if self._thread is not None:
            self._requests.put(None)
            self._thread.join()
            self._thread = None


class _Sync:
    """One sync asked of a :class:`_Syncer`."""

    def __init__(self):
        self.error: OSError | None = None
        self.done = threading.Event()

    def wait(self, raise_error: bool = True, while_waiting: Callable[[], None] | None = None,
             every: float = 1.0) -> None:
        """Until the sync has returned; then raise its error, if it failed and ``raise_error``.

        ``while_waiting`` is called every ``every`` seconds meanwhile: a sync
        of a busy filesystem may take longer than a range's lease.
        """
        while not self.done.wait(every if while_waiting is not None else None):
            while_waiting()
        if self.error is not None and raise_error:
            raise self.error


def _unchanged(source_fd: int, before: os.stat_result, size: int) -> None:
    """SourceProblem unless the source read ``size`` bytes, its size then, and is as it was."""
    after = os.fstat(source_fd)
    if size != before.st_size or (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        raise SourceProblem("source-changed", "changed while being read")


def _naming(exc: OSError, path: bytes) -> OSError:
    """``exc`` naming ``path`` in full: the store's calls name paths below its descriptors."""
    return OSError(exc.errno, exc.strerror, path)


def _store_error(exc: OSError, path: bytes) -> OSError | ByHashProblem:
    """What an error of the store at ``path`` is: one content's problem, or trouble with the store (named)."""
    if exc.errno in CONTENT_ERRORS:
        return ByHashProblem("os-error", f"{display(path)}: {exc.strerror}")
    return _naming(exc, path)


def _batch_files_allowed() -> int:
    """BATCH_FILES, or fewer where this process may not open that many descriptors besides its others."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return BATCH_FILES
    try:
        already_open = len(os.listdir("/proc/self/fd"))
    except OSError:
        already_open = 0
    return max(1, min(BATCH_FILES, (soft - already_open - BATCH_FD_RESERVE) // 2))


def _may_write_into(directory: bytes, dir_fd: int) -> bool:
    """Whether this process may make entries in ``directory`` (below ``dir_fd``) by its permission bits."""
    try:
        return os.access(directory, os.W_OK | os.X_OK, dir_fd=dir_fd, effective_ids=True, follow_symlinks=False)
    except (OSError, NotImplementedError):
        return False


def symlinked_shards(root: bytes) -> frozenset[bytes]:
    """The store's shard directories (``ab`` and ``ab/cd``, relative to ``root``) that are symlinks.

    Read once when a run starts: its workers never store, link or count
    through them (a symlink there could lead out of the store), and record
    the contents below them as problems.
    """
    found = set()
    for level1 in shard_entries(root):
        if level1.is_symlink():
            found.add(level1.name)
        elif level1.is_dir(follow_symlinks=False):
            found.update(level1.name + b"/" + level2.name
                         for level2 in shard_entries(level1.path) if level2.is_symlink())
    return frozenset(found)


def shard_entries(directory: bytes) -> list[os.DirEntry]:
    """The entries of ``directory`` (the store's root, or an ``ab``) named as a shard is, in name order;
    none if it cannot be read."""
    try:
        with os.scandir(directory) as entries:
            return sorted((entry for entry in entries if len(entry.name) == 2), key=lambda entry: entry.name)
    except OSError:
        return []


def _mkdir(path: bytes, fix_mode: bool = True, dir_fd: int | None = None) -> None:
    """Make the directory if it is not there, rwxr-xr-x whatever the umask (``fix_mode``: it takes some away)."""
    try:
        os.mkdir(path, DIRECTORY_MODE, dir_fd=dir_fd)
    except FileExistsError:
        return
    if fix_mode:
        # Through a descriptor of the directory itself: never a symlink put in its place meanwhile.
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            os.fchmod(fd, DIRECTORY_MODE)
        finally:
            os.close(fd)


def _blocked_directory(final: bytes) -> ByHashProblem:
    """The problem of a content whose ``ab/`` or ``ab/cd/`` is something else (a file, a dangling symlink)."""
    return ByHashProblem("bad-by-hash", f"{display(final)}: a directory above it is not one (kept)")


def _is_directory(path: bytes, dir_fd: int) -> bool:
    """Whether ``path`` (below ``dir_fd``) is a directory itself, not a symlink to one."""
    try:
        return stat.S_ISDIR(os.lstat(path, dir_fd=dir_fd).st_mode)
    except OSError:
        return False


def _discard(fd: int, temp_name: bytes | None, dir_fd: int) -> None:
    """Close a temporary and remove it; never raises, so that it never hides the error being handled.

    One that cannot be removed (an I/O error) goes with the worker's directory (see ByHashStore.close).
    """
    try:
        os.close(fd)
    except OSError:
        pass
    if temp_name is None:
        return  # named
    try:
        os.unlink(temp_name, dir_fd=dir_fd)
    except OSError:
        pass  # gone already, or left for the directory's removal


def _discard_all(batch: dict, dir_fd: int) -> None:
    """Discard every temporary of ``batch``, each taken out first: none is ever closed twice."""
    while batch:
        _, pending = batch.popitem()
        _discard(pending.fd, pending.temp_name, dir_fd)


def _worker_directory(parent: bytes) -> tuple[bytes, int]:
    """A new temporaries directory for this process, and a descriptor of it that holds its lock.

    The directories of this host's dead workers are removed first. A worker
    holds an exclusive ``flock`` on its directory for as long as it lives: a
    process of another PID namespace (a container with the same host name)
    may carry a pid that looks dead from here, and its directory is locked.
    """
    _mkdir(parent)
    _remove_dead_workers_directories(parent)
    directory = b"%s/%s+%d+%s" % (parent, _host_name(), os.getpid(), secrets.token_hex(4).encode())
    os.mkdir(directory, 0o700)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return directory, fd


def _host_name() -> bytes:
    return socket.gethostname().encode("utf-8", "replace").replace(b"+", b"-")


def _remove_dead_workers_directories(parent: bytes) -> None:
    """Remove the temporaries directories under ``parent`` of this host's workers that are dead."""
    host = _host_name()
    try:
        if not stat.S_ISDIR(os.lstat(parent).st_mode):
            return  # never through a symlink
        with os.scandir(parent) as entries:
            for entry in entries:
                owner, _, rest = entry.name.partition(b"+")
                pid, _, _ = rest.partition(b"+")
                if owner == host and pid.isdigit() and not _alive(int(pid)) and entry.is_dir(follow_symlinks=False):
                    _remove_unless_locked(entry.path)
    except FileNotFoundError:
        pass


def _remove_unless_locked(directory: bytes) -> None:
    """Remove a worker's temporaries directory unless a live worker holds its lock."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return  # locked: its worker lives
    else:
        shutil.rmtree(directory, ignore_errors=True)
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host.

    A zombie is dead: a killed worker whose coordinator died with it stays a
    zombie as long as PID 1 does not reap it (some container inits never
    do). pids come round again: a live stranger keeps a dead worker's
    leftovers until it ends.
    """
    try:
        with open(b"/proc/%d/stat" % pid, "rb") as f:
            state = f.read().rpartition(b")")[2].split()[:1]
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    return state not in ([b"Z"], [b"X"])


def _load_libc_function(name: str, argtypes: list):
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = argtypes
    return function


_RENAMEAT2 = _load_libc_function("renameat2", [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                                               ctypes.c_uint])
_RENAME_NOREPLACE = 1


def _rename_noreplace(source_dir: int, source: bytes, target_dir: int, target: bytes) -> bool:
    """Rename ``source`` to ``target`` unless ``target`` exists (False then; ``source`` stays).

    ``renameat2(RENAME_NOREPLACE)`` where the system and filesystem have it;
    elsewhere a hard link, which fails as well on an existing name, and the
    temporary's removal.
    """
    if _RENAMEAT2 is not None:
        if _RENAMEAT2(source_dir, source, target_dir, target, _RENAME_NOREPLACE) == 0:
            return True
        error = ctypes.get_errno()
        if error == errno.EEXIST:
            return False
        # EPERM: a sandbox refusing a system call it does not know (a refusal of the filesystem's
        # refuses the link as well).
        if error not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EPERM):
            raise OSError(error, os.strerror(error), target)
    try:
        os.link(source, target, src_dir_fd=source_dir, dst_dir_fd=target_dir, follow_symlinks=False)
    except FileExistsError:
        return False
    os.unlink(source, dir_fd=source_dir)
    return True


def _holds_the_content(dir_fd: int, relative: bytes, final: bytes, size: int) -> os.stat_result | None:
    """The by-hash file under ``final``, for a content of ``size`` bytes (None: no entry).

    Anything else under the name (truncated, a symlink, a directory: a
    leftover of some other tool) is never linked to and never replaced: a
    :class:`ByHashProblem` for a person to look at.
    """
    try:
        st = os.lstat(relative, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        raise _blocked_directory(final) from None
    except OSError as exc:
        raise _store_error(exc, final) from None
    if not stat.S_ISREG(st.st_mode):
        raise ByHashProblem("bad-by-hash", f"{display(final)} is not a regular file (kept)")
    if st.st_size != size:
        raise ByHashProblem("bad-by-hash", f"{display(final)} has {st.st_size} bytes, the content {size} (kept)")
    return st


_SYNCFS = _load_libc_function("syncfs", [ctypes.c_int])


def syncfs(fd: int) -> None:
    """Write everything the filesystem holding ``fd`` keeps in memory to disk (``sync`` where syncfs is missing)."""
    if _SYNCFS is None:
        os.sync()
        return
    if _SYNCFS(fd) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"syncfs: {os.strerror(error)}")
