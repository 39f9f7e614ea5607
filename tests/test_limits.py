"""What the host's limits do to a run: a process out of descriptors is its own trouble, never a path's."""

import json
import os
import resource
import threading

import pytest

from processes import finish, start
from relinker import store


def limited_to(descriptors: int):
    """A preexec function that lowers the open files limit, soft and hard (as `ulimit -n` does)."""
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (descriptors, descriptors))


def run_limited(world, descriptors: int, *argv: str) -> tuple[int, dict, str]:
    code, out, err = finish(start(world.argv(*argv, "--json", "--no-progress", "--workers", "1"),
                                  preexec_fn=limited_to(descriptors)))
    return code, json.loads(out) if out.strip() else {}, err


def test_few_descriptors_fail_no_sound_blob_and_record_no_path(world):
    """Under `ulimit -n 24` every path was an os-error (Too many open files): verify failed 391 sound
    blobs of 400, put them in --failed-ids and relinker_verify_failure, and ended complete. A
    descriptor the process lacks is no path's problem: the range fails and is redone, or, with a cache
    sized for the limit, never meets it."""
    world.bulk(400, paths_per_blob=3, media=3, directories=60)
    assert run_limited(world, 1024, "relink")[0] == 0
    for command in (["verify", "--all"], ["verify", "--all", "--hash"], ["count"], ["relink", "--new"]):
        code, summary, err = run_limited(world, 24, *command)
        assert summary.get("problems_by_kind", {}).get("os-error") is None, (command, summary, err)
        assert code == 0 or summary["ranges_failed"] > 0, (command, summary, err)
    assert world.conn.execute("SELECT count(*) FROM relinker_verify_failure").fetchone() == (0,)
    code, summary, err = run_limited(world, 1024, "verify", "--all", "--new")
    assert code == 0 and summary["blobs_failed"] == 0, (summary, err)


def deep_tree(top, levels: int, name: bytes = b"d" * 50) -> bytes:
    """A directory ``levels`` deep below ``top`` (past PATH_MAX as a whole) with a file at the bottom;
    the file's path below ``top``."""
    below = b"/".join([name] * levels)
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(levels):
            os.mkdir(name, dir_fd=fd)
            deeper = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = deeper
        with open(os.open(b"deep-file", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as f:
            f.write(b"at the bottom")
    finally:
        os.close(fd)
    return below + b"/deep-file"


def test_a_tree_deeper_than_the_descriptor_limit_is_scanned_and_copied_whole(world, tmp_path):
    """Opened component by component, every level's descriptor stayed open: under `ulimit -n 1024` a
    tree 2,000 levels deep lost its lower half from the catalogue (a re-scan replaces the medium) and
    copy failed its range on every run. Here 300 levels (15 KB of path) under a limit of 128."""
    top = tmp_path / "tree"
    top.mkdir()
    (top / "shallow").write_bytes(b"near the top")
    deep_tree(os.fsencode(top), 300)
    code, out, err = finish(start(world.argv("scan", "--medium", "deep", str(top)), preexec_fn=limited_to(128)))
    assert code == 0, err
    files = world.conn.execute("SELECT count(*) FROM inode WHERE fs_type = 'f'").fetchone()[0]
    assert files == 2
    code, summary, err = run_limited(world, 128, "copy")
    assert code == 0 and summary["files_copied"] == 2 and summary["links_created"] == 2, (summary, err)
    # (a path past PATH_MAX cannot be looked at here by its name: verify walks it as copy did)
    code, summary, err = run_limited(world, 128, "verify", "--all", "--hash")
    assert code == 0 and summary["blobs"] == 2 and summary["blobs_failed"] == 0, (summary, err)


def test_a_scan_out_of_descriptors_stops_and_keeps_the_medium_as_it_was(world, tmp_path, monkeypatch):
    """A directory the process had no descriptor for was counted unreadable and left out: the re-scan
    replaced the medium's rows without it. A scan out of descriptors stops; the rows stay."""
    from relinker import scan
    from relinker.errors import UserError

    top = tmp_path / "tree"
    top.mkdir()
    for n in range(40):
        (top / f"d{n}").mkdir()
        (top / f"d{n}" / "f").write_bytes(b"%d" % n)
    scan.scan_tree(world.conn, "wide", os.fsencode(top))
    before = world.conn.execute("SELECT count(*) FROM path").fetchone()[0]
    monkeypatch.setattr(scan, "raise_open_file_limit", lambda: None)  # the limit stays where the test puts it
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    open_now = len(os.listdir("/proc/self/fd")) - 1  # less the listing's own
    stopped = []
    try:
        # one descriptor more each time, until the walk (not what comes before it) is the first to lack one
        for spare in range(1, 10):
            resource.setrlimit(resource.RLIMIT_NOFILE, (open_now + spare, hard))
            try:
                scan.scan_tree(world.conn, "wide", os.fsencode(top))
            except UserError as exc:
                stopped.append(str(exc))
                break
            except OSError:
                continue  # before the walk: reading relinker's own files
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            pytest.fail(f"the scan went through with {spare} spare descriptors, never stopped")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    (message,) = stopped
    assert message.startswith("scan stopped at directory ") and message.endswith(
        ", the medium's rows left as they were: Too many open files (raise the open files limit: ulimit -n)"), message
    assert world.conn.execute("SELECT count(*) FROM path").fetchone()[0] == before


def test_a_sync_thread_that_cannot_start_leaves_nothing_to_stop(tmp_path, monkeypatch):
    """Under a low process limit the thread cannot start: the range failed, and stopping the store then
    joined a thread never started ("cannot join thread before it is started"), killing the worker."""
    def cannot_start(self):
        raise RuntimeError("can't start new thread")

    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        syncer = store._Syncer(fd)
        monkeypatch.setattr(threading.Thread, "start", cannot_start)
        with pytest.raises(RuntimeError, match="can't start new thread"):
            syncer.request()
        syncer.stop()
    finally:
        os.close(fd)


def test_few_descriptors_keep_no_sound_copy_as_a_problem(world):
    """A copy of a blob's content where its link belongs is compared with the by-hash file before it is
    replaced: out of descriptors, the comparison said "cannot be read to compare (Too many open files)",
    kept the copy as an existing-file problem, and the run ended complete with nothing to resume."""
    world.bulk(400, paths_per_blob=3, media=3, directories=60)
    assert run_limited(world, 1024, "relink")[0] == 0
    for blobid, paths in world.expected().items():
        world.replace_with_stale_copy(sorted(paths)[0])
    for descriptors in (19, 20):
        code, summary, err = run_limited(world, descriptors, "relink", "--new")
        assert not summary.get("problems_by_kind"), (descriptors, summary, err)
        assert code == 0 or summary["ranges_failed"] > 0, (descriptors, summary, err)
    code, summary, err = run_limited(world, 1024, "relink", "--new")
    assert code == 0 and not summary.get("problems_by_kind"), (summary, err)
    world.assert_complete(summary["run_id"])
