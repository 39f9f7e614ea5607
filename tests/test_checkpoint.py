"""The claim protocol, one session at a time: what a worker gets when it asks for a range."""

import logging
import time

import psycopg
import pytest

from relinker import checkpoint, db


def new_run(world, n_ranges, planned_ago=None):
    """A relink run of ``n_ranges`` pending ranges, planned now or ``planned_ago`` (an interval)."""
    run_id = checkpoint.create_run(world.conn, "relink", world.by_hash_root, world.archive_root, {},
                                   checkpoint.split_blob_space(n_ranges))
    if planned_ago is not None:
        world.conn.execute("UPDATE relinker_run SET started_at = now() - %s::interval WHERE run_id = %s",
                           (planned_ago, run_id))
    return run_id


def store_for(world, run_id, name="worker:1"):
    since = world.conn.execute("SELECT now()").fetchone()[0]
    return checkpoint.CheckpointStore(world.dsn, run_id, worker=name, lease=60, retry_timeout=5, since=since)


def test_a_claim_goes_past_a_range_whose_lock_another_session_holds(world):
    """A range locked by a session that cannot be ended, or not yet unlocked after a give-back, stalls no one."""
    run_id = new_run(world, 3)
    store = store_for(world, run_id)
    with psycopg.connect(world.dsn, autocommit=True) as holder:
        holder.execute(checkpoint.SQL_TRY_LOCK, (run_id, 0))
        try:
            first = store.claim()
            assert first.range_no == 1
            store.finish(first, checkpoint.Counters(), [], lambda conn: None)
            assert store.claim().range_no == 2
        finally:
            store.close()
        states = dict(world.conn.execute(
            "SELECT range_no, status FROM relinker_range WHERE run_id = %s", (run_id,)).fetchall())
        assert states == {0: "pending", 1: "done", 2: "running"}


def test_a_claim_with_every_open_range_locked_elsewhere_gets_nothing_yet(world):
    run_id = new_run(world, 2)
    store = store_for(world, run_id)
    with psycopg.connect(world.dsn, autocommit=True) as holder:
        for range_no in (0, 1):
            holder.execute(checkpoint.SQL_TRY_LOCK, (run_id, range_no))
        try:
            assert store.claim() is None
            assert store.open_ranges() == 2
        finally:
            store.close()
    store = store_for(world, run_id)  # the holder is gone: its locks with it
    try:
        assert store.claim().range_no == 0
    finally:
        store.close()


def make_stale(world, run_id, range_no):
    world.conn.execute("UPDATE relinker_range SET status = 'running', worker = 'stalled:1', "
                       "heartbeat_at = now() - interval '1 hour' WHERE run_id = %s AND range_no = %s",
                       (run_id, range_no))


def alive(world, pid) -> bool:
    return world.conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()[0] == 1


def test_a_stale_range_is_freed_by_ending_relinkers_session_never_another_programs(world):
    """Two-int advisory locks are shared by every program of the database: only relinker's holders are ended."""
    run_id = new_run(world, 2)
    make_stale(world, run_id, 0)
    make_stale(world, run_id, 1)
    store = store_for(world, run_id)
    with psycopg.connect(world.dsn, autocommit=True, application_name="another-program") as foreign, \
            db.connect(world.dsn, autocommit=True) as stalled:
        foreign.execute(checkpoint.SQL_TRY_LOCK, (run_id, 0))
        stalled.execute(checkpoint.SQL_TRY_LOCK, (run_id, 1))
        try:
            assert store.claim() is None  # both locked; the stalled relinker session is ended
            wait_until(lambda: not alive(world, stalled.info.backend_pid))
            assert alive(world, foreign.info.backend_pid)
            assert store.claim().range_no == 1
        finally:
            store.close()
        assert alive(world, foreign.info.backend_pid)


@pytest.mark.parametrize("stopped_in", ["the range's commit", "a heartbeat", "a claim",
                                        "a row another session locked too"])
def test_a_range_whose_row_a_stalled_session_holds_is_taken_over(world, stopped_in):
    """A worker stopped (SIGSTOP, a paused VM) inside a transaction holding a range's row: the claim's
    SKIP LOCKED passes the row by, and the run waited for as long as the stop lasted. Its session, idle
    in that transaction for longer than the claimer's lease, is ended."""
    run_id = new_run(world, 1)
    since = world.conn.execute("SELECT now()").fetchone()[0]
    owner = checkpoint.CheckpointStore(world.dsn, run_id, worker="host-a:1", lease=2, retry_timeout=5, since=since)
    patient = checkpoint.CheckpointStore(world.dsn, run_id, worker="host-b:1", lease=2, retry_timeout=5,
                                         since=since)
    try:
        stalled = owner._connection()
        if stopped_in == "a claim":  # between its candidate's row lock and its commit
            stalled.execute("BEGIN")
            stalled.execute("SELECT 1 FROM relinker_range WHERE run_id = %s FOR UPDATE", (run_id,))
        else:
            owner.claim()
            world.conn.execute("UPDATE relinker_range SET heartbeat_at = now() - interval '10 seconds' "
                               "WHERE run_id = %s", (run_id,))
            # the row's xmax a multixact: another transaction holds a lock the commit's update allows
            other = psycopg.connect(world.dsn, application_name="monitoring")
            if stopped_in == "a row another session locked too":
                other.execute("SELECT 1 FROM relinker_range WHERE run_id = %s FOR KEY SHARE", (run_id,))
            stalled.execute("BEGIN")
            if stopped_in == "a heartbeat":
                stalled.execute("SELECT 1 FROM relinker_range WHERE run_id = %s FOR UPDATE", (run_id,))
            else:
                stalled.execute("UPDATE relinker_range SET status = 'done' WHERE run_id = %s", (run_id,))
            other.close()
        deadline = time.monotonic() + 15
        taken = patient.claim()  # a claim ends the stalled session once it has idled a lease; a later one takes it
        while taken is None and time.monotonic() < deadline:
            time.sleep(0.1)
            taken = patient.claim()
        assert taken is not None and taken.range_no == 0
        assert not alive(world, stalled.info.backend_pid)
    finally:
        owner.close()
        patient.close()


def test_a_stale_range_locked_by_another_program_is_left_alone(world):
    run_id = new_run(world, 1)
    make_stale(world, run_id, 0)
    store = store_for(world, run_id)
    with psycopg.connect(world.dsn, application_name="another-program") as foreign:
        foreign.execute("SELECT 1 FROM relinker_range WHERE run_id = %s FOR UPDATE", (run_id,))
        try:
            assert store.claim() is None
            time.sleep(0.2)
            assert alive(world, foreign.info.backend_pid)
        finally:
            store.close()


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_two_claims_at_the_same_moment_both_get_a_range(world):
    """A claim holds one candidate row at a time: a claim racing it takes the next range, not nothing."""
    run_id = new_run(world, 3)
    store = store_for(world, run_id)
    since = world.conn.execute("SELECT now()").fetchone()[0]
    with psycopg.connect(world.dsn) as racing:  # mid-claim: its transaction holds its candidate's row
        row = racing.execute(checkpoint.SQL_CLAIM_CANDIDATE, dict(run_id=run_id, lease=60, since=since,
                                                                  passed_over=[])).fetchone()
        assert row[0] == 0
        try:
            assert store.claim().range_no == 1
        finally:
            store.close()


def test_a_range_is_stale_by_its_owners_lease_not_the_claimers(world):
    """A second host started with --lease 1 must not take a range from a healthy worker leasing 60 s."""
    run_id = new_run(world, 1)
    since = world.conn.execute("SELECT now()").fetchone()[0]
    owner = store_for(world, run_id, "host-a:1")  # lease 60
    hasty = checkpoint.CheckpointStore(world.dsn, run_id, worker="host-b:1", lease=1, retry_timeout=5, since=since)
    try:
        mine = owner.claim()
        world.conn.execute("UPDATE relinker_range SET heartbeat_at = now() - interval '5 seconds' "
                           "WHERE run_id = %s", (run_id,))  # the owner's last beat, well within its 60 s
        owner_session = owner._connection().info.backend_pid
        assert hasty.claim() is None
        time.sleep(0.2)
        assert alive(world, owner_session)  # not ended as a stalled worker's
        assert hasty.claim() is None
        owner.finish(mine, checkpoint.Counters(), [], lambda conn: None)  # still the owner's to finish
        assert world.conn.execute("SELECT status, worker FROM relinker_range WHERE run_id = %s",
                                  (run_id,)).fetchone() == ("done", "host-a:1")
    finally:
        owner.close()
        hasty.close()


def test_a_stalled_range_is_taken_over_by_its_owners_lease_and_the_log_says_which(world, caplog):
    """An owner leasing 3 s that stops beating loses its range to a claimer leasing 60 s; the log names 3 s."""
    run_id = new_run(world, 1)
    since = world.conn.execute("SELECT now()").fetchone()[0]
    owner = checkpoint.CheckpointStore(world.dsn, run_id, worker="host-a:1", lease=3, retry_timeout=5, since=since)
    patient = store_for(world, run_id, "host-b:1")
    try:
        mine = owner.claim()
        world.conn.execute("UPDATE relinker_range SET heartbeat_at = now() - interval '10 seconds' "
                           "WHERE run_id = %s", (run_id,))
        with caplog.at_level(logging.WARNING, logger="relinker"):
            deadline = time.monotonic() + 10
            taken = patient.claim()  # the first claim ends the stalled session; a later one takes the range
            while taken is None and time.monotonic() < deadline:
                time.sleep(0.05)
                taken = patient.claim()
        assert taken is not None and taken.range_no == mine.range_no
        assert "heartbeat older than its 3 s lease, terminating stalled session" in caplog.text
        assert "(its heartbeat is older than its 3 s lease)" in caplog.text and "its 60" not in caplog.text
    finally:
        owner.close()
        patient.close()


def test_a_serialization_failure_keeps_the_session_and_the_ranges_lock(world):
    """Retried on the same session: closing it would free the range for any claim before the retry."""
    run_id = new_run(world, 1)
    store = store_for(world, run_id)
    try:
        store.claim()
        session = store._connection().info.backend_pid
        tries = []

        def flaky(conn):
            tries.append(conn.info.backend_pid)
            if len(tries) == 1:
                conn.execute("DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END $$")
            return "done"

        assert store._call(flaky) == "done" and tries == [session, session]
        assert world.conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = %s",
                                  (session,)).fetchone() == (1,)
    finally:
        store.close()


def test_giving_back_or_failing_a_range_taken_over_meanwhile_leaves_it_to_its_new_owner(world):
    """The worker's session died and another took the range: give-back and fail touch nothing, raise nothing."""
    run_id = new_run(world, 1)
    for end in ("give_back", "fail"):
        store = store_for(world, run_id)
        try:
            mine = store.claim()
            world.conn.execute("SELECT pg_terminate_backend(%s)", (store._connection().info.backend_pid,))
            world.conn.execute("UPDATE relinker_range SET worker = 'other:1', attempts = attempts + 1 "
                               "WHERE run_id = %s", (run_id,))
            if end == "give_back":
                store.give_back(mine)
            else:
                store.fail(mine, "boom")
            assert world.conn.execute("SELECT status, worker, last_error FROM relinker_range WHERE run_id = %s",
                                      (run_id,)).fetchone() == ("running", "other:1", None)
        finally:
            store.close()
        world.conn.execute("UPDATE relinker_range SET status = 'pending', worker = NULL WHERE run_id = %s",
                           (run_id,))


def test_a_heartbeat_or_finish_retried_after_a_lost_reply_writes_nothing_twice(world):
    """The commit went through, its reply did not: the retry finds its own work there and adds nothing."""
    run_id = new_run(world, 1)
    store = store_for(world, run_id)
    try:
        mine = store.claim()
        counters = checkpoint.Counters(problems=2)
        problems = [checkpoint.Problem("link-missing", "no archive entry", None, b"/a"),
                    checkpoint.Problem("link-missing", "no archive entry", None, b"/b")]
        store.heartbeat(mine, counters, list(problems))
        store.heartbeat(mine, counters, list(problems))  # the same call again, as its retry makes it
        counters.problems = 3
        last = [checkpoint.Problem("wrong-inode", "archive entry is not the by-hash file", None, b"/c")]
        finalized = []
        store.finish(mine, counters, list(last), lambda conn: finalized.append(1))
        # Its retry, as after a reply lost with the connection: a new session, the range's lock taken back.
        store._held = mine
        world.conn.execute("SELECT pg_terminate_backend(%s)", (store._connection().info.backend_pid,))
        store.finish(mine, counters, list(last), lambda conn: finalized.append(1))  # no LostRange
        assert finalized == [1]
        assert world.conn.execute("SELECT path FROM relinker_problem WHERE run_id = %s ORDER BY path",
                                  (run_id,)).fetchall() == [(b"/a",), (b"/b",), (b"/c",)]
        assert world.conn.execute("SELECT status, problems FROM relinker_range WHERE run_id = %s",
                                  (run_id,)).fetchone() == ("done", 3)
    finally:
        store.close()


def test_the_keep_alive_connection_lasts_one_range(catalogue_url):
    """Opened for one long wait in a finishing transaction: not a third connection per worker for good."""
    from relinker import db

    def relinker_sessions(conn):
        # This test's database alone: an earlier test's sessions may still be ending on the server.
        return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
                            "AND pid <> pg_backend_pid() AND datname = current_database()",
                            (db.APPLICATION_NAME,)).fetchone()[0]

    with psycopg.connect(catalogue_url, autocommit=True) as conn:
        run_id = checkpoint.create_run(conn, "copy", b"/a", b"/b", {}, checkpoint.split_blob_space(3))
        store = checkpoint.CheckpointStore(catalogue_url, run_id, worker="w:1", lease=60, retry_timeout=5,
                                           since=None)
        try:
            r = store.claim()
            store.keep_alive(r)
            assert relinker_sessions(conn) == 2
            store.finish(r, checkpoint.Counters(), [], lambda c: None)
            store.claim()
            assert relinker_sessions(conn) == 1
        finally:
            store.close()


def test_the_commit_of_a_runs_last_range_marks_the_run_done(world):
    """A run is over with its last range, not when its coordinator gets there: one waiting for a stopped
    worker (whose range another took over) leaves no complete run 'open' meanwhile."""
    run_id = new_run(world, 2)
    store = store_for(world, run_id)

    def status():
        return world.conn.execute("SELECT status, finished_at IS NOT NULL FROM relinker_run WHERE run_id = %s",
                                  (run_id,)).fetchone()

    try:
        store.finish(store.claim(), checkpoint.Counters(), [], lambda conn: None)
        assert status() == ("open", False)
        store.finish(store.claim(), checkpoint.Counters(), [], lambda conn: None)
        assert status() == ("done", True)
    finally:
        store.close()


def test_a_heartbeat_carrying_problems_is_durable_when_it_returns(world, monkeypatch):
    """The control session commits without waiting for the WAL flush, but the rows of problems a
    heartbeat writes leave the worker's buffer for good: a crash must not lose that commit."""
    run_id = new_run(world, 1)
    store = store_for(world, run_id)
    try:
        r = store.claim()
        settings = []
        real_write = store._write_problems

        def write_and_look(conn, r, problems):
            settings.append(conn.execute("SHOW synchronous_commit").fetchone()[0])
            real_write(conn, r, problems)

        monkeypatch.setattr(store, "_write_problems", write_and_look)
        store.heartbeat(r, checkpoint.Counters(problems=1), [checkpoint.Problem("os-error", "lost?", path=b"/x")])
        assert settings == ["on"]
        assert store._connection().execute("SHOW synchronous_commit").fetchone()[0] == "off"  # other commits
        assert world.conn.execute("SELECT count(*) FROM relinker_problem WHERE run_id = %s",
                                  (run_id,)).fetchone() == (1,)
    finally:
        store.close()


def test_a_worker_that_reconnects_holds_its_ranges_lock_again(world):
    """A new session holds no advisory locks: the worker takes its range's back, or another would claim it."""
    from relinker import checkpoint

    run_id = checkpoint.create_run(world.conn, "relink", world.by_hash_root, world.archive_root, {},
                                   checkpoint.split_blob_space(2))
    since = world.conn.execute("SELECT now()").fetchone()[0]
    mine_store, other_store = (checkpoint.CheckpointStore(world.dsn, run_id, worker=name, lease=60, retry_timeout=5,
                                                          since=since) for name in ("w:1", "w:2"))
    try:
        mine = mine_store.claim()
        world.conn.execute("SELECT pg_terminate_backend(%s)", (mine_store._connection().info.backend_pid,))
        mine_store.heartbeat(mine, checkpoint.Counters(), [])  # a new session: the range's lock taken back
        theirs = other_store.claim()
        assert theirs is not None and theirs.range_no != mine.range_no
    finally:
        mine_store.close()
        other_store.close()


def test_a_lock_timeout_never_leaves_a_worker_without_its_mode_lock(world):
    """A role's lock_timeout ending the wait for the modes gate must not leave the session in use
    without its mode's lock (the guard off, unseen): the gate is waited for, and a failed setup is a new
    session next time."""
    import threading

    from psycopg.conninfo import make_conninfo

    run_id = new_run(world, 2)
    gate = psycopg.connect(world.dsn)
    gate.execute("SELECT pg_advisory_xact_lock(%s)", (checkpoint._mode_key(checkpoint._MODES_GATE),))
    timer = threading.Timer(1.0, gate.commit)  # another worker's hold_mode, slow under contention
    timer.start()
    store = checkpoint.CheckpointStore(make_conninfo(world.dsn, options="-c lock_timeout=200"), run_id,
                                       worker="w:1", lease=60, retry_timeout=30,
                                       since=world.conn.execute("SELECT now()").fetchone()[0],
                                       mode="relink", excludes=frozenset({"count"}))
    try:
        assert store.claim() is not None
        assert set(checkpoint.modes_at_work(world.conn)) == {"relink"}
    finally:
        timer.join()
        store.close()
        gate.close()


def test_the_modes_gate_is_one_statement_of_the_server(world, tmp_path):
    """A worker stopped (Ctrl-Z, SIGSTOP, a paused VM) between two statements of its own inside the
    modes gate held it, and every worker of every run waited for as long as the stop lasted: taking the
    gate, checking for clashes and taking the mode's lock is one round trip, the gate released by the
    server before the answer comes back."""
    trace = tmp_path / "protocol"
    with db.connect(world.dsn, autocommit=True) as conn, open(trace, "w") as out:
        conn.pgconn.trace(out.fileno())
        checkpoint.hold_mode(conn, "relink", frozenset({"count", "scan"}))
        conn.pgconn.untrace()
        assert set(checkpoint.modes_at_work(world.conn)) == {"relink"}
    # libpq's trace: time, F (sent) or B (received), length, message (a statement's text may span lines)
    messages = [line.split("\t") for line in trace.read_text().splitlines()]
    sent = [fields[3] for fields in messages if len(fields) > 3 and fields[1] == "F"]
    assert sent.count("Sync") + sent.count("Query") == 1, sent


def test_a_worker_told_to_stop_while_another_holds_the_modes_gate_stops(world):
    """Another program holding the gate is waited for; a worker told to stop meanwhile stops."""
    class Stop(Exception):
        pass

    def told_to_stop():
        raise Stop()

    with psycopg.connect(world.dsn, application_name="another-program") as foreign:
        foreign.execute("SELECT pg_advisory_xact_lock(%s)", (checkpoint._mode_key(checkpoint._MODES_GATE),))
        with db.connect(world.dsn, autocommit=True) as worker:
            started = time.monotonic()
            with pytest.raises(Stop):
                checkpoint.hold_mode(worker, "relink", frozenset(), while_waiting=told_to_stop)
            assert time.monotonic() - started < 5
            assert checkpoint.modes_at_work(world.conn) == {}
        assert alive(world, foreign.info.backend_pid)


def test_a_coordinator_waiting_for_anothers_planning_names_it(world, caplog):
    """A coordinator stopped while it plans holds the planning gate until its session ends: whoever waits
    for it says which session it waits for."""
    import threading

    with psycopg.connect(world.dsn) as planning:
        holder = planning.info.backend_pid
        planning.execute("SELECT pg_advisory_xact_lock(%s)", (checkpoint._mode_key(checkpoint._PLANNING_GATE),))
        done = threading.Timer(1.5, planning.commit)
        done.start()
        try:
            with db.connect(world.dsn) as waiting, caplog.at_level(logging.WARNING, logger="relinker.checkpoint"):
                checkpoint.gate_planning(waiting, patience=0.3)
        finally:
            done.join()
    told = [r.getMessage() for r in caplog.records if "waiting for another coordinator" in r.getMessage()]
    assert len(told) == 1 and f"database session {holder}" in told[0]


def test_another_programs_session_holding_a_gate_is_waited_for(world):
    """Only relinker's own sessions are ended: another program's lock on the same key is its own."""
    import threading

    run_id = new_run(world, 1)
    with psycopg.connect(world.dsn, application_name="another-program") as foreign:
        foreign.execute("SELECT pg_advisory_xact_lock(%s)", (checkpoint._mode_key(checkpoint._MODES_GATE),))
        timer = threading.Timer(2.5, foreign.commit)
        timer.start()
        store = checkpoint.CheckpointStore(world.dsn, run_id, worker="w:1", lease=1, retry_timeout=5,
                                           since=world.conn.execute("SELECT now()").fetchone()[0],
                                           mode="relink", excludes=frozenset({"count"}))
        try:
            assert store.claim() is not None
            assert alive(world, foreign.info.backend_pid)
        finally:
            timer.join()
            store.close()


def test_a_worker_finding_a_clash_on_reconnecting_gives_its_range_back(world):
    """Its session lost mid-range, a relink worker reconnects to find a count run at work: it may not
    go on, and its range goes back to pending for the resume (not left running)."""
    run_id = new_run(world, 1)
    store = checkpoint.CheckpointStore(world.dsn, run_id, worker="w:1", lease=60, retry_timeout=5,
                                       since=world.conn.execute("SELECT now()").fetchone()[0],
                                       mode="relink", excludes=frozenset({"count"}))
    try:
        mine = store.claim()
        world.conn.execute("SELECT pg_terminate_backend(%s)", (store._connection().info.backend_pid,))
        with psycopg.connect(world.dsn, autocommit=True) as count_worker:
            checkpoint.hold_mode(count_worker, "count", frozenset())
            try:
                store.heartbeat(mine, checkpoint.Counters(), [])
            except checkpoint.ModeClash:
                store.abandon(mine)
            else:
                raise AssertionError("a relink worker went on beside a count run")
            assert world.conn.execute("SELECT status, worker FROM relinker_range WHERE run_id = %s",
                                      (run_id,)).fetchone() == ("pending", None)
            assert set(checkpoint.modes_at_work(world.conn)) == {"count"}
    finally:
        store.close()


def _rows_handled(plan: dict) -> float:
    """Rows every node of an EXPLAIN (ANALYZE, FORMAT JSON) plan produced, over all its loops."""
    return plan["Actual Rows"] * plan["Actual Loops"] + sum(_rows_handled(child) for child in plan.get("Plans", []))


def test_a_runs_progress_costs_in_proportion_to_its_ranges_before_the_statistics_know_it(world):
    """A run newer than relinker_range's statistics looks like one range to the planner: the progress
    view (status, every run's summary) must still read each range a bounded number of times, not once
    per range for each range (10,000 ranges took 25 s)."""
    ranges = 3000
    old = checkpoint.create_run(world.conn, "relink", b"/s", b"/a", {}, [checkpoint.Bounds()] * 50)
    world.conn.execute("UPDATE relinker_range SET status = 'done' WHERE run_id = %s", (old,))
    world.conn.execute("ANALYZE relinker_range")
    run_id = checkpoint.create_run(world.conn, "relink", b"/s", b"/a", {}, [checkpoint.Bounds()] * ranges)
    world.conn.execute("UPDATE relinker_range SET status = 'done', claimed_at = now() - interval '1 minute', "
                       "finished_at = now() WHERE run_id = %s AND range_no < 500", (run_id,))
    world.conn.execute("UPDATE relinker_range SET status = 'running', claimed_at = now(), heartbeat_at = now() "
                       "WHERE run_id = %s AND range_no BETWEEN 500 AND 501", (run_id,))

    (plan,), = world.conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) SELECT * FROM relinker_run_progress "
                                  "WHERE run_id = %s", (run_id,)).fetchone()
    assert _rows_handled(plan["Plan"]) < 20 * ranges
    row = world.conn.execute("SELECT ranges_total, ranges_done, ranges_running, percent_done FROM "
                             "relinker_run_progress WHERE run_id = %s", (run_id,)).fetchone()
    assert row[:3] == (ranges, 500, 2) and float(row[3]) == round(100 * 500 / ranges, 1)
