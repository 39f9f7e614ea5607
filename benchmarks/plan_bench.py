#!/usr/bin/env python3
"""How long relinker takes to plan a run over a large catalogue.

Fills the ``blobs`` table of a fresh catalogue with N synthetic blob IDs
(default 5,000,000, about the production count), then times what a new
``relinker relink`` does before any worker starts: counting blobs, splitting
the blob-ID space into ranges and writing the run and its ranges; and the
same with ``--limit`` (which adds an ordered index probe for the upper bound).

Usage::

    python benchmarks/plan_bench.py [--blobs N] [--workdir DIR] [--db-url DSN]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import psycopg

from benchlib import start_database
from relinker import checkpoint, migrations, relink

SQL_FILL = """
INSERT INTO blobs (blobid)
SELECT encode(sha256(int8send(n)), 'hex') FROM generate_series(1, %s) AS n
"""


def timed(label: str, action) -> float:
    started = time.perf_counter()
    result = action()
    seconds = time.perf_counter() - started
    print(f"{label:<48} {seconds:8.2f} s   {result}")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blobs", type=int, default=5_000_000, metavar="N")
    parser.add_argument("--workdir", metavar="DIR", help="where the embedded server lives (default: a temp dir)")
    parser.add_argument("--db-url", metavar="DSN", help="use this server (a database is created and dropped)")
    args = parser.parse_args()

    workdir = tempfile.mkdtemp(prefix="plan-bench-", dir=args.workdir)
    os.chmod(workdir, 0o755)  # the embedded server runs as a user of its own
    database = start_database(os.fsencode(workdir), args.db_url, keep=False, shared_buffers="default")
    dsn = database.dsn
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            migrations.migrate(conn, base=True)
            timed(f"fill blobs with {args.blobs:,} IDs", lambda: conn.execute(SQL_FILL, (args.blobs,)).rowcount)
            timed("VACUUM ANALYZE blobs", lambda: conn.execute("VACUUM (ANALYZE) blobs") and "")

            def plan(options):
                bounds = relink.plan(conn, options, None, os.cpu_count() or 1, None)
                run_id = checkpoint.create_run(conn, "relink", b"/by-hash", b"/archive", options, bounds)
                return f"run {run_id}: {len(bounds):,} ranges"

            print()
            timed(f"plan a relink run over {args.blobs:,} blobs", lambda: plan({}))
            timed("plan a relink run with --limit 1000000", lambda: plan({"limit": 1_000_000}))
            timed("plan a relink run with --only-incomplete --limit 100",
                  lambda: plan({"only_incomplete": True, "limit": 100}))
    finally:
        database.cleanup(keep=False)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
