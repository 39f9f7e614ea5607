"""verify as a checkpointed job: killed and resumed, interrupted, last_checked written once per blob."""

import json
import os
import signal

import pytest

from processes import finish, kill_group, range_states, start, wait_for

pytestmark = pytest.mark.reliability


@pytest.fixture
def archive(busy):
    """The busy world's 60,000 links, made."""
    code, _out, err = finish(start(busy.argv("relink", "--no-progress", "--workers", "2")))
    assert code == 0, err
    return busy


def verify_argv(world, *args):
    return world.argv("verify", "--all", "--no-progress", "--json", "--workers", "2", "--ranges", "40", *args)


def last_checked(world) -> dict:
    return dict(world.conn.execute("SELECT blobid, last_checked FROM blobs WHERE last_checked IS NOT NULL"))


def blobs_of_done_ranges(world) -> set:
    ranges = world.conn.execute("SELECT lo, hi FROM relinker_range WHERE run_id = 2 AND status = 'done'").fetchall()
    return {b for (b,) in world.conn.execute("SELECT blobid FROM blobs")
            if any(lo <= b and (hi is None or b < hi) for lo, hi in ranges)}


def test_verify_killed_then_resumed_checks_no_finished_range_again(archive):
    busy = archive
    job = start(verify_argv(busy))
    wait_for(lambda: range_states(busy.conn, 2).get("done", 0) >= 4, what="some ranges done")
    kill_group(job)
    job.wait()
    assert range_states(busy.conn, 2).get("done", 0) < 40
    finished = dict(busy.conn.execute(
        "SELECT range_no, (finished_at, attempts) FROM relinker_range WHERE run_id = 2 AND status = 'done'"))
    stamps = last_checked(busy)
    # written with each range's commit: exactly the blobs of the ranges done, none of the others
    assert set(stamps) == blobs_of_done_ranges(busy)

    code, out, err = finish(start(verify_argv(busy)))
    assert code == 0, err
    summary = json.loads(out)
    assert summary["run_id"] == 2 and summary["checked"] == 6000 and summary["failed"] == 0
    again = dict(busy.conn.execute(
        "SELECT range_no, (finished_at, attempts) FROM relinker_range WHERE run_id = 2 AND range_no = ANY(%s)",
        (list(finished),)))
    assert again == finished  # the ranges done before the kill were not checked again
    after = last_checked(busy)
    assert len(after) == 6000
    assert {b: after[b] for b in stamps} == stamps  # each blob's last_checked written once


def test_ctrl_c_gives_verify_ranges_back_and_a_resume_ends_clean(archive):
    busy = archive
    job = start(verify_argv(busy))
    wait_for(lambda: range_states(busy.conn, 2).get("done", 0) >= 3, what="some ranges done")
    kill_group(job, signal.SIGINT)
    code, _out, err = finish(job, timeout=30)
    assert code == 3, err
    assert "resume with: relinker verify --run 2" in err
    states = range_states(busy.conn, 2)
    assert "running" not in states and states.get("done", 0) < 40, states
    code, out, err = finish(start(verify_argv(busy)))
    assert code == 0, err
    assert json.loads(out)["checked"] == 6000
    assert len(last_checked(busy)) == 6000


def test_a_failing_blob_never_gets_last_checked(archive):
    busy = archive
    blobid, path = busy.conn.execute(
        "SELECT i.blobid, p.path FROM inode i JOIN path p USING (medium_hash, ino) LIMIT 1").fetchone()
    os.unlink(busy.archive_path(bytes(path)))
    code, out, err = finish(start(verify_argv(busy)))
    assert code == 1, err
    summary = json.loads(out)
    assert summary["failed"] == 1 and summary["passed"] == 5999
    assert blobid not in last_checked(busy) and len(last_checked(busy)) == 5999
