"""Verify mode (the seed's verifier): check blobs against disk, end to end.

For each blob of a range: its by-hash file exists and is a regular file, its
size is the catalogue's, (with ``--hash``) its content hashes to its ID (the
catalogue's empty blob, see :mod:`relinker.catalogue`, is accepted for an
empty file; a content that does is sound whatever size the catalogue gives
it, which is logged, not failed), every expected archive path is a hardlink of it, and
``n_hardlinks`` is the number of links found (where the blob has been
counted: ``expected_hardlinks`` set). Every failure is a problem of
the verify run, with blob and path; the blobs of a range that passed all of
it get ``blobs.last_checked = now()`` in the transaction that marks the range
done, and the catalogue's blobs that failed a row in relinker's own
``relinker_verify_failure`` (until they pass). Nothing else is written.

Which blobs: every one (``--all``: ranges of blob IDs, like relink), or a
selection fixed when the run is planned (``--count N --mode never|oldest|random``,
``--from-file``), split into ranges that carry their blob IDs, so a resumed
run checks exactly the blobs it was asked to. A failed check is a check:
``never`` skips blobs that failed, ``oldest`` orders them by their failure.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import secrets

import psycopg
from psycopg import sql

from relinker import catalogue, content, db
from relinker.checkpoint import Bounds, default_range_count, split_blob_space
from relinker.errors import UserError, unless_out_of_resources
from relinker.jobs import Mode
from relinker.paths import by_hash_relpath, display
from relinker.pool import LIMIT_KINDS, RangeContext, WorkSpec
from relinker.count import CountWork
from relinker.relink import UNUSABLE, RangeScope, plan_list

MODE = "verify"

log = logging.getLogger(__name__)
SELECTIONS = ("never", "oldest", "random")
#: verify without --all or --from-file: this many blobs, never checked first.
DEFAULT_COUNT = 100
DEFAULT_SELECTION = "never"

# A check is a pass (blobs.last_checked) or a failure (relinker_verify_failure, until a pass).
SQL_NEVER = """
SELECT b.blobid FROM blobs AS b
WHERE b.last_checked IS NULL
  AND NOT EXISTS (SELECT 1 FROM relinker_verify_failure AS f WHERE f.blobid = b.blobid)
ORDER BY b.blobid LIMIT %(n)s
"""
SQL_OLDEST = """
SELECT blobid FROM (
    (SELECT b.blobid, b.last_checked AS checked FROM blobs AS b
     WHERE NOT EXISTS (SELECT 1 FROM relinker_verify_failure AS f WHERE f.blobid = b.blobid)
     ORDER BY b.last_checked NULLS FIRST, b.blobid LIMIT %(n)s)
    UNION ALL
    (SELECT f.blobid, f.failed_at FROM relinker_verify_failure AS f JOIN blobs AS b USING (blobid)
     ORDER BY f.failed_at, f.blobid LIMIT %(n)s)
) AS candidates
ORDER BY checked NULLS FIRST, blobid LIMIT %(n)s
"""
# Each blob drawn on its own with the same chance: a uniform sample, for one
# read of the table (the blob after each of many random IDs is no such sample:
# a blob after a wide gap between IDs is drawn tens of times as often).
SQL_BERNOULLI = "SELECT blobid FROM blobs TABLESAMPLE BERNOULLI (%(percent)s)"
SQL_EVERY_BLOB = "SELECT blobid FROM blobs ORDER BY blobid"
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
# A blob that passed is no failure any more; one that failed is, as of now.
SQL_RECORD_FAILURES = """
WITH passed AS (DELETE FROM relinker_verify_failure WHERE blobid = ANY(%(passed)s::text[]))
INSERT INTO relinker_verify_failure (blobid, run_id)
SELECT unnest(%(failed)s::text[]), %(run_id)s
ON CONFLICT (blobid) DO UPDATE SET run_id = EXCLUDED.run_id, failed_at = now()
"""
SQL_FAILED_BLOBS = """
SELECT DISTINCT blobid FROM relinker_problem
WHERE run_id = %(run_id)s AND blobid IS NOT NULL AND kind <> ALL(%(limits)s::text[])
ORDER BY blobid
"""


class VerifyWork(CountWork):
    """Checks verify ranges in one worker process; writes only ``last_checked``."""

    SAYS_WHY = True
    RECORDED_BEFORE_WALK = True

    def __init__(self, spec: WorkSpec):
        super().__init__(spec)
        self.rehash = bool(spec.options.get("hash"))
        self._sizes: dict[str, list[int]] = {}
        #: blobs of the range without a usable by-hash file (their links were not checked)
        self._unusable: set[str] = set()
        #: chosen from the catalogue (--count, --mode): an ID it no longer has was removed since planning
        self._chosen = spec.options.get("selection") in SELECTIONS
        #: blobs of the range's selection the catalogue no longer has (neither checked nor failed)
        self._gone: set[str] = set()

    def process(self, r, ctx: RangeContext):
        scope = RangeScope.of(r)
        query = sql.SQL(SQL_SIZES).format(scope=scope.where("i"))
        self._sizes = dict(self.data.get().execute(query, scope.params, prepare=False).fetchall())
        self._unusable = set()
        self._gone = set()
        return super().process(r, ctx)

    def unknown_blobs(self, ctx: RangeContext, unknown: set[str]) -> None:
        if not self._chosen:
            super().unknown_blobs(ctx, unknown)  # a list of the user's
        elif unknown:
            self._gone = unknown
            log.info("%d blobs of the selection are gone from the catalogue since the run was planned: "
                     "not checked", len(unknown))

    def _source(self, blobid: str, ctx: RangeContext):
        source = super()._source(blobid, ctx)
        if source is UNUSABLE:
            self._unusable.add(blobid)
        return source

    def check_source(self, blobid: str, relpath: bytes, ctx: RangeContext) -> None:
        """The by-hash file's size against the catalogue's, and with ``--hash`` its content against its ID.

        Without ``--hash`` the size is an lstat's: no read permission is needed. With it, a content that
        hashes to its ID is sound: a size of the catalogue's that differs is the catalogue's error, logged.
        """
        path = self.linker.source_path(relpath)
        try:
            fd = self.linker.open_source(relpath) if self.rehash else None
            size = (os.fstat(fd) if fd is not None else self.linker.stat_source(relpath)).st_size
        except OSError as exc:
            unless_out_of_resources(exc)
            ctx.problem("content-unreadable", exc.strerror, blobid=blobid, path=path)
            return
        try:
            sizes = self._sizes.get(blobid)
            size_differs = bool(sizes) and size not in sizes
            digest = read = None
            if fd is not None:
                try:
                    digest, read = content.hash_fd(fd, ctx.tick)
                except OSError as exc:
                    unless_out_of_resources(exc)
                    ctx.problem("content-unreadable", exc.strerror, blobid=blobid, path=path)
                ctx.counters.bytes_read += read or 0
                ctx.tick()
            sound = digest is not None and catalogue.content_matches(blobid, digest, read)
            if size_differs and sound:
                # The content is its ID's: the catalogue's size is what is wrong, and not relinker's to mend.
                log.warning("%s: sound (its content is its blob ID's) with %d bytes, where the catalogue's "
                            "inodes of the blob say %s", display(path), size, sorted(sizes))
                return
            if size_differs:
                ctx.problem("size-mismatch", f"by-hash file has {size} bytes, catalogue says {sorted(sizes)}",
                            blobid=blobid, path=path)
            if digest is not None and not sound:
                ctx.problem("content-mismatch", "content does not hash to its blob ID", blobid=blobid, path=path)
        finally:
            if fd is not None:
                os.close(fd)

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
        # A blob without expected_hardlinks has counts still to be made (never counted, or its paths
        # changed by a re-scan): its n_hardlinks claims nothing verify could find wrong.
        super().after_range(ctx, linked, expected, [row for row in recorded
                                                    if row[0] not in self._unusable and row[2] is not None])

    def finalize_step(self, ctx: RangeContext, scope: RangeScope, linked, expected, recorded):
        """``last_checked`` for the range's blobs that passed; the failed ones into relinker_verify_failure."""
        known = {blobid for blobid, _, _ in recorded}
        # Blobs some inode names without a blobs row are checked (and may fail) all the same.
        checked = known | expected.keys() | (set(ctx.range.blobids or ()) - self._gone)
        failed = checked & ctx.problem_blobs
        ctx.counters.blobs = len(checked)
        ctx.counters.blobs_failed = len(failed)
        # last_checked and failures are written only where the catalogue has a blobs row.
        passed = sorted((checked - failed) & known)
        params = {"passed": db.text_array(passed), **scope.params}
        # Only blobs of the catalogue: an unknown ID of a --from-file list fails, and is no blob.
        failures = {"passed": params["passed"], "failed": db.text_array(sorted(failed & known)),
                    "run_id": ctx.range.run_id}
        statement = checked_statement(scope)

        def finalize(conn: psycopg.Connection) -> None:
            # A range with no blob that passed leaves blobs alone: its statement
            # triggers would fire all the same.
            if passed:
                # prepare=False: a generic plan cannot see the range bounds.
                conn.execute(statement, params, prepare=False)
            conn.execute(SQL_RECORD_FAILURES, failures)

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
    total = conn.execute(catalogue.SQL_COUNT_BLOBS).fetchone()[0]
    if total <= count:
        return [b for (b,) in conn.execute(SQL_EVERY_BLOB)]
    # A few standard deviations over the count: one draw is nearly always enough. Draws, then a sample
    # of what they drew, treat every blob alike: each is chosen with the same chance.
    percent = min(100.0, 100.0 * (count + 4 * count ** 0.5 + 10) / total)
    drawn: set[str] = set()
    while len(drawn) < count:
        drawn.update(b for (b,) in conn.execute(SQL_BERNOULLI, {"percent": percent}))
    return sorted(random.SystemRandom().sample(sorted(drawn), count))


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
        n_blobs = conn.execute(catalogue.SQL_COUNT_BLOBS).fetchone()[0]
        return split_blob_space(n_ranges or default_range_count(n_blobs, workers, heavy=heavy))
    return plan_list(select_blobs(conn, options["selection"], options["count"]), workers, n_ranges, heavy=heavy)


def write_failed_ids(conn: psycopg.Connection, run_id: int, destination: str) -> int:
    """Write the IDs of the blobs that failed in ``run_id`` to ``destination``, in --from-file's format.

    Written to a temporary name and renamed into place, so a reader never
    sees half a list. Returns how many IDs were written.
    """
    failed = [blobid for (blobid,) in conn.execute(SQL_FAILED_BLOBS, {"run_id": run_id, "limits": sorted(LIMIT_KINDS)})]
    # Beside it, under a name of its own length: the list's own name may be as long as a name can be.
    temporary = os.path.join(os.path.dirname(destination), f".relinker-failed-ids-{secrets.token_hex(4)}")
    try:
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(f"# blobs that failed relinker verify run {run_id}; relinker relink --from-file FILE repairs their "
                    "links (a damaged by-hash file needs its content back first)\n")
            f.writelines(blobid + "\n" for blobid in failed)
        os.replace(temporary, destination)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return len(failed)


class FailedIdsNotWritten(Exception):
    """The list of a recorded run's failed blobs could not be written (the run stays recorded)."""


def save_failed_ids(dsn: str, run_id: int, destination: str) -> int:
    """write_failed_ids in a session of its own; whatever keeps the list from being written (the
    database, the file) is a :class:`FailedIdsNotWritten` naming it. Returns how many IDs were written."""
    try:
        with db.connect_for_user(dsn, autocommit=True) as conn:
            return write_failed_ids(conn, run_id, destination)
    except OSError as exc:
        raise FailedIdsNotWritten(exc.strerror or str(exc)) from None
    except psycopg.Error as exc:
        raise FailedIdsNotWritten(f"database error: {db.first_line(exc)}") from None
    except UserError as exc:  # the session refused
        raise FailedIdsNotWritten(str(exc)) from None


def complete_options(options: dict) -> None:
    """verify's defaults: without a selection, the DEFAULT_COUNT blobs never checked; a count for
    every chosen selection."""
    if not options.get("selection"):
        options["selection"] = DEFAULT_SELECTION
    if options["selection"] in SELECTIONS and not options.get("count"):
        options["count"] = DEFAULT_COUNT


MODE_SPEC = Mode(name=MODE, work=VerifyWork, plan=plan, writes=frozenset(),  # the catalogue only
                 complete_options=complete_options, excludes=frozenset({"relink", "copy", "scan"}),
                 catalogue_writes=(("blobs", "UPDATE", ("last_checked",)), ("relinker_verify_failure", "INSERT", ()),
                                   ("relinker_verify_failure", "UPDATE", ()), ("relinker_verify_failure", "DELETE", ())),
                 catalogue_reads=("blobs", "inode", "relinker_path", "relinker_verify_failure"),
                 in_bytes=lambda options: bool(options.get("hash")))
