"""Count mode (the seed's hardlink counter): relink's walk, checking links instead of making them.

Every non-excluded path of a range's blobs is looked at by ``lstat`` alone
(nothing is created, no content read); a blob whose ``n_hardlinks``
disagrees with what was found is a ``count-mismatch`` problem, and outside a
dry run both counts are written as relink writes them.
"""

from __future__ import annotations

from relinker.jobs import Mode
from relinker.pool import RangeContext
from relinker.relink import RelinkWork, plan

MODE = "count"


class CountWork(RelinkWork):
    """The seed's hardlink counter: count correct links by lstat alone, create nothing.

    Blobs whose ``n_hardlinks`` disagrees with the count are reported as
    ``count-mismatch`` problems; outside a dry run the true counts are
    written (by the same statement relink uses).
    """

    PROBES = True

    def visit(self, source, source_id, paths, tally, problem) -> int:
        return self.linker.probe_all(source_id, paths, tally, problem)

    def settle(self, source, source_id, path, tally, problem) -> bool:
        return self.linker.probe_one(source_id, path, tally, problem)

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


MODE_SPEC = Mode(name=MODE, work=CountWork, plan=plan, writes=frozenset(),  # the catalogue only
                 excludes=frozenset({"relink", "copy", "scan"}))
