"""Count mode (the seed's hardlink counter): relink's walk, checking links instead of making them.

Every non-excluded path of a range's blobs is looked at by ``lstat`` alone
(nothing is created, no content read); a blob whose ``n_hardlinks``
disagrees with what was found is a ``count-mismatch`` problem, and outside a
dry run both counts are written as relink writes them.
"""

from __future__ import annotations

import stat

from relinker.errors import unless_out_of_resources
from relinker.jobs import Mode
from relinker.linker import AT_LINK_LIMIT, LinkProblem, filesystem_link_limit
from relinker.paths import by_hash_relpath
from relinker.pool import RangeContext, WorkSpec
from relinker.relink import RelinkWork, plan

MODE = "count"


class CountWork(RelinkWork):
    """The seed's hardlink counter: count correct links by lstat alone, create nothing.

    Blobs whose ``n_hardlinks`` disagrees with the count are reported as
    ``count-mismatch`` problems; outside a dry run the true counts are
    written (by the same statement relink uses). A path not linked because
    its by-hash file has all the links its filesystem allows is a
    ``too-many-links`` problem, as relink records it; a blob some inode names
    without a ``blobs`` row, whose links are missing, is an
    ``incomplete-without-row`` problem (no count says it is incomplete).
    """

    PROBES = True
    #: Say why each path is not a link (verify); count only counts them, but for the link limit.
    SAYS_WHY = False

    def __init__(self, spec: WorkSpec):
        super().__init__(spec)
        #: by-hash files of the range: their size if they have all the links their filesystem allows, else None
        self._at_limit: dict[bytes, int | None] = {}
        #: the store's filesystem's link limit (None: not known, or none)
        self._link_max = filesystem_link_limit(spec.by_hash_root) if spec.by_hash_root else None

    def process(self, r, ctx: RangeContext):
        self._at_limit = {}
        return super().process(r, ctx)

    def visit(self, source, source_id, paths, tally, problem) -> int:
        return self.linker.probe_all(source_id, paths, tally, problem,
                                     general=lambda path: self.settle(source, source_id, path, tally, problem))

    def settle(self, source, source_id, path, tally, problem) -> bool:
        """One path that is not simply a link of the blob: what is wrong with it, if anything is to be said.

        While the by-hash file has all the links its filesystem allows, a
        path that relink could not link for that reason is what relink
        records as ``too-many-links``: a limit, not damage. That is a missing
        path, or one holding a regular file of the content's size (the
        copier's own copy, as of the empty content); any other file there is
        ``wrong-inode``.
        """
        def checked(where: bytes, kind: str, detail: str) -> None:
            if kind in ("link-missing", "wrong-inode"):
                limit_size = self._size_at_link_limit(source)
                if limit_size is not None and (kind == "link-missing" or self._holds_size(where, limit_size)):
                    what = "no archive entry" if kind == "link-missing" else "a copy of the content's size, not a link"
                    problem(where, "too-many-links", f"{what}: {AT_LINK_LIMIT}")
                    return
                if not self.SAYS_WHY:
                    return  # counted, as missing
            problem(where, kind, detail)

        return self.linker.check_one(source_id, path, tally, checked)

    def _size_at_link_limit(self, source: bytes) -> int | None:
        """The by-hash file's size if it has as many links as its filesystem allows, else None (once per range)."""
        if self._link_max is None:
            return None
        if source not in self._at_limit:
            try:
                found = self.linker.stat_source(source)
                self._at_limit[source] = found.st_size if found.st_nlink >= self._link_max else None
            except OSError as exc:
                unless_out_of_resources(exc)  # this process's trouble: the range fails, redone
                self._at_limit[source] = None
        return self._at_limit[source]

    def _holds_size(self, path: bytes, size: int) -> bool:
        """Whether an archive path is a regular file of ``size`` bytes."""
        try:
            found = self.linker.probe(path)
        except LinkProblem:
            return False
        return found is not None and stat.S_ISREG(found.st_mode) and found.st_size == size

    def after_range(self, ctx: RangeContext, linked, expected, recorded) -> None:
        for blobid, recorded_linked, _ in recorded:
            if blobid in self.unexamined:
                continue  # its problem says why its links were not counted
            actual = linked.get(blobid, 0)
            if (recorded_linked or 0) != actual:
                ctx.problem("count-mismatch",
                            f"n_hardlinks was {recorded_linked or 0}, {actual} of {expected.get(blobid, 0)} "
                            "paths are linked",
                            blobid=blobid)
        if self.SAYS_WHY:
            return  # each missing link is a problem of its own
        rowless = expected.keys() - {blobid for blobid, _, _ in recorded} - self.unexamined
        for blobid in sorted(rowless):
            # at the link limit, what is missing is too-many-links, which no relink can make
            at_limit = self._at_limit.get(by_hash_relpath(blobid)) is not None
            if linked.get(blobid, 0) < expected[blobid] and blobid not in ctx.problem_blobs and not at_limit:
                ctx.problem("incomplete-without-row",
                            f"{linked.get(blobid, 0)} of {expected[blobid]} paths are linked, and no blobs row "
                            "counts them (relink --only-incomplete cannot see it): relink --from-file with its "
                            "ID makes them", blobid=blobid)


MODE_SPEC = Mode(name=MODE, work=CountWork, plan=plan, writes=frozenset(),  # the catalogue only
                 excludes=frozenset({"relink", "copy", "scan"}), missing_apart=True)
