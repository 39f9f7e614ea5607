"""What a run did, for humans (summary, progress bar) and scripts (``--json``)."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import Callable

import psycopg
import tqdm

from relinker.checkpoint import SUPERSEDED, Counters, Problem
from relinker.paths import display

SQL_RUN_PROGRESS = """
SELECT run_id, mode, status, ranges_total, ranges_done, ranges_running, ranges_pending, ranges_failed,
       blobs, links_created, links_present, links_replaced, problems, links_missing, files_copied,
       bytes_copied, bytes_read, blobs_failed, bytes_planned, extract(epoch FROM elapsed)::float8, extract(epoch FROM working)::float8,
       extract(epoch FROM eta)::float8,
       options, ranges_at_work, at_work
FROM relinker_run_progress WHERE run_id = %s
"""
SQL_PROBLEM_KINDS = "SELECT kind, problems FROM relinker_problem_kinds WHERE run_id = %s ORDER BY problems DESC, kind"
# In the order of relinker_problem_range_idx: ordered by problem_id alone, the server read every
# older run's problems (or all of the run's) to find the first few.
SQL_PROBLEM_SAMPLES = """
SELECT kind, detail, blobid, path FROM relinker_problem WHERE run_id = %s ORDER BY range_no, problem_id LIMIT %s
"""
SQL_OPEN_RANGES = """
SELECT range_no, status, lo, hi, worker, attempts, extract(epoch FROM heartbeat_age)::float8, last_error,
       held, at_work
FROM relinker_open_ranges WHERE run_id = %s
ORDER BY status = 'running' DESC, status = 'failed' DESC, range_no LIMIT %s
"""
SAMPLE_LIMIT = 20


@dataclasses.dataclass
class Summary:
    """A run's figures: the same for the end of a run, ``relinker status`` and ``--json``."""

    mode: str
    run_id: int | None = None
    status: str = "open"
    dry_run: bool = False
    interrupted: bool = False
    counters: Counters = dataclasses.field(default_factory=Counters)
    problems_by_kind: dict[str, int] = dataclasses.field(default_factory=dict)
    problem_samples: list[Problem] = dataclasses.field(default_factory=list)
    ranges_total: int = 0
    ranges_done: int = 0
    ranges_running: int = 0
    ranges_pending: int = 0
    ranges_failed: int = 0
    #: of a run read back from the catalogue: its ranges being worked right now (held, heartbeat fresh)
    ranges_at_work: int | None = None
    #: of a run read back from the catalogue: whether a worker is at work on it (a range at work, or one
    #: between two ranges)
    at_work: bool | None = None
    elapsed_seconds: float = 0.0
    #: of a run read back from the catalogue: the time its ranges were worked (the rate's divisor)
    working_seconds: float | None = None
    links_this_session: int = 0
    #: paths looked at this session: count's rate (most of what it looks at may be missing)
    paths_this_session: int = 0
    eta_seconds: float | None = None
    #: content the run's ranges hold (copy plans it), None where not planned
    bytes_planned: int | None = None
    #: content read this session (the MB/s's numerator)
    bytes_this_session: int = 0
    open_ranges: list[dict] = dataclasses.field(default_factory=list)
    #: why the run stopped before it was complete, other than a signal (the database went away)
    stopped: str | None = None
    options: dict = dataclasses.field(default_factory=dict)

    @property
    def complete(self) -> bool:
        if self.dry_run:  # no record but what its workers reported: a dead worker's range was not done
            return not self.interrupted and self.ranges_done == self.ranges_total
        return self.status == "done"

    @property
    def missing_apart(self) -> bool:
        """Whether the run's mode counts a path not linked as missing alone (count; jobs.Mode.missing_apart)."""
        return self.mode == "count"

    @property
    def _seconds(self) -> float:
        return self.elapsed_seconds if self.working_seconds is None else self.working_seconds

    @property
    def links_per_second(self) -> float:
        return self.links_this_session / self._seconds if self._seconds > 0 else 0.0

    @property
    def mb_per_second(self) -> float:
        """Content read per second (copy, verify --hash), in MB (10^6 bytes)."""
        return self.bytes_this_session / 1e6 / self._seconds if self._seconds > 0 else 0.0

    @classmethod
    def from_run(cls, conn: psycopg.Connection, run_id: int, *, open_ranges: bool = False) -> "Summary":
        """Read a run's figures from the checkpoint views."""
        row = conn.execute(SQL_RUN_PROGRESS, (run_id,)).fetchone()
        if row is None:
            raise LookupError(run_id)
        (run_id, mode, status, total, done, running, pending, failed, *counters, bytes_planned,
         elapsed, working, eta, options, ranges_at_work, at_work) = row
        summary = cls(
            mode=mode, run_id=run_id, status=status,
            counters=Counters(*counters),
            problems_by_kind=dict(conn.execute(SQL_PROBLEM_KINDS, (run_id,)).fetchall()),
            problem_samples=[Problem(kind, detail, blobid, bytes(path) if path is not None else None)
                             for kind, detail, blobid, path in conn.execute(SQL_PROBLEM_SAMPLES, (run_id, SAMPLE_LIMIT))],
            ranges_total=total, ranges_done=done, ranges_running=running, ranges_pending=pending,
            ranges_failed=failed, elapsed_seconds=elapsed or 0.0, working_seconds=working or 0.0,
            eta_seconds=eta, bytes_planned=bytes_planned, ranges_at_work=ranges_at_work, at_work=at_work,
            options=options or {},
        )
        summary.links_this_session = summary.counters.links
        summary.paths_this_session = summary.counters.looked_at(summary.missing_apart)
        summary.bytes_this_session = summary.counters.bytes_read
        if open_ranges:
            summary.open_ranges = [
                dict(range_no=n, status=s, lo=lo, hi=hi, worker=w, attempts=a, heartbeat_age_seconds=age,
                     last_error=err, stale=s == "running" and not at_work, worker_gone=s == "running" and not held)
                for n, s, lo, hi, w, a, age, err, held, at_work in conn.execute(SQL_OPEN_RANGES,
                                                                                 (run_id, SAMPLE_LIMIT))
            ]
        return summary

    def as_json(self) -> str:
        data = {
            "mode": self.mode,
            "run_id": self.run_id,
            "status": self.status,
            "complete": self.complete,
            "dry_run": self.dry_run,
            "interrupted": self.interrupted,
            **self.counters.as_dict(),
            "links": self.counters.links,
            "problems_by_kind": self.problems_by_kind,
            "problem_samples": [
                {"kind": p.kind, "detail": p.detail, "blobid": p.blobid,
                 "path": display(p.path) if p.path is not None else None}
                for p in self.problem_samples
            ],
            "ranges_total": self.ranges_total,
            "ranges_done": self.ranges_done,
            "ranges_running": self.ranges_running,
            "ranges_pending": self.ranges_pending,
            "ranges_failed": self.ranges_failed,
            "ranges_at_work": self.ranges_at_work,
            "at_work": self.at_work,
            "stopped": self.stopped,
            "elapsed_seconds": round(self.elapsed_seconds, 3),
            "working_seconds": None if self.working_seconds is None else round(self.working_seconds, 3),
            "links_per_second": round(self.links_per_second, 1),
            "bytes_planned": self.bytes_planned,
            "mb_per_second": round(self.mb_per_second, 1),
            "eta_seconds": self.eta_seconds,
            "open_ranges": self.open_ranges,
            "options": self.options,
        }
        if self.mode == "verify":
            data.update(checked=self.counters.blobs, passed=self.counters.blobs - self.counters.blobs_failed,
                        failed=self.counters.blobs_failed)
        return json.dumps(data, sort_keys=False)

    def as_text(self) -> str:
        c = self.counters
        if self.dry_run:
            title = f"{self.mode} (dry run, nothing written)"
        else:
            title = f"run {self.run_id} ({self.mode})"
        state = ("complete" if self.complete else "interrupted" if self.interrupted
                 else "superseded by a scan" if self.status == SUPERSEDED else "not complete")
        lines = [f"{title}: {state}"]
        verb = "would be " if self.dry_run else ""
        kinds = ", ".join(f"{kind} {n:,}" for kind, n in self.problems_by_kind.items())
        rows = [("ranges", f"{self.ranges_total:,}"), ("options", self._options_text())] if self.dry_run else [(
            "ranges",
            f"{self.ranges_done:,} of {self.ranges_total:,} done"
            + (f", {self.ranges_failed:,} failed" if self.ranges_failed else "")
            + (f", {self.ranges_running:,} running" if self.ranges_running else ""),
        )]
        problems = ("problems", f"{c.problems:,}" + (f" ({kinds})" if kinds else ""))
        copy_planned = self.mode == "copy" and self.dry_run
        if copy_planned:
            # What the catalogue plans, not what a copy would do: it reads no
            # content, so it cannot tell the contents and links already there.
            rows += [
                ("inodes to store", f"{c.blobs:,}"),
                ("paths to link", f"{c.links_created:,} (those already linked are left as they are)"),
                problems,
                ("content to read", f"{human_bytes(c.bytes_read)} (written only where the store lacks it)"),
            ]
        elif self.mode == "verify":
            rows += [
                ("blobs", f"{c.blobs:,} checked, {c.blobs - c.blobs_failed:,} passed, {c.blobs_failed:,} failed"),
                ("links present", f"{c.links_present:,}"),
                ("links missing", f"{c.links_missing:,}"),
                problems,
            ]
        else:
            rows += [
                ("inodes" if self.mode == "copy" else "blobs", f"{c.blobs:,}"),
                (f"links {verb}created", f"{c.links_created:,}"),
                ("links present", f"{c.links_present:,}"),
                (f"links {verb}replaced", f"{c.links_replaced:,}"),
                problems,
            ]
            if self.mode == "count" or c.links_missing:
                rows.append(("links missing", f"{c.links_missing:,}"))
        if self.mode == "copy" and not self.dry_run:
            rows.append(("by-hash files written", f"{c.files_copied:,} ({human_bytes(c.bytes_copied)})"))
        # A run resumed, or worked by other hosts too: its figures are the run's, the rates this session's.
        earlier = ((self.links_this_session, self.bytes_this_session) != (c.links, c.bytes_read)
                   or (self.missing_apart and self.paths_this_session != c.looked_at(True)))
        own = "this session: " if not self.dry_run and earlier else ""
        if (c.bytes_read or self.bytes_planned) and not copy_planned:
            planned = f" of {human_bytes(self.bytes_planned)}" if self.bytes_planned else ""
            rows.append(("content read",
                         f"{human_bytes(c.bytes_read)}{planned} ({own}{self.mb_per_second:,.1f} MB/s)"))
        rate = f"{own}{self.links_per_second:,.0f} links/s"
        if self.missing_apart:  # what it looked at, present or not
            paths_per_second = self.paths_this_session / self._seconds if self._seconds > 0 else 0.0
            rate = f"{own}{paths_per_second:,.0f} paths/s"
        if self.working_seconds is not None and self.working_seconds < 0.9 * self.elapsed_seconds:
            # interrupted and resumed: the rate is over the time it worked
            rows.append(("elapsed", f"{self.elapsed_seconds:,.1f} s, {self.working_seconds:,.1f} s of it working "
                                    f"({rate})"))
        else:
            rows.append(("elapsed", f"{self.elapsed_seconds:,.1f} s ({rate})"))
        if self.status == SUPERSEDED:
            pass  # nothing to resume
        elif self.at_work is False and not self.complete:
            rows.append(("eta", "none: no worker is at work (resume the run)"))
        elif self.eta_seconds and not self.complete:
            rows.append(("eta", f"{self.eta_seconds:,.0f} s"))
        width = max(len(label) for label, _ in rows) + 2
        lines += [f"  {label:<{width}}{value}" for label, value in rows]
        for p in self.problem_samples[:10]:
            where = display(p.path) if p.path is not None else p.blobid or ""
            lines.append(f"  ! {p.kind}: {where}: {p.detail}")
        for r in self.open_ranges:
            beat = r.get("heartbeat_age_seconds")
            lines.append(f"  range {r['range_no']} {r['status']}"
                         + (f" by {r['worker']}" if r["worker"] else "")
                         + (f" (attempts {r['attempts']})" if r["attempts"] else "")
                         + (f", last heartbeat {beat:,.0f} s ago" if r["status"] == "running" and beat is not None
                            else "")
                         + (": its worker is gone (the next claim takes it over)" if r.get("worker_gone")
                            else ": stale, its worker is stuck (the next claim takes it over)" if r.get("stale")
                            else "")
                         + (f": {r['last_error']}" if r["last_error"] else ""))
        unlisted = self.ranges_running + self.ranges_pending + self.ranges_failed - len(self.open_ranges)
        if self.open_ranges and unlisted > 0:
            lines.append(f"  ... and {unlisted:,} more open ranges: "
                         f"SELECT * FROM relinker_open_ranges WHERE run_id = {self.run_id}")
        return "\n".join(lines)


    def _options_text(self) -> str:
        # What a dry run of a recorded run shows that run would do: its own options.
        given = [f"{name.replace('_', '-')} {value}" for name, value in sorted(self.options.items())
                 if value not in (None, False, "") and name not in _PLANNING_OPTIONS]
        return ", ".join(given) or "none"


#: What a run keeps of its planning beside the options it was asked for: not shown as options.
_PLANNING_OPTIONS = frozenset({"requested", "upper", "empty_blobid"})


def human_bytes(n: int | None) -> str:
    """``n`` bytes for people: 3.8 GB (decimal units, as the MB/s figures)."""
    value = float(n or 0)
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:,.0f} {unit}" if unit == "bytes" else f"{value:,.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


#: How often a shown progress bar reads the run's figures (seconds): a run two hosts share.
RUN_LOOK_INTERVAL = 15.0


class ProgressBar:
    """The parent's tqdm bar: paths (or, for content work, bytes) handled, rate and ETA.

    A total known in advance (the bytes copy planned) is the bar's total;
    otherwise it is extrapolated from the work per finished range (ranges
    hold equal expected work). The other measure shows beside the bar.
    """

    def __init__(self, ranges_total: int, ranges_done_before: int, paths_done_before: int, *, enabled: bool,
                 bytes_done_before: int = 0, in_bytes: bool = False, bytes_total: int | None = None,
                 run_so_far: Callable[[], tuple[int, int, int]] | None = None, description: str = ""):
        #: (ranges, paths, bytes) the run's finished ranges hold, read from the database: the work of
        #: other coordinators on the same run (other hosts) counts on this bar too
        self._run_so_far = run_so_far if enabled else None
        self._next_look = time.monotonic() + RUN_LOOK_INTERVAL
        self._others = (0, 0, 0)
        self._last: tuple | None = None
        self.ranges_total = ranges_total
        self.ranges_before = ranges_done_before
        self.paths_before = paths_done_before
        self.bytes_before = bytes_done_before
        self.in_bytes = in_bytes
        self.known_total = bytes_total if in_bytes and bytes_total else None
        initial = bytes_done_before if in_bytes else paths_done_before
        unit = dict(unit="B", unit_scale=True, unit_divisor=1000) if in_bytes else dict(unit="path", unit_scale=True)
        # No monitor thread: the workers are forked from this process, which must run no other thread.
        tqdm.tqdm.monitor_interval = 0
        self._bar = tqdm.tqdm(
            total=self.known_total, initial=initial, desc=description or None, dynamic_ncols=True,
            disable=not enabled, file=sys.stderr,
            smoothing=0.05, mininterval=0.5, **unit,
        )

    def update(self, paths_done: int, ranges_done: int, bytes_done: int, finished_work: tuple[int, int]) -> None:
        """Work done this session: ``paths_done`` and ``bytes_done`` by the finished ranges and those
        in flight, ``finished_work`` the (paths, bytes) of the finished ones alone."""
        self._last = (paths_done, ranges_done, bytes_done, finished_work)
        self._look_at_the_run(ranges_done, finished_work)
        other_ranges, other_paths, other_bytes = self._others
        paths = self.paths_before + paths_done + other_paths
        current = self.bytes_before + bytes_done + other_bytes if self.in_bytes else paths
        finished = self.ranges_before + ranges_done + other_ranges
        if self.known_total is None and finished and self.ranges_total:
            # Per finished range: counting ranges in flight would make the total
            # swing with how far each of them happens to be.
            done = (self.bytes_before + finished_work[1] + other_bytes if self.in_bytes
                    else self.paths_before + finished_work[0] + other_paths)
            estimate = int(done / finished * self.ranges_total) if finished < self.ranges_total else current
            self._bar.total = max(estimate, current)
        if self.in_bytes:
            self._bar.set_postfix_str(f"{paths:,} paths", refresh=False)
        self._bar.update(current - self._bar.n)

    def _look_at_the_run(self, ranges_done: int, finished_work: tuple[int, int]) -> None:
        """What other coordinators finished, every RUN_LOOK_INTERVAL (never more than the run's own figures say)."""
        if self._run_so_far is None or time.monotonic() < self._next_look:
            return
        try:
            ranges, paths, bytes_read = self._run_so_far()
        except (psycopg.Error, OSError):
            return  # the figures of this coordinator's own workers stand
        finally:
            self._next_look = time.monotonic() + RUN_LOOK_INTERVAL
        self._others = (max(0, ranges - self.ranges_before - ranges_done),
                        max(0, paths - self.paths_before - finished_work[0]),
                        max(0, bytes_read - self.bytes_before - finished_work[1]))

    def close(self, *, look: bool = True) -> None:
        """End the bar (again: nothing more); ``look``: once more at what the other hosts finished
        since the last look, for the bar's last line."""
        if look and self._run_so_far is not None and self._last is not None:
            self._next_look = 0.0
            self.update(*self._last)
        self._run_so_far = None  # closed: no more looks
        self._bar.close()
