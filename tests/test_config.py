"""Configuration: command line beats environment beats config file."""

import os
import re
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from processes import NEUTRAL_DIRECTORY
from support import obeying_file_permissions
from relinker.cli import main, parse
from relinker.errors import UserError

EXAMPLE = Path(__file__).parent.parent / "config" / "relinker.conf.example"


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "relinker.conf"
    path.write_text("db-url = from-file\nby-hash-root = /file/by-hash\narchive-root = /file/archive\n")
    return path


def test_config_file_sets_global_options(config_file):
    _, settings = parse(["--config", str(config_file), "migrate"])
    assert settings.db_url == "from-file"
    assert settings.by_hash_root == b"/file/by-hash"
    assert settings.archive_root == b"/file/archive"


def test_environment_beats_config_file(config_file, monkeypatch):
    monkeypatch.setenv("RELINKER_DB_URL", "from-env")
    monkeypatch.setenv("RELINKER_ARCHIVE_ROOT", "/env/archive")
    _, settings = parse(["--config", str(config_file), "migrate"])
    assert settings.db_url == "from-env"
    assert settings.archive_root == b"/env/archive"
    assert settings.by_hash_root == b"/file/by-hash"


@pytest.mark.parametrize("position", ["before", "after"])
def test_command_line_beats_environment_and_file(config_file, monkeypatch, position):
    monkeypatch.setenv("RELINKER_DB_URL", "from-env")
    options = ["--db-url", "from-cli", "--by-hash-root", "/cli/by-hash"]
    argv = options + ["migrate"] if position == "before" else ["migrate"] + options
    _, settings = parse(["--config", str(config_file)] + argv)
    assert settings.db_url == "from-cli"
    assert settings.by_hash_root == b"/cli/by-hash"
    assert settings.archive_root == b"/file/archive"


def test_config_file_from_environment(config_file, monkeypatch):
    monkeypatch.setenv("RELINKER_CONFIG", str(config_file))
    _, settings = parse(["migrate"])
    assert settings.db_url == "from-file"


def test_roots_keep_non_utf8_bytes():
    # argparse sees surrogate-escaped str; the settings must hold the original bytes.
    _, settings = parse(["--archive-root", "/arch/caf\udce9", "migrate"])
    assert settings.archive_root == b"/arch/caf\xe9"


def test_missing_config_file_is_a_usage_error(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "nope.conf"), "migrate"]) == 2
    err = capsys.readouterr().err
    assert "config file not found" in err and "Traceback" not in err
    assert main(["--config", str(tmp_path), "migrate"]) == 2
    assert capsys.readouterr().err == f"relinker: error: config file {tmp_path} is a directory\n"


@pytest.mark.parametrize("text, message", [
    ("limit = 1\n# the nightly one\nlimit: 2\n", ": 'limit' is given twice (lines 1 and 3): keep the one meant"),
    # read as a list of `*` it excluded every entry, and a re-scan emptied the medium
    ("exclude = [*]\n", ": line 1: a value in brackets is a list, and this one is no JSON list: exclude = [*] "
                         '(write a list as JSON, ["a", "b"]; a pattern in brackets as a list of it, ["[*]"])'),
    ("db-url = x\n = = \n", ": line 2 is not `key = value`: = ="),
    ("\ufeffdb-url = x\n", " begins with a byte-order mark: save it without one"),  # its first key was dropped
])
def test_a_config_file_a_user_can_get_wrong_is_one_line(tmp_path, capsys, text, message):
    """A key given twice would pick one silently (which catalogue, with db-url); a line the parser cannot
    read was a traceback."""
    config = tmp_path / "relinker.conf"
    config.write_text(text)
    assert main(["--config", str(config), "status"]) == 2
    assert capsys.readouterr().err == f"relinker: error: config file {config}{message}\n"


def test_a_config_line_may_name_its_key_as_the_command_line_does(tmp_path, capsys):
    """The file's parser reads `--db-url x` as `db-url = x`: it was refused as an unknown key, and the
    same key written both ways was not seen as given twice."""
    config = tmp_path / "relinker.conf"
    config.write_text("--db-url = from-file\n--workers 3\n")
    args, settings = parse(["--config", str(config), "relink"])
    assert (settings.db_url, args.workers) == ("from-file", 3)
    config.write_text("db-url = one\n--db-url two\n")
    assert main(["--config", str(config), "status"]) == 2
    assert capsys.readouterr().err == (f"relinker: error: config file {config}: 'db-url' is given twice "
                                       "(lines 1 and 2): keep the one meant\n")


def test_a_config_file_that_is_a_dangling_link_is_not_found(tmp_path, capsys):
    link = tmp_path / "relinker.conf"
    link.symlink_to(tmp_path / "moved.conf")
    assert main(["--config", str(link), "status"]) == 2
    assert capsys.readouterr().err == (f"relinker: error: config file not found: {link} "
                                       "(a symbolic link whose target does not exist)\n")


def test_a_config_files_json_list_gives_an_option_given_more_than_once(tmp_path):
    config = tmp_path / "relinker.conf"
    config.write_text('exclude = ["*.tmp", "[*]"]  # the second: a file named *\n')
    args, _ = parse(["--config", str(config), "--db-url", "x", "scan", "--medium", "m", "/tmp"])
    assert args.exclude == ["*.tmp", "[*]"]


@pytest.mark.parametrize("path, message", [
    ("/dev/null", "is not a regular file"),
    ("/proc/self/mem", "Input/output error"),  # a read that fails, as on a failing disk
])
def test_a_config_file_that_cannot_be_read_is_one_line(capsys, path, message):
    assert main(["--config", path, "status"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"relinker: error: config file {path}") and message in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize("where", ["environment", "config file"])
def test_a_verbosity_that_is_not_a_number_is_a_usage_error(where, tmp_path, monkeypatch, capsys):
    argv = ["migrate"]
    if where == "environment":
        monkeypatch.setenv("RELINKER_VERBOSE", "loud")
    else:
        (tmp_path / "relinker.conf").write_text("verbose = loud\n")
        argv = ["--config", str(tmp_path / "relinker.conf"), *argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("relinker: error: RELINKER_VERBOSE or 'verbose'") and "Traceback" not in err


def test_a_log_file_that_cannot_be_written_is_a_usage_error(tmp_path, capsys):
    assert main(["--log-file", str(tmp_path / "no-such-directory" / "relinker.log"), "migrate"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("relinker: error: cannot write the log file") and "Traceback" not in err


@pytest.mark.parametrize("option, value", [("--lease", "0"), ("--lease", "0.5"), ("--lease", "-3"),
                                           ("--lease", "nan"), ("--lease", "inf"), ("--lease", "soon"),
                                           ("--retry-timeout", "-1"), ("--retry-timeout", "inf")])
def test_leases_and_timeouts_that_cannot_work_are_refused(option, value, capsys):
    """A lease shorter than a second would take ranges from workers alive and well (they beat every lease/4)."""
    with pytest.raises(SystemExit) as refused:
        parse(["relink", option, value])
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and "at most inf" not in err
    assert parse(["relink", "--lease", "1", "--retry-timeout", "0"])[0].lease == 1.0


def test_example_config_parses():
    _, settings = parse(["--config", str(EXAMPLE), "migrate"])
    assert settings.by_hash_root == b"/data/cold/by-hash"
    assert settings.db_url.startswith("postgresql://")


def test_empty_dsn_falls_back_to_libpq_variables(catalogue_url, monkeypatch, capsys):
    params = psycopg.conninfo.conninfo_to_dict(catalogue_url)
    monkeypatch.setenv("PGHOST", params["host"])
    monkeypatch.setenv("PGDATABASE", params["dbname"])
    monkeypatch.setenv("PGUSER", params.get("user") or "postgres")
    if params.get("port"):
        monkeypatch.setenv("PGPORT", str(params["port"]))
    if params.get("password"):
        monkeypatch.setenv("PGPASSWORD", params["password"])
    assert main(["migrate"]) == 0
    assert "schema is at version" in capsys.readouterr().out


def test_help_lists_commands():
    out = subprocess.run(
        [sys.executable, "-m", "relinker", "--help"], capture_output=True, text=True, check=True, cwd=NEUTRAL_DIRECTORY
    ).stdout
    for command in ("migrate", "scan"):
        assert command in out


def test_version():
    out = subprocess.run([sys.executable, "-m", "relinker", "--version"], capture_output=True, text=True,
                         cwd=NEUTRAL_DIRECTORY)
    assert out.returncode == 0 and out.stdout.startswith("relinker ")


def test_log_file_gets_timestamped_lines(db_url, tmp_path):
    log_file = tmp_path / "relinker.log"
    assert main(["--db-url", db_url, "--log-file", str(log_file), "-v", "migrate", "--base"]) == 0
    lines = log_file.read_text().splitlines()
    assert lines and all(line[:4].isdigit() and " INFO " in line for line in lines)


def test_the_log_file_says_how_migrate_scan_and_status_ended_whatever_the_verbosity(db_url, tmp_path):
    log_file = tmp_path / "relinker.log"
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_bytes(b"x")
    for command in (["migrate", "--base"], ["scan", "--medium", "disk", str(tree)], ["status"]):
        assert main(["--db-url", db_url, "--log-file", str(log_file), *command]) == 0, command
    logged = log_file.read_text()
    assert "catalogue schema is at version" in logged and "medium disk (" in logged and "no runs yet" in logged


def test_a_log_file_on_a_full_disk_costs_its_lines_and_no_traceback(world):
    """Every process of the run logs (-v): each says once that its lines are dropped, and the run is done."""
    from processes import finish, start

    world.bulk(20, paths_per_blob=2)
    code, _out, err = finish(start(["--log-file", "/dev/full", "-v", *world.argv("relink", "--no-progress",
                                                                                 "--workers", "2")]))
    assert code == 0, err
    assert "Traceback" not in err and "Logging error" not in err
    dropped = [line for line in err.splitlines() if line.startswith("relinker: cannot write the log file")]
    assert 1 <= len(dropped) <= 3 and all(line.endswith("its lines are dropped") for line in dropped), err


def test_a_config_file_that_cannot_be_read_is_a_usage_error(tmp_path, capsys):
    """Unreadable, or not text: one line naming the trouble, exit 2, no traceback."""
    unreadable = tmp_path / "secret.conf"
    unreadable.write_text("workers = 2\n")
    unreadable.chmod(0)
    binary = tmp_path / "binary.conf"
    binary.write_bytes(b"workers = \xff\xfe\n")
    for path, says in ((unreadable, "Permission denied"), (binary, "not UTF-8 text")):
        with obeying_file_permissions():  # as root too: mode 000 must mean unreadable
            assert main(["--config", str(path), "migrate"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("relinker: error: ") and says in err and err.count("\n") == 1, err


@pytest.mark.parametrize("option, bound", [(["--limit", "-3"], "least"), (["--ranges", "2000000000"], "most"),
                                           (["--ranges", "0"], "least"), (["--lease", "1e300"], "most"),
                                           (["--lease", "1e400"], "most"), (["--lease", "0.5"], "least"),
                                           (["--limit", "99999999999999999999"], "most")])
def test_counts_out_of_range_are_usage_errors(option, bound, capsys):
    """Refused while parsing (exit 2), before any database is asked or any memory spent on ranges."""
    with pytest.raises(SystemExit) as stopped:
        parse(["--db-url", "postgresql://nobody@127.0.0.1:1/x", "relink", *option])
    assert stopped.value.code == 2
    assert f"argument {option[0]}: must be at {bound}" in capsys.readouterr().err


def test_a_config_key_no_command_knows_is_a_usage_error(tmp_path, capsys):
    """``db_url`` for ``db-url`` would be ignored, and libpq's defaults reach another database: refused."""
    config = tmp_path / "relinker.conf"
    config.write_text("db_url = postgresql:///catalogue\nworkers = 3\n")
    assert main(["--config", str(config), "status"]) == 2
    err = capsys.readouterr().err
    assert err == f"relinker: error: config file {config}: unknown key 'db_url' (did you mean 'db-url'?)\n"
    # keys of other commands are fine: one file serves them all
    config.write_text("on-conflict = keep\nhash = true\nworkers = 3\n")
    args, _ = parse(["--config", str(config), "count"])
    assert args.workers == 3


@pytest.mark.parametrize("command", [["scan", "--medium", os.fsdecode(b"disk-\xe9"), "/srv/tree"],
                                     ["copy", "--medium", os.fsdecode(b"disk-\xe9")],
                                     ["copy", "--medium", "disk\0one"],
                                     ["copy", "--medium", ""], ["scan", "--medium", "", "/srv/tree"]])
def test_a_medium_name_the_catalogue_cannot_hold_is_a_usage_error(command, capsys):
    """A name of bytes that are not UTF-8 (from the shell) or with a NUL: refused while parsing, no traceback."""
    with pytest.raises(SystemExit) as stopped:
        parse(["--db-url", "postgresql://nobody@127.0.0.1:1/x", *command])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "argument --medium: " in err and ("is not UTF-8" in err or "NUL" in err or "empty" in err)
    assert "Traceback" not in err


@pytest.mark.parametrize("key, command", [("by-hash-root", "relink"), ("archive-root", "count"),
                                          ("log-file", "status"), ("from-file", "relink"),
                                          ("failed-ids", "verify")])
def test_a_nul_in_a_path_of_the_config_file_is_a_usage_error(tmp_path, capsys, key, command):
    """No path holds a NUL: refused while parsing in one line, not a traceback after the night's run."""
    config = tmp_path / "relinker.conf"
    config.write_bytes(key.encode() + b" = /tmp/a\0b\n")
    with pytest.raises(SystemExit) as stopped:
        main(["--config", str(config), "--db-url", "postgresql://nobody@127.0.0.1:1/x", command])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --{key}: a NUL cannot be part of a path" in err and "Traceback" not in err


@pytest.mark.parametrize("argv, option", [
    (["scan", "--medium", "photos", ""], "DIR"),  # os.path.abspath(""): the working directory, catalogued
    (["relink", "--from-file", ""], "--from-file"),  # every blob instead of the listed ones
    (["verify", "--from-file", ""], "--from-file"),
    (["verify", "--all", "--failed-ids", ""], "--failed-ids"),
    (["--log-file", "", "status"], "--log-file"),
    (["--by-hash-root", "", "relink"], "--by-hash-root"),
    (["demo", "--source", ""], "--source"),
])
def test_an_empty_path_is_a_usage_error_not_the_working_directory(capsys, argv, option):
    """`"$UNSET"` in a script: refused while parsing, before any catalogue is touched."""
    with pytest.raises(SystemExit) as stopped:
        main(["--db-url", "postgresql://nobody@127.0.0.1:1/x", *argv])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: an empty path names nothing (a variable not set?)" in err
    assert "Traceback" not in err


def test_an_empty_config_never_falls_back_to_relinker_config(tmp_path, capsys, monkeypatch):
    production = tmp_path / "production.conf"
    production.write_text("db-url = postgresql://prod@127.0.0.1:2/production\n")
    monkeypatch.setenv("RELINKER_CONFIG", str(production))
    for argv in (["--config", "", "status"], ["--config=", "status"]):
        assert main(argv) == 2
        assert capsys.readouterr().err == ("relinker: error: --config: an empty path names nothing "
                                           "(a variable not set?)\n")
    monkeypatch.setenv("RELINKER_CONFIG", "")
    assert main(["status"]) == 2
    assert "RELINKER_CONFIG is set but empty" in capsys.readouterr().err


def test_a_path_after_double_dash_that_looks_like_config_is_a_path(tmp_path, capsys, monkeypatch):
    """`scan --medium m -- --config=x`: x is no config file, and the resume command reads no --config."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "evil.conf").write_text("db-url = postgresql://evil@127.0.0.1:2/x\n")
    args, settings = parse(["--db-url", "postgresql://nobody@127.0.0.1:1/x", "scan", "--medium", "m", "--",
                            "--config=evil.conf"])
    assert settings.db_url == "postgresql://nobody@127.0.0.1:1/x"
    assert os.fsdecode(args.directory) == "--config=evil.conf" and args.config is None
    from relinker.cli import _resume_globals

    argv = ["--db-url", "x", "scan", "--medium", "m", "--", "--config=evil.conf"]
    assert _resume_globals(argv, args, settings) == ["--db-url", "DSN"]  # was a TypeError


def test_a_db_url_that_is_not_utf8_is_a_usage_error(capsys):
    assert main(["--db-url", os.fsdecode(b"dbname=\xff"), "status"]) == 2
    err = capsys.readouterr().err
    assert err == "relinker: error: --db-url (or RELINKER_DB_URL, or db-url in the config file) is not UTF-8\n"


@pytest.mark.parametrize("where", ["environment", "config file"])
def test_a_verbosity_beyond_any_use_is_refused_before_it_is_expanded(where, tmp_path, monkeypatch, capsys):
    """ConfigArgParse turns verbose = N into N flags, in a time growing with N squared: a million took hours."""
    argv = ["--db-url", "postgresql://nobody@127.0.0.1:1/x", "status"]
    if where == "environment":
        monkeypatch.setenv("RELINKER_VERBOSE", "1000000")
    else:
        config = tmp_path / "relinker.conf"
        config.write_text("verbose = 1000000\n")
        argv = ["--config", str(config), *argv]
    assert main(argv) == 2
    assert "must be at most 10, not 1000000" in capsys.readouterr().err


@pytest.mark.parametrize("abbreviated, meant", [
    (["--conf", "/nowhere.conf", "status"], "--conf: options are never abbreviated (did you mean --config?)"),
    (["--by-hash", "/x", "status"], "--by-hash: options are never abbreviated (did you mean --by-hash-root?)"),
    (["relink", "--on-conf=keep"], "--on-conf: options are never abbreviated (did you mean --on-conflict?)"),
    (["status", "--j"], "--j: options are never abbreviated (did you mean --json?)"),
    (["relink", "--o"], "--o: options are never abbreviated (did you mean --on-conflict or --only-incomplete?)"),
])
def test_an_abbreviated_option_is_a_usage_error_that_names_the_option(abbreviated, meant, capsys):
    """argparse took --conf for --config, which the config file lookup did not: the file was ignored,
    and a resume command cannot repeat what it does not recognise. Refused, argparse blamed the next
    word as an unknown command ("invalid choice: '/nowhere.conf'")."""
    with pytest.raises(UserError, match=re.escape(meant)):
        parse(["--db-url", "postgresql://nobody@127.0.0.1:1/x", *abbreviated])


def test_an_abbreviation_is_never_told_another_commands_option(capsys):
    """`status --ru 3`: status has no --run to mean; argparse says the option is not one of status's."""
    with pytest.raises(SystemExit) as stopped:
        parse(["--db-url", "postgresql://nobody@127.0.0.1:1/x", "status", "--ru", "3"])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "unrecognized arguments: --ru" in err and "--run" not in err


@pytest.mark.parametrize("argv, message", [
    (["relink", "--workers", "abc"], "relinker relink: error: argument --workers: 'abc' is not a whole number"),
    (["verify", "--count", "0"], "relinker verify: error: argument --count: must be at least 1, not 0"),
    (["relink", "--run", "3", "--new"], "relinker relink: error: argument --new: not allowed with argument --run"),
    (["relinc"], "relinker: error: argument COMMAND: invalid choice: 'relinc'"),
])
def test_a_usage_error_is_one_line_that_points_at_help(argv, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        parse(["--db-url", "postgresql://nobody@127.0.0.1:1/x", *argv])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(message) and err.endswith(f" (see {message.partition(': ')[0]} --help)\n"), err


def test_a_resume_command_reads_back_as_the_arguments_it_was_made_of():
    """Spaces, quotes and bytes that are not UTF-8 (a root named so) come back exactly through a shell."""
    import subprocess

    from relinker import jobs

    odd = os.fsdecode(b"/w/arch\xffive it's")
    hostile = "/w/\x1b]0;owned\x07\x1b[2J\rX\nY\u009b31m"  # a name that would rewrite the terminal
    request = jobs.JobRequest(settings=None, options={},
                              resume_arguments=["--archive-root", odd, "--by-hash-root", hostile, "--x", "a b ü"])
    command = jobs.resume_command("relink", 3, request)
    assert command.isprintable() and all(ord(c) < 0x7f for c in command.replace("ü", ""))
    echoed = subprocess.run(["bash", "-c", "printf '%s\\0' " + command], capture_output=True, check=True).stdout
    assert echoed.split(b"\0")[:-1] == [b"relinker", b"relink", b"--run", b"3", b"--archive-root",
                                        b"/w/arch\xffive it's", b"--by-hash-root", hostile.encode(),
                                        b"--x", "a b ü".encode()]


def test_a_line_said_while_stderrs_writer_is_taken_still_goes_out(monkeypatch, capfd):
    """A signal handler's notice, while the main thread is blocked writing to stderr (a full pipe):
    the buffered writer raises 'reentrant call'; the line goes straight to the descriptor."""
    import io

    from relinker.logs import say

    class Taken(io.TextIOWrapper):
        def write(self, text):
            raise RuntimeError("reentrant call inside <_io.BufferedWriter name='<stderr>'>")

    monkeypatch.setattr("sys.stderr", Taken(io.BytesIO()))
    say("relinker: SIGINT received")
    assert capfd.readouterr().err == "relinker: SIGINT received\n"
