"""relinker on a catalogue in production's state (tests/production.py).

What the README's section "On a catalogue the NTT copier filled" promises:
migrate adds only relinker's own; copy stores exactly the inodes without
content and writes the status model as the NTT copier did; relink repairs
what the copier left wrong; count and verify --hash end clean on the
SHA-256-named empty blob; and not one column of the copier's rows changes
except the counts relink is meant to fix (and the verifier's last_checked).
"""

import json
import os
import re
from pathlib import Path

import pytest

from relinker.catalogue import EMPTY_BLAKE3, EMPTY_SHA256
from relinker.cli import main
from relinker.paths import by_hash_path

NTT_TABLES = ("medium", "inode", "path", "blobs")
NTT_COLUMNS = """
SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), pg_get_expr(d.adbin, d.adrelid)
FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
WHERE c.relname = ANY(%s) OR c.relname LIKE 'inode\\_%%' OR c.relname LIKE 'path\\_%%'
ORDER BY 1, a.attnum
"""
#: What relink, count and verify may change in blobs rows of the copier's contents.
COUNTS = ("n_hardlinks", "expected_hardlinks", "last_checked")


def run(world, capsys, *args):
    code = main(world.argv(*args, "--json", "--no-progress", "--workers", "2"))
    return code, json.loads(capsys.readouterr().out)


def migrate(world, capsys):
    assert main(world.argv("migrate")) == 0
    return capsys.readouterr().out


def without_counts(rows):
    return {**rows, "blobs": [{k: v for k, v in blob.items() if k not in COUNTS} for blob in rows["blobs"]]}


def test_migrate_twice_adds_only_relinkers_own(production, capsys):
    columns = production.conn.execute(NTT_COLUMNS, (list(NTT_TABLES),)).fetchall()
    rows = production.rows_of(production.stored)
    assert "applied: 0001" in migrate(production, capsys)
    assert "applied" not in migrate(production, capsys)
    assert production.conn.execute(NTT_COLUMNS, (list(NTT_TABLES),)).fetchall() == columns
    assert production.rows_of(production.stored) == rows
    # the event trigger saw relinker alter its own tables only (and saw it alter some: it is there)
    altered = [what for (what,) in production.conn.execute("SELECT what FROM ntt_audit WHERE what LIKE 'ALTER%'")]
    if production.event_trigger:
        assert altered and all("relinker_" in what for what in altered), altered


def test_copy_plans_exactly_the_inodes_without_content(production, capsys):
    migrate(production, capsys)
    code, summary = run(production, capsys, "copy", "--dry-run")
    assert code == 0 and summary["blobs"] == 7, summary  # the fresh medium's regular files
    assert summary["options"]["empty_blobid"] == EMPTY_SHA256


def test_copy_relink_count_verify_change_only_what_they_should(production, capsys):
    p = production
    migrate(p, capsys)
    stored_before = p.rows_of(p.stored)

    code, summary = run(p, capsys, "copy", "--source-prefix", p.source_prefix())
    assert code == 0, summary
    assert summary["blobs"] == 7 and summary["problems"] == 0
    # notes, data.bin and the three in other path forms; the licence and the empty content were stored
    assert summary["files_copied"] == 5
    assert summary["bytes_read"] == sum(size for (size,) in p.conn.execute(
        "SELECT size FROM inode WHERE medium_hash = %s AND fs_type = 'f'", (p.fresh,)))
    fresh = p.conn.execute(
        "SELECT blobid, status, copied, by_hash_created, processed_at IS NOT NULL, error_type, size "
        "FROM inode WHERE medium_hash = %s AND fs_type = 'f' ORDER BY ino", (p.fresh,)).fetchall()
    assert all(row[1:6] == ("success", True, True, True, None) for row in fresh), fresh
    by_size = {row[6]: row[0] for row in fresh}
    assert by_size[0] == EMPTY_SHA256  # one empty content, under the catalogue's name
    assert by_size[len(b"MIT licence text\n" * 50)] == p.licence
    assert not os.path.exists(by_hash_path(p.by_hash_root, EMPTY_BLAKE3))
    assert p.rows_of(p.stored)["inode"] == stored_before["inode"]
    assert p.rows_of(p.stored)["path"] == stored_before["path"]
    assert without_counts(p.rows_of(p.stored)) == without_counts(stored_before)
    # nothing left to copy: the stored medium's inodes are never planned
    code, summary = run(p, capsys, "copy", "--new", "--source-prefix", p.source_prefix())
    assert code == 0 and summary["ranges_total"] == 0

    code, summary = run(p, capsys, "relink")
    assert code == 0, summary
    # the copier's lost link, and its link to an orphaned copy of the photo
    assert summary["links_created"] == 1 and summary["links_replaced"] == 1 and summary["problems"] == 0
    p.assert_complete(summary["run_id"])
    assert os.stat(p.orphan).st_nlink == 1
    counts = p.n_hardlinks()
    assert counts[p.licence] == 4 and counts[EMPTY_SHA256] == 4 and counts[p.readme] == 2

    code, summary = run(p, capsys, "count")
    assert code == 0 and summary["problems"] == 0, summary

    code, summary = run(p, capsys, "verify", "--all", "--hash")
    assert code == 0 and summary["failed"] == 0, summary["problem_samples"]
    assert summary["checked"] == len(p.expected())

    after = p.rows_of(p.stored)
    assert after["inode"] == stored_before["inode"] and after["path"] == stored_before["path"]
    assert without_counts(after) == without_counts(stored_before)
    # the copier's inode-counting n_hardlinks, now counting paths
    assert [b["n_hardlinks"] for b in after["blobs"]] != [b["n_hardlinks"] for b in stored_before["blobs"]]


@pytest.mark.parametrize("kind", ["socket", "fifo"])
def test_a_special_file_in_place_of_a_catalogued_one_is_given_up(production, capsys, kind):
    """A socket opens with ENXIO, not as a file to read: neither it nor a FIFO is the catalogued
    regular file, and no later run can read it (a socket was left to be retried by every run)."""
    import stat

    p = production
    migrate(p, capsys)
    for name in ("notes.txt", "notes-link"):  # both paths of the inode
        os.unlink(p.fresh_mount / "new" / name)
        os.mknod(p.fresh_mount / "new" / name, (stat.S_IFSOCK if kind == "socket" else stat.S_IFIFO) | 0o644)
    code, summary = run(p, capsys, "copy", "--source-prefix", p.source_prefix())
    assert code == 1 and summary["problems_by_kind"] == {"source-unreadable": 1}
    assert "not a regular file" in summary["problem_samples"][0]["detail"]
    assert p.conn.execute(
        "SELECT i.status, i.error_type FROM inode i JOIN path p USING (medium_hash, ino) WHERE p.path = %s",
        (p.mount_path(p.fresh, "new/notes.txt"),)).fetchone() == ("failed_permanent", "source-unreadable")


def test_copy_failures_follow_the_status_model(production, capsys):
    """Failed inodes: status and error_type as the NTT tools read them, processed_at left alone."""
    p = production
    migrate(p, capsys)
    gone = p.fresh_mount / "new" / "notes.txt"
    os.unlink(gone)
    os.unlink(p.fresh_mount / "new" / "notes-link")  # the inode's other path: the file is gone from the medium
    (p.fresh_mount / "new" / "data.bin").write_bytes(b"rewritten since it was enumerated")
    code, summary = run(p, capsys, "copy", "--source-prefix", p.source_prefix())
    assert code == 1 and summary["problems_by_kind"] == {"source-unreadable": 1, "source-changed": 1}
    states = {path: rest for path, *rest in p.conn.execute(
        "SELECT p.path, i.status, i.error_type, i.processed_at, i.blobid, cardinality(i.errors) "
        "FROM inode i JOIN path p USING (medium_hash, ino) WHERE i.medium_hash = %s AND i.status LIKE 'failed%%'",
        (p.fresh,))}
    notes = p.mount_path(p.fresh, "new/notes.txt")
    data = p.mount_path(p.fresh, "new/data.bin")
    assert states[notes] == ["failed_permanent", "source-unreadable", None, None, 1]
    assert states[data] == ["failed_permanent", "source-changed", None, None, 1]

    # permanent failures are left alone ...
    code, summary = run(p, capsys, "copy", "--new", "--source-prefix", p.source_prefix())
    assert code == 0 and summary["ranges_total"] == 0
    # ... unless asked; an attempt that cannot reach the medium keeps them permanent
    os.rename(p.fresh_mount, p.mounts / "elsewhere")
    code, summary = run(p, capsys, "copy", "--new", "--retry-permanent", "--medium", "fresh-disk",
                        "--source-prefix", p.source_prefix())
    assert code == 1 and summary["blobs"] == 0 and summary["problems"] == 2
    statuses = {path: rest for path, *rest in p.conn.execute(
        "SELECT p.path, i.status, i.error_type, cardinality(i.errors) FROM inode i JOIN path p USING (medium_hash, ino) "
        "WHERE i.medium_hash = %s AND p.path = ANY(%s)", (p.fresh, [notes, data]))}
    assert statuses == {notes: ["failed_permanent", "source-unreadable", 2],
                        data: ["failed_permanent", "source-changed", 2]}

    os.rename(p.mounts / "elsewhere", p.fresh_mount)
    (p.fresh_mount / "new" / "notes.txt").write_bytes(b"fresh notes\n" * 20)
    os.link(p.fresh_mount / "new" / "notes.txt", p.fresh_mount / "new" / "notes-link")
    code, summary = run(p, capsys, "copy", "--new", "--retry-permanent", "--medium", "fresh-disk",
                        "--source-prefix", p.source_prefix())
    assert summary["blobs"] == 1 and summary["problems_by_kind"] == {"source-changed": 1}
    row = p.conn.execute(
        "SELECT status, error_type, processed_at IS NOT NULL, cardinality(errors) FROM inode i "
        "JOIN path p USING (medium_hash, ino) WHERE p.path = %s", (notes,)).fetchone()
    assert row == ("success", None, True, 2)  # the history of errors stays
    # the stored medium's own permanent failure was never tried (--medium)
    assert p.conn.execute("SELECT status, errors FROM inode WHERE medium_hash = %s AND status LIKE 'failed%%'",
                          (p.stored,)).fetchall() == [("failed_permanent", ["[Errno 5] Input/output error"])]


def test_an_unmounted_medium_fails_retryably_and_is_copied_once_mounted(production, capsys):
    p = production
    migrate(p, capsys)
    os.rename(p.fresh_mount, p.mounts / "elsewhere")
    code, summary = run(p, capsys, "copy", "--source-prefix", p.source_prefix())
    assert code == 1 and summary["problems_by_kind"] == {"source-unreadable": 7}
    assert "medium not mounted" in summary["problem_samples"][0]["detail"]
    assert p.conn.execute(
        "SELECT DISTINCT status, error_type, processed_at FROM inode WHERE medium_hash = %s AND fs_type = 'f'",
        (p.fresh,)).fetchall() == [("failed_retryable", "source-unreadable", None)]
    os.rename(p.mounts / "elsewhere", p.fresh_mount)
    code, summary = run(p, capsys, "copy", "--new", "--source-prefix", p.source_prefix())
    assert code == 0 and summary["blobs"] == 7
    assert p.conn.execute("SELECT DISTINCT status, error_type FROM inode WHERE medium_hash = %s AND fs_type = 'f'",
                          (p.fresh,)).fetchall() == [("success", None)]


def test_an_empty_mount_point_is_no_medium_and_gives_up_on_nothing(production, capsys):
    """The stored medium was unmounted: its mount point is there, empty; retrying its failure proves nothing."""
    p = production
    migrate(p, capsys)
    mount_point = p.mounts / p.stored
    assert mount_point.is_dir() and not any(mount_point.iterdir())
    code, summary = run(p, capsys, "copy", "--retry-permanent", "--medium", "stored-by-ntt",
                        "--source-prefix", f"/mnt/ntt/{p.stored}={mount_point}")
    assert code == 1 and summary["problems_by_kind"] == {"source-unreadable": 1}
    assert summary["problem_samples"][0]["detail"] == f"medium not mounted at {mount_point}"
    status, error_type, errors = p.conn.execute(
        "SELECT status, error_type, errors FROM inode WHERE medium_hash = %s AND blobid IS NULL AND fs_type = 'f'",
        (p.stored,)).fetchone()
    assert (status, error_type) == ("failed_permanent", "io_error")  # the copier's verdict stands
    assert errors == ["[Errno 5] Input/output error",
                      f"relinker copy: source-unreadable: medium not mounted at {mount_point}"]


@pytest.mark.parametrize("shape", ["no status model", "status without error_type"])
def test_copy_on_a_catalogue_without_the_status_model(production, capsys, shape):
    p = production
    p.conn.execute("ALTER TABLE inode DROP CONSTRAINT failure_has_a_type, DROP COLUMN error_type")
    if shape == "no status model":
        p.conn.execute("ALTER TABLE inode DROP COLUMN status")
    migrate(p, capsys)
    os.unlink(p.fresh_mount / "new" / "COPYING")
    code, summary = run(p, capsys, "copy", "--medium", "fresh-disk", "--source-prefix", p.source_prefix())
    assert code == 1 and summary["blobs"] == 6 and summary["problems_by_kind"] == {"source-unreadable": 1}
    failed = p.conn.execute("SELECT processed_at, cardinality(errors) FROM inode "
                            "WHERE medium_hash = %s AND fs_type = 'f' AND blobid IS NULL", (p.fresh,)).fetchall()
    assert failed == [(None, 1)]


def readme_backfill():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## On a catalogue the NTT copier filled", 1)[1].split("\n## ", 1)[0]
    (statement,) = re.findall(r"```sql\n(.*?)```", section, re.S)
    return statement


def test_the_readmes_backfill_of_by_hash_created(production, capsys):
    """The README's backfill marks the stored inodes whose by-hash file a complete relink saw, and no other."""
    p = production
    migrate(p, capsys)
    os.unlink(by_hash_path(p.by_hash_root, p.readme))  # lost since the copier stored it
    # a pool migration left one of the store's directories a symlink, which relink never follows
    shard = os.path.dirname(os.path.dirname(by_hash_path(p.by_hash_root, p.licence)))
    os.rename(shard, shard + b"-moved")
    os.symlink(shard + b"-moved", shard)
    # an inode that is no regular file yet names a blob: relink never looks for its by-hash file
    unseen = "f" * 64
    p.conn.execute("INSERT INTO blobs (blobid) VALUES (%s)", (unseen,))
    p._ntt_inode(p.stored, 900001, [p.mount_path(p.stored, "a-link")], 0, fs_type="l", blobid=unseen)
    code, summary = run(p, capsys, "relink")
    assert code == 1 and summary["problems_by_kind"] == {"missing-by-hash": 1, "bad-by-hash": 1}
    # stored after the run had begun (here: after it ended), its by-hash file already lost: never looked at
    late = "e" * 64
    p.conn.execute("INSERT INTO blobs (blobid) VALUES (%s)", (late,))
    p._ntt_inode(p.stored, 900002, [p.mount_path(p.stored, "late")], 4, blobid=late)
    statement = readme_backfill().replace("'MEDIUM_HASH'", f"'{p.stored}'").replace("= 7", f"= {summary['run_id']}")
    p.conn.execute(statement)
    marked = dict(p.conn.execute("SELECT blobid, bool_and(by_hash_created) FROM inode WHERE medium_hash = %s "
                                 "AND blobid IS NOT NULL GROUP BY blobid", (p.stored,)))
    assert marked.pop(p.readme) is False and marked.pop(p.licence) is False and marked.pop(unseen) is False
    assert marked.pop(late) is False
    assert marked and all(marked.values())
    assert p.conn.execute("SELECT count(*) FROM inode WHERE medium_hash = %s AND by_hash_created",
                          (p.fresh,)).fetchone() == (0,)


def fresh_statuses(p) -> dict[bytes, str]:
    """The status of each file of the fresh medium, by its first catalogued path."""
    return dict(p.conn.execute(
        "SELECT (array_agg(p.path ORDER BY p.path))[1], i.status FROM inode i JOIN path p USING (medium_hash, ino) "
        "WHERE i.medium_hash = %s AND i.fs_type = 'f' GROUP BY i.ino, i.status", (p.fresh,)).fetchall())


def test_a_medium_mounted_by_partitions_and_unmounted_gives_up_on_nothing(production, capsys):
    """Unmounted, a medium mounted partition by partition leaves p1/ and p5/ empty under its mount
    directory: not empty itself, it still holds none of its files."""
    p = production
    migrate(p, capsys)
    os.rename(p.fresh_mount, p.mounts / "elsewhere")
    (p.fresh_mount / "p1").mkdir(parents=True)
    (p.fresh_mount / "p5").mkdir()
    code, summary = run(p, capsys, "copy", "--medium", "fresh-disk", "--source-prefix", p.source_prefix())
    assert code == 1 and summary["blobs"] == 0
    assert set(fresh_statuses(p).values()) == {"failed_retryable"}
    # Partition 5 mounted (here: its files back), the rest not: only its file is read, and nothing is given up.
    os.rename(p.mounts / "elsewhere" / "p5", p.fresh_mount / "p5.mounted")
    os.rmdir(p.fresh_mount / "p5")
    os.rename(p.fresh_mount / "p5.mounted", p.fresh_mount / "p5")
    code, summary = run(p, capsys, "copy", "--medium", "fresh-disk", "--source-prefix", p.source_prefix())
    statuses = fresh_statuses(p)
    assert statuses.pop(b"p5:" + p.mount_path(p.fresh, "p5/partition.txt")) == "success"
    assert set(statuses.values()) == {"failed_retryable"}


def test_a_medium_unmounted_while_its_range_is_read_gives_up_on_nothing(production, capsys, monkeypatch):
    """Whether a missing file is gone for good is judged when it fails, not once per range."""
    from relinker import sources

    p = production
    migrate(p, capsys)
    os.unlink(p.fresh_mount / "new" / "COPYING")  # gone from the medium: permanent, while it is mounted
    real_open = sources.MediumSources.open
    unmounted = p.mounts / "unmounted-meanwhile"

    def open_then_unmount(self, top, below):
        if below == b"new/data.bin" and not unmounted.exists():
            os.rename(p.fresh_mount, unmounted)  # umount: the mount point stays, empty
            p.fresh_mount.mkdir()
            raise FileNotFoundError(2, "No such file or directory")
        return real_open(self, top, below)

    monkeypatch.setattr(sources.MediumSources, "open", open_then_unmount)
    run(p, capsys, "copy", "--medium", "fresh-disk", "--source-prefix", p.source_prefix(), "--workers", "1")
    statuses = fresh_statuses(p)
    assert statuses[p.mount_path(p.fresh, "new/data.bin")] == "failed_retryable"
    assert "failed_permanent" not in set(statuses.values()) - {statuses[p.mount_path(p.fresh, "new/COPYING")]}


def test_a_partition_mounted_elsewhere_is_read_there(production, capsys):
    """--source-prefix may move one partition of a medium: /mnt/ntt/<m>/p5=/media/p5."""
    p = production
    migrate(p, capsys)
    elsewhere = p.mounts / "partition-5-here"
    os.rename(p.fresh_mount / "p5", elsewhere)
    code, summary = run(p, capsys, "copy", "--medium", "fresh-disk", "--source-prefix", p.source_prefix(),
                        "--source-prefix", f"/mnt/ntt/{p.fresh}/p5={elsewhere}")
    assert code == 0 and set(fresh_statuses(p).values()) == {"success"}, summary


def test_a_copy_never_reads_outside_the_medium(production, capsys, tmp_path):
    """'..' in a catalogued path, or a symlink on the medium in a directory's place, never reaches this
    machine's files; a NUL in one path fails that inode, not its range."""
    p = production
    migrate(p, capsys)
    secret = tmp_path / "this-machines-file"
    secret.write_bytes(b"not the medium's\n")
    dotdot = p._next_ino()
    p._ntt_inode(p.fresh, dotdot, [b"/.." * 30 + os.fsencode(secret)], secret.stat().st_size)
    via_symlink = p._next_ino()
    os.symlink(tmp_path, p.fresh_mount / "lib")  # an absolute symlink on the medium
    p._ntt_inode(p.fresh, via_symlink, [p.mount_path(p.fresh, "lib/this-machines-file")], secret.stat().st_size)
    nul = p._next_ino()
    p._ntt_inode(p.fresh, nul, [p.mount_path(p.fresh, "new/bad") + b"\0name"], 5)
    code, summary = run(p, capsys, "copy", "--medium", "fresh-disk", "--source-prefix", p.source_prefix())
    assert code == 1 and summary["ranges_failed"] == 0
    rows = dict(p.conn.execute("SELECT ino, (status, blobid) FROM inode WHERE medium_hash = %s AND ino = ANY(%s)",
                               (p.fresh, [dotdot, via_symlink, nul])).fetchall())
    assert rows == {dotdot: ("failed_permanent", None), via_symlink: ("failed_permanent", None),
                    nul: ("failed_permanent", None)}
    assert [s for ino, s in fresh_statuses(p).items() if s != "success"] == ["failed_permanent"] * 3
    import blake3
    assert not os.path.exists(by_hash_path(p.by_hash_root, blake3.blake3(secret.read_bytes()).hexdigest()))


def test_a_medium_mounted_while_its_range_is_read_is_read_from_then_on(production, capsys, monkeypatch):
    """Each file is opened beneath the mount as it is at that moment: a medium mounted in mid-range is read
    from there on (and one being unmounted is never held busy by a descriptor of the range)."""
    from relinker import sources

    p = production
    migrate(p, capsys)
    mounted_later = p.mounts / "not-mounted-yet"
    os.rename(p.fresh_mount, mounted_later)
    p.fresh_mount.mkdir()  # the empty mount point
    real_open = sources.MediumSources.open
    calls = []

    def open_then_mount(self, top, below):
        calls.append(below)
        if len(calls) == 2:  # after the first file failed, and was judged, while nothing was mounted
            os.rmdir(p.fresh_mount)
            os.rename(mounted_later, p.fresh_mount)
        return real_open(self, top, below)

    monkeypatch.setattr(sources.MediumSources, "open", open_then_mount)
    run(p, capsys, "copy", "--medium", "fresh-disk", "--source-prefix", p.source_prefix(), "--workers", "1")
    statuses = list(fresh_statuses(p).values())
    assert "failed_permanent" not in statuses and statuses.count("success") >= len(statuses) - 1, statuses


@pytest.mark.parametrize("links_lost", [False, True])
def test_copy_counts_in_full_a_content_whose_blobs_row_the_catalogue_lacks(production, capsys, links_lost):
    """Inodes of the stored medium name the licence, its blobs row is gone (and maybe their links too):
    the fresh medium's copy of the same content makes the row with every catalogued path, not only its own."""
    p = production
    migrate(p, capsys)
    assert run(p, capsys, "relink")[0] == 0
    p.conn.execute("DELETE FROM blobs WHERE blobid = %s", (p.licence,))
    stored_paths = [bytes(path) for (path,) in p.conn.execute(
        "SELECT p.path FROM path p JOIN inode i USING (medium_hash, ino) WHERE i.blobid = %s", (p.licence,))]
    assert len(stored_paths) == 3
    if links_lost:
        for path in stored_paths:
            os.unlink(p.archive_path(path))

    assert run(p, capsys, "copy", "--medium", "fresh-disk", "--source-prefix", p.source_prefix())[0] == 0

    assert p.conn.execute("SELECT n_hardlinks, expected_hardlinks FROM blobs WHERE blobid = %s",
                          (p.licence,)).fetchone() == ((1, 4) if links_lost else (4, 4))
    # what a night's check of incomplete blobs finds, and mends
    code, summary = run(p, capsys, "relink", "--only-incomplete")
    assert code == 0 and summary["links_created"] == (3 if links_lost else 0)
    code, summary = run(p, capsys, "count", "--new")
    assert code == 0 and summary["problems"] == 0, summary["problem_samples"]


def test_a_listed_blob_some_inode_names_without_a_blobs_row_is_the_catalogues(production, capsys, tmp_path):
    p = production
    migrate(p, capsys)
    assert run(p, capsys, "relink")[0] == 0
    p.conn.execute("DELETE FROM blobs WHERE blobid = %s", (p.licence,))
    listed = tmp_path / "listed"
    listed.write_text(f"{p.licence}\n{'0' * 64}\n")

    code, summary = run(p, capsys, "verify", "--from-file", str(listed))
    # the licence is checked and passes; an ID nothing names is no blob
    assert (code, summary["problems_by_kind"], summary["failed"]) == (1, {"unknown-blob": 1}, 1)
    code, summary = run(p, capsys, "relink", "--from-file", str(listed))
    assert (summary["links_present"], summary["problems_by_kind"]) == (3, {"unknown-blob": 1})


def test_a_by_hash_file_that_cannot_be_looked_at_keeps_its_count(production, capsys):
    """A store directory this process may not read (made by another user with a tight umask) says
    nothing about the blob's links: relink and count record the problem and leave the count alone."""
    from support import obeying_file_permissions, socket_open_to_all

    p = production
    migrate(p, capsys)
    assert run(p, capsys, "relink")[0] == 0
    before = p.n_hardlinks()
    shard = os.path.dirname(by_hash_path(p.by_hash_root, p.licence))
    os.chown(shard, 65534, 65534)
    os.chmod(shard, 0o700)
    try:
        with socket_open_to_all(p.dsn), obeying_file_permissions():
            relinked = run(p, capsys, "relink", "--new")
            counted = run(p, capsys, "count", "--new")
    finally:
        os.chown(shard, 0, 0)
        os.chmod(shard, 0o755)
    assert relinked[0] == 1 and relinked[1]["problems_by_kind"] == {"os-error": 1}
    assert counted[0] == 1 and counted[1]["problems_by_kind"] == {"os-error": 1}  # and no count-mismatch
    assert p.n_hardlinks() == before


def first_path(p, blobid: str) -> bytes:
    """The first catalogued path (in byte order) of a blob."""
    (path,), = p.conn.execute("SELECT p.path FROM relinker_path AS p JOIN inode AS i USING (medium_hash, ino) "
                              "WHERE i.blobid = %s ORDER BY p.path LIMIT 1", (blobid,))
    return bytes(path)


def test_an_archive_path_that_cannot_be_looked_at_keeps_its_blobs_count(production, capsys, tmp_path):
    """An archive directory without search permission (created with a wrong umask, as the reference
    says of the field) hides whether its links are there: counted as missing, the blob's count would
    fall and the next verify would fail a blob whose links are all in place."""
    from support import obeying_file_permissions, socket_open_to_all

    p = production
    migrate(p, capsys)
    assert run(p, capsys, "relink")[0] == 0
    before = p.n_hardlinks()
    path = first_path(p, p.licence)
    directory = os.path.dirname(p.archive_path(path))
    os.chmod(directory, 0o600)
    try:
        with socket_open_to_all(p.dsn), obeying_file_permissions():
            relinked = run(p, capsys, "relink", "--new")
            counted = run(p, capsys, "count", "--new")
    finally:
        os.chmod(directory, 0o755)
    for code, summary in (relinked, counted):
        assert code == 1 and set(summary["problems_by_kind"]) == {"os-error"}  # and no count-mismatch
    assert p.n_hardlinks() == before
    listed = tmp_path / "listed"
    listed.write_text(p.licence + "\n")
    assert run(p, capsys, "verify", "--from-file", str(listed))[0] == 0


def test_a_link_that_cannot_be_made_where_its_path_can_be_looked_at_is_counted_missing(production, capsys):
    """A read-only archive directory lets relink see that a link is missing, though not make it: the
    blob's count says so, and --only-incomplete finds it once the directory is writable again."""
    from support import read_only_directory

    p = production
    migrate(p, capsys)
    assert run(p, capsys, "relink")[0] == 0
    before = p.n_hardlinks()
    path = first_path(p, p.licence)
    link = p.archive_path(path)
    os.unlink(link)
    with read_only_directory(os.path.dirname(link)):
        code, summary = run(p, capsys, "relink", "--new")
    assert code == 1 and set(summary["problems_by_kind"]) == {"os-error"}
    assert p.n_hardlinks() == {**before, p.licence: before[p.licence] - 1}
    code, summary = run(p, capsys, "relink", "--only-incomplete")
    assert code == 0 and summary["links_created"] == 1
    assert p.n_hardlinks() == before


def test_column_grants_on_what_a_run_writes_are_enough(production, capsys):
    p = production
    migrate(p, capsys)
    grants = """
        GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role};
        GRANT UPDATE (n_hardlinks, expected_hardlinks, last_checked) ON blobs TO {role};
        GRANT INSERT (blobid, n_hardlinks, expected_hardlinks) ON blobs TO {role};
        GRANT UPDATE (blobid, by_hash_created, copied, processed_at, errors, status, error_type) ON inode TO {role};
        GRANT UPDATE (blobid) ON path TO {role};
        GRANT INSERT, UPDATE, DELETE ON relinker_run, relinker_range, relinker_problem, relinker_verify_failure
            TO {role};
        GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}"""
    with p.as_role("column_granted", grants) as role:
        for args in (("copy", "--source-prefix", p.source_prefix()), ("relink",), ("count",), ("verify", "--all")):
            code, summary = run(p, capsys, *args)
            assert code == 0, (args, summary["problem_samples"])
        p.conn.execute(f"REVOKE UPDATE (last_checked) ON blobs FROM {role}")
        assert main(p.argv("verify", "--all", "--no-progress")) == 2
        assert capsys.readouterr().err == (
            f"relinker: error: role {role} may not UPDATE blobs (last_checked), which a verify run writes "
            f"(GRANT UPDATE (last_checked) ON blobs TO {role})\n")


def test_statements_that_write_no_row_fire_no_catalogue_trigger(production, capsys):
    p = production
    migrate(p, capsys)
    for table in ("blobs", "path", "inode"):
        p.conn.execute(f"CREATE TRIGGER {table}_statement_noted AFTER INSERT OR UPDATE ON {table} "
                       "FOR EACH STATEMENT EXECUTE FUNCTION ntt_note_statement()")
    os.rename(p.fresh_mount, p.mounts / "elsewhere")  # unmounted: nothing is stored
    p.conn.execute("TRUNCATE ntt_audit")
    run(p, capsys, "copy", "--medium", "fresh-disk", "--source-prefix", p.source_prefix())
    fired = [what for (what,) in p.conn.execute("SELECT what FROM ntt_audit ORDER BY at")]
    assert fired == ["UPDATE on inode"]  # the inodes' errors, and nothing else

    p.conn.execute("TRUNCATE ntt_audit")
    code, summary = run(p, capsys, "verify", "--all", "--ranges", "16")
    ranges = p.conn.execute("SELECT count(*) FILTER (WHERE blobs > 0) FROM relinker_range WHERE run_id = %s",
                            (summary["run_id"],)).fetchone()[0]
    fired = [what for (what,) in p.conn.execute("SELECT what FROM ntt_audit")]
    assert 0 < fired.count("UPDATE on blobs") <= ranges < 16


def test_a_scan_into_partitions_with_the_ntt_foreign_key_writes_inodes_first_and_no_empty_statement(
        production, capsys, tmp_path):
    """NTT's path partitions refer to inode's: a scan writes a path only once its inode is there, and,
    for a medium new to the catalogue, runs no DELETE or UPDATE that would fire triggers for no row."""
    from production import PARTITIONS
    from relinker import scan

    p = production
    migrate(p, capsys)
    tree = tmp_path / "tree"
    (tree / "d").mkdir(parents=True)
    (tree / "d" / "f").write_bytes(b"a file")
    (tree / "e").write_bytes(b"")
    medium = scan.medium_hash_for("scanned-disk")
    p.admin.execute(PARTITIONS.format(medium=medium, inode="ntt_inode_scanned", path="ntt_path_scanned"))
    for table in ("blobs", "path", "inode"):
        p.conn.execute(f"CREATE TRIGGER {table}_statement_noted AFTER INSERT OR UPDATE OR DELETE ON {table} "
                       "FOR EACH STATEMENT EXECUTE FUNCTION ntt_note_statement()")
    p.conn.execute("TRUNCATE ntt_audit")
    assert main(p.argv("scan", "--medium", "scanned-disk", str(tree))) == 0
    assert sorted(what for (what,) in p.conn.execute("SELECT what FROM ntt_audit")) == [
        "INSERT on inode", "INSERT on path"]
    assert p.conn.execute("SELECT count(*) FROM ntt_path_scanned").fetchone() == (4,)
    p.conn.execute("TRUNCATE ntt_audit")
    (tree / "d" / "g").write_bytes(b"another")
    assert main(p.argv("scan", "--medium", "scanned-disk", str(tree))) == 0  # a rescan, the same way
    assert sorted(what for (what,) in p.conn.execute("SELECT what FROM ntt_audit")) == [
        "DELETE on inode", "DELETE on path", "INSERT on inode", "INSERT on path"]
    assert p.conn.execute("SELECT count(*) FROM ntt_path_scanned").fetchone() == (5,)


def test_a_source_that_refuses_to_open_fails_retryably(production, capsys):
    """Permission denied is no proof the file is gone: failed_retryable, for a later run to try again."""
    from support import obeying_file_permissions, socket_open_to_all

    p = production
    migrate(p, capsys)
    refused = p.fresh_mount / "new" / "notes.txt"
    os.chmod(refused, 0o000)
    try:
        with socket_open_to_all(p.dsn), obeying_file_permissions():
            code, summary = run(p, capsys, "copy", "--source-prefix", p.source_prefix())
    finally:
        os.chmod(refused, 0o644)
    assert code == 1 and summary["problems_by_kind"] == {"source-unreadable": 1}, summary
    status = p.conn.execute("SELECT i.status, i.error_type FROM inode i JOIN path p USING (medium_hash, ino) "
                            "WHERE p.path = %s", (p.mount_path(p.fresh, "new/notes.txt"),)).fetchone()
    assert status == ("failed_retryable", "source-unreadable"), status
