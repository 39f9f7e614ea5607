"""The claim protocol, one session at a time: what a worker gets when it asks for a range."""

import psycopg

from relinker import checkpoint


def new_run(world, n_ranges):
    return checkpoint.create_run(world.conn, "relink", world.by_hash_root, world.archive_root, {},
                                 checkpoint.split_blob_space(n_ranges))


def store_for(world, run_id, name="worker:1"):
    since = world.conn.execute("SELECT now()").fetchone()[0]
    return checkpoint.CheckpointStore(world.dsn, run_id, worker=name, lease=60, retry_timeout=5, since=since)


def test_a_claim_goes_past_a_range_whose_lock_another_session_holds(world):
    """A range locked by a session that cannot be ended, or not yet unlocked after a give-back, stalls no one."""
    run_id = new_run(world, 3)
    store = store_for(world, run_id)
    with psycopg.connect(world.dsn, autocommit=True) as holder:
        holder.execute(checkpoint.SQL_TRY_LOCK, (run_id, 0))
        try:
            first = store.claim()
            assert first.range_no == 1
            store.finish(first, checkpoint.Counters(), [], lambda conn: None)
            assert store.claim().range_no == 2
        finally:
            store.close()
        states = dict(world.conn.execute(
            "SELECT range_no, status FROM relinker_range WHERE run_id = %s", (run_id,)).fetchall())
        assert states == {0: "pending", 1: "done", 2: "running"}


def test_a_claim_with_every_open_range_locked_elsewhere_gets_nothing_yet(world):
    run_id = new_run(world, 2)
    store = store_for(world, run_id)
    with psycopg.connect(world.dsn, autocommit=True) as holder:
        for range_no in (0, 1):
            holder.execute(checkpoint.SQL_TRY_LOCK, (run_id, range_no))
        try:
            assert store.claim() is None
            assert store.open_ranges() == 2
        finally:
            store.close()
    store = store_for(world, run_id)  # the holder is gone: its locks with it
    try:
        assert store.claim().range_no == 0
    finally:
        store.close()
