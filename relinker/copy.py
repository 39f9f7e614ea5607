"""Copy mode (the seed's normal mode): content into by-hash, then the archive links.

For every regular-file inode whose content is not stored yet (``blobid`` is
NULL: an inode the NTT copier stored has its ``blobid`` whatever
``by_hash_created`` says), in checkpointed ranges of inodes:

1. read the content once from a source path into the by-hash store
   (:mod:`relinker.store`: hashed on the way into a temporary file,
   dropped unsynced when its by-hash name exists, otherwise named
   ``ab/cd/<hex>`` once its batch is durable). An empty file gets the blob ID
   the catalogue uses for the empty content (see :mod:`relinker.catalogue`);
2. once the content has its by-hash name, link every path of the inode into
   the archive (the linker relink uses);
3. at the end of the range, one more sync makes the new names durable, then
   in one transaction: ``inode.blobid``,
   ``by_hash_created``, ``copied``, ``processed_at`` (and ``status``
   where the catalogue has the NTT status model), the ``blobs`` rows,
   ``path.blobid``, the errors of inodes that could not be stored, and
   ``blobs.n_hardlinks`` of every blob the range touched, each as one
   batched statement. Rows whose content got stored meanwhile are never
   written.

``n_hardlinks`` here is the by-hash file's link count minus one, capped at the
blob's catalogued path count: exact while no links exist outside the
catalogue (``relinker count`` recounts path by path). That path count
(``expected_hardlinks``) is the range's own for a new row and grows by the
range's paths for a row that existed (see SQL_BLOB_COUNTS for when it is
counted again).
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import logging
import os
from typing import Callable

import psycopg
from psycopg import sql

from relinker import catalogue, db
from relinker.catalogue import InodeColumns
from relinker.checkpoint import Bounds, Range
from relinker.errors import UserError, unless_out_of_resources
from relinker.jobs import Mode
from relinker.linker import ArchiveLinker, Outcome, new_tally
from relinker.paths import UnsafePath, display, order_remaps
from relinker.pool import LIMIT_KINDS, RangeContext, WorkSpec
from relinker.sources import MediumSources, holds_place, source_path
from relinker.store import ByHashStore, InodeProblem, Pending, SourceProblem, Stored

log = logging.getLogger(__name__)

MODE = "copy"
#: Inodes planned per range. A range ends with two syncs and the catalogue's
#: statements that no other work overlaps: fewer, larger ranges of small files.
INODES_PER_RANGE = 2000
#: Content planned per range at most (a redo after a crash reads it again).
BYTES_PER_RANGE = 1 << 30

# An inode with a blobid has its content stored (the NTT copier's batch mode
# never set by_hash_created); one its tools gave up on (failed_permanent) is
# left alone unless asked (--retry-permanent).
TO_COPY = "i.fs_type = 'f' AND i.blobid IS NULL"
NOT_GIVEN_UP = "AND i.status IS DISTINCT FROM 'failed_permanent'"
# The inode range is repeated on path: PostgreSQL carries no range across a
# join's equality, and without it the plan read the medium's every path for
# every range (a sequential scan of the partition, hashed).
SQL_RANGE_WORK = """
    SELECT i.ino, i.size, i.dev, p.path
    FROM inode AS i
    JOIN relinker_path AS p ON p.medium_hash = i.medium_hash AND p.ino = i.ino
    WHERE i.medium_hash = %(medium)s AND i.ino >= %(ino_lo)s AND i.ino < %(ino_hi)s
      AND p.medium_hash = %(medium)s AND p.ino >= %(ino_lo)s AND p.ino < %(ino_hi)s
      AND {to_copy} AND p.exclude_reason IS NULL
    ORDER BY i.ino, p.path
"""
# Sorted, like the lock below, so two workers never wait on each other in a
# cycle. Returns the rows it inserted: until this transaction commits, a
# worker inserting the same blob waits for it, so those need no lock. A new
# row gets its counts here, with the paths of this range's inodes as its
# expected count: relinker has an inode name a blob only once its row exists
# (a worker marking others meanwhile waits for this row, then recounts them
# all), and SQL_BLOB_COUNTS' count costs one index probe per medium
# (partition) per blob. A catalogue may lack the row of a content its inodes
# name; the finishing step counts those blobs in full (see finalize).
SQL_NEW_BLOBS = """
INSERT INTO blobs (blobid, n_hardlinks, expected_hardlinks)
SELECT c.blobid, least(c.links, c.expected), c.expected
FROM unnest(%(count_blobids)s::text[], %(links)s::int[], %(expected)s::int[]) AS c(blobid, links, expected)
ORDER BY c.blobid
ON CONFLICT (blobid) DO NOTHING
RETURNING blobid
"""
SQL_LOCK_BLOBS = """
SELECT blobid FROM blobs WHERE blobid = ANY(%(lock_blobids)s::text[]) ORDER BY blobid FOR UPDATE
"""
# Only inodes still without content: one stored meanwhile (by another
# tool, or a run whose commit reply was lost) is someone else's record now.
# path.blobid, the denormalised copy, follows for exactly the inodes marked.
# Returns the inodes it marked. The range's bounds, as in SQL_RANGE_WORK,
# keep both updates on the range's slice of each table's index (without
# them: a sequential scan of the medium's inodes and one of its paths).
SQL_MARK_INODES = """
WITH marked AS (
    UPDATE inode AS i
    SET blobid = c.blobid, by_hash_created = true, copied = true, processed_at = now() {success}
    FROM unnest(%(inos)s::bigint[], %(inode_blobids)s::text[]) AS c(ino, blobid)
    WHERE i.medium_hash = %(medium)s AND i.ino >= %(ino_lo)s AND i.ino < %(ino_hi)s
      AND i.ino = c.ino AND i.blobid IS NULL
    RETURNING i.ino, i.blobid
), paths AS (
    UPDATE path AS p SET blobid = m.blobid
    FROM marked AS m
    WHERE p.medium_hash = %(medium)s AND p.ino >= %(ino_lo)s AND p.ino < %(ino_hi)s
      AND p.ino = m.ino AND p.blobid IS DISTINCT FROM m.blobid
)
SELECT ino FROM marked
"""
# The status model's success, as the NTT copier wrote it; error_type
# describes a failure, and this inode has none any more.
STATUS_SUCCESS = ", status = 'success'"
ERROR_TYPE_CLEARED = ", error_type = NULL"
# processed_at means "successfully processed": a failure leaves it alone. A
# rerun that meets the same trouble does not add the same line again.
SQL_INODE_ERRORS = """
UPDATE inode AS i
SET errors = CASE WHEN c.error = ANY(coalesce(i.errors, '{{}}')) THEN i.errors
                  ELSE array_append(coalesce(i.errors, '{{}}'), c.error) END {failure}
FROM unnest(%(error_inos)s::bigint[], %(errors)s::text[], %(error_kinds)s::text[],
            %(error_states)s::text[]) AS c(ino, error, kind, state)
WHERE i.medium_hash = %(medium)s AND i.ino >= %(ino_lo)s AND i.ino < %(ino_hi)s
  AND i.ino = c.ino AND i.blobid IS NULL
"""
# A retryable failure (say, the medium is not mounted: nothing was tried)
# never turns a permanent one back into something to retry.
STATUS_FAILED = """, status = CASE WHEN i.status = 'failed_permanent' AND c.state = 'failed_retryable'
                           THEN i.status ELSE c.state END"""
ERROR_TYPE_SET = """, error_type = CASE WHEN i.status = 'failed_permanent' AND c.state = 'failed_retryable'
                               THEN i.error_type ELSE c.kind END"""
# A blob row that existed gains the paths of the inodes this range marked:
# counting all of a blob's paths again would cost, for every range holding
# an empty file, a pass over the empty blob's millions of paths. A blob is
# counted only if asked (``full``), if its expected count was never written,
# or if its file has more links than that count plus the range's paths
# (others added paths since); COALESCE evaluates the count only then.
SQL_BLOB_COUNTS = """
UPDATE blobs AS b
SET n_hardlinks = least(c.links, e.expected), expected_hardlinks = e.expected
FROM unnest(%(count_blobids)s::text[], %(links)s::int[], %(added)s::int[], %(full)s::bool[])
     AS c(blobid, links, added, full_count)
JOIN blobs AS known ON known.blobid = c.blobid
CROSS JOIN LATERAL (
    SELECT coalesce(CASE WHEN c.links <= known.expected_hardlinks + c.added AND NOT c.full_count
                         THEN known.expected_hardlinks + c.added END, (
        SELECT count(DISTINCT p.path)::int
        FROM inode AS i JOIN relinker_path AS p ON p.medium_hash = i.medium_hash AND p.ino = i.ino
        WHERE i.blobid = c.blobid AND i.fs_type = 'f' AND p.exclude_reason IS NULL)) AS expected
) AS e
WHERE b.blobid = c.blobid
"""


SQL_SCANNED_ROOT = "SELECT root FROM relinker_scanned_medium WHERE medium_hash = %(medium)s"


class CopyWork:
    """Processes copy ranges (inodes of one medium) in one worker process."""

    def __init__(self, spec: WorkSpec):
        self.spec = spec
        self.remaps = order_remaps(spec.local.get("source_prefix", []))
        self.store = None if spec.dry_run else ByHashStore(
            spec.by_hash_root, spec.options.get("empty_blobid") or catalogue.EMPTY_SHA256, spec.symlinked_shards)
        self.linker = None if spec.dry_run else ArchiveLinker(spec.archive_root)
        self.data = db.RangeConnection(spec.dsn)
        self._statements = None
        self._scanned_roots: dict[str, bytes | None] = {}

    def connect(self) -> None:
        self.data.get()

    def reset(self) -> None:
        self.data.reset()

    def close(self) -> None:
        self.reset()
        if self.linker is not None:
            self.linker.close()
        if self.store is not None:
            self.store.close()

    def statements(self) -> "CopyStatements":
        """The range's SQL for this catalogue's shape (read once per worker)."""
        if self._statements is None:
            self._statements = CopyStatements.for_catalogue(
                InodeColumns.of(self.data.get()), bool(self.spec.options.get("retry_permanent")))
        return self._statements

    def sources(self, medium_hash: str) -> MediumSources:
        """Where the medium's files are read now."""
        if medium_hash not in self._scanned_roots:
            row = self.data.get().execute(SQL_SCANNED_ROOT, {"medium": medium_hash}).fetchone()
            self._scanned_roots[medium_hash] = row[0] if row else None
        return MediumSources(medium_hash, self._scanned_roots[medium_hash], self.remaps)

    def _inodes(self, r: Range):
        """(ino, size, dev, [paths]) of the range, streamed."""
        params = {"medium": r.medium_hash, "ino_lo": r.ino_lo, "ino_hi": r.ino_hi}
        with self.data.get().cursor().copy(self.statements().range_work, params) as copy:
            copy.set_types(["int8", "int8", "int8", "bytea"])
            for ino, group in itertools.groupby(copy.rows(), key=lambda row: row[0]):
                rows = list(group)
                yield ino, rows[0][1], rows[0][2], [path for _, _, _, path in rows]

    def process(self, r: Range, ctx: RangeContext):
        counters = ctx.counters
        marked = StoredInodes()
        failed = FailedInodes()
        # Inodes whose content waits for a batch's sync: the batch being
        # read, and the sealed one whose sync runs meanwhile.
        waiting: list[tuple[int, list[bytes], Pending]] = []
        sealed: list[tuple[int, list[bytes], Pending]] = []
        outcomes: dict[str, Stored | InodeProblem] = {}
        counted: set[str] = set()
        sources = self.sources(r.medium_hash)
        if self.linker is not None:
            self.linker.while_reading = ctx.tick

        def fail(ino: int, paths: list[bytes], problem: InodeProblem) -> None:
            ctx.problem(problem.kind, problem.detail, path=paths[0])
            failed.add(ino, problem)

        def settle(entries: list, placed: dict) -> None:
            # An inode may wait for a content of the batch placed before its own.
            outcomes.update(placed)
            for ino, paths, pending in entries:
                ctx.tick()
                outcome = outcomes[pending.blobid]
                if isinstance(outcome, InodeProblem):
                    fail(ino, paths, outcome)
                    continue
                # Inodes of one content in one range: written once.
                first = outcome.written and pending.blobid not in counted
                counted.add(pending.blobid)
                self._stored(ino, paths, outcome, first, marked, ctx)
            entries.clear()

        if self.store is not None:
            self.store.discard_pending()  # an attempt redone after an error starts afresh
        for ino, size, dev, paths in self._inodes(r):
            ctx.tick()
            if self.spec.dry_run:
                counters.blobs += 1
                counters.links_created += len(paths)
                counters.files_copied += 1
                counters.bytes_copied += size or 0
                counters.bytes_read += size or 0
                continue
            try:
                # A tick per chunk: the range's heartbeat must go on while one
                # large file is read (gigabytes from a slow medium take longer
                # than the lease), or another worker takes the range over.
                got = self._copy(sources, paths, size, ctx.tick, (dev, ino))
            except InodeProblem as exc:
                fail(ino, paths, exc)
                continue
            counters.bytes_read += got.size
            if isinstance(got, Pending):
                waiting.append((ino, paths, got))
                if self.store.batch_full:
                    # The sealed batch's sync ran while this batch was read.
                    settle(sealed, self.store.place_sealed(ctx.tick))
                    self.store.seal_batch()
                    sealed, waiting = waiting, sealed
            else:
                self._stored(ino, paths, got, got.written, marked, ctx)
        if self.spec.dry_run:
            return lambda conn: None
        settle(sealed, self.store.place_sealed(ctx.tick))
        settle(waiting, self.store.place_pending(ctx.tick))
        # The range's statements run while the new names are synced.
        return self._finalizer(r, marked, failed, self.store.start_sync(), ctx.keep_alive)

    def _finalizer(self, r: Range, marked: "StoredInodes", failed: "FailedInodes", names_synced,
                   keep_alive: Callable[[], None]) -> Callable[[psycopg.Connection], None]:
        """The range's statements, to run in its finishing transaction once ``names_synced`` has
        returned (``keep_alive`` meanwhile)."""
        statements = self.statements()
        count_blobids = sorted(marked.by_hash_paths)
        # Array literals, built once: the driver adapts a list element by element, for every statement.
        params = dict(medium=r.medium_hash, ino_lo=r.ino_lo, ino_hi=r.ino_hi,
                      inos=db.int_array(marked.inos), inode_blobids=db.text_array(marked.blobids),
                      count_blobids=db.text_array(count_blobids), **failed.params())
        expected = marked.paths_per_blob()
        params["expected"] = db.int_array(expected[b] for b in count_blobids)

        def links(blobid: str) -> int:
            return os.lstat(marked.by_hash_paths[blobid]).st_nlink - 1

        def links_of_new(blobid: str) -> int:
            # A new row's count is capped at the range's paths: a blob with all
            # of them linked gets that count whatever else links to its file.
            return expected[blobid] if marked.linked[blobid] >= expected[blobid] else links(blobid)

        def finalize(conn: psycopg.Connection) -> None:
            # Statements with nothing to write are left out: the catalogue's
            # statement triggers would fire for them all the same.
            inserted = set()
            if count_blobids:
                params["links"] = db.int_array(links_of_new(b) for b in count_blobids)
                inserted = {blobid for blobid, in conn.execute(SQL_NEW_BLOBS, params)}
            # Workers copying other inodes of the same content link to the
            # same by-hash file: holding the blob rows while reading the link
            # count makes the last commit carry the latest count.
            existing = [b for b in count_blobids if b not in inserted]
            if existing:
                conn.execute(SQL_LOCK_BLOBS, {"lock_blobids": db.text_array(existing)})
            newly_marked = set()
            if marked.inos:
                newly_marked = {ino for ino, in conn.execute(statements.mark_inodes, params)}
            if failed:
                conn.execute(statements.inode_errors, params)
            added = marked.paths_per_blob(newly_marked)
            # A new row for a content the store held already: inodes outside
            # the range may name it (its row missing from the catalogue), with
            # their links or without. Counted in full (rare: a content the store
            # holds has its row).
            recount = existing + [b for b in count_blobids if b in inserted and b in marked.found]
            if recount:
                conn.execute(SQL_BLOB_COUNTS, {"count_blobids": db.text_array(recount),
                                               "links": db.int_array(links(b) for b in recount),
                                               "added": db.int_array(added.get(b, 0) for b in recount),
                                               "full": db.bool_array(b in inserted for b in recount)})
            # The catalogue may say these contents are stored only once their
            # names are durable: the range's commit follows this.
            names_synced.wait(while_waiting=keep_alive, every=self.spec.heartbeat_interval)

        return finalize

    def _stored(self, ino: int, paths: list[bytes], stored: Stored, written: bool, marked: "StoredInodes",
                ctx: RangeContext) -> None:
        """An inode whose content has its by-hash name: count it, link its paths, mark it.

        ``written``: this inode counts as the content's copy (its file was written for this inode).
        """
        counters = ctx.counters
        counters.blobs += 1
        if written:
            counters.files_copied += 1
            counters.bytes_copied += stored.size
        marked.add(ino, stored, len(paths), self._link_all(stored, paths, ctx))

    def _copy(self, sources: MediumSources, paths: list[bytes], size: int | None,
              on_chunk: Callable[[], None], identity: tuple[int | None, int]) -> Stored | Pending:
        """Read the inode's content from the first source that opens; ``on_chunk`` as for ByHashStore.read_in.

        The problem raised when no source works is permanent only if none of
        the inode's paths can be a file any more: unsafe, or missing while
        the medium is there to hold it (judged at that moment: a medium may
        be unmounted while its range is read). ``identity``: the catalogue's
        ``(dev, ino)``; a tree ``relinker scan`` catalogued, read where it lies,
        must still hold that very inode at a path (a file put in its place
        is another's content).
        """
        failures = []
        absent = []
        permanent = True
        replaced = 0
        # The top source_location gives a scanned tree read where it lies (not moved with --source-prefix).
        scanned_top = (sources.scanned_root.rstrip(b"/") or b"/") if sources.scanned_root is not None else None
        same_file = identity if identity[0] is not None else None
        for stored_path in paths:
            try:
                top, below = sources.locate(stored_path)
            except UnsafePath as exc:
                failures.append((stored_path, f"not read ({exc})"))
                continue
            try:
                fd = sources.open(top, below)
            except OSError as exc:
                unless_out_of_resources(exc)  # this process's trouble, not the file's: the range fails, redone
                if exc.errno == errno.ENXIO:  # a socket (or a device node without its device) in its place
                    failures.append((source_path(top, below), "not a regular file"))
                    continue
                gone = exc.errno in catalogue.GONE_FROM_MEDIUM
                if gone and not holds_place(top, below):
                    permanent = False  # the medium is not there: nothing says the file is gone
                    if top not in absent:
                        absent.append(top)
                    continue
                permanent = permanent and gone
                # formatted only if no source works
                why = "a symlink in its place or on its way (not followed)" if exc.errno == errno.ELOOP else exc.strerror
                failures.append((source_path(top, below), why))
                continue
            try:
                return self.store.read_in(fd, size, on_chunk, same_file=same_file if top == scanned_top else None)
            except SourceProblem as exc:
                if exc.kind == "source-changed":
                    raise
                failures.append((source_path(top, below), exc.detail))
                permanent = permanent and exc.permanent
                replaced += exc.kind == "source-replaced"
            finally:
                os.close(fd)
        details = [sources.absent(top) for top in absent]
        details += [f"{display(candidate)}: {why}" for candidate, why in failures[:3]]
        # Every path now another file: the catalogued one changed, as a file rewritten does.
        kind = "source-changed" if failures and replaced == len(failures) and not absent else "source-unreadable"
        raise SourceProblem(kind, "; ".join(details) or "no source path", permanent=permanent)

    def _link_all(self, stored: Stored, paths: list[bytes], ctx: RangeContext) -> int:
        """Link the inode's paths to its by-hash file; how many are now correctly linked."""
        tally = new_tally()
        limited = 0

        def problem(path: bytes, kind: str, detail: str) -> None:
            nonlocal limited
            limited += kind in LIMIT_KINDS
            ctx.problem(kind, detail, blobid=stored.blobid, path=path)

        linked = self.linker.link_all(stored.path, stored.identity, paths, tally, problem)
        counters = ctx.counters
        counters.links_created += tally[Outcome.CREATED]
        counters.links_present += tally[Outcome.PRESENT]
        counters.links_replaced += tally[Outcome.REPLACED]
        # A path over the filesystem's limits is a limit, not a link to make later.
        counters.links_missing += len(paths) - linked - limited
        return linked


class StoredInodes:
    """The range's inodes whose content is stored: what SQL_MARK_INODES takes, and each blob's by-hash path."""

    def __init__(self):
        self.inos: list[int] = []
        self.blobids: list[str] = []
        #: each inode's catalogued paths (a range is one medium: all distinct)
        self.n_paths: list[int] = []
        self.by_hash_paths: dict[str, bytes] = {}
        #: paths of the range's inodes now correctly linked, per blob
        self.linked: dict[str, int] = {}
        #: blobs whose by-hash file was there before the range stored them
        self.found: set[str] = set()

    def add(self, ino: int, stored: Stored, n_paths: int, linked: int) -> None:
        self.inos.append(ino)
        self.blobids.append(stored.blobid)
        self.n_paths.append(n_paths)
        self.by_hash_paths[stored.blobid] = stored.path
        self.linked[stored.blobid] = self.linked.get(stored.blobid, 0) + linked
        if not stored.written:
            self.found.add(stored.blobid)

    def paths_per_blob(self, marked: set[int] | None = None) -> dict[str, int]:
        """Catalogued paths per blob of the range's inodes, or only of those in ``marked`` (SQL_MARK_INODES's)."""
        counts: dict[str, int] = {}
        for ino, blobid, n in zip(self.inos, self.blobids, self.n_paths):
            if marked is None or ino in marked:
                counts[blobid] = counts.get(blobid, 0) + n
        return counts


class FailedInodes:
    """The range's inodes that could not be stored, as the arrays SQL_INODE_ERRORS takes."""

    def __init__(self):
        self.inos: list[int] = []
        self.lines: list[str] = []
        self.kinds: list[str] = []
        self.states: list[str] = []

    def add(self, ino: int, problem: InodeProblem) -> None:
        self.inos.append(ino)
        self.lines.append(f"relinker copy: {problem.kind}: {problem.detail}")
        self.kinds.append(problem.kind)
        self.states.append(problem.state)

    def __bool__(self) -> bool:
        return bool(self.inos)

    def params(self) -> dict:
        return dict(error_inos=db.int_array(self.inos), errors=db.text_array(self.lines),
                    error_kinds=db.text_array(self.kinds), error_states=db.text_array(self.states))


COPY_OUT = "COPY ({}) TO STDOUT (FORMAT BINARY)"
COUNT_OF = "SELECT count(*) FROM ({}) AS todo"


@dataclasses.dataclass(frozen=True)
class CopyStatements:
    """copy's SQL, composed for the catalogue's columns from the constant fragments above."""

    range_select: sql.Composed
    range_work: sql.Composed
    mark_inodes: sql.Composed
    inode_errors: sql.Composed
    plan: sql.Composed
    plan_count: sql.Composed

    @classmethod
    def for_catalogue(cls, columns: InodeColumns, retry_permanent: bool) -> "CopyStatements":
        to_copy = sql.SQL(" ").join(
            [sql.SQL(TO_COPY)] + ([sql.SQL(NOT_GIVEN_UP)] if columns.status and not retry_permanent else []))
        success = [STATUS_SUCCESS] if columns.status else []
        failure = [STATUS_FAILED] if columns.status else []
        if columns.error_type:
            success.append(ERROR_TYPE_CLEARED)
            failure.append(ERROR_TYPE_SET)
        selection = sql.SQL(_INODES_TO_COPY).format(to_copy=to_copy)
        range_select = sql.SQL(SQL_RANGE_WORK).format(to_copy=to_copy)
        return cls(
            range_select=range_select,
            range_work=sql.SQL(COPY_OUT).format(range_select),
            mark_inodes=sql.SQL(SQL_MARK_INODES).format(success=sql.SQL("".join(success))),
            inode_errors=sql.SQL(SQL_INODE_ERRORS).format(failure=sql.SQL("".join(failure))),
            plan=sql.SQL(COPY_OUT).format(selection),
            plan_count=sql.SQL(COUNT_OF).format(selection),
        )


# --- planning -----------------------------------------------------------------

SQL_MEDIUM = "SELECT medium_hash FROM medium WHERE medium_hash = %(m)s OR medium_human = %(m)s"
_INODES_TO_COPY = """
    SELECT i.medium_hash, i.ino, coalesce(i.size, 0)
    FROM inode AS i
    WHERE {to_copy}
      AND (%(medium)s::text IS NULL OR i.medium_hash = %(medium)s)
      AND EXISTS (SELECT 1 FROM relinker_path AS p
                  WHERE p.medium_hash = i.medium_hash AND p.ino = i.ino AND p.exclude_reason IS NULL)
    ORDER BY i.medium_hash, i.ino
    LIMIT %(limit)s
"""


def resolve_medium(conn: psycopg.Connection, name_or_hash: str) -> str:
    """A medium's hash from its hash or human name (UserError if unknown or ambiguous)."""
    rows = conn.execute(SQL_MEDIUM, {"m": name_or_hash}).fetchall()
    if len(rows) != 1:
        raise UserError(f"{'unknown' if not rows else 'ambiguous'} medium {name_or_hash!r}")
    return rows[0][0]


def canonical_options(conn: psycopg.Connection, options: dict) -> None:
    """A medium asked by its name is the same work as asked by its hash: kept and compared as the hash
    (UserError for a medium unknown or ambiguous, before a run is chosen for it)."""
    if options.get("medium"):
        options["medium"] = resolve_medium(conn, options["medium"])


def plan(conn: psycopg.Connection, options: dict, blobids: list[str] | None, workers: int,
         n_ranges: int | None) -> list[Bounds]:
    """Ranges of inodes to copy (``ino_hi`` exclusive), with the bytes each holds.

    Inode numbers are not uniform, so the bounds come from the inodes
    themselves, streamed in key order: every range holds the same number of
    inodes (``INODES_PER_RANGE``, or an equal share of ``n_ranges``), and
    without ``n_ranges`` at most ``BYTES_PER_RANGE`` of content beyond its
    first inode. Fixes the run's empty blob ID (``options["empty_blobid"]``).
    """
    medium = resolve_medium(conn, options["medium"]) if options.get("medium") else None
    options["medium"] = medium
    options["empty_blobid"] = catalogue.empty_blobid(conn)
    statements = CopyStatements.for_catalogue(InodeColumns.of(conn), bool(options.get("retry_permanent")))
    params = {"medium": medium, "limit": options.get("limit")}
    per_range, bytes_per_range = INODES_PER_RANGE, BYTES_PER_RANGE
    if n_ranges:
        total = conn.execute(statements.plan_count, params).fetchone()[0]
        per_range, bytes_per_range = max(1, -(-total // n_ranges)), None
    ranges: list[Bounds] = []
    current: list = []  # [medium_hash, first ino, last ino, count, bytes]

    def close_range() -> None:
        ranges.append(Bounds(medium_hash=current[0], ino_lo=current[1], ino_hi=current[2] + 1,
                             bytes_planned=current[4]))

    with conn.cursor().copy(statements.plan, params) as copy:
        copy.set_types(["text", "int8", "int8"])
        for medium_hash, ino, size in copy.rows():
            if current and (current[0] != medium_hash or current[3] == per_range
                            or (bytes_per_range is not None and current[4] + size > bytes_per_range)):
                close_range()
                current = []
            if not current:
                current = [medium_hash, ino, ino, 0, 0]
            current[2] = ino
            current[3] += 1
            current[4] += size
    if current:
        close_range()
    return ranges


MODE_SPEC = Mode(name=MODE, work=CopyWork, plan=plan, writes=frozenset({"archive", "by-hash"}),
                 in_bytes=lambda options: True, canonical_options=canonical_options, superseded_by_scan=True,
                 catalogue_writes=(("inode", "UPDATE", ("blobid", "by_hash_created", "copied", "processed_at", "errors",
                                                         "status", "error_type")),
                                   ("path", "UPDATE", ("blobid",)),
                                   ("blobs", "INSERT", ("blobid", "n_hardlinks", "expected_hardlinks")),
                                   ("blobs", "UPDATE", ("n_hardlinks", "expected_hardlinks"))),
                 catalogue_reads=("blobs", "inode", "path", "relinker_path", "medium", "relinker_scanned_medium"),
                 excludes=frozenset({"relink", "count", "verify", "scan"}))
