"""Hostile or broken catalogue input: recorded as problems, never fatal, never outside the root."""

import json
import os
import pathlib
import shutil
import tempfile

import pytest

from relinker import relink as relink_mode
from relinker.cli import main
from relinker.paths import by_hash_path
from support import read_only_directory

# Every case through both routes of the workers: C (the RangeWalker) and pure Python.
pytestmark = [pytest.mark.reliability, pytest.mark.usefixtures("worker_route")]


def relink(world, capsys, *args):
    code = main(world.argv("relink", "--json", "--workers", "2", "--no-progress", *args))
    return code, json.loads(capsys.readouterr().out)


def problems(world, run_id):
    return {bytes(p) if p is not None else None: kind for p, kind in world.conn.execute(
        "SELECT path, kind FROM relinker_problem WHERE run_id = %s", (run_id,))}


@pytest.fixture
def outside(world, tmp_path):
    """A directory outside the archive that hostile input tries to reach."""
    target = tmp_path / "outside"
    target.mkdir()
    (target / "precious").write_bytes(b"do not touch")
    return target


def outside_snapshot(world, tmp_path):
    """Every entry under tmp_path outside the archive tree (link counts aside:
    linking into the archive raises the by-hash files' counts, as it should)."""
    archive = os.fsencode(world.archive)
    out = {}
    for directory, dirs, files in os.walk(os.fsencode(tmp_path)):
        if directory == archive or directory.startswith(archive + b"/"):
            continue
        for name in dirs + files:
            path = os.path.join(directory, name)
            if path != archive:
                st = os.lstat(path)
                out[path] = (st.st_mode, st.st_ino, st.st_size, st.st_mtime_ns)
    return out


def test_hostile_paths_are_problems_and_nothing_leaves_the_root(world, capsys, tmp_path, outside):
    m = world.medium("hostile")
    good = world.blob(b"good")
    archive = os.fsencode(world.archive)
    # things planted in the archive tree before the run
    os.symlink(outside, archive + b"/planted")
    os.symlink(outside / "precious", archive + b"/final-link")
    with open(archive + b"/file-not-dir", "wb") as f:
        f.write(b"a file where a directory must be")
    os.makedirs(archive + b"/dir-in-way/keep")
    hostile = {
        b"/../outside/escaped": "unsafe-path",
        b"/a/../../outside/escaped2": "unsafe-path",
        b"/nul\0byte": "unsafe-path",
        b"": "unsafe-path",
        b"/": "unsafe-path",
        b"/long/" + b"x" * 300: "name-too-long",
        b"/planted/evil": "symlink-in-archive",
        b"/planted/deeper/evil": "symlink-in-archive",
        b"/final-link": "symlink-in-archive",
        b"/file-not-dir/x": "not-a-directory",
        b"/dir-in-way": "is-a-directory",
    }
    world.inode(m, list(hostile) + [b"/fine/ok"], good)
    before = outside_snapshot(world, tmp_path)

    code, summary = relink(world, capsys)

    assert code == 1
    assert summary["links_created"] == 1 and summary["problems"] == len(hostile)
    assert problems(world, summary["run_id"]) == hostile
    assert world.linked(good, b"/fine/ok")
    assert world.n_hardlinks()[good] == 1
    assert outside_snapshot(world, tmp_path) == before
    assert sorted(os.listdir(outside)) == ["precious"]
    assert os.readlink(archive + b"/planted") == os.fsencode(outside)
    assert os.path.isdir(archive + b"/dir-in-way/keep")
    assert open(archive + b"/file-not-dir", "rb").read() == b"a file where a directory must be"
    assert world.temporaries() == []


def test_a_name_longer_than_the_filesystem_allows_is_a_limit_verify_passes(world, capsys, tmp_path):
    """HFS+ names reach 765 bytes in UTF-8 where ext4 takes 255: no archive can hold such a path, and
    no repair can make it, so verify records it and passes the blob, as for too-many-links."""
    m = world.medium("hfs")
    good = world.blob(b"good")
    world.inode(m, [b"/long/" + "\u65e5".encode() * 100, b"/fine/ok"], good)
    world.inode(m, [b"/new/" + b"d" * 300 + b"/file"], good)  # below a directory not made yet
    code, summary = relink(world, capsys, "--dry-run")
    assert code == 1 and summary["problems_by_kind"] == {"name-too-long": 2} and summary["links_created"] == 1
    code, summary = relink(world, capsys)
    assert code == 1 and summary["problems_by_kind"] == {"name-too-long": 2} and summary["links_created"] == 1
    failed_ids = tmp_path / "failed"
    code = main(world.argv("verify", "--all", "--json", "--no-progress", "--failed-ids", str(failed_ids)))
    checked = json.loads(capsys.readouterr().out)
    assert code == 1 and checked["problems_by_kind"] == {"name-too-long": 2}
    assert (checked["passed"], checked["failed"]) == (1, 0)
    assert failed_ids.read_text().splitlines()[1:] == []
    assert world.conn.execute("SELECT last_checked IS NOT NULL FROM blobs WHERE blobid = %s", (good,)).fetchone() == (True,)


def test_broken_by_hash_entries_and_blob_ids(world, capsys, tmp_path):
    m = world.medium("broken")
    as_dir = world.blob(b"by-hash is a directory", store=False)
    os.makedirs(by_hash_path(world.by_hash_root, as_dir))
    world.inode(m, [b"/x/dir-blob"], as_dir)
    world.conn.execute("INSERT INTO blobs (blobid) VALUES ('../../../../etc/passwd')")
    world.inode(m, [b"/x/evil-blob"], "../../../../etc/passwd")
    world.inode(m, [b"/x/upper-blob"], "AB" * 32)
    before = outside_snapshot(world, tmp_path)
    code, summary = relink(world, capsys)
    assert code == 1
    rows = sorted((bytes(path) if path is not None else b"", kind, blobid) for path, kind, blobid in world.conn.execute(
        "SELECT path, kind, blobid FROM relinker_problem WHERE run_id = %s", (summary["run_id"],)))
    assert rows == sorted([(b"", "bad-blobid", "../../../../etc/passwd"), (b"", "bad-blobid", "AB" * 32),
                           (by_hash_path(world.by_hash_root, as_dir), "missing-by-hash", as_dir)])
    assert summary["problems_by_kind"] == {"missing-by-hash": 1, "bad-blobid": 2}
    assert summary["links_created"] == 0
    assert outside_snapshot(world, tmp_path) == before
    assert os.listdir(world.archive) == []


def test_read_only_archive_directory_is_a_problem_not_a_crash(world, capsys, tmp_path):
    m = world.medium("ro")
    blob = world.blob(b"ro")
    world.inode(m, [b"/ro/a", b"/ro/b", b"/rw/c"], blob)
    os.makedirs(world.archive / "ro")
    before = outside_snapshot(world, tmp_path)
    with read_only_directory(world.archive / "ro"):
        code, summary = relink(world, capsys)
    assert outside_snapshot(world, tmp_path) == before
    assert code == 1
    assert summary["problems_by_kind"] == {"os-error": 2}
    assert summary["links_created"] == 1 and world.linked(blob, b"/rw/c")
    details = [d for (d,) in world.conn.execute("SELECT detail FROM relinker_problem")]
    assert all(d in ("Permission denied", "Operation not permitted") for d in details), details  # path: its own
    # once writable again, a resumed check repairs it
    code, summary = relink(world, capsys, "--new")
    assert code == 0 and summary["links_created"] == 2


def test_one_path_catalogued_twice_for_one_blob_counts_once(world, capsys, tmp_path):
    # the relative form ('/file') of two media can name the same archive path
    first, second = world.medium("one"), world.medium("two")
    same = world.blob(b"same content")
    world.inode(first, [b"/shared/name"], same)
    world.inode(second, [b"/shared/name", b"/shared/other"], same)
    before = outside_snapshot(world, tmp_path)
    code, summary = relink(world, capsys)
    assert outside_snapshot(world, tmp_path) == before
    assert code == 0 and summary["links_created"] == 2 and summary["links_present"] == 0
    assert world.n_hardlinks()[same] == 2
    assert world.conn.execute("SELECT expected_hardlinks FROM blobs WHERE blobid = %s", (same,)).fetchone() == (2,)


def test_a_blob_with_more_paths_than_a_worker_holds_is_linked_counted_and_verified_alike(world, capsys,
                                                                                           monkeypatch):
    """Past BLOB_PATHS_HELD a blob's paths are made distinct by the server and walked on their own:
    each archive path once, whatever form and medium names it, each problem once."""
    monkeypatch.setattr(relink_mode, "BLOB_PATHS_HELD", 4)
    one, two, three = world.medium("one"), world.medium("two"), world.medium("three")
    many, few = world.blob(b"many"), world.blob(b"few")
    own = b"/mnt/ntt/%s/own" % one.encode()
    world.inode(one, [b"/shared/a", b"/shared/b", own], many)
    world.inode(two, [b"/shared/a", b"/shared/c", own, b"/skipped"], many, excluded={b"/skipped": "rule"})
    world.inode(three, [b"/shared/b", b"/deep/er/x"], many)
    world.inode(one, [b"/few/1", b"/few/2"], few)
    os.makedirs(world.archive_path(b"/shared/c"))  # in the way: one problem
    code, summary = relink(world, capsys)
    assert code == 1 and summary["links_created"] == 4 + 2 and summary["problems"] == 1
    assert [bytes(p) for (p,) in world.conn.execute("SELECT path FROM relinker_problem")] == [b"/shared/c"]
    assert world.conn.execute("SELECT n_hardlinks, expected_hardlinks FROM blobs WHERE blobid = %s",
                              (many,)).fetchone() == (4, 5)
    assert not os.path.lexists(world.archive_path(b"/skipped"))
    os.rmdir(world.archive_path(b"/shared/c"))
    code, summary = relink(world, capsys, "--new")
    assert code == 0 and summary["links_created"] == 1 and summary["links_present"] == 4 + 2
    world.assert_complete()
    for command in ("count", "verify --all --hash"):
        code = main(world.argv(*command.split(), "--json", "--workers", "2", "--no-progress"))
        checked = json.loads(capsys.readouterr().out)
        assert code == 0 and checked["problems"] == 0 and checked["links_present"] == 5 + 2, command
    os.unlink(world.archive_path(b"/deep/er/x"))
    code = main(world.argv("verify", "--all", "--json", "--no-progress"))
    checked = json.loads(capsys.readouterr().out)
    assert code == 1 and checked["problems_by_kind"] == {"link-missing": 1, "count-mismatch": 1}
    assert checked["failed"] == 1


def test_more_paths_than_the_filesystem_allows_links(world, capsys, tmp_path):
    """ext4 allows 65,000 links per inode: the overflow is recorded path by path."""
    m = world.medium("many")
    empty = world.blob(b"")
    n = 65010
    world.inode(m, [b"/many/d%02d/f%05d" % (i % 50, i) for i in range(n)], empty)
    before = outside_snapshot(world, tmp_path)
    code, summary = relink(world, capsys)
    assert outside_snapshot(world, tmp_path) == before
    by_hash_links = os.stat(by_hash_path(world.by_hash_root, empty)).st_nlink
    if by_hash_links == n + 1:
        assert code == 0 and summary["links_created"] == n
        pytest.skip(f"the test directory's filesystem allows all {n:,} links: no limit to hit")
    # the filesystem has a link limit (ext4: 65,000)
    overflow = n - (by_hash_links - 1)
    assert code == 1
    assert summary["problems_by_kind"] == {"too-many-links": overflow}
    assert summary["links_created"] == by_hash_links - 1
    assert world.n_hardlinks()[empty] == by_hash_links - 1
    # A store whose only file is at its limit still takes the check that the two trees share a mount.
    code, again = relink(world, capsys, "--new")
    assert code == 1 and again["problems_by_kind"] == {"too-many-links": overflow}
    assert again["links_present"] == by_hash_links - 1 and again["links_created"] == 0
    # verify says the same, and the blob passes: a limit of the filesystem, not damage.
    code = main(world.argv("verify", "--all", "--json", "--workers", "2", "--no-progress"))
    checked = json.loads(capsys.readouterr().out)
    assert code == 1 and checked["problems_by_kind"] == {"too-many-links": overflow}
    assert checked["failed"] == 0 and checked["passed"] == 1
    assert world.conn.execute("SELECT last_checked IS NOT NULL FROM blobs WHERE blobid = %s",
                              (empty,)).fetchone() == (True,)
    # count says the same: no links a relink could make, though relinker_incomplete_blobs lists the blob
    code = main(world.argv("count", "--json", "--workers", "2", "--no-progress"))
    counted = json.loads(capsys.readouterr().out)
    assert code == 1 and counted["problems_by_kind"] == {"too-many-links": overflow}
    # without its blobs row, no more: the links missing are the limit's (no relink --from-file makes them)
    world.conn.execute("CREATE TEMP TABLE kept AS SELECT * FROM blobs WHERE blobid = %s", (empty,))
    world.conn.execute("DELETE FROM blobs WHERE blobid = %s", (empty,))
    code = main(world.argv("count", "--json", "--workers", "2", "--no-progress"))
    counted = json.loads(capsys.readouterr().out)
    world.conn.execute("INSERT INTO blobs SELECT * FROM kept")
    assert code == 1 and counted["problems_by_kind"] == {"too-many-links": overflow}
    # An overflow path holding the copier's own copy of the content is the same limit (relink
    # could not replace it either); passed, it is never in --failed-ids.
    (overflowed,) = world.conn.execute("SELECT path FROM relinker_problem WHERE kind = 'too-many-links' "
                                       "ORDER BY path LIMIT 1").fetchone()
    copy = world.archive_path(bytes(overflowed))
    open(copy, "wb").close()
    failed_ids = tmp_path / "failed.txt"
    code = main(world.argv("verify", "--all", "--json", "--no-progress", "--failed-ids", str(failed_ids)))
    checked = json.loads(capsys.readouterr().out)
    assert checked["problems_by_kind"] == {"too-many-links": overflow} and checked["passed"] == 1
    assert failed_ids.read_text().splitlines()[1:] == []
    # another content there is damage, whatever the limit
    with open(copy, "wb") as f:
        f.write(b"not empty")
    code = main(world.argv("verify", "--all", "--json", "--no-progress", "--failed-ids", str(failed_ids)))
    checked = json.loads(capsys.readouterr().out)
    assert checked["problems_by_kind"] == {"too-many-links": overflow - 1, "wrong-inode": 1}
    assert checked["failed"] == 1 and failed_ids.read_text().splitlines()[1:] == [empty]


def test_a_lost_link_is_damage_where_the_link_limit_is_not_known(catalogue_url, capsys):
    """glibc guesses 127 links for a filesystem it does not know (tmpfs, ZFS): a blob with more
    links that lost one has lost it, not met a limit."""
    from support import ArchiveWorld

    if not os.path.isdir("/dev/shm"):
        pytest.skip("no tmpfs at /dev/shm")
    root = tempfile.mkdtemp(dir="/dev/shm", prefix="relinker-test-")
    world = ArchiveWorld(catalogue_url, pathlib.Path(root))
    try:
        m = world.medium("disk")
        licence = world.blob(b"a licence text many packages carry")
        world.inode(m, [b"/lic/%03d/LICENSE" % i for i in range(200)], licence)
        code, summary = relink(world, capsys)
        assert code == 0 and summary["links_created"] == 200
        os.unlink(world.archive_path(b"/lic/007/LICENSE"))
        code = main(world.argv("verify", "--all", "--json", "--no-progress"))
        checked = json.loads(capsys.readouterr().out)
        assert checked["problems_by_kind"] == {"link-missing": 1, "count-mismatch": 1}
        assert checked["failed"] == 1
    finally:
        world.close()
        shutil.rmtree(root, ignore_errors=True)


def test_a_catalogued_file_named_like_a_replace_temporary_is_never_removed(world, capsys):
    """Replacing /d/foo links through a temporary of a fixed name; an archive file of that name stays."""
    import blake3

    from relinker.linker import TEMP_PREFIX, TEMP_SUFFIX

    m = world.medium("disk")
    foo, other = world.blob(b"foo's content"), world.blob(b"another content")
    temp_name = TEMP_PREFIX + blake3.blake3(b"foo").hexdigest()[:16].encode() + TEMP_SUFFIX
    world.inode(m, [b"/d/foo"], foo)
    world.inode(m, [b"/d/" + temp_name], other)
    code, summary = relink(world, capsys)
    assert code == 0 and summary["links_created"] == 2
    stale = world.replace_with_stale_copy(b"/d/foo")  # foo must be replaced, through that temporary
    code, summary = relink(world, capsys, "--new")
    assert code == 0 and summary["links_replaced"] == 1 and summary["links_present"] == 1, summary
    assert world.linked(foo, b"/d/foo") and world.linked(other, b"/d/" + temp_name)
    assert os.path.basename(stale) == b"foo"
    assert sorted(os.listdir(world.archive_root + b"/d")) == sorted([b"foo", temp_name])  # no temporary left


def test_no_two_paths_look_alike_in_messages_and_json():
    """display() is how a path reaches a message, a problem's detail and --json: it must be reversible."""
    from relinker.paths import display

    names = [b"a\xff", b"a\\xff", b"a\\\\xff", b"Icon\r", b"Icon\\x0d", b"caf\xc3\xa9", b"caf\xe9", b"a\\"]
    assert len({display(n) for n in names}) == len(names)
    assert display(b"a\xff") == "a\\xff" and display(b"a\\xff") == "a\\\\xff"
    assert all("\n" not in display(n) and "\r" not in display(n) for n in names + [b"x\ny"])
