"""`relinker relink`: the checkpointed re-hardlink job on a real catalogue and filesystem."""

import collections
import errno
import json
import os
import re
import subprocess
import threading
import time
import types

import psycopg
import pytest

from psycopg import sql

from processes import finish, start
from support import RELINK_GRANTS
from relinker import checkpoint, db, linker
from relinker.checkpoint import Counters, Range
from relinker.cli import main
from relinker.errors import UserError
from relinker.paths import by_hash_path
from relinker.pool import WorkSpec, _Worker
from relinker.relink import RangeScope, RelinkWork, blobs_within, counts_to_write


def relink(world, capsys, *args):
    """Run `relinker relink --json` in-process; return (exit code, summary)."""
    code = main(world.argv("relink", "--json", "--workers", "2", *args))
    out = capsys.readouterr().out
    return code, json.loads(out)


@pytest.fixture
def small(world):
    """Two media, shared contents, an excluded path, non-file inodes."""
    m1, m2 = world.medium("disk-1"), world.medium("disk-2")
    hello, other, solo = world.blob(b"hello"), world.blob(b"other"), world.blob(b"solo")
    world.inode(m1, [b"/mnt/ntt/%s/a.txt" % m1.encode(), b"/mnt/ntt/%s/dir/b.txt" % m1.encode()], hello)
    world.inode(m2, [b"/mnt/ntt/%s/copy-of-a.txt" % m2.encode()], hello)
    world.inode(m1, [b"/mnt/ntt/%s/dir/other" % m1.encode(), b"/mnt/ntt/%s/skip-me" % m1.encode()], other,
                excluded={b"/mnt/ntt/%s/skip-me" % m1.encode(): "excluded by rule"})
    world.inode(m2, [b"/file-relative-form"], solo)
    world.inode(m1, [b"/mnt/ntt/%s/dir" % m1.encode()], None, fs_type="d")
    world.inode(m1, [b"/mnt/ntt/%s/a-symlink" % m1.encode()], None, fs_type="l")
    return world


def test_complete_run_from_an_empty_archive(small, capsys):
    code, summary = relink(small, capsys)
    assert code == 0
    assert summary["links_created"] == 5 and summary["links_present"] == 0 and summary["problems"] == 0
    assert summary["blobs"] == 3 and summary["complete"] and summary["status"] == "done"
    small.assert_complete(summary["run_id"])
    assert not os.path.lexists(small.archive_path(b"/mnt/ntt/%s/skip-me" % small.medium("disk-1").encode()))
    assert not os.path.lexists(small.archive_path(b"/mnt/ntt/%s/a-symlink" % small.medium("disk-1").encode()))
    assert small.n_hardlinks()[small.blob(b"hello")] == 3
    # archive directories are rwxr-xr-x whatever the umask
    assert os.stat(small.archive_path(b"/mnt/ntt")).st_mode & 0o777 == 0o755


def test_second_run_creates_nothing_and_finds_everything_present(small, capsys):
    relink(small, capsys)
    before = small.tree()
    code, summary = relink(small, capsys, "--new")
    assert code == 0
    assert summary["links_created"] == 0 and summary["links_present"] == 5
    assert small.tree() == before


def test_stale_file_is_replaced_atomically(small, capsys):
    relink(small, capsys)
    small.replace_with_stale_copy(b"/file-relative-form")
    code, summary = relink(small, capsys, "--new")
    assert code == 0 and summary["links_replaced"] == 1
    small.assert_complete(summary["run_id"])


def test_keep_leaves_a_stale_file_and_records_it(small, capsys):
    relink(small, capsys)
    stale = small.replace_with_stale_copy(b"/file-relative-form")
    code, summary = relink(small, capsys, "--new", "--on-conflict", "keep")
    assert code == 1
    assert summary["problems_by_kind"] == {"existing-file": 1}
    assert open(stale, "rb").read() == b"solo"
    assert small.n_hardlinks()[small.blob(b"solo")] == 0
    row = small.conn.execute("SELECT path, kind FROM relinker_problem WHERE run_id = %s",
                             (summary["run_id"],)).fetchone()
    assert row == (b"/file-relative-form", "existing-file")


@pytest.mark.parametrize("damage", ["truncated", "overwritten in place"])
def test_the_only_name_of_a_file_unlike_the_by_hash_file_is_never_replaced(small, capsys, damage):
    """A damaged by-hash file must not take the place of the one good copy: kept, a problem."""
    relink(small, capsys)
    solo = small.blob(b"solo")
    kept = small.replace_with_stale_copy(b"/file-relative-form")  # a complete copy, its only name
    by_hash = by_hash_path(small.by_hash_root, solo)
    os.chmod(by_hash, 0o644)
    if damage == "truncated":
        os.truncate(by_hash, 0)
    else:
        with open(by_hash, "r+b") as f:
            f.write(b"SO")
    code, summary = relink(small, capsys, "--new")
    assert code == 1 and summary["problems_by_kind"] == {"existing-file": 1} and summary["links_replaced"] == 0
    assert open(kept, "rb").read() == b"solo" and os.stat(kept).st_nlink == 1
    # Another content whose file has other names would lose nothing, but is never replaced by a
    # damaged by-hash file either.
    os.unlink(kept)
    os.link(by_hash_path(small.by_hash_root, small.blob(b"hello")), kept)
    code, summary = relink(small, capsys, "--new")
    assert code == 1 and summary["problems_by_kind"] == {"existing-file": 1} and summary["links_replaced"] == 0
    assert small.linked(small.blob(b"hello"), b"/file-relative-form")


@pytest.mark.parametrize("damaged", [b"hel", b"hellO"])
def test_a_damaged_by_hash_file_never_takes_the_place_of_good_copies_with_other_names(small, capsys, tmp_path,
                                                                                     damaged):
    """A by-hash file swapped for a damaged copy (a new inode: truncated, or of the same size) while the
    archive's names are still links of the good one: replaced name by name, the damage would reach
    every name but the last. Before a file with other names is replaced, the by-hash file is hashed."""
    relink(small, capsys)
    m1, m2 = (small.medium(name).encode() for name in ("disk-1", "disk-2"))
    hello = small.blob(b"hello")
    names = [b"/mnt/ntt/%s/a.txt" % m1, b"/mnt/ntt/%s/dir/b.txt" % m1, b"/mnt/ntt/%s/copy-of-a.txt" % m2]
    by_hash = by_hash_path(small.by_hash_root, hello)
    with open(by_hash + b".new", "wb") as f:
        f.write(damaged)
    os.rename(by_hash + b".new", by_hash)
    # Beside it, the copier's orphaned copies (the same bytes, two names) and a wrong link to
    # another content's by-hash file: both still replaced, their by-hash files being sound.
    other = small.archive_path(b"/mnt/ntt/%s/dir/other" % m1)
    os.unlink(other)
    with open(other, "wb") as f:
        f.write(b"other")
    os.link(other, tmp_path / "second-name")
    solo = small.archive_path(b"/file-relative-form")
    os.unlink(solo)
    os.link(by_hash_path(small.by_hash_root, small.blob(b"other")), solo)
    code, summary = relink(small, capsys, "--new")
    assert code == 1 and summary["problems_by_kind"] == {"existing-file": 3} and summary["links_replaced"] == 2
    assert [open(small.archive_path(name), "rb").read() for name in names] == [b"hello"] * 3
    assert small.linked(small.blob(b"other"), b"/mnt/ntt/%s/dir/other" % m1)
    assert small.linked(small.blob(b"solo"), b"/file-relative-form")
    # README's repair: the content put back under its by-hash name (a new inode), then relink.
    with open(by_hash + b".new", "wb") as f:
        f.write(b"hello")
    os.rename(by_hash + b".new", by_hash)
    code, summary = relink(small, capsys, "--new")
    assert code == 0 and summary["links_replaced"] == 3
    small.assert_complete()


def test_archive_copies_damaged_in_place_are_replaced_from_a_sound_by_hash_file(small, capsys):
    """The by-hash file and its links damaged at once (one inode, truncated), then the content put back
    under its by-hash name as a backup restores it (a new inode): relink puts it in every name that has
    other names; the last, its content's only name now, is compared and kept."""
    relink(small, capsys)
    hello = small.blob(b"hello")
    by_hash = by_hash_path(small.by_hash_root, hello)
    os.chmod(by_hash, 0o644)
    os.truncate(by_hash, 2)
    with open(by_hash + b".new", "wb") as f:
        f.write(b"hello")
    os.rename(by_hash + b".new", by_hash)
    code, summary = relink(small, capsys, "--new")
    assert code == 1 and summary["links_replaced"] == 2 and summary["problems_by_kind"] == {"existing-file": 1}
    (kept,), = small.conn.execute("SELECT path FROM relinker_problem WHERE run_id = %s", (summary["run_id"],))
    assert open(small.archive_path(bytes(kept)), "rb").read() == b"he"


def test_missing_by_hash_counts_zero_links(world, capsys):
    m = world.medium("disk")
    gone = world.blob(b"lost content", store=False)
    world.inode(m, [b"/x/lost"], gone)
    code, summary = relink(world, capsys)
    assert code == 1 and summary["problems_by_kind"] == {"missing-by-hash": 1}
    assert world.n_hardlinks()[gone] == 0
    assert not os.path.lexists(world.archive_path(b"/x/lost"))


def test_non_utf8_and_shell_hostile_names_are_linked_byte_for_byte(world, capsys):
    m = world.medium("disk")
    names = [b"/caf\xe9/Icon\r", b"/a b/$(touch pwned); rm -rf ~", b"/new\nline/*?[x]", b"/\xff\xfe/'\"`"]
    blob = world.blob(b"odd names")
    world.inode(m, names, blob)
    code, summary = relink(world, capsys)
    assert code == 0 and summary["links_created"] == 4
    for name in names:
        assert world.linked(blob, name)
    assert os.listdir(world.archive_root + b"/caf\xe9") == [b"Icon\r"]


def test_n_hardlinks_exact_after_a_redo(small, capsys):
    code, summary = relink(small, capsys)
    truth = small.n_hardlinks()
    run_id = summary["run_id"]
    # as if the run had crashed before committing every range
    small.conn.execute("UPDATE relinker_range SET status = 'running', worker = 'gone:1' WHERE run_id = %s",
                       (run_id,))
    small.conn.execute("UPDATE relinker_run SET status = 'open' WHERE run_id = %s", (run_id,))
    small.conn.execute("UPDATE blobs SET n_hardlinks = 99")
    code, summary = relink(small, capsys, "--run", str(run_id))
    assert code == 0 and summary["run_id"] == run_id
    assert small.n_hardlinks() == truth
    small.assert_complete(run_id)


@pytest.mark.parametrize("older", [False, True], ids=["run", "run-of-an-older-relinker"])
def test_a_plain_resume_never_finishes_a_run_asked_for_other_work(small, capsys, older):
    """An interrupted ``relink --limit 1`` is not what a later plain ``relink`` asks for: it is left for --run.
    So is one an older relinker planned, which kept only the options planning resolved."""
    code, summary = relink(small, capsys, "--limit", "1")
    limited = summary["run_id"]
    if older:
        small.conn.execute("UPDATE relinker_run SET options = options - 'requested' WHERE run_id = %s", (limited,))
    # as if it had been interrupted
    small.conn.execute("UPDATE relinker_range SET status = 'pending', worker = NULL WHERE run_id = %s", (limited,))
    small.conn.execute("UPDATE relinker_run SET status = 'open' WHERE run_id = %s", (limited,))
    code = main(small.argv("relink", "--json", "--workers", "1"))
    captured = capsys.readouterr()
    whole = json.loads(captured.out)
    assert code == 0 and whole["run_id"] != limited and whole["links_present"] + whole["links_created"] == 5
    assert f"run {limited} is unfinished but was asked for other work (--limit 1, now no --limit)" in captured.err
    assert f"relinker relink --run {limited}" in captured.err
    assert relink(small, capsys)[1]["run_id"] not in (limited, whole["run_id"])  # never blocked by it
    code, summary = relink(small, capsys, "--limit", "1")  # the same request resumes it
    assert code == 0 and summary["run_id"] == limited


def test_a_run_resumed_by_its_id_refuses_options_it_was_not_planned_with(small, capsys):
    """``relink --run N --on-conflict keep`` of a run planned to replace must not replace: it is refused."""
    code, summary = relink(small, capsys)
    run_id = summary["run_id"]
    small.conn.execute("UPDATE relinker_range SET status = 'pending', worker = NULL WHERE run_id = %s", (run_id,))
    small.conn.execute("UPDATE relinker_run SET status = 'open' WHERE run_id = %s", (run_id,))
    stored = sorted(small.expected()[small.blob(b"hello")])[0]
    kept = small.replace_with_stale_copy(stored)  # an orphaned copy: replaced as planned, kept under keep
    kept_inode = os.stat(kept).st_ino
    for asked in (["--on-conflict", "keep"], ["--limit", "1"], ["--only-incomplete"]):
        code = main(small.argv("relink", "--json", "--workers", "1", "--run", str(run_id), *asked))
        captured = capsys.readouterr()
        assert code == 2 and captured.out == ""
        assert captured.err.startswith(f"relinker: error: run {run_id} was planned for other work (") and \
            captured.err.count("\n") == 1, captured.err
        assert {"--on-conflict": "(--on-conflict replace, now --on-conflict keep)", "--limit": "(no --limit, now --limit 1)",
                "--only-incomplete": "(no --only-incomplete, now --only-incomplete)"}[asked[0]] in captured.err
    assert os.stat(kept).st_ino == kept_inode
    # Options it was planned with, or none, resume it as planned.
    code, summary = relink(small, capsys, "--run", str(run_id), "--on-conflict", "replace")
    assert code == 0 and summary["run_id"] == run_id and summary["links_replaced"] == 1


def counts(world):
    return {blobid: (n, expected) for blobid, n, expected in world.conn.execute(
        "SELECT blobid, n_hardlinks, expected_hardlinks FROM blobs")}


def test_counts_are_written_only_where_they_change(small, capsys):
    orphan = small.blob(b"no path catalogued")
    small.conn.execute("UPDATE blobs SET n_hardlinks = 7, expected_hardlinks = 7 WHERE blobid = %s", (orphan,))
    relink(small, capsys)
    assert counts(small) == {small.blob(b"hello"): (3, 3), small.blob(b"other"): (1, 1),
                             small.blob(b"solo"): (1, 1), orphan: (0, 0)}
    # a re-check of the complete archive rewrites no row (xmin stays)
    xmins = dict(small.conn.execute("SELECT blobid, xmin::text FROM blobs").fetchall())
    code, summary = relink(small, capsys, "--new")
    assert code == 0 and summary["links_present"] == 5
    assert dict(small.conn.execute("SELECT blobid, xmin::text FROM blobs").fetchall()) == xmins
    # --only-incomplete looks at incomplete blobs only: a wrong count on a
    # blob it does not look at stays as it is
    small.conn.execute("UPDATE blobs SET n_hardlinks = 5, expected_hardlinks = 5 WHERE blobid = %s", (orphan,))
    small.conn.execute("UPDATE blobs SET n_hardlinks = 0 WHERE blobid = %s", (small.blob(b"solo"),))
    code, summary = relink(small, capsys, "--new", "--only-incomplete")
    assert code == 0 and summary["blobs"] == 1
    assert counts(small)[orphan] == (5, 5) and counts(small)[small.blob(b"solo")] == (1, 1)


def test_dry_run_writes_nothing(small, capsys):
    tables = "SELECT (SELECT count(*) FROM relinker_run), (SELECT count(*) FROM relinker_problem), " \
             "(SELECT string_agg(blobid || n_hardlinks || coalesce(expected_hardlinks, -1), ',') FROM blobs)"
    before_db = small.conn.execute(tables).fetchone()
    before_disk = small.tree()
    code, summary = relink(small, capsys, "--dry-run")
    assert code == 0 and summary["dry_run"]
    assert summary["links_created"] == 5
    assert small.conn.execute(tables).fetchone() == before_db
    assert small.tree() == before_disk


def test_limit_takes_the_first_blobs_by_inode(world, capsys):
    m = world.medium("disk")
    blobs = sorted(world.blob(b"content %d" % i) for i in range(10))
    for i, b in enumerate(blobs):
        world.inode(m, [b"/f/%d-a" % i, b"/f/%d-b" % i], b)
    code, summary = relink(world, capsys, "--limit", "3")
    assert code == 0 and summary["blobs"] == 3 and summary["links_created"] == 6
    counts = world.n_hardlinks()
    assert [counts[b] for b in blobs] == [2, 2, 2] + [0] * 7


def test_limit_counts_the_blobs_inodes_name_without_a_blobs_row(world, capsys):
    """The catalogue may lack the row of a content its inodes name: such a blob is worked by a range
    as any other, so it counts towards --limit too (a trial of 2 blobs worked every blob below the
    third row, or with 2 rows or fewer the whole catalogue)."""
    m = world.medium("disk")
    blobs = sorted(world.blob(b"content %d" % i) for i in range(6))
    for i, b in enumerate(blobs):
        world.inode(m, [b"/f/%d" % i], b)
    world.conn.execute("DELETE FROM blobs WHERE blobid = ANY(%s)", ([blobs[0], blobs[1], blobs[4], blobs[5]],))
    code, summary = relink(world, capsys, "--limit", "2")
    assert code == 0 and summary["blobs"] == 2 and summary["links_created"] == 2, summary
    assert [world.linked(b, b"/f/%d" % i) for i, b in enumerate(blobs)] == [True, True] + [False] * 4
    code, summary = relink(world, capsys, "--new", "--limit", "5")  # 2 rows in all: not the whole catalogue
    assert code == 0 and summary["blobs"] == 5 and summary["links_created"] == 3, summary
    code, summary = relink(world, capsys, "--new", "--dry-run", "--limit", str(2**63 - 1))  # the largest bigint
    assert code == 0 and summary["blobs"] == 6, summary


def test_only_incomplete_skips_complete_blobs(small, capsys):
    relink(small, capsys)
    os.unlink(small.archive_path(b"/file-relative-form"))
    small.conn.execute("UPDATE blobs SET n_hardlinks = 0 WHERE blobid = %s", (small.blob(b"solo"),))
    code, summary = relink(small, capsys, "--new", "--only-incomplete")
    assert code == 0 and summary["blobs"] == 1 and summary["links_created"] == 1
    small.assert_complete(summary["run_id"])


def test_the_progress_bar_names_the_run_other_hosts_join(small, capsys, monkeypatch):
    """README: start `relinker relink --run RUN_ID` on each host; the first host's bar says which."""
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # the bar is drawn on a terminal only
    assert main(small.argv("relink", "--workers", "1")) == 0
    assert "relink run 1" in capsys.readouterr().err


def test_a_run_without_the_c_extension_says_so(small):
    """Installed without a compiler, relinker runs the Python loop: pip says so only with -v, the run
    itself says so every time (an overnight run must not be slow unsaid)."""
    import subprocess
    import sys

    from processes import NEUTRAL_DIRECTORY  # the relinker installed, not a checkout's (tox installs it)

    hidden = "import sys; sys.modules['relinker._speedups'] = None; from relinker.cli import main; " \
             "sys.exit(main(sys.argv[1:]))"
    def without_it(*args):
        return subprocess.run([sys.executable, "-c", hidden, *small.argv("relink", "--no-progress", *args)],
                              capture_output=True, text=True, timeout=120, cwd=NEUTRAL_DIRECTORY)

    done = without_it("--workers", "1")
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("relinker._speedups was not built (no C compiler at install time): the Python "
                             "loop runs") == 1
    small.assert_complete()
    # an error before any run is one line still
    done = without_it("--run", "999")
    assert done.returncode == 2 and done.stderr == "relinker: error: unknown run 999 (see `relinker status`)\n"
    if linker.RangeWalker is not None:  # built here: nothing said
        done = subprocess.run([sys.executable, "-m", "relinker", *small.argv("relink", "--no-progress", "--new")],
                              capture_output=True, text=True, timeout=120, cwd=NEUTRAL_DIRECTORY)
        assert done.returncode == 0 and "_speedups" not in done.stderr


def test_status_of_a_catalogue_with_no_run_yet_is_no_error(small, capsys):
    """A monitoring script asks a catalogue just migrated: an answer, not exit 2."""
    assert main(small.argv("status")) == 0 and capsys.readouterr().out == "no runs yet\n"
    assert main(small.argv("status", "--json")) == 0 and json.loads(capsys.readouterr().out) == {"run_id": None}
    assert main(small.argv("status", "7")) == 2 and capsys.readouterr().err == "relinker: error: unknown run 7\n"


def test_status_shows_a_run(small, capsys):
    code, summary = relink(small, capsys)
    assert main(small.argv("status", str(summary["run_id"]), "--json")) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["links_created"] == 5 and status["complete"]
    assert main(small.argv("status")) == 0
    assert f"run {summary['run_id']} (relink): complete" in capsys.readouterr().out


def test_rate_and_eta_of_a_resumed_run_leave_out_the_time_it_was_stopped(small, capsys):
    """Interrupted on Friday, resumed on Monday: the weekend is not work, for the rate nor for the ETA."""
    code, summary = relink(small, capsys, "--ranges", "4")
    run_id = summary["run_id"]
    # as if ranges 0 and 1 were done 60 hours ago, and the run stopped there
    small.conn.execute("UPDATE relinker_run SET status = 'open', started_at = started_at - interval '60 hours' "
                       "WHERE run_id = %s", (run_id,))
    small.conn.execute("UPDATE relinker_range SET claimed_at = claimed_at - interval '60 hours', "
                       "finished_at = finished_at - interval '60 hours' WHERE run_id = %s AND range_no < 2", (run_id,))
    small.conn.execute("UPDATE relinker_range SET status = 'pending', claimed_at = NULL, finished_at = NULL "
                       "WHERE run_id = %s AND range_no >= 2", (run_id,))
    # Monday: resumed, a worker at range 2
    store = checkpoint.CheckpointStore(small.dsn, run_id, worker="w:1", lease=60, retry_timeout=5,
                                       since=small.conn.execute("SELECT now()").fetchone()[0])
    try:
        r = store.claim()
        elapsed, working, eta = small.conn.execute(
            "SELECT extract(epoch FROM elapsed), extract(epoch FROM working), extract(epoch FROM eta) "
            "FROM relinker_run_progress WHERE run_id = %s", (run_id,)).fetchone()
        assert elapsed > 60 * 3600
        assert 0 < working < 60 and 0 < eta < 60  # two ranges worked in seconds: two more take about as long
        assert main(small.argv("status", str(run_id))) == 0
        assert "of it working" in capsys.readouterr().out
        assert main(small.argv("status", str(run_id), "--json")) == 0
        told = json.loads(capsys.readouterr().out)
        links = told["links_created"] + told["links_present"] + told["links_replaced"]
        assert told["working_seconds"] < 60 < told["elapsed_seconds"]
        assert told["links_per_second"] >= links / 60  # over the time it worked: not the weekend's links/s
        # A range worked for a while, then given back (Ctrl-C): its time counts, as its partial counters do.
        time.sleep(0.5)
        store.heartbeat(r, Counters(links_present=1), [])
        store.give_back(r)
    finally:
        store.close()
    working_after = small.conn.execute("SELECT extract(epoch FROM working) FROM relinker_run_progress "
                                       "WHERE run_id = %s", (run_id,)).fetchone()[0]
    assert float(working_after) >= float(working) + 0.5


def test_the_time_a_range_waits_in_its_commit_is_working_time(small, capsys):
    """Another session holding a blobs row the range writes (an operator's open transaction, NTT's
    copier) keeps the range's commit waiting: work all the same, for the rate and the ETA."""
    hello = small.blob(b"hello")
    with psycopg.connect(small.dsn) as locker:
        locker.execute("SELECT 1 FROM blobs WHERE blobid = %s FOR UPDATE", (hello,))
        release = threading.Timer(1.5, locker.rollback)
        release.start()
        try:
            code, summary = relink(small, capsys, "--workers", "1", "--ranges", "1")
        finally:
            release.join()
    assert code == 0 and summary["elapsed_seconds"] >= 1.5
    working, = small.conn.execute("SELECT extract(epoch FROM working) FROM relinker_run_progress "
                                  "WHERE run_id = %s", (summary["run_id"],)).fetchone()
    assert float(working) >= 1.0  # the run began a little after the lock was taken


def test_missing_root_is_a_preflight_error(small, capsys, tmp_path):
    argv = ["--db-url", small.dsn, "--by-hash-root", str(tmp_path / "nope"), "--archive-root", str(small.archive),
            "relink"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--by-hash-root" in err and "No such file" in err


@pytest.mark.parametrize("layout", ["store inside the archive", "archive inside the store", "one directory"])
def test_roots_that_overlap_are_a_preflight_error(small, capsys, tmp_path, layout):
    """With the store under the archive root, a catalogued path could name a by-hash file and replace it."""
    store, archive = {
        "store inside the archive": (small.archive / "by-hash", small.archive),
        "archive inside the store": (small.by_hash, small.by_hash / "archive"),
        "one directory": (small.archive, small.archive / "." / "sub" / ".."),
    }[layout]
    os.makedirs(store, exist_ok=True)
    os.makedirs(archive, exist_ok=True)
    assert main(["--db-url", small.dsn, "--by-hash-root", str(store), "--archive-root", str(archive), "relink"]) == 2
    err = capsys.readouterr().err
    assert "overlap: the store and the archive must be separate trees" in err and err.count("\n") == 1
    assert small.conn.execute("SELECT count(*) FROM relinker_run").fetchone() == (0,)


def test_roots_on_different_filesystems_are_a_preflight_error(small, capsys, tmp_path):
    if os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second filesystem")
    import tempfile
    with tempfile.TemporaryDirectory(dir="/dev/shm") as other:
        argv = ["--db-url", small.dsn, "--by-hash-root", other, "--archive-root", str(small.archive), "relink"]
        assert main(argv) == 2
    assert "different filesystems" in capsys.readouterr().err
    assert small.conn.execute("SELECT count(*) FROM relinker_run").fetchone() == (0,)


@pytest.fixture
def bind_mounted_roots(small, tmp_path):
    """The store and the archive as two bind mounts of one filesystem (a container's two volumes)."""
    mounts = []
    for name, root in (("store-volume", small.by_hash), ("archive-volume", small.archive)):
        target = tmp_path / name
        target.mkdir()
        if subprocess.run(["mount", "--bind", str(root), str(target)], capture_output=True).returncode != 0:
            pytest.skip("bind mounts need privileges this machine does not give")
        mounts.append(target)
    yield mounts
    for target in mounts:
        subprocess.run(["umount", str(target)], capture_output=True)


@pytest.mark.parametrize("mode", ["relink", "copy"])
def test_two_mounts_of_one_filesystem_are_a_preflight_error(small, capsys, bind_mounted_roots, mode):
    """Same st_dev, yet link() between two mounts fails for every path: one probe link says so at once."""
    relink(small, capsys)  # a store with files, linked the ordinary way
    store, archive = bind_mounted_roots
    assert os.stat(store).st_dev == os.stat(archive).st_dev
    argv = ["--db-url", small.dsn, "--by-hash-root", str(store), "--archive-root", str(archive), mode, "--new"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "cannot link from" in err and "bind mounts" in err and "Traceback" not in err
    assert os.listdir(archive) == os.listdir(small.archive)  # the probe left nothing behind


def test_a_mode_that_writes_the_store_probes_with_its_own_file_and_lists_nothing(small, monkeypatch):
    """copy links a probe file of its own: a store of 65,536 mostly empty ab/cd/ is never listed."""
    from relinker import preflight
    from relinker.config import Settings

    def listing(by_hash_root):
        raise AssertionError("the store was listed")

    monkeypatch.setattr(preflight, "_a_stored_file", listing)
    settings = Settings(db_url=small.dsn, by_hash_root=small.by_hash_root, archive_root=small.archive_root)
    before = sorted(os.listdir(small.by_hash)), sorted(os.listdir(small.archive))
    assert preflight.check_roots(settings, frozenset({"archive", "by-hash"})) == (small.by_hash_root, small.archive_root)
    assert (sorted(os.listdir(small.by_hash)), sorted(os.listdir(small.archive))) == before  # the probe is gone
    with pytest.raises(AssertionError, match="listed"):
        preflight.check_roots(settings, frozenset({"archive"}))  # relink looks for a stored file to link


def test_modes_that_write_nothing_accept_read_only_roots(small, tmp_path):
    """verify, count and any --dry-run read the archive and the store: they need no write access."""
    from relinker import preflight
    from relinker.config import Settings
    from support import obeying_file_permissions

    settings = Settings(db_url=small.dsn, by_hash_root=small.by_hash_root, archive_root=small.archive_root)
    os.chmod(small.archive, 0o555)
    os.chmod(small.by_hash, 0o555)
    try:
        with obeying_file_permissions():
            assert preflight.check_roots(settings) == (small.by_hash_root, small.archive_root)
            with pytest.raises(UserError, match="--archive-root .* is not writable"):
                preflight.check_roots(settings, frozenset({"archive"}))
            with pytest.raises(UserError, match="--by-hash-root .* is not writable"):
                preflight.check_roots(settings, frozenset({"by-hash"}))
            # ... but they must read them: refused in one line, not workers dying at their start.
            os.chmod(small.archive, 0)
            with pytest.raises(UserError, match="--archive-root .* is not readable"):
                preflight.check_roots(settings)
    finally:
        os.chmod(small.archive, 0o755)
        os.chmod(small.by_hash, 0o755)


def test_an_unreadable_store_directory_is_no_reason_to_refuse_the_roots(small):
    """The link probe looks for a stored file: an ab/cd/ it cannot list is passed over, not a link failure."""
    from relinker import preflight
    from relinker.config import Settings
    from support import obeying_file_permissions

    settings = Settings(db_url=small.dsn, by_hash_root=small.by_hash_root, archive_root=small.archive_root)
    level2s = sorted(os.path.dirname(by_hash_path(small.by_hash_root, blobid)) for blobid in small.expected())
    os.chmod(level2s[0], 0)
    try:
        with obeying_file_permissions():
            assert preflight.check_roots(settings, frozenset({"archive"})) == (small.by_hash_root, small.archive_root)
    finally:
        os.chmod(level2s[0], 0o755)


def test_unknown_run_is_a_usage_error(small, capsys):
    assert main(small.argv("relink", "--run", "12345")) == 2
    assert "unknown run 12345" in capsys.readouterr().err


def test_unmigrated_catalogue_is_a_preflight_error(db_url, tmp_path, capsys):
    from test_migrate import PRODUCTION_SHAPE
    import psycopg
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(PRODUCTION_SHAPE)
    (tmp_path / "b").mkdir()
    (tmp_path / "a").mkdir()
    assert main(["--db-url", db_url, "--by-hash-root", str(tmp_path / "b"), "--archive-root",
                 str(tmp_path / "a"), "relink"]) == 2
    assert "run `relinker migrate`" in capsys.readouterr().err


def test_progress_bar_counts_paths(small, capsys):
    from relinker import jobs, relink as relink_mode
    from relinker.config import Settings

    settings = Settings(small.dsn, small.by_hash_root, small.archive_root)
    request = jobs.JobRequest(settings=settings, options={}, workers=1, progress=True)
    summary, code = jobs.run_job(relink_mode.MODE_SPEC, request)
    assert code == 0
    bar = capsys.readouterr().err
    assert "100%" in bar and "5.00/5.00" in bar and "path/s" in bar
    # What the bar reads of the whole run (other hosts' share) agrees with the summary.
    assert jobs._run_so_far(small.dsn, summary.run_id) == (summary.ranges_total, 5, 0)


def test_counts_bar_and_rate_count_the_paths_it_finds_missing(small, capsys):
    """count is run where links were lost: a path not linked is counted missing (no problem of its own),
    and its bar and rate count it as looked at all the same."""
    from relinker import count as count_mode, jobs
    from relinker.config import Settings

    settings = Settings(small.dsn, small.by_hash_root, small.archive_root)
    request = jobs.JobRequest(settings=settings, options={}, workers=1, progress=True)
    summary, code = jobs.run_job(count_mode.MODE_SPEC, request)
    assert code == 0 and (summary.counters.links_present, summary.counters.links_missing) == (0, 5)
    bar = capsys.readouterr().err
    assert "100%" in bar and "5.00/5.00" in bar
    assert jobs._run_so_far(small.dsn, summary.run_id, missing_apart=True) == (summary.ranges_total, 5, 0)
    assert re.search(r"elapsed .*\([\d,]+ paths/s\)", summary.as_text())
    assert summary.paths_this_session == 5


def reopen_with_a_range_left(world):
    """As if another host's range had been given back before this coordinator's last range was done:
    the run is open, range 0 pending."""
    world.conn.execute("UPDATE relinker_range SET status = 'pending' WHERE range_no = 0")
    world.conn.execute("UPDATE relinker_run SET status = 'open', finished_at = NULL")


def relink_stopped_at(world, monkeypatch, step: str):
    """An in-process relink with its bar shown, a Ctrl-C arriving as ``jobs.<step>`` is called, with a
    range of the run left to do (another host's, given back): what it raised (RunStopped, if the run ends
    resumable). A run the catalogue has complete by then is complete (see
    test_a_signal_as_a_run_ends_says_complete_if_the_catalogue_has_it_so)."""
    from relinker import jobs, relink as relink_mode
    from relinker.config import Settings
    from relinker.errors import RunStopped, StopSignal

    def ctrl_c(*args):
        reopen_with_a_range_left(world)
        raise StopSignal()

    monkeypatch.setattr(jobs, step, ctrl_c)
    request = jobs.JobRequest(settings=Settings(world.dsn, world.by_hash_root, world.archive_root), options={},
                              workers=1, progress=True)
    with pytest.raises(RunStopped) as stopped:
        jobs.run_job(relink_mode.MODE_SPEC, request)
    return stopped.value


def test_a_signal_during_the_bars_last_look_at_the_run_still_gives_the_resume_command(small, monkeypatch):
    """The bar reads the run's figures once more as the pool ends (another host's last ranges): a
    Ctrl-C then (a database slow to answer) ends the run as one during the figures does."""
    stopped = relink_stopped_at(small, monkeypatch, "_run_so_far")
    assert stopped.exit_code == 3 and "resume it with `relinker relink --run 1" in str(stopped)


def test_a_signal_as_the_pool_ends_still_gives_the_resume_command_after_the_bars_last_line(small, capsys,
                                                                                           monkeypatch):
    """The pool's own signal handlers are gone, the closing figures' not yet in place: a Ctrl-C in
    between ends the run resumable, its bar closed before the message (never after it)."""
    stopped = relink_stopped_at(small, monkeypatch, "_close_run")
    assert stopped.exit_code == 3 and "resume it with `relinker relink --run 1" in str(stopped)
    assert capsys.readouterr().err.endswith("\n")  # the bar's last line is written and ended


class _RangeContextStandIn:
    """What RelinkWork.process needs of the pool's RangeContext; ``fail_on_problem`` makes a problem raise."""

    def __init__(self, fail_on_problem: bool = False):
        self.counters = Counters()
        self.problems = []
        self.fail_on_problem = fail_on_problem

    def problem(self, kind, detail, *, blobid=None, path=None):
        if self.fail_on_problem:
            raise RuntimeError(f"unexpected: {kind}")
        self.problems.append(kind)

    def tick(self):
        pass


def test_a_range_that_fails_midway_leaves_the_connection_usable(world):
    """An unexpected error while a range's query streams must not wedge the worker's next range.

    The retry machinery keeps the failed attempt's traceback (so the stream
    stays referenced), as ``failure`` does here; an unclosed stream would keep
    the connection's lock and the next range would wait for it forever.
    """
    medium = world.medium("disk-1")
    for n in range(3):
        world.inode(medium, [b"/mnt/ntt/%s/f%d" % (medium.encode(), n)], world.blob(b"content %d" % n))
    world.inode(medium, [b"/mnt/ntt/%s/gone" % medium.encode()], world.blob(b"never stored", store=False))
    spec = WorkSpec(work=RelinkWork, dsn=world.dsn, by_hash_root=world.by_hash_root,
                    archive_root=world.archive_root, options={})
    work = RelinkWork(spec)
    whole = Range(run_id=None, range_no=0, lo="", hi=None)
    second = None
    try:
        with pytest.raises(RuntimeError) as failure:
            work.process(whole, _RangeContextStandIn(fail_on_problem=True))
        ctx = _RangeContextStandIn()
        second = threading.Thread(target=work.process, args=(whole, ctx), daemon=True)
        second.start()
        second.join(timeout=30)
        assert not second.is_alive(), "the second range is stuck behind the first one's query"
        assert ctx.counters.links_created + ctx.counters.links_present == 3 and ctx.problems == ["missing-by-hash"]
        assert str(failure.value) == "unexpected: missing-by-hash"  # failed mid-stream, for the intended reason
    finally:
        if second is None or not second.is_alive():
            work.close()


def test_range_queries_run_without_parallel_workers_jit_or_memoize(catalogue_url):
    """Range queries are many, short and never reused: nothing that only pays off for long ones."""
    with db.connect_for_ranges(catalogue_url) as conn:
        settings = dict(conn.execute(
            "SELECT name, setting FROM pg_settings "
            "WHERE name IN ('max_parallel_workers_per_gather', 'jit', 'enable_memoize')").fetchall())
    assert settings == {"max_parallel_workers_per_gather": "0", "jit": "off", "enable_memoize": "off"}


def test_the_range_query_reads_paths_from_the_covering_index_alone(world):
    """Each inode's linked paths come from relinker_path_links_idx by an index-only scan: no heap fetch of `path`."""
    for n in range(3):
        medium = world.medium(f"m{n}")
        for i in range(50):
            world.inode(medium, [b"/m%d/f%d" % (n, i), b"/m%d/g%d" % (n, i)], world.blob(b"%d-%d" % (n, i)))
    world.conn.execute("VACUUM ANALYZE path")
    with db.connect_for_ranges(world.dsn) as conn:
        conn.execute("SET enable_seqscan = off")  # tables this small would be read whole
        query = RangeScope(listed=False, bounded=True, params={}).work_query(only_incomplete=False)
        plan = [row[0].strip() for row in conn.execute(
            sql.SQL("EXPLAIN (ANALYZE, COSTS OFF) {}").format(query), {"lo": "0", "hi": "f"})]
        ours = {name for (name,) in conn.execute(
            "SELECT c.relname FROM pg_inherits h JOIN pg_class c ON c.oid = h.inhrelid "
            "WHERE h.inhparent = 'relinker_path_links_idx'::regclass")}
    path_scans = [(line, plan[n + 2]) for n, line in enumerate(plan) if " on path_" in line]
    assert len(path_scans) == 3, "\n".join(plan)  # one per partition
    for scan, heap_fetches in path_scans:
        assert scan.split(" on ")[0].removeprefix("->  ").split(" using ")[0] == "Index Only Scan", scan
        assert scan.split(" using ")[1].split()[0] in ours, scan
        assert heap_fetches == "Heap Fetches: 0", heap_fetches


def test_counts_to_write_lists_only_the_blobs_whose_counts_change():
    recorded = [("same", 2, 2), ("fewer", 1, 2), ("never", None, None), ("gone", 3, 3), ("empty", 0, 0),
                ("orphan", 1, 2), ("uncounted", None, None)]
    linked = {"same": 2, "fewer": 2, "never": 1}
    expected = {"same": 2, "fewer": 2, "never": 1}
    # a blob of the range with no path found has 0 of 0 ...
    assert counts_to_write(recorded, linked, expected, only_incomplete=False) == [
        ("fewer", 2, 2), ("never", 1, 1), ("gone", 0, 0), ("orphan", 0, 0), ("uncounted", 0, 0)]
    # ... under --only-incomplete only if it was incomplete: a complete one was not looked at
    assert counts_to_write(recorded, linked, expected, only_incomplete=True) == [
        ("fewer", 2, 2), ("never", 1, 1), ("orphan", 0, 0), ("uncounted", 0, 0)]


class _DataConnectionDropsOnce(RelinkWork):
    """The range's first attempt flushes its problems with a heartbeat, then loses its data connection for real;
    with ``redo_heartbeats`` the redo's problems go by a heartbeat too (a range longer than a quarter lease)."""

    attempts = 0
    redo_heartbeats = False

    def process(self, r, ctx):
        finalize = super().process(r, ctx)
        type(self).attempts += 1
        if type(self).attempts == 1 or self.redo_heartbeats:
            ctx._worker.store.heartbeat(r, ctx.counters, ctx.problems)
        if type(self).attempts == 1:
            conn = self.data.get()
            with psycopg.connect(self.spec.dsn, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
            conn.execute("SELECT 1")  # OperationalError: the worker redoes the range on a new connection
        return finalize


def test_a_blob_past_the_paths_a_worker_holds_is_let_go_and_left_for_later():
    """The empty content may have millions of paths: its rows stream past, none of them kept."""
    alive = collections.Counter()

    class Paths(list):  # a row's paths that know when they are let go
        def __del__(self):
            alive["paths"] -= 1

    def rows():
        for blobid, n_rows, paths in (("a", 1, [b"/one"]), ("b", 2500, [b"/one"]), ("c", 3, [b"/one"]),
                                      ("d", 4, [b"/one"]), ("e", 2500, [])):
            for _ in range(n_rows):
                alive["paths"] += 1
                alive["peak"] = max(alive["peak"], alive["paths"])
                yield blobid, Paths(paths)

    oversized, ticks = [], []
    passed = [blobid for blobid, _ in blobs_within(rows(), 6, oversized, lambda: ticks.append(True))]
    # Each row counts, with its paths: rows whose paths are all excluded too.
    assert passed == ["a", "c", "c", "c"] and oversized == ["b", "d", "e"]
    # At most: a blob's rows up to the limit (six of e's), the row that came next, the one the loop holds.
    assert alive["peak"] <= 8
    assert len(ticks) == 4  # the rows past the limit: a tick every STREAM_CHUNK of them


@pytest.mark.parametrize("redo_heartbeats", [False, True])
def test_a_range_redone_after_a_lost_connection_records_its_problems_once(world, monkeypatch, redo_heartbeats):
    """What a failed attempt's heartbeats recorded is deleted before the redo finds it again, counters with
    it: a redo's heartbeat that found the same count recorded took its problems for written."""
    monkeypatch.setattr(_DataConnectionDropsOnce, "attempts", 0)
    monkeypatch.setattr(_DataConnectionDropsOnce, "redo_heartbeats", redo_heartbeats)
    medium = world.medium("disk-1")
    for n in range(3):
        world.inode(medium, [b"/mnt/ntt/%s/gone-%d" % (medium.encode(), n)], world.blob(b"gone %d" % n, store=False))
    world.inode(medium, [b"/mnt/ntt/%s/here" % medium.encode()], world.blob(b"here"))
    run_id = checkpoint.create_run(world.conn, "relink", world.by_hash_root, world.archive_root, {},
                                   checkpoint.split_blob_space(1))
    spec = WorkSpec(work=_DataConnectionDropsOnce, dsn=world.dsn, by_hash_root=world.by_hash_root,
                    archive_root=world.archive_root, options={}, run_id=run_id,
                    since=world.conn.execute("SELECT now()").fetchone()[0], retry_timeout=30)
    worker = _Worker(spec, pipe=None, stop_flag=types.SimpleNamespace(value=0), dry_next=None)
    worker.send = lambda *message: None
    try:
        worker.run_range(worker.store.claim())
    finally:
        worker.work.close()
        worker.store.close()
    assert _DataConnectionDropsOnce.attempts == 2
    status, problems, present = world.conn.execute(
        "SELECT status, problems, links_created + links_present FROM relinker_range WHERE run_id = %s",
        (run_id,)).fetchone()
    recorded = world.conn.execute("SELECT kind, count(*) FROM relinker_problem WHERE run_id = %s GROUP BY kind",
                                  (run_id,)).fetchall()
    assert (status, problems, present) == ("done", 3, 1)
    assert recorded == [("missing-by-hash", 3)]


def test_a_role_that_may_only_read_is_refused_before_any_work(small, capsys):
    """Workers refused their first write would die and be restarted again and again: one line, exit 2."""
    from psycopg.conninfo import make_conninfo

    role = "relinker_reader_%d" % os.getpid()
    small.conn.execute(f"CREATE ROLE {role} LOGIN")
    try:
        small.conn.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}")
        small.conn.execute(f"GRANT USAGE ON SCHEMA public TO {role}")
        reader = make_conninfo(small.dsn, user=role)
        argv = ["--db-url", reader, "--by-hash-root", str(small.by_hash), "--archive-root", str(small.archive)]
        assert main([*argv, "count", "--workers", "1"]) == 2
        err = capsys.readouterr().err
        assert err == (f"relinker: error: role {role} may not INSERT relinker_run, which a count run writes "
                       f"(GRANT INSERT ON relinker_run TO {role})\n")
        # a dry run writes nothing: reading is all it needs
        assert main([*argv, "count", "--workers", "1", "--dry-run", "--json"]) == 0
        capsys.readouterr()
        # allowed its checkpoints, it still may not take their keys ...
        small.conn.execute(f"GRANT INSERT, UPDATE, DELETE ON relinker_run, relinker_range, relinker_problem TO {role}")
        assert main([*argv, "count", "--workers", "1"]) == 2
        assert capsys.readouterr().err == (
            f"relinker: error: role {role} may not use the sequence public.relinker_run_run_id_seq, which a count "
            f"run takes keys from (GRANT USAGE ON SEQUENCE public.relinker_run_run_id_seq TO {role})\n")
        # ... nor write the counts into blobs
        small.conn.execute(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}")
        assert main([*argv, "count", "--workers", "1"]) == 2
        assert capsys.readouterr().err == (
            f"relinker: error: role {role} may not UPDATE blobs (n_hardlinks, expected_hardlinks), which a count "
            f"run writes (GRANT UPDATE (n_hardlinks, expected_hardlinks) ON blobs TO {role})\n")
        # the columns a count writes are all it needs, with what it reads: the views among them
        small.conn.execute(f"GRANT UPDATE (n_hardlinks, expected_hardlinks) ON blobs TO {role}")
        small.conn.execute(f"REVOKE SELECT ON relinker_run_progress FROM {role}")
        for dry_run in ([], ["--dry-run", "--run", "1"]):
            assert main([*argv, "count", "--workers", "1", *dry_run]) == 2
            assert capsys.readouterr().err == (
                f"relinker: error: role {role} may not SELECT relinker_run_progress, which a count run reads "
                f"(GRANT SELECT ON relinker_run_progress TO {role})\n")
        # a dry run of no recorded run reads none of relinker's tables but the migrations it checks
        assert main([*argv, "count", "--workers", "1", "--dry-run", "--json"]) == 0
        capsys.readouterr()
        small.conn.execute(f"REVOKE SELECT ON relinker_schema_migration FROM {role}")
        assert main([*argv, "count", "--workers", "1", "--dry-run", "--json"]) == 2
        assert capsys.readouterr().err == (
            f"relinker: error: role {role} may not SELECT relinker_schema_migration, which every command reads "
            f"(GRANT SELECT ON relinker_schema_migration TO {role})\n")
        small.conn.execute(f"GRANT SELECT ON relinker_schema_migration TO {role}")
        small.conn.execute(f"GRANT SELECT ON relinker_run_progress TO {role}")
        assert main([*argv, "count", "--workers", "1", "--json"]) == 0
        capsys.readouterr()
        # every privilege, in a database it may only read (as a standby's): resuming is refused too
        small.conn.execute(f"ALTER ROLE {role} SET default_transaction_read_only = on")
        assert main([*argv, "count", "--workers", "1", "--run", "1"]) == 2
        assert capsys.readouterr().err == (f"relinker: error: the catalogue database is read-only for role {role} "
                                           "(a standby, or default_transaction_read_only): a run writes its "
                                           "checkpoints\n")
    finally:
        small.conn.execute(f"DROP OWNED BY {role}")
        small.conn.execute(f"DROP ROLE {role}")


#: What README's "The role that runs" says every run writes of its checkpoints, one privilege at a time,
#: and the GRANT each refusal names.
CHECKPOINT_GRANTS = [
    ("INSERT ON relinker_run", "GRANT INSERT ON relinker_run"),
    ("UPDATE ON relinker_run", "GRANT UPDATE ON relinker_run"),
    ("INSERT ON relinker_range", "GRANT INSERT ON relinker_range"),
    ("UPDATE ON relinker_range", "GRANT UPDATE ON relinker_range"),
    ("INSERT ON relinker_problem", "GRANT INSERT ON relinker_problem"),
    ("DELETE ON relinker_problem", "GRANT DELETE ON relinker_problem"),
    ("USAGE ON SEQUENCE relinker_run_run_id_seq", "GRANT USAGE ON SEQUENCE public.relinker_run_run_id_seq"),
    ("USAGE ON SEQUENCE relinker_problem_problem_id_seq",
     "GRANT USAGE ON SEQUENCE public.relinker_problem_problem_id_seq"),
]


@pytest.mark.parametrize("withheld, grant", CHECKPOINT_GRANTS, ids=[w for w, _ in CHECKPOINT_GRANTS])
def test_a_role_missing_any_one_checkpoint_grant_is_refused_before_any_work(small, capsys, withheld, grant):
    """Each is a statement every run makes (a claim clears the range's problems, a problem takes a key):
    a role without one is told the GRANT at the start, not left with workers dying at their first claim."""
    from psycopg.conninfo import make_conninfo

    role = "relinker_short_%d" % os.getpid()
    small.conn.execute(f"CREATE ROLE {role} LOGIN")
    try:
        small.conn.execute(f"GRANT USAGE ON SCHEMA public TO {role}")
        for statement in RELINK_GRANTS.format(role=role).strip().split(";"):
            small.conn.execute(statement)
        small.conn.execute(f"REVOKE {withheld} FROM {role}")
        argv = ["--db-url", make_conninfo(small.dsn, user=role), "--by-hash-root", str(small.by_hash),
                "--archive-root", str(small.archive)]
        assert main([*argv, "count", "--workers", "1", "--no-progress"]) == 2
        assert f"({grant} TO {role})" in capsys.readouterr().err
        assert small.conn.execute("SELECT count(*) FROM relinker_run").fetchone()[0] == 0
    finally:
        small.conn.execute(f"DROP OWNED BY {role}")
        small.conn.execute(f"DROP ROLE {role}")


def test_a_connection_limit_below_what_the_workers_need_ends_the_run_not_hangs_it(small, capsys):
    """Each worker needs two sessions: with fewer allowed, the refused ones are retried for --retry-timeout
    from their first refusal (a session that works is no end of that outage), then that worker gives its
    range back and gives up; it never hangs the run, nor fails its ranges."""
    from psycopg.conninfo import make_conninfo

    role = "relinker_limited_%d" % os.getpid()
    small.conn.execute(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 2")
    try:
        small.conn.execute(f"GRANT USAGE ON SCHEMA public TO {role}")
        small.conn.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}")
        small.conn.execute(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}")
        argv = ["--db-url", make_conninfo(small.dsn, user=role), "--by-hash-root", str(small.by_hash),
                "--archive-root", str(small.archive)]
        started = time.monotonic()
        code = main([*argv, "relink", "--json", "--no-progress", "--workers", "2", "--ranges", "4",
                     "--retry-timeout", "2"])
        took = time.monotonic() - started
        out, err = capsys.readouterr()
        assert took < 60, took
        summary = json.loads(out)
        # A worker that gave up frees its session: the other may then finish the run. Either way no
        # range is failed for the database's trouble, and a stop says how to resume.
        assert summary["ranges_failed"] == 0, summary
        if code != 0:
            assert code == 1 and " resume with: relinker relink --run 1 " in err.strip().splitlines()[-1], err
            assert main([*argv, "relink", "--json", "--no-progress", "--workers", "1", "--run", "1"]) == 0
            capsys.readouterr()
        small.assert_complete(1)
    finally:
        small.conn.execute(f"DROP OWNED BY {role}")
        small.conn.execute(f"DROP ROLE {role}")


def test_a_dry_run_of_a_named_run_shows_what_resuming_it_would_do(world, capsys):
    """--run N --dry-run: that run's options and its ranges not done, never a fresh plan of everything."""
    m = world.medium("disk")
    for i in range(20):
        world.inode(m, [b"/a/%d" % i], world.blob(b"content %d" % i))
    code, summary = relink(world, capsys, "--limit", "3")
    assert code == 0 and summary["blobs"] == 3
    linked = sorted(os.listdir(world.archive_path(b"/a")))
    assert len(linked) == 3
    os.unlink(world.archive_path(b"/a/" + linked[0]))
    code, summary = relink(world, capsys, "--run", str(summary["run_id"]), "--dry-run")
    assert summary["dry_run"] and summary["ranges_total"] == 0 and summary["blobs"] == 0  # all done
    world.conn.execute("UPDATE relinker_range SET status = 'pending'")
    code, summary = relink(world, capsys, "--run", "1", "--dry-run")
    assert summary["blobs"] == 3 and summary["links_created"] == 1 and summary["options"]["limit"] == 3
    assert main(world.argv("relink", "--run", "1", "--dry-run", "--no-progress")) == 0
    text = capsys.readouterr().out
    assert re.search(r"options +limit 3, on-conflict replace\n", text), text
    assert re.search(r"ranges +\d+\n", text), text
    # as for a real resume: an unknown run, or another mode's, is a usage error
    assert main(world.argv("relink", "--run", "999", "--dry-run", "--no-progress")) == 2
    assert "unknown run 999" in capsys.readouterr().err
    assert main(world.argv("count", "--run", "1", "--dry-run", "--no-progress")) == 2
    assert "run 1 is a relink run, not a count run" in capsys.readouterr().err


def test_an_interrupted_dry_run_offers_no_resume(world, capsys, monkeypatch):
    """A dry run keeps nothing: 'resume with --run None' would be a command that cannot work."""
    from relinker import jobs
    from relinker.report import Summary

    monkeypatch.setattr(jobs, "run_job", lambda mode, request: (
        Summary(mode="relink", dry_run=True, interrupted=True), 3))
    assert main(world.argv("relink", "--dry-run", "--no-progress")) == 3
    assert capsys.readouterr().err == "relinker: interrupted (a dry run keeps nothing to resume)\n"


def test_workers_that_gave_up_on_the_database_leave_the_resume_command(world, capsys, monkeypatch):
    """Only the workers were refused (too many connections), or the outage ended just before the summary:
    the run ends exit 1, saying why and how to resume."""
    m = world.medium("disk")
    for i in range(10):
        world.inode(m, [b"/a/%d" % i], world.blob(b"content %d" % i))

    def refused(self, conn):
        raise psycopg.errors.TooManyConnections("sorry, too many clients already")

    monkeypatch.setattr(checkpoint.CheckpointStore, "_claim_once", refused)  # the forked workers inherit it
    code = main(world.argv("relink", "--json", "--no-progress", "--workers", "2", "--retry-timeout", "1"))
    out, err = capsys.readouterr()
    assert code == 1 and json.loads(out)["ranges_done"] == 0
    assert err.count("no new worker is started") == 1
    assert err.strip().splitlines()[-1] == ("relinker: the catalogue database stayed out of reach for more than "
                                            f"--retry-timeout (1 s); resume with: {world.resume('relink', 1)}")


@pytest.mark.parametrize("forks_allowed", [0, 1])
def test_a_worker_that_cannot_be_forked_is_a_warning_or_a_resumable_stop(world, capsys, monkeypatch,
                                                                        forks_allowed):
    """fork() refused (the process limit): the run goes on with the workers it has, or, with none,
    ends exit 1 saying why and how to resume; never a traceback."""
    m = world.medium("disk")
    for i in range(10):
        world.inode(m, [b"/a/%d" % i], world.blob(b"content %d" % i))
    real_fork, forks = os.fork, []

    def fork():
        if len(forks) >= forks_allowed:
            raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        forks.append(1)
        return real_fork()

    monkeypatch.setattr(os, "fork", fork)
    code = main(world.argv("relink", "--json", "--no-progress", "--workers", "2", "--ranges", "4"))
    out, err = capsys.readouterr()
    assert "cannot start a worker process: Resource temporarily unavailable" in err and "Traceback" not in err
    if forks_allowed:
        assert code == 0 and json.loads(out)["complete"]
        world.assert_complete()
    else:
        assert code == 1 and json.loads(out)["ranges_done"] == 0
        assert err.strip().splitlines()[-1] == ("relinker: no worker process could be started (Resource "
                                                f"temporarily unavailable); resume with: {world.resume('relink', 1)}")


def counts_of(world) -> dict:
    return {b: (n, e) for b, n, e in world.conn.execute("SELECT blobid, n_hardlinks, expected_hardlinks FROM blobs")}


def test_only_incomplete_settles_an_incomplete_blob_no_inode_names_any_more(world, capsys):
    """--only-incomplete looks for the paths of incomplete blobs; one it finds none for has 0 of 0, as a full
    relink says, or it stays incomplete (and first in every --limit) for good."""
    m = world.medium("disk")
    a = world.blob(b"content a")
    ino = world.inode(m, [b"/d/a1", b"/d/a2"], a)
    assert relink(world, capsys)[0] == 0 and counts_of(world)[a] == (2, 2)
    os.unlink(world.archive_path(b"/d/a2"))
    main(world.argv("count", "--json", "--workers", "1"))
    capsys.readouterr()
    assert counts_of(world)[a] == (1, 2)
    b = world.blob(b"content b")  # the inode stored again, as another content
    world.conn.execute("UPDATE inode SET blobid = %s WHERE ino = %s", (b, ino))
    # and blob rows nothing names, never counted, that sort before every other
    orphans = ["0" * 62 + "%02d" % i for i in range(3)]
    for orphan in orphans:
        world.conn.execute("INSERT INTO blobs (blobid) VALUES (%s)", (orphan,))
    code, summary = relink(world, capsys, "--only-incomplete", "--limit", "3")
    assert code == 0 and [counts_of(world)[o] for o in orphans] == [(0, 0)] * 3
    code, summary = relink(world, capsys, "--only-incomplete", "--new")
    assert code == 0 and counts_of(world)[a] == (0, 0) and counts_of(world)[b] == (2, 2)


def test_a_blob_a_copy_stores_an_inode_of_meanwhile_is_not_set_to_nothing(world, capsys, monkeypatch):
    """The range's query found no inode for the blob, a copy committed one just after: 0 of 0 would say
    'complete, nothing to link', and no --only-incomplete would look at it again."""
    from relinker import relink as relink_module

    m, m2 = world.medium("disk"), world.medium("disk-2")
    a = world.blob(b"content a")
    world.inode(m, [b"/d/a1", b"/d/a2"], a)
    assert relink(world, capsys)[0] == 0 and counts_of(world)[a] == (2, 2)
    world.conn.execute("DELETE FROM path WHERE ino IN (SELECT ino FROM inode WHERE blobid = %s)", (a,))
    world.conn.execute("DELETE FROM inode WHERE blobid = %s", (a,))  # no inode names a now: 0 of 0 is right
    world.conn.execute("UPDATE blobs SET n_hardlinks = 2, expected_hardlinks = 3 WHERE blobid = %s", (a,))
    real_count_outcomes = relink_module._count_outcomes
    dsn = world.dsn

    def a_copy_commits_meanwhile(*args, **kwargs):  # after the range's query, before its counts are written
        real_count_outcomes(*args, **kwargs)
        with psycopg.connect(dsn, autocommit=True) as copy:  # in the worker: a connection of its own
            if copy.execute("SELECT count(*) FROM inode WHERE ino = 99999").fetchone() == (0,):
                copy.execute("INSERT INTO inode (medium_hash, dev, ino, nlink, size, fs_type, blobid, copied) "
                             "VALUES (%s, 1, 99999, 1, 9, 'f', %s, true)", (m2, a))
                copy.execute("INSERT INTO path (medium_hash, dev, ino, path) VALUES (%s, 1, 99999, '/e/a3')", (m2,))

    monkeypatch.setattr(relink_module, "_count_outcomes", a_copy_commits_meanwhile)
    assert relink(world, capsys, "--only-incomplete", "--workers", "1")[0] == 0
    assert world.conn.execute("SELECT count(*) FROM inode WHERE ino = 99999").fetchone() == (1,)
    assert counts_of(world)[a] == (2, 3)  # left as it was: the next run looks at it
    monkeypatch.setattr(relink_module, "_count_outcomes", real_count_outcomes)
    assert relink(world, capsys, "--only-incomplete", "--new")[0] == 0
    assert counts_of(world)[a] == (1, 1)


def test_a_copy_still_committing_when_relink_zeroes_a_blob_keeps_its_counts(world, capsys, monkeypatch):
    """The copy holds the blob's row (as copy's SQL_LOCK_BLOBS does) with its inode not yet committed:
    relink waits for the row, then looks again, and finds the inode."""
    import threading

    from relinker import relink as relink_module

    m, m2 = world.medium("disk"), world.medium("disk-2")
    a = world.blob(b"content a")
    world.inode(m, [b"/d/a1", b"/d/a2"], a)
    assert relink(world, capsys)[0] == 0 and counts_of(world)[a] == (2, 2)
    world.conn.execute("DELETE FROM path WHERE ino IN (SELECT ino FROM inode WHERE blobid = %s)", (a,))
    world.conn.execute("DELETE FROM inode WHERE blobid = %s", (a,))
    world.conn.execute("UPDATE blobs SET n_hardlinks = 2, expected_hardlinks = 3 WHERE blobid = %s", (a,))
    real_count_outcomes = relink_module._count_outcomes
    dsn = world.dsn

    def a_copy_is_finishing(*args, **kwargs):  # in the worker, before its range's counts are written
        real_count_outcomes(*args, **kwargs)
        copy = psycopg.connect(dsn)
        copy.execute("SELECT blobid FROM blobs WHERE blobid = %s FOR UPDATE", (a,))
        copy.execute("INSERT INTO inode (medium_hash, dev, ino, nlink, size, fs_type, blobid, copied) "
                     "VALUES (%s, 1, 99999, 1, 9, 'f', %s, true)", (m2, a))
        copy.execute("INSERT INTO path (medium_hash, dev, ino, path) VALUES (%s, 1, 99999, '/e/a3')", (m2,))
        copy.execute("UPDATE blobs SET n_hardlinks = 1, expected_hardlinks = 1 WHERE blobid = %s", (a,))

        def commit_later():
            time.sleep(2)
            copy.commit()
            copy.close()

        threading.Thread(target=commit_later).start()

    monkeypatch.setattr(relink_module, "_count_outcomes", a_copy_is_finishing)
    assert relink(world, capsys, "--only-incomplete", "--workers", "1")[0] == 0
    assert world.conn.execute("SELECT count(*) FROM inode WHERE ino = 99999").fetchone() == (1,)
    assert counts_of(world)[a] == (1, 1)  # the copy's; 0 of 0 would hide its inode from --only-incomplete


@pytest.mark.parametrize("command", [["relink"], ["count"], ["verify", "--all", "--hash"]])
def test_a_symlink_in_the_stores_directories_is_never_gone_through(world, capsys, tmp_path, command):
    """``ab -> elsewhere``: the file found there is not the store's; its blob is a problem, never linked."""
    m = world.medium("disk")
    foreign, fine = world.blob(b"foreign", store=False), world.blob(b"fine content")
    assert foreign[:2] != fine[:2]
    world.inode(m, [b"/d/foreign"], foreign)
    world.inode(m, [b"/d/fine"], fine)
    outside = tmp_path / "outside"
    os.makedirs(outside / foreign[2:4])
    (outside / foreign[2:4] / foreign).write_bytes(b"foreign")
    os.symlink(outside, world.by_hash_root + b"/" + foreign[:2].encode())
    main(world.argv("relink", "--workers", "1", "--no-progress"))  # fine's link, for count and verify
    capsys.readouterr()
    code = main(world.argv(*command, "--json", "--workers", "2", "--no-progress"))
    summary = json.loads(capsys.readouterr().out)
    assert code == 1 and summary["problems_by_kind"] == {"bad-by-hash": 1}, summary
    assert not os.path.lexists(world.archive_path(b"/d/foreign")) and world.linked(fine, b"/d/fine")
    assert os.stat(outside / foreign[2:4] / foreign).st_nlink == 1


@pytest.mark.parametrize("last_range_done", [True, False])
def test_a_signal_as_a_run_ends_says_complete_if_the_catalogue_has_it_so(small, capsys, monkeypatch,
                                                                          last_range_done):
    """Ctrl-C just after the pool's end, before the closing figures: the catalogue decides. A run whose
    every range is done is complete (exit 0), not "interrupted; resume with" a run with nothing left."""
    from relinker import jobs
    from relinker.errors import StopSignal

    real_close = jobs.ProgressBar.close

    def signal_at_the_last_look(bar, look=True):
        if look:
            if not last_range_done:
                reopen_with_a_range_left(small)
            raise StopSignal()
        real_close(bar, look=look)

    monkeypatch.setattr(jobs.ProgressBar, "close", signal_at_the_last_look)
    code = main(small.argv("relink", "--json", "--workers", "1", "--no-progress"))
    out, err = capsys.readouterr()
    if last_range_done:
        assert code == 0 and json.loads(out)["complete"], err
    else:
        assert code == 3 and "interrupted as run 1 ended; resume it with `relinker relink --run 1" in err


@pytest.mark.parametrize("output", ["a reader gone", "a full disk", "a full disk for stderr too",
                                    "stderr closed"])
@pytest.mark.parametrize("command", [["relink", "--no-progress", "--new", "--json"], ["status"], ["migrate"],
                                     ["relink", "--run", "99999"]])
def test_output_that_cannot_be_written_changes_no_exit_code(small, capsys, command, output):
    """``relinker status | head -1``, ``> full-disk 2>&1``, ``2>&-``: no traceback, and the exit code
    is the command's (a script resuming on exit 3 must see 3)."""
    import sys

    from processes import NEUTRAL_DIRECTORY

    relink(small, capsys)  # a run for status to show
    reader, writer = os.pipe()
    os.close(reader)  # every write to the pipe fails with EPIPE
    streams = {"a reader gone": dict(stdout=writer, stderr=subprocess.PIPE),
               "a full disk": dict(stdout=open("/dev/full", "wb"), stderr=subprocess.PIPE),
               "a full disk for stderr too": dict(stdout=open("/dev/full", "wb"), stderr=subprocess.STDOUT),
               "stderr closed": dict(stdout=subprocess.PIPE, preexec_fn=lambda: os.close(2))}[output]
    try:
        # Buffered as in a shell (this machine may set PYTHONUNBUFFERED): a line left in stderr's buffer
        # must not fail the flush at exit (exit 120).
        env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
        done = subprocess.run([sys.executable, "-m", "relinker", *small.argv(*command)], cwd=NEUTRAL_DIRECTORY,
                              timeout=120, env=env, **streams)
    finally:
        os.close(writer)
        if streams["stdout"] not in (writer, subprocess.PIPE):
            streams["stdout"].close()
    err = (done.stderr or b"").decode()
    expected = 2 if "99999" in command else 0  # an unknown run: a usage error, whatever the output
    assert done.returncode == expected and "Traceback" not in err and "Exception ignored" not in err, err
    if output == "stderr closed" and "--json" in command:
        json.loads(done.stdout)  # nothing meant for stderr went into it


def test_a_run_that_must_not_overlap_one_at_work_is_refused_before_any_work(small, capsys):
    """relink and count both write n_hardlinks: while a count run is at work (its workers' sessions
    hold count's lock), relink is refused in one line, nothing planned; verify, which only reads the
    counts, is not."""
    with psycopg.connect(small.dsn, autocommit=True) as count_worker:
        checkpoint.hold_mode(count_worker, "count", frozenset())
        assert main(small.argv("relink", "--no-progress")) == 2
        assert capsys.readouterr().err == (
            f"relinker: error: a count run is at work on this catalogue (database session "
            f"{count_worker.info.backend_pid}): a relink run must not overlap it (run one after the other; "
            "a session stuck in a stopped process holds it until it ends)\n")
        assert small.conn.execute("SELECT count(*) FROM relinker_run").fetchone() == (0,)
        assert main(small.argv("verify", "--all", "--no-progress")) == 1  # links missing: found, not refused
        capsys.readouterr()
    from processes import wait_for

    wait_for(lambda: not checkpoint.modes_at_work(small.conn), what="the count session gone")  # its backend exits
    assert relink(small, capsys)[0] == 0


def test_a_run_begun_meanwhile_that_must_not_overlap_stops_the_workers(small, capsys, monkeypatch):
    """A count run that began between relink's planning and its workers' start: the workers stop before
    any range, and the run ends resumable (exit 1); resumed once count has ended, it completes."""
    from relinker import jobs

    real_pool = jobs.run_pool
    count_worker = psycopg.connect(small.dsn, autocommit=True)

    def count_begins_meanwhile(*args, **kwargs):
        checkpoint.hold_mode(count_worker, "count", frozenset())
        return real_pool(*args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(jobs, "run_pool", count_begins_meanwhile)
        code = main(small.argv("relink", "--json", "--no-progress", "--workers", "2"))
    out, err = capsys.readouterr()
    assert code == 1 and json.loads(out)["ranges_done"] == 0
    assert err.strip().splitlines()[-1] == (
        "relinker: a copy, count, scan or verify run began meanwhile, which a relink run must not overlap (the log "
        f"names it): once it has ended; resume with: {small.resume('relink', 1)}")
    count_worker.close()
    from processes import wait_for

    wait_for(lambda: not checkpoint.modes_at_work(small.conn), what="the count session gone")  # its backend exits
    code, summary = relink(small, capsys, "--run", "1")
    assert code == 0 and summary["complete"]
    small.assert_complete(1)


def test_two_coordinators_starting_at_once_plan_one_run(world, capsys, monkeypatch):
    """The second to choose waits while the first plans, then resumes the first's run: never two runs."""
    from processes import wait_for

    world.bulk(200)
    real_create = checkpoint.create_run
    second = {}

    def plan_while_another_starts(*args, **kwargs):
        second["job"] = start(world.argv("relink", "--json", "--no-progress", "--workers", "1"))
        # the planning gate is polled for: the second's session tries it again and again
        wait_for(lambda: world.conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'relinker' "
            "AND query LIKE '%pg_try_advisory_xact_lock%' AND state = 'idle in transaction'"
        ).fetchone()[0] == 1, timeout=60, what="the second coordinator waiting for the first's planning")
        return real_create(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "create_run", plan_while_another_starts)
    code = main(world.argv("relink", "--json", "--no-progress", "--workers", "1"))
    other_code, out, err = finish(second["job"])
    assert code == 0 and other_code == 0, err
    assert json.loads(out)["run_id"] == 1 and "resuming run 1" in err
    assert world.conn.execute("SELECT count(*) FROM relinker_run").fetchone() == (1,)
    world.assert_complete(1)


def test_a_dry_run_replaces_no_stale_file(world, capsys):
    """A dry run says what it would replace, and replaces nothing."""
    m = world.medium("disk")
    blob = world.blob(b"content")
    world.inode(m, [b"/d/a", b"/d/b"], blob)
    assert relink(world, capsys)[0] == 0
    world.replace_with_stale_copy(b"/d/a")
    before = world.tree()
    code, summary = relink(world, capsys, "--dry-run")
    assert summary["links_replaced"] == 1 and summary["links_present"] == 1
    assert world.tree() == before  # the stale file is still there, nothing written


def test_a_range_that_fails_fails_once_and_the_next_run_retries_it(world):
    """A range failing for good is failed once (last_error kept), the run goes on, and the next run retries it."""
    m = world.medium("disk")
    blobs = [world.blob(b"content %d" % n) for n in range(40)]
    for n, b in enumerate(blobs):
        world.inode(m, [b"/d/%d" % n], b)
    world.conn.execute(f"""
        CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN IF NEW.blobid = '{blobs[0]}' THEN RAISE EXCEPTION 'boom'; END IF; RETURN NEW; END $$;
        CREATE TRIGGER boom BEFORE UPDATE ON blobs FOR EACH ROW EXECUTE FUNCTION boom();""")
    argv = world.argv("relink", "--no-progress", "--json", "--workers", "2", "--ranges", "4")
    code, out, err = finish(start(argv), timeout=60)  # a failed range claimed again and again never ends
    assert code == 1, err
    summary = json.loads(out)
    assert summary["ranges_failed"] == 1 and summary["ranges_done"] == 3, summary
    assert world.conn.execute("SELECT count(*) FROM relinker_range WHERE status = 'failed' "
                              "AND last_error LIKE '%boom%'").fetchone() == (1,)
    world.conn.execute("DROP TRIGGER boom ON blobs")
    code, out, err = finish(start(argv), timeout=60)
    assert code == 0, err
    world.assert_complete(summary["run_id"])


def test_resuming_a_run_by_its_id_waits_for_no_other_coordinators_planning(small, capsys):
    """Only choosing a run waits while another coordinator plans (a copy's plan can take minutes)."""
    code, summary = relink(small, capsys)
    planner = psycopg.connect(small.dsn)
    planner.execute("SELECT pg_advisory_xact_lock(%s)", (checkpoint._mode_key(checkpoint._PLANNING_GATE),))
    try:
        resumed = []
        resume = threading.Thread(target=lambda: resumed.append(
            main(small.argv("relink", "--json", "--no-progress", "--run", str(summary["run_id"])))))
        resume.start()
        resume.join(timeout=30)
        assert not resume.is_alive() and resumed == [0]
    finally:
        planner.rollback()
        planner.close()
        resume.join()
    capsys.readouterr()


def test_a_run_resumed_by_its_id_keeps_its_roots_while_they_are_there(small, capsys, tmp_path):
    """`--run N` with other roots (an environment pointing elsewhere) would record that run complete
    over another archive: refused while the run's roots are there; once they have moved, the roots
    given now are the run's."""
    run_id = relink(small, capsys)[1]["run_id"]
    small.conn.execute("UPDATE relinker_range SET status = 'pending', worker = NULL WHERE run_id = %s", (run_id,))
    small.conn.execute("UPDATE relinker_run SET status = 'open' WHERE run_id = %s", (run_id,))
    other = tmp_path / "other-archive"
    other.mkdir()
    argv = ["--db-url", small.dsn, "--by-hash-root", str(small.by_hash), "--archive-root", str(other)]
    assert main([*argv, "relink", "--no-progress", "--run", str(run_id)]) == 2
    err = capsys.readouterr().err
    assert err == (f"relinker: error: run {run_id} was planned for the roots {small.by_hash} and {small.archive}, "
                   f"which are there, not {small.by_hash} and {other}: resume it with --by-hash-root "
                   f"{small.by_hash} --archive-root {small.archive}\n")
    assert os.listdir(other) == []
    moved = tmp_path / "archive-moved"
    os.rename(small.archive, moved)
    os.mkdir(small.archive)  # an empty directory where it was (a mount point left behind) is no root of it
    argv[-1] = str(moved)
    assert main([*argv, "relink", "--json", "--no-progress", "--run", str(run_id)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["complete"] and f"run {run_id} was planned with roots" in err


def test_a_worker_the_server_has_no_second_session_for_holds_no_range(world):
    """A connection limit that serves one worker's two sessions and the second worker's control session
    only: that worker never claims a range it could not work (it would hold it
    until its lease ran out, the run stalled meanwhile). The other does the run; no range waits for a lease."""
    world.bulk(3000, paths_per_blob=2)
    with world.as_role(f"limited_{os.getpid()}", connection_limit=3):
        started = time.monotonic()
        code, out, err = finish(start(world.argv("relink", "--no-progress", "--json", "--workers", "2", "--ranges",
                                                 "40", "--lease", "60", "--retry-timeout", "60")), timeout=120)
        took = time.monotonic() - started
    assert code == 0, err[-2000:]
    assert json.loads(out)["links_created"] == 6000
    assert took < 30, (took, err[-2000:])
    world.assert_complete(1)


def test_a_worker_waiting_for_a_second_session_holds_none(world):
    """One slot: the worker gets one session and is refused the other. Holding it while it waits, workers
    each holding one would wait on each other for --retry-timeout (the run done long before): it holds
    none between its tries."""
    import signal

    from processes import wait_for

    world.bulk(50, paths_per_blob=2)
    with world.as_role(f"one_slot_{os.getpid()}", connection_limit=1) as role:
        job = start(world.argv("relink", "--no-progress", "--workers", "1", "--retry-timeout", "60"))
        try:
            wait_for(lambda: world.conn.execute("SELECT count(*) FROM relinker_run").fetchone()[0] == 1,
                     what="the run planned")
            held = []
            for _ in range(160):  # 8 s of its tries
                time.sleep(0.05)
                held.append(world.conn.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = %s",
                                               (role,)).fetchone()[0])
        finally:
            job.send_signal(signal.SIGINT)
            code, _out, err = finish(job, timeout=120)
    assert 0 in held[len(held) // 4:], held  # past its first tries, some moments with no session at all
    assert code == 3, err[-2000:]


def test_ctrl_c_stops_a_worker_waiting_for_its_control_session(world):
    """One connection slot: the worker has its data session and waits for its control session. Ctrl-C
    stops it at once (exit 3), not after --retry-timeout."""
    import signal

    from processes import wait_for

    world.bulk(50, paths_per_blob=2)
    with world.as_role(f"one_slot_{os.getpid()}", connection_limit=1) as role:
        job = start(world.argv("relink", "--no-progress", "--workers", "1", "--retry-timeout", "60"))
        wait_for(lambda: world.conn.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = %s",
                                            (role,)).fetchone()[0] == 1 and
                 world.conn.execute("SELECT count(*) FROM relinker_run").fetchone()[0] == 1,
                 what="the worker's one session")
        time.sleep(1)  # into its retries
        job.send_signal(signal.SIGINT)
        stopped = time.monotonic()
        code, _out, err = finish(job, timeout=120)
        took = time.monotonic() - stopped
    assert code == 3, err[-2000:]
    assert took < 15, took


def test_three_media_sharing_one_path_count_it_once(world, capsys, worker_route):
    """A path two media share counts once: three inodes of one blob, each two sharing a path the third
    lacks, whatever order the server sends them in ([/x,/y], [/y,/z], [/z,/x]: three paths)."""
    hello = world.blob(b"hello")
    for name, paths in (("m1", [b"/x", b"/y"]), ("m2", [b"/y", b"/z"]), ("m3", [b"/z", b"/x"])):
        world.inode(world.medium(name), paths, hello)
    code, summary = relink(world, capsys, "--workers", "1", "--no-progress")
    assert code == 0 and summary["links_created"] == 3, summary
    world.assert_complete()
    assert world.n_hardlinks()[hello] == 3
    code, summary = relink(world, capsys, "--workers", "1", "--no-progress", "--dry-run", "--new")
    assert code == 0 and (summary["links_created"], summary["links_present"]) == (0, 3), summary
