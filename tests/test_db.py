"""Which database errors a worker retries: the ones that go away, never the ones that come back."""

import os
import time

import psycopg
import pytest

from relinker import db


def raised_by_the_server(conn, sqlstate):
    """The error a real server raises with this SQLSTATE."""
    with pytest.raises(psycopg.Error) as raised:
        conn.execute(f"DO $$ BEGIN RAISE EXCEPTION 'test' USING ERRCODE = '{sqlstate}'; END $$")
    assert raised.value.sqlstate == sqlstate
    return raised.value


@pytest.mark.parametrize("sqlstate, transient", [
    ("40001", True),   # serialization failure
    ("40P01", True),   # deadlock
    ("57P01", True),   # admin shutdown (a restart)
    ("57P03", True),   # the server is starting
    ("53300", True),   # too many connections
    ("08006", True),   # connection failure
    ("25P03", True),   # idle in transaction too long: the session was ended (psycopg: an InternalError)
    ("53200", False),  # out of memory, or of lock table space: the same on every try
    ("53100", False),  # disk full
    ("57014", False),  # statement_timeout: would repeat the same timeout
    ("42P01", False),  # undefined table: a bug, not weather
])
def test_what_is_retried(conn, sqlstate, transient):
    assert db.is_transient(raised_by_the_server(conn, sqlstate)) is transient


def test_a_connection_lost_for_real_is_retried(db_url):
    with psycopg.connect(db_url, autocommit=True) as victim, psycopg.connect(db_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (victim.info.backend_pid,))
        with pytest.raises(psycopg.OperationalError) as lost:
            victim.execute("SELECT 1")
        assert db.is_transient(lost.value)
        with pytest.raises(psycopg.Error) as closed:  # and the closed connection after it
            victim.execute("SELECT 1")
        assert db.is_transient(closed.value)


def test_the_retry_budget_starts_at_the_first_failure_not_at_the_work(db_url):
    """A connection lost after longer than --retry-timeout of work is retried all the same."""
    import time

    attempts = []
    with psycopg.connect(db_url, autocommit=True) as admin:
        for attempt in db.retrying(timeout=0.5):
            with attempt:
                with psycopg.connect(db_url, autocommit=True) as worker:
                    attempts.append(time.monotonic())
                    if len(attempts) == 1:
                        time.sleep(0.8)  # a range's work, longer than the budget
                        admin.execute("SELECT pg_terminate_backend(%s)", (worker.info.backend_pid,))
                    worker.execute("SELECT 1")
    assert len(attempts) == 2

    # An outage longer than the budget still ends it.
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError):
        for attempt in db.retrying(timeout=0.5):
            with attempt:
                raise psycopg.OperationalError("the server is gone")
    assert 0.5 <= time.monotonic() - started < 10


def test_an_outage_ends_with_the_first_call_the_database_answers(catalogue_url):
    """One outage clock per process: a claim that failed once and then succeeded leaves no clock running,
    or a deadlock an hour later would be given up at once."""
    import time

    from relinker import checkpoint

    with psycopg.connect(catalogue_url, autocommit=True) as conn:
        run_id = checkpoint.create_run(conn, "relink", b"/a", b"/b", {}, checkpoint.split_blob_space(2))
    store = checkpoint.CheckpointStore(catalogue_url, run_id, worker="w:1", lease=60, retry_timeout=0.5,
                                       since=None)
    calls = []

    def fails_once(conn):
        calls.append(1)
        if len(calls) == 1:
            raise psycopg.errors.SerializationFailure("could not serialize access")
        return conn.execute("SELECT 1").fetchone()[0]

    try:
        assert store._call(fails_once) == 1
        assert db._Outage.since is None
        time.sleep(0.6)  # longer than the budget, after the outage ended
        calls.clear()
        assert store._call(fails_once) == 1  # retried: a new outage, with a budget of its own
        assert len(calls) == 2
    finally:
        store.close()


def test_a_roles_statement_timeout_and_date_style_do_not_reach_a_run(world, capsys):
    """A database (or role) set up for interactive use: a statement_timeout far below the time a range's
    rows stream while they are linked, and a DateStyle the driver cannot read timestamps in."""
    import json

    from relinker.cli import main

    medium = world.medium("disk")
    blob = world.blob(b"content")
    # more rows than the socket's buffers hold: the range's query is open while they are linked
    world.inode(medium, [b"/dir%d/%s%d" % (i % 50, b"a-long-name-" * 8, i) for i in range(20000)], blob)
    name = world.conn.info.dbname
    world.conn.execute(f'ALTER DATABASE "{name}" SET statement_timeout = \'5ms\'')
    world.conn.execute(f'ALTER DATABASE "{name}" SET DateStyle = \'German\'')
    try:
        code = main(world.argv("relink", "--no-progress", "--json", "--workers", "1"))
        summary = json.loads(capsys.readouterr().out)
        assert (code, summary["links_created"], summary["ranges_failed"]) == (0, 20000, 0)
        assert main(world.argv("status")) == 0
    finally:
        world.conn.execute(f'ALTER DATABASE "{name}" RESET statement_timeout')
        world.conn.execute(f'ALTER DATABASE "{name}" RESET DateStyle')


def test_a_databases_old_string_escapes_leave_paths_byte_for_byte(world, capsys, tmp_path):
    """With standard_conforming_strings off (an old database's setting) a bytea sent by COPY in text
    form was stored as the text of its hex form: every path a scan wrote, every problem's path."""
    from relinker.cli import main

    tree = tmp_path / "tree"
    tree.mkdir()
    name = b"back\\slash caf\xe9"
    with open(os.fsencode(tree) + b"/" + name, "wb") as f:
        f.write(b"content")
    medium = world.medium("disk")
    world.inode(medium, [b"/d/x"], world.blob(b"linked"))
    os.makedirs(world.archive_path(b"/d/x"))  # a directory where the link belongs: a problem with its path
    database = world.conn.info.dbname
    world.conn.execute(f'ALTER DATABASE "{database}" SET standard_conforming_strings = off')
    try:
        assert main(world.argv("scan", "--medium", "tree", str(tree))) == 0
        assert main(world.argv("relink", "--no-progress", "--workers", "1")) == 1
    finally:
        world.conn.execute(f'ALTER DATABASE "{database}" RESET standard_conforming_strings')
    scanned = [bytes(p) for (p,) in world.conn.execute("SELECT path FROM path WHERE medium_hash <> %s", (medium,))]
    assert [p for p in scanned if p.endswith(b"/" + name)], scanned
    problems = [bytes(p) for (p,) in world.conn.execute("SELECT path FROM relinker_problem")]
    assert problems == [b"/d/x"], problems


@pytest.mark.parametrize("timeout, in_a_transaction", [("idle_session_timeout", False),
                                                        ("idle_in_transaction_session_timeout", True),
                                                        ("transaction_timeout", True)])
def test_a_databases_session_timeouts_end_no_session_of_relinkers(world, timeout, in_a_transaction):
    """A worker's control session speaks only at its heartbeats, every 10 s: ended as idle, it took the
    range's lock with it, and the other worker took over a range still worked, back and forth. A copy's
    transaction waits for its files' sync: ended, the range is redone, forever on a slow disk."""
    if timeout == "transaction_timeout" and world.conn.info.server_version < 170000:
        pytest.skip("transaction_timeout is PostgreSQL 17's")
    database = world.conn.info.dbname
    world.conn.execute(f'ALTER DATABASE "{database}" SET {timeout} = \'1s\'')
    try:
        with db.connect(world.dsn, autocommit=not in_a_transaction) as conn:
            conn.execute("SELECT 1")
            time.sleep(1.5)
            assert conn.execute("SELECT 2").fetchone() == (2,)
    finally:
        world.conn.execute(f'ALTER DATABASE "{database}" RESET {timeout}')


def test_an_outage_is_one_warning_a_minute_per_process_not_one_per_retry(caplog, monkeypatch):
    """Five minutes of a database down were a warning per retry per worker (256 lines with two)."""
    import logging

    monkeypatch.setattr(db._Outage, "warned", float("-inf"))
    caplog.set_level(logging.DEBUG, logger="relinker.db")
    with pytest.raises(psycopg.OperationalError):
        for attempt in db.retrying(timeout=1.0):
            with attempt:
                raise psycopg.OperationalError("the server is gone")
    retries = [r for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) > 2
    assert [r.levelno for r in retries] == [logging.WARNING] + [logging.DEBUG] * (len(retries) - 1)
    # A call the database answers ends the outage: the next one, within the minute, is told at its first retry.
    db.outage_ended()
    caplog.clear()
    with pytest.raises(psycopg.OperationalError):
        for attempt in db.retrying(timeout=0.3):
            with attempt:
                raise psycopg.OperationalError("the server restarts")
    levels = [r.levelno for r in caplog.records if "retrying" in r.getMessage()]
    assert levels[0] == logging.WARNING and set(levels[1:]) <= {logging.DEBUG}


def test_an_os_errors_path_is_shown_as_relinker_shows_paths():
    """A range's last_error, its log line and the summary show a path as every message does, never as
    Python's repr of bytes (b'...')."""
    assert db.first_line(OSError(28, "No space left on device", b"/store/.relinker-tmp/w/\xff7")) == \
        "[Errno 28] No space left on device: /store/.relinker-tmp/w/\\xff7"
    assert db.first_line(OSError(5, "Input/output error")) == "[Errno 5] Input/output error"
    assert db.first_line(OSError(2, "No such file or directory", b"/a", None, b"/b")) == \
        "[Errno 2] No such file or directory: /a -> /b"


def test_a_server_out_of_a_resource_says_which_setting_its_hint_names(conn):
    """"out of shared memory" alone reads like RAM: the server's hint names max_locks_per_transaction
    (raised here as the lock manager raises it, with the same SQLSTATE and hint)."""
    with pytest.raises(psycopg.Error) as raised:
        conn.execute("""DO $$ BEGIN RAISE EXCEPTION 'out of shared memory' USING ERRCODE = '53200',
                        HINT = 'You might need to increase "max_locks_per_transaction".'; END $$""")
    assert db.first_line(raised.value) == \
        'out of shared memory (You might need to increase "max_locks_per_transaction".)'
    with pytest.raises(psycopg.Error) as raised:  # another class's hint adds nothing to the line
        conn.execute("DO $$ BEGIN RAISE EXCEPTION 'no such thing' USING HINT = 'a hint'; END $$")
    assert db.first_line(raised.value) == "no such thing"
