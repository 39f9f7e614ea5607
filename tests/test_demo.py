"""`relinker demo`: the newcomer's first command, on its own embedded PostgreSQL."""

import os
import subprocess
import sys
import time

import psycopg
import pytest

from processes import NEUTRAL_DIRECTORY


def demo(*args, env=None):
    return subprocess.run([sys.executable, "-m", "relinker", "demo", *args], capture_output=True, text=True,
                          cwd=NEUTRAL_DIRECTORY, timeout=300, env=env)


def small_tree(root, files=30):
    (root / "a").mkdir(parents=True)
    for i in range(files):
        (root / "a" / f"f{i}").write_bytes(b"content %d" % (i % 7))
    return root


def test_demo_runs_twice_on_the_standard_library(tmp_path):
    for attempt in (1, 2):  # the second invocation starts over in the same directory
        result = demo(str(tmp_path / "demo"))
        assert result.returncode == 0, result.stdout + result.stderr
        out = result.stdout
        assert "everything repaired and verified" in out
        assert "[7/7] look around in psql" in out and "relinker_run_progress" in out
        assert "Traceback" not in result.stderr
    assert "run 2 (relink): complete" in out  # a fresh catalogue each time
    assert sorted(os.listdir(tmp_path / "demo")) == [".relinker-demo", "archive", "by-hash", "pgdata"]


@pytest.mark.parametrize("name, medium", [(b"src\xffbad", "src\\xffbad"), (b"a\\b", "a\\b")],
                         ids=["not-utf8", "backslash"])
def test_demo_on_a_tree_with_an_odd_name(tmp_path, name, medium):
    """The medium takes the tree's name as it reads (a byte that is not UTF-8 as \\xNN): never a traceback."""
    source = small_tree(tmp_path / os.fsdecode(name))
    result = demo(str(tmp_path / "d"), "--source", str(source), "--workers", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"--medium '{medium}' " in result.stdout and "Traceback" not in result.stderr


def test_a_server_that_cannot_start_is_one_line(tmp_path):
    """A demo directory whose pgdata holds something but no cluster: initdb refuses it, and the demo says
    why in one line (not the server library's dump of initdb's output)."""
    (tmp_path / "d" / "pgdata").mkdir(parents=True)
    (tmp_path / "d" / ".relinker-demo").write_text("")
    (tmp_path / "d" / "pgdata" / "junk").write_text("")
    result = demo(str(tmp_path / "d"), "--source", str(small_tree(tmp_path / "src")), "--workers", "1")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("relinker: error: cannot start the demo's embedded PostgreSQL: initdb: error: ")


def test_a_ctrl_c_as_the_demo_stops_its_server_changes_nothing(tmp_path):
    """Everything done and told: stopping the server is no step a Ctrl-C makes "interrupted"."""
    import signal

    from processes import start

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    job = start(["demo", str(tmp_path / "d"), "--source", str(small_tree(tmp_path / "src")), "--workers", "1"],
                env=env)
    out = b""
    while b"server stops now" not in out:
        line = job.stdout.readline()
        assert line, "the demo ended before it stopped its server"
        out += line
    job.send_signal(signal.SIGINT)
    rest, err = job.communicate(timeout=120)
    assert job.returncode == 0, err
    assert b"interrupted" not in err


def test_demo_on_another_tree_keeps_the_server_when_asked(tmp_path):
    """A tree of one's own is catalogued whole (its site-packages too), as a medium of its name."""
    source = small_tree(tmp_path / "src")
    (source / "site-packages").mkdir()
    (source / "site-packages" / "mine.py").write_bytes(b"mine")
    result = demo(str(tmp_path / "d"), "--source", str(source), "--keep", "--workers", "1")
    try:
        assert result.returncode == 0, result.stdout + result.stderr
        assert "the server keeps running; stop it with" in result.stdout
        assert f"relinker scan --medium src {source}  (metadata only)" in result.stdout
        psql = [line for line in result.stdout.splitlines() if line.strip().split(" ")[0].endswith("psql")][0]
        binary, target = psql.strip().split(" ", 1)
        listed = subprocess.run([binary, target.strip('"'), "-Atc", "SELECT mode FROM relinker_run ORDER BY 1"],
                                capture_output=True, text=True)
        assert listed.stdout.split() == ["copy", "relink", "verify"], listed.stderr
        media = subprocess.run([binary, target.strip('"'), "-Atc", "SELECT medium_human FROM medium"],
                               capture_output=True, text=True)
        assert media.stdout.split() == ["src"], media.stderr
        assert any(b"site-packages" in directory and b"mine.py" in names
                   for directory, _dirs, names in os.walk(os.fsencode(tmp_path / "d" / "archive")))
    finally:
        stop = [line for line in result.stdout.splitlines() if "pg_ctl" in line]
        if stop:
            subprocess.run(stop[-1].strip().split(" "), capture_output=True)


def test_demo_whose_output_cannot_be_written_still_runs_to_the_end(tmp_path):
    """`relinker demo > /dev/full`: one line says so, no traceback, the demo's own exit code."""
    source = small_tree(tmp_path / "src")
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "relinker", "demo", str(tmp_path / "d"), "--source",
                                 str(source), "--workers", "1"], stdout=full, stderr=subprocess.PIPE, text=True,
                                cwd=NEUTRAL_DIRECTORY, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("relinker: cannot write the output: No space left on device") == 1


def test_demo_refuses_a_directory_that_is_not_its_own(tmp_path):
    (tmp_path / "precious.txt").write_text("mine")
    result = demo(str(tmp_path))
    assert result.returncode == 2
    assert "not a relinker demo directory" in result.stderr
    assert (tmp_path / "precious.txt").read_text() == "mine"


def test_demo_never_touches_the_configured_catalogue(tmp_path, catalogue_url):
    """RELINKER_DB_URL (or a config file) may name production's catalogue: the demo keeps to its own server."""
    with psycopg.connect(catalogue_url) as conn:
        before = conn.execute("SELECT (SELECT count(*) FROM medium), (SELECT count(*) FROM relinker_run)").fetchone()
    env = dict(os.environ, RELINKER_DB_URL=catalogue_url)
    result = demo(str(tmp_path / "d"), "--source", str(small_tree(tmp_path / "src")), "--workers", "1", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "with an embedded PostgreSQL" in result.stdout
    with psycopg.connect(catalogue_url) as conn:
        after = conn.execute("SELECT (SELECT count(*) FROM medium), (SELECT count(*) FROM relinker_run)").fetchone()
    assert after == before == (0, 0)


def test_demo_on_a_tree_too_small_says_so(tmp_path):
    result = demo(str(tmp_path / "d"), "--source", str(small_tree(tmp_path / "src", files=5)))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "fewer than 20 files" in result.stderr


def test_demo_on_a_tree_of_symlinks_says_it_has_too_few_files_to_copy(tmp_path):
    """Names are not contents: a tree of symlinks passes the first count, and the scan's count refuses it."""
    source = small_tree(tmp_path / "src", files=2)
    for i in range(25):
        (source / "a" / f"link{i}").symlink_to("f0")
    result = demo(str(tmp_path / "d"), "--source", str(source))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "has 2 regular files to copy: too few for the demo" in result.stderr


@pytest.mark.parametrize("to_group, keep", [(False, False), (True, False), (False, True)],
                         ids=["kill", "terminal-ctrl-c", "kill-keep"])
def test_a_demo_interrupted_while_its_server_starts(tmp_path, to_group, keep):
    """Ctrl-C as the embedded PostgreSQL starts: exit 3, one line, and the server stopped (not left
    running with nothing to stop it); with --keep, left running with the command that stops it. A
    terminal's Ctrl-C reaches initdb and pg_ctl too, which then fail."""
    import signal

    import psutil

    from processes import start, wait_for

    def starting_the_server():
        try:
            return any(child.name() in ("initdb", "pg_ctl") for child in psutil.Process(job.pid).children())
        except psutil.Error:
            return False

    def servers_left():
        return [process for process in psutil.process_iter(["name", "cmdline"])
                if process.info["name"] == "postgres" and str(pgdata) in " ".join(process.info["cmdline"] or [])]

    pgdata = tmp_path / "d" / "pgdata"
    job = start(["demo", str(tmp_path / "d"), "--source", str(small_tree(tmp_path / "src")), "--workers", "1",
                 *(["--keep"] if keep else [])])
    wait_for(starting_the_server, interval=0.001, what="the server to start")
    if to_group:
        os.killpg(job.pid, signal.SIGINT)
    else:
        job.send_signal(signal.SIGINT)
    out, err = (stream.decode() for stream in job.communicate(timeout=120))
    time.sleep(1)  # a server stopping takes a moment
    left = servers_left()
    try:
        assert job.returncode == 3, out + err
        assert err.strip().endswith("relinker: interrupted") and "Traceback" not in err
        if keep and left:
            assert "stop it with:" in out
        else:
            assert not left, "the demo's server runs on"
    finally:
        for process in left:
            process.send_signal(signal.SIGINT)


def test_an_interrupted_step_stops_the_demo_with_exit_3(db_url, tmp_path, monkeypatch, capsys):
    """Ctrl-C during the copy: no archive broken, no relink or verify of a copy never finished."""
    from relinker import demo as demo_module, jobs
    from relinker.config import Settings
    from relinker.errors import EXIT_INTERRUPTED
    from relinker.report import Summary

    asked = []

    def interrupted(mode, request):  # what run_job returns when the operator pressed Ctrl-C
        asked.append(mode.name)
        return Summary(mode=mode.name, run_id=1, status="open", interrupted=True), EXIT_INTERRUPTED

    monkeypatch.setattr(jobs, "run_job", interrupted)
    archive = tmp_path / "archive"
    archive.mkdir()
    settings = Settings(db_url=db_url, by_hash_root=os.fsencode(tmp_path), archive_root=os.fsencode(archive))
    code = demo_module._story(demo_module.Step(), settings, str(small_tree(tmp_path / "src")), "src", [], 1, False)
    assert code == EXIT_INTERRUPTED and asked == ["copy"]
    assert "break the archive" not in capsys.readouterr().out


def test_demo_refuses_to_catalogue_itself_or_a_place_it_cannot_make(tmp_path):
    """--source holding the demo directory would scan the demo's own database as it changes."""
    source = small_tree(tmp_path / "src")
    result = demo(str(source / "demo"), "--source", str(source))
    assert result.returncode == 2 and "lies inside --source" in result.stderr and "Traceback" not in result.stderr
    (tmp_path / "via").symlink_to(source)  # the same place by another name
    result = demo(str(tmp_path / "via" / "demo"), "--source", str(source))
    assert result.returncode == 2 and "lies inside --source" in result.stderr
    (tmp_path / "a-file").write_text("")
    result = demo(str(tmp_path / "a-file" / "demo"), "--source", str(source))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "cannot make the demo directory" in result.stderr


def test_demo_refuses_a_directory_the_embedded_server_cannot_start_in(tmp_path):
    """The embedded PostgreSQL's start command takes its directory unquoted: one line, before anything is made."""
    source = small_tree(tmp_path / "src")
    for name in ("my demo", "it's", "dm(1)", "dm$HOME", "a;b", "a,b"):
        result = demo(str(tmp_path / name), "--source", str(source))
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert "cannot be started there" in result.stderr
        assert not (tmp_path / name).exists()


def test_a_copy_with_problems_is_no_demo_success(db_url, tmp_path, monkeypatch, capsys):
    """The verdict weighs every step: a copy that recorded problems is 'something did not add up'."""
    from relinker import demo as demo_module, jobs
    from relinker.config import Settings
    from relinker.errors import EXIT_PROBLEMS

    real_run_job = jobs.run_job

    def copy_with_problems(mode, request):
        summary, code = real_run_job(mode, request)
        return summary, (EXIT_PROBLEMS if mode.name == "copy" else code)

    monkeypatch.setattr(jobs, "run_job", copy_with_problems)
    for name in ("by-hash", "archive"):
        (tmp_path / name).mkdir()
    settings = Settings(db_url=db_url, by_hash_root=os.fsencode(tmp_path / "by-hash"),
                        archive_root=os.fsencode(tmp_path / "archive"))
    code = demo_module._story(demo_module.Step(), settings, str(small_tree(tmp_path / "src")), "src", [], 1, False)
    assert code == EXIT_PROBLEMS and "something did not add up" in capsys.readouterr().out
