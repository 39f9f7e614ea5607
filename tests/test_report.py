"""The progress bar and the summary: what an operator reads while a run works and when it ends."""

import psycopg

from relinker import checkpoint, report
from relinker.checkpoint import Counters
from relinker.report import ProgressBar, Summary, human_bytes
from test_checkpoint import new_run


def test_content_work_shows_bytes_against_the_planned_total(capsys):
    bar = ProgressBar(4, 1, 10, enabled=True, bytes_done_before=100, in_bytes=True, bytes_total=1000)
    bar.update(paths_done=5, ranges_done=1, bytes_done=400, finished_work=(5, 400))
    assert (bar._bar.n, bar._bar.total) == (500, 1000)  # done before this session, and now
    bar.close()
    shown = capsys.readouterr().err
    assert "500/1.00k" in shown.replace("B", "") and "15 paths" in shown


def test_without_a_planned_total_the_bar_extrapolates_from_finished_ranges(capsys):
    bar = ProgressBar(10, 0, 0, enabled=True, in_bytes=True)
    bar.update(paths_done=3, ranges_done=2, bytes_done=200, finished_work=(3, 200))
    assert bar._bar.total == 1000
    paths = ProgressBar(10, 0, 0, enabled=True)
    paths.update(paths_done=30, ranges_done=3, bytes_done=0, finished_work=(30, 0))
    assert (paths._bar.n, paths._bar.total) == (30, 100)
    bar.close()
    paths.close()


def test_the_extrapolated_total_counts_finished_ranges_only_not_those_in_flight(capsys):
    """Two of four 1 GB ranges finished, two halfway: the total stays 4 GB, whatever the halfway ones add."""
    bar = ProgressBar(4, 0, 0, enabled=True, in_bytes=True)
    bar.update(paths_done=4, ranges_done=2, bytes_done=3_000_000_000, finished_work=(2, 2_000_000_000))
    assert (bar._bar.n, bar._bar.total) == (3_000_000_000, 4_000_000_000)
    bar.update(paths_done=4, ranges_done=2, bytes_done=3_900_000_000, finished_work=(2, 2_000_000_000))
    assert bar._bar.total == 4_000_000_000
    bar.close()


def test_a_bar_counts_what_other_coordinators_of_the_run_finished(capsys, monkeypatch):
    """Two hosts on one run: each bar shows the whole run, not its own half (with an ETA twice too long)."""
    monkeypatch.setattr(report, "RUN_LOOK_INTERVAL", 0.0)
    figures = [(4, 40, 0)]  # the run's finished ranges: two of them this coordinator's

    def run_so_far():
        if not figures:
            raise psycopg.OperationalError("the database is gone")
        return figures.pop()

    bar = ProgressBar(10, 0, 0, enabled=True, run_so_far=run_so_far)
    bar.update(paths_done=25, ranges_done=2, bytes_done=0, finished_work=(20, 0))
    assert (bar._bar.n, bar._bar.total) == (25 + 20, 100)  # its own 25, the other host's 20 of 2 ranges
    bar.update(paths_done=35, ranges_done=3, bytes_done=0, finished_work=(30, 0))  # the database is gone
    assert (bar._bar.n, bar._bar.total) == (35 + 20, 100)  # what was last read stands
    figures.append((10, 95, 0))  # the run is complete: the other host did the rest meanwhile
    bar.close()  # one look before the bar ends
    assert (bar._bar.n, bar._bar.total) == (35 + 65, 100)
    hidden = ProgressBar(10, 0, 0, enabled=False, run_so_far=run_so_far)
    assert hidden._run_so_far is None  # --no-progress: no session for a bar nobody sees


def test_a_verify_summary_says_what_passed_and_how_fast_content_was_read():
    summary = Summary(mode="verify", run_id=3, status="done", elapsed_seconds=2.0,
                      counters=Counters(blobs=10, blobs_failed=2, links_present=30, bytes_read=4_000_000))
    summary.links_this_session, summary.bytes_this_session = 30, 4_000_000
    text = summary.as_text()
    assert "10 checked, 8 passed, 2 failed" in text and "4.0 MB (2.0 MB/s)" in text
    data = summary.as_json()
    assert '"checked": 10' in data and '"passed": 8' in data and '"mb_per_second": 2.0' in data


def test_human_bytes():
    assert [human_bytes(n) for n in (0, 999, 1000, 3_800_000_000, None)] == [
        "0 bytes", "999 bytes", "1.0 kB", "3.8 GB", "0 bytes"]


def test_a_dry_run_is_complete_only_if_every_range_was_reported_done():
    """A dry run keeps no record: a range whose worker died (or that failed) leaves it incomplete, exit 1."""
    def dry(done, total, interrupted=False):
        return Summary(mode="relink", dry_run=True, ranges_total=total, ranges_done=done, interrupted=interrupted)

    assert dry(3, 3).complete
    assert not dry(2, 3).complete and "not complete" in dry(2, 3).as_text()
    assert not dry(0, 3, interrupted=True).complete


def test_a_run_other_hosts_worked_too_gives_its_figures_and_this_sessions_rates():
    summary = Summary(mode="copy", run_id=3, status="done", elapsed_seconds=4.0,
                      counters=Counters(blobs=20, links_created=24_000, bytes_read=192_000_000), bytes_planned=192_000_000)
    summary.links_this_session, summary.bytes_this_session = 6_000, 40_000_000
    text = summary.as_text()
    assert "192.0 MB of 192.0 MB (this session: 10.0 MB/s)" in text
    assert "4.0 s (this session: 1,500 links/s)" in text


def test_a_copy_dry_run_says_what_is_planned_not_what_a_copy_would_write():
    """A dry run reads no content: it cannot know which contents and links are there already."""
    counters = Counters(blobs=4, links_created=6, bytes_read=2_500_000, files_copied=4, bytes_copied=2_500_000)
    text = Summary(mode="copy", dry_run=True, counters=counters, ranges_total=1, ranges_done=1,
                   elapsed_seconds=0.5).as_text()
    assert "inodes to store  4" in text and "paths to link    6" in text and "content to read  2.5 MB" in text
    assert "would be written" not in text and "MB/s" not in text and "would be created" not in text


def test_status_tells_ranges_at_work_from_those_whose_worker_is_gone_or_stuck(world):
    """A range is at work while a session holds its lock and heartbeats within its lease: kill -9 frees
    the lock at once, a stuck worker stops heartbeating. With none at work there is no ETA."""
    run_id = new_run(world, 3, planned_ago="10 minutes")
    world.conn.execute("UPDATE relinker_range SET status = 'running', worker = 'stuck:1', attempts = 1, "
                       "lease_seconds = 60, claimed_at = now() - interval '10 minutes', "
                       "heartbeat_at = now() - interval '137 seconds' WHERE run_id = %s", (run_id,))
    world.conn.execute("UPDATE relinker_range SET heartbeat_at = now() - interval '5 seconds', worker = 'killed:1' "
                       "WHERE run_id = %s AND range_no = 1", (run_id,))
    world.conn.execute("UPDATE relinker_range SET heartbeat_at = now() - interval '5 seconds', worker = 'alive:1' "
                       "WHERE run_id = %s AND range_no = 2", (run_id,))
    world.conn.execute("UPDATE relinker_range SET status = 'done', finished_at = now() - interval '1 minute' "
                       "WHERE run_id = %s AND range_no = 2", (run_id,))
    with psycopg.connect(world.dsn, autocommit=True) as workers:
        workers.execute("SELECT pg_advisory_lock(%s, 0)", (run_id,))  # the stuck worker still holds its range
        summary = Summary.from_run(world.conn, run_id, open_ranges=True)
        assert [(r["stale"], r["worker_gone"]) for r in summary.open_ranges] == [(True, False), (True, True)]
        assert summary.ranges_at_work == 0 and summary.eta_seconds is None
        text = summary.as_text()
        assert "range 0 running by stuck:1 (attempts 1), last heartbeat 137 s ago: stale, its worker is stuck" in text
        assert "range 1 running by killed:1 (attempts 1), last heartbeat 5 s ago: its worker is gone" in text
        assert "none: no worker is at work (resume the run)" in text
        # a live worker: lock held, heartbeat fresh; its ETA stands
        world.conn.execute("UPDATE relinker_range SET heartbeat_at = now() WHERE run_id = %s AND range_no = 0",
                           (run_id,))
        summary = Summary.from_run(world.conn, run_id, open_ranges=True)
        assert summary.ranges_at_work == 1 and summary.eta_seconds is not None
        assert "no worker is at work" not in summary.as_text()
    # interrupted: every range given back, none running
    world.conn.execute("UPDATE relinker_range SET status = 'pending', worker = NULL WHERE run_id = %s "
                       "AND status = 'running'", (run_id,))
    summary = Summary.from_run(world.conn, run_id, open_ranges=True)
    assert summary.eta_seconds is None and "none: no worker is at work (resume the run)" in summary.as_text()


def test_a_worker_between_two_ranges_is_at_work(world):
    """Between a range's commit and its next claim no range is held: the run is still being worked, and
    status must not tell the user to resume it."""
    run_id = new_run(world, 3, planned_ago="1 minute")
    world.conn.execute("UPDATE relinker_range SET status = 'done', worker = 'alive:1', attempts = 1, "
                       "claimed_at = now() - interval '3 seconds', finished_at = now() - interval '1 second' "
                       "WHERE run_id = %s AND range_no = 0", (run_id,))
    summary = Summary.from_run(world.conn, run_id, open_ranges=True)
    assert summary.ranges_at_work == 0 and summary.at_work and summary.eta_seconds is not None
    assert "no worker is at work" not in summary.as_text()
    world.conn.execute("UPDATE relinker_range SET finished_at = now() - interval '1 minute' "
                       "WHERE run_id = %s AND range_no = 0", (run_id,))
    summary = Summary.from_run(world.conn, run_id, open_ranges=True)
    assert summary.at_work is False and summary.eta_seconds is None
    assert "none: no worker is at work (resume the run)" in summary.as_text()
    # a run done a moment ago has no worker at work either
    world.conn.execute("UPDATE relinker_range SET status = 'done', finished_at = now() WHERE run_id = %s", (run_id,))
    world.conn.execute("UPDATE relinker_run SET status = 'done', finished_at = now() WHERE run_id = %s", (run_id,))
    summary = Summary.from_run(world.conn, run_id, open_ranges=True)
    assert summary.at_work is False and summary.eta_seconds == 0 and summary.complete


def test_a_run_planned_a_moment_ago_is_at_work_before_its_first_claim(world):
    """Between planning and the first claim the workers are starting: status polled then told the user
    to resume a run that was about to be worked."""
    run_id = new_run(world, 3, planned_ago="1 second")
    summary = Summary.from_run(world.conn, run_id, open_ranges=True)
    assert summary.ranges_at_work == 0 and summary.at_work
    assert "no worker is at work" not in summary.as_text()
    world.conn.execute("UPDATE relinker_run SET started_at = now() - interval '10 seconds' WHERE run_id = %s",
                       (run_id,))
    summary = Summary.from_run(world.conn, run_id, open_ranges=True)
    assert summary.at_work is False and "none: no worker is at work (resume the run)" in summary.as_text()


def test_a_heartbeat_newer_than_the_statement_is_no_negative_age(world):
    """A worker's heartbeat committed after the reading statement's now() (status polled as it beats)."""
    run_id = new_run(world, 1)
    world.conn.execute("UPDATE relinker_range SET status = 'running', worker = 'alive:1', attempts = 1, "
                       "heartbeat_at = now() + interval '10 seconds' WHERE run_id = %s", (run_id,))
    summary = Summary.from_run(world.conn, run_id, open_ranges=True)
    assert summary.open_ranges[0]["heartbeat_age_seconds"] == 0
    assert "last heartbeat 0 s ago" in summary.as_text() and "-0 s" not in summary.as_text()


def test_a_range_without_a_heartbeat_has_no_heartbeat_age(world):
    """Never claimed, or given back: nobody's heartbeat, not one "just now" (greatest() passes over NULL)."""
    run_id = new_run(world, 2)
    world.conn.execute("UPDATE relinker_range SET attempts = 1, claimed_at = now() - interval '1 minute' "
                       "WHERE run_id = %s AND range_no = 0", (run_id,))  # given back: heartbeat_at NULL
    ages = world.conn.execute("SELECT heartbeat_age FROM relinker_open_ranges WHERE run_id = %s ORDER BY range_no",
                              (run_id,)).fetchall()
    assert ages == [(None,), (None,)]
    summary = Summary.from_run(world.conn, run_id, open_ranges=True)
    assert [r["heartbeat_age_seconds"] for r in summary.open_ranges] == [None, None]


def test_a_run_done_with_nothing_to_do_is_all_done(world):
    """A copy with nothing left to store plans no range, and is done: 100 %, not 0."""
    run_id = checkpoint.create_run(world.conn, "copy", world.by_hash_root, world.archive_root, {}, [])
    assert world.conn.execute("SELECT percent_done FROM relinker_run_progress WHERE run_id = %s",
                              (run_id,)).fetchone()[0] == 0
    world.conn.execute("UPDATE relinker_run SET status = 'done', finished_at = now() WHERE run_id = %s", (run_id,))
    assert world.conn.execute("SELECT percent_done FROM relinker_run_progress WHERE run_id = %s",
                              (run_id,)).fetchone()[0] == 100


def test_status_lists_running_ranges_first_and_says_how_many_it_leaves_out(world):
    run_id = new_run(world, 30)
    world.conn.execute("UPDATE relinker_range SET status = 'running', worker = 'stuck:1', attempts = 1, "
                       "heartbeat_at = now() - interval '1 hour' WHERE run_id = %s AND range_no = 27", (run_id,))
    summary = Summary.from_run(world.conn, run_id, open_ranges=True)
    assert summary.open_ranges[0]["range_no"] == 27 and len(summary.open_ranges) == 20
    text = summary.as_text()
    assert "range 27 running by stuck:1" in text
    assert text.endswith(f"... and 10 more open ranges: SELECT * FROM relinker_open_ranges WHERE run_id = {run_id}")


def test_status_text_breaks_problems_down_by_kind_and_names_failed_ranges():
    from relinker.checkpoint import Counters
    from relinker.report import Summary

    text = Summary(mode="relink", run_id=1, status="open", counters=Counters(problems=3), ranges_total=4,
                   ranges_done=2, ranges_failed=1, ranges_running=1,
                   problems_by_kind={"missing-by-hash": 2, "unsafe-path": 1}).as_text()
    assert "problems" in text and "3 (missing-by-hash 2, unsafe-path 1)" in text
    assert "2 of 4 done, 1 failed, 1 running" in text


def rows_read(plan: dict) -> int:
    """Rows the scans of a plan (EXPLAIN ANALYZE, JSON) read: those they gave and those they filtered out."""
    own = plan.get("Actual Rows", 0) + plan.get("Rows Removed by Filter", 0) if "Scan" in plan["Node Type"] else 0
    return own + sum(rows_read(child) for child in plan.get("Plans", ()))


def test_a_runs_problem_samples_read_a_few_of_its_problems_not_all_nor_others(world):
    """Every night's run records millions of problems (the empty content's links past the limit): taken
    in problem_id order, status's samples read every problem of the run, or of every older run."""
    older, newer = new_run(world, 1), new_run(world, 1)
    for run_id in (older, newer):
        world.conn.execute("INSERT INTO relinker_problem (run_id, range_no, kind) "
                           "SELECT %s, n %% 100, 'too-many-links' FROM generate_series(1, 30000) AS n", (run_id,))
    world.conn.execute("ANALYZE relinker_problem")
    ((plan,),) = world.conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + report.SQL_PROBLEM_SAMPLES,
                                    (newer, report.SAMPLE_LIMIT)).fetchone()
    assert rows_read(plan["Plan"]) < 1000, plan
    samples = Summary.from_run(world.conn, newer).problem_samples
    assert len(samples) == report.SAMPLE_LIMIT and {p.kind for p in samples} == {"too-many-links"}


def test_counts_rate_is_this_sessions_when_the_run_looked_at_more_before():
    """A count resumed where every link was lost: no link either time, and its paths/s is this session's."""
    resumed = Summary(mode="count", run_id=2, status="done", elapsed_seconds=2.0, ranges_total=2, ranges_done=2,
                      counters=Counters(links_missing=1000))
    resumed.paths_this_session = 400
    assert "(this session: 200 paths/s)" in resumed.as_text()
    whole = Summary(mode="count", run_id=2, status="done", elapsed_seconds=2.0, ranges_total=2, ranges_done=2,
                    counters=Counters(links_missing=1000))
    whole.paths_this_session = 1000
    assert "(500 paths/s)" in whole.as_text()


def test_count_looks_at_its_linked_and_missing_paths_and_its_problems_add_none():
    """count's problems are a blob's (count-mismatch) or a missing path's reason (too-many-links, also
    counted missing): counted as paths they would count a path at the link limit twice."""
    at_the_limit = Counters(links_present=65000, links_missing=10, problems=10 + 1)
    assert at_the_limit.looked_at(missing_apart=True) == 65010
    assert at_the_limit.looked_at(missing_apart=False) == 65011  # relink, copy, verify: linked, or a problem
