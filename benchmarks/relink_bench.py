#!/usr/bin/env python3
"""Benchmark ``relinker relink`` against the bare cost of ``os.link``.

One run builds a synthetic NTT catalogue of N paths in production shape (an
embedded PostgreSQL, or a fresh database on ``--db-url``), a by-hash store
with one small real file per blob, and then measures on that same data:

1. the floor: a bare ``os.link`` loop over every (by-hash path, archive
   path) pair, fetched beforehand, making each archive directory the first
   time a link needs it; and, stricter, the same loop with every directory
   made before the clock starts ("links only");
2. relinker's fixed cost: ``relink --new --dry-run --limit 0`` (interpreter
   start, imports, planning, one worker spawned, one empty range);
3. ``relink --new --workers 1`` into an empty archive;
4. ``relink --new --workers 2`` into an empty archive;
5. ``relink --new --workers 2`` over the complete archive (the nightly
   "check everything" run: every link is already there), then, when the C
   extension is built, again with ``RELINKER_NO_DIRECTORY_LISTINGS=1`` (the
   C loop with an ``fstatat`` per path) and with ``RELINKER_PURE_PYTHON=1``
   (the loop in Python); one untimed re-check runs before them.

relinker runs as a subprocess, exactly as an operator would run it; its wall
clock includes everything (startup, planning, claims, commits, the
n_hardlinks updates). See benchmarks/README.md for the data's shape and how
to read the table.

Usage::

    python benchmarks/relink_bench.py [--paths N] [--workdir DIR] [--keep]
                                      [--db-url DSN] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import binascii
import collections
import contextlib
import dataclasses
import os
import platform
import random
import resource
import shutil
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor

import blake3
import psutil
import psycopg

import relinker
from benchlib import (FAILURES, Database, Measurement, checkpoint_quietly, compile_relinker, cpu_model, cpu_seconds,
                      elapsed, expect, fail, filesystem_type, log, relinker_source, reset_own_peak_rss, run_relinker,
                      speedups_built, start_database, vm_hwm_kib, write_figures)
from relinker import migrations, scan
from relinker.paths import archive_components, by_hash_path

# --- the synthetic catalogue's shape ------------------------------------------

#: Paths-per-blob mixture: (probability, lowest, highest), drawn uniformly
#: within a band. Mean ~2.9 paths per blob, so there are ~N/2.9 blobs; about
#: 42% of all paths belong to the 2% of blobs with ten or more paths.
PATHS_PER_BLOB = (
    (0.600, 1, 1),
    (0.300, 2, 2),
    (0.080, 3, 9),
    (0.018, 10, 60),
    (0.002, 100, 500),
)
#: Probability that a blob's second, third, ... path stays on the medium of
#: its first one; otherwise it lands on a random medium (one inode per
#: (blob, medium), as when the same file was copied onto several disks).
SAME_MEDIUM = 0.75
#: Average files per leaf directory: N=1M gives 10,000 leaf directories.
FILES_PER_DIRECTORY = 100
#: A leaf directory's children, for the two-level part of its name.
DIRECTORY_FANOUT = 40

SQL_COPY_BLOBS = "COPY blobs (blobid) FROM STDIN"
SQL_COPY_INODES = (
    "COPY inode (medium_hash, dev, ino, nlink, size, mtime, blobid, copied, fs_type, by_hash_created) FROM STDIN"
)
SQL_COPY_PATHS = "COPY path (medium_hash, dev, ino, path, blobid) FROM STDIN"
# Every link relinker must make: the same join and filters as relinker's
# own range query (relinker/relink.py), over the whole catalogue at once.
SQL_ALL_LINKS = """
COPY (
    SELECT i.blobid, p.path
    FROM inode AS i JOIN path AS p ON p.medium_hash = i.medium_hash AND p.ino = i.ino
    WHERE i.fs_type = 'f' AND p.exclude_reason IS NULL AND i.blobid IS NOT NULL
) TO STDOUT (FORMAT BINARY)
"""
# Put the catalogue back to "never relinked" so every from-empty run does the
# same database work (a run leaves alone the blobs whose counters are already
# right, so a second run from an empty archive would write nothing).
SQL_RESET_COUNTERS = """
UPDATE blobs SET n_hardlinks = 0, expected_hardlinks = NULL
WHERE n_hardlinks IS DISTINCT FROM 0 OR expected_hardlinks IS NOT NULL
"""
#: Threads creating (and, at the end, removing) the by-hash store: its cost
#: is latency, not CPU, so more threads than cores still pay off.
FS_THREADS = 4
#: Rows written per COPY write() call (pre-formatted text, joined).
COPY_BATCH = 4096
#: Archive links checked against their by-hash file after each run.
VERIFY_SAMPLE = 2000

# --- generation -------------------------------------------------------------------

@dataclasses.dataclass
class Catalogue:
    """What was generated (figures for the report)."""

    paths: int = 0
    blobs: int = 0
    inodes: int = 0
    media: int = 0
    leaf_directories: int = 0
    max_paths_per_blob: int = 0
    seconds: float = 0.0


def paths_for_next_blob(rng: random.Random) -> int:
    r = rng.random()
    for probability, lowest, highest in PATHS_PER_BLOB:
        if r < probability:
            return lowest if lowest == highest else rng.randint(lowest, highest)
        r -= probability
    return PATHS_PER_BLOB[-1][2]


def leaf_directories(medium_hash: str, count: int) -> list[bytes]:
    """``count`` distinct directories of one medium, 2 to 4 levels below it.

    The first two levels (``dTTT/dMMM``) are unique per leaf; a third of the
    leaves get one more level and a third two more, as archive trees mix
    shallow and deep folders.
    """
    base = b"/mnt/ntt/" + medium_hash.encode("ascii")
    out = []
    for k in range(count):
        parts = [b"d%03d" % (k // DIRECTORY_FANOUT), b"d%03d" % (k % DIRECTORY_FANOUT)]
        extra = (k // 7) % 3
        if extra >= 1:
            parts.append(b"d%03d" % (k % 13))
        if extra >= 2:
            parts.append(b"d%03d" % (k % 17))
        out.append(base + b"/" + b"/".join(parts))
    return out


def blob_content(n: int) -> bytes:
    """The content of blob number ``n``; its blob ID is the BLAKE3 hex digest of it."""
    return b"blob %d" % n


def write_by_hash_bucket(root: bytes, bucket: list[tuple[str, int]]) -> int:
    """Write the by-hash files of one ``ab`` prefix; return how many.

    One bucket per task, so no two threads ever create the same directory;
    sorted, so each ``ab/cd`` directory is made exactly once.
    """
    made = None
    for blobid, n in sorted(bucket):
        path = by_hash_path(root, blobid)
        directory = path[: -len(blobid) - 1]
        if directory != made:
            os.makedirs(directory, exist_ok=True)
            made = directory
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
        try:
            os.write(fd, blob_content(n))
        finally:
            os.close(fd)
    return len(bucket)


def start_by_hash_store(pool: ThreadPoolExecutor, root: bytes, blobids: list[str]) -> list[Future]:
    """Submit the by-hash store's files to ``pool``, one task per ``ab`` prefix.

    Creating an inode (file or directory) is the slow part of generation: on
    the reference VM ~100-200 us, most of it waiting, not computing. A few
    threads overlap those waits (2-3x faster there); they hardly need the GIL,
    which the main thread, waiting on PostgreSQL meanwhile, does not hold.
    """
    buckets: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
    for n, blobid in enumerate(blobids):
        buckets[blobid[:2]].append((blobid, n))
    return [pool.submit(write_by_hash_bucket, root, bucket) for bucket in buckets.values()]


class CopyStream:
    """Pre-formatted COPY text rows, sent in batches (much faster than write_row)."""

    def __init__(self, copy):
        self.copy = copy
        self.rows: list[bytes] = []

    def add(self, row: bytes) -> None:
        self.rows.append(row)
        if len(self.rows) >= COPY_BATCH:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.copy.write(b"".join(self.rows))
            self.rows.clear()


def generate(dsn: str, by_hash_root: bytes, n_paths: int, n_media: int, seed: int) -> Catalogue:
    """Fill medium, inode, path and blobs with N linkable paths; write the by-hash store.

    The three big tables are loaded by three simultaneous COPYs on three
    connections, so PostgreSQL ingests (and indexes) rows while this process
    is still generating them. The by-hash files are written afterwards by a
    few threads, while PostgreSQL analyzes. Only the blob IDs are held in
    memory.
    """
    started = time.perf_counter()
    rng = random.Random(seed)
    result = Catalogue(media=n_media)
    blobids: list[str] = []  # blob number -> blob ID

    media = [scan.medium_hash_for(f"bench-medium-{m}") for m in range(n_media)]
    per_medium = max(1, n_paths // (FILES_PER_DIRECTORY * n_media))
    directories = [leaf_directories(h, per_medium) for h in media]
    result.leaf_directories = per_medium * n_media
    medium_bytes = [h.encode("ascii") for h in media]
    next_ino = [1000] * n_media

    with psycopg.connect(dsn, autocommit=True) as conn:
        for m, medium_hash in enumerate(media):
            conn.execute("INSERT INTO medium (medium_hash, medium_human) VALUES (%s, %s)",
                         (medium_hash, f"bench-medium-{m}"))
            scan.ensure_medium_partitions(conn, medium_hash)

    with contextlib.ExitStack() as stack:
        def stream(statement: str) -> CopyStream:
            conn = stack.enter_context(psycopg.connect(dsn))
            return CopyStream(stack.enter_context(conn.cursor().copy(statement)))

        blobs, inodes, paths = stream(SQL_COPY_BLOBS), stream(SQL_COPY_INODES), stream(SQL_COPY_PATHS)
        path_no = 0
        while path_no < n_paths:
            wanted = min(paths_for_next_blob(rng), n_paths - path_no)
            result.max_paths_per_blob = max(result.max_paths_per_blob, wanted)
            content = blob_content(result.blobs)
            blobid = blake3.blake3(content).hexdigest()
            blobid_bytes = blobid.encode("ascii")
            blobids.append(blobid)
            blobs.add(blobid_bytes + b"\n")
            result.blobs += 1

            home = rng.randrange(n_media)
            ino_of: dict[int, int] = {}  # medium -> this blob's inode there
            nlink: dict[int, int] = {}
            for k in range(wanted):
                m = home if k == 0 or rng.random() < SAME_MEDIUM else rng.randrange(n_media)
                if m not in ino_of:
                    ino_of[m] = next_ino[m]
                    next_ino[m] += 1
                    nlink[m] = 0
                nlink[m] += 1
                leaf = directories[m][rng.randrange(per_medium)]
                path = leaf + b"/f%07d" % path_no
                path_no += 1
                # bytea in COPY text format: \x + hex, the backslash escaped.
                paths.add(b"%s\t1\t%d\t\\\\x%s\t%s\n"
                          % (medium_bytes[m], ino_of[m], binascii.hexlify(path), blobid_bytes))
            for m, ino in ino_of.items():
                inodes.add(b"%s\t1\t%d\t%d\t%d\t%d\t%s\tt\tf\tt\n"
                           % (medium_bytes[m], ino, nlink[m], len(content), 1_600_000_000 + result.blobs,
                              blobid_bytes))
                result.inodes += 1
        for copy_stream in (blobs, inodes, paths):
            copy_stream.flush()
        log(f"  rows generated ({time.perf_counter() - started:.1f}s); committing, then writing "
            f"{result.blobs:,} by-hash files")
    result.paths = path_no

    with psycopg.connect(dsn, autocommit=True) as conn:
        with ThreadPoolExecutor(FS_THREADS) as pool:
            written = start_by_hash_store(pool, by_hash_root, blobids)
            # VACUUM as well: a production catalogue has long been vacuumed, and
            # without visibility-map bits index-only scans would visit the heap.
            conn.execute("VACUUM (ANALYZE)")
            if sum(f.result() for f in written) != result.blobs:  # result() re-raises a thread's error
                raise AssertionError("by-hash store incomplete")
        # Only now: the checkpoint's write burst would slow the file creation down.
        checkpoint_quietly(conn)
    os.sync()  # the by-hash store's metadata is on disk before anything is timed
    result.seconds = time.perf_counter() - started
    return result


# --- the measurements ---------------------------------------------------------------------

def fetch_links(dsn: str, by_hash_root: bytes, archive_root: bytes) -> list[tuple[bytes, bytes]]:
    """Every (by-hash path, archive path) pair, in archive-path order.

    Path order is the friendliest order for the kernel (each directory filled
    in one go) and the order relinker itself uses inside a range.
    """
    sources: dict[str, bytes] = {}
    pairs = []
    with psycopg.connect(dsn) as conn, conn.cursor().copy(SQL_ALL_LINKS) as copy:
        copy.set_types(["text", "bytea"])
        for blobid, path in copy.rows():
            source = sources.get(blobid)
            if source is None:
                source = sources[blobid] = by_hash_path(by_hash_root, blobid)
            pairs.append((source, archive_root + b"/" + b"/".join(archive_components(path))))
    pairs.sort(key=lambda pair: pair[1])
    return pairs


FLOOR = "floor: os.link loop, directories made on the way"
LINKS_ONLY = "links only: os.link loop, directories made beforehand"


def measure_floor(pairs: list[tuple[bytes, bytes]], directories_beforehand: bool) -> Measurement:
    """Time a bare os.link loop over ``pairs`` into an empty archive.

    The floor makes each archive directory the first time a link needs it
    (one os.makedirs per directory, remembered in a set), as any relinker
    filling an empty archive must. With ``directories_beforehand`` every
    directory is made before the clock starts: the cost of the link calls
    alone, stricter still.
    """
    made: set[bytes] = set()
    directory_seconds = None
    if directories_beforehand:
        started = time.perf_counter()
        for _source, target in pairs:
            directory = os.path.dirname(target)
            if directory not in made:
                os.makedirs(directory, exist_ok=True)
                made.add(directory)
        directory_seconds = time.perf_counter() - started
        log(f"  {len(made):,} leaf directories created in {directory_seconds:.1f}s (not timed)")
        made.clear()
    os.sync()
    resettable = reset_own_peak_rss()
    cpu_before = cpu_seconds(resource.RUSAGE_SELF)
    started = time.perf_counter()
    if directories_beforehand:
        for src, dst in pairs:
            os.link(src, dst)
    else:
        for src, dst in pairs:
            directory = os.path.dirname(dst)
            if directory not in made:
                os.makedirs(directory, exist_ok=True)
                made.add(directory)
            os.link(src, dst)
    seconds = time.perf_counter() - started
    cpu = cpu_seconds(resource.RUSAGE_SELF) - cpu_before
    peak_kib = vm_hwm_kib(os.getpid()) if resettable else None
    if peak_kib is None:  # no VmHWM reset: the current RSS is the honest figure
        peak_kib = psutil.Process().memory_info().rss // 1024
    detail = {"rss_note": "the benchmark process itself, holding every pair in memory"}
    if directory_seconds is not None:
        detail["directory_creation_seconds_untimed"] = round(directory_seconds, 3)
    return Measurement(LINKS_ONLY if directories_beforehand else FLOOR, seconds, len(pairs), "links",
                       peak_kib / 1024, client_cpu=cpu, detail=detail)


#: The re-check's routes, each measured on the same data when the C
#: extension is built: row suffix -> the environment that selects it. The
#: second and third are the baselines of what the first adds.
RECHECK_ROUTES = {
    "": {},
    ", no directory listings": {"RELINKER_NO_DIRECTORY_LISTINGS": "1"},
    ", pure Python": {"RELINKER_PURE_PYTHON": "1"},
}


def verify_sample(pairs: list[tuple[bytes, bytes]], label: str, seed: int) -> None:
    """A random sample of archive paths must be hardlinks of their by-hash file."""
    rng = random.Random(seed)
    wrong = 0
    for src, dst in rng.sample(pairs, min(VERIFY_SAMPLE, len(pairs))):
        try:
            a, b = os.lstat(src), os.lstat(dst)
        except OSError:
            wrong += 1
            continue
        wrong += (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino)
    if wrong:
        fail(f"{label}: {wrong} of {min(VERIFY_SAMPLE, len(pairs))} sampled archive paths are not linked")


def empty_archive(archive_root: bytes) -> float:
    """Remove the archive tree (keeping its root); return the seconds it took."""
    started = time.perf_counter()
    shutil.rmtree(archive_root)
    os.mkdir(archive_root)
    os.sync()  # the unlinks' metadata writeback must not run into the next timing
    return time.perf_counter() - started


def remove_tree(root: bytes) -> None:
    """shutil.rmtree, with the subtrees a few levels down removed by FS_THREADS threads.

    Freeing ~N/3 by-hash inodes and their directories is the slow part of the
    cleanup, and like creating them it is mostly waiting.
    """
    frontier = [root]
    for _depth in range(4):  # go down until there are enough subtrees to share out
        below = [e.path for d in frontier for e in os.scandir(d) if e.is_dir(follow_symlinks=False)]
        if not below:
            break
        frontier = below
        if len(frontier) >= 16 * FS_THREADS:
            break
    if frontier != [root]:
        with ThreadPoolExecutor(FS_THREADS) as pool:
            list(pool.map(shutil.rmtree, frontier))
    shutil.rmtree(root)  # what is left: the upper levels


def reset_catalogue(dsn: str) -> None:
    """Counters back to "never relinked", then settled (see settle)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SQL_RESET_COUNTERS)
    settle(dsn)


def settle(dsn: str) -> None:
    """Let the previous run's after-effects finish outside the next timing.

    A run that filled the archive leaves 345k updated blobs rows (the next
    reader would set their hint bits and write the pages) and the metadata
    of every new link to write back; a re-check right behind it measured up
    to 25% slower than the same re-check run next.
    """
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE) blobs")
        checkpoint_quietly(conn)
    os.sync()


def run_measurements(db: Database, by_hash_root: bytes, archive_root: bytes, workdir: bytes,
                     catalogue: Catalogue, seed: int) -> list[Measurement]:
    """The floor, then relinker three ways, on the same data; the archive emptied in between."""
    dsn = db.dsn
    n = catalogue.paths
    results = []

    log("floor: fetching every link")
    pairs = fetch_links(dsn, by_hash_root, archive_root)
    if len(pairs) != n:
        fail(f"the catalogue yields {len(pairs)} links, expected {n}")
    for beforehand in (False, True):
        log(f"{'links only' if beforehand else 'floor'}: {len(pairs):,} os.link calls")
        m = measure_floor(pairs, directories_beforehand=beforehand)
        results.append(m)
        log(f"  {m.seconds:.1f}s, {m.rate:,.0f} links/s")
        verify_sample(pairs, m.name, seed)
        log(f"archive emptied in {empty_archive(archive_root):.1f}s")
    sample = random.Random(seed).sample(pairs, min(VERIFY_SAMPLE, len(pairs)))
    del pairs  # a few hundred MB at N=1M: not for the relinker runs to compete with

    def relink(name: str, *args: str, route: dict[str, str] | None = None) -> tuple[Measurement, dict | None]:
        log(f"{name} ...")
        # stdout/stderr of each run are kept in the work directory (with --keep)
        tag = f"run{len(results)}"
        measurement, summary = run_relinker(name, tag, db, by_hash_root, archive_root, workdir, list(args),
                                            route)
        results.append(measurement)
        return measurement, summary

    m, summary = relink("startup: relink --dry-run --limit 0", "--new", "--dry-run", "--limit", "0",
                        "--workers", "1")
    expect(m, summary, links_created=0, problems=0)
    log(f"  {m.seconds:.2f}s")

    for workers in (1, 2):
        reset_catalogue(dsn)
        m, summary = relink(f"relink --workers {workers}, empty archive", "--new", "--workers", str(workers))
        m.items = summary.get("links_created") if summary else None
        expect(m, summary, links_created=n, links_present=0, links_replaced=0, problems=0)
        verify_sample(sample, m.name, seed)
        log(f"  {m.seconds:.1f}s, {m.rate or 0:,.0f} links/s, peak RSS {m.peak_rss_mb:.0f} MB")
        if workers == 1:
            log(f"archive emptied in {empty_archive(archive_root):.1f}s")

    # One untimed re-check first: whichever timed re-check came first ran up
    # to 25% slower than the one after it (its server CPU too), in either
    # order, even after settle(); now both timed rows find the same state.
    settle(dsn)
    log("untimed re-check, so that both timed ones start from the same state ...")
    run_relinker("warm-up", "warmup", db, by_hash_root, archive_root, workdir, ["--new", "--workers", "2"])
    # The C fast route's baselines, in the same run: the same check without
    # its directory listings, and through its pure-Python twin (what an
    # install without a compiler runs).
    for suffix, route in RECHECK_ROUTES.items() if speedups_built() else [("", {})]:
        name = "relink --workers 2, complete archive" + suffix
        settle(dsn)
        m, summary = relink(name, "--new", "--workers", "2", route=route)
        m.unit = "paths"
        m.items = summary.get("links_present") if summary else None
        expect(m, summary, links_present=n, links_created=0, links_replaced=0, problems=0)
        log(f"  {m.seconds:.1f}s, {m.rate or 0:,.0f} paths/s, peak RSS {m.peak_rss_mb:.0f} MB")
    return results


# --- report ---------------------------------------------------------------------------

def print_report(results: list[Measurement], floor: Measurement, context: dict) -> None:
    """The result table (stdout), one row per measurement."""
    print()
    source = f" ({context['relinker_source']})" if context["relinker_source"] else ""
    print(f"relinker {context['relinker_version']}{source} | N = {context['paths']:,} paths, "
          f"{context['blobs']:,} blobs, {context['inodes']:,} inodes, {context['media']} media, "
          f"{context['leaf_directories']:,} leaf directories")
    print(f"CPUs: {context['cpu_count']} ({context['cpu_model']}) | {context['filesystem']} | "
          f"PostgreSQL {context['postgres_version']} (shared_buffers {context['shared_buffers']}) | "
          f"Python {context['python']} | fast route: {context['fast_route']} | "
          f"generation {context['generation_seconds']:.1f}s")
    header = ("measurement", "seconds", "rate", "rate/floor", "peak RSS MB", "relinker s", "client CPU s",
              "server CPU s")
    rows = []
    for m in results:
        rate = m.rate
        rows.append((
            m.name + ("" if m.ok else "  ** FAILED **"),
            f"{m.seconds:.2f}",
            f"{rate:,.0f} {m.unit}/s" if rate else "-",
            f"{rate / floor.rate:.2f}" if rate and floor.rate else "-",
            f"{m.peak_rss_mb:.0f}" if m.peak_rss_mb is not None else "-",
            f"{m.internal_seconds:.2f}" if m.internal_seconds is not None else "-",
            f"{m.client_cpu:.1f}" if m.client_cpu is not None else "-",
            f"{m.server_cpu:.1f}" if m.server_cpu is not None else "-",
        ))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells) -> str:
        # the name left-aligned, the figures right-aligned
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    print(line(header))
    print(line(["-" * w for w in widths]))
    for r in rows:
        print(line(r))
    print()


def write_json(path: str, context: dict, results: list[Measurement], floor: Measurement) -> None:
    data = {
        **context,
        "ok": not FAILURES,
        "failures": FAILURES,
        "measurements": [
            {
                **m.as_json(),
                "rate_over_floor": round(m.rate / floor.rate, 3) if m.rate and floor.rate else None,
                **m.detail,
            }
            for m in results
        ],
    }
    write_figures(path, data)


# --- main -----------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", type=int, default=1_000_000, metavar="N",
                        help="catalogued paths, i.e. links to make (default %(default)s)")
    parser.add_argument("--media", type=int, default=4, metavar="M", help="media (partitions) (default %(default)s)")
    parser.add_argument("--seed", type=int, default=1, help="random seed of the synthetic catalogue")
    parser.add_argument("--workdir", metavar="DIR",
                        help="create the benchmark's directory (database, by-hash store, archive) in DIR "
                        "(default: the system temporary directory); the archive and the store must share "
                        "one filesystem, and that is the filesystem measured")
    parser.add_argument("--db-url", metavar="DSN",
                        help="use this PostgreSQL server (a database is created and dropped) instead of "
                        "an embedded one")
    parser.add_argument("--shared-buffers", default="1GB", metavar="SIZE",
                        help="shared_buffers of the embedded server (default %(default)s; 'default' keeps "
                        "PostgreSQL's 128MB); with --db-url the server's own settings apply")
    parser.add_argument("--keep", action="store_true",
                        help="keep the data, the database and the embedded server for inspection")
    parser.add_argument("--json-out", metavar="FILE", help="also write the figures to FILE as JSON")
    args = parser.parse_args(argv)
    if args.paths < 1 or args.media < 1:
        parser.error("--paths and --media must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    parent = os.fsencode(args.workdir) if args.workdir else None
    if parent is not None:
        os.makedirs(parent, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix=b"relink-bench-", dir=parent)
    # Others (the embedded server's own user, when run as root) must reach it.
    os.chmod(workdir, 0o755)
    by_hash_root = os.path.join(workdir, b"by-hash")
    archive_root = os.path.join(workdir, b"archive")
    os.mkdir(by_hash_root)
    os.mkdir(archive_root)
    log(f"work directory {os.fsdecode(workdir)}")
    source = relinker_source()
    compile_relinker()

    db = None
    try:
        db = start_database(workdir, args.db_url, args.keep, args.shared_buffers)
        with psycopg.connect(db.dsn, autocommit=True) as conn:
            migrations.migrate(conn, base=True)
            postgres_version = conn.execute("SHOW server_version").fetchone()[0]
            server_shared_buffers = conn.execute("SHOW shared_buffers").fetchone()[0]
        log(f"database ready ({'embedded' if db.server else 'external'}); generating {args.paths:,} paths")

        catalogue = generate(db.dsn, by_hash_root, args.paths, args.media, args.seed)
        log(f"generated {catalogue.paths:,} paths, {catalogue.blobs:,} blobs, {catalogue.inodes:,} inodes "
            f"in {catalogue.seconds:.1f}s")

        results = run_measurements(db, by_hash_root, archive_root, workdir, catalogue, args.seed)

        context = {
            "relinker_version": relinker.__version__,
            "relinker_source": source,
            "paths": catalogue.paths,
            "blobs": catalogue.blobs,
            "inodes": catalogue.inodes,
            "media": catalogue.media,
            "leaf_directories": catalogue.leaf_directories,
            "max_paths_per_blob": catalogue.max_paths_per_blob,
            "generation_seconds": round(catalogue.seconds, 2),
            "cpu_count": os.cpu_count(),
            "cpu_model": cpu_model(),
            "cpu_affinity": len(os.sched_getaffinity(0)),
            "filesystem": filesystem_type(workdir),
            "postgres_version": postgres_version,
            "shared_buffers": server_shared_buffers,
            "database": "embedded" if db.server else "external",
            "python": platform.python_version(),
            "fast_route": "C (relinker._speedups)" if speedups_built() else "Python (relinker._speedups not built)",
            "platform": platform.platform(),
        }
        if relinker_source() != source:
            fail(f"relinker's source changed during the run (was {source}, now {relinker_source()}): "
                 "the figures may mix versions")
        floor = results[0]
        print_report(results, floor, context)
        if args.json_out:
            write_json(args.json_out, context, results, floor)
            log(f"figures written to {args.json_out}")
    finally:
        if db is not None:
            db.cleanup(args.keep)
        if args.keep:
            log(f"kept the data in {os.fsdecode(workdir)}")
        else:
            started = time.perf_counter()
            for tree in (by_hash_root, archive_root):
                with contextlib.suppress(OSError):
                    remove_tree(tree)
            shutil.rmtree(workdir, ignore_errors=True)
            log(f"work directory removed in {time.perf_counter() - started:.0f}s")
    log(f"total {elapsed():.0f}s")
    if FAILURES:
        print(f"{len(FAILURES)} check(s) FAILED:", *FAILURES, sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
