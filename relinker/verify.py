"""Verify mode (the seed's verifier): check blobs against disk, end to end.

For each blob of a range: its by-hash file exists and is a regular file, its
size is the catalogue's, (with ``--hash``) its content hashes to its ID (the
catalogue's empty blob, see :mod:`relinker.catalogue`, is accepted for an
empty file), every expected archive path is a hardlink of it, and
``n_hardlinks`` is the number of links found. Every failure is a problem of
the verify run, with blob and path; the blobs of a range that passed all of
it get ``blobs.last_checked = now()`` in the transaction that marks the range
done. Nothing else is written.

Which blobs: every one (``--all``: ranges of blob IDs, like relink), or a
selection fixed when the run is planned (``--count N --mode never|oldest|random``,
``--from-file``), split into ranges that carry their blob IDs, so a resumed
run checks exactly the blobs it was asked to.
"""

from __future__ import annotations

import hashlib
import io
import os
import secrets
import sys
from typing import Iterable

import psycopg
from psycopg import sql

from relinker import catalogue, content, db
from relinker.checkpoint import Bounds, default_range_count, split_blob_space
from relinker.jobs import Mode
from relinker.linker import AT_LINK_LIMIT
from relinker.paths import by_hash_relpath, display
from relinker.pool import RangeContext, WorkSpec
from relinker.relink import UNUSABLE, CountWork, RangeScope, plan_list

MODE = "verify"
SELECTIONS = ("never", "oldest", "random")

SQL_NEVER = "SELECT blobid FROM blobs WHERE last_checked IS NULL ORDER BY blobid LIMIT %(n)s"
SQL_OLDEST = "SELECT blobid FROM blobs ORDER BY last_checked NULLS FIRST, blobid LIMIT %(n)s"
# One index probe per random start point: a uniform sample of uniformly
# distributed IDs without sorting or scanning the table.
SQL_RANDOM = """
SELECT DISTINCT b.blobid
FROM unnest(%(starts)s::text[]) AS s(start)
CROSS JOIN LATERAL (SELECT blobid FROM blobs WHERE blobid >= s.start ORDER BY blobid LIMIT 1) AS b
"""
SQL_ANY_OTHERS = "SELECT blobid FROM blobs WHERE NOT (blobid = ANY(%s)) LIMIT %s"
SQL_COUNT_BLOBS = "SELECT count(*) FROM blobs"
# The catalogue's sizes of the range's blobs (one blob's inodes should agree).
SQL_SIZES = """
SELECT i.blobid, array_agg(DISTINCT i.size) FILTER (WHERE i.size IS NOT NULL)
FROM inode AS i WHERE i.fs_type = 'f' AND {scope}
GROUP BY i.blobid
"""
# The range's scope keeps the server on its slice of the primary key: the
# list alone may be matched against every row of the table.
SQL_CHECKED = """
UPDATE blobs AS b SET last_checked = now()
WHERE b.blobid = ANY(%(passed)s::text[]) AND {scope}
"""
SQL_FAILED_BLOBS = """
SELECT DISTINCT blobid FROM relinker_problem WHERE run_id = %s AND blobid IS NOT NULL ORDER BY blobid
"""


class VerifyWork(CountWork):
    """Checks verify ranges in one worker process; writes only ``last_checked``."""

    def __init__(self, spec: WorkSpec):
        super().__init__(spec)
        self.rehash = bool(spec.options.get("hash"))
        self._sizes: dict[str, list[int]] = {}
        #: blobs of the range without a usable by-hash file (their links were not checked)
        self._unusable: set[str] = set()
        #: by-hash files of the range: whether each has all the links its filesystem allows
        self._link_limits: dict[bytes, bool] = {}

    def process(self, r, ctx: RangeContext):
        scope = RangeScope.of(r)
        query = sql.SQL(SQL_SIZES).format(scope=scope.where("i"))
        self._sizes = dict(self.data.get().execute(query, scope.params, prepare=False).fetchall())
        self._unusable = set()
        self._link_limits = {}
        return super().process(r, ctx)

    def _source(self, blobid: str, ctx: RangeContext):
        source = super()._source(blobid, ctx)
        if source is UNUSABLE:
            self._unusable.add(blobid)
        return source

    def check_source(self, blobid: str, relpath: bytes, ctx: RangeContext) -> None:
        """The by-hash file's size against the catalogue's, and with ``--hash`` its content against its ID."""
        path = self.linker.source_path(relpath)
        try:
            fd = self.linker.open_source(relpath)
        except OSError as exc:
            ctx.problem("content-unreadable", f"{display(path)}: {exc.strerror}", blobid=blobid, path=path)
            return
        try:
            size = os.fstat(fd).st_size
            sizes = self._sizes.get(blobid)
            if sizes and size not in sizes:
                ctx.problem("size-mismatch", f"by-hash file has {size} bytes, catalogue says {sorted(sizes)}",
                            blobid=blobid, path=path)
            if not self.rehash:
                return
            try:
                digest, read = content.hash_fd(fd, ctx.tick)
            except OSError as exc:
                ctx.problem("content-unreadable", f"{display(path)}: {exc.strerror}", blobid=blobid, path=path)
                return
            ctx.counters.bytes_read += read
            ctx.tick()
            if not catalogue.content_matches(blobid, digest, read):
                ctx.problem("content-mismatch", "content does not hash to its blob ID", blobid=blobid, path=path)
        finally:
            os.close(fd)

    def visit(self, source, source_id, paths, tally, problem) -> int:
        return self.linker.probe_all(source_id, paths, tally, problem,
                                     general=lambda path: self.settle(source, source_id, path, tally, problem))

    def settle(self, source, source_id, path, tally, problem) -> bool:
        """One path that is not simply a link of the blob: say what is wrong with it.

        A path missing while the by-hash file has all the links its
        filesystem allows is what relink records as ``too-many-links``: a
        limit, not damage; the blob passes if nothing else is wrong.
        """
        def checked(where: bytes, kind: str, detail: str) -> None:
            if kind == "link-missing" and self._at_link_limit(source):
                problem(where, "too-many-links", f"no archive entry: {AT_LINK_LIMIT}", fails_blob=False)
            else:
                problem(where, kind, detail)

        return self.linker.check_one(source_id, path, tally, checked)

    def _at_link_limit(self, source: bytes) -> bool:
        """Whether the by-hash file has as many links as its filesystem allows (asked once per range)."""
        if source not in self._link_limits:
            try:
                fd = self.linker.open_source(source)
                try:
                    self._link_limits[source] = os.fstat(fd).st_nlink >= os.fpathconf(fd, "PC_LINK_MAX")
                finally:
                    os.close(fd)
            except OSError:
                self._link_limits[source] = False
        return self._link_limits[source]

    def after_range(self, ctx: RangeContext, linked, expected, recorded) -> None:
        # The walk took each by-hash file by lstat alone (the C walker asks
        # Python only about unusual ones); size and content are checked here.
        for blobid in sorted(expected):
            if blobid not in self._unusable:
                self.check_source(blobid, by_hash_relpath(blobid), ctx)
        # Blobs without a regular-file inode have no path, but a by-hash file all the same.
        for blobid, _, _ in recorded:
            if blobid not in expected and self._source(blobid, ctx) is not UNUSABLE:
                self.check_source(blobid, by_hash_relpath(blobid), ctx)
        # Without a by-hash file no link was looked for: a count to compare would only repeat that.
        super().after_range(ctx, linked, expected, [row for row in recorded if row[0] not in self._unusable])

    def finalize_step(self, ctx: RangeContext, scope: RangeScope, linked, expected, recorded):
        """``last_checked`` for the range's blobs that passed, nothing else."""
        checked = {blobid for blobid, _, _ in recorded} | set(ctx.range.blobids or ())
        failed = checked & ctx.problem_blobs
        ctx.counters.blobs = len(checked)
        ctx.counters.blobs_failed = len(failed)
        params = {"passed": db.text_array(sorted(checked - failed)), **scope.params}
        statement = checked_statement(scope)

        def finalize(conn: psycopg.Connection) -> None:
            # prepare=False: a generic plan cannot see the range bounds.
            conn.execute(statement, params, prepare=False)

        return finalize


def checked_statement(scope: RangeScope) -> sql.Composed:
    """The UPDATE that sets ``last_checked`` of the passed blobs of a range."""
    return sql.SQL(SQL_CHECKED).format(scope=scope.where("b"))


# --- planning -----------------------------------------------------------------

def select_blobs(conn: psycopg.Connection, selection: str, count: int) -> list[str]:
    """``count`` blob IDs: never checked, least recently checked, or a random sample."""
    if selection == "never":
        return [b for (b,) in conn.execute(SQL_NEVER, {"n": count})]
    if selection == "oldest":
        return [b for (b,) in conn.execute(SQL_OLDEST, {"n": count})]
    chosen: set[str] = set()
    for _ in range(4):  # start points can land on the same blob; top up a few times
        missing = count - len(chosen)
        if missing <= 0:
            break
        starts = [secrets.token_hex(32) for _ in range(missing)]
        chosen.update(b for (b,) in conn.execute(SQL_RANDOM, {"starts": starts}))
    if len(chosen) < count:
        # A sample close to the table's size: take the rest in whatever order.
        chosen.update(b for (b,) in conn.execute(SQL_ANY_OTHERS, (list(chosen), count - len(chosen))))
    return sorted(chosen)[:count]


def plan(conn: psycopg.Connection, options: dict, blobids: list[str] | None, workers: int,
         n_ranges: int | None) -> list[Bounds]:
    """Ranges of a verify run: every blob (``--all``), or the selection, fixed now.

    With ``--hash`` a blob may hold gigabytes: even a few blobs get a range
    for every worker.
    """
    heavy = bool(options.get("hash"))
    if blobids is not None:
        return plan_list(blobids, workers, n_ranges, heavy=heavy)
    if options.get("selection") == "all":
        n_blobs = conn.execute(SQL_COUNT_BLOBS).fetchone()[0]
        return split_blob_space(n_ranges or default_range_count(n_blobs, workers, heavy=heavy))
    return plan_list(select_blobs(conn, options["selection"], options["count"]), workers, n_ranges, heavy=heavy)


def read_blob_ids(source: Iterable[str]) -> list[str]:
    """Blob IDs listed one per line (blank lines and # comments ignored)."""
    ids = []
    for line in source:
        # A NUL is no character PostgreSQL's text takes: U+FFFD, as for bytes that are not UTF-8.
        line = line.split("#", 1)[0].strip().replace("\0", "\ufffd")
        if line:
            ids.append(line.lower())
    return ids


def blob_ids_from(file_argument: str) -> list[str]:
    """IDs from ``--from-file FILE`` (``-`` for stdin)."""
    if file_argument == "-":
        # Bytes that are not UTF-8 read as U+FFFD, as from a file: such a
        # line is an unknown blob, never a string the database cannot take.
        return read_blob_ids(io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="replace"))
    with open(file_argument, encoding="utf-8", errors="replace") as f:
        return read_blob_ids(f)


def listing_fingerprint(blobids: list[str]) -> str:
    """What a run planned from a list keeps of it: enough to tell the same list again on a resume."""
    distinct = sorted(set(blobids))
    return f"{len(distinct)} blobs, sha256 {hashlib.sha256(chr(10).join(distinct).encode()).hexdigest()[:16]}"


def write_failed_ids(conn: psycopg.Connection, run_id: int, destination: str) -> int:
    """Write the IDs of the blobs that failed in ``run_id`` to ``destination``, in --from-file's format.

    Written to a temporary name and renamed into place, so a reader never
    sees half a list. Returns how many IDs were written.
    """
    failed = [blobid for (blobid,) in conn.execute(SQL_FAILED_BLOBS, (run_id,))]
    temporary = f"{destination}.relinker-{secrets.token_hex(4)}"
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(f"# blobs that failed relinker verify run {run_id}; repair: relinker relink --from-file FILE\n")
        f.writelines(blobid + "\n" for blobid in failed)
    os.replace(temporary, destination)
    return len(failed)


MODE_SPEC = Mode(name=MODE, work=VerifyWork, plan=plan, writes=frozenset(),  # the catalogue only
                 in_bytes=lambda options: bool(options.get("hash")))
