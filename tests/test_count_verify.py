"""`relinker count` (the seed's hardlink counter) and `relinker verify` (its verifier)."""

import io
import json
import os

import psycopg
import pytest

from relinker import bloblist, verify as verify_module
from relinker.catalogue import EMPTY_SHA256
from relinker.checkpoint import Range
from relinker.errors import UserError
from relinker.cli import main
from relinker.paths import by_hash_path, by_hash_relpath
from relinker.pool import WorkSpec
from support import obeying_file_permissions
from test_range_loops import Context


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


def test_count_names_a_blob_without_a_row_whose_links_are_missing(linked, capsys, tmp_path):
    """No blobs row, no counts: relinker_incomplete_blobs and relink --only-incomplete cannot see it, so
    count says which blob it is, and relink --from-file with its ID makes its links."""
    b = linked.blobs["b"]
    linked.conn.execute("DELETE FROM blobs WHERE blobid = %s", (b,))
    os.unlink(linked.archive_path(b"/e/b2"))
    code, result = run(linked, capsys, "count", "--no-progress")
    assert code == 1 and result["links_missing"] == 1
    assert failures(result) == {(b, "incomplete-without-row")}
    code, result = run(linked, capsys, "relink", "--only-incomplete", "--no-progress")
    assert result["links_created"] == 0  # as said
    listed = tmp_path / "ids"
    listed.write_text(b + "\n")
    code, result = run(linked, capsys, "relink", "--from-file", str(listed), "--no-progress")
    assert code == 0 and result["links_created"] == 1
    code, result = run(linked, capsys, "count", "--no-progress")
    assert code == 0 and result["links_missing"] == 0 and result["problems"] == 0


def test_count_limit(linked, capsys):
    code, summary = run(linked, capsys, "count", "--dry-run", "--no-progress", "--limit", "1")
    assert code == 0 and summary["blobs"] == 1


def test_a_config_files_selection_gives_way_to_the_one_typed(linked, capsys, tmp_path):
    """One config file serves the nightly verify (count, mode) and a trial relink (limit): what is typed
    on the command line to choose the blobs otherwise (--all, a list; --count) wins, as with any option."""
    config = tmp_path / "relinker.conf"
    config.write_text("count = 1\nmode = oldest\nlimit = 1\n")
    listed = tmp_path / "listed.txt"
    listed.write_text(f"{linked.blobs['a']}\n{linked.blobs['b']}\n")
    with_config = ("--config", str(config), "--no-progress", "--workers", "1")
    code, result = run(linked, capsys, "verify", *with_config, "--all")
    assert code == 0 and result["checked"] == 3
    code, result = run(linked, capsys, "verify", *with_config, "--from-file", str(listed))
    assert code == 0 and result["checked"] == 2
    code, result = run(linked, capsys, "verify", *with_config)  # the file's nightly selection
    assert code == 0 and result["checked"] == 1
    code, result = run(linked, capsys, "relink", *with_config, "--from-file", str(listed), "--new")
    assert code == 0 and result["blobs"] == 2
    config.write_text("all = true\n")
    code, result = run(linked, capsys, "verify", *with_config, "--count", "2", "--mode", "oldest", "--new")
    assert code == 0 and result["checked"] == 2
    # both typed: still refused
    assert main(linked.argv("verify", "--all", "--count", "2")) == 2
    assert "--count chooses which blobs: not with --all" in capsys.readouterr().err
    # a run resumed by its ID goes on as planned, whatever the file says of the work
    config.write_text("count = 1\nmode = random\nlimit = 1\nhash = true\n")
    for command in ("verify", "relink"):
        run_id = linked.conn.execute("SELECT max(run_id) FROM relinker_run WHERE mode = %s", (command,)).fetchone()[0]
        linked.conn.execute("UPDATE relinker_range SET status = 'pending' WHERE run_id = %s", (run_id,))
        linked.conn.execute("UPDATE relinker_run SET status = 'open' WHERE run_id = %s", (run_id,))
        code, result = run(linked, capsys, command, *with_config, "--run", str(run_id))
        assert code == 0 and result["run_id"] == run_id and result["complete"], command
    assert main(linked.argv("relink", "--config", str(config), "--run", str(run_id), "--limit", "2")) == 2  # typed
    assert "planned for other work (no --limit, now --limit 2)" in capsys.readouterr().err


def checked(world):
    return {b for (b,) in world.conn.execute("SELECT blobid FROM blobs WHERE last_checked IS NOT NULL")}


def failures(result):
    """(blobid, kind) of every failure a verify summary shows."""
    return {(p["blobid"], p["kind"]) for p in result["problem_samples"]}


@pytest.mark.parametrize("selection", ["never", "oldest", "random"])
def test_verify_detects_each_kind_of_damage(linked, capsys, selection):
    a, b, c = linked.blobs["a"], linked.blobs["b"], linked.blobs["c"]
    os.unlink(linked.archive_path(b"/d/a2"))                       # missing link
    linked.replace_with_stale_copy(b"/e/b2", b"bravo")             # wrong inode
    code, result = run(linked, capsys, "verify", "--count", "3", "--mode", selection, "--no-progress")
    assert code == 1 and result["checked"] == 3, result
    assert result["passed"] == 1 and result["failed"] == 2, result["problem_samples"]
    kinds = failures(result)
    assert (a, "link-missing") in kinds and (b, "wrong-inode") in kinds
    assert (a, "count-mismatch") in kinds
    assert checked(linked) == {c}  # only the blob that passed
    rows = linked.conn.execute("SELECT kind FROM relinker_problem WHERE run_id = %s",
                               (result["run_id"],)).fetchall()
    assert len(rows) == result["problems"]


def test_verify_missing_by_hash_and_corrupted_content(linked, capsys, tmp_path):
    b, c = linked.blobs["b"], linked.blobs["c"]
    os.chmod(by_hash_path(linked.by_hash_root, b), 0o644)
    with open(by_hash_path(linked.by_hash_root, b), "r+b") as f:
        f.write(b"BRAVO")  # same size, other content: only --hash sees it
    os.unlink(by_hash_path(linked.by_hash_root, c))
    listing = tmp_path / "ids"
    listing.write_text(f"# blobs to check\n{b}\n{c}\n")
    code, result = run(linked, capsys, "verify", "--from-file", str(listing), "--no-progress")
    assert code == 1 and result["passed"] == 1
    assert failures(result) == {(c, "missing-by-hash")}
    code, result = run(linked, capsys, "verify", "--from-file", str(listing), "--hash", "--no-progress", "--new")
    assert code == 1 and result["passed"] == 0
    assert (b, "content-mismatch") in failures(result)
    assert result["bytes_read"] == len(b"bravo")  # c has no file to read


def test_verify_all_good_sets_last_checked(linked, capsys):
    code, result = run(linked, capsys, "verify", "--count", "10", "--hash", "--no-progress")
    assert code == 0 and result["passed"] == 3
    assert checked(linked) == set(linked.blobs.values())
    code, result = run(linked, capsys, "verify", "--count", "10", "--mode", "never", "--no-progress")
    assert code == 0 and result["checked"] == 0


def test_verify_all_checks_every_blob_including_those_without_paths(linked, capsys):
    orphan = linked.blob(b"no inode names me")
    gone = linked.blob(b"no file either", store=False)
    code, result = run(linked, capsys, "verify", "--all", "--hash", "--no-progress")
    assert code == 1 and result["checked"] == 5 and result["passed"] == 4, result
    assert failures(result) == {(gone, "missing-by-hash")}
    assert orphan in checked(linked) and gone not in checked(linked)


def test_verify_reads_ids_from_stdin(linked, capsys, monkeypatch):
    """Whatever comes in: a line that is not UTF-8 is an unknown blob, like any other stranger."""
    stdin = linked.blobs["a"].encode() + b"\n" + b"f" * 64 + b"\n\xff\xfe\n"
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="ascii"))
    code, result = run(linked, capsys, "verify", "--from-file", "-", "--no-progress")
    assert code == 1 and result["checked"] == 3
    assert sorted(p["kind"] for p in result["problem_samples"]) == ["unknown-blob", "unknown-blob"]


@pytest.mark.parametrize("rehash", [True, False])
def test_an_unreadable_by_hash_file_fails_verify_hash_only(linked, rehash):
    """--hash cannot read it: content-unreadable, never a traceback. Without --hash no content is read,
    and its size is an lstat's: nothing wrong."""
    b = linked.blobs["b"]
    os.chmod(by_hash_path(linked.by_hash_root, b), 0)
    work = verify_module.VerifyWork(WorkSpec(work=verify_module.VerifyWork, dsn="", options={"hash": rehash},
                                             by_hash_root=linked.by_hash_root, archive_root=linked.archive_root))
    ctx = Context()
    try:
        with obeying_file_permissions():
            work.check_source(b, by_hash_relpath(b), ctx)
            work.check_source(linked.blobs["a"], by_hash_relpath(linked.blobs["a"]), ctx)
    finally:
        work.close()
    assert [(kind, blobid) for kind, blobid, _ in ctx.problems] == ([("content-unreadable", b)] if rehash else [])
    assert ctx.counters.bytes_read == (len(b"alpha") if rehash else 0)


@pytest.mark.parametrize("given", [["--all", "--count", "5"], ["--all", "--mode", "random"],
                                   ["--from-file", "-", "--mode", "oldest"]])
def test_verify_refuses_a_count_or_mode_beside_another_selection(linked, capsys, given):
    """--count and --mode choose blobs: beside --all or --from-file they would be dropped without a word."""
    assert main(linked.argv("verify", "--no-progress", *given)) == 2
    err = capsys.readouterr().err
    assert err.startswith("relinker: error: --") and "chooses which blobs: not with --" in err
    assert err.count("\n") == 1
    assert linked.conn.execute("SELECT count(*) FROM relinker_run WHERE mode = 'verify'").fetchone() == (0,)


def test_a_random_sample_as_large_as_the_catalogue_or_larger_is_every_blob(linked, capsys):
    """A sample at or beyond the catalogue's size takes every blob at once: it drew as many random
    start points as it was asked for (a count of a billion took minutes and gigabytes; 2**63 - 1
    never ended), and a count beyond the catalogue's bigint is a usage error, not the database's."""
    for count in ("3", str(2**63 - 1)):
        code, result = run(linked, capsys, "verify", "--count", count, "--mode", "random", "--no-progress",
                           "--new")
        assert code == 0 and result["checked"] == 3, count
    with pytest.raises(SystemExit) as usage:
        main(linked.argv("verify", "--count", str(2**63), "--mode", "never"))
    assert usage.value.code == 2 and "--count: must be at most 9223372036854775807" in capsys.readouterr().err


def test_a_blob_without_a_blobs_row_that_fails_is_counted_failed(linked, capsys, tmp_path):
    """The catalogue may name a blob in inode alone: verify checks it, and says so in its figures."""
    linked.conn.execute("DELETE FROM blobs WHERE blobid = %s", (linked.blobs["a"],))
    os.unlink(linked.archive_path(b"/d/a1"))
    failed_ids = tmp_path / "failed"
    code, summary = run(linked, capsys, "verify", "--all", "--no-progress", "--failed-ids", str(failed_ids))
    assert code == 1 and summary["problems_by_kind"] == {"link-missing": 1}
    assert (summary["blobs"], summary["passed"], summary["failed"]) == (3, 2, 1)
    assert failed_ids.read_text().splitlines()[1:] == [linked.blobs["a"]]
    # Passing, it has no last_checked to write: a range of it alone fires no statement on blobs.
    os.link(by_hash_path(linked.by_hash_root, linked.blobs["a"]), linked.archive_path(b"/d/a1"))
    linked.conn.execute("""
        CREATE TABLE statements (what text);
        CREATE FUNCTION note_statement() RETURNS trigger LANGUAGE plpgsql AS
            $$ BEGIN INSERT INTO statements VALUES (TG_OP || ' on ' || TG_TABLE_NAME); RETURN NULL; END $$;
        CREATE TRIGGER blobs_noted AFTER UPDATE ON blobs FOR EACH STATEMENT EXECUTE FUNCTION note_statement()""")
    listed = tmp_path / "listed"
    listed.write_text(linked.blobs["a"] + "\n")
    code, summary = run(linked, capsys, "verify", "--from-file", str(listed), "--no-progress")
    assert code == 0 and (summary["blobs"], summary["passed"]) == (1, 1)
    assert linked.conn.execute("SELECT count(*) FROM statements").fetchone() == (0,)


def test_verify_accepts_the_catalogues_empty_blob(world, capsys):
    """The NTT copier named the empty content by the SHA-256 of nothing: --hash accepts it, and only for empty content."""
    m = world.medium("disk")
    path = by_hash_path(world.by_hash_root, EMPTY_SHA256)
    os.makedirs(os.path.dirname(path))
    open(path, "wb").close()
    world.conn.execute("INSERT INTO blobs (blobid) VALUES (%s)", (EMPTY_SHA256,))
    world.inode(m, [b"/empty-1", b"/empty-2"], EMPTY_SHA256)
    assert main(world.argv("relink", "--no-progress")) == 0
    capsys.readouterr()
    code, result = run(world, capsys, "verify", "--all", "--hash", "--no-progress")
    assert code == 0 and result["passed"] == 1, result
    os.chmod(path, 0o644)
    with open(path, "wb") as f:
        f.write(b"not empty any more")
    code, result = run(world, capsys, "verify", "--all", "--hash", "--no-progress", "--new")
    assert code == 1 and (EMPTY_SHA256, "content-mismatch") in failures(result)


def test_a_line_of_a_list_may_be_as_long_as_max_line(tmp_path):
    listed = tmp_path / "list"
    listed.write_text("a" * bloblist.MAX_LINE + "\nb\n")
    assert bloblist.blob_ids_from(str(listed)) == ["a" * bloblist.MAX_LINE, "b"]
    listed.write_text("a" * (bloblist.MAX_LINE + 1) + "\n")
    with pytest.raises(UserError, match="line 1 is longer than 4096 characters"):
        bloblist.blob_ids_from(str(listed))


def test_read_blob_ids_ignores_comments_and_blanks():
    assert bloblist.read_blob_ids(["# x\n", "\n", "ABC # trailing\n", " def \n"]) == ["abc", "def"]
    # a NUL, which no text column takes, is a malformed ID like any other
    assert bloblist.read_blob_ids(["ab\0cd\n"]) == ["ab\ufffdcd"]


def test_a_list_an_editor_saved_with_a_byte_order_mark_and_crlf_lists_its_first_blob(linked, capsys, tmp_path):
    listed = tmp_path / "listed.txt"
    listed.write_bytes(b"\xef\xbb\xbf" + f"{linked.blobs['a']}\r\n{linked.blobs['b']}\r\n".encode())
    assert bloblist.blob_ids_from(str(listed)) == [linked.blobs["a"], linked.blobs["b"]]
    code, result = run(linked, capsys, "verify", "--from-file", str(listed), "--no-progress")
    assert code == 0 and result["checked"] == 2 and result["problems"] == 0


@pytest.mark.parametrize("command", ["relink", "verify"])
def test_a_list_from_a_closed_stdin_is_a_usage_error(linked, capsys, monkeypatch, command):
    """``--from-file - <&-``: Python has no sys.stdin at all; one line, not an AttributeError."""
    monkeypatch.setattr("sys.stdin", None)
    assert main(linked.argv(command, "--from-file", "-", "--no-progress")) == 2
    assert capsys.readouterr().err == "relinker: error: --from-file -: standard input is closed\n"


def test_a_list_with_a_nul_byte_is_malformed_ids_not_a_database_error(linked, capsys, tmp_path):
    listed = tmp_path / "ids.txt"
    listed.write_bytes(linked.blobs["a"].encode() + b"\n" + b"ab\0cd\n")
    code, result = run(linked, capsys, "relink", "--no-progress", "--from-file", str(listed))
    assert code == 1 and result["problems_by_kind"] == {"unknown-blob": 1}, result


def test_verify_run_shows_in_the_progress_view(linked, capsys):
    os.unlink(linked.archive_path(b"/d/a2"))
    code, result = run(linked, capsys, "verify", "--count", "3", "--no-progress")
    row = linked.conn.execute("SELECT mode, status, ranges_done, blobs, links_present, links_missing, problems, "
                              "blobs_failed FROM relinker_run_progress WHERE run_id = %s",
                              (result["run_id"],)).fetchone()
    assert row == ("verify", "done", 1, 3, 5, 1, 2, 1)


def test_a_resumed_counts_bar_and_rate_count_the_paths_its_ranges_looked_at(linked, capsys, monkeypatch):
    """count's bar counts the paths it looked at, present or missing; resumed, it starts from what its
    done ranges hold, not from the partial counts a range given back kept, and its rate is over the
    paths of this session's ranges."""
    from relinker import jobs
    from relinker.report import ProgressBar, Summary

    break_archive(linked)
    os.unlink(linked.archive_path(b"/d/a1"))  # a: two links missing, one problem (its count)
    code, summary = run(linked, capsys, "count", "--no-progress", "--ranges", "16")
    assert summary["links_present"] == 3 and summary["links_missing"] == 3
    run_id = summary["run_id"]
    # b's range goes back to pending, its counts as a worker that died left them
    linked.conn.execute("UPDATE relinker_range SET status = 'pending', finished_at = NULL WHERE run_id = %s "
                        "AND %s >= lo AND (hi IS NULL OR %s < hi)", (run_id, linked.blobs["b"], linked.blobs["b"]))
    linked.conn.execute("UPDATE relinker_run SET status = 'open', finished_at = NULL WHERE run_id = %s",
                        (run_id,))
    done_paths, done_present_or_problem = linked.conn.execute(
        "SELECT sum(links_present + links_missing)::int, sum(links_present + problems)::int FROM relinker_range "
        "WHERE run_id = %s AND status = 'done'", (run_id,)).fetchone()
    assert done_paths != done_present_or_problem  # a's range: its missing paths are no problems of their own
    started_from = []

    class Recorded(ProgressBar):
        def __init__(self, ranges_total, ranges_done_before, paths_done_before, **kwargs):
            started_from.append(paths_done_before)
            super().__init__(ranges_total, ranges_done_before, paths_done_before, **kwargs)

    told, real_as_text = [], Summary.as_text

    def as_text(summary):
        told.append(summary.paths_this_session)
        return real_as_text(summary)

    monkeypatch.setattr(jobs, "ProgressBar", Recorded)
    monkeypatch.setattr(Summary, "as_text", as_text)
    assert main(linked.argv("count", "--no-progress", "--run", str(run_id))) == 1
    assert "(this session: " in capsys.readouterr().out
    assert started_from == [done_paths] and 0 < done_paths < 6
    # the summary's rate is over this session's paths (those of b's range), not the run's
    assert told and set(told) == {6 - done_paths}


def test_a_failed_ids_list_that_cannot_be_written_is_one_reason(linked, capsys, tmp_path):
    """After a recorded run, the database out of reach or the file refused: one line naming why (the
    run's summary still goes out, exit 1), never the database error's traceback or exit 2."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    code, result = run(linked, capsys, "verify", "--all", "--no-progress")
    assert code == 0
    gone = make_conninfo(linked.dsn, dbname=conninfo_to_dict(linked.dsn)["dbname"] + "_dropped")
    with pytest.raises(verify_module.FailedIdsNotWritten, match="cannot connect to the catalogue database"):
        verify_module.save_failed_ids(gone, result["run_id"], str(tmp_path / "failed"))
    with pytest.raises(verify_module.FailedIdsNotWritten, match="No such file or directory"):
        verify_module.save_failed_ids(linked.dsn, result["run_id"], str(tmp_path / "gone" / "failed"))
    assert verify_module.save_failed_ids(linked.dsn, result["run_id"], str(tmp_path / "failed")) == 0
    assert not (tmp_path / "gone").exists()
    # a name as long as a name may be: checked before the run, so it must be writable after it
    longest = tmp_path / ("f" * 255)
    assert verify_module.save_failed_ids(linked.dsn, result["run_id"], str(longest)) == 0
    assert longest.read_text().startswith("# blobs that failed")
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".relinker")]  # no temporary left


def test_failed_ids_then_relink_from_file_is_a_two_line_repair(linked, capsys, tmp_path):
    """`verify ... --failed-ids F && relink --from-file F`: only the failed blobs are touched."""
    a, b, c = linked.blobs["a"], linked.blobs["b"], linked.blobs["c"]
    os.unlink(linked.archive_path(b"/d/a2"))
    linked.replace_with_stale_copy(b"/e/b2", b"bravo")
    linked.conn.execute("UPDATE blobs SET n_hardlinks = 7 WHERE blobid = %s", (c,))  # wrong, and not listed
    failed = tmp_path / "failed.txt"
    code, result = run(linked, capsys, "verify", "--all", "--no-progress", "--failed-ids", str(failed))
    assert code == 1
    assert bloblist.blob_ids_from(str(failed)) == sorted([a, b, c])
    # a list of our own: c's wrong count is not the repair's business
    failed.write_text(f"{a}\n{b}\n{'0' * 64}\n")
    code, result = run(linked, capsys, "relink", "--from-file", str(failed), "--no-progress")
    assert code == 1 and result["problems_by_kind"] == {"unknown-blob": 1}
    assert result["links_created"] == 1 and result["links_replaced"] == 1 and result["blobs"] == 2
    counts = linked.n_hardlinks()
    assert counts[a] == 3 and counts[b] == 2 and counts[c] == 7
    # the same list again resumes nothing: that run is done; a fresh one finds all present
    code, result = run(linked, capsys, "relink", "--from-file", str(failed), "--no-progress", "--new")
    assert result["links_present"] == 5 and result["links_created"] == 0


def test_a_plain_relink_passes_over_an_unfinished_run_of_a_list(linked, capsys, tmp_path):
    listing = tmp_path / "one"
    listing.write_text(linked.blobs["a"] + "\n")
    run_id = linked.conn.execute(
        "INSERT INTO relinker_run (mode, by_hash_root, archive_root, options) VALUES ('relink', %s, %s, %s) "
        "RETURNING run_id", (linked.by_hash_root, linked.archive_root,
                             json.dumps({"requested": {"from_file": bloblist.listing_fingerprint(
                                 [linked.blobs["a"]]), "on_conflict": "replace", "only_incomplete": False,
                                 "limit": None}}))).fetchone()[0]
    linked.conn.execute("INSERT INTO relinker_range (run_id, range_no, lo, blobids) VALUES (%s, 0, '', %s)",
                        (run_id, [linked.blobs["a"]]))
    code, result = run(linked, capsys, "relink", "--no-progress")
    assert result["run_id"] != run_id and result["blobs"] == 3
    code, result = run(linked, capsys, "relink", "--no-progress", "--from-file", str(listing))
    assert result["run_id"] == run_id and result["blobs"] == 1 and code == 0


def test_verify_compares_the_by_hash_size_with_the_catalogue(linked, capsys):
    a = linked.blobs["a"]
    linked.conn.execute("UPDATE inode SET size = 999 WHERE blobid = %s", (a,))
    code, result = run(linked, capsys, "verify", "--all", "--no-progress")
    assert code == 1 and failures(result) == {(a, "size-mismatch")}


def test_verify_hash_passes_a_sound_content_whose_catalogue_size_is_wrong(linked, capsys, tmp_path):
    # The content hashes to its ID: the file is fine, and the catalogue's size is not relinker's to mend.
    a = linked.blobs["a"]
    linked.conn.execute("UPDATE inode SET size = 999 WHERE blobid = %s", (a,))
    log_file = tmp_path / "verify.log"
    code, result = run(linked, capsys, "verify", "--all", "--hash", "--no-progress", "--log-file", str(log_file))
    assert code == 0 and failures(result) == set()
    assert linked.conn.execute("SELECT last_checked IS NOT NULL FROM blobs WHERE blobid = %s",
                               (a,)).fetchone()[0]
    assert "sound (its content is its blob ID's) with 5 bytes, where the catalogue's inodes of the blob say [999]" \
        in log_file.read_text()


def test_verify_hash_fails_a_damaged_content_of_another_size_for_both(linked, capsys):
    a = linked.blobs["a"]
    with open(by_hash_path(linked.by_hash_root, a), "r+b") as damaged:
        damaged.truncate(3)
    code, result = run(linked, capsys, "verify", "--all", "--hash", "--no-progress")
    assert code == 1 and failures(result) == {(a, "size-mismatch"), (a, "content-mismatch")}


def test_verify_dry_run_writes_nothing(linked, capsys):
    os.unlink(linked.archive_path(b"/d/a2"))
    code, result = run(linked, capsys, "verify", "--all", "--dry-run", "--no-progress")
    assert code == 1 and result["dry_run"] and result["failed"] == 1 and result["checked"] == 3
    assert checked(linked) == set()
    assert linked.conn.execute("SELECT count(*) FROM relinker_run").fetchone() == (1,)  # the fixture's relink


@pytest.mark.parametrize("argv, message", [
    (["verify", "--all", "--dry-run", "--failed-ids", "x"], "--failed-ids needs a recorded run"),
    (["relink", "--from-file", "-", "--limit", "3"], "--limit and --from-file cannot be combined"),
    (["relink", "--from-file", "/nonexistent/list"], "--from-file /nonexistent/list: No such file"),
    # before the run, not after a night of it
    (["verify", "--all", "--failed-ids", "/nonexistent/dir/x"], "cannot write into /nonexistent/dir"),
    (["verify", "--all", "--failed-ids", "/tmp/" + "x" * 256], "File name too long"),
    # no list, and endless: read whole, it was memory until the kernel killed relinker
    (["relink", "--from-file", "/dev/zero"], "--from-file /dev/zero: line 1 is longer than 4096 characters"),
])
def test_list_options_a_user_can_get_wrong_are_one_line_and_exit_2(linked, capsys, argv, message):
    runs = linked.conn.execute("SELECT count(*) FROM relinker_run").fetchone()
    assert main(linked.argv(*argv)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert linked.conn.execute("SELECT count(*) FROM relinker_run").fetchone() == runs


def test_a_list_of_blobs_is_split_into_ranges_that_carry_their_ids():
    from relinker.checkpoint import split_blob_list

    ranges = split_blob_list(["c", "a", "b", "a", "e", "d"], 2)
    assert [r.blobids for r in ranges] == [("a", "b"), ("c", "d"), ("e",)]
    assert [(r.lo, r.hi) for r in ranges] == [("a", "c"), ("c", "e"), ("e", None)]
    assert split_blob_list([], 5) == []


def test_verify_hash_spreads_even_a_few_blobs_over_every_worker(linked, capsys):
    """A blob may hold gigabytes: with --hash three blobs are three ranges, without it one."""
    code, result = run(linked, capsys, "verify", "--all", "--hash", "--dry-run", "--no-progress", "--workers", "2")
    assert code == 0 and result["ranges_total"] == 3
    code, result = run(linked, capsys, "verify", "--all", "--dry-run", "--no-progress", "--workers", "2")
    assert code == 0 and result["ranges_total"] == 1


def test_last_checked_is_written_through_the_ranges_slice_of_the_primary_key(conn):
    """The passed list alone would be matched against every row of blobs (a sequential scan per range)."""
    conn.execute("INSERT INTO blobs (blobid) SELECT encode(sha256(n::text::bytea), 'hex') "
                 "FROM generate_series(1, 5000) AS n")
    conn.execute("VACUUM ANALYZE blobs")
    lo, hi = "40", "48"
    passed = [b for (b,) in conn.execute(
        "SELECT blobid FROM blobs WHERE blobid >= %s AND blobid < %s", (lo, hi))]
    scope = verify_module.RangeScope(listed=False, bounded=True, params={"lo": lo, "hi": hi})
    statement = verify_module.checked_statement(scope)
    with conn.transaction(force_rollback=True):
        plan = "\n".join(row[0] for row in conn.execute(
            verify_module.sql.SQL("EXPLAIN (ANALYZE, COSTS OFF) {}").format(statement),
            {"passed": passed, "lo": lo, "hi": hi}))
        assert conn.execute("SELECT count(*) FROM blobs WHERE last_checked IS NOT NULL").fetchone()[0] == len(passed)
    assert "Seq Scan" not in plan, plan
    assert "blobid >= " in plan, plan


def test_failed_ids_that_cannot_be_a_file_are_refused_before_the_run(linked, capsys, tmp_path):
    """A directory named by --failed-ids would end a night's run unable to write its list."""
    (tmp_path / "ids").mkdir()
    assert main(linked.argv("verify", "--all", "--no-progress", "--failed-ids", str(tmp_path / "ids"))) == 2
    assert "not a file" in capsys.readouterr().err
    assert linked.conn.execute("SELECT count(*) FROM relinker_run WHERE mode = 'verify'").fetchone() == (0,)


@pytest.mark.parametrize("trouble", ["not written", "ctrl-c"])
def test_a_list_not_written_after_a_complete_verify_leaves_its_summary_and_exit_1(linked, capsys, tmp_path,
                                                                                 monkeypatch, trouble):
    """The run is recorded and complete whatever becomes of its list: the summary goes out, and the exit
    code says the list is missing (a nightly `verify --failed-ids F && relink --from-file F` stops there),
    a Ctrl-C while it is written included."""
    import signal
    import time

    def save(dsn, run_id, destination):
        if trouble == "ctrl-c":
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler raises here
        raise verify_module.FailedIdsNotWritten("No space left on device")

    monkeypatch.setattr(verify_module, "save_failed_ids", save)
    failed = tmp_path / "failed.txt"
    code = main(linked.argv("verify", "--json", "--all", "--no-progress", "--failed-ids", str(failed)))
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert code == 1 and result["complete"] and result["failed"] == 0
    why = "interrupted" if trouble == "ctrl-c" else "No space left on device"
    assert f"--failed-ids {failed}: {why} (the run is recorded: relinker verify --run {result['run_id']} " in err


def test_a_failed_ids_list_that_cannot_be_written_leaves_no_temporary(linked, tmp_path, monkeypatch):
    def refused(source, destination):
        raise PermissionError(13, "Permission denied", destination)

    lists = tmp_path / "lists"
    lists.mkdir()
    monkeypatch.setattr(os, "replace", refused)
    with pytest.raises(PermissionError):
        verify_module.write_failed_ids(linked.conn, 1, str(lists / "failed.txt"))
    assert os.listdir(lists) == []


def test_a_failed_check_is_a_check_for_never_and_oldest(linked, capsys):
    """last_checked is only ever written for blobs that pass: without their failures on record, a nightly
    `verify --count N` would pick the same failing blobs every night and never get further."""
    a, b, c = sorted(linked.blobs.values())
    (size,) = linked.conn.execute("SELECT size FROM inode WHERE blobid = %s", (a,)).fetchone()
    linked.conn.execute("UPDATE inode SET size = 999 WHERE blobid = %s", (a,))  # a fails, and stays failing

    def pick(mode):
        code, result = run(linked, capsys, "verify", "--count", "1", "--mode", mode, "--no-progress", "--new")
        chosen = linked.conn.execute("SELECT blobids FROM relinker_range WHERE run_id = %s",
                                     (result["run_id"],)).fetchone()
        return (chosen[0][0] if chosen else None), result["failed"]

    assert [pick("never") for _ in range(4)] == [(a, 1), (b, 0), (c, 0), (None, 0)]
    assert linked.conn.execute("SELECT blobid FROM relinker_verify_failure").fetchall() == [(a,)]
    # oldest: b and c passed after a failed, so a comes first again; then b and c in turn
    assert [pick("oldest") for _ in range(3)] == [(a, 1), (b, 0), (c, 0)]
    # repaired, a passes, and is a failure no more
    linked.conn.execute("UPDATE inode SET size = %s WHERE blobid = %s", (size, a))
    assert pick("oldest") == (a, 0)
    assert linked.conn.execute("SELECT count(*) FROM relinker_verify_failure").fetchone() == (0,)


def test_an_incomplete_verify_writes_no_failed_ids_and_its_resume_will(linked, capsys, tmp_path, monkeypatch):
    """A list of part of a run would pass for the whole one in the two-line repair: none is written,
    and the resume command asks for it again."""
    from relinker import checkpoint

    failed = tmp_path / "failed.txt"
    failed.write_text("# an older list\n")

    def refused(self, conn):
        raise psycopg.errors.TooManyConnections("sorry, too many clients already")

    with monkeypatch.context() as patched:
        patched.setattr(checkpoint.CheckpointStore, "_claim_once", refused)
        code = main(linked.argv("verify", "--all", "--no-progress", "--retry-timeout", "1", "--failed-ids", str(failed)))
    err = capsys.readouterr().err
    run_id = linked.last_run()
    assert code == 1 and failed.read_text() == "# an older list\n"
    assert f"--failed-ids {failed} not written: run {run_id} is not complete" in err
    assert err.strip().splitlines()[-1].endswith(
        f"; resume with: {linked.resume('verify', run_id, '--failed-ids', str(failed))}"), err
    assert main(linked.argv("verify", "--run", str(run_id), "--no-progress", "--failed-ids", str(failed))) == 0
    assert bloblist.read_blob_ids(failed.read_text().splitlines()) == []


def test_the_resume_command_names_the_failed_ids_file_from_anywhere(linked, capsys, tmp_path, monkeypatch):
    """--failed-ids given relative to where verify ran: its resume, typed in another directory (another
    terminal, cron), must write the list to the same file."""
    from relinker import checkpoint

    def refused(self, conn):
        raise psycopg.errors.TooManyConnections("sorry, too many clients already")

    monkeypatch.setattr(checkpoint.CheckpointStore, "_claim_once", refused)
    monkeypatch.chdir(tmp_path)
    code = main(linked.argv("verify", "--all", "--no-progress", "--retry-timeout", "1", "--failed-ids", "failed.txt"))
    assert code == 1
    err = capsys.readouterr().err
    run_id = linked.conn.execute("SELECT max(run_id) FROM relinker_run").fetchone()[0]
    assert err.strip().splitlines()[-1].endswith(
        f"; resume with: {linked.resume('verify', run_id, '--failed-ids', str(tmp_path / 'failed.txt'))}"), err


def test_a_blob_that_came_during_verifys_walk_is_not_passed_unlooked_at(linked, capsys, monkeypatch):
    """A blob, its inode and a path committed while a range's paths were being read: the range's blobs
    rows read after the walk held it, and it passed (last_checked) with its missing link never looked at."""
    from relinker import relink

    late = "e" * 64
    linked.store_file(late, b"late")
    real = relink.blobs_within

    def a_blob_arrives_once_the_walk_has_begun(rows, *args, **kwargs):
        def arriving():
            for n, row in enumerate(rows):
                yield row
                if n == 0:
                    with psycopg.connect(linked.dsn, autocommit=True) as other, other.transaction():
                        other.execute("INSERT INTO blobs (blobid) VALUES (%s)", (late,))
                        medium = other.execute("SELECT medium_hash FROM medium").fetchone()[0]
                        other.execute("INSERT INTO inode (medium_hash, dev, ino, nlink, size, fs_type, blobid) "
                                      "VALUES (%s, 1, 999, 1, 4, 'f', %s)", (medium, late))
                        other.execute("INSERT INTO path (medium_hash, dev, ino, path, blobid) "
                                      "VALUES (%s, 1, 999, '/late/never-linked', %s)", (medium, late))
        return real(arriving(), *args, **kwargs)

    monkeypatch.setattr(relink, "blobs_within", a_blob_arrives_once_the_walk_has_begun)  # forked workers inherit it
    code, summary = run(linked, capsys, "verify", "--all", "--no-progress", "--workers", "1", "--ranges", "1")
    assert code == 0 and summary["blobs"] == 3 and summary["blobs_failed"] == 0, summary
    assert linked.conn.execute("SELECT last_checked FROM blobs WHERE blobid = %s", (late,)).fetchone() == (None,)
    monkeypatch.setattr(relink, "blobs_within", real)
    code, summary = run(linked, capsys, "verify", "--all", "--no-progress", "--workers", "1", "--new")
    assert code == 1 and summary["problems_by_kind"] == {"link-missing": 1}, summary


@pytest.mark.parametrize("selection", [["--count", "3", "--mode", "never"], ["--count", "3", "--mode", "random"]])
def test_a_blob_removed_from_the_catalogue_after_verify_chose_it_is_no_failure(
        linked, capsys, tmp_path, monkeypatch, selection):
    """verify --count chose its blobs from the catalogue: one removed before the run was resumed is gone,
    not an unknown blob failed and listed for relink --from-file, which would fail on it too."""
    from relinker import checkpoint

    def refused(self, conn):
        raise psycopg.errors.TooManyConnections("sorry, too many clients already")

    with monkeypatch.context() as patched:
        patched.setattr(checkpoint.CheckpointStore, "_claim_once", refused)
        assert main(linked.argv("verify", *selection, "--no-progress", "--retry-timeout", "1")) == 1
    run_id = linked.last_run()
    capsys.readouterr()
    gone = linked.blobs["c"]
    for table in ("path", "inode", "blobs"):
        linked.conn.execute(f"DELETE FROM {table} WHERE blobid = %s", (gone,))
    failed = tmp_path / "failed.txt"
    code, summary = run(linked, capsys, "verify", "--run", str(run_id), "--no-progress", "--failed-ids", str(failed))
    assert code == 0 and summary["blobs"] == 2 and summary["problems"] == 0, summary
    assert bloblist.read_blob_ids(failed.read_text().splitlines()) == []
    # a list of the user's is another matter: an ID no blob has is named
    listed = tmp_path / "listed.txt"
    listed.write_text(gone + "\n")
    code, summary = run(linked, capsys, "verify", "--from-file", str(listed), "--no-progress")
    assert code == 1 and summary["problems_by_kind"] == {"unknown-blob": 1}, summary


def test_verifys_sizes_of_a_listed_range_are_read_through_the_blobid_index(world):
    """A range of listed IDs (--from-file, --count) matched against every inode partition row by row:
    a sequential scan of the whole table for each range of 10,000 IDs."""
    medium = world.medium("disk")
    world.conn.execute("INSERT INTO inode (medium_hash, dev, ino, nlink, size, fs_type, blobid) "
                       "SELECT %s, 1, n, 1, 100, 'f', encode(sha256(n::text::bytea), 'hex') "
                       "FROM generate_series(1, 200000) AS n", (medium,))
    world.conn.execute("VACUUM ANALYZE inode")
    every = sorted(b for (b,) in world.conn.execute("SELECT blobid FROM inode"))
    middle = verify_module.plan_list(every, 2, 20)[10]
    listed = middle.blobids
    scope = verify_module.RangeScope.of(Range.of(1, 10, middle))
    query = verify_module.sql.SQL(verify_module.SQL_SIZES).format(scope=scope.where("i"))
    plan = "\n".join(row[0] for row in world.conn.execute(
        verify_module.sql.SQL("EXPLAIN (COSTS OFF) {}").format(query), scope.params))
    assert "Seq Scan" not in plan, plan
    sizes = dict(world.conn.execute(query, scope.params))
    assert sizes.keys() == set(listed) and len(listed) == 10000


def test_a_random_sample_gives_every_blob_the_same_chance(world):
    """Blob IDs are hashes, but their gaps are uneven: the blob found after each random ID is drawn in
    proportion to the gap before it. One blob after a gap of half the ID space was in every sample."""
    world.conn.execute("INSERT INTO blobs (blobid) SELECT '00000000' || left(encode(sha256(n::text::bytea), 'hex'), 56) "
                       "FROM generate_series(1, 999) AS n")
    alone = "8" + "0" * 63
    world.conn.execute("INSERT INTO blobs (blobid) VALUES (%s)", (alone,))
    samples = [verify_module.select_blobs(world.conn, "random", 10) for _ in range(20)]
    assert all(len(set(sample)) == 10 for sample in samples)
    # one chance in a hundred each time: more than 5 of 20 is one chance in about 10**8
    assert sum(alone in sample for sample in samples) <= 5
    assert len(set().union(*samples)) > 150  # and not the same few each time


def test_listed_ranges_select_their_blobs_in_a_collation_that_is_not_code_point_order(en_us_admin_dsn, tmp_path,
                                                                                      capsys):
    """A list's bounds were its first and last lines in Python's order: in en_US a stray line `-typo`
    sorts as `typo`, past every hex ID, and no listed blob was found (relink linked none and called
    every one unknown)."""
    from relinker import migrations
    from support import ArchiveWorld

    admin = psycopg.conninfo.make_conninfo(en_us_admin_dsn, dbname="postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        name = f"relinker_en_us_{os.getpid()}"
        conn.execute(f"CREATE DATABASE {name} TEMPLATE template0 LOCALE 'en_US.UTF-8' ENCODING 'UTF8'")
    dsn = psycopg.conninfo.make_conninfo(admin, dbname=name)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert conn.execute("SELECT '-typo' > 'f'").fetchone() == (True,)  # not code-point order
            migrations.migrate(conn, base=True)
        world = ArchiveWorld(dsn, tmp_path / "world")
        try:
            m = world.medium("disk")
            blobs = [world.blob(b"content %d" % n) for n in range(4)]
            for n, blobid in enumerate(blobs):
                world.inode(m, [b"/d/%d" % n], blobid)
            listed = tmp_path / "listed.txt"
            listed.write_text("\n".join(blobs + ["-typo"]) + "\n")
            code, summary = run(world, capsys, "relink", "--from-file", str(listed), "--no-progress")
            assert code == 1 and summary["links_created"] == 4, summary
            assert summary["problems_by_kind"] == {"unknown-blob": 1}, summary
            code, summary = run(world, capsys, "verify", "--from-file", str(listed), "--no-progress")
            assert summary["blobs_failed"] == 1 and summary["problems_by_kind"] == {"unknown-blob": 1}, summary
        finally:
            world.close()
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
