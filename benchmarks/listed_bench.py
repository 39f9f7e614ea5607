#!/usr/bin/env python3
"""What a range of listed blob IDs costs the server on a catalogue of many media.

``--from-file`` and verify's ``--count`` give ranges of listed IDs rather than
intervals. Blob IDs do not follow media, so a range's query reaches every
partition of ``inode``, and with the list in the query's text the planner
weighs each ID against each partition. This builds a catalogue of M media
(one partition each, default 300) with B blobs spread over them, then runs
the queries of one range of N listed IDs (relink's work query, verify's
sizes) the way workers do, under ``EXPLAIN (ANALYZE)``, side by side with
the same queries for the interval range that holds the same blobs.

Usage::

    python benchmarks/listed_bench.py [--media M] [--blobs B] [--listed N] [--db-url DSN]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile

import psycopg
from psycopg import sql

from benchlib import start_database
from relinker import db, migrations, relink, scan, verify
from relinker.checkpoint import Range

SQL_FILL_MEDIUM = """
WITH blob AS (
    SELECT n, encode(sha256(int8send(n)), 'hex') AS blobid
    FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS n
), inodes AS (
    INSERT INTO inode (medium_hash, dev, ino, nlink, size, fs_type, blobid, copied, by_hash_created)
    SELECT %(medium)s, 1, n, 2, n, 'f', blobid, true, false FROM blob
)
INSERT INTO path (medium_hash, dev, ino, path, blobid)
SELECT %(medium)s, 1, n, convert_to(format('/mnt/ntt/%%s/d%%s/f%%s-%%s', %(medium)s, n %% 100, n, k), 'UTF8'), blobid
FROM blob CROSS JOIN generate_series(1, 2) AS k
"""
SQL_FILL_BLOBS = "INSERT INTO blobs (blobid) SELECT DISTINCT blobid FROM inode"


def times(conn: psycopg.Connection, query: str, params: dict) -> tuple[float, float, int]:
    """(planning ms, execution ms, rows) of one run of ``query``."""
    lines = [row[0] for row in conn.execute("EXPLAIN (ANALYZE, SUMMARY) " + query, params, prepare=False)]
    planning = float(re.search(r"Planning Time: ([\d.]+)", "\n".join(lines)).group(1))
    execution = float(re.search(r"Execution Time: ([\d.]+)", "\n".join(lines)).group(1))
    rows = int(float(re.search(r"rows=([\d.]+) loops=1\)", lines[0]).group(1)))
    return planning, execution, rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--media", type=int, default=300, metavar="M")
    parser.add_argument("--blobs", type=int, default=60_000, metavar="B", help="spread over the media")
    parser.add_argument("--listed", type=int, default=10_000, metavar="N", help="IDs in the range")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each query (the fastest is shown)")
    parser.add_argument("--db-url", metavar="DSN", help="use this server (a database is created and dropped)")
    args = parser.parse_args()

    workdir = tempfile.mkdtemp(prefix="listed-bench-")
    os.chmod(workdir, 0o755)  # the embedded server runs as a user of its own
    database = start_database(os.fsencode(workdir), args.db_url, keep=False, shared_buffers="default")
    dsn = database.dsn
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            migrations.migrate(conn, base=True)
            per_medium = -(-args.blobs // args.media)
            for m in range(args.media):
                medium = scan.medium_hash_for(f"listed-bench-{m}")
                conn.execute("INSERT INTO medium (medium_hash, medium_human) VALUES (%s, %s)", (medium, medium))
                scan.ensure_medium_partitions(conn, medium)
                conn.execute(SQL_FILL_MEDIUM, {"medium": medium, "first": m * per_medium + 1,
                                               "last": (m + 1) * per_medium})
            conn.execute(SQL_FILL_BLOBS)
            conn.execute("VACUUM (ANALYZE)")
            first = [b for (b,) in conn.execute("SELECT blobid FROM blobs ORDER BY blobid LIMIT %s",
                                                 (args.listed + 1,))]
        listed, beyond = first[:args.listed], first[args.listed:]
        ranges = {"listed": relink.RangeScope.of(Range(blobids=tuple(listed))),
                  "interval": relink.RangeScope.of(Range(lo=listed[0], hi=beyond[0] if beyond else None))}
        queries = {"relink's range query": lambda scope: scope.work_query(False),
                   "verify's sizes query": lambda scope: sql.SQL(verify.SQL_SIZES).format(scope=scope.where("i"))}
        print(f"{args.media} media, {args.blobs:,} blobs, a range of {len(listed):,} of them; "
              f"fastest of {args.repeat} runs, ms\n")
        print(f"{'':24} {'interval (baseline)':>26} {'listed IDs':>26}")
        print(f"{'':24} {'planning':>12} {'execution':>13} {'planning':>12} {'execution':>13}")
        with db.connect_for_ranges(dsn) as conn:
            for label, query in queries.items():
                found = {}
                for kind, scope in ranges.items():
                    text = query(scope).as_string(conn)
                    found[kind] = min(times(conn, text, scope.params) for _ in range(args.repeat))
                if found["listed"][2] != found["interval"][2]:
                    raise SystemExit(f"{label}: {found['listed'][2]} rows against {found['interval'][2]}")
                base, mine = found["interval"], found["listed"]
                print(f"{label:24} {base[0]:12.1f} {base[1]:13.1f} {mine[0]:12.1f} {mine[1]:13.1f}")
    finally:
        database.cleanup(keep=False)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
