"""Relink mode (the seed's ``--re-hardlink``): put every catalogued archive link back.

For each blob of a range: stat its by-hash file once; for every non-excluded
path of every regular-file inode with that blob (``inode.blobid`` is the
truth, joined on ``(medium_hash, ino)``), make the archive path a hardlink of
it. No file content is read. At the end of the range, in the transaction that
marks it done, each blob's ``n_hardlinks`` becomes the number of its paths now
correctly linked (absolute, so a redo never double counts) and
``expected_hardlinks`` the number of its paths.
"""

from __future__ import annotations

import collections
import errno
import os
import stat

import psycopg
from psycopg import sql

from relinker import db
from relinker.checkpoint import Range, default_range_count, split_blob_space
from relinker.jobs import Mode
from relinker.linker import ArchiveLinker, LinkProblem, Outcome
from relinker.paths import UnsafePath, archive_components, by_hash_path, display, is_blobid
from relinker.pool import RangeContext, WorkSpec

MODE = "relink"
#: How many paths between two RangeContext.tick() calls.
TICK_EVERY = 256

# The range's work, streamed in one COPY and sorted by archive path so that
# the linker's open-directory chain is reused from one path to the next.
SQL_WORK = """
COPY (
    SELECT i.blobid, p.path
    FROM inode AS i
    JOIN relinker_path AS p ON p.medium_hash = i.medium_hash AND p.ino = i.ino
    WHERE i.fs_type = 'f' AND p.exclude_reason IS NULL
      AND i.blobid >= %(lo)s {upper} {incomplete}
    ORDER BY p.path, i.blobid
) TO STDOUT (FORMAT BINARY)
"""
UPPER_BOUND = "AND i.blobid < %(hi)s"
ONLY_INCOMPLETE = """
      AND i.blobid IN (SELECT b.blobid FROM blobs AS b
                       WHERE b.blobid >= %(lo)s {upper_b}
                         AND (b.expected_hardlinks IS NULL
                              OR coalesce(b.n_hardlinks, 0) < b.expected_hardlinks))"""
UPPER_BOUND_B = "AND b.blobid < %(hi)s"

# n_hardlinks/expected_hardlinks for every blob of the range (blobs without
# paths get 0); rows already right are left alone, so a nightly re-check of a
# complete archive writes nothing.
SQL_COUNTS_ALL = """
UPDATE blobs AS b
SET n_hardlinks = coalesce(c.linked, 0), expected_hardlinks = coalesce(c.expected, 0)
FROM blobs AS r
LEFT JOIN unnest(%(blobids)s::text[], %(linked)s::int[], %(expected)s::int[])
          AS c(blobid, linked, expected) USING (blobid)
WHERE b.blobid = r.blobid AND r.blobid >= %(lo)s {upper_r}
  AND (b.n_hardlinks IS DISTINCT FROM coalesce(c.linked, 0)
       OR b.expected_hardlinks IS DISTINCT FROM coalesce(c.expected, 0))
"""
UPPER_BOUND_R = "AND r.blobid < %(hi)s"
# --only-incomplete looked at some blobs only: update exactly those.
SQL_COUNTS_SEEN = """
UPDATE blobs AS b
SET n_hardlinks = c.linked, expected_hardlinks = c.expected
FROM unnest(%(blobids)s::text[], %(linked)s::int[], %(expected)s::int[]) AS c(blobid, linked, expected)
WHERE b.blobid = c.blobid
  AND (b.n_hardlinks IS DISTINCT FROM c.linked OR b.expected_hardlinks IS DISTINCT FROM c.expected)
"""


def work_query(bounded: bool, only_incomplete: bool) -> sql.Composed:
    """The range query, composed from the constant fragments above."""
    incomplete = sql.SQL(ONLY_INCOMPLETE if only_incomplete else "").format(
        upper_b=sql.SQL(UPPER_BOUND_B if bounded else ""))
    return sql.SQL(SQL_WORK).format(upper=sql.SQL(UPPER_BOUND if bounded else ""), incomplete=incomplete)


class _Unusable:
    """A blob whose by-hash file cannot be linked to (problem already recorded)."""


UNUSABLE = _Unusable()


class RelinkWork:
    """Processes relink ranges in one worker process."""

    def __init__(self, spec: WorkSpec):
        self.spec = spec
        self.only_incomplete = bool(spec.options.get("only_incomplete"))
        self.linker = ArchiveLinker(
            spec.archive_root, on_conflict=spec.options.get("on_conflict", "replace"), dry_run=spec.dry_run)
        self._conn: psycopg.Connection | None = None

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = db.connect(self.spec.dsn, autocommit=True)
        return self._conn

    def reset(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def close(self) -> None:
        self.reset()
        self.linker.close()

    def process(self, r: Range, ctx: RangeContext):
        sources: dict[str, tuple[bytes, tuple[int, int]] | _Unusable] = {}
        expected: collections.Counter[str] = collections.Counter()
        linked: collections.Counter[str] = collections.Counter()
        visit = self.visit
        params = {"lo": r.lo, "hi": r.hi}
        previous_path = previous_blob = None
        tick = 0
        cursor = self._connection().cursor()
        with cursor.copy(work_query(r.hi is not None, self.only_incomplete), params) as copy:
            copy.set_types(["text", "bytea"])
            for blobid, path in copy.rows():
                tick += 1
                if tick >= TICK_EVERY:
                    tick = 0
                    ctx.tick()
                if path == previous_path:
                    if blobid != previous_blob:
                        ctx.problem("path-collision", f"also claimed by blob {previous_blob}",
                                    blobid=blobid, path=path)
                    continue  # the same archive path twice counts once
                previous_path, previous_blob = path, blobid
                source = sources.get(blobid)
                if source is None:
                    source = sources[blobid] = self._source(blobid, ctx)
                expected[blobid] += 1
                if source is UNUSABLE:
                    continue
                try:
                    components = archive_components(path)
                except UnsafePath as exc:
                    ctx.problem("unsafe-path", str(exc), blobid=blobid, path=path)
                    continue
                try:
                    if visit(source[0], source[1], components, ctx.counters):
                        linked[blobid] += 1
                except LinkProblem as exc:
                    ctx.problem(exc.kind, exc.detail, blobid=blobid, path=path)
        ctx.counters.blobs = len(sources)
        self.after_range(r, ctx, linked, expected)
        blobids = list(expected)
        arrays = {
            "blobids": blobids,
            "linked": [linked[b] for b in blobids],
            "expected": [expected[b] for b in blobids],
            "lo": r.lo,
            "hi": r.hi,
        }

        def finalize(conn: psycopg.Connection) -> None:
            if self.only_incomplete:
                conn.execute(SQL_COUNTS_SEEN, arrays)
            else:
                statement = sql.SQL(SQL_COUNTS_ALL).format(
                    upper_r=sql.SQL(UPPER_BOUND_R if r.hi is not None else ""))
                conn.execute(statement, arrays)

        return finalize

    def visit(self, source: bytes, source_id: tuple[int, int], components: list[bytes], counters) -> bool:
        """Link one archive path; True when it is now correctly linked."""
        outcome = self.linker.link(source, source_id, components)
        if outcome is Outcome.CREATED:
            counters.links_created += 1
        elif outcome is Outcome.PRESENT:
            counters.links_present += 1
        else:
            counters.links_replaced += 1
        return True

    def after_range(self, r: Range, ctx: RangeContext, linked, expected) -> None:
        """Hook for modes that compare the range's findings with the catalogue."""

    def _source(self, blobid: str, ctx: RangeContext):
        """The blob's by-hash path and (st_dev, st_ino), or UNUSABLE."""
        if not is_blobid(blobid):
            ctx.problem("bad-blobid", "not a lowercase hex BLAKE3-256 digest", blobid=blobid)
            return UNUSABLE
        path = by_hash_path(self.spec.by_hash_root, blobid)
        try:
            st = os.stat(path, follow_symlinks=False)
        except OSError as exc:
            kind = "missing-by-hash" if exc.errno in (errno.ENOENT, errno.ENOTDIR) else "os-error"
            ctx.problem(kind, f"{display(path)}: {exc.strerror}", blobid=blobid, path=path)
            return UNUSABLE
        if not stat.S_ISREG(st.st_mode):
            ctx.problem("missing-by-hash", f"{display(path)} is not a regular file", blobid=blobid, path=path)
            return UNUSABLE
        return path, (st.st_dev, st.st_ino)


# --- planning -----------------------------------------------------------------

SQL_COUNT_BLOBS = "SELECT count(*) FROM blobs"
SQL_NTH_BLOB = "SELECT blobid FROM blobs ORDER BY blobid OFFSET %s LIMIT 1"
SQL_NTH_INCOMPLETE_BLOB = """
SELECT blobid FROM blobs
WHERE expected_hardlinks IS NULL OR coalesce(n_hardlinks, 0) < expected_hardlinks
ORDER BY blobid OFFSET %s LIMIT 1
"""


def plan(conn: psycopg.Connection, options: dict, workers: int, n_ranges: int | None):
    """Ranges of blob IDs for a new run: ``[(lo, hi), ...]``.

    ``--limit N`` becomes an upper bound: the ID of the (N+1)-th blob in ID
    order, so a limited run is an ordinary run over a smaller key space (it
    checkpoints and resumes like any other).
    """
    n_blobs = conn.execute(SQL_COUNT_BLOBS).fetchone()[0]
    upper = None
    limit = options.get("limit")
    if limit is not None:
        query = SQL_NTH_INCOMPLETE_BLOB if options.get("only_incomplete") else SQL_NTH_BLOB
        row = conn.execute(query, (limit,)).fetchone()
        upper = row[0] if row else None
        n_blobs = min(n_blobs, limit)
    options["upper"] = upper
    return split_blob_space(n_ranges or default_range_count(n_blobs, workers), upper)


class CountWork(RelinkWork):
    """The seed's hardlink counter: count correct links by lstat alone, create nothing.

    Blobs whose ``n_hardlinks`` disagrees with the count are reported as
    ``count-mismatch`` problems; outside a dry run the true counts are
    written (by the same statement relink uses).
    """

    def __init__(self, spec: WorkSpec):
        super().__init__(spec)
        self.linker.dry_run = True  # belt and braces: probe() never creates anyway

    def visit(self, source, source_id, components, counters) -> bool:
        st = self.linker.probe(components)
        if st is not None and (st.st_dev, st.st_ino) == source_id:
            counters.links_present += 1
            return True
        counters.links_missing += 1
        return False

    def after_range(self, r: Range, ctx: RangeContext, linked, expected) -> None:
        statement = sql.SQL(SQL_RECORDED_COUNTS).format(upper=sql.SQL(UPPER_BOUND_B if r.hi is not None else ""))
        for blobid, recorded, recorded_expected in self._connection().execute(statement, {"lo": r.lo, "hi": r.hi}):
            actual = linked.get(blobid, 0)
            if recorded != actual:
                ctx.problem("count-mismatch",
                            f"n_hardlinks was {recorded}, {actual} of {expected.get(blobid, 0)} paths are linked",
                            blobid=blobid)


SQL_RECORDED_COUNTS = """
SELECT b.blobid, coalesce(b.n_hardlinks, 0), b.expected_hardlinks FROM blobs AS b
WHERE b.blobid >= %(lo)s {upper}
"""

MODE_SPEC = Mode(name=MODE, work=RelinkWork, plan=plan)
COUNT_MODE_SPEC = Mode(name="count", work=CountWork, plan=plan)
