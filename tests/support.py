"""Helpers shared by the tests: capability dropping, a socket open to all, archive worlds and their catalogues."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os

CAP_DAC_OVERRIDE = 1
CAP_DAC_READ_SEARCH = 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _capabilities(libc, header, data, setting: bool) -> None:
    call = libc.capset if setting else libc.capget
    if call(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget/capset failed")


@contextlib.contextmanager
def obeying_file_permissions():
    """Make this thread subject to file permission bits, even as root.

    As root, mode 000 means nothing; dropping CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH from the effective set (they stay permitted, so they
    can be raised again) lets a test exercise "unreadable" for real.
    """
    if os.geteuid() != 0:
        yield
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _capabilities(libc, header, data, setting=False)
    saved = data[0].effective
    data[0].effective &= ~((1 << CAP_DAC_OVERRIDE) | (1 << CAP_DAC_READ_SEARCH))
    _capabilities(libc, header, data, setting=True)
    try:
        yield
    finally:
        data[0].effective = saved
        _capabilities(libc, header, data, setting=True)


@contextlib.contextmanager
def socket_open_to_all(dsn: str):
    """The directory of the server's Unix socket searchable by anyone, for a run that obeys file permissions.

    A server whose socket lies in its own data directory (the embedded one's,
    mode 0700 and another user's) cannot be reached by a root that obeys them.
    """
    from psycopg.conninfo import conninfo_to_dict

    host = conninfo_to_dict(dsn).get("host") or ""
    if not host.startswith("/"):
        yield
        return
    mode = os.stat(host).st_mode & 0o7777
    os.chmod(host, mode | 0o011)
    try:
        yield
    finally:
        os.chmod(host, mode)


import itertools
import shlex
import stat
from pathlib import Path

import blake3
import psycopg

from relinker import scan
from relinker.paths import archive_components, by_hash_path


#: What README's "The role that runs" lists for relink and count.
RELINK_GRANTS = """
GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role};
GRANT INSERT, UPDATE, DELETE ON relinker_run, relinker_range, relinker_problem TO {role};
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role};
GRANT UPDATE (n_hardlinks, expected_hardlinks) ON blobs TO {role}
"""


class ArchiveWorld:
    """A catalogue plus the by-hash store and archive it describes, on a real filesystem.

    Builds catalogue rows directly (production shape) and by-hash files with
    real content, so relink tests control every detail: excluded paths,
    non-file inodes, missing by-hash files, hostile path bytes.
    """

    def __init__(self, dsn: str, root: Path):
        self.dsn = dsn
        self.root = root
        self.by_hash = root / "by-hash"
        self.archive = root / "archive"
        self.by_hash.mkdir(parents=True, exist_ok=True)
        self.archive.mkdir(parents=True, exist_ok=True)
        self.conn = psycopg.connect(dsn, autocommit=True)
        self._inodes = itertools.count(1000)
        self._sizes: dict[str, int] = {}

    def close(self):
        self.conn.close()

    @property
    def by_hash_root(self) -> bytes:
        return os.fsencode(self.by_hash)

    @property
    def archive_root(self) -> bytes:
        return os.fsencode(self.archive)

    @contextlib.contextmanager
    def as_role(self, role: str, grants: str | None = None, *, connection_limit: int | None = None):
        """This world's commands (``argv``) run as a new role while this lasts, granted ``grants`` (SQL,
        ``{role}`` standing for its name; by default what README's "The role that runs" lists for
        relink and count)."""
        from psycopg.conninfo import make_conninfo

        from psycopg import sql

        limit = sql.SQL("" if connection_limit is None else " CONNECTION LIMIT {}").format(connection_limit)
        self.conn.execute(sql.SQL("CREATE ROLE {} LOGIN{}").format(sql.Identifier(role), limit))
        self.conn.execute((grants or RELINK_GRANTS).format(role=role))
        self.dsn, owner_dsn = make_conninfo(self.dsn, user=role), self.dsn
        try:
            yield role
        finally:
            self.dsn = owner_dsn
            self.conn.execute(sql.SQL("DROP OWNED BY {0}; DROP ROLE {0}").format(sql.Identifier(role)))

    def argv(self, *args: str) -> list[str]:
        """Global options pointing at this world, then ``args``."""
        return ["--db-url", self.dsn, "--by-hash-root", str(self.by_hash), "--archive-root", str(self.archive),
                *args]

    def resume(self, command: str, run_id: int, *extra: str) -> str:
        """The resume command relinker prints for a run started with :meth:`argv`'s global options."""
        return shlex.join(["relinker", command, "--run", str(run_id), "--by-hash-root", str(self.by_hash),
                           "--archive-root", str(self.archive), "--db-url", "DSN", *extra])

    def medium(self, name: str) -> str:
        medium_hash = scan.medium_hash_for(name)
        self.conn.execute("INSERT INTO medium (medium_hash, medium_human) VALUES (%s, %s) "
                          "ON CONFLICT DO NOTHING", (medium_hash, name))
        scan.ensure_medium_partitions(self.conn, medium_hash)
        return medium_hash

    def blob(self, content: bytes, *, store: bool = True) -> str:
        """A blob row for ``content``, with its by-hash file unless ``store`` is False."""
        blobid = blake3.blake3(content).hexdigest()
        self._sizes[blobid] = len(content)
        if store:
            self.store_file(blobid, content)
        self.conn.execute("INSERT INTO blobs (blobid) VALUES (%s) ON CONFLICT DO NOTHING", (blobid,))
        return blobid

    def store_file(self, blobid: str, content: bytes) -> None:
        """``content`` under ``blobid``'s by-hash name (read-only), unless something is there already."""
        path = by_hash_path(self.by_hash_root, blobid)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if not os.path.exists(path):
            with open(path, "wb") as f:
                f.write(content)
            os.chmod(path, 0o444)

    def inode(self, medium_hash: str, paths: list[bytes], blobid: str | None, *, fs_type: str = "f",
              excluded: dict[bytes, str] | None = None) -> int:
        """An inode of ``medium_hash`` with ``paths`` (some maybe excluded)."""
        ino = next(self._inodes)
        self.conn.execute(
            "INSERT INTO inode (medium_hash, dev, ino, nlink, size, fs_type, blobid, copied, by_hash_created) "
            "VALUES (%s, 1, %s, %s, %s, %s, %s, %s, %s)",
            (medium_hash, ino, len(paths), self._sizes.get(blobid, 0), fs_type, blobid, blobid is not None,
             blobid is not None))
        with self.conn.cursor().copy(
                "COPY path (medium_hash, dev, ino, path, blobid, exclude_reason) FROM STDIN") as copy:
            for p in paths:
                copy.write_row((medium_hash, 1, ino, p, blobid, (excluded or {}).get(p)))
        return ino

    def archive_path(self, stored: bytes) -> bytes:
        return self.archive_root + b"/" + b"/".join(archive_components(stored))

    def replace_with_stale_copy(self, stored: bytes, content: bytes | None = None) -> bytes:
        """Swap the archive link of ``stored`` for an ordinary file (by default a copy of what
        it held, as the copier's orphaned copies are); return its path."""
        path = self.archive_path(stored)
        if content is None:
            with open(path, "rb") as f:
                content = f.read()
        os.unlink(path)
        with open(path, "wb") as f:
            f.write(content)
        return path

    def expected(self) -> dict[str, set[bytes]]:
        """blobid -> stored paths that must be linked (the catalogue's truth)."""
        out: dict[str, set[bytes]] = {}
        for blobid, path in self.conn.execute(
                "SELECT i.blobid, p.path FROM inode i JOIN path p USING (medium_hash, ino) "
                "WHERE i.fs_type = 'f' AND p.exclude_reason IS NULL AND i.blobid IS NOT NULL"):
            out.setdefault(blobid, set()).add(bytes(path))
        return out

    def linked(self, blobid: str, stored: bytes) -> bool:
        try:
            target = os.lstat(by_hash_path(self.by_hash_root, blobid))
            st = os.lstat(self.archive_path(stored))
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino)

    def n_hardlinks(self) -> dict[str, int]:
        return dict(self.conn.execute("SELECT blobid, n_hardlinks FROM blobs"))

    def assert_complete(self, run_id: int | None = None) -> None:
        """Every expected link present, n_hardlinks and expected_hardlinks exact, every range done, no temporaries."""
        expected = self.expected()
        for blobid, paths in expected.items():
            for p in paths:
                assert self.linked(blobid, p), f"{p!r} is not linked to {blobid}"
        counts = self.n_hardlinks()
        expected_counts = dict(self.conn.execute("SELECT blobid, expected_hardlinks FROM blobs"))
        for blobid, paths in expected.items():
            assert counts[blobid] == len(paths), (blobid, counts[blobid], len(paths))
            assert expected_counts[blobid] == len(paths), (blobid, expected_counts[blobid], len(paths))
        if run_id is not None:
            states = self.conn.execute("SELECT status, count(*) FROM relinker_range WHERE run_id = %s "
                                       "GROUP BY status", (run_id,)).fetchall()
            assert dict(states).keys() == {"done"}, states
            assert self.conn.execute("SELECT status FROM relinker_run WHERE run_id = %s",
                                     (run_id,)).fetchone() == ("done",)
        assert self.temporaries() == []

    def temporaries(self) -> list[bytes]:
        found = []
        for directory, _dirs, files in os.walk(self.archive_root):
            found += [os.path.join(directory, f) for f in files if f.startswith(b".relinker-")]
        return found

    def tree(self) -> dict[bytes, tuple]:
        """Every entry under the world's root: (type, inode, size) for change detection."""
        out = {}
        for directory, dirs, files in os.walk(os.fsencode(self.root)):
            for name in dirs + files:
                path = os.path.join(directory, name)
                st = os.lstat(path)
                out[path] = (stat.S_IFMT(st.st_mode), st.st_ino, st.st_size, st.st_nlink)
        return out

    def last_run(self) -> int:
        return self.conn.execute("SELECT max(run_id) FROM relinker_run").fetchone()[0]

    def bulk(self, n_blobs: int, paths_per_blob: int = 2, media: int = 2, directories: int = 200) -> None:
        """Many blobs at once (COPY): each with one inode per medium and
        ``paths_per_blob`` paths spread over ``directories`` directories."""
        medium_hashes = [self.medium(f"bulk-{i}") for i in range(media)]
        inode_rows, path_rows = [], []
        made = set()
        for n in range(n_blobs):
            content = b"bulk content %d" % n
            blobid = blake3.blake3(content).hexdigest()
            path = by_hash_path(self.by_hash_root, blobid)
            if path[:-65] not in made:
                os.makedirs(path[:-65], exist_ok=True)
                made.add(path[:-65])
            with open(path, "wb") as f:
                f.write(content)
            medium_hash = medium_hashes[n % media]
            ino = next(self._inodes)
            inode_rows.append((medium_hash, 1, ino, paths_per_blob, len(content), "f", blobid, True, True))
            for k in range(paths_per_blob):
                stored = b"/mnt/ntt/%s/d%03d/f%07d-%d" % (medium_hash.encode(), (n * 7 + k) % directories, n, k)
                path_rows.append((medium_hash, 1, ino, stored, blobid))
        with self.conn.cursor().copy("COPY blobs (blobid) FROM STDIN") as copy:
            for row in inode_rows:
                copy.write_row((row[6],))
        with self.conn.cursor().copy("COPY inode (medium_hash, dev, ino, nlink, size, fs_type, blobid, copied, "
                                     "by_hash_created) FROM STDIN") as copy:
            for row in inode_rows:
                copy.write_row(row)
        with self.conn.cursor().copy("COPY path (medium_hash, dev, ino, path, blobid) FROM STDIN") as copy:
            for row in path_rows:
                copy.write_row(row)
        self.conn.execute("ANALYZE")


@contextlib.contextmanager
def read_only_directory(path):
    """A directory nobody (root included) can create entries in, for the test's duration.

    Mode 0555 stops ordinary users; root ignores it, so as root the directory
    is made immutable (chattr +i) instead.
    """
    import subprocess

    os.chmod(path, 0o555)
    immutable = os.geteuid() == 0
    if immutable:
        subprocess.run(["chattr", "+i", os.fsdecode(path)], check=True)
    try:
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", os.fsdecode(path)], check=True)
        os.chmod(path, 0o755)
