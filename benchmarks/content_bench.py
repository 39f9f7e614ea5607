#!/usr/bin/env python3
"""Benchmark relinker's content work (copy, verify --hash) and verify against baselines in the same run.

For each tree (many small files; a few large files; optionally a real tree
given with ``--tree``), on one filesystem, page cache warm:

1. ``cp -a SRC DST && sync`` (the baseline of copy), then
   ``relinker copy --workers W`` of the same tree, scanned beforehand,
   then the floor of any copy into the by-hash layout (LAYOUT_FLOOR: its
   bare system calls in one process, no catalogue), printed under the table;
2. a bare one-process read + BLAKE3 loop over the by-hash store (the
   baseline of verify --hash), then ``relinker verify --all --hash``;
3. ``relinker relink --new`` over the complete archive (the re-check, the
   baseline of verify), then ``relinker verify --all``.

Each relinker row is printed beside its baseline with the ratio and the
issue's target, with the peak RSS of the largest single process. relinker
and every baseline run as processes of their own, timed from start to
exit, as an operator runs them. See benchmarks/README.md.

Usage::

    python benchmarks/content_bench.py [--small-files N] [--large-files N --large-mb MB]
                                       [--tree DIR] [--workers W] [--workdir DIR] [--db-url DSN]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import platform
import random
import resource
import shutil
import stat
import subprocess
import sys
import tempfile
import time

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

import relinker
from benchlib import (FAILURES, Database, Measurement, TreeSampler, checkpoint_quietly, compile_relinker, cpu_model,
                      cpu_seconds, elapsed, expect, fail, filesystem_type, log, relinker_source, run_relinker,
                      settle_disk, speedups_built, start_database, write_figures)
from relinker import migrations

#: Small files: log-normal sizes around this median (bytes), capped, like a system's /usr/lib.
SMALL_MEDIAN = 8192
SMALL_SIGMA = 1.8
SMALL_CAP = 16 << 20
#: Share of small files whose content another file already has (deduplication).
DUPLICATES = 0.1
FILES_PER_DIRECTORY = 100
CHUNK = 1 << 20
#: The issue's targets: relinker's figure over its baseline's, at least.
TARGETS = {"copy": 0.8, "verify --hash": 0.8, "verify": 0.5}
#: Peak RSS of any one process, at most (MB).
RSS_TARGET_MB = 300
#: A baseline whose median run took this many times its fastest measured a
#: machine that was not quiet (cp -a of the same tree: 4 s or 10 s): no verdict.
UNSTEADY_SPREAD = 1.5


@dataclasses.dataclass
class Tree:
    name: str
    root: bytes
    files: int
    bytes: int
    generated: bool


@dataclasses.dataclass
class Pair:
    """A relinker row and its baseline, measured on the same data."""

    tree: str
    what: str
    baseline: Measurement
    relinker: Measurement
    #: for copy: the by-hash layout's bare system calls (LAYOUT_FLOOR), what no copier into it can go below
    floor: Measurement | None = None

    @property
    def ratio(self) -> float | None:
        b, r = self.baseline.rate, self.relinker.rate
        return r / b if b and r else None

    @property
    def baseline_unsteady(self) -> bool:
        """Whether the baseline's median run is too far (UNSTEADY_SPREAD) above its fastest to be trusted.

        One slow run of three leaves the median alone; two make it one of them.
        """
        runs = self.baseline.detail.get("seconds_all") or []
        return len(runs) > 1 and min(runs) > 0 and self.baseline.seconds / min(runs) > UNSTEADY_SPREAD

    def verdict(self) -> str:
        """Against the target: met, NOT met, or no verdict on an unsteady baseline."""
        if self.ratio is None:
            return "-"
        if self.baseline_unsteady:
            return "unsteady baseline"
        return "met" if self.ratio >= TARGETS[self.what] else "NOT met"


# --- the trees -------------------------------------------------------------------------

def write_file(path: bytes, size: int, rng: random.Random) -> None:
    with open(path, "wb") as f:
        remaining = size
        while remaining:
            n = min(remaining, CHUNK)
            f.write(rng.randbytes(n))
            remaining -= n


def small_files_tree(root: bytes, n_files: int, seed: int) -> Tree:
    """``n_files`` files of log-normal sizes, a tenth of them duplicates of others."""
    rng = random.Random(seed)
    written: list[bytes] = []
    total = 0
    for n in range(n_files):
        directory = os.path.join(root, b"d%04d" % (n // FILES_PER_DIRECTORY))
        if n % FILES_PER_DIRECTORY == 0:
            os.makedirs(directory)
        path = os.path.join(directory, b"f%06d" % n)
        if written and rng.random() < DUPLICATES:
            shutil.copyfile(rng.choice(written), path)
        else:
            size = min(SMALL_CAP, int(rng.lognormvariate(math.log(SMALL_MEDIAN), SMALL_SIGMA)))
            write_file(path, size, rng)
            written.append(path)
        total += os.path.getsize(path)
    return Tree("many small files", root, n_files, total, True)


def large_files_tree(root: bytes, n_files: int, megabytes: int, seed: int) -> Tree:
    rng = random.Random(seed)
    os.makedirs(root)
    for n in range(n_files):
        write_file(os.path.join(root, b"large-%02d.bin" % n), megabytes << 20, rng)
    return Tree("a few large files", root, n_files, n_files * (megabytes << 20), True)


def existing_tree(path: str) -> Tree:
    root = os.fsencode(os.path.abspath(path))
    files = size = 0
    for directory, _dirs, names in os.walk(root):
        for name in names:
            st = os.lstat(os.path.join(directory, name))
            if stat.S_ISREG(st.st_mode):
                files += 1
                size += st.st_size
    return Tree(f"tree {path}", root, files, size, False)


def warm(root: bytes) -> None:
    """Read every file once: the measurements run with the page cache warm, as the issue's did."""
    for directory, _dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    while f.read(CHUNK):
                        pass


# --- baselines ---------------------------------------------------------------------------

def timed_command(name: str, argv: list, unit: str, items: int, stdout=None) -> Measurement:
    """Time a shell-free command (and its children), with the peak RSS of its largest process."""
    cpu_before = cpu_seconds(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    process = subprocess.Popen(argv, stdout=stdout)
    sampler = TreeSampler(process.pid)
    sampler.start()
    code = process.wait()
    seconds = time.perf_counter() - started
    peaks = sampler.stop()
    m = Measurement(name, seconds, items, unit, max(peaks.values()) or None,
                    client_cpu=cpu_seconds(resource.RUSAGE_CHILDREN) - cpu_before)
    if code != 0:
        m.ok = False
        fail(f"{name}: exited with {code}")
    return m


def copy_baseline(tree: Tree, destination: bytes) -> Measurement:
    """``cp -a SRC DST && sync``: what copying the tree costs with nothing else done."""
    return timed_command("baseline: cp -a SRC DST && sync",
                         ["sh", "-c", 'cp -a "$0" "$1" && sync', tree.root, destination], "B", tree.bytes)


#: The bare hash loop, run as its own process (as relinker and cp are): every
#: file of the store read in 1 MiB chunks into BLAKE3; prints bytes and files.
#: The files come listed (one path a line), as verify's come from the
#: catalogue: a walk of 65,536 mostly empty ab/cd/ is no part of hashing.
HASH_LOOP = f"""
import sys, blake3
total = files = 0
with open(sys.argv[1], "rb") as listing:
    paths = listing.read().splitlines()
for path in paths:
    hasher = blake3.blake3()
    with open(path, "rb") as f:
        while chunk := f.read({CHUNK}):
            hasher.update(chunk)
            total += len(chunk)
    hasher.hexdigest()
    files += 1
print(total, files)
"""


#: The floor of a copy into the by-hash layout, run as its own process: per
#: file, read and hash it, and unless its by-hash name exists write a
#: temporary, make ab/ and ab/cd/, rename it there; then link the archive path.
#: One process, no catalogue, no batches: one sync at the end, as cp -a && sync.
LAYOUT_FLOOR = """
import os, sys, blake3
tree, store, archive = map(os.fsencode, sys.argv[1:4])
temporaries = os.path.join(store, b".floor-tmp")
os.mkdir(temporaries)
n = 0
for directory, dirs, names in os.walk(tree):
    target = os.path.join(archive, os.path.relpath(directory, tree))
    os.makedirs(target, exist_ok=True)
    for name in names:
        with open(os.path.join(directory, name), "rb") as f:
            data = f.read()
        hexdigest = blake3.blake3(data).hexdigest().encode()
        level2 = os.path.join(store, hexdigest[:2], hexdigest[2:4])
        final = os.path.join(level2, hexdigest)
        if not os.path.lexists(final):
            n += 1
            temporary = os.path.join(temporaries, b"%d" % n)
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
            os.write(fd, data)
            os.close(fd)
            for level in (os.path.dirname(level2), level2):
                try:
                    os.mkdir(level)
                except FileExistsError:
                    pass
            os.rename(temporary, final)
        os.link(final, os.path.join(target, name))
os.sync()
"""


def establish_store(store: bytes) -> None:
    """Give an empty by-hash store its 65,536 ``ab/cd/`` directories, as any store of some size has them.

    With a few hundred thousand contents nearly every ``ab/cd/`` exists, and
    with the millions of a production archive every one does: a copy into
    such a store makes no directories, a copy into an empty one makes one for
    nearly every content. Not timed; synced so that the copy does not write
    them back.
    """
    for first in range(256):
        level1 = os.path.join(store, b"%02x" % first)
        os.mkdir(level1)
        for second in range(256):
            os.mkdir(os.path.join(level1, b"%02x" % second))
    os.sync()


def layout_floor(tree: Tree, store: bytes, archive: bytes) -> Measurement:
    """LAYOUT_FLOOR over the tree into an empty store and archive, timed from its start to its exit."""
    return timed_command("floor: the by-hash layout's system calls, one process",
                         [sys.executable, "-c", LAYOUT_FLOOR, tree.root, store, archive], "B", tree.bytes)


def hash_loop_baseline(by_hash_root: bytes, workdir: bytes) -> Measurement:
    """A bare one-process loop over the by-hash files (HASH_LOOP), listed untimed; timed from start to exit."""
    listing = os.path.join(workdir, b"by-hash-files")
    with open(listing, "wb") as f:
        for directory, dirs, names in os.walk(by_hash_root):
            if b".relinker-tmp" in dirs:
                dirs.remove(b".relinker-tmp")
            for name in names:
                f.write(os.path.join(directory, name) + b"\n")
    with tempfile.TemporaryFile(dir=workdir) as out:
        m = timed_command("baseline: read + BLAKE3 loop, one process",
                          [sys.executable, "-c", HASH_LOOP, listing], "B", 0, stdout=out)
        out.seek(0)
        printed = out.read().split()
    os.unlink(listing)
    if len(printed) == 2:
        m.items, files = int(printed[0]), int(printed[1])
        m.detail["files"] = files
    return m


# --- one tree ------------------------------------------------------------------------------

def fresh_database(db: Database, tag: str) -> str:
    name = f"content_bench_{os.getpid()}_{tag}"
    with psycopg.connect(db.admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = make_conninfo(db.admin_dsn, dbname=name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        migrations.migrate(conn, base=True)
    return dsn


def drop_database(db: Database, dsn: str) -> None:
    name = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    with psycopg.connect(db.admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


SQL_UNCOPY = """
UPDATE inode SET blobid = NULL, by_hash_created = false, copied = false, processed_at = NULL WHERE blobid IS NOT NULL;
UPDATE path SET blobid = NULL WHERE blobid IS NOT NULL;
DELETE FROM blobs;
"""


def median_of(measurements: list[Measurement]) -> Measurement:
    """The repetition with the median time, the spread of all of them in its detail."""
    ordered = sorted(measurements, key=lambda m: m.seconds)
    chosen = ordered[len(ordered) // 2]
    chosen.ok = all(m.ok for m in measurements)
    chosen.detail["seconds_all"] = [round(m.seconds, 3) for m in measurements]
    return chosen


def measure_tree(db: Database, tree: Tree, workdir: bytes, tag: str, workers: int, repeat: int,
                 young_store: bool = False) -> list[Pair]:
    """The three pairs of one tree, each baseline and relinker figure the median of ``repeat`` interleaved runs.

    Copies go into stores that have every ``ab/cd/`` directory already
    (:func:`establish_store`), or, with ``young_store``, into empty ones.

    Interleaved (baseline, relinker, baseline, ...): on a shared machine the
    filesystem's speed drifts over minutes, and both sides of a pair should
    meet the same drift.
    """
    def fresh(name: str) -> bytes:
        path = os.path.join(workdir, f"{tag}-{name}".encode())
        os.mkdir(path)
        return path

    def fresh_store(name: str) -> bytes:
        path = fresh(name)
        if not young_store:
            establish_store(path)
        return path

    dsn = fresh_database(db, tag)
    tree_db = Database(dsn=dsn, admin_dsn=db.admin_dsn, server=db.server, pgdata=db.pgdata)
    relinker_args = ["--workers", str(workers), "--new"]
    pairs = []
    made: list[bytes] = []
    try:
        log(f"{tree.name}: {tree.files:,} files, {tree.bytes / 1e6:,.0f} MB; scanning, warming the page cache")
        subprocess.run([sys.executable, "-m", "relinker", "--db-url", dsn, "scan", "--medium", tag, tree.root],
                       check=True, stdout=subprocess.DEVNULL)
        with psycopg.connect(dsn) as conn:
            n_paths, n_inodes = conn.execute(
                "SELECT count(*), count(DISTINCT i.ino) FROM inode AS i JOIN path AS p USING (medium_hash, ino) "
                "WHERE i.fs_type = 'f'").fetchone()
        warm(tree.root)

        # Nothing is removed until the tree is done: a filesystem pays for a
        # removal (journal checkpoints, trims) during whatever runs next.
        baselines, runs, floors = [], [], []
        for n in range(repeat):
            destination = os.path.join(workdir, f"{tag}-cp-{n}".encode())
            made.append(destination)
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(SQL_UNCOPY)
                # A production catalogue has long been vacuumed: autovacuum
                # of these updates must not run (and be counted) inside a timing.
                conn.execute("VACUUM (ANALYZE)")
                checkpoint_quietly(conn)
            settle_disk(workdir)
            log(f"{tree.name}: cp -a && sync ({n + 1}/{repeat})")
            baselines.append(copy_baseline(tree, destination))
            by_hash, archive = fresh_store(f"by-hash-{n}"), fresh(f"archive-{n}")
            made += [by_hash, archive]
            settle_disk(workdir)
            log(f"{tree.name}: relinker copy ({n + 1}/{repeat})")
            copied, summary = run_relinker(f"relinker copy --workers {workers}", f"{tag}-copy", tree_db, by_hash,
                                           archive, workdir, relinker_args, command="copy", unit="B")
            copied.items = summary.get("bytes_read") if summary else None
            expect(copied, summary, problems=0, blobs=n_inodes)
            runs.append(copied)
            floor_store, floor_archive = fresh_store(f"floor-store-{n}"), fresh(f"floor-archive-{n}")
            made += [floor_store, floor_archive]
            settle_disk(workdir)
            log(f"{tree.name}: the layout's floor ({n + 1}/{repeat})")
            floors.append(layout_floor(tree, floor_store, floor_archive))
        pairs.append(Pair(tree.name, "copy", median_of(baselines), median_of(runs), median_of(floors)))
        warm(by_hash)  # large contents went in with direct I/O, past the page cache
        settle_disk(workdir)

        baselines, runs = [], []
        for n in range(repeat):
            log(f"{tree.name}: bare hash loop, relinker verify --all --hash ({n + 1}/{repeat})")
            baselines.append(hash_loop_baseline(by_hash, workdir))
            verified, summary = run_relinker(f"relinker verify --all --hash --workers {workers}",
                                             f"{tag}-verify-hash", tree_db, by_hash, archive, workdir,
                                             ["--all", "--hash", *relinker_args], command="verify", unit="B")
            verified.items = summary.get("bytes_read") if summary else None
            expect(verified, summary, failed=0)
            if summary and verified.items != baselines[-1].items:
                fail(f"{verified.name}: read {verified.items} bytes, the store holds {baselines[-1].items}")
            runs.append(verified)
        pairs.append(Pair(tree.name, "verify --hash", median_of(baselines), median_of(runs)))

        baselines, runs = [], []
        for n in range(repeat):
            log(f"{tree.name}: relink re-check, relinker verify --all ({n + 1}/{repeat})")
            recheck, summary = run_relinker(f"relinker relink --new --workers {workers}, complete archive",
                                            f"{tag}-recheck", tree_db, by_hash, archive, workdir, relinker_args,
                                            unit="paths")
            recheck.items = n_paths
            expect(recheck, summary, problems=0, links_present=n_paths)
            baselines.append(recheck)
            verified, summary = run_relinker(f"relinker verify --all --workers {workers}", f"{tag}-verify",
                                             tree_db, by_hash, archive, workdir, ["--all", *relinker_args],
                                             command="verify", unit="paths")
            verified.items = n_paths
            expect(verified, summary, failed=0, links_present=n_paths)
            runs.append(verified)
        pairs.append(Pair(tree.name, "verify", median_of(baselines), median_of(runs)))
    finally:
        drop_database(db, dsn)
        for root in made:
            shutil.rmtree(root, ignore_errors=True)
    return pairs


# --- report ---------------------------------------------------------------------------------

def rate(m: Measurement) -> str:
    if not m.rate:
        return "-"
    return f"{m.rate / 1e6:,.1f} MB/s" if m.unit == "B" else f"{m.rate:,.0f} {m.unit}/s"


def cpu(m: Measurement) -> str:
    return "-" if m.client_cpu is None else f"{m.client_cpu:.2f}"


def ideal_seconds(pair: Pair, cores: int) -> float | None:
    """What a copy could take at best: the floor's CPU plus relinker's server CPU, spread evenly over ``cores``.

    No copy into the layout issues fewer system calls than the floor, and
    the catalogue's writes cost the server what they cost it in the run;
    a copy that also wastes no interpreter time and never leaves a core
    idle takes this long. None without the CPU figures, and where relinker
    used less CPU than the floor (large contents: relinker writes them with
    direct I/O, the floor through the page cache), which is no floor then.
    """
    floor, ours = pair.floor, pair.relinker
    if floor is None or floor.client_cpu is None or ours.server_cpu is None or ours.client_cpu is None:
        return None
    if ours.client_cpu < floor.client_cpu:
        return None
    return (floor.client_cpu + ours.server_cpu) / cores


def print_report(pairs: list[Pair], context: dict) -> None:
    print()
    source = f" ({context['relinker_source']})" if context["relinker_source"] else ""
    print(f"relinker {context['relinker_version']}{source} | CPUs: {context['cpu_count']} ({context['cpu_model']}) | "
          f"{context['filesystem']} | Python {context['python']} | fast route: {context['fast_route']} | "
          f"copies into a store {context['store']}")
    header = ("tree", "what", "baseline", "median s", "rate", "relinker", "median s", "rate", "ratio", "target",
              "peak RSS MB (relinker)")
    rows = []
    for p in pairs:
        target = TARGETS[p.what]
        ratio = p.ratio
        verdict = p.verdict()
        rss = p.relinker.peak_rss_mb
        rows.append((p.tree, p.what, p.baseline.name.removeprefix("baseline: "), f"{p.baseline.seconds:.2f}",
                     rate(p.baseline), p.relinker.name.removeprefix("relinker "), f"{p.relinker.seconds:.2f}",
                     rate(p.relinker), f"{ratio:.2f}" if ratio else "-", f">= {target} {verdict}",
                     (f"{rss:.0f}" if rss else "-") + ("" if not rss or rss <= RSS_TARGET_MB else " (over 300)")
                     + ("" if p.relinker.ok and p.baseline.ok else "  ** FAILED **")))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells) -> str:
        return "  ".join(c.ljust(w) if i in (0, 1, 2, 5, 9) else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    print(line(header))
    print(line(["-" * w for w in widths]))
    for r in rows:
        print(line(r))
    unsteady = [p for p in pairs if p.baseline_unsteady]
    if unsteady:
        print()
        for p in unsteady:
            runs = p.baseline.detail["seconds_all"]
            print(f"unsteady baseline: {p.tree}, {p.what}: its median run took {p.baseline.seconds:.2f} s, "
                  f"more than {UNSTEADY_SPREAD}x its fastest ({min(runs):.2f} s)")
        print("the machine was not quiet: a large removal less than five minutes before, or memory long free "
              "(benchmarks/README.md); those ratios are not verdicts, run again")
    floors = [p for p in pairs if p.floor is not None]
    if floors:
        print()
        print("the floor of a copy into the by-hash layout (no catalogue, one process, one sync), against cp:")
        cores = max(1, min(context["workers"], context["cpu_count"] or 1))
        for p in floors:
            ratio = f"{p.floor.rate / p.baseline.rate:.2f}" if p.floor.rate and p.baseline.rate else "-"
            print(f"  {p.tree}: {p.floor.seconds:.2f} s ({rate(p.floor)}), ratio {ratio}; every run: "
                  + " ".join(f"{x:.2f}" for x in p.floor.detail.get("seconds_all", [])))
            best = ideal_seconds(p, cores)
            if best is not None:
                print(f"    at best, the floor's CPU and the server's shared by {cores} cores without a moment "
                      f"idle: {best:.2f} s, ratio {p.baseline.seconds / best:.2f} against cp's median, "
                      f"{min(p.baseline.detail.get('seconds_all') or [p.baseline.seconds]) / best:.2f} against "
                      "its fastest run")
    print()
    print("CPU seconds of the median runs (baseline | relinker, + the server's for the catalogue):")
    for p in pairs:
        server = f" + {p.relinker.server_cpu:.2f}" if p.relinker.server_cpu is not None else ""
        floor = f" | floor {p.floor.client_cpu:.2f}" if p.floor is not None and p.floor.client_cpu is not None else ""
        print(f"  {p.tree}, {p.what}: {cpu(p.baseline)} | {cpu(p.relinker)}{server}{floor}")
    print()
    print("every run, seconds (baseline | relinker):")
    for p in pairs:
        spread = " ".join(f"{x:.2f}" for x in p.baseline.detail.get("seconds_all", []))
        ours = " ".join(f"{x:.2f}" for x in p.relinker.detail.get("seconds_all", []))
        print(f"  {p.tree}, {p.what}: {spread} | {ours}")
    print()


def as_json(m: Measurement) -> dict:
    return {**m.as_json(), "seconds_all": m.detail.get("seconds_all")}


def write_json(path: str, context: dict, trees: list[Tree], pairs: list[Pair]) -> None:
    data = {**context, "ok": not FAILURES, "failures": FAILURES,
            "trees": [{"name": t.name, "files": t.files, "bytes": t.bytes} for t in trees],
            "pairs": [{"tree": p.tree, "what": p.what, "ratio": round(p.ratio, 3) if p.ratio else None,
                       "target": TARGETS[p.what], "verdict": p.verdict(),
                       "baseline": as_json(p.baseline), "relinker": as_json(p.relinker),
                       "floor": as_json(p.floor) if p.floor else None}
                      for p in pairs]}
    write_figures(path, data)


# --- main -------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small-files", type=int, default=60_000, metavar="N",
                        help="files of the small-files tree, 0 for none (default %(default)s, about 2.5 GB: "
                        "as many as a system's /usr/lib)")
    parser.add_argument("--large-files", type=int, default=4, metavar="N",
                        help="files of the large-files tree, 0 for none (default %(default)s)")
    parser.add_argument("--large-mb", type=int, default=512, metavar="MB",
                        help="size of each large file (default %(default)s)")
    parser.add_argument("--tree", metavar="DIR", action="append", default=[],
                        help="also measure a copy of this existing tree (say, of /usr/lib); repeatable")
    parser.add_argument("--workers", type=int, default=2, help="relinker's --workers (default %(default)s)")
    parser.add_argument("--repeat", type=int, default=3, metavar="N",
                        help="runs of each measurement, interleaved with its baseline's; the median is shown "
                        "(default %(default)s)")
    parser.add_argument("--young-store", action="store_true",
                        help="copy into empty stores, the first copy ever (default: stores that have their "
                        "65,536 ab/cd/ directories, as any store of a few hundred thousand contents)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", metavar="DIR",
                        help="where the trees, stores and archives live (default: the temporary directory); "
                        "that is the filesystem measured")
    parser.add_argument("--db-url", metavar="DSN", help="a PostgreSQL server to use instead of an embedded one")
    parser.add_argument("--json-out", metavar="FILE", help="also write the figures to FILE as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    parent = os.fsencode(args.workdir) if args.workdir else None
    if parent is not None:
        os.makedirs(parent, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix=b"content-bench-", dir=parent)
    os.chmod(workdir, 0o755)  # the embedded server's own user must reach its data
    log(f"work directory {os.fsdecode(workdir)}")
    source = relinker_source()
    compile_relinker()
    db = None
    trees: list[Tree] = []
    pairs: list[Pair] = []
    try:
        db = start_database(workdir, args.db_url, False, "256MB")
        if args.small_files:
            trees.append(small_files_tree(os.path.join(workdir, b"small"), args.small_files, args.seed))
        if args.large_files:
            trees.append(large_files_tree(os.path.join(workdir, b"large"), args.large_files, args.large_mb, args.seed))
        for path in args.tree:
            trees.append(existing_tree(path))
        for n, tree in enumerate(trees):
            pairs += measure_tree(db, tree, workdir, f"t{n}", args.workers, args.repeat, args.young_store)
        context = {
            "relinker_version": relinker.__version__, "relinker_source": source, "cpu_count": os.cpu_count(),
            "cpu_model": cpu_model(), "filesystem": filesystem_type(workdir), "python": platform.python_version(),
            "fast_route": "C" if speedups_built() else "Python", "workers": args.workers,
            "store": "young (empty)" if args.young_store else "established (every ab/cd/ made)",
        }
        print_report(pairs, context)
        if args.json_out:
            write_json(args.json_out, context, trees, pairs)
    finally:
        if db is not None:
            db.cleanup(False)
        with contextlib.suppress(OSError):
            shutil.rmtree(workdir)
    log(f"total {elapsed():.0f}s")
    if FAILURES:
        print(f"{len(FAILURES)} check(s) FAILED:", *FAILURES, sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
