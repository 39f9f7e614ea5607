"""`relinker scan`: a real tree with hardlinks, symlinks, odd names and unreadable entries."""

import os

import psycopg
import pytest

from relinker import migrations, scan
from relinker.cli import main
from support import obeying_file_permissions


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "disk"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_bytes(b"hello")
    os.link(root / "a.txt", root / "sub" / "b.txt")
    (root / "sub" / "c.txt").write_bytes(b"other")
    (root / "link").symlink_to("a.txt")
    (root / "dirlink").symlink_to("sub")
    broot = os.fsencode(root)
    with open(broot + b"/caf\xe9", "wb") as f:
        f.write(b"latin-1 name")
    with open(broot + b"/Icon\r", "wb"):
        pass
    return broot


def rows(conn, medium_hash):
    paths = dict(conn.execute("SELECT path, ino FROM path WHERE medium_hash = %s", (medium_hash,)).fetchall())
    inodes = {ino: (fs_type, nlink, size) for ino, fs_type, nlink, size in conn.execute(
        "SELECT ino, fs_type, nlink, size FROM inode WHERE medium_hash = %s", (medium_hash,))}
    return paths, inodes


def test_scan_catalogues_a_real_tree(conn, catalogue_url, tree, capsys):
    os.utime(tree + b"/a.txt", (1_000_000_000, 1_234_567_890))  # a modification time long before its change time
    assert main(["--db-url", catalogue_url, "scan", "--medium", "disk-1", os.fsdecode(tree)]) == 0
    medium_hash = scan.medium_hash_for("disk-1")
    assert f"({medium_hash}): 9 paths" in capsys.readouterr().out
    paths, inodes = rows(conn, medium_hash)
    assert set(paths) == {tree + p for p in (b"", b"/sub", b"/a.txt", b"/sub/b.txt", b"/sub/c.txt", b"/link",
                                             b"/dirlink", b"/caf\xe9", b"/Icon\r")}
    # hardlinks: two paths, one inode row with nlink 2
    assert paths[tree + b"/a.txt"] == paths[tree + b"/sub/b.txt"]
    assert inodes[paths[tree + b"/a.txt"]] == ("f", 2, 5)
    assert conn.execute("SELECT dev, mtime FROM inode WHERE medium_hash = %s AND ino = %s",
                        (medium_hash, paths[tree + b"/a.txt"])).fetchone() == (os.stat(tree).st_dev, 1_234_567_890)
    assert inodes[paths[tree + b"/link"]][0] == "l"
    assert inodes[paths[tree + b"/dirlink"]][0] == "l"  # not followed
    assert inodes[paths[tree + b"/sub"]][0] == "d"
    assert len(inodes) == 8
    assert conn.execute("SELECT count(*) FROM inode WHERE blobid IS NOT NULL OR by_hash_created").fetchone() == (0,)
    # production shape: the medium got its own partitions
    assert conn.execute("SELECT count(*) FROM pg_inherits WHERE inhparent = 'path'::regclass").fetchone() == (1,)


def test_rescan_replaces_the_medium_rows(conn, tree):
    scan.scan_tree(conn, "disk-1", tree)
    os.unlink(tree + b"/sub/c.txt")
    result = scan.scan_tree(conn, "disk-1", tree)
    paths, inodes = rows(conn, result.medium_hash)
    assert tree + b"/sub/c.txt" not in paths and len(paths) == result.paths == 8
    assert len(inodes) == result.inodes == 7
    assert scan.scan_tree(conn, "disk-2", tree).medium_hash != result.medium_hash
    assert conn.execute("SELECT count(*) FROM medium").fetchone() == (2,)


def test_unreadable_entries_are_counted_and_skipped(conn, tree):
    os.mkdir(tree + b"/secret")
    open(tree + b"/secret/inside", "wb").close()
    with open(tree + b"/locked.txt", "wb") as f:
        f.write(b"x")
    os.chmod(tree + b"/secret", 0)
    os.chmod(tree + b"/locked.txt", 0)
    try:
        with obeying_file_permissions():
            result = scan.scan_tree(conn, "disk-1", tree)
    finally:
        os.chmod(tree + b"/secret", 0o755)
    assert result.unreadable == 2
    paths, _ = rows(conn, result.medium_hash)
    assert tree + b"/locked.txt" not in paths and tree + b"/secret/inside" not in paths
    assert tree + b"/secret" in paths  # the directory itself is known, its listing is not


def test_scan_missing_directory_is_a_clear_error(catalogue_url, tmp_path, capsys):
    assert main(["--db-url", catalogue_url, "scan", "--medium", "x", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "cannot scan" in err and "No such file" in err and "Traceback" not in err


def test_scan_into_old_text_catalogue_skips_unstorable_names(db_url, tree):
    from test_migrate import OLD_SHAPE
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(OLD_SHAPE)
        migrations.migrate(conn)  # scan records its tree's root in relinker's own table
        result = scan.scan_tree(conn, "disk-1", tree)
        assert result.unrepresentable == 1
        stored = {p for (p,) in conn.execute("SELECT path FROM path WHERE medium_hash = %s", (result.medium_hash,))}
        assert os.fsdecode(tree) + "/Icon\r" in stored


def test_a_directory_gone_while_the_tree_is_walked_is_said_so_not_called_unreadable(
        catalogue_url, tree, monkeypatch, capsys):
    import shutil

    real_open = scan.open_beneath

    def remove_then_open(dir_fd, below):
        if below == b"sub":
            shutil.rmtree(tree + b"/sub")  # listed a moment ago, gone now
        return real_open(dir_fd, below)

    monkeypatch.setattr(scan, "open_beneath", remove_then_open)
    assert main(["--db-url", catalogue_url, "scan", "--medium", "disk", os.fsdecode(tree)]) == 1
    out = capsys.readouterr().out
    assert "skipped: 0 unreadable, 0 on other filesystems, 0 not storable as text, 1 gone or replaced while the " \
           "tree was walked" in out


def test_a_scan_whose_session_the_server_ends_mid_walk_says_so_in_one_line(catalogue_url, tree, monkeypatch, capsys):
    """No psycopg cleanup warning ("error ignored terminating <psycopg.Copy [BAD] at 0x...>") before
    relinker's own line; nothing of the scan is kept."""
    for n in range(3000):  # enough rows after the end that the COPY sends some, and fails inside its block
        open(tree + b"/sub/f%d" % n, "wb").close()
    real_walk = scan._walk

    def ended_midway(*args):
        for n, entry in enumerate(real_walk(*args)):
            if n == 3:
                with psycopg.connect(catalogue_url, autocommit=True) as admin:
                    admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                  "WHERE query LIKE 'COPY pg_temp.relinker_scan_paths%'")
            yield entry

    monkeypatch.setattr(scan, "_walk", ended_midway)
    assert main(["--db-url", catalogue_url, "scan", "--medium", "disk", os.fsdecode(tree)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("relinker: database error: ") and err.count("\n") == 1, err
    with psycopg.connect(catalogue_url) as conn:
        assert conn.execute("SELECT count(*) FROM path").fetchone() == (0,)


def test_excluded_names_are_left_out_and_not_entered(conn, tree):
    os.makedirs(tree + b"/sub/__pycache__/deep")
    open(tree + b"/sub/__pycache__/deep/x.pyc", "wb").close()
    result = scan.scan_tree(conn, "disk-1", tree, [b"__pycache__", b"*.txt"])
    paths, _ = rows(conn, result.medium_hash)
    assert not any(b"__pycache__" in p or p.endswith(b".txt") for p in paths)
    assert result.excluded == 4  # __pycache__, a.txt, b.txt, c.txt


def test_an_exclude_pattern_with_a_slash_is_a_usage_error(catalogue_url, tree, capsys):
    """Patterns match names: one with a '/' would leave out nothing, without a word."""
    with pytest.raises(SystemExit) as usage:
        main(["--db-url", catalogue_url, "scan", "--medium", "disk", "--exclude", "*/a.txt", os.fsdecode(tree)])
    assert usage.value.code == 2 and "has a '/': it is matched against each entry's name" in capsys.readouterr().err


def test_scan_gives_the_planner_statistics_of_the_new_medium_only(conn, tree):
    """A medium copied right after its scan is planned with statistics (and no other partition is analyzed)."""
    other = scan.scan_tree(conn, "other", tree).medium_hash
    conn.execute("SELECT pg_stat_reset()")
    medium_hash = scan.scan_tree(conn, "disk-1", tree).medium_hash
    analyzed = dict(conn.execute(
        "SELECT relname, last_analyze IS NOT NULL FROM pg_stat_user_tables WHERE relname LIKE 'inode\\_%' "
        "OR relname LIKE 'path\\_%'").fetchall())
    assert analyzed == {f"inode_{medium_hash}": True, f"path_{medium_hash}": True,
                        f"inode_{other}": False, f"path_{other}": False}


def test_scan_never_gives_a_second_medium_an_existing_medium_s_name(conn, catalogue_url, tree, capsys):
    """copy --medium NAME must name one medium: a name the NTT copier gave stays its medium's alone."""
    conn.execute("INSERT INTO medium (medium_hash, medium_human) VALUES ('0123456789abcdef', 'usb-disk')")
    assert main(["--db-url", catalogue_url, "scan", "--medium", "usb-disk", os.fsdecode(tree)]) == 2
    err = capsys.readouterr().err
    assert err == ("relinker: error: 'usb-disk' names another medium already (0123456789abcdef; copy --medium "
                   "would not know which): choose another name\n")
    assert conn.execute("SELECT medium_hash FROM medium WHERE medium_human = 'usb-disk'").fetchall() == [
        ("0123456789abcdef",)]
    # nor a name that is another medium's hash
    assert main(["--db-url", catalogue_url, "scan", "--medium", "0123456789abcdef", os.fsdecode(tree)]) == 2
    assert "'0123456789abcdef' names another medium already" in capsys.readouterr().err
    assert conn.execute("SELECT count(*) FROM path").fetchone() == (0,)


def test_a_root_given_through_a_symlink_is_refused_in_one_line_that_says_so(catalogue_url, tree, tmp_path, capsys):
    link = tmp_path / "through-a-link"
    link.symlink_to(os.fsdecode(tree))
    assert main(["--db-url", catalogue_url, "scan", "--medium", "disk", str(link)]) == 2
    assert capsys.readouterr().err == (f"relinker: error: cannot scan {link}: a symlink (scan never goes through "
                                       f"one: give the directory it leads to, {os.fsdecode(tree)})\n")


def _scan_in_thread(url, tree, name, outcome, monkeypatch, pause_per_entry=0.0):
    import threading
    import time

    real_walk = scan._walk

    def slow_walk(*args):
        for entry in real_walk(*args):
            time.sleep(pause_per_entry)
            yield entry

    monkeypatch.setattr(scan, "_walk", slow_walk)
    thread = threading.Thread(target=lambda: outcome.append(
        main(["--db-url", url, "scan", "--medium", name, str(tree)])), daemon=True)
    thread.start()
    return thread


def test_a_scan_locks_no_reader_out_while_it_walks(catalogue_url, tmp_path, monkeypatch):
    """A new medium's partitions take a lock on inode and path that stops every reader: briefly, in a
    transaction of their own, never for the whole walk and load."""
    tree = tmp_path / "tree"
    (tree / "d").mkdir(parents=True)
    for i in range(10):
        (tree / "d" / f"f{i}").write_bytes(b"x")
    outcome = []
    thread = _scan_in_thread(catalogue_url, tree, "new-disk", outcome, monkeypatch, pause_per_entry=0.2)
    import time
    time.sleep(1.0)
    with psycopg.connect(catalogue_url, autocommit=True) as reader:
        reader.execute("SET lock_timeout = '1s'")
        assert reader.execute("SELECT count(*) FROM inode").fetchone()[0] >= 0  # another medium's reader
    thread.join(30)
    assert outcome == [0]


def test_a_scan_behind_a_long_transaction_gives_up_in_one_line(catalogue_url, tmp_path, monkeypatch, capsys):
    """Its partition waits no longer than migrate's statements do (a queued lock stops every reader)."""
    from relinker import migrations

    monkeypatch.setattr(migrations, "LOCK_TIMEOUT", "500ms")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_bytes(b"x")
    with psycopg.connect(catalogue_url) as long_reader:
        long_reader.execute("SELECT count(*) FROM path").fetchone()  # a report, a dump: its transaction open
        assert main(["--db-url", catalogue_url, "scan", "--medium", "another-disk", str(tree)]) == 2
        long_reader.rollback()
    err = capsys.readouterr().err
    assert err.startswith("relinker: error: creating the medium's partition of ") and err.count("\n") == 1
    assert "run `relinker scan` again once it is over" in err
    assert main(["--db-url", catalogue_url, "scan", "--medium", "another-disk", str(tree)]) == 0


def test_a_rescan_needs_no_partition_lock_where_the_medium_has_its_partitions(catalogue_url, tmp_path, monkeypatch):
    """NTT made the medium's partitions under its own names: a rescan has no DDL to do, so a long reader
    of inode is no reason to give up."""
    from relinker import migrations

    monkeypatch.setattr(migrations, "LOCK_TIMEOUT", "1s")
    tree = tmp_path / "t"
    tree.mkdir()
    (tree / "f").write_bytes(b"x")
    medium = scan.medium_hash_for("disk")
    with psycopg.connect(catalogue_url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE ntt_inode_disk PARTITION OF inode FOR VALUES IN ('{medium}')")
        conn.execute(f"CREATE TABLE ntt_path_disk PARTITION OF path FOR VALUES IN ('{medium}')")
        scan.scan_tree(conn, "disk", os.fsencode(tree))
        with psycopg.connect(catalogue_url) as reader:  # a report, a copier: its transaction open
            reader.execute("SELECT count(*) FROM inode").fetchone()
            assert scan.scan_tree(conn, "disk", os.fsencode(tree)).files == 1


def test_scan_tree_keeps_to_its_callers_transaction(catalogue_url, tmp_path):
    """A library caller's transaction is its own: scan_tree neither commits what it holds nor breaks in it."""
    from relinker.errors import UserError

    tree = tmp_path / "t"
    tree.mkdir()
    (tree / "f").write_bytes(b"x")
    with psycopg.connect(catalogue_url, autocommit=True) as conn:
        with conn.transaction():
            scan.scan_tree(conn, "disk", os.fsencode(tree))
    with psycopg.connect(catalogue_url) as conn:
        conn.execute("INSERT INTO medium (medium_hash, medium_human) VALUES ('zz', 'pending')")
        with pytest.raises(UserError):
            scan.scan_tree(conn, "disk", os.fsencode(tmp_path / "missing"))
        scan.scan_tree(conn, "other-disk", os.fsencode(tree))
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM medium WHERE medium_hash = 'zz'").fetchone() == (0,)


def test_a_rescan_locks_no_blob_row_while_it_walks(conn, catalogue_url, tree, monkeypatch):
    """The counts a rescan makes afresh are written as its last statement: a relink or copy range
    finishing meanwhile never waits for the walk (hours on a real medium)."""
    result = scan.scan_tree(conn, "disk-1", tree)
    blobid = "ab" * 32
    conn.execute("INSERT INTO blobs (blobid, n_hardlinks, expected_hardlinks) VALUES (%s, 1, 1)", (blobid,))
    conn.execute("UPDATE inode SET blobid = %s WHERE medium_hash = %s AND fs_type = 'f'",
                 (blobid, result.medium_hash))
    real_walk, seen = scan._walk, []

    def walk_and_finish_a_range(*args):
        with psycopg.connect(catalogue_url, autocommit=True) as other, other.transaction():
            seen.append(other.execute("SELECT blobid FROM blobs WHERE blobid = %s FOR UPDATE NOWAIT",
                                      (blobid,)).fetchone())
        yield from real_walk(*args)

    monkeypatch.setattr(scan, "_walk", walk_and_finish_a_range)
    scan.scan_tree(conn, "disk-1", tree)
    assert seen == [(blobid,)]
    assert conn.execute("SELECT expected_hardlinks FROM blobs WHERE blobid = %s", (blobid,)).fetchone() == (None,)


@pytest.mark.parametrize("at_work", ["relink", "copy", "count", "verify"])
def test_a_scan_and_the_runs_that_count_its_paths_never_overlap(conn, catalogue_url, tree, at_work):
    """A rescan replaces a medium's paths: a run counting or checking them meanwhile would write
    counts of what is gone. Each is refused while the other is at work."""
    from relinker import checkpoint
    from relinker.errors import UserError

    from processes import wait_for

    def nothing_at_work():  # a closed session's backend exits a moment later
        wait_for(lambda: not checkpoint.modes_at_work(conn), what="the sessions gone")

    with psycopg.connect(catalogue_url, autocommit=True) as worker:
        checkpoint.hold_mode(worker, at_work, frozenset())
        with pytest.raises(UserError, match=f"a {at_work} run is at work on this catalogue .*: a scan must not"):
            scan.scan_tree(conn, "disk-1", tree)
    # refused before anything: no partition made for the medium (its tables locked against the run's reads)
    partitions = {table: conn.execute("SELECT to_regclass(%s)", (f"{table}_{scan.medium_hash_for('disk-1')}",))
                  .fetchone()[0] for table in ("inode", "path")}
    assert partitions == {"inode": None, "path": None}
    nothing_at_work()
    with psycopg.connect(catalogue_url, autocommit=True) as scanning:
        checkpoint.hold_mode(scanning, "scan", frozenset())
        with pytest.raises(checkpoint.ModeClash, match="a scan run is at work"):
            checkpoint.hold_mode(conn, at_work, frozenset({"scan"}))
    nothing_at_work()
    scan.scan_tree(conn, "disk-1", tree)  # and nothing of either is left behind
    with psycopg.connect(catalogue_url, autocommit=True) as other:
        assert checkpoint.modes_at_work(other) == {}


def test_a_scan_in_an_autocommit_callers_transaction_keeps_its_settings(catalogue_url, tree):
    """An autocommit session inside its own transaction block: the scan's partitions are made in that
    transaction, and the caller's lock_timeout is what it was after it."""
    with psycopg.connect(catalogue_url, autocommit=True) as conn:
        with conn.transaction():
            conn.execute("SET LOCAL lock_timeout = '7s'")
            scan.scan_tree(conn, "disk-1", tree)
            assert conn.execute("SHOW lock_timeout").fetchone() == ("7s",)


def test_a_scan_failing_in_a_callers_transaction_leaves_it_usable_and_nothing_at_work(catalogue_url, tree):
    """The medium's partition cannot be made in time (a reader holds inode): the scan fails, the caller's
    transaction is still usable, and no scan is left "at work" to refuse the runs that follow."""
    from relinker import checkpoint

    with psycopg.connect(catalogue_url) as reader, psycopg.connect(catalogue_url) as conn, \
            psycopg.connect(catalogue_url, autocommit=True) as other:
        reader.execute("SELECT count(*) FROM inode")  # its lock lasts until it ends its transaction
        conn.execute("SET LOCAL lock_timeout = '200ms'")
        with pytest.raises(psycopg.errors.LockNotAvailable):
            scan.scan_tree(conn, "disk-1", tree)
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert checkpoint.modes_at_work(other) == {}
        conn.rollback()


def test_two_scans_in_one_transaction_of_the_caller(catalogue_url, tree):
    """scan_tree as a library call, twice on a connection that is not in autocommit: the second finds
    nothing of the first in its way, and the caller's transaction keeps its own settings (the modes
    gate's short lock waits are the gate's alone)."""
    with psycopg.connect(catalogue_url) as conn:  # one transaction until the end of the block
        conn.execute("SET LOCAL lock_timeout = '7s'")
        scan.scan_tree(conn, "disk-1", tree)
        scan.scan_tree(conn, "disk-1", tree)
        assert conn.execute("SHOW lock_timeout").fetchone() == ("7s",)
        conn.commit()
        assert conn.execute("SELECT count(*) FROM inode WHERE medium_hash = %s",
                            (scan.medium_hash_for("disk-1"),)).fetchone() == (8,)


def test_a_directory_swapped_for_a_symlink_while_the_tree_is_walked_is_never_walked_into(tmp_path):
    """Listed as a directory, replaced by a symlink to a directory elsewhere before it is opened: skipped,
    and nothing of the elsewhere catalogued."""
    tree, elsewhere = tmp_path / "tree", tmp_path / "elsewhere"
    (tree / "victim").mkdir(parents=True)
    (tree / "victim" / "inside").write_bytes(b"v")
    (tree / "z").mkdir()
    elsewhere.mkdir()
    (elsewhere / "secret").write_bytes(b"s")
    result = scan.ScanResult(medium_hash="m")
    root = os.fsencode(tree)
    walk = scan._walk(root, os.lstat(tree), result, [])
    seen = []
    for path, _st in walk:
        seen.append(path)
        if path == root + b"/z":  # victim was listed (and waits on the stack): swap it now
            os.rename(tree / "victim", tmp_path / "victim.old")
            os.symlink(elsewhere, tree / "victim")
    assert root + b"/victim" in seen and not any(b"secret" in path or b"inside" in path for path in seen)
    assert result.changed == 1 and result.unreadable == 0


def test_a_directory_replaced_by_another_while_the_tree_is_walked_is_never_walked_into(tmp_path):
    """Listed, then replaced by another directory (no symlink on the way: only its identity tells):
    skipped, and nothing of the other catalogued."""
    tree = tmp_path / "tree"
    (tree / "victim").mkdir(parents=True)
    (tree / "victim" / "inside").write_bytes(b"v")
    (tree / "z").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "secret").write_bytes(b"s")
    result = scan.ScanResult(medium_hash="m")
    root = os.fsencode(tree)
    seen = []
    for path, _st in scan._walk(root, os.lstat(tree), result, []):
        seen.append(path)
        if path == root + b"/z":  # victim was listed (and waits on the stack): replace it now
            os.rename(tree / "victim", tmp_path / "victim.old")
            os.rename(tmp_path / "other", tree / "victim")
    assert root + b"/victim" in seen and not any(b"secret" in path or b"inside" in path for path in seen)
    assert result.changed == 1


def test_a_root_swapped_for_a_symlink_after_it_was_looked_at_is_never_walked_into(tmp_path):
    """The root is opened by its path, which follows symlinks: only the identity its lstat saw keeps a root
    swapped for a symlink meanwhile from being walked."""
    tree, elsewhere = tmp_path / "tree", tmp_path / "elsewhere"
    tree.mkdir()
    (tree / "own").write_bytes(b"o")
    elsewhere.mkdir()
    (elsewhere / "secret").write_bytes(b"s")
    looked_at = os.lstat(tree)
    os.rename(tree, tmp_path / "tree.old")
    os.symlink(elsewhere, tree)
    result = scan.ScanResult(medium_hash="m")
    root = os.fsencode(tree)
    seen = [path for path, _st in scan._walk(root, looked_at, result, [])]
    assert seen == [root] and result.changed == 1


@pytest.fixture
def mounted_inside(tmp_path):
    """A tree with another filesystem (a tmpfs) mounted inside it."""
    import subprocess

    tree = tmp_path / "tree"
    (tree / "mnt").mkdir(parents=True)
    (tree / "own").write_bytes(b"own")
    if subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(tree / "mnt")], capture_output=True).returncode != 0:
        pytest.skip("mounting needs privileges this machine does not give")
    (tree / "mnt" / "foreign").write_bytes(b"on another filesystem")
    yield tree
    subprocess.run(["umount", str(tree / "mnt")], capture_output=True)


def test_scan_stays_on_the_trees_filesystem(conn, catalogue_url, capsys, mounted_inside):
    """Like find -xdev: a disk mounted below the tree is not the medium's, and the summary counts it."""
    code = main(["--db-url", catalogue_url, "scan", "--medium", "disk", str(mounted_inside)])
    out, err = capsys.readouterr()
    assert code == 1, err  # what a scan leaves out is told, as a problem is
    paths = {bytes(p) for (p,) in conn.execute("SELECT path FROM path")}
    assert os.fsencode(mounted_inside / "own") in paths
    assert os.fsencode(mounted_inside / "mnt" / "foreign") not in paths, sorted(paths)
    assert "1 on other filesystems" in out + err, out + err
