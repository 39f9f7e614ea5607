"""SIGINT, SIGTERM and SIGHUP: a clean stop with exit 3, and a resume that ends correct."""

import json
import os
import shlex
import signal
import socket
import time

import pytest

from processes import finish, kill_group, range_states, start, wait_for

pytestmark = pytest.mark.reliability



def relink_argv(world, *args):
    return world.argv("relink", "--no-progress", "--json", "--workers", "2", "--ranges", "40", *args)


def resume_and_check(world):
    code, _out, err = finish(start(relink_argv(world)))
    assert code == 0, err
    world.assert_complete(1)


@pytest.mark.parametrize("how", ["SIGINT to the group", "SIGTERM to the coordinator", "SIGTERM to the group",
                                 "SIGHUP to the group"])  # the terminal or ssh session gone
def test_one_signal_stops_cleanly_and_gives_ranges_back(busy, how):
    job = start(relink_argv(busy))
    wait_for(lambda: range_states(busy.conn).get("done", 0) >= 3, what="some ranges done")
    if how == "SIGTERM to the coordinator":
        job.send_signal(signal.SIGTERM)
    else:
        kill_group(job, signal.Signals[how.split()[0]])
    code, out, err = finish(job, timeout=30)
    assert code == 3, err
    assert f"resume with: {busy.resume('relink', 1)}" in err
    summary = json.loads(out)  # its workers have ended: no ETA, however lately a range finished
    assert summary["at_work"] is False and summary["eta_seconds"] is None
    states = range_states(busy.conn)
    assert "running" not in states, states  # every unfinished range was given back
    assert states.get("done", 0) < 40
    resume_and_check(busy)


def test_a_run_started_under_nohup_goes_on_through_a_hangup(busy):
    job = start(relink_argv(busy), ignore_sighup=True)
    wait_for(lambda: range_states(busy.conn).get("done", 0) >= 3, what="some ranges done")
    kill_group(job, signal.SIGHUP)
    code, _out, err = finish(job, timeout=60)
    assert code == 0 and "SIGHUP" not in err, err
    busy.assert_complete(1)


def test_an_interrupted_run_says_so_in_its_log_file_and_its_resume_writes_on_there(busy, tmp_path):
    """An operator who watches the --log-file, not the terminal, reads how each run ended there; the
    printed resume command keeps the log (and its verbosity)."""
    log = tmp_path / "relinker.log"
    job = start(["-v", "--log-file", str(log), *relink_argv(busy)])
    wait_for(lambda: range_states(busy.conn).get("done", 0) >= 3, what="some ranges done")
    kill_group(job, signal.SIGINT)
    code, _out, err = finish(job, timeout=30)
    resume = busy.resume("relink", 1, "--log-file", str(log), "-v")
    assert code == 3 and f"interrupted; resume with: {resume}" in err, err
    assert "run 1 (relink): interrupted" in log.read_text()
    assert f"interrupted; resume with: {resume}" in log.read_text()
    printed = [busy.dsn if word == "DSN" else word for word in shlex.split(resume)[1:]]
    code, _out, err = finish(start(printed))
    assert code == 0, err
    assert "run 1 (relink): complete" in log.read_text()


def test_ctrl_c_with_stderr_gone_still_stops_cleanly(busy):
    """``relinker relink 2>&1 | tee log``: the same Ctrl-C ends tee, and the coordinator's message
    cannot be written; the run still stops with exit 3 and its ranges given back."""
    import subprocess
    import sys

    from processes import NEUTRAL_DIRECTORY

    with open("/dev/full", "wb") as full:
        job = subprocess.Popen([sys.executable, "-m", "relinker", *relink_argv(busy)], stdout=subprocess.PIPE,
                               stderr=full, cwd=NEUTRAL_DIRECTORY, start_new_session=True,
                               env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"})
    wait_for(lambda: range_states(busy.conn).get("done", 0) >= 3, what="some ranges done")
    kill_group(job, signal.SIGINT)
    code = job.wait(timeout=30)
    job.stdout.close()
    assert code == 3
    assert "running" not in range_states(busy.conn)
    resume_and_check(busy)


def test_second_signal_stops_at_once_and_the_next_run_still_ends_correct(busy):
    job = start(relink_argv(busy))
    wait_for(lambda: range_states(busy.conn).get("done", 0) >= 3, what="some ranges done")
    kill_group(job, signal.SIGINT)
    time.sleep(0.01)
    kill_group(job, signal.SIGINT)
    code, _out, err = finish(job, timeout=30)
    assert code == 3, err
    resume_and_check(busy)



@pytest.mark.parametrize("signum, inherited_ignored", [(signal.SIGINT, False), (signal.SIGINT, True),
                                                      (signal.SIGTERM, False)],
                         ids=["SIGINT", "SIGINT-inherited-ignored", "SIGTERM"])
def test_a_signal_before_the_pool_starts_is_exit_3_too(signum, inherited_ignored):
    """Preflight, planning, the summary: a signal outside the pool stops the command with one line and exit 3.

    The catalogue here is a server that accepts connections and never
    answers, so the signal lands while relinker waits in its preflight.
    A background job of a script starts with SIGINT ignored (and so did
    this test whenever the test run was one): relinker stops on it all the
    same, as its pool does.
    """
    accepted = []

    def relinker_connected():
        try:
            accepted.append(silent.accept()[0])  # held open, never answered
        except TimeoutError:
            return False
        return True

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        silent.settimeout(0.05)
        port = silent.getsockname()[1]
        argv = ["--db-url", f"host=127.0.0.1 port={port} user=nobody dbname=nothing", "status"]
        job = start(argv, ignore_sigint=inherited_ignored)
        wait_for(relinker_connected, what="relinker to connect")
        time.sleep(0.2)  # into the wait for the server's answer
        job.send_signal(signum)
        code, _out, err = finish(job, timeout=30)
        for connection in accepted:
            connection.close()
    assert code == 3, err
    assert err.strip().endswith("relinker: interrupted") and "Traceback" not in err


@pytest.mark.parametrize("signum, inherited_ignored", [(signal.SIGINT, True), (signal.SIGTERM, False)],
                         ids=["SIGINT-inherited-ignored", "SIGTERM"])
def test_a_signal_while_the_command_is_still_loading_is_exit_3(signum, inherited_ignored):
    """The first tenths of a second go to importing the command's modules (psycopg among them): a signal
    then stops it as one anywhere else does. The process is held still (SIGSTOP) as psycopg's library is
    mapped, so the signal lands in the middle of the imports."""
    def loading_psycopg():
        try:
            with open(f"/proc/{job.pid}/maps") as maps:
                return "psycopg" in maps.read()
        except OSError:
            return False

    # Several times: where the imports are when the signal lands varies, and some places (a dataclass
    # being made, code run by exec) once made `python -m` end by SIGINT after the exit 3 was chosen.
    for _ in range(4):
        job = start(["--db-url", "host=127.0.0.1 port=1 connect_timeout=30", "status"],
                    ignore_sigint=inherited_ignored)
        try:
            wait_for(loading_psycopg, interval=0.001, what="psycopg to load")
            job.send_signal(signal.SIGSTOP)
            job.send_signal(signum)
        finally:
            job.send_signal(signal.SIGCONT)
        code, _out, err = finish(job, timeout=30)
        assert code == 3, err
        assert err == "relinker: interrupted\n"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_once_the_outcome_is_told_changes_nothing(world, signum):
    """A signal landing after the summary, as the interpreter shuts down, found the default action put
    back and killed the process (exit 128 + signal, after "complete"): the exit code stays the outcome's."""
    import subprocess
    import sys

    from processes import NEUTRAL_DIRECTORY

    script = ("import os, signal, sys\n"
              "from relinker import entry\n"
              f"sys.argv = ['relinker', *{world.argv('status')!r}]\n"
              "code = entry.main()\n"
              f"os.kill(os.getpid(), {int(signum)})\n"
              "sys.exit(code)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=NEUTRAL_DIRECTORY,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "no runs yet" and "Traceback" not in done.stderr


def test_a_signal_while_the_outcome_is_told_changes_nothing():
    """Once a summary is being told (report, status), a stop signal neither cuts it short nor follows
    "complete" with "interrupted" and exit 3."""
    from relinker import errors

    previous = errors.stop_on_signals()
    try:
        with pytest.raises(errors.StopSignal):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs at the next instruction of this thread
        errors.outcome_told()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@pytest.mark.parametrize("command", ["migrate", "scan", "status", "relink"])
def test_a_signal_as_a_commands_result_is_printed_changes_nothing(catalogue_url, tmp_path, monkeypatch, capsys,
                                                                   command):
    """migrate, scan, status and a run's summary have done their work when they print it: a Ctrl-C then
    is no "interrupted" and exit 3 (with no resume to offer)."""
    from relinker import cli
    from relinker.cli import main

    real_emit = cli.emit

    def emit_then_a_signal(*args, **kwargs):
        real_emit(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs here, if it raises

    monkeypatch.setattr(cli, "emit", emit_then_a_signal)
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "file").write_bytes(b"content")
    (tmp_path / "by-hash").mkdir()
    (tmp_path / "archive").mkdir()
    argv = {"migrate": ["migrate"], "scan": ["scan", "--medium", "disk", str(tmp_path / "tree")],
            "status": ["status"],
            "relink": ["--by-hash-root", str(tmp_path / "by-hash"), "--archive-root", str(tmp_path / "archive"),
                       "relink", "--no-progress"]}[command]
    assert main(["--db-url", catalogue_url, *argv]) == 0
    assert "interrupted" not in capsys.readouterr().err


def test_ctrl_c_in_the_middle_of_a_range_gives_that_range_back(busy):
    """One range of 60,000 links, interrupted while worked: back to pending, not left running nor finished."""
    job = start(busy.argv("relink", "--no-progress", "--json", "--workers", "1", "--ranges", "1"))
    wait_for(lambda: range_states(busy.conn).get("running", 0) == 1, what="the range running")
    kill_group(job, signal.SIGINT)
    code, _out, err = finish(job, timeout=30)
    assert code == 3, err
    states = range_states(busy.conn)
    assert states == {"pending": 1}, states  # given back mid-range, not left running, not finished
    assert busy.conn.execute("SELECT worker, heartbeat_at FROM relinker_range").fetchone() == (None, None)


def test_a_second_sigint_stops_at_once_even_with_a_stuck_worker(busy):
    """The first signal waits for the workers; the second does not, even for one that never answers."""
    from processes import running_worker_pids


    job = start(busy.argv("relink", "--no-progress", "--json", "--workers", "1", "--ranges", "1"))
    victim = wait_for(lambda: running_worker_pids(busy.conn), what="a running range")[0]
    os.kill(victim, signal.SIGSTOP)  # it will never notice the first signal
    try:
        job.send_signal(signal.SIGINT)
        time.sleep(0.5)
        job.send_signal(signal.SIGINT)
        code, _out, err = finish(job, timeout=20)
    finally:
        try:
            os.kill(victim, signal.SIGCONT)
        except ProcessLookupError:
            pass
        if job.poll() is None:
            kill_group(job)
            job.wait()
    assert code == 3, err


def test_a_workers_second_signal_ends_it_at_once():
    """A worker's second stop signal ends it at once, with exit 3."""
    from relinker import pool

    pid = os.fork()
    if pid == 0:
        try:
            pool._signals_received = 0
            pool._on_worker_signal(signal.SIGINT, None)
            pool._on_worker_signal(signal.SIGINT, None)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 3


def test_ctrl_c_just_after_the_control_session_drops_still_gives_the_range_back(busy):
    """The give-back's first try finds the worker's session gone: it is made again and the range
    given back, not left running for a resume to take over."""
    job = start(busy.argv("relink", "--no-progress", "--json", "--workers", "1", "--ranges", "1"))
    wait_for(lambda: range_states(busy.conn).get("running", 0) == 1, what="the range running")
    time.sleep(0.3)
    control = busy.conn.execute("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 2 "
                                "AND granted").fetchone()[0]
    busy.conn.execute("SELECT pg_terminate_backend(%s)", (control,))
    kill_group(job, signal.SIGINT)
    code, _out, err = finish(job, timeout=60)
    assert code == 3, err[-2000:]
    assert range_states(busy.conn) == {"pending": 1}
