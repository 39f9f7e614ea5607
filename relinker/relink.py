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

import contextlib
import dataclasses
import errno
import itertools
import stat

import psycopg
from psycopg import sql

from relinker import catalogue, db
from relinker.checkpoint import Bounds, Range, default_range_count, split_blob_list, split_blob_space
from relinker.errors import unless_out_of_resources
from relinker.jobs import Mode
from relinker.fastroute import EVENT_PATH, EVENT_SOURCE
from relinker.linker import ArchiveLinker, Outcome, new_tally
from relinker.paths import below_any, by_hash_relpath, is_blobid
from relinker.pool import RangeContext, WorkSpec

MODE = "relink"
#: What becomes of a different regular file at an archive path (--on-conflict)
DEFAULT_ON_CONFLICT = "replace"
#: Inode rows per chunk the server streams; RangeContext.tick() runs between chunks.
STREAM_CHUNK = 1000
#: Paths (and inode rows) of one blob a worker holds while its inodes come (so that a path two media
#: share counts once). A blob with more (the empty content) is walked on its own afterwards, the
#: server making its paths distinct, so a worker's memory does not grow with the most linked content.
BLOB_PATHS_HELD = 50_000

# The range's work, one row per inode with its paths as an array: blob ->
# inodes through the covering blobid index, then each inode's paths through the
# (medium_hash, ino) index (a correlated subquery: never a hash join that would
# read every path of the catalogue for each range). Ordered by blob, so a
# blob's inodes come together, and concurrent workers work in different
# directories (ordered by path they would queue on the same directory locks).
SQL_WORK = """
    SELECT i.blobid,
           ARRAY(SELECT p.path FROM relinker_path AS p
                 WHERE p.medium_hash = i.medium_hash AND p.ino = i.ino AND p.exclude_reason IS NULL)
    FROM inode AS i
    WHERE i.fs_type = 'f' AND {scope} {incomplete}
    ORDER BY i.blobid
"""
# One blob's paths, each archive path once: the blobs BLOB_PATHS_HELD leaves to the server. Each
# inode's paths as SQL_WORK reads them (an array the planner cannot turn into a join over every
# path); sorted, so that the linker meets each directory once.
SQL_BLOB_PATHS = """
SELECT DISTINCT paths.path
FROM inode AS i
CROSS JOIN LATERAL unnest(ARRAY(SELECT p.path FROM relinker_path AS p
                                WHERE p.medium_hash = i.medium_hash AND p.ino = i.ino
                                  AND p.exclude_reason IS NULL)) AS paths(path)
WHERE i.fs_type = 'f' AND i.blobid = %(blobid)s
ORDER BY paths.path
"""
ONLY_INCOMPLETE = """
      AND i.blobid IN (SELECT b.blobid FROM blobs AS b
                       WHERE {scope}
                         AND (b.expected_hardlinks IS NULL
                              OR coalesce(b.n_hardlinks, 0) < b.expected_hardlinks))"""
# A range's blobs: an interval of IDs, or the IDs of a list (--from-file).
LOWER_BOUND = "{}.blobid >= %(lo)s"
UPPER_BOUND = "AND {}.blobid < %(hi)s"
# A list's first and last IDs bound it too: without them the server may match the list against
# every row of a table (verify's sizes: every inode partition, for each range). In the database's
# collation, which may order a line of a list that is no hex ID otherwise than Python does.
LISTED = """{}.blobid = ANY(%(listed)s::text[])
  AND {}.blobid BETWEEN (SELECT min(l) FROM unnest(%(listed)s::text[]) AS l)
                    AND (SELECT max(l) FROM unnest(%(listed)s::text[]) AS l)"""

# What the catalogue says of the range's blobs, read once the range is worked:
# a short scan of the primary key. Only blobs whose counts differ are then
# written, so a nightly re-check of a complete archive writes nothing (and
# spends no time joining thousands of unchanged rows).
SQL_RECORDED_COUNTS = """
SELECT b.blobid, b.n_hardlinks, b.expected_hardlinks FROM blobs AS b
WHERE {scope}
"""
# Absolute counts, so a redo never double counts. The range's scope keeps the
# planner on the primary key instead of a scan of the whole blobs table; the
# IS DISTINCT FROM guard skips rows another writer already made right.
SQL_WRITE_COUNTS = """
UPDATE blobs AS b
SET n_hardlinks = c.linked, expected_hardlinks = c.expected
FROM unnest(%(blobids)s::text[], %(linked)s::int[], %(expected)s::int[]) AS c(blobid, linked, expected)
WHERE b.blobid = c.blobid AND {scope}
  AND (b.n_hardlinks IS DISTINCT FROM c.linked OR b.expected_hardlinks IS DISTINCT FROM c.expected)
"""

# The rows a range's counts change, locked first and in blob ID order, as copy
# locks them: two writers never wait for each other in a circle, and a
# statement after this one sees what a copy holding one of them committed.
SQL_LOCK_COUNTS = """
SELECT b.blobid FROM blobs AS b WHERE b.blobid = ANY(%(locked)s::text[]) AND {scope}
ORDER BY b.blobid FOR UPDATE
"""
# A blob no regular-file inode names has no path to link: 0 of 0, checked
# again as it is written (the range's query may be older than a copy's commit).
SQL_ZERO_UNNAMED = """
UPDATE blobs AS b SET n_hardlinks = 0, expected_hardlinks = 0
WHERE b.blobid = ANY(%(unnamed)s::text[]) AND {scope}
  AND (b.n_hardlinks IS DISTINCT FROM 0 OR b.expected_hardlinks IS DISTINCT FROM 0)
  AND NOT EXISTS (SELECT 1 FROM inode AS i WHERE i.blobid = b.blobid AND i.fs_type = 'f')
"""


@dataclasses.dataclass(frozen=True)
class RangeScope:
    """Which blobs a range covers, as SQL: an interval of blob IDs, or a list of them."""

    listed: bool
    bounded: bool
    params: dict

    @classmethod
    def of(cls, r: Range) -> "RangeScope":
        if r.blobids is not None:
            return cls(listed=True, bounded=False, params={"listed": db.text_array(r.blobids)})
        return cls(listed=False, bounded=r.hi is not None, params={"lo": r.lo, "hi": r.hi})

    def where(self, alias: str) -> sql.Composable:
        """The condition on ``alias.blobid`` (composed from the constant fragments above)."""
        table = sql.Identifier(alias)
        if self.listed:
            return sql.SQL(LISTED).format(table, table)
        parts = [sql.SQL(LOWER_BOUND).format(table)]
        if self.bounded:
            parts.append(sql.SQL(UPPER_BOUND).format(table))
        return sql.SQL(" ").join(parts)

    def work_query(self, only_incomplete: bool) -> sql.Composed:
        """The range query."""
        incomplete = sql.SQL(ONLY_INCOMPLETE).format(scope=self.where("b")) if only_incomplete else sql.SQL("")
        return sql.SQL(SQL_WORK).format(scope=self.where("i"), incomplete=incomplete)

    def recorded_counts(self) -> sql.Composed:
        return sql.SQL(SQL_RECORDED_COUNTS).format(scope=self.where("b"))

    def write_counts(self) -> sql.Composed:
        return sql.SQL(SQL_WRITE_COUNTS).format(scope=self.where("b"))

    def zero_unnamed(self) -> sql.Composed:
        return sql.SQL(SQL_ZERO_UNNAMED).format(scope=self.where("b"))

    def lock_counts(self) -> sql.Composed:
        return sql.SQL(SQL_LOCK_COUNTS).format(scope=self.where("b"))


def blobs_within(rows, limit: int, oversized: list[str], tick):
    """The range's ``(blobid, paths)`` rows, but only of blobs with at most ``limit`` paths and rows in all.

    A blob's rows are held until its last one has come; the IDs of the
    blobs with more go into ``oversized``, none of their rows through (their
    rows still stream past: ``tick`` runs every STREAM_CHUNK of them).
    """
    held: list = []
    blob, n_paths, passed = None, 0, 0
    for row in rows:
        if row[0] != blob:
            if held:
                yield from held
            # A row counts too: an inode whose paths are all excluded still holds a tuple and a list.
            blob, held, n_paths = row[0], [row], 1 + len(row[1])
        elif held is None:
            passed += 1
            if passed % STREAM_CHUNK == 0:
                tick()
            continue
        else:
            held.append(row)
            n_paths += 1 + len(row[1])
        if n_paths > limit:
            oversized.append(blob)
            held = None
    if held:
        yield from held


def _count_outcomes(counters, tally: dict, walker=None) -> None:
    # The walker counts what its fast route did; tally has the general route's outcomes.
    counters.links_created = tally[Outcome.CREATED] + (walker.created if walker is not None else 0)
    counters.links_present = tally[Outcome.PRESENT] + (walker.present if walker is not None else 0)
    counters.links_replaced = tally[Outcome.REPLACED]
    counters.links_missing = tally[None]


class _Unusable:
    """A blob whose by-hash file cannot be linked to (problem already recorded)."""


UNUSABLE = _Unusable()


class RelinkWork:
    """Processes relink ranges in one worker process."""

    #: Check links, never make them (count).
    PROBES = False
    #: Read the range's ``blobs`` rows before its walk, not after: a blob whose row came in between
    #: would have its counts judged without its links looked at (verify would pass it).
    RECORDED_BEFORE_WALK = False

    def __init__(self, spec: WorkSpec):
        self.spec = spec
        self.only_incomplete = bool(spec.options.get("only_incomplete"))
        self.linker = ArchiveLinker(spec.archive_root, source_root=spec.by_hash_root,
                                    on_conflict=spec.options.get("on_conflict") or DEFAULT_ON_CONFLICT,
                                    dry_run=spec.dry_run)
        self.data = db.RangeConnection(spec.dsn)
        #: blobs of the range whose by-hash file could not be looked at (their links are not known)
        self.unexamined: set[str] = set()

    def connect(self) -> None:
        self.data.get()

    def reset(self) -> None:
        self.data.reset()

    def close(self) -> None:
        self.reset()
        self.linker.close()

    def process(self, r: Range, ctx: RangeContext):
        """Link (or, for count, check) every path of the range's blobs.

        Returns the finalize step: the range's changed n_hardlinks and
        expected_hardlinks, written in the transaction that marks the range done.
        """
        tally = new_tally()
        counters = ctx.counters
        scope = RangeScope.of(r)
        self.unexamined = set()
        self.linker.new_range()
        self.linker.while_reading = ctx.tick
        recorded = self._recorded(scope) if self.RECORDED_BEFORE_WALK else None
        # Streamed in chunks (libpq's chunked rows mode): the server keeps
        # producing rows while this process links, memory stays bounded for
        # any range, and psycopg's C loaders parse a chunk at a time.
        rows = self.data.get().cursor(binary=True).stream(
            scope.work_query(self.only_incomplete), scope.params, size=STREAM_CHUNK)
        # Closed on the way out whatever happens: a suspended stream keeps the
        # connection's lock, and the tracebacks the retry machinery keeps would
        # otherwise make the worker's next range wait for that lock forever.
        oversized: list[str] = []
        with contextlib.closing(rows):
            held = blobs_within(rows, BLOB_PATHS_HELD, oversized, ctx.tick)
            # The C walker goes through the store's directories unchecked: not where one is a symlink.
            walker = None if self.spec.symlinked_shards else self.linker.range_walker(
                probe=self.PROBES, tick_every=STREAM_CHUNK)
            if walker is None:
                linked, expected = self._loop_rows(held, ctx, tally)
            else:
                linked, expected = self._walk_rows(walker, held, ctx, tally)
        for blobid in oversized:
            self._walk_alone(blobid, ctx, tally, walker, linked, expected)
        _count_outcomes(counters, tally, walker)
        counters.blobs = len(expected)
        if recorded is None:
            recorded = self._recorded(scope)
        if r.blobids is not None:
            # A blob some inode names is the catalogue's, with a blobs row or without.
            self.unknown_blobs(ctx, set(r.blobids).difference(expected, (blobid for blobid, _, _ in recorded)))
        self.after_range(ctx, linked, expected, recorded)
        return self.finalize_step(ctx, scope, linked, expected, recorded)

    def _recorded(self, scope: RangeScope) -> list[tuple[str, int | None, int | None]]:
        return self.data.get().execute(scope.recorded_counts(), scope.params).fetchall()

    def unknown_blobs(self, ctx: RangeContext, unknown: set[str]) -> None:
        """Listed IDs the catalogue does not know: each a problem (a list of the user's names them)."""
        for blobid in sorted(unknown):
            ctx.problem("unknown-blob", "no blobs row, and no inode names it", blobid=blobid)

    def finalize_step(self, ctx: RangeContext, scope: RangeScope, linked: dict, expected: dict, recorded: list):
        """The range's catalogue writes: the changed n_hardlinks and expected_hardlinks.

        Returned as the step the commit transaction runs.
        """
        # A count is written only where the by-hash file was looked at: a store directory this
        # process may not read says nothing about the blob's links.
        changes = counts_to_write(recorded, linked, expected, only_incomplete=self.only_incomplete)
        changes = [change for change in changes if change[0] not in self.unexamined]
        # Blobs the walk found no inode for: 0 of 0 only if still none names them when written (a copy
        # may have stored one since the range's query).
        unnamed = [blobid for blobid, _, _ in changes if blobid not in expected]
        changes = [change for change in changes if change[0] in expected]
        arrays = {
            "blobids": db.text_array(blobid for blobid, _, _ in changes),
            "linked": db.int_array(n for _, n, _ in changes),
            "expected": db.int_array(n for _, _, n in changes),
            **scope.params,
        }
        zeroed = {"unnamed": db.text_array(unnamed), **scope.params}
        locked = {"locked": db.text_array(sorted([blobid for blobid, _, _ in changes] + unnamed)),
                  **scope.params} if unnamed else None
        statement, zeroing, locking = scope.write_counts(), scope.zero_unnamed(), scope.lock_counts()

        def finalize(conn: psycopg.Connection) -> None:
            # prepare=False: a generic plan cannot see the range bounds.
            if unnamed:
                conn.execute(locking, locked, prepare=False)
            if changes:
                conn.execute(statement, arrays, prepare=False)
            if unnamed:
                conn.execute(zeroing, zeroed, prepare=False)

        return finalize

    def _loop_rows(self, rows, ctx: RangeContext, tally: dict) -> tuple[dict, dict]:
        """The range's rows in Python: ``(linked, expected)`` paths by blob ID.

        The route without the C extension, and of dry runs; _walk_rows does
        the same with the C RangeWalker.
        """
        sources: dict[str, tuple[bytes, tuple[int, int]] | _Unusable] = {}
        expected: dict[str, int] = {}
        linked: dict[str, int] = {}
        visit = self.visit
        counters = ctx.counters
        current_blob, current_paths, seen = None, [], None
        tick = 0

        def problem(path: bytes, kind: str, detail: str) -> None:
            self.path_problem(ctx, current_blob, path, kind, detail)

        for blobid, paths in rows:
            tick += 1
            if tick == STREAM_CHUNK:
                tick = 0
                _count_outcomes(counters, tally)
                ctx.tick()
            if blobid == current_blob:
                # Another inode of the same blob (on another medium): a path
                # catalogued for both is one archive path, and counts once.
                if seen is None:
                    seen = set(current_paths)
                paths = [p for p in paths if p not in seen]
                seen.update(paths)
            else:
                current_blob, current_paths, seen = blobid, paths, None
            source = sources.get(blobid)
            if source is None:
                source = sources[blobid] = self._source(blobid, ctx)
                expected[blobid] = linked[blobid] = 0
            expected[blobid] += len(paths)
            if source is not UNUSABLE and paths:
                linked[blobid] += visit(source[0], source[1], paths, tally, problem)
        return linked, expected

    def _walk_rows(self, walker, rows, ctx: RangeContext, tally: dict) -> tuple[dict, dict]:
        """_loop_rows through the C RangeWalker: Python runs only for what the walker hands back.

        Those events are answered by the code _loop_rows runs for the same
        cases: _source for a by-hash file the walker would not take as it is,
        the linker's general route for a path its fast route stopped at.
        """
        counters = ctx.counters
        linker = self.linker
        settle = self.settle

        def problem(path: bytes, kind: str, detail: str) -> None:
            self.path_problem(ctx, walker.blobid, path, kind, detail)

        while (event := walker.step(rows)) is not None:
            kind = event[0]
            if kind == EVENT_PATH:
                _, path, source, dev, ino = event
                walker.resolved(settle(source, (dev, ino), path, tally, problem), linker.expects_present)
            elif kind == EVENT_SOURCE:
                source = self._source(event[1], ctx)
                walker.set_source(None if source is UNUSABLE else source)
            else:
                _count_outcomes(counters, tally, walker)
                ctx.tick()
        return walker.results()

    def _walk_alone(self, blobid: str, ctx: RangeContext, tally: dict, walker, linked: dict, expected: dict) -> None:
        """A blob with more paths than a worker holds: its distinct paths from the server, a chunk at a time."""
        source = self._source(blobid, ctx)
        expected[blobid] = linked[blobid] = 0

        def problem(path: bytes, kind: str, detail: str) -> None:
            self.path_problem(ctx, blobid, path, kind, detail)

        rows = self.data.get().cursor(binary=True).stream(SQL_BLOB_PATHS, {"blobid": blobid}, size=STREAM_CHUNK)
        with contextlib.closing(rows):
            for chunk in iter(lambda: [path for (path,) in itertools.islice(rows, STREAM_CHUNK)], []):
                expected[blobid] += len(chunk)
                if source is not UNUSABLE:
                    linked[blobid] += self.visit(source[0], source[1], chunk, tally, problem)
                _count_outcomes(ctx.counters, tally, walker)
                ctx.tick()

    def path_problem(self, ctx: RangeContext, blobid: str, path: bytes, kind: str, detail: str) -> None:
        """Record a problem of one of the blob's archive paths.

        A path that cannot even be looked at (an archive directory without
        search permission) says nothing of the blob's links: its counts are
        left as they are, as for a by-hash file that could not be looked at.
        A link that could not be made where the path can be looked at (a
        read-only directory, a full disk) is known to be missing: counted.
        """
        if kind == "os-error" and not self.linker.can_look_at(path):
            self.unexamined.add(blobid)
        ctx.problem(kind, detail, blobid=blobid, path=path)

    def visit(self, source: bytes, source_id: tuple[int, int], paths: list[bytes], tally, problem) -> int:
        """Link one inode's catalogued paths; return how many are now correctly linked."""
        return self.linker.link_all(source, source_id, paths, tally, problem)

    def settle(self, source: bytes, source_id: tuple[int, int], path: bytes, tally, problem) -> bool:
        """One path by the linker's general route; whether it is now correctly linked."""
        return self.linker.link_one(source, source_id, path, tally, problem)

    def after_range(self, ctx: RangeContext, linked, expected, recorded) -> None:
        """Hook for modes that compare the range's findings with the catalogue.

        ``recorded`` holds the range's ``(blobid, n_hardlinks, expected_hardlinks)`` rows.
        """

    def _source(self, blobid: str, ctx: RangeContext):
        """The blob's by-hash path (relative to the store's root) and (st_dev, st_ino), or UNUSABLE."""
        if not is_blobid(blobid):
            ctx.problem("bad-blobid", "not a lowercase hex BLAKE3-256 digest", blobid=blobid)
            return UNUSABLE
        relpath = by_hash_relpath(blobid)
        if below_any(relpath, self.spec.symlinked_shards):
            path = self.linker.source_path(relpath)
            # The problem's path is the by-hash file: its detail says only what is wrong.
            ctx.problem("bad-by-hash", "a directory above it is a symlink (not followed)", blobid=blobid, path=path)
            self.unexamined.add(blobid)
            return UNUSABLE
        try:
            dev, ino, mode = self.linker.source_identity(relpath)
        except OSError as exc:
            unless_out_of_resources(exc)
            path = self.linker.source_path(relpath)
            missing = exc.errno in (errno.ENOENT, errno.ENOTDIR)
            ctx.problem("missing-by-hash" if missing else "os-error", exc.strerror, blobid=blobid, path=path)
            if not missing:
                self.unexamined.add(blobid)
            return UNUSABLE
        if not stat.S_ISREG(mode):
            path = self.linker.source_path(relpath)
            ctx.problem("missing-by-hash", "not a regular file", blobid=blobid, path=path)
            return UNUSABLE
        return relpath, (dev, ino)


# --- planning -----------------------------------------------------------------

# A range works the blobs of its interval that have a row and those some inode names without one:
# the first N + 1 of either set hold the first N + 1 of both (each an index's first entries).
SQL_NTH_BLOB = """
SELECT blobid FROM (
    (SELECT blobid FROM blobs ORDER BY blobid LIMIT %(first)s)
    UNION
    (SELECT DISTINCT blobid FROM inode WHERE blobid IS NOT NULL AND fs_type = 'f' ORDER BY blobid LIMIT %(first)s)
) AS first ORDER BY blobid OFFSET %(limit)s LIMIT 1
"""
# --only-incomplete works blobs with a row only.
SQL_NTH_INCOMPLETE_BLOB = """
SELECT blobid FROM blobs
WHERE expected_hardlinks IS NULL OR coalesce(n_hardlinks, 0) < expected_hardlinks
ORDER BY blobid OFFSET %(limit)s LIMIT 1
"""


def plan(conn: psycopg.Connection, options: dict, blobids: list[str] | None, workers: int,
         n_ranges: int | None) -> list[Bounds]:
    """Ranges of blob IDs for a new run.

    ``--limit N`` becomes an upper bound: the ID of the (N+1)-th blob in ID
    order, so a limited run is an ordinary run over a smaller key space (it
    checkpoints and resumes like any other). A list of blob IDs
    (``blobids``, from ``--from-file``) is split into ranges that carry
    their IDs.
    """
    if blobids is not None:
        return plan_list(blobids, workers, n_ranges)
    n_blobs = conn.execute(catalogue.SQL_COUNT_BLOBS).fetchone()[0]
    upper = None
    limit = options.get("limit")
    if limit is not None:
        query = SQL_NTH_INCOMPLETE_BLOB if options.get("only_incomplete") else SQL_NTH_BLOB
        # N + 1 within a bigint: --limit takes any bigint
        row = conn.execute(query, {"limit": limit, "first": min(limit + 1, catalogue.BIGINT_MAX)}).fetchone()
        upper = row[0] if row else None
        n_blobs = min(n_blobs, limit)
    options["upper"] = upper
    return split_blob_space(n_ranges or default_range_count(n_blobs, workers), upper)


def plan_list(blobids, workers: int, n_ranges: int | None, *, heavy: bool = False) -> list[Bounds]:
    """Ranges over a list of blob IDs: ``n_ranges`` of them, or as many as the list's size asks for."""
    distinct = len(set(blobids))
    n = n_ranges or default_range_count(distinct, workers, heavy=heavy)
    return split_blob_list(blobids, max(1, -(-distinct // n)))


def counts_to_write(recorded, linked: dict, expected: dict, only_incomplete: bool) -> list[tuple[str, int, int]]:
    """``(blobid, n_hardlinks, expected_hardlinks)`` for each recorded blob whose counts must change.

    A blob the range found paths for gets what was found; any other blob of
    the range has no path to link (0 of 0): under ``--only-incomplete``, one
    that was incomplete (the walk looked for its paths and found none: no
    regular-file inode names it any more), never one that was complete (not
    looked at).
    """
    changes = []
    # One pass over every blob of the range: written without tuples to compare.
    for blobid, recorded_linked, recorded_expected in recorded:
        wanted_expected = expected.get(blobid)
        if wanted_expected is None:
            if only_incomplete and recorded_expected is not None and (recorded_linked or 0) >= recorded_expected:
                continue
            wanted_linked = wanted_expected = 0
        else:
            wanted_linked = linked[blobid]
        if recorded_linked != wanted_linked or recorded_expected != wanted_expected:
            changes.append((blobid, wanted_linked, wanted_expected))
    return changes


def complete_options(options: dict) -> None:
    """relink's defaults: a different file at an archive path is replaced."""
    if options.get("on_conflict") is None:
        options["on_conflict"] = DEFAULT_ON_CONFLICT


MODE_SPEC = Mode(name=MODE, work=RelinkWork, plan=plan, complete_options=complete_options,
                 excludes=frozenset({"copy", "count", "verify", "scan"}))
