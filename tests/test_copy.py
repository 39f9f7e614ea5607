"""`relinker copy` (the seed's normal mode) on real trees, including a kill and a resume."""

import errno
import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time

import blake3
import psycopg
from psycopg import sql
import pytest

from relinker import copy as copy_mode, db, scan
from relinker.catalogue import EMPTY_BLAKE3, EMPTY_SHA256, InodeColumns, content_matches
from relinker.cli import main
import relinker.content
import relinker.store
from relinker.store import ByHashStore, Pending, SourceProblem, Stored
from relinker.paths import UnsafePath, by_hash_path, display, order_remaps, source_location
from processes import finish, kill_group, range_states, start, wait_for


def copy(world, capsys, *args):
    code = main(world.argv("copy", "--json", "--workers", "2", "--no-progress", *args))
    return code, json.loads(capsys.readouterr().out)


@pytest.fixture
def tree(tmp_path):
    """Duplicate contents, hardlinks, a symlink, an empty file, odd names."""
    root = tmp_path / "disk"
    (root / "docs").mkdir(parents=True)
    (root / "copies").mkdir()
    (root / "docs" / "licence.txt").write_bytes(b"MIT licence text\n" * 100)
    (root / "copies" / "LICENSE").write_bytes(b"MIT licence text\n" * 100)   # same content, other inode
    (root / "docs" / "notes.txt").write_bytes(b"notes")
    os.link(root / "docs" / "notes.txt", root / "copies" / "notes-hardlink")  # same inode
    (root / "empty").write_bytes(b"")
    (root / "link-to-notes").symlink_to("docs/notes.txt")
    with open(os.fsencode(root) + b"/caf\xe9\r", "wb") as f:
        f.write(b"odd name")
    return root


def by_hash_files(world):
    """Every file under a by-hash name (the workers' temporaries are not)."""
    found = {}
    for directory, dirs, files in os.walk(world.by_hash_root):
        if b".relinker-tmp" in dirs:
            dirs.remove(b".relinker-tmp")
        for name in files:
            path = os.path.join(directory, name)
            found[name.decode()] = path
    return found


def test_scan_then_copy_stores_each_content_once_and_links_every_path(world, capsys, tree):
    scan.scan_tree(world.conn, "disk", os.fsencode(tree))
    code, summary = copy(world, capsys)
    assert code == 0, summary
    assert summary["blobs"] == 5  # regular-file inodes: licence x2, notes, empty, odd name
    assert summary["files_copied"] == 4  # the two licence inodes share one by-hash file
    assert summary["links_created"] == 6
    stored = by_hash_files(world)
    assert len(stored) == 4
    for name, path in stored.items():
        content = open(path, "rb").read()
        assert content_matches(name, blake3.blake3(content).hexdigest(), len(content))
        assert os.stat(path).st_mode & 0o777 == 0o444
    # the empty file is named as the NTT copier named it, not by its BLAKE3
    assert EMPTY_SHA256 in stored and EMPTY_BLAKE3 not in stored
    assert world.conn.execute("SELECT count(*) FROM inode WHERE fs_type = 'f' AND NOT by_hash_created "
                              "OR (fs_type = 'f' AND blobid IS NULL)").fetchone() == (0,)
    assert world.conn.execute("SELECT count(*) FROM path WHERE blobid IS NOT NULL").fetchone() == (6,)
    world.assert_complete(summary["run_id"])
    licence = blake3.blake3(b"MIT licence text\n" * 100).hexdigest()
    assert world.n_hardlinks()[licence] == 2
    assert os.stat(by_hash_path_of(world, licence)).st_nlink == 3
    # a second copy has nothing left to do
    code, summary = copy(world, capsys, "--new")
    assert code == 0 and summary["blobs"] == 0 and summary["ranges_total"] == 0


def test_a_rescan_leaves_no_count_that_verify_fails_sound_blobs_for(world, capsys, tree):
    """A rescan takes its medium's paths from their blobs until copy stores them again, some for good
    (a file removed, one rewritten): counts to be made afresh, never a verify failure of a sound blob."""
    scan.scan_tree(world.conn, "disk", os.fsencode(tree))
    assert copy(world, capsys)[0] == 0
    verify = ("verify", "--all", "--json", "--no-progress", "--workers", "1")
    assert main(world.argv(*verify)) == 0
    capsys.readouterr()
    os.unlink(tree / "docs" / "notes.txt")
    os.unlink(tree / "copies" / "notes-hardlink")           # the notes' content is named no more
    (tree / "docs" / "licence.txt").write_bytes(b"rewritten")  # one of the licence's two paths goes
    scan.scan_tree(world.conn, "disk", os.fsencode(tree))
    for step in ("before the copy", "after it"):
        code = main(world.argv(*verify))
        result = json.loads(capsys.readouterr().out)
        assert code == 0 and result["failed"] == 0, (step, result["problem_samples"])
        if step == "before the copy":
            assert copy(world, capsys)[0] == 0
    # count makes the counts the rescan left to be made (and says which disagreed)
    assert main(world.argv("count", "--no-progress", "--json")) == 1
    capsys.readouterr()
    assert main(world.argv("count", "--no-progress", "--json", "--new")) == 0


def unfinished_copy(world, capsys, monkeypatch, *args) -> int:
    """A copy run (``args``) of two ranges whose second failed: the run's ID."""
    process = copy_mode.CopyWork.process

    def second_range_fails(self, r, ctx):
        if r.range_no == 1:
            raise RuntimeError("the second range fails")
        return process(self, r, ctx)

    monkeypatch.setattr(copy_mode.CopyWork, "process", second_range_fails)
    code, summary = copy(world, capsys, "--ranges", "2", "--workers", "1", *args)
    assert code == 1 and summary["ranges_done"] == 1 and summary["ranges_failed"] == 1
    monkeypatch.setattr(copy_mode.CopyWork, "process", process)
    return summary["run_id"]


def test_a_run_superseded_as_its_coordinator_starts_ends_without_a_resume_command(
        world, capsys, tree, monkeypatch):
    """A scan can commit between a plain copy choosing the run to resume and its workers' first claim:
    the workers find nothing to claim and end (they waited for ranges no one would ever take), and
    nothing tells the user to resume a run that --run refuses: what plans the same work is said."""
    from relinker import jobs

    medium = scan.scan_tree(world.conn, "disk", os.fsencode(tree)).medium_hash
    old_run = unfinished_copy(world, capsys, monkeypatch, "--medium", "disk", "--limit", "100")
    real_pool = jobs.run_pool

    def scan_first(*args, **kwargs):
        scan.scan_tree(world.conn, "disk", os.fsencode(tree))
        return real_pool(*args, **kwargs)

    monkeypatch.setattr(jobs, "run_pool", scan_first)
    signal.alarm(120)  # the workers used to wait for good: end the test run rather than hang it
    try:
        code = main(world.argv("copy", "--json", "--workers", "1", "--no-progress", "--medium", "disk",
                               "--limit", "100"))
    finally:
        signal.alarm(0)
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert code == 1 and summary["run_id"] == old_run and summary["status"] == "superseded", summary
    assert "resume" not in err
    assert f"run {old_run} was superseded by a scan meanwhile: `relinker copy --limit 100 --medium {medium} " in err


def test_a_copy_a_scan_stops_says_what_plans_its_work_if_the_scan_supersedes_it(world, capsys, tree, monkeypatch):
    """A scan that began as the copy's workers started stops them, and may then supersede the run: the
    message gives both ways on."""
    from relinker import checkpoint, jobs

    medium = scan.scan_tree(world.conn, "disk", os.fsencode(tree)).medium_hash
    real_pool = jobs.run_pool
    scanner = psycopg.connect(world.dsn, autocommit=True)

    def scan_begins_meanwhile(*args, **kwargs):
        checkpoint.hold_mode(scanner, "scan", frozenset())
        return real_pool(*args, **kwargs)

    monkeypatch.setattr(jobs, "run_pool", scan_begins_meanwhile)
    try:
        code = main(world.argv("copy", "--json", "--no-progress", "--medium", "disk"))
    finally:
        scanner.close()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and "once it has ended (a scan of a medium the run covers supersedes it: then " \
        f"`relinker copy --medium {medium} " in err and "; resume with: relinker copy --run 1 " in err


@pytest.mark.parametrize("asked_by", ["name", "hash"])
def test_a_run_asked_for_a_medium_one_way_is_resumed_the_other_way_too(world, capsys, tree, monkeypatch, asked_by):
    medium = scan.scan_tree(world.conn, "disk", os.fsencode(tree)).medium_hash
    run_id = unfinished_copy(world, capsys, monkeypatch, "--medium", "disk" if asked_by == "name" else medium)
    for given in ("disk", medium):
        code, summary = copy(world, capsys, "--run", str(run_id), "--medium", given, "--dry-run")
        assert code == 0 and summary["ranges_total"] == 1, given
    other_way = medium if asked_by == "name" else "disk"
    code, summary = copy(world, capsys, "--medium", other_way)  # a plain resume
    assert code == 0 and summary["run_id"] == run_id and summary["complete"]
    # a name two media carry (NTT's names are not unique) says so, not "other work"
    world.conn.execute("INSERT INTO medium (medium_hash, medium_human) VALUES ('0ther', 'disk')")
    assert main(world.argv("copy", "--run", str(run_id), "--medium", "disk")) == 2
    assert capsys.readouterr().err == "relinker: error: ambiguous medium 'disk'\n"


def test_a_rescan_supersedes_an_unfinished_copy_run_planned_over_the_former_inodes(
        world, capsys, tree, monkeypatch):
    """A copy run's ranges are the medium's inode numbers when it was planned: after a rescan (every
    inode afresh, none stored) its finished ranges would stay finished and the run end "complete"
    over unstored files. The scan supersedes it; the next copy plans what is left."""
    scan.scan_tree(world.conn, "disk", os.fsencode(tree))
    old_run = unfinished_copy(world, capsys, monkeypatch)
    assert main(world.argv("scan", "--medium", "disk", os.fsdecode(tree))) == 0
    assert f"superseded: unfinished copy run {old_run}," in capsys.readouterr().out
    code, summary = copy(world, capsys)
    assert code == 0 and summary["run_id"] != old_run, summary
    assert world.conn.execute("SELECT count(*) FROM inode WHERE fs_type = 'f' AND blobid IS NULL").fetchone() == (0,)
    world.assert_complete(summary["run_id"])
    assert main(world.argv("copy", "--run", str(old_run), "--no-progress")) == 2
    assert f"run {old_run} was superseded" in capsys.readouterr().err
    assert main(world.argv("status", str(old_run))) == 0
    status = capsys.readouterr().out
    assert "superseded by a scan" in status and "  range 1 failed" not in status  # its ranges are no one's


def test_a_superseded_run_planned_before_runs_kept_their_request_is_replanned_for_its_medium(
        world, capsys, tree, monkeypatch):
    """Runs planned before runs kept what they were asked (`requested`) have their medium's hash among
    their options: the replan command lost `--medium` and said to copy every medium."""
    scan.scan_tree(world.conn, "disk", os.fsencode(tree))
    scan.scan_tree(world.conn, "other", os.fsencode(tree))
    old_run = unfinished_copy(world, capsys, monkeypatch, "--medium", "disk")
    world.conn.execute("UPDATE relinker_run SET options = options - 'requested' WHERE run_id = %s", (old_run,))
    (medium,) = world.conn.execute("SELECT medium_hash FROM medium WHERE medium_human = 'disk'").fetchone()
    assert main(world.argv("scan", "--medium", "disk", os.fsdecode(tree))) == 0
    capsys.readouterr()
    assert main(world.argv("copy", "--run", str(old_run), "--no-progress")) == 2
    err = capsys.readouterr().err
    assert f"run {old_run} was superseded" in err and f"`relinker copy --medium {medium} " in err, err


def test_a_content_met_again_while_its_batch_syncs_is_stored_and_counted_once(world, capsys, tmp_path, monkeypatch):
    """Batches of two: inodes meet contents waiting in the batch being read and in the sealed one."""
    monkeypatch.setattr(relinker.store, "BATCH_FILES", 2)  # forked workers inherit it
    root = tmp_path / "disk"
    root.mkdir()
    contents = [b"a", b"b", b"a", b"c", b"b", b"d", b"a", b"c", b"e"]
    for n, content in enumerate(contents):
        (root / f"f{n}").write_bytes(content * 100)
    scan.scan_tree(world.conn, "disk", os.fsencode(root))
    code = main(world.argv("copy", "--json", "--workers", "1", "--no-progress"))
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["problems"] == 0, summary
    assert summary["blobs"] == len(contents) and summary["files_copied"] == len(set(contents))
    assert len(by_hash_files(world)) == len(set(contents))
    world.assert_complete(summary["run_id"])
    for content in set(contents):
        blobid = blake3.blake3(content * 100).hexdigest()
        assert world.n_hardlinks()[blobid] == contents.count(content)
        assert os.stat(by_hash_path_of(world, blobid)).st_nlink == contents.count(content) + 1


def test_a_range_commits_only_after_its_names_are_synced(world, capsys, tmp_path, monkeypatch, catalogue_url):
    """The range's statements run while its new names sync; its commit waits for that sync.

    Every sync here first waits long enough for the range's statements to
    finish, then looks at the catalogue from outside: no sync, the last
    (the names') included, may find an inode already marked stored.
    """
    seen = tmp_path / "marked-at-each-sync"
    real_syncfs = relinker.store.syncfs

    def syncfs_looking_at_the_catalogue(fd):
        time.sleep(0.3)
        with psycopg.connect(catalogue_url) as outside:
            marked = outside.execute("SELECT count(*) FROM inode WHERE by_hash_created").fetchone()[0]
        with open(seen, "a") as f:
            f.write(f"{marked}\n")
        real_syncfs(fd)

    monkeypatch.setattr(relinker.store, "syncfs", syncfs_looking_at_the_catalogue)  # forked workers inherit it
    root = tmp_path / "disk"
    root.mkdir()
    for n in range(3):
        (root / f"f{n}").write_bytes(b"content %d" % n)
    scan.scan_tree(world.conn, "disk", os.fsencode(root))
    code = main(world.argv("copy", "--json", "--workers", "1", "--no-progress"))
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["blobs"] == 3, summary
    assert seen.read_text().split() == ["0", "0"]  # the batch's data, then the names
    assert world.conn.execute("SELECT count(*) FROM inode WHERE by_hash_created").fetchone() == (3,)


def by_hash_path_of(world, blobid):
    from relinker.paths import by_hash_path
    return by_hash_path(world.by_hash_root, blobid)


def test_dry_run_reads_only_the_catalogue(world, capsys, tree, monkeypatch):
    scan.scan_tree(world.conn, "disk", os.fsencode(tree))

    def read_a_source(*args, **kwargs):
        raise AssertionError("a dry run read a source")

    # The workers are forked from this process: they inherit the patch, and a read fails their range.
    monkeypatch.setattr(copy_mode.CopyWork, "_copy", read_a_source)
    code, summary = copy(world, capsys, "--dry-run")
    assert code == 0 and summary["dry_run"] and summary["blobs"] == 5 and summary["links_created"] == 6
    assert summary["problems"] == 0
    assert by_hash_files(world) == {} and os.listdir(world.archive) == []
    assert world.conn.execute("SELECT count(*) FROM inode WHERE by_hash_created").fetchone() == (0,)
    assert world.conn.execute("SELECT count(*) FROM relinker_run").fetchone() == (0,)


def test_unreadable_and_changed_sources_are_problems(world, capsys, tree):
    scan.scan_tree(world.conn, "disk", os.fsencode(tree))
    os.unlink(tree / "empty")                                   # gone since the scan
    (tree / "docs" / "licence.txt").write_bytes(b"rewritten")   # changed since the scan
    os.unlink(os.fsencode(tree) + b"/caf\xe9\r")                # replaced by a symlink: never followed
    os.symlink("/etc/hostname", os.fsencode(tree) + b"/caf\xe9\r")
    code, summary = copy(world, capsys)
    assert code == 1
    assert summary["problems_by_kind"] == {"source-unreadable": 2, "source-changed": 1}
    assert summary["blobs"] == 2  # LICENSE and notes
    errors = dict(world.conn.execute(
        "SELECT p.path, i.errors FROM inode i JOIN path p USING (medium_hash, ino) "
        "WHERE cardinality(i.errors) > 0").fetchall())
    assert len(errors) == 3
    assert all(e[0].startswith("relinker copy: source-") for e in errors.values())
    # The line names the path as messages do (backslash escapes): intact through the array literal.
    symlinked = os.fsencode(tree) + b"/caf\xe9\r"
    [line] = errors[symlinked]
    assert line == (f"relinker copy: source-unreadable: {display(symlinked)}: "
                    "a symlink in its place or on its way (not followed)")
    assert "\\xe9\\x0d" in line
    assert world.conn.execute("SELECT count(*) FROM inode WHERE by_hash_created").fetchone() == (2,)
    # A rerun meets the same trouble: the same lines, not a second copy of each.
    assert copy(world, capsys, "--new")[0] == 1
    again = dict(world.conn.execute(
        "SELECT p.path, i.errors FROM inode i JOIN path p USING (medium_hash, ino) "
        "WHERE cardinality(i.errors) > 0").fetchall())
    assert again == errors


def test_source_prefix_reads_a_medium_mounted_elsewhere(world, capsys, tree, tmp_path):
    scan.scan_tree(world.conn, "disk", os.fsencode(tree))
    moved = tmp_path / "mounted-here-now"
    os.rename(tree, moved)
    code, summary = copy(world, capsys, "--source-prefix", f"{tree}={moved}")
    assert code == 0 and summary["blobs"] == 5
    # the archive keeps the catalogued path
    assert os.path.exists(world.archive_path(os.fsencode(tree) + b"/docs/notes.txt"))


def test_where_each_path_form_is_read_beneath_its_medium():
    """Pure path logic: the directory copy reads a catalogued path beneath, and the path below it."""
    m = "0123abcd"
    mount = b"/mnt/ntt/" + m.encode()
    assert source_location(mount + b"/p5/f", m) == (mount, b"p5/f")
    assert source_location(b"p5:" + mount + b"/p5/f", m) == (mount, b"p5/f")  # legacy prefix dropped
    assert source_location(b"p12:" + mount + b"/p12/f", m) == (mount, b"p12/f")  # a disk of many partitions
    assert source_location(b"p5:/f", m) == (mount, b"f") and source_location(b"/p5:/f", m) == (mount, b"p5:/f")
    # another medium whose hash starts with this one's is not under this mount
    assert source_location(mount + b"ff/f", m) == (mount, mount[1:] + b"ff/f")
    # The relative form is the medium's, never this machine's file of that name.
    assert source_location(b"/etc/hostname", m) == (mount, b"etc/hostname")
    assert source_location(b"/a//b/./c", m) == (mount, b"a/b/c")
    # A tree catalogued where it lies (relinker scan) is read beneath it, as it is.
    assert source_location(b"/srv/tree/d/f", m, scanned_root=b"/srv/tree") == (b"/srv/tree", b"d/f")
    # --source-prefix moves the whole medium, or one part of it (a partition mounted elsewhere)
    moved = order_remaps([(mount, b"/media/usb"), (b"/srv", b"/data"), (mount + b"/p5", b"/media/p5")])
    assert source_location(b"/etc/hostname", m, moved) == (b"/media/usb", b"etc/hostname")
    assert source_location(b"p5:" + mount + b"/p5/f", m, moved) == (b"/media/p5", b"f")
    assert source_location(b"/srv/tree/f", m, moved, scanned_root=b"/srv/tree") == (b"/data/tree", b"f")
    # Nothing may leave the medium, or reach a system call it cannot take.
    for stored, why in ((b"/../../etc/shadow", "'..'"), (mount + b"/d/../../x", "'..'"),
                        (b"/bad\0name", "NUL"), (mount, "names no file"), (b"/./", "names no file")):
        with pytest.raises(UnsafePath, match=why):
            source_location(stored, m)
    with pytest.raises(UnsafePath, match="not in the scanned tree"):
        source_location(b"/etc/passwd", m, scanned_root=b"/srv/tree")


def put(path: bytes, content: bytes) -> bytes:
    """A file of ``content`` at ``path``, its directories made; ``path``."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(content)
    return path


def catalogued(world, medium: str, stored: bytes, size: int) -> int:
    """An inode of ``medium`` not stored yet, of ``size`` bytes, with the one path ``stored``."""
    ino = world.inode(medium, [stored], None)
    world.conn.execute("UPDATE inode SET size = %s WHERE ino = %s", (size, ino))
    return ino


def test_a_relative_path_is_read_from_the_mounted_medium_not_from_this_machine(world, capsys, tmp_path):
    """``/etc/version`` of a disk is the disk's: the machine's own file of that name is never read."""
    medium = world.medium("system-disk")
    mount = tmp_path / "mounted-medium"
    here = tmp_path / "this-machine"
    # The catalogued path also exists on this machine (here, under tmp_path), with the same size.
    stored = put(os.fsencode(here / "etc" / "version"), b"12.4\n")
    put(os.fsencode(mount) + stored, b"12.5\n")
    ino = catalogued(world, medium, stored, 5)
    code, summary = copy(world, capsys, "--source-prefix", f"/mnt/ntt/{medium}={mount}")
    assert code == 0, summary
    blobid = world.conn.execute("SELECT blobid FROM inode WHERE ino = %s", (ino,)).fetchone()[0]
    assert blobid == blake3.blake3(b"12.5\n").hexdigest()


@pytest.mark.parametrize("mount_point", ["absent", "left empty"])
def test_a_relative_path_of_a_medium_not_mounted_is_never_read_from_this_machine(
        world, capsys, tmp_path, mount_point):
    """Unmounted, ``/etc/version`` of a disk is nowhere here: not stored, not given up, stored once mounted."""
    medium = world.medium("system-disk")
    mount = tmp_path / "mnt-ntt-medium"
    if mount_point == "left empty":
        mount.mkdir()  # what an umount leaves behind
    # The catalogued path names a file of this machine with the content's very size.
    stored = put(os.fsencode(tmp_path / "this-machine" / "version"), b"12.4\n")
    ino = catalogued(world, medium, stored, 5)
    code, summary = copy(world, capsys, "--source-prefix", f"/mnt/ntt/{medium}={mount}")
    assert code == 1 and summary["problems_by_kind"] == {"source-unreadable": 1}
    blobid, errors = world.conn.execute("SELECT blobid, errors FROM inode WHERE ino = %s", (ino,)).fetchone()
    assert blobid is None and by_hash_files(world) == {}
    assert errors == [f"relinker copy: source-unreadable: medium not mounted at {mount}"]
    if InodeColumns.of(world.conn).status:
        assert world.conn.execute("SELECT status FROM inode WHERE ino = %s", (ino,)).fetchone() == (
            "failed_retryable",)
    # Mounted at last: the next run reads the medium's file, never this machine's.
    put(os.fsencode(mount) + stored, b"12.5\n")
    code, summary = copy(world, capsys, "--new", "--source-prefix", f"/mnt/ntt/{medium}={mount}")
    assert code == 0, summary
    assert world.conn.execute("SELECT blobid FROM inode WHERE ino = %s", (ino,)).fetchone() == (
        blake3.blake3(b"12.5\n").hexdigest(),)


def test_a_scanned_tree_is_read_where_it_lies_and_a_moved_one_is_not_given_up(world, capsys, tmp_path):
    """relinker scan records where its tree lies; copy reads it there, and waits for it while it is away."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a").write_bytes(b"first")
    result = scan.scan_tree(world.conn, "disk", os.fsencode(tree))
    assert world.conn.execute("SELECT root FROM relinker_scanned_medium WHERE medium_hash = %s",
                              (result.medium_hash,)).fetchone() == (os.fsencode(tree),)
    moved = tmp_path / "elsewhere"
    os.rename(tree, moved)
    code, summary = copy(world, capsys)
    assert code == 1 and summary["problems_by_kind"] == {"source-unreadable": 1}
    [errors] = world.conn.execute("SELECT errors FROM inode WHERE fs_type = 'f'").fetchone()
    assert errors == [f"relinker copy: source-unreadable: scanned tree not found at {tree}"]
    code, summary = copy(world, capsys, "--new", "--source-prefix", f"{tree}={moved}")
    assert code == 0 and summary["blobs"] == 1, summary


@pytest.mark.parametrize("left_there", ["truncated", "symlink", "directory"])
def test_an_entry_under_a_by_hash_name_that_is_not_the_content_is_a_problem_and_kept(
        world, capsys, tmp_path, left_there):
    """Something else under the content's by-hash name is never linked to, never replaced."""
    source = tmp_path / "disk"
    source.mkdir()
    content = b"important data " * 1000
    (source / "f").write_bytes(content)
    entry = by_hash_path(world.by_hash_root, blake3.blake3(content).hexdigest())
    os.makedirs(os.path.dirname(entry))
    if left_there == "truncated":
        with open(entry, "wb") as f:
            f.write(content[:100])
    elif left_there == "symlink":
        (tmp_path / "elsewhere").write_bytes(content)
        os.symlink(tmp_path / "elsewhere", entry)
    else:
        os.mkdir(entry)
    before = os.lstat(entry)
    scan.scan_tree(world.conn, "disk", os.fsencode(source))
    code, summary = copy(world, capsys)
    assert code == 1 and summary["problems_by_kind"] == {"bad-by-hash": 1}
    assert os.lstat(entry).st_ino == before.st_ino and os.lstat(entry).st_size == before.st_size
    assert not os.path.lexists(world.archive_path(os.fsencode(source / "f")))
    assert world.conn.execute("SELECT count(*) FROM inode WHERE by_hash_created").fetchone() == (0,)


def test_a_path_that_cannot_be_linked_is_a_problem_and_the_count_says_so(world, capsys, tmp_path):
    """A new content with one of its paths blocked: stored, counted with the links that exist."""
    source = tmp_path / "disk"
    source.mkdir()
    content = b"shared by two names " * 100
    (source / "open").write_bytes(content)
    os.link(source / "open", source / "blocked")  # one inode, two paths
    (source / "alone").write_bytes(b"another content")
    blocked = world.archive_path(os.fsencode(source / "blocked"))
    os.makedirs(blocked + b"/keep")
    scan.scan_tree(world.conn, "disk", os.fsencode(source))
    code = main(world.argv("copy", "--json", "--workers", "2", "--no-progress"))
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert code == 1 and summary["problems_by_kind"] == {"is-a-directory": 1}, summary
    assert summary["links_missing"] == 1 and "`relinker relink --only-incomplete` makes them" in err
    blobid = blake3.blake3(content).hexdigest()
    assert world.linked(blobid, os.fsencode(source / "open")) and os.path.isdir(blocked + b"/keep")
    counts = dict(world.conn.execute("SELECT blobid, array[n_hardlinks, expected_hardlinks] FROM blobs"))
    assert counts == {blobid: [1, 2], blake3.blake3(b"another content").hexdigest(): [1, 1]}
    assert os.stat(by_hash_path_of(world, blobid)).st_nlink == 2
    # copy never visits the stored inode again; relink makes the link once the way is clear
    os.rmdir(blocked + b"/keep")
    os.rmdir(blocked)
    assert copy(world, capsys, "--new")[1]["blobs"] == 0
    code = main(world.argv("relink", "--only-incomplete", "--json", "--no-progress"))
    assert code == 0 and json.loads(capsys.readouterr().out)["links_created"] == 1
    world.assert_complete()


def test_a_path_over_the_filesystems_limits_is_no_link_missing(world, capsys, tmp_path):
    """A name longer than the archive's filesystem takes is a limit (as too-many-links): copy reports
    it, but counts no link missing and sends no one to relink for it (no relink will ever make it)."""
    medium = world.medium("disk")
    mount = tmp_path / "mounted-medium"
    put(os.fsencode(mount) + b"/short", b"content")
    ino = world.inode(medium, [b"/short", b"/" + b"n" * 300], None)
    world.conn.execute("UPDATE inode SET size = 7 WHERE ino = %s", (ino,))
    code = main(world.argv("copy", "--json", "--no-progress", "--source-prefix", f"/mnt/ntt/{medium}={mount}"))
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert code == 1 and summary["problems_by_kind"] == {"name-too-long": 1}, summary
    assert summary["links_missing"] == 0 and "relink" not in err


def blocked_and_fine(tmp_path) -> tuple:
    """A tree of two contents in different ab/ directories of the store: (its root, the first's blob ID)."""
    source = tmp_path / "disk"
    source.mkdir()
    (source / "blocked").write_bytes(b"blocked content")
    (source / "fine").write_bytes(b"fine content")
    blocked = blake3.blake3(b"blocked content").hexdigest()
    assert blocked[:2] != blake3.blake3(b"fine content").hexdigest()[:2]
    return source, blocked


@pytest.mark.parametrize("in_the_way", ["a file at ab/", "a dangling symlink at ab/cd/"])
def test_a_file_where_the_store_needs_a_directory_is_a_problem_for_its_contents_only(
        world, capsys, tmp_path, in_the_way):
    """Something else at ab/ or ab/cd/ blocks the contents below it, each a problem; the others are stored."""
    source, blocked = blocked_and_fine(tmp_path)
    level1 = world.by_hash_root + b"/" + blocked[:2].encode()
    if in_the_way == "a file at ab/":
        with open(level1, "wb") as f:
            f.write(b"left by some other tool")
    else:  # lstat of ab/cd/<hex> says "no entry": found out at the rename
        os.mkdir(level1)
        os.symlink(tmp_path / "gone", level1 + b"/" + blocked[2:4].encode())
    scan.scan_tree(world.conn, "disk", os.fsencode(source))
    code, summary = copy(world, capsys)
    assert code == 1 and summary["problems_by_kind"] == {"bad-by-hash": 1} and summary["files_copied"] == 1, summary
    if in_the_way == "a file at ab/":
        assert open(level1, "rb").read() == b"left by some other tool"
    else:
        assert os.readlink(level1 + b"/" + blocked[2:4].encode()) == os.fsencode(tmp_path / "gone")
        assert not os.path.lexists(tmp_path / "gone")
    assert summary["ranges_done"] == summary["ranges_total"]
    assert world.conn.execute("SELECT count(*) FROM inode WHERE blobid IS NOT NULL").fetchone() == (1,)


def test_trouble_with_the_store_names_the_by_hash_path_in_full(tmp_path):
    """The store's calls name paths below its root; the error a range fails with names the whole path."""
    root = tmp_path / "by-hash"
    root.mkdir()
    store = ByHashStore(os.fsencode(root))
    source = open_content(tmp_path, b"content")
    try:
        pending = store.read_in(source, None)
        assert isinstance(pending, Pending)
        os.unlink(pending.temp_name, dir_fd=store._temp_fd)  # the worker's temporary, gone
        with pytest.raises(FileNotFoundError) as raised:
            store.place_pending()
        assert raised.value.filename == pending.final
    finally:
        os.close(source)
        store.close()
    assert temporaries(root) == []


@pytest.mark.parametrize("size", [100, relinker.content.CHUNK + 1])
def test_a_temporary_that_cannot_be_kept_is_closed_and_removed(tmp_path, monkeypatch, size):
    """A failure after the content is read in (here: fixing the mode for a strict umask) leaves nothing open."""
    root = tmp_path / "by-hash"
    root.mkdir()
    source = open_content(tmp_path, b"x" * size)
    open_before = sorted(os.listdir("/proc/self/fd"))
    store = ByHashStore(os.fsencode(root))
    store._fix_mode = True  # as under umask 077

    def refuse(fd, mode):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(relinker.store.os, "fchmod", refuse)
    try:
        with pytest.raises(PermissionError):
            store.read_in(source, None)
        assert temporaries(root) == []
    finally:
        store.close()
    assert sorted(os.listdir("/proc/self/fd")) == open_before
    os.close(source)


def test_a_content_already_stored_is_never_written_again(world, capsys, tmp_path):
    """A second medium with the same contents: every by-hash file stays the very file it was."""
    for name in ("first", "second"):
        root = tmp_path / name
        for d in range(3):
            (root / f"d{d}").mkdir(parents=True)
            for f in range(40):
                (root / f"d{d}" / f"f{f}").write_bytes(b"content %d\n" % (f % 7) * (f + 1))
    scan.scan_tree(world.conn, "first", os.fsencode(tmp_path / "first"))
    code, summary = copy(world, capsys)
    assert code == 0 and summary["files_copied"] == 40  # (f % 7, f + 1) differ for every f
    before = {name: os.stat(path) for name, path in by_hash_files(world).items()}
    scan.scan_tree(world.conn, "second", os.fsencode(tmp_path / "second"))
    code, summary = copy(world, capsys, "--new")
    assert code == 0 and summary["files_copied"] == 0 and summary["blobs"] == 120
    after = {name: os.stat(path) for name, path in by_hash_files(world).items()}
    assert {n: (st.st_ino, st.st_mtime_ns) for n, st in after.items()} == {
        n: (st.st_ino, st.st_mtime_ns) for n, st in before.items()}
    assert all(after[n].st_nlink == before[n].st_nlink + 3 for n in after)  # one more link per medium path
    world.assert_complete()


def test_a_content_in_many_ranges_ends_with_the_counts_of_all_its_paths(world, capsys, tmp_path):
    """A new blob's row is written with its counts; the ranges after it add theirs.

    One content in inodes of every range (two workers), one of them with a
    second hardlinked path, and one path excluded: the blob counts every
    linked path of every inode, whichever range inserted its row.
    """
    root = tmp_path / "disk"
    root.mkdir()
    for n in range(24):
        (root / f"f{n:02d}").write_bytes(b"shared" if n % 2 else b"own %d" % n)
    os.link(root / "f01", root / "f01-again")
    (root / "f03-excluded").write_bytes(b"shared")
    scan.scan_tree(world.conn, "disk", os.fsencode(root))
    world.conn.execute("UPDATE path SET exclude_reason = 'test' WHERE path LIKE '%%excluded'")
    code, summary = copy(world, capsys, "--ranges", "6")
    assert code == 0 and summary["problems"] == 0 and summary["ranges_total"] == 6, summary
    shared = blake3.blake3(b"shared").hexdigest()
    assert world.conn.execute("SELECT n_hardlinks, expected_hardlinks FROM blobs WHERE blobid = %s",
                              (shared,)).fetchone() == (13, 13)  # 12 inodes, one with two paths
    world.assert_complete(summary["run_id"])


def test_a_stored_contents_expected_count_grows_by_the_paths_copied_without_a_recount(world, capsys, tmp_path):
    """Production's empty blob has millions of paths: each range adds its own instead of counting them all again.

    A blob is counted in full only if its expected count was never written,
    or if its file has more links than that count could hold.
    """
    popular = world.blob(b"popular content")
    world.conn.execute("UPDATE blobs SET expected_hardlinks = 70000 WHERE blobid = %s", (popular,))
    unwritten = world.blob(b"never counted")
    world.inode(world.medium("older"), [b"/older/a", b"/older/b"], unwritten)
    # Paths another tool added and linked after the blob was counted: its file has more links than the count.
    outdated = world.blob(b"counted before")
    world.conn.execute("UPDATE blobs SET expected_hardlinks = 1 WHERE blobid = %s", (outdated,))
    for path in (b"/older/c", b"/older/d"):
        world.inode(world.medium("older"), [path], outdated)
        os.makedirs(os.path.dirname(world.archive_path(path)), exist_ok=True)
        os.link(by_hash_path_of(world, outdated), world.archive_path(path))
    root = tmp_path / "disk"
    root.mkdir()
    for name in ("p1", "p2", "p3"):
        (root / name).write_bytes(b"popular content")
    os.link(root / "p1", root / "p1-again")
    (root / "n1").write_bytes(b"never counted")
    (root / "o1").write_bytes(b"counted before")
    scan.scan_tree(world.conn, "disk", os.fsencode(root))
    code, summary = copy(world, capsys)
    assert code == 0 and summary["problems"] == 0 and summary["files_copied"] == 0, summary
    counts = dict((b, (n, e)) for b, n, e in world.conn.execute(
        "SELECT blobid, n_hardlinks, expected_hardlinks FROM blobs"))
    assert counts[popular] == (4, 70004)  # its four new paths are its only links
    assert counts[unwritten] == (1, 3)  # counted: the older medium's two paths and the new one
    assert counts[outdated] == (3, 3)  # counted again: 1 + 1 would undercount its three links


def test_an_inode_stored_meanwhile_is_neither_marked_again_nor_counted(world):
    """Another tool stored one of the range's inodes while it was worked: its row and its paths are left alone."""
    medium = world.medium("disk")
    blob = world.blob(b"content")
    ours = world.inode(medium, [b"/disk/ours"], None)
    theirs = world.inode(medium, [b"/disk/theirs", b"/disk/theirs-again"], None)
    world.conn.execute("UPDATE inode SET blobid = 'stored-by-someone-else' WHERE ino = %s", (theirs,))
    stored = Stored(blob, b"/by-hash/x", True, 7, (0, 0))
    marked = copy_mode.StoredInodes()
    marked.add(ours, stored, 1, linked=1)
    marked.add(theirs, stored, 2, linked=2)
    statements = copy_mode.CopyStatements.for_catalogue(InodeColumns.of(world.conn), retry_permanent=False)
    newly_marked = {ino for ino, in world.conn.execute(statements.mark_inodes, dict(
        medium=medium, ino_lo=min(ours, theirs), ino_hi=max(ours, theirs) + 1,
        inos=db.int_array(marked.inos), inode_blobids=db.text_array(marked.blobids)))}
    assert newly_marked == {ours}
    assert marked.paths_per_blob() == {blob: 3}
    assert marked.paths_per_blob(newly_marked) == {blob: 1}
    assert dict(world.conn.execute("SELECT ino, blobid FROM inode WHERE medium_hash = %s", (medium,))) == {
        ours: blob, theirs: "stored-by-someone-else"}


def test_a_ranges_statements_read_only_its_own_slice_of_the_medium(world):
    """The range query and the marking find inodes and paths by the range's inode numbers.

    Without the range on each table, PostgreSQL read every inode and every
    path of the medium for each range, however few inodes the range held.
    """
    medium = world.medium("big")
    world.conn.execute("INSERT INTO inode (medium_hash, ino, size, fs_type) "
                       "SELECT %s, n, 1, 'f' FROM generate_series(1, 20000) AS n", (medium,))
    world.conn.execute("INSERT INTO path (medium_hash, ino, path) "
                       "SELECT %s, n, ('/big/d' || n / 100 || '/f' || n)::bytea FROM generate_series(1, 20000) AS n",
                       (medium,))
    world.conn.execute("VACUUM ANALYZE inode, path")
    statements = copy_mode.CopyStatements.for_catalogue(InodeColumns.of(world.conn), retry_permanent=False)
    inos = list(range(5001, 7001))
    params = {"medium": medium, "ino_lo": inos[0], "ino_hi": inos[-1] + 1, "inos": db.int_array(inos),
              "inode_blobids": db.text_array(["ab" * 32] * len(inos))}

    def plan(statement) -> list[str]:
        with db.connect_for_ranges(world.dsn) as conn, conn.transaction(force_rollback=True):
            return [row[0] for row in conn.execute(sql.SQL("EXPLAIN (ANALYZE, COSTS OFF) {}").format(statement),
                                                   params)]

    reading = plan(statements.range_select)
    [path_scan] = [line for line in reading if " on path_" in line]
    assert float(re.search(r"rows=([\d.]+)", path_scan).group(1)) == 2000, "\n".join(reading)  # not 20,000
    for lines in (reading, plan(statements.mark_inodes)):
        assert not any("Seq Scan" in line for line in lines), "\n".join(lines)


def store_one(store, fd, size=None, on_chunk=None):
    """One file through the store, as a range does: read in, placed with its batch, synced."""
    got = store.read_in(fd, size, on_chunk)
    if isinstance(got, Pending):
        got = store.place_pending()[got.blobid]
        if isinstance(got, Exception):
            raise got
    store.start_sync().wait()
    return got


def test_a_blob_row_being_inserted_holds_other_workers_until_it_commits(catalogue_url):
    """Why a range locks only the blob rows it did not insert before it reads link counts.

    The worker that inserts a blob row holds it until it commits; another
    worker with the same content waits in its own insert, then finds the row
    there and locks it: the last commit still carries the latest count.
    """
    blobids = db.text_array(["ab" * 32])
    new_rows = {"count_blobids": blobids, "links": db.int_array([1]), "expected": db.int_array([1])}
    with psycopg.connect(catalogue_url) as first, psycopg.connect(catalogue_url) as second:
        assert first.execute(copy_mode.SQL_NEW_BLOBS, new_rows).fetchall() == [("ab" * 32,)]
        inserted_by_second = []
        waiting = threading.Thread(target=lambda: inserted_by_second.extend(
            second.execute(copy_mode.SQL_NEW_BLOBS, new_rows).fetchall()))
        waiting.start()
        waiting.join(0.5)
        assert waiting.is_alive()
        first.commit()
        waiting.join(10)
        assert not waiting.is_alive() and inserted_by_second == []
        locked = second.execute(copy_mode.SQL_LOCK_BLOBS, {"lock_blobids": blobids}).fetchall()
        assert locked == [("ab" * 32,)]


class SlowSync:
    """A syncfs that waits for ``release`` before it syncs, and says when it started."""

    def __init__(self, monkeypatch, error: OSError | None = None):
        self.started, self.release = threading.Event(), threading.Event()
        self.error = error
        self.real = relinker.store.syncfs
        monkeypatch.setattr(relinker.store, "syncfs", self)

    def __call__(self, fd):
        self.started.set()
        assert self.release.wait(10)
        if self.error is not None:
            raise self.error
        self.real(fd)


def stored_names(root):
    """By-hash names under ``root`` (temporaries excluded)."""
    return sorted(n for d, _, files in os.walk(root) for n in files if b".relinker-tmp" not in os.fsencode(d))


def temporaries(root):
    return [n for d, _, files in os.walk(root) for n in files if b".relinker-tmp" in os.fsencode(d)]


def open_content(tmp_path, content: bytes) -> int:
    path = tmp_path / f"source-{blake3.blake3(content).hexdigest()[:8]}"
    path.write_bytes(content)
    return os.open(path, os.O_RDONLY)


@pytest.fixture
def slow_store(tmp_path, monkeypatch):
    """A store in tmp_path/by-hash whose syncs wait for their release: (root, SlowSync, ByHashStore)."""
    root = tmp_path / "by-hash"
    root.mkdir()
    slow = SlowSync(monkeypatch)
    store = ByHashStore(os.fsencode(root))
    try:
        yield root, slow, store
    finally:
        store.close()


def test_names_are_made_only_for_synced_data_and_duplicates_are_never_synced(tmp_path, monkeypatch):
    """The order that makes a power loss harmless: data synced, then named, then synced again."""
    root = tmp_path / "by-hash"
    root.mkdir()
    events = []
    real_syncfs = relinker.store.syncfs

    def recording_syncfs(fd):
        events.append(("sync", stored_names(root)))
        real_syncfs(fd)

    monkeypatch.setattr(relinker.store, "syncfs", recording_syncfs)
    store = ByHashStore(os.fsencode(root))
    sources = []
    for n, content in enumerate([b"one", b"two", b"one", b"three"]):
        (tmp_path / f"s{n}").write_bytes(content)
        sources.append(os.open(tmp_path / f"s{n}", os.O_RDONLY))
    try:
        got = [store.read_in(fd, None) for fd in sources[:3]]
        assert isinstance(got[0], Pending) and got[2] is got[0]  # the same content, once in the batch
        assert stored_names(root) == [] and events == []  # nothing named, nothing synced yet
        placed = store.place_pending()
        assert events == [("sync", [])]  # the data was synced before any name existed
        assert sorted(s.written for s in placed.values()) == [True, True] and len(stored_names(root)) == 2
        store.start_sync().wait()
        assert events[-1] == ("sync", stored_names(root))
        # a content whose name exists is dropped without a sync
        os.lseek(sources[0], 0, os.SEEK_SET)
        again = store.read_in(sources[0], None)
        assert isinstance(again, Stored) and not again.written
        assert store.place_pending() == {} and len(events) == 2
        assert isinstance(store.read_in(sources[3], None), Pending)
    finally:
        for fd in sources:
            os.close(fd)
        store.close()
    assert len(stored_names(root)) == 2  # closing dropped the waiting temporary: nothing named for it


def test_the_store_works_relative_to_its_root_whatever_the_working_directory_and_umask(tmp_path, monkeypatch):
    """Its calls name files relative to its root's descriptor, and its directories are rwxr-xr-x."""
    root = tmp_path / "by-hash"
    root.mkdir()
    source = open_content(tmp_path, b"content")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    umask = os.umask(0o077)
    try:
        store = ByHashStore(os.fsencode(root))
        try:
            stored = store_one(store, source)
        finally:
            store.close()
    finally:
        os.umask(umask)
        os.close(source)
    assert stored.written and stored.path == by_hash_path(os.fsencode(root), stored.blobid)
    assert os.stat(stored.path).st_mode & 0o777 == 0o444
    level2 = os.path.dirname(stored.path)
    assert [os.stat(d).st_mode & 0o777 for d in (os.path.dirname(level2), level2)] == [0o755, 0o755]
    assert os.listdir(elsewhere) == [] and temporaries(root) == []


def test_a_stores_syncs_run_one_after_another_in_one_thread_that_ends_with_the_store(tmp_path, monkeypatch):
    """Asking for a sync never waits for a thread to start: a thread per sync cost a few percent of a copy."""
    root = tmp_path / "by-hash"
    root.mkdir()
    threads = []  # the Thread objects themselves: a new thread could reuse an ended one's identifiers
    real_syncfs = relinker.store.syncfs

    def noting_syncfs(fd):
        threads.append(threading.current_thread())
        real_syncfs(fd)

    monkeypatch.setattr(relinker.store, "syncfs", noting_syncfs)
    store = ByHashStore(os.fsencode(root))
    for n in range(3):
        store_one(store, open_content(tmp_path, b"content %d" % n))
    assert len(threads) == 6  # each file: its batch, then its name
    assert len(set(threads)) == 1 and threads[0] is not threading.current_thread()
    store.close()
    assert not threads[0].is_alive()


def test_a_sealed_batch_syncs_while_the_next_is_read_and_is_named_only_after_its_sync(tmp_path, slow_store):
    root, slow, store = slow_store
    first = store.read_in(open_content(tmp_path, b"one"), None)
    store.seal_batch()
    assert slow.started.wait(10)
    # While the sealed batch syncs: the next batch is read, and the sealed content is known as waiting.
    second = store.read_in(open_content(tmp_path, b"two"), None)
    assert isinstance(second, Pending) and store.read_in(open_content(tmp_path, b"one"), None) is first
    with pytest.raises(RuntimeError):
        store.seal_batch()  # one sealed batch at a time
    placed = {}
    placing = threading.Thread(target=lambda: placed.update(store.place_sealed()))
    placing.start()
    placing.join(0.3)
    assert placing.is_alive() and stored_names(root) == []  # no name before its data's sync returned
    slow.release.set()
    placing.join(10)
    assert list(placed) == [first.blobid] and placed[first.blobid].written
    assert stored_names(root) == [first.blobid]
    assert list(store.place_pending()) == [second.blobid]
    assert stored_names(root) == sorted([first.blobid, second.blobid])


def test_a_sealed_batch_dropped_or_failing_its_sync_leaves_no_temporary_and_no_name(tmp_path, slow_store):
    root, slow, store = slow_store
    store.read_in(open_content(tmp_path, b"dropped"), None)
    store.seal_batch()
    assert slow.started.wait(10)
    threading.Timer(0.2, slow.release.set).start()
    store.discard_pending()  # an attempt to be redone: waits for the sync, then drops the batch
    assert stored_names(root) == [] and temporaries(root) == []
    slow.error = OSError(errno.EIO, "Input/output error")
    store.read_in(open_content(tmp_path, b"failing"), None)
    store.seal_batch()
    with pytest.raises(OSError) as raised:
        store.place_sealed()  # trouble with the store itself: the range's attempt fails
    assert raised.value.errno == errno.EIO
    assert stored_names(root) == [] and temporaries(root) == []


def test_a_small_content_the_store_holds_never_becomes_a_file(tmp_path):
    """Hashed before any temporary exists: a duplicate small file costs the store no file creation at all."""
    root = tmp_path / "by-hash"
    root.mkdir()
    (tmp_path / "original").write_bytes(b"shared content\n" * 1000)
    (tmp_path / "duplicate").write_bytes(b"shared content\n" * 1000)
    first = ByHashStore(os.fsencode(root))
    fd = os.open(tmp_path / "original", os.O_RDONLY)
    try:
        stored = store_one(first, fd)
    finally:
        os.close(fd)
        first.close()
    assert stored.written and os.listdir(root / ".relinker-tmp") == []
    second = ByHashStore(os.fsencode(root))  # another worker
    fd = os.open(tmp_path / "duplicate", os.O_RDONLY)
    try:
        again = second.read_in(fd, 15000)
        assert again == Stored(stored.blobid, stored.path, False, 15000, stored.identity)
        assert os.listdir(root / ".relinker-tmp") == []  # not even the worker's own directory
    finally:
        os.close(fd)
        second.close()


def test_a_small_file_that_reads_other_than_its_size_is_a_changed_source(tmp_path):
    # A /proc file says 0 bytes and reads more: whatever size a small file
    # claims, what is stored is what was read, or nothing.
    store = ByHashStore(os.fsencode(tmp_path))
    fd = os.open("/proc/self/status", os.O_RDONLY)
    try:
        assert os.fstat(fd).st_size == 0 and os.read(fd, 10)
        os.lseek(fd, 0, os.SEEK_SET)
        with pytest.raises(SourceProblem) as problem:
            store.read_in(fd, None)
    finally:
        os.close(fd)
        store.close()
    assert problem.value.kind == "source-changed"
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_reading_a_small_content_stops_at_its_size_its_end_or_the_buffer(tmp_path):
    chunk = relinker.content.CHUNK

    def read(name, data, size):
        (tmp_path / name).write_bytes(data)
        fd = os.open(tmp_path / name, os.O_RDONLY)
        try:
            got = relinker.content.read_small(fd, size)
            return got, os.lseek(fd, 0, os.SEEK_CUR)
        finally:
            os.close(fd)

    (digest, data), _ = read("fits", b"y" * (chunk - 1), chunk - 1)
    assert bytes(data) == b"y" * (chunk - 1) and digest == blake3.blake3(bytes(data)).hexdigest()
    assert read("grown", b"x" * chunk, 10) == (None, chunk)  # larger than the buffer: nothing usable
    # Told 0 bytes (a /proc file says so), it reads to the end; told less, it reads on past it.
    assert bytes(read("said-empty", b"abc", 0)[0][1]) == b"abc"
    assert bytes(read("said-less", b"abcdef", 3)[0][1]) == b"abcdef"


def test_a_dead_workers_temporaries_are_removed_and_no_one_elses(tmp_path):
    """A worker killed mid-copy leaves its temporaries; the next store on this host removes them, and only them."""
    root = tmp_path / "by-hash"
    temporaries = root / ".relinker-tmp"
    host = socket.gethostname()
    dead = subprocess.Popen(["true"])
    dead.wait()
    leftovers = {name: temporaries / name for name in (
        f"{host}+{dead.pid}+0bad",        # killed: removed
        f"{host}+{os.getpid()}+0a11",     # alive (this process): kept
        f"{host}+{dead.pid}+10cc",        # a live worker of another PID namespace, its pid dead here: locked, kept
        f"elsewhere+{dead.pid}+0bad")}    # another host's, whatever its pid: kept
    for directory in leftovers.values():
        directory.mkdir(parents=True)
        (directory / "partial").write_bytes(b"half a file")
    other_namespace = os.open(leftovers[f"{host}+{dead.pid}+10cc"], os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(other_namespace, fcntl.LOCK_EX)
    source = tmp_path / "source"
    source.write_bytes(b"x")
    store = ByHashStore(os.fsencode(root))
    fd = os.open(source, os.O_RDONLY)
    try:
        stored = store_one(store, fd, 1)
    finally:
        os.close(fd)
    assert stored.written and open(stored.path, "rb").read() == b"x"
    assert sorted(p.name for p in temporaries.iterdir() if p.name not in leftovers) == [
        n for n in os.listdir(temporaries) if n.startswith(f"{host}+{os.getpid()}+") and n not in leftovers]
    assert not leftovers[f"{host}+{dead.pid}+0bad"].exists()
    assert leftovers[f"{host}+{os.getpid()}+0a11"].exists() and leftovers[f"elsewhere+{dead.pid}+0bad"].exists()
    assert (leftovers[f"{host}+{dead.pid}+10cc"] / "partial").exists()
    store.close()
    os.close(other_namespace)
    assert sorted(os.listdir(temporaries)) == sorted(
        [f"{host}+{os.getpid()}+0a11", f"{host}+{dead.pid}+10cc", f"elsewhere+{dead.pid}+0bad"])
    # A worker killed while others work on: their stores remove its temporaries as they close, even
    # those that wrote nothing (a resume with nothing new makes no directory of its own).
    leftovers[f"{host}+{dead.pid}+0bad"].mkdir()
    (leftovers[f"{host}+{dead.pid}+0bad"] / "partial").write_bytes(b"half a file")
    ByHashStore(os.fsencode(root)).close()
    assert not leftovers[f"{host}+{dead.pid}+0bad"].exists()
    assert not leftovers[f"{host}+{dead.pid}+10cc"].exists()  # its lock is gone with its holder


def test_source_changing_while_read_is_detected(tmp_path):
    source = tmp_path / "growing"
    source.write_bytes(b"x" * (32 << 20))
    store_root = tmp_path / "by-hash"
    store_root.mkdir()
    stop = threading.Event()

    def keep_appending():
        with open(source, "ab") as f:
            while not stop.is_set():
                f.write(b"y" * 4096)
                f.flush()
                time.sleep(0.0005)

    writer = threading.Thread(target=keep_appending)
    writer.start()
    try:
        time.sleep(0.01)
        fd = os.open(source, os.O_RDONLY)
        with pytest.raises(SourceProblem) as problem:
            ByHashStore(os.fsencode(store_root)).read_in(fd, None)
        os.close(fd)
    finally:
        stop.set()
        writer.join()
    assert problem.value.kind == "source-changed"
    assert [f for _, _, files in os.walk(store_root) for f in files] == []  # no by-hash name, no temporary


def test_a_large_file_ticks_while_it_is_copied_and_a_stop_leaves_nothing(tmp_path):
    """One file can take longer than the lease: the worker's tick (heartbeat, stop check) runs per chunk."""
    source = tmp_path / "large"
    source.write_bytes(os.urandom(1 << 20) * 5 + b"tail")
    store_root = tmp_path / "by-hash"
    store_root.mkdir()
    store = ByHashStore(os.fsencode(store_root))
    ticks = []
    fd = os.open(source, os.O_RDONLY)
    try:
        stored = store_one(store, fd, None, lambda: ticks.append(1))
    finally:
        os.close(fd)
    assert len(ticks) == 6 and stored.size == (5 << 20) + 4

    class Stop(Exception):
        pass

    def stop_at_the_third_chunk():
        ticks.append(1)
        if len(ticks) == 9:
            raise Stop()

    other = tmp_path / "other"
    other.write_bytes(os.urandom(1 << 20) * 5)
    fd = os.open(other, os.O_RDONLY)
    try:
        with pytest.raises(Stop):
            store_one(store, fd, None, stop_at_the_third_chunk)
    finally:
        os.close(fd)
    store.close()
    stored_files = [os.path.join(d, n) for d, _, names in os.walk(store_root) for n in names]
    assert stored_files == [os.fsdecode(stored.path)]  # the stopped copy left no file, temporary or final


@pytest.mark.reliability
@pytest.mark.parametrize("ranges, done_before_kill", [(40, 4), (6, 1)])
def test_copy_killed_mid_run_then_resumed(world, tmp_path, ranges, done_before_kill):
    """Small ranges, or ranges of 200 inodes, which seal batches (a kill may land while one syncs)."""
    root = tmp_path / "big"
    for d in range(20):
        (root / f"d{d:02d}").mkdir(parents=True)
        for f in range(60):
            content = os.urandom(8192) if f % 3 else b"shared %d" % (f % 7)
            (root / f"d{d:02d}" / f"f{f:03d}").write_bytes(content)
    scan.scan_tree(world.conn, "big", os.fsencode(root))
    argv = world.argv("copy", "--no-progress", "--json", "--workers", "2", "--ranges", str(ranges))
    job = start(argv)
    wait_for(lambda: range_states(world.conn).get("done", 0) >= done_before_kill, what="some ranges done")
    kill_group(job)
    job.wait()
    assert range_states(world.conn).get("done", 0) < ranges
    # nothing partial under a by-hash name, and no inode claims a file that is not there
    for name, path in by_hash_files(world).items():
        content = open(path, "rb").read()
        assert content_matches(name, blake3.blake3(content).hexdigest(), len(content))
    for (blobid,) in world.conn.execute("SELECT blobid FROM inode WHERE by_hash_created"):
        assert os.path.exists(by_hash_path_of(world, blobid))
    code, out, err = finish(start(argv))
    assert code == 0, err
    assert world.conn.execute("SELECT count(*) FROM inode WHERE fs_type = 'f' AND NOT by_hash_created"
                              ).fetchone() == (0,)
    world.assert_complete(json.loads(out)["run_id"])
    assert not os.path.exists(world.by_hash / ".relinker-tmp") or os.listdir(world.by_hash / ".relinker-tmp") == []


def test_copy_reports_its_bytes_in_the_summary_and_the_progress_view(world, capsys, tree):
    # Enough bytes for a rate in MB/s (one decimal) above 0 however slow the machine is.
    (tree / "large").write_bytes(os.urandom(4 << 20))
    scan.scan_tree(world.conn, "disk", os.fsencode(tree))
    total = world.conn.execute("SELECT sum(size) FROM inode WHERE fs_type = 'f'").fetchone()[0]
    code, summary = copy(world, capsys, "--ranges", "3")
    assert code == 0 and summary["bytes_read"] == total and summary["bytes_planned"] == total
    row = world.conn.execute("SELECT bytes_read, bytes_planned, mb_per_second > 0, eta FROM relinker_run_progress "
                             "WHERE run_id = %s", (summary["run_id"],)).fetchone()
    assert row[:3] == (total, total, True) and row[3].total_seconds() == 0
    assert main(world.argv("status", str(summary["run_id"]))) == 0
    assert "content read" in capsys.readouterr().out


def test_the_eta_of_content_work_goes_by_bytes_when_ranges_hold_unequal_bytes(world):
    """One range done with a tenth of the bytes: the rest takes nine times as long, not once as long."""
    run_id = world.conn.execute("INSERT INTO relinker_run (mode, started_at) VALUES ('copy', now() - interval '20 s') "
                                "RETURNING run_id").fetchone()[0]
    world.conn.execute("""
        INSERT INTO relinker_range (run_id, range_no, status, claimed_at, heartbeat_at, finished_at,
                                    bytes_planned, bytes_read)
        VALUES (%(r)s, 0, 'done', now() - interval '10 s', now(), now(), 100, 100),
               (%(r)s, 1, 'running', now(), now(), NULL, 900, 0)""", {"r": run_id})
    with psycopg.connect(world.dsn, autocommit=True) as worker:
        worker.execute("SELECT pg_advisory_lock(%s, 1)", (run_id,))  # range 1 is at work
        eta, working = world.conn.execute("SELECT eta, working FROM relinker_run_progress WHERE run_id = %s",
                                          (run_id,)).fetchone()
    assert working.total_seconds() == pytest.approx(10, abs=0.5)
    assert eta.total_seconds() == pytest.approx(90, abs=5)


class _DirectWritesRefused:
    """The os module as content.py sees it on a device whose blocks are larger than relinker's: a write
    to a descriptor opened with O_DIRECT is refused with EINVAL."""

    def __getattr__(self, name):
        return getattr(os, name)

    @staticmethod
    def write(fd, data):
        import fcntl

        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return os.write(fd, data)


@pytest.mark.parametrize("direct_refused", [False, True])
def test_a_large_content_written_directly_reads_back_byte_for_byte(tmp_path, monkeypatch, direct_refused):
    """Large contents bypass the page cache on the way in; the tail that is no whole block goes through it,
    and so does all of it where the device refuses direct writes."""
    if direct_refused:
        monkeypatch.setattr(relinker.content, "os", _DirectWritesRefused())
    root = tmp_path / "by-hash"
    root.mkdir()
    content = os.urandom(relinker.store.DIRECT_SIZE + (1 << 20) + 5)
    source = tmp_path / "large"
    source.write_bytes(content)
    store = ByHashStore(os.fsencode(root))
    fd = os.open(source, os.O_RDONLY)
    try:
        stored = store_one(store, fd, len(content))
    finally:
        os.close(fd)
        store.close()
    assert stored.written and stored.blobid == blake3.blake3(content).hexdigest()
    with open(stored.path, "rb") as f:
        assert f.read() == content


def test_a_missing_file_is_gone_for_good_only_where_its_medium_is_there(tmp_path):
    """holds_place, on a real tree: mount points and the file's own directory decide, never an empty one."""
    from relinker.sources import holds_place

    top = tmp_path / "mnt-ntt-medium"
    assert not holds_place(os.fsencode(top), b"new/f")             # no mount point at all
    top.mkdir()
    assert not holds_place(os.fsencode(top), b"new/f")             # the empty mount point umount leaves
    (top / "p1").mkdir()
    (top / "p5").mkdir()
    assert not holds_place(os.fsencode(top), b"p5/f")              # a medium mounted by partitions, unmounted
    assert not holds_place(os.fsencode(top), b"f")
    (top / "new").mkdir()
    assert not holds_place(os.fsencode(top), b"new/f")             # its directory, empty: proves nothing
    (top / "new" / "other").write_bytes(b"x")
    assert holds_place(os.fsencode(top), b"new/f")                 # its directory with other files: gone
    assert not holds_place(os.fsencode(top), b"new/sub/f")         # a directory missing from no mount point
    (top / "new" / "sub").write_bytes(b"a file where a directory was")
    assert holds_place(os.fsencode(top), b"new/sub/f")
    assert holds_place(b"/", os.fsencode(tmp_path.name) + b"-absent/f")  # below a mount point: gone


@pytest.mark.parametrize("openat2", ["kernel's", "missing (ENOSYS)", "refused by a sandbox (EPERM)"])
def test_a_source_is_never_opened_through_a_symlink(tmp_path, monkeypatch, openat2):
    """openat2 (Linux 5.6+) refuses a symlink anywhere on the way; without it (an older kernel, a seccomp
    profile that refuses what it does not know), the directories are opened one by one, never followed."""
    import ctypes
    import errno

    from relinker import sources

    if openat2 != "kernel's":
        code = errno.ENOSYS if "ENOSYS" in openat2 else errno.EPERM

        def refused(*args):
            ctypes.set_errno(code)
            return -1

        monkeypatch.setattr(sources, "_SYSCALL", refused)
    medium = tmp_path / "medium"
    (medium / "d").mkdir(parents=True)
    (medium / "d" / "f").write_bytes(b"the medium's")
    (tmp_path / "host").mkdir()
    (tmp_path / "host" / "f").write_bytes(b"this machine's")
    os.symlink(tmp_path / "host", medium / "lib")
    os.symlink(tmp_path / "host" / "f", medium / "d" / "link")
    top = os.open(medium, os.O_PATH | os.O_DIRECTORY)
    try:
        fd = sources.open_beneath(top, b"d/f")
        assert os.read(fd, 100) == b"the medium's"
        os.close(fd)
        if openat2 == "kernel's" and sources._SYSCALL is None:
            pytest.skip("no openat2 on this machine")
        for below in (b"d/link", b"lib/f"):
            with pytest.raises(OSError) as refused_open:
                sources.open_beneath(top, below)
            assert refused_open.value.errno == errno.ELOOP  # copy's "a symlink ... (not followed)"
        assert (sources._SYSCALL is None) == (openat2 != "kernel's")  # latched: no syscall per file in vain
    finally:
        os.close(top)


def test_a_tree_scanned_at_the_root_is_read_beneath_it(tmp_path):
    from relinker.sources import MediumSources

    (tmp_path / "f").write_bytes(b"content")
    for sources in (MediumSources("m", b"/", []), MediumSources("m", None, [(b"/mnt/ntt/m", b"")])):
        stored = os.fsencode(tmp_path / "f") if sources.scanned_root else b"/mnt/ntt/m" + os.fsencode(tmp_path / "f")
        top, below = sources.locate(stored)
        assert top == b"/"
        fd = sources.open(top, below)
        assert os.read(fd, 100) == b"content"
        os.close(fd)

def test_a_sync_longer_than_the_lease_keeps_the_range(world, capsys, tree, monkeypatch):
    """A sync of a busy filesystem may outlast --lease, inside the range's finishing transaction or while a
    batch waits: the range keeps its heartbeat, and no other worker takes it over and copies it again."""
    from relinker import store

    real_syncfs = store.syncfs

    def slow_syncfs(fd):
        time.sleep(2.5)
        real_syncfs(fd)

    scan.scan_tree(world.conn, "disk", os.fsencode(tree))
    monkeypatch.setattr(store, "syncfs", slow_syncfs)  # the forked workers inherit it
    code, summary = copy(world, capsys, "--lease", "1", "--ranges", "3")
    assert code == 0 and summary["blobs"] == 5, summary
    assert world.conn.execute("SELECT max(attempts) FROM relinker_range").fetchone() == (1,)


def test_a_file_of_a_tree_scanned_at_the_root_is_named_as_it_is():
    from relinker.copy import CopyWork
    from relinker.sources import MediumSources
    from relinker.store import SourceProblem

    work = object.__new__(CopyWork)  # _copy reads nothing of the worker before a source opens
    with pytest.raises(SourceProblem) as problem:
        work._copy(MediumSources("m", b"/", []), [b"/no-such-directory-here/file"], 1, lambda: None, (None, 1))
    assert problem.value.detail.startswith("/no-such-directory-here/file: ")


def test_a_source_path_longer_than_path_max_is_read(world, capsys, tmp_path):
    """Beyond PATH_MAX as a whole (openat2 refuses it), each component is not: read one by one."""
    medium = world.medium("deep-disk")
    mount = tmp_path / "mounted"
    mount.mkdir()
    components = [b"d%02d" % i + b"x" * 250 for i in range(17)]
    fd = os.open(mount, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for component in components:
            os.mkdir(component, dir_fd=fd)
            below = os.open(component, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = below
        out = os.open(b"deep-file", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(out, b"deep content")
        os.close(out)
    finally:
        os.close(fd)
    stored = b"/" + b"/".join(components) + b"/deep-file"
    assert len(stored) > os.pathconf("/", "PC_PATH_MAX")
    ino = catalogued(world, medium, stored, len(b"deep content"))
    code, summary = copy(world, capsys, "--source-prefix", f"/mnt/ntt/{medium}={mount}")
    assert code == 0, summary
    blobid = world.conn.execute("SELECT blobid FROM inode WHERE ino = %s", (ino,)).fetchone()[0]
    assert blobid == blake3.blake3(b"deep content").hexdigest()
    assert summary["links_created"] == 1 and summary["problems"] == 0


@pytest.mark.parametrize("where", ["ab/", "ab/cd/"])
def test_a_symlink_in_the_stores_directories_is_never_gone_through(world, capsys, tmp_path, where):
    """``ab -> elsewhere`` would put content outside the store: that content is a problem, the rest stored."""
    source, blocked = blocked_and_fine(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    level1 = world.by_hash_root + b"/" + blocked[:2].encode()
    if where == "ab/":
        os.symlink(outside, level1)
    else:
        os.mkdir(level1)
        os.symlink(outside, level1 + b"/" + blocked[2:4].encode())
    scan.scan_tree(world.conn, "disk", os.fsencode(source))
    code, summary = copy(world, capsys)
    assert code == 1 and summary["problems_by_kind"] == {"bad-by-hash": 1} and summary["files_copied"] == 1, summary
    assert list(os.walk(outside)) == [(str(outside), [], [])]
    assert world.conn.execute("SELECT count(*) FROM inode WHERE blobid IS NOT NULL").fetchone() == (1,)


def test_a_content_over_the_file_size_limit_is_a_problem_and_the_range_goes_on(world, capsys, tmp_path):
    """EFBIG (ulimit -f) for one content: that inode fails retryably, the others of its range are stored."""
    import resource

    source = tmp_path / "disk"
    source.mkdir()
    (source / "large").write_bytes(os.urandom(3 << 20))
    for i in range(5):
        (source / f"small-{i}").write_bytes(b"small %d" % i)
    scan.scan_tree(world.conn, "disk", os.fsencode(source))
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, limits[1]))  # SIGXFSZ: ignored by Python
    try:
        code, summary = copy(world, capsys, "--workers", "1")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    assert code == 1 and summary["problems_by_kind"] == {"os-error": 1} and summary["files_copied"] == 5, summary
    assert summary["ranges_done"] == summary["ranges_total"]
    blobid, errors = world.conn.execute("SELECT blobid, errors FROM inode WHERE size = %s", (3 << 20,)).fetchone()
    assert blobid is None and len(errors) == 1 and errors[0].endswith("File too large"), errors
    assert copy(world, capsys)[0] == 0  # no limit: stored


def test_a_directory_of_the_store_that_refuses_a_content_fails_that_content_only(world, tmp_path):
    """EACCES on ab/cd/ (someone else's mode 555) is that content's problem, not the store's."""
    from support import obeying_file_permissions

    store = ByHashStore(world.by_hash_root)
    refused = blake3.blake3(b"refused content").hexdigest()
    level2 = world.by_hash_root + b"/" + refused[:2].encode() + b"/" + refused[2:4].encode()
    os.makedirs(level2)
    os.chmod(level2, 0o555)
    sources = {}
    for name in (b"refused content", b"fine content"):
        path = tmp_path / name.decode()
        path.write_bytes(name)
        sources[name] = os.open(path, os.O_RDONLY)
    try:
        with obeying_file_permissions():
            for fd in sources.values():
                store.read_in(fd, None)
            placed = store.place_pending()
    finally:
        for fd in sources.values():
            os.close(fd)
        store.close()
        os.chmod(level2, 0o755)
    problem = placed[refused]
    assert isinstance(problem, relinker.store.ByHashProblem) and problem.kind == "os-error"
    assert "Permission denied" in problem.detail and not problem.permanent
    assert isinstance(placed[blake3.blake3(b"fine content").hexdigest()], Stored)
    assert os.listdir(level2) == []


def test_a_low_open_file_limit_makes_smaller_batches_not_failed_inodes(world, tmp_path):
    """ulimit -n 64: the batch holds no more descriptors than the limit leaves, a worker forked late
    inherits none of the others' pipes; every file is stored."""
    import resource

    source = tmp_path / "disk"
    source.mkdir()
    for i in range(300):
        (source / f"file-{i}").write_bytes(b"content %d" % i)
    scan.scan_tree(world.conn, "disk", os.fsencode(source))

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    code, out, err = finish(start(world.argv("copy", "--json", "--workers", "6", "--ranges", "6", "--no-progress"),
                                  preexec_fn=low_limit))
    summary = json.loads(out)
    assert code == 0 and summary["files_copied"] == 300 and summary["problems"] == 0, (summary, err)
    assert world.conn.execute("SELECT count(*) FROM inode WHERE fs_type = 'f' AND blobid IS NULL").fetchone() == (0,)


def test_the_resume_command_repeats_where_the_media_are_mounted(world, capsys, tmp_path, monkeypatch):
    """--source-prefix is this invocation's, not the run's: `copy --run N` alone would read no medium
    and fail every inode left."""
    from relinker import checkpoint

    medium = world.medium("moved disk")
    mount = tmp_path / "mounted here"
    catalogued(world, medium, put(os.fsencode(mount) + b"/f", b"content") and b"/f", 7)

    def refused(self, conn):
        raise psycopg.errors.TooManyConnections("sorry, too many clients already")

    monkeypatch.setattr(checkpoint.CheckpointStore, "_claim_once", refused)
    monkeypatch.chdir(tmp_path)  # the mount given relative to here: the resume may be typed elsewhere
    code = main(world.argv("copy", "--json", "--no-progress", "--source-prefix", f"/mnt/ntt/{medium}=mounted here",
                           "--retry-timeout", "1"))
    out, err = capsys.readouterr()
    assert code == 1 and json.loads(out)["ranges_done"] == 0
    assert err.strip().splitlines()[-1].endswith(
        f"; resume with: {world.resume('copy', 1, '--source-prefix', f'/mnt/ntt/{medium}={mount}')}"), err


def test_a_medium_scanned_again_and_copied_again_counts_its_paths_once(world, capsys, tree):
    """A rescan drops the medium's inodes: their blobs' expected_hardlinks are made afresh, not added to."""
    scan.scan_tree(world.conn, "disk", os.fsencode(tree))
    assert copy(world, capsys)[0] == 0
    before = dict(world.conn.execute("SELECT blobid, expected_hardlinks FROM blobs"))
    scan.scan_tree(world.conn, "disk", os.fsencode(tree))  # the same tree, unchanged
    assert copy(world, capsys)[0] == 0
    assert dict(world.conn.execute("SELECT blobid, expected_hardlinks FROM blobs")) == before
    assert world.conn.execute("SELECT count(*) FROM relinker_incomplete_blobs").fetchone() == (0,)
    world.assert_complete()


def test_a_source_rewritten_in_place_while_read_is_a_changed_source(tmp_path):
    """Same size, new bytes and a new mtime while it is read (an editor saving over it): source-changed."""
    source = tmp_path / "edited"
    source.write_bytes(b"a" * (3 << 20))
    root = tmp_path / "by-hash"
    root.mkdir()
    fd = os.open(source, os.O_RDONLY)
    edits = []

    def edit_in_place():
        if not edits:  # same size, new bytes, a new mtime: an editor saving over the file
            with open(source, "r+b") as f:
                f.write(b"b" * 4096)
            st = os.stat(source)
            os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
            edits.append(1)

    store = ByHashStore(os.fsencode(root))
    try:
        with pytest.raises(SourceProblem) as problem:
            store.read_in(fd, None, edit_in_place)
        assert problem.value.kind == "source-changed"
    finally:
        os.close(fd)
        store.close()


def test_a_plain_copy_never_finishes_an_older_relinkers_run_of_one_medium(world, capsys, tmp_path):
    """An older relinker kept a run's medium as its hash and nothing of what it was asked: its unfinished
    `copy --medium A` is not what a plain `copy` asks for (every medium), and is left for --run."""
    for name in ("disk-a", "disk-b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "file").write_bytes(name.encode())
        scan.scan_tree(world.conn, name, os.fsencode(tmp_path / name))
    code, summary = copy(world, capsys, "--medium", "disk-a")
    older = summary["run_id"]
    world.conn.execute("UPDATE relinker_run SET options = options - 'requested', status = 'open' WHERE run_id = %s",
                       (older,))
    world.conn.execute("UPDATE relinker_range SET status = 'pending', worker = NULL WHERE run_id = %s", (older,))

    code, summary = copy(world, capsys)

    assert code == 0 and summary["run_id"] != older and summary["complete"]
    assert world.conn.execute("SELECT count(*) FROM inode WHERE fs_type = 'f' AND blobid IS NULL").fetchone() == (0,)


def test_a_file_put_in_place_of_a_scanned_one_is_never_taken_for_it(world, capsys, tmp_path):
    """A scanned tree read where it lies: a new file of the same size at one name of a catalogued
    inode is another content. The inode is read at a name that still holds it; where none does, it is
    source-changed, never stored as the newcomer."""
    tree = tmp_path / "tree"
    (tree / "d").mkdir(parents=True)
    (tree / "a.txt").write_bytes(b"AAAA")
    os.link(tree / "a.txt", tree / "d" / "a-link")
    (tree / "b.txt").write_bytes(b"BBBB")
    scan.scan_tree(world.conn, "disk", os.fsencode(tree))
    for name in ("a.txt", "b.txt"):  # new inodes of the same size in their place (as an editor saves)
        (tree / "new").write_bytes(b"ZZZZ")
        os.rename(tree / "new", tree / name)

    code, summary = copy(world, capsys)

    archive = world.archive_root + os.fsencode(tree)
    with open(archive + b"/d/a-link", "rb") as f:
        assert f.read() == b"AAAA"
    with open(archive + b"/a.txt", "rb") as f:
        assert f.read() == b"AAAA"  # the catalogued inode's name, as the catalogue says
    assert not os.path.exists(archive + b"/b.txt")
    assert code == 1 and summary["problems_by_kind"] == {"source-changed": 1}
    assert summary["problem_samples"][0]["detail"].endswith("b.txt: another file than the one catalogued "
                                                            "(another inode)")


def test_a_temporary_that_cannot_be_removed_leaves_the_store_usable(tmp_path):
    """A failing unlink of one dropped temporary (an I/O error, a directory that refuses) must not stop
    the others being dropped, nor leave descriptors already closed to be closed again by every later
    attempt (each range failed with "Bad file descriptor", and a number reused meanwhile, say by a
    database socket, would have been closed under its new owner)."""
    from support import obeying_file_permissions

    root = tmp_path / "by-hash"
    root.mkdir()
    store = ByHashStore(os.fsencode(root))
    sources = [open_content(tmp_path, b"content %d" % n) for n in range(3)]
    try:
        for fd in sources:
            assert isinstance(store.read_in(fd, None), Pending)
        held = set(os.listdir("/proc/self/fd"))
        temporaries_directory = store._temp_directory
        os.chmod(temporaries_directory, 0o555)
        try:
            with obeying_file_permissions():
                store.discard_pending()  # no temporary can be removed: the attempt is dropped all the same
        finally:
            os.chmod(temporaries_directory, 0o755)
        assert len(held - set(os.listdir("/proc/self/fd"))) == 3  # each temporary's descriptor closed once
        store.discard_pending()  # the next attempt starts afresh
        sources.append(open_content(tmp_path, b"the next range"))
        assert isinstance(store.read_in(sources[-1], None), Pending)
        assert store.place_pending()
    finally:
        for fd in sources:
            os.close(fd)
        store.close()
    assert temporaries(root) == []  # the worker's directory is removed with what was left in it


def test_copy_adds_only_the_paths_of_inodes_it_marked(world, capsys, tmp_path, monkeypatch):
    """An inode of the range stored by another tool meanwhile (under another blob): its paths are not
    this blob's, and its expected_hardlinks does not count them."""
    tree = tmp_path / "disk"
    tree.mkdir()
    (tree / "a").write_bytes(b"same content")
    (tree / "b").write_bytes(b"same content")
    old = world.medium("old")  # the content stored and counted already, from another medium
    blob = world.blob(b"same content")
    world.inode(old, [b"/old-path"], blob)
    assert main(world.argv("relink", "--no-progress", "--workers", "1")) == 0
    assert world.conn.execute("SELECT expected_hardlinks FROM blobs WHERE blobid = %s", (blob,)).fetchone() == (1,)
    scan.scan_tree(world.conn, "disk", os.fsencode(tree))
    other = world.blob(b"what b holds now")
    real_process = copy_mode.CopyWork.process

    def process_then_someone_stores_b(self, r, ctx):
        finalize = real_process(self, r, ctx)
        self.data.get().execute("UPDATE inode SET blobid = %s WHERE medium_hash = %s AND ino = %s",
                                (other, r.medium_hash, os.stat(tree / "b").st_ino))
        return finalize

    monkeypatch.setattr(copy_mode.CopyWork, "process", process_then_someone_stores_b)
    capsys.readouterr()
    assert main(world.argv("copy", "--medium", "disk", "--no-progress", "--workers", "1")) == 0
    counted = world.conn.execute("SELECT n_hardlinks, expected_hardlinks FROM blobs WHERE blobid = %s",
                                 (blob,)).fetchone()
    assert counted == (2, 2)  # /old-path and a: b is the other blob's


def test_copy_never_counts_more_links_than_paths(world, capsys, tmp_path, monkeypatch):
    """n_hardlinks comes from the by-hash file's link count, capped at the blob's catalogued paths: links
    made outside the catalogue before the range commits never push it past them."""
    tree = tmp_path / "disk"
    tree.mkdir()
    (tree / "a").write_bytes(b"a content")
    os.link(tree / "a", tree / "a2")
    scan.scan_tree(world.conn, "disk", os.fsencode(tree))
    os.makedirs(world.archive_path(os.fsencode(tree / "a2")))  # a directory in the way: one path not linked
    blob = blake3.blake3(b"a content").hexdigest()
    real_process = copy_mode.CopyWork.process

    def process_then_links_outside(self, r, ctx):
        finalize = real_process(self, r, ctx)
        for n in range(2):
            os.link(by_hash_path(world.by_hash_root, blob), tmp_path / f"outside-{n}")
        return finalize

    monkeypatch.setattr(copy_mode.CopyWork, "process", process_then_links_outside)
    capsys.readouterr()
    code = main(world.argv("copy", "--json", "--no-progress", "--workers", "1"))
    summary = json.loads(capsys.readouterr().out)
    assert code == 1 and summary["problems_by_kind"] == {"is-a-directory": 1}, summary
    assert world.conn.execute("SELECT n_hardlinks, expected_hardlinks FROM blobs WHERE blobid = %s",
                              (blob,)).fetchone() == (2, 2)
