"""The seed's verifier: check a sample of blobs against disk, end to end.

For each selected blob: its by-hash file exists and is a regular file, its
size matches the catalogue, (with ``--hash``) its content re-hashes to its ID,
every expected archive path is a hardlink of it, and ``n_hardlinks`` matches
the links found. A blob that passes gets ``blobs.last_checked = now()``;
every failure is a problem row of a ``verify`` run, with blob and path.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import secrets
import stat
import sys
from typing import Iterable

import blake3
import psycopg

from relinker import checkpoint, db
from relinker.linker import ArchiveLinker, LinkProblem
from relinker.paths import UnsafePath, by_hash_path, display, is_blobid

MODES = ("never", "oldest", "random")
HASH_CHUNK = 1 << 20

SQL_NEVER = "SELECT blobid FROM blobs WHERE last_checked IS NULL ORDER BY blobid LIMIT %(n)s"
SQL_OLDEST = "SELECT blobid FROM blobs ORDER BY last_checked NULLS FIRST, blobid LIMIT %(n)s"
# One index probe per random start point: a uniform sample of uniformly
# distributed IDs without sorting or scanning the table.
SQL_RANDOM = """
SELECT DISTINCT b.blobid
FROM unnest(%(starts)s::text[]) AS s(start)
CROSS JOIN LATERAL (SELECT blobid FROM blobs WHERE blobid >= s.start ORDER BY blobid LIMIT 1) AS b
"""
SQL_ANY_OTHERS = "SELECT blobid FROM blobs WHERE NOT (blobid = ANY(%s)) LIMIT %s"
SQL_KNOWN = "SELECT blobid FROM blobs WHERE blobid = ANY(%s)"
SQL_RECORDED = "SELECT coalesce(n_hardlinks, 0) FROM blobs WHERE blobid = %s"
SQL_PATHS = """
SELECT i.size, p.path
FROM inode AS i JOIN relinker_path AS p ON p.medium_hash = i.medium_hash AND p.ino = i.ino
WHERE i.blobid = %s AND i.fs_type = 'f' AND p.exclude_reason IS NULL
ORDER BY p.path
"""
SQL_CHECKED = "UPDATE blobs SET last_checked = now() WHERE blobid = ANY(%s)"
SQL_PROBLEM = """
INSERT INTO relinker_problem (run_id, range_no, blobid, path, kind, detail) VALUES (%s, 0, %s, %s, %s, %s)
"""
# A verify run is one range, so relinker_run_progress shows its figures too.
SQL_RANGE_DONE = """
UPDATE relinker_range
SET status = 'done', finished_at = now(), worker = %(worker)s, attempts = 1,
    blobs = %(blobs)s, links_present = %(links)s, links_missing = %(missing)s, problems = %(problems)s
WHERE run_id = %(run_id)s AND range_no = 0
"""
SQL_RUN_DONE = "UPDATE relinker_run SET status = 'done', finished_at = now() WHERE run_id = %s"
LINK_FAILURES = ("link-missing", "wrong-inode", "symlink-in-archive", "not-a-directory", "is-a-directory",
                 "unsafe-path", "name-too-long", "os-error")


@dataclasses.dataclass
class Failure:
    blobid: str
    kind: str
    detail: str
    path: bytes | None = None


@dataclasses.dataclass
class VerifyResult:
    """What a verify run found."""

    selection: str
    run_id: int | None = None  # the verify run, recorded once every blob is checked
    checked: int = 0
    passed: int = 0
    links_ok: int = 0
    failures: list[Failure] = dataclasses.field(default_factory=list)

    @property
    def failed(self) -> int:
        return self.checked - self.passed

    def by_kind(self) -> dict[str, int]:
        kinds: dict[str, int] = {}
        for f in self.failures:
            kinds[f.kind] = kinds.get(f.kind, 0) + 1
        return dict(sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0])))

    def as_text(self) -> str:
        kinds = ", ".join(f"{k} {n}" for k, n in self.by_kind().items())
        lines = [f"verify ({self.selection}), run {self.run_id}: {self.checked} blobs checked, "
                 f"{self.passed} passed, {self.failed} failed" + (f" ({kinds})" if kinds else "")]
        for f in self.failures[:20]:
            where = display(f.path) if f.path is not None else ""
            lines.append(f"  ! {f.kind}: {f.blobid} {where}: {f.detail}")
        return "\n".join(lines)

    def as_json(self) -> str:
        return json.dumps({
            "mode": "verify", "selection": self.selection, "run_id": self.run_id, "checked": self.checked,
            "passed": self.passed, "failed": self.failed, "links_ok": self.links_ok,
            "problems_by_kind": self.by_kind(),
            "failures": [{"blobid": f.blobid, "kind": f.kind, "detail": f.detail,
                          "path": display(f.path) if f.path is not None else None} for f in self.failures],
        })


def read_blob_ids(source: Iterable[str]) -> list[str]:
    """Blob IDs listed one per line (blank lines and # comments ignored)."""
    ids = []
    for line in source:
        line = line.split("#", 1)[0].strip()
        if line:
            ids.append(line.lower())
    return ids


def select_blobs(conn: psycopg.Connection, selection: str, count: int) -> list[str]:
    """``count`` blob IDs: never checked, least recently checked, or a random sample."""
    if selection == "never":
        return [b for (b,) in conn.execute(SQL_NEVER, {"n": count})]
    if selection == "oldest":
        return [b for (b,) in conn.execute(SQL_OLDEST, {"n": count})]
    chosen: set[str] = set()
    for _ in range(4):  # start points can land on the same blob; top up a few times
        missing = count - len(chosen)
        if missing <= 0:
            break
        starts = [secrets.token_hex(32) for _ in range(missing)]
        chosen.update(b for (b,) in conn.execute(SQL_RANDOM, {"starts": starts}))
    if len(chosen) < count:
        # A sample close to the table's size: take the rest in whatever order.
        chosen.update(b for (b,) in conn.execute(SQL_ANY_OTHERS, (list(chosen), count - len(chosen))))
    return sorted(chosen)[:count]


def verify(conn: psycopg.Connection, blobids: list[str], *, selection: str, by_hash_root: bytes,
           archive_root: bytes, rehash: bool) -> VerifyResult:
    """Check ``blobids``; record failures as problems of a new verify run.

    The run is created with its results, in one transaction: a verify
    stopped half way (Ctrl-C, a lost connection) leaves no run behind.
    """
    result = VerifyResult(selection)
    known = {b for (b,) in conn.execute(SQL_KNOWN, (blobids,))}
    passed = []
    with ArchiveLinker(archive_root, dry_run=True) as linker:
        for blobid in blobids:
            result.checked += 1
            failures = []
            if blobid not in known:
                failures.append(Failure(blobid, "unknown-blob", "not in the blobs table"))
            else:
                links = _check_blob(conn, linker, blobid, by_hash_root, rehash, failures)
                result.links_ok += links
            if failures:
                result.failures += failures
            else:
                passed.append(blobid)
    result.passed = len(passed)
    with conn.transaction():
        run_id = result.run_id = checkpoint.create_run(
            conn, "verify", by_hash_root, archive_root,
            {"selection": selection, "count": len(blobids), "hash": rehash}, [("", None)])
        conn.execute(SQL_CHECKED, (passed,))
        for f in result.failures:
            conn.execute(SQL_PROBLEM, (run_id, f.blobid, f.path, f.kind, f.detail))
        conn.execute(SQL_RANGE_DONE, dict(
            run_id=run_id, worker=db.worker_name(), blobs=result.checked, links=result.links_ok,
            missing=sum(f.kind in LINK_FAILURES for f in result.failures), problems=len(result.failures)))
        conn.execute(SQL_RUN_DONE, (run_id,))
    return result


def _check_blob(conn, linker: ArchiveLinker, blobid: str, by_hash_root: bytes, rehash: bool,
                failures: list[Failure]) -> int:
    """Check one blob; append failures; return how many archive links are right."""
    if not is_blobid(blobid):
        failures.append(Failure(blobid, "bad-blobid", "not a lowercase hex BLAKE3-256 digest"))
        return 0
    source = by_hash_path(by_hash_root, blobid)
    try:
        st = os.stat(source, follow_symlinks=False)
    except OSError as exc:
        failures.append(Failure(blobid, "missing-by-hash", exc.strerror, source))
        return 0
    if not stat.S_ISREG(st.st_mode):
        failures.append(Failure(blobid, "missing-by-hash", "not a regular file", source))
        return 0
    rows = conn.execute(SQL_PATHS, (blobid,)).fetchall()
    sizes = {size for size, _ in rows if size is not None}
    if sizes and st.st_size not in sizes:
        failures.append(Failure(blobid, "size-mismatch",
                                f"by-hash file has {st.st_size} bytes, catalogue says {sorted(sizes)}", source))
    if rehash:
        try:
            if _rehash(source) != blobid:
                failures.append(Failure(blobid, "content-mismatch", "content does not hash to its blob ID", source))
        except OSError as exc:
            failures.append(Failure(blobid, "content-unreadable", exc.strerror, source))
    linked = 0
    for path in dict.fromkeys(bytes(p) for _, p in rows):
        try:
            found = linker.probe(path)
        except (UnsafePath, LinkProblem) as exc:
            kind = exc.kind if isinstance(exc, LinkProblem) else "unsafe-path"
            failures.append(Failure(blobid, kind, str(exc), path))
            continue
        if found is None:
            failures.append(Failure(blobid, "link-missing", "no archive entry", path))
        elif (found.st_dev, found.st_ino) != (st.st_dev, st.st_ino):
            failures.append(Failure(blobid, "wrong-inode", "archive entry is not the by-hash file", path))
        else:
            linked += 1
    recorded = conn.execute(SQL_RECORDED, (blobid,)).fetchone()[0]
    if recorded != linked:
        failures.append(Failure(blobid, "count-mismatch", f"n_hardlinks is {recorded}, {linked} links found"))
    return linked


def _rehash(path: bytes) -> str:
    hasher = blake3.blake3()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def blob_ids_from(file_argument: str) -> list[str]:
    """IDs from ``--from-file FILE`` (``-`` for stdin)."""
    if file_argument == "-":
        # Bytes that are not UTF-8 read as U+FFFD, as from a file: such a
        # line is an unknown blob, never a string the database cannot take.
        return read_blob_ids(io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="replace"))
    with open(file_argument, encoding="utf-8", errors="replace") as f:
        return read_blob_ids(f)
