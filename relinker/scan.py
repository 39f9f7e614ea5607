"""Catalogue a real directory tree as one medium (``relinker scan``).

Only metadata is read: regular files keep ``blobid`` NULL until ``relinker
copy`` hashes them. Paths are stored as the absolute bytes the filesystem
returned. The walk stays on the tree's own filesystem (like ``find -xdev``),
never follows symlinks, and counts and skips what it cannot read.
"""

from __future__ import annotations

import dataclasses
import errno
import fnmatch
import logging
import os
import stat

import blake3
import psycopg
from psycopg import sql

from relinker import checkpoint, db, dbtext, migrations
from relinker.errors import OUT_OF_RESOURCES, UserError
from relinker.linker import raise_open_file_limit
from relinker.paths import display
from relinker.sources import open_beneath

log = logging.getLogger(__name__)

FS_TYPES = {
    stat.S_IFREG: "f",
    stat.S_IFDIR: "d",
    stat.S_IFLNK: "l",
    stat.S_IFBLK: "b",
    stat.S_IFCHR: "c",
    stat.S_IFIFO: "p",
    stat.S_IFSOCK: "s",
}

SQL_UPSERT_MEDIUM = """
INSERT INTO medium (medium_hash, medium_human) VALUES (%s, %s)
ON CONFLICT (medium_hash) DO UPDATE SET medium_human = EXCLUDED.medium_human
"""
# copy reads a scanned medium's paths as they are (see relinker.paths.source_location).
SQL_RECORD_SCAN = """
INSERT INTO relinker_scanned_medium (medium_hash, root) VALUES (%s, %s)
ON CONFLICT (medium_hash) DO UPDATE SET root = EXCLUDED.root, scanned_at = now()
"""
SQL_OTHER_NAMESAKE = """
SELECT medium_hash FROM medium WHERE (medium_human = %(name)s OR medium_hash = %(name)s) AND medium_hash <> %(hash)s
LIMIT 1
"""
# A rescan drops the medium's inodes, whose paths their blobs' expected_hardlinks count: those
# counts are made afresh (NULL: copy and relink count a blob's paths again). The rows are locked in
# blob ID order, as copy and relink lock them, as the scan's last statement: not for its walk.
# (Kept on the server: a medium of millions of inodes names as many blobs.)
SQL_REMEMBER_NAMED = """
CREATE TEMP TABLE relinker_scan_named ON COMMIT DROP AS
SELECT DISTINCT blobid FROM inode WHERE medium_hash = %s AND blobid IS NOT NULL
"""
SQL_FORGET_NAMED = "DROP TABLE IF EXISTS pg_temp.relinker_scan_named"
# Statements that would write no row are not run: the catalogue's statement triggers fire all the same.
SQL_COUNTS_TO_FORGET = """
SELECT EXISTS (SELECT 1 FROM blobs AS b
               WHERE b.blobid IN (SELECT blobid FROM relinker_scan_named) AND b.expected_hardlinks IS NOT NULL)
"""
SQL_FORGET_COUNTS = """
WITH named AS (
    SELECT b.blobid FROM blobs AS b
    WHERE b.blobid IN (SELECT blobid FROM relinker_scan_named) AND b.expected_hardlinks IS NOT NULL
    ORDER BY b.blobid FOR UPDATE
)
UPDATE blobs AS b SET expected_hardlinks = NULL FROM named WHERE b.blobid = named.blobid
"""
#: What a scan must not overlap: runs that count or check the paths it replaces.
SCAN_EXCLUDES = frozenset({"relink", "copy", "count", "verify"})
# Copy runs not finished that cover this medium (of it, or of every medium, a
# medium new to the catalogue included): their ranges are inode numbers as they
# were, or leave the medium out.
SQL_SUPERSEDE_COPY_RUNS = """
UPDATE relinker_run SET status = 'superseded', finished_at = now()
WHERE mode = 'copy' AND status = 'open' AND (options->>'medium' IS NULL OR options->>'medium' = %(medium)s)
RETURNING run_id
"""
SQL_HAS_ROWS = """
SELECT EXISTS (SELECT 1 FROM path WHERE medium_hash = %(medium)s),
       EXISTS (SELECT 1 FROM inode WHERE medium_hash = %(medium)s)
"""
SQL_DELETE_PATHS = "DELETE FROM path WHERE medium_hash = %(medium)s"
SQL_DELETE_INODES = "DELETE FROM inode WHERE medium_hash = %(medium)s"
SQL_COPY_INODES = """
COPY inode (medium_hash, dev, ino, nlink, size, mtime, fs_type, copied)
FROM STDIN
"""
# The walk finds paths before it knows every inode, and production's path
# partitions have foreign keys to inode's: paths wait in a temporary table
# until the inodes are in. Its path column has the catalogue's type.
SQL_FORGET_WALKED = "DROP TABLE IF EXISTS pg_temp.relinker_scan_paths"
SQL_HOLD_WALKED = "CREATE TEMP TABLE relinker_scan_paths (dev bigint, ino bigint, path {}) ON COMMIT DROP"
SQL_COPY_WALKED = "COPY pg_temp.relinker_scan_paths (dev, ino, path) FROM STDIN"
SQL_INSERT_PATHS = """
INSERT INTO path (medium_hash, dev, ino, path)
SELECT %(medium)s, dev, ino, path FROM pg_temp.relinker_scan_paths
"""


@dataclasses.dataclass
class ScanResult:
    """What a scan catalogued and what it skipped."""

    medium_hash: str
    paths: int = 0
    inodes: int = 0
    files: int = 0
    unreadable: int = 0
    #: entries listed, then gone or replaced before they were looked at (the tree changed as it was walked)
    changed: int = 0
    other_filesystem: int = 0
    unrepresentable: int = 0
    excluded: int = 0
    #: copy runs left unfinished, planned before this scan, that cover the medium (see SQL_SUPERSEDE_COPY_RUNS)
    superseded: list[int] = dataclasses.field(default_factory=list)


def medium_hash_for(name: str) -> str:
    """A stable medium hash for a medium name (the same name, the same hash)."""
    return blake3.blake3(b"relinker medium\0" + name.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def scan_tree(conn: psycopg.Connection, name: str, root: bytes, exclude: list[bytes] = ()) -> ScanResult:
    """Replace medium ``name``'s rows with a fresh catalogue of ``root``.

    Entries whose name matches one of the ``exclude`` shell patterns (bytes,
    fnmatch rules) are left out, and excluded directories are not entered.
    ``conn`` should be in autocommit mode: inside a transaction of the caller's,
    the locks a scan takes for moments last until the caller commits.
    """
    migrations.require_migrated(conn)
    migrations.require_owner(conn, "scan", ("inode", "path"), "a scan gives a medium's partitions and rows")
    root = os.path.abspath(root)
    try:
        root_stat = os.lstat(root)
    except OSError as exc:
        raise UserError(f"cannot scan {display(root)}: {exc.strerror}") from None
    if stat.S_ISLNK(root_stat.st_mode):
        raise UserError(f"cannot scan {display(root)}: a symlink (scan never goes through one: give the "
                        f"directory it leads to, {display(os.path.realpath(root))})")
    if not stat.S_ISDIR(root_stat.st_mode):
        raise UserError(f"cannot scan {display(root)}: not a directory")
    text_paths = db.column_type(conn, "path", "path") != "bytea"

    result = ScanResult(medium_hash_for(name))
    # A medium is named by its name in copy --medium: two of one name could be told apart by hash only.
    namesake = conn.execute(SQL_OTHER_NAMESAKE, {"name": name, "hash": result.medium_hash}).fetchone()
    if namesake:
        raise UserError(f"{name!r} names another medium already ({namesake[0]}; copy --medium would not know "
                        "which): choose another name")
    raise_open_file_limit()
    try:
        checkpoint.hold_mode(conn, "scan", SCAN_EXCLUDES)
    except checkpoint.ModeClash as clash:
        raise UserError(f"{clash}: a scan must not overlap it (run one after the other)") from None
    try:
        # Only once no clashing run is at work: a partition locks its table against every reader.
        ensure_medium_partitions(conn, result.medium_hash)
        _replace_medium(conn, name, root, root_stat, exclude, text_paths, result)
    finally:
        # In a caller's transaction that failed, the release would fail too and hide why: the mode's
        # lock then lasts until the session ends.
        if db.alive(conn) and conn.info.transaction_status != psycopg.pq.TransactionStatus.INERROR:
            checkpoint.release_mode(conn, "scan")
    return result


def _replace_medium(conn: psycopg.Connection, name: str, root: bytes, root_stat: os.stat_result,
                    exclude: list[bytes], text_paths: bool, result: ScanResult) -> None:
    """The medium's rows replaced by those of the walk of ``root``, in one transaction."""
    inodes: dict[int, tuple] = {}
    medium = {"medium": result.medium_hash}
    with conn.transaction():
        conn.execute(SQL_UPSERT_MEDIUM, (result.medium_hash, name))
        conn.execute(SQL_RECORD_SCAN, (result.medium_hash, root))
        # A caller's own transaction may hold an earlier scan's temporary tables.
        conn.execute(SQL_FORGET_NAMED)
        conn.execute(SQL_FORGET_WALKED)
        conn.execute(SQL_REMEMBER_NAMED, (result.medium_hash,))
        has_paths, has_inodes = conn.execute(SQL_HAS_ROWS, medium).fetchone()
        if has_paths:
            conn.execute(SQL_DELETE_PATHS, medium)
        if has_inodes:
            conn.execute(SQL_DELETE_INODES, medium)
        conn.execute(sql.SQL(SQL_HOLD_WALKED).format(sql.SQL("text" if text_paths else "bytea")))
        # Older catalogues keep paths as text, read back as the bytes their
        # database's encoding gives it (relinker_path): a name is stored as the
        # text those bytes are in that encoding, or, where they are none, skipped.
        encoding = dbtext.text_encoding(conn)
        with conn.cursor().copy(SQL_COPY_WALKED) as copy:
            for path, st in _walk(root, root_stat, result, list(exclude)):
                stored: bytes | str = path
                if text_paths:
                    try:
                        stored = path.decode(encoding)
                    except UnicodeDecodeError:
                        result.unrepresentable += 1
                        log.warning("skipped %s: not valid %s (path column is text)", display(path), encoding)
                        continue
                copy.write_row((st.st_dev, st.st_ino, stored))
                result.paths += 1
                if st.st_ino not in inodes:
                    fs_type = FS_TYPES.get(stat.S_IFMT(st.st_mode), "?")
                    inodes[st.st_ino] = (
                        result.medium_hash, st.st_dev, st.st_ino, st.st_nlink,
                        st.st_size, int(st.st_mtime), fs_type, False,
                    )
                    result.files += fs_type == "f"
        with conn.cursor().copy(SQL_COPY_INODES) as copy:
            for row in inodes.values():
                copy.write_row(row)
        result.inodes = len(inodes)
        conn.execute(SQL_INSERT_PATHS, medium)
        result.superseded = [run_id for run_id, in conn.execute(SQL_SUPERSEDE_COPY_RUNS, medium)]
        if conn.execute(SQL_COUNTS_TO_FORGET).fetchone()[0]:
            conn.execute(SQL_FORGET_COUNTS)
        analyze_medium(conn, result.medium_hash)


# The relation that holds a medium's rows: its partition, or the table itself.
SQL_HOLDER = """
SELECT n.nspname, c.relname
FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
WHERE c.oid = (SELECT tableoid FROM {} WHERE medium_hash = %s LIMIT 1)
"""
SQL_ANALYZE = "ANALYZE {}"


def analyze_medium(conn: psycopg.Connection, medium_hash: str) -> None:
    """Give the planner statistics for a medium just loaded (its partitions only).

    Without them the first copy of the medium plans its per-blob lookups as
    scans of the whole partition, for every range, until autovacuum happens
    to analyze it.
    """
    for table in ("inode", "path"):
        row = conn.execute(sql.SQL(SQL_HOLDER).format(sql.Identifier(table)), (medium_hash,)).fetchone()
        if row is not None:
            conn.execute(sql.SQL(SQL_ANALYZE).format(sql.Identifier(*row)))


def _walk(root: bytes, root_stat: os.stat_result, result: ScanResult, exclude: list[bytes]):
    """Yield (path, lstat) for root (its lstat given) and everything below it on its filesystem.

    Each directory is opened beneath the root through no symlink, and only if
    it is still the one its parent listed (the root: the one lstat saw): one
    swapped for a symlink (or another directory) meanwhile is skipped, never
    walked into.
    """
    device = root_stat.st_dev
    yield root, root_stat
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        pending = [(root, b"", (root_stat.st_dev, root_stat.st_ino))]
        while pending:
            directory, below, identity = pending.pop()
            try:
                fd = os.dup(root_fd) if not below else open_beneath(root_fd, below)
            except OSError as exc:
                _skipped(result, exc, f"directory {display(directory)}")
                continue
            try:
                found = os.fstat(fd)
                if not stat.S_ISDIR(found.st_mode) or (found.st_dev, found.st_ino) != identity:
                    result.changed += 1
                    log.warning("skipped %s: replaced while the tree was walked", display(directory))
                    continue
                yield from _entries(fd, directory, below, device, result, exclude, pending)
            finally:
                os.close(fd)
    finally:
        os.close(root_fd)


def _skipped(result: ScanResult, exc: OSError, what: str) -> None:
    """Count and log an entry that could not be looked at: unreadable, or listed and gone or replaced
    since (a directory listed, a symlink when opened beneath the root: ELOOP). UserError for this
    process out of a resource: the medium's rows would lose what the process could not open."""
    _refuse_out_of_resources(exc, what)
    if exc.errno in (errno.ENOENT, errno.ELOOP):
        result.changed += 1
        log.warning("skipped %s: %s while the tree was walked", what,
                    "gone" if exc.errno == errno.ENOENT else "replaced by a symlink (not followed)")
    else:
        result.unreadable += 1
        log.warning("skipped %s: %s", what, exc.strerror)


def _refuse_out_of_resources(exc: OSError, what: str) -> None:
    if exc.errno in OUT_OF_RESOURCES:
        hint = " (raise the open files limit: ulimit -n)" if exc.errno != errno.ENOMEM else ""
        raise UserError(f"scan stopped at {what}, the medium's rows left as they were: {exc.strerror}{hint}") \
            from None


def _entries(fd: int, directory: bytes, below: bytes, device: int, result: ScanResult, exclude: list[bytes],
             pending: list):
    """The entries of one open directory, as _walk yields them; its subdirectories onto ``pending``."""
    try:
        entries = list(os.scandir(fd))
    except OSError as exc:
        _refuse_out_of_resources(exc, f"directory {display(directory)}")
        result.unreadable += 1
        log.warning("skipped unreadable directory %s: %s", display(directory), exc.strerror)
        return
    for entry in sorted(entries, key=lambda e: e.name):
        name = os.fsencode(entry.name)
        path = directory.rstrip(b"/") + b"/" + name
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude):
            result.excluded += 1
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError as exc:
            _skipped(result, exc, display(path))
            continue
        if st.st_dev != device:
            result.other_filesystem += 1
            log.info("skipped %s: on another filesystem", display(path))
            continue
        if stat.S_ISREG(st.st_mode) and not os.access(name, os.R_OK, dir_fd=fd, effective_ids=True,
                                                       follow_symlinks=False):
            result.unreadable += 1
            log.warning("skipped unreadable file %s", display(path))
            continue
        if stat.S_ISDIR(st.st_mode):
            pending.append((path, below + b"/" + name if below else name, (st.st_dev, st.st_ino)))
        yield path, st


# Whether a partition of the table already takes the medium (made by relinker, or by NTT under another name).
SQL_HAS_PARTITION = """
SELECT EXISTS (
    SELECT 1 FROM pg_inherits AS h JOIN pg_class AS c ON c.oid = h.inhrelid
    WHERE h.inhparent = to_regclass(%(table)s)
      AND position(quote_literal(%(medium)s) IN pg_get_expr(c.relpartbound, c.oid)) > 0)
"""


SQL_OWNER = "SELECT pg_get_userbyid(relowner), current_user FROM pg_class WHERE oid = to_regclass(%(table)s)"


SQL_MEDIUM_PARTITION = "CREATE TABLE IF NOT EXISTS {} PARTITION OF {} FOR VALUES IN ({})"
SQL_SET_LOCAL_ROLE = "SET LOCAL ROLE {}"


def ensure_medium_partitions(conn: psycopg.Connection, medium_hash: str) -> None:
    """Give a new medium its own partition of inode and path, as NTT does.

    Only for partitioned catalogues, and only where no partition takes the
    medium yet (one NTT made under its own name is fine). Creating one locks
    its table against every reader: on an autocommit connection each is
    made in a short transaction of its own, waiting for that lock no longer
    than migrate's statements do; in a caller's transaction, inside it, in a
    savepoint (a failure leaves that transaction usable) and waiting as the
    caller's other statements do.
    """
    for table in ("inode", "path"):
        if db.relkind(conn, table) != "p" or conn.execute(
                SQL_HAS_PARTITION, {"table": table, "medium": medium_hash}).fetchone()[0]:
            continue
        statement = sql.SQL(SQL_MEDIUM_PARTITION).format(
            sql.Identifier(f"{table}_{medium_hash}"), sql.Identifier(table), sql.Literal(medium_hash)
        )
        # Made as the table's owner, not as the member of its role who scans: a partition of another
        # role's would stop the owner's next migrate at its indexes.
        owner, me = conn.execute(SQL_OWNER, {"table": table}).fetchone()
        as_owner = [(sql.SQL(SQL_SET_LOCAL_ROLE).format(sql.Identifier(owner)), None)] if owner != me else []
        back = [(sql.SQL(SQL_SET_LOCAL_ROLE).format(sql.Identifier(me)), None)] if owner != me else []
        if db.in_callers_transaction(conn):
            with conn.transaction():
                for step, _ in [*as_owner, (statement, None), *back]:
                    conn.execute(step)
            continue
        try:
            migrations.briefly_locking(conn, [*as_owner, (statement, None)],
                                       f"creating the medium's partition of {table}",
                                       attempts=1, again="run `relinker scan` again")
        except psycopg.errors.InvalidObjectDefinition:
            pass  # "would overlap partition ...": made meanwhile by someone else
