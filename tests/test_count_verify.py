"""`relinker count` (the seed's hardlink counter) and `relinker verify` (its verifier)."""

import io
import json
import os

import pytest

from relinker import verify as verify_module
from relinker.cli import main
from relinker.paths import by_hash_path
from support import obeying_file_permissions


def run(world, capsys, command, *args):
    code = main(world.argv(command, "--json", *args))
    return code, json.loads(capsys.readouterr().out)


@pytest.fixture
def linked(world, capsys):
    """Three blobs, all linked by relink."""
    m = world.medium("disk")
    blobs = {name: world.blob(content) for name, content in
             (("a", b"alpha"), ("b", b"bravo"), ("c", b"charlie"))}
    world.inode(m, [b"/d/a1", b"/d/a2", b"/e/a3"], blobs["a"])
    world.inode(m, [b"/d/b1", b"/e/b2"], blobs["b"])
    world.inode(m, [b"/d/c1"], blobs["c"])
    assert main(world.argv("relink", "--no-progress", "--workers", "1")) == 0
    capsys.readouterr()
    world.blobs = blobs
    return world


def break_archive(world):
    """Delete one link of a, replace one link of b with a stale copy."""
    os.unlink(world.archive_path(b"/d/a2"))
    world.replace_with_stale_copy(b"/e/b2", b"bravo")


def test_count_finds_damage_and_fixes_counts_only_without_dry_run(linked, capsys):
    break_archive(linked)
    before = linked.n_hardlinks()
    code, summary = run(linked, capsys, "count", "--dry-run", "--no-progress")
    assert code == 1
    assert summary["links_present"] == 4 and summary["links_missing"] == 2
    assert summary["problems_by_kind"] == {"count-mismatch": 2}
    assert linked.n_hardlinks() == before  # dry run: nothing written
    assert linked.conn.execute("SELECT count(*) FROM relinker_run WHERE mode = 'count'").fetchone() == (0,)

    code, summary = run(linked, capsys, "count", "--no-progress")
    assert code == 1 and summary["status"] == "done"
    counts = linked.n_hardlinks()
    assert counts == {linked.blobs["a"]: 2, linked.blobs["b"]: 1, linked.blobs["c"]: 1}
    # counted, not repaired
    assert not os.path.lexists(linked.archive_path(b"/d/a2"))
    code, summary = run(linked, capsys, "count", "--no-progress", "--new")
    assert code == 0 and summary["problems"] == 0


def test_count_limit(linked, capsys):
    code, summary = run(linked, capsys, "count", "--dry-run", "--no-progress", "--limit", "1")
    assert code == 0 and summary["blobs"] == 1


def checked(world):
    return {b for (b,) in world.conn.execute("SELECT blobid FROM blobs WHERE last_checked IS NOT NULL")}


@pytest.mark.parametrize("selection", ["never", "oldest", "random"])
def test_verify_detects_each_kind_of_damage(linked, capsys, selection):
    a, b, c = linked.blobs["a"], linked.blobs["b"], linked.blobs["c"]
    os.unlink(linked.archive_path(b"/d/a2"))                       # missing link
    linked.replace_with_stale_copy(b"/e/b2", b"bravo")             # wrong inode
    code, result = run(linked, capsys, "verify", "--count", "3", "--mode", selection)
    assert code == 1 and result["checked"] == 3, result
    assert result["passed"] == 1 and result["failed"] == 2, result["failures"]
    kinds = {(f["blobid"], f["kind"]) for f in result["failures"]}
    assert (a, "link-missing") in kinds and (b, "wrong-inode") in kinds
    assert (a, "count-mismatch") in kinds
    assert checked(linked) == {c}  # only the blob that passed
    rows = linked.conn.execute("SELECT kind FROM relinker_problem WHERE run_id = %s",
                               (result["run_id"],)).fetchall()
    assert len(rows) == len(result["failures"])


def test_verify_missing_by_hash_and_corrupted_content(linked, capsys, tmp_path):
    b, c = linked.blobs["b"], linked.blobs["c"]
    os.chmod(by_hash_path(linked.by_hash_root, b), 0o644)
    with open(by_hash_path(linked.by_hash_root, b), "r+b") as f:
        f.write(b"BRAVO")  # same size, other content: only --hash sees it
    os.unlink(by_hash_path(linked.by_hash_root, c))
    listing = tmp_path / "ids"
    listing.write_text(f"# blobs to check\n{b}\n{c}\n")
    code, result = run(linked, capsys, "verify", "--from-file", str(listing))
    assert code == 1 and result["passed"] == 1
    assert {(f["blobid"], f["kind"]) for f in result["failures"]} == {(c, "missing-by-hash")}
    code, result = run(linked, capsys, "verify", "--from-file", str(listing), "--hash")
    assert code == 1 and result["passed"] == 0
    assert (b, "content-mismatch") in {(f["blobid"], f["kind"]) for f in result["failures"]}


def test_verify_all_good_sets_last_checked(linked, capsys):
    code, result = run(linked, capsys, "verify", "--count", "10", "--hash")
    assert code == 0 and result["passed"] == 3
    assert checked(linked) == set(linked.blobs.values())
    code, result = run(linked, capsys, "verify", "--count", "10", "--mode", "never")
    assert code == 0 and result["checked"] == 0


def test_verify_reads_ids_from_stdin(linked, capsys, monkeypatch):
    """Whatever comes in: a line that is not UTF-8 is an unknown blob, like any other stranger."""
    stdin = linked.blobs["a"].encode() + b"\n" + b"f" * 64 + b"\n\xff\xfe\n"
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="ascii"))
    code, result = run(linked, capsys, "verify", "--from-file", "-")
    assert code == 1 and result["checked"] == 3
    assert [f["kind"] for f in result["failures"]] == ["unknown-blob", "unknown-blob"]


def test_verify_hash_of_an_unreadable_by_hash_file_is_a_failure(linked):
    b = linked.blobs["b"]
    os.chmod(by_hash_path(linked.by_hash_root, b), 0)
    with obeying_file_permissions():  # the catalogue's connection is already open
        result = verify_module.verify(linked.conn, sorted(linked.blobs.values()), selection="from-file",
                                      by_hash_root=linked.by_hash_root, archive_root=linked.archive_root,
                                      rehash=True)
    assert result.passed == 2
    assert [(f.blobid, f.kind) for f in result.failures] == [(b, "content-unreadable")]


def test_a_verify_that_stops_half_way_leaves_no_run(linked, monkeypatch):
    """The run and its findings are written together: nothing half-done shows in psql."""
    def lost_connection(*args):
        raise KeyboardInterrupt()

    monkeypatch.setattr(verify_module, "_check_blob", lost_connection)
    with pytest.raises(KeyboardInterrupt):
        verify_module.verify(linked.conn, list(linked.blobs.values()), selection="never",
                             by_hash_root=linked.by_hash_root, archive_root=linked.archive_root, rehash=False)
    assert linked.conn.execute("SELECT count(*) FROM relinker_run WHERE mode = 'verify'").fetchone() == (0,)


def test_read_blob_ids_ignores_comments_and_blanks():
    assert verify_module.read_blob_ids(["# x\n", "\n", "ABC # trailing\n", " def \n"]) == ["abc", "def"]


def test_verify_run_shows_in_the_progress_view(linked, capsys):
    os.unlink(linked.archive_path(b"/d/a2"))
    code, result = run(linked, capsys, "verify", "--count", "3")
    row = linked.conn.execute("SELECT mode, status, ranges_done, blobs, links_present, links_missing, problems "
                              "FROM relinker_run_progress WHERE run_id = %s", (result["run_id"],)).fetchone()
    assert row == ("verify", "done", 1, 3, 5, 1, 2)
