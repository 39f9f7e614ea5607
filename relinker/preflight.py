"""Before a run: whether this role may do what the mode does, and whether its roots can hold it.

Each check ends in one line (a UserError) before any worker starts: a
worker refused a statement, or one whose roots cannot be linked between,
would fail every range it claims.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from typing import TYPE_CHECKING

import psycopg

from relinker import store
from relinker.config import Settings
from relinker.errors import UserError
from relinker.paths import display, is_under

if TYPE_CHECKING:
    from relinker.jobs import Mode

#: What every run (and a dry run of a recorded one) reads of its checkpoints.
CHECKPOINT_READS = ("relinker_schema_migration", "relinker_run", "relinker_range", "relinker_problem",
                    "relinker_run_progress", "relinker_open_ranges", "relinker_problem_kinds")
#: What every run writes of them (whole rows: no columns named), and the sequences behind their keys
#: (USAGE of a column's sequence).
CHECKPOINT_WRITES = (
    ("relinker_run", "INSERT", ()), ("relinker_run", "UPDATE", ()), ("relinker_range", "INSERT", ()),
    ("relinker_range", "UPDATE", ()), ("relinker_problem", "INSERT", ()), ("relinker_problem", "DELETE", ()),
    ("relinker_run", "USAGE", ("run_id",)), ("relinker_problem", "USAGE", ("problem_id",)))
SQL_READ_ONLY = "SELECT pg_is_in_recovery() OR current_setting('default_transaction_read_only')::bool"
#: What this role lacks of the (table, privilege, column) given, in their order, as the GRANT's
#: object: a NULL column asks for the privilege on the table, a column the table lacks is no
#: write, USAGE is that of the column's sequence.
SQL_REFUSED = """
SELECT t.name, t.privilege, t.column_name, pg_get_serial_sequence(t.name, t.column_name)
FROM unnest(%(tables)s::text[], %(privileges)s::text[], %(columns)s::text[])
     WITH ORDINALITY AS t(name, privilege, column_name, n)
WHERE CASE WHEN t.privilege = 'USAGE'
                THEN NOT has_sequence_privilege(pg_get_serial_sequence(t.name, t.column_name), 'USAGE')
           WHEN t.column_name IS NULL THEN NOT has_table_privilege(t.name, t.privilege)
      ELSE EXISTS (SELECT FROM pg_attribute AS a
                   WHERE a.attrelid = t.name::regclass AND a.attname = t.column_name AND NOT a.attisdropped
                     AND NOT has_column_privilege(a.attrelid, a.attnum, t.privilege)) END
ORDER BY t.n
"""


def check_privileges(conn: psycopg.Connection, mode: Mode, *, writes: bool = True,
                     reads_checkpoints: bool = True) -> None:
    """UserError unless this role may read, and (``writes``) write, what a run of ``mode`` does
    (``reads_checkpoints``: a dry run's reading of a recorded run).

    A worker refused a statement fails its range, or dies at its first claim
    and is started again and again: one line before any work instead.
    """
    if writes and conn.execute(SQL_READ_ONLY).fetchone()[0]:
        raise UserError(f"the catalogue database is read-only for role {conn.info.user} (a standby, or "
                        "default_transaction_read_only): a run writes its checkpoints")
    reads = mode.catalogue_reads + (CHECKPOINT_READS if writes or reads_checkpoints else ())
    access = [(table, "SELECT", ()) for table in reads]
    if writes:
        access += CHECKPOINT_WRITES + mode.catalogue_writes
    asked = [(table, privilege, column) for table, privilege, columns in access for column in columns or (None,)]
    refused = conn.execute(SQL_REFUSED, {"tables": [t for t, _, _ in asked], "privileges": [p for _, p, _ in asked],
                                         "columns": [c for _, _, c in asked]}).fetchall()
    if not refused:
        return
    table, privilege, column, sequence = refused[0]
    user = conn.info.user
    doing = "writes" if privilege in ("INSERT", "UPDATE", "DELETE") else "reads"
    if privilege == "USAGE":
        raise UserError(f"role {user} may not use the sequence {sequence}, which a {mode.name} run takes keys from "
                        f"(GRANT USAGE ON SEQUENCE {sequence} TO {user})")
    columns = ""
    if column is not None:  # every column of that table and privilege the role lacks
        columns = f" ({', '.join(c for t, p, c, _ in refused if (t, p) == (table, privilege))})"
    raise UserError(f"role {user} may not {privilege} {table}{columns}, which a {mode.name} run {doing} "
                    f"(GRANT {privilege}{columns} ON {table} TO {user})")


def check_roots(settings: Settings, writes: frozenset = frozenset()) -> tuple[bytes, bytes]:
    """Both roots set, existing directories, on one filesystem; writable where ``writes`` says.

    When the archive is to be written, one real link from the store into it
    proves they share a mount: two bind mounts of one filesystem have the
    same st_dev, yet link() between them fails (EXDEV) for every path.
    """
    found = []
    for label, root in (("--by-hash-root", settings.by_hash_root), ("--archive-root", settings.archive_root)):
        if not root:
            raise UserError(f"{label} is not set (option, RELINKER_{label[2:].upper().replace('-', '_')} "
                            "or config file)")
        root = os.path.abspath(root)
        try:
            st = os.stat(root)
        except OSError as exc:
            raise UserError(f"{label} {display(root)}: {exc.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise UserError(f"{label} {display(root)} is not a directory")
        # Every mode reads both: a worker that cannot would die at its start, again and again.
        if not os.access(root, os.R_OK | os.X_OK, effective_ids=True):
            raise UserError(f"{label} {display(root)} is not readable")
        found.append((root, st))
    (by_hash_root, by_hash_stat), (archive_root, archive_stat) = found
    # One inside the other: a catalogued path could name a by-hash file, and replacing it would corrupt the store.
    real_store, real_archive = os.path.realpath(by_hash_root), os.path.realpath(archive_root)
    if is_under(real_store, real_archive) or is_under(real_archive, real_store):
        raise UserError(f"{display(by_hash_root)} and {display(archive_root)} overlap: the store and the archive "
                        "must be separate trees")
    if by_hash_stat.st_dev != archive_stat.st_dev:
        raise UserError(
            f"{display(by_hash_root)} and {display(archive_root)} are on different filesystems: "
            "hardlinks cannot cross filesystems")
    for label, root, kind in (("--archive-root", archive_root, "archive"), ("--by-hash-root", by_hash_root, "by-hash")):
        if kind in writes and not os.access(root, os.W_OK | os.X_OK, effective_ids=True):
            raise UserError(f"{label} {display(root)} is not writable")
    if "archive" in writes:
        _probe_link(by_hash_root, archive_root, can_write_store="by-hash" in writes)
    return by_hash_root, archive_root


def _probe_link(by_hash_root: bytes, archive_root: bytes, can_write_store: bool) -> None:
    """Link a file of the store into the archive root and remove it again (UserError if that fails).

    A mode that writes the store links a probe file of its own; the others
    look for a stored file, which in a store whose ``ab/cd/`` directories
    are mostly empty means listing all 65,536 of them.
    """
    # Random names: a probe left by a killed run (pids come round again) is no obstacle.
    name = b".relinker-probe-" + secrets.token_hex(8).encode()
    source, made, target = None, None, None
    try:
        if can_write_store:
            made = os.path.join(by_hash_root, name)
            os.close(os.open(made, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444))
            source = made
        else:
            source = _a_stored_file(by_hash_root)
            if source is None:
                return  # an empty store: relink has nothing to link anyway
        target = os.path.join(archive_root, name)  # a random name: removing it can only remove the probe
        os.link(source, target, follow_symlinks=False)
    except OSError as exc:
        if exc.errno == errno.EMLINK:
            # A stored file at its link limit (the empty content): the kernel refuses a link across
            # mounts (EXDEV) before it counts links, so the trees share a mount all the same.
            return
        hint = " (two mounts of one filesystem, as bind mounts are?)" if exc.errno == errno.EXDEV else ""
        raise UserError(f"cannot link from {display(by_hash_root)} into {display(archive_root)}: "
                        f"{exc.strerror}{hint}") from None
    finally:
        for leftover in (target, made):
            if leftover is not None:
                try:
                    os.unlink(leftover)
                except OSError:
                    pass


def _a_stored_file(by_hash_root: bytes) -> bytes | None:
    """Some regular file of the store (ab/cd/<hex>), or None."""
    for level1 in _subdirectories(by_hash_root):
        for level2 in _subdirectories(level1):
            try:
                with os.scandir(level2) as entries:
                    for entry in entries:
                        if entry.is_file(follow_symlinks=False):
                            return entry.path
            except OSError:
                continue  # an unreadable ab/cd/: its contents' problem, found by the run; not the roots'
    return None


def _subdirectories(path: bytes) -> list[bytes]:
    """The shard directories of ``path`` (not symlinks to one), in name order."""
    return [entry.path for entry in store.shard_entries(path) if entry.is_dir(follow_symlinks=False)]
