"""A range's rows go through one of two loops: the C RangeWalker, or Python's own.

RelinkWork walks ``(blobid, [path, ...])`` rows with relinker._speedups'
RangeWalker where the extension is built, and with its own Python loop
otherwise (and in dry runs). Both must leave the same archive, count the same
links and report the same problems, row for row, whatever the rows hold.
These tests feed both loops the same rows on two identical trees; no
database is involved (the rows stand for what the range query streams).
"""

import os

import pytest

from relinker import fastroute, linker
from relinker.checkpoint import Counters
from relinker.linker import Outcome, new_tally
from relinker.paths import by_hash_relpath
from relinker.pool import WorkSpec
from relinker.count import CountWork
from relinker.relink import RelinkWork
from blake3 import blake3

pytestmark = pytest.mark.skipif(linker.RangeWalker is None, reason="relinker._speedups is not built")


class Context:
    """What a worker hands RelinkWork: counters, problems, ticks."""

    def __init__(self, base=b""):
        self.counters = Counters()
        self.problems = []
        self.ticks = 0
        self.base = base

    def tick(self):
        self.ticks += 1

    def problem(self, kind, detail, *, blobid=None, path=None):
        # by-hash paths in problems name this tree's store: compared without it
        if path is not None and self.base and path.startswith(self.base):
            path = b"<base>" + path[len(self.base):]
        self.problems.append((kind, blobid, path))


def blobid_of(content: bytes) -> str:
    return blake3(content).hexdigest()


GOOD, OTHER, MISSING, DIRECTORY = (blobid_of(c) for c in (b"good", b"other", b"missing", b"directory"))


def build_tree(base):
    """A by-hash store and an archive with everything a range may meet."""
    store, archive = base / "by-hash", base / "archive"
    for blobid, content in ((GOOD, b"good"), (OTHER, b"other")):
        path = store / os.fsdecode(by_hash_relpath(blobid))
        path.parent.mkdir(parents=True)
        path.write_bytes(content)
    (store / os.fsdecode(by_hash_relpath(DIRECTORY))).mkdir(parents=True)
    # A file under a malformed (uppercase) ID: still never a source.
    upper = store / f"{GOOD[:2].upper()}/{GOOD[2:4].upper()}/{GOOD.upper()}"
    upper.parent.mkdir(parents=True)
    upper.write_bytes(b"good")
    archive.mkdir()
    (archive / "stale").write_bytes(b"good")  # an orphaned copy of the content
    (archive / "in-the-way").mkdir()
    os.symlink(base, archive / "planted")
    (archive / "file-not-dir").write_bytes(b"")
    os.makedirs(archive / "present")
    os.link(store / os.fsdecode(by_hash_relpath(GOOD)), archive / "present" / "already")
    return os.fsencode(store), os.fsencode(archive)


def new_work(store: bytes, archive: bytes, work_class=RelinkWork, run_id=1):
    """A worker's RelinkWork (or CountWork) over this store and archive; run_id None: a dry run."""
    return work_class(WorkSpec(work=work_class, dsn="", by_hash_root=store, archive_root=archive, options={},
                               run_id=run_id))


# Two inodes of one blob share a path; hostile paths; new and existing directories.
ROWS = [
    ("NOT-A-BLOB-ID", [b"/bad/id"]),
    (GOOD.upper(), [b"/bad/upper"]),
    (DIRECTORY, [b"/dir/blob"]),
    (GOOD, [b"/present/already", b"/a/b/c/one", b"/a/b/c/two", b"/stale", b"/in-the-way"]),
    (GOOD, [b"/a/b/c/two", b"/a/b/c/three", b"/planted/escape", b"/file-not-dir/x"]),
    (GOOD, []),
    (MISSING, [b"/missing/one", b"/missing/two"]),
    (OTHER, [b"/a/../up", b"/a/nul\0byte", b"", b"/a/b/c/" + b"n" * 300, b"/a/b/c/four"]),
    (OTHER, [b"/a/b/c/four", b"/a/b/d/five"] + [b"/many/f%d" % n for n in range(40)]),
]


def tree_of(archive: bytes):
    """Every entry below the archive: what it is, and for files the store's blob they are a link of."""
    found = {}
    for directory, dirs, files in os.walk(archive):
        for name in dirs + files:
            path = os.path.join(directory, name)
            st = os.lstat(path)
            found[path[len(archive):]] = (st.st_mode, st.st_nlink if not os.path.isdir(path) else None)
    return found


def walk(tmp_path, variant, work_class, rows, passes=1, tick_every=3):
    """Run the rows through one loop ("c" or "python"), ``passes`` times; return what each pass saw."""
    base = tmp_path / variant
    base.mkdir()
    store, archive = build_tree(base)
    work = new_work(store, archive, work_class)
    seen = []
    try:
        for _ in range(passes):
            ctx, tally = Context(os.fsencode(base)), new_tally()
            if variant == "c":
                walker = work.linker.range_walker(probe=work.PROBES, tick_every=tick_every)
                linked, expected = work._walk_rows(walker, iter(rows), ctx, tally)
                tally[Outcome.CREATED] += walker.created
                tally[Outcome.PRESENT] += walker.present
            else:
                linked, expected = work._loop_rows(iter(rows), ctx, tally)
            seen.append((linked, expected, tally, ctx.problems, tree_of(archive)))
    finally:
        work.close()
    return seen


@pytest.mark.parametrize("work_class", [RelinkWork, CountWork], ids=["relink", "count"])
def test_both_loops_agree_row_for_row(tmp_path, work_class):
    """Links, counts, outcomes, problems and the tree left behind: the same, on a first and a second pass."""
    c, python = walk(tmp_path, "c", work_class, ROWS, passes=2), walk(tmp_path, "python", work_class, ROWS, passes=2)
    assert c == python
    first_linked, first_expected, first_tally, first_problems, _ = c[0]
    # The cases are really there (so that agreeing means something).
    assert first_expected[GOOD] == 8  # "/a/b/c/two" once for both inodes
    assert first_expected[MISSING] == 2 and first_linked[MISSING] == 0
    kinds = {kind for kind, _, _ in first_problems}
    assert {"bad-blobid", "missing-by-hash", "unsafe-path"} <= kinds
    if work_class is RelinkWork:
        # all but the directory in the way, the planted symlink and the file where a directory belongs
        assert first_linked[GOOD] == 5
        assert {"is-a-directory", "symlink-in-archive", "not-a-directory"} <= kinds
        assert first_tally[Outcome.REPLACED] == 1 and first_tally[Outcome.PRESENT] == 1
        assert c[1][2][Outcome.PRESENT] == first_linked[GOOD] + first_linked[OTHER]  # second pass: all there
    else:
        assert first_linked[GOOD] == 1  # only the link made before; count creates nothing
        assert b"/a/b/c/one" not in c[0][4]


def test_the_walker_ticks_between_rows(tmp_path):
    """A tick every tick_every rows: progress, heartbeats and stop requests keep coming in long ranges."""
    rows = [(GOOD, [b"/t/%d" % n]) for n in range(10)]
    store, archive = build_tree(tmp_path)
    work = new_work(store, archive)
    try:
        ctx = Context()
        walker = work.linker.range_walker(probe=False, tick_every=3)
        linked, expected = work._walk_rows(walker, iter(rows), ctx, new_tally())
    finally:
        work.close()
    assert ctx.ticks == 3
    assert (linked[GOOD], expected[GOOD]) == (10, 10)
    assert (ctx.counters.links_created, ctx.counters.links_present) == (9, 0)  # the first by the general route


def test_a_complete_directory_is_checked_without_python(tmp_path):
    """Once the general route has found a link present, the walker checks the rest itself.

    On a complete archive the first path of a fresh linker goes by the
    general route (its directory is not cached yet, and a link is tried
    first); it finds the link there, and from then on the fast route checks
    instead of linking: no path after it comes back to Python.
    """
    rows = [(GOOD, [b"/full/%d" % n for n in range(10)])]
    store, archive = build_tree(tmp_path)
    first, second = new_work(store, archive), new_work(store, archive)
    settled = []
    second.settle = lambda *args: settled.append(args[2]) or RelinkWork.settle(second, *args)
    try:
        first._walk_rows(first.linker.range_walker(probe=False, tick_every=1000), iter(rows), Context(), new_tally())
        walker = second.linker.range_walker(probe=False, tick_every=1000)
        linked, _ = second._walk_rows(walker, iter(rows), Context(), new_tally())
    finally:
        first.close()
        second.close()
    assert linked[GOOD] == 10
    assert settled == [b"/full/0"]
    assert walker.present == 9


def test_an_unanswered_event_is_refused(tmp_path):
    """The walker hands over and waits: stepping on without answering would lose a path."""
    store, archive = build_tree(tmp_path)
    work = new_work(store, archive)
    try:
        walker = work.linker.range_walker(probe=False, tick_every=1000)
        rows = iter([(GOOD, [b"/new/dir/file"])])
        event = walker.step(rows)
        assert event[0] == fastroute.EVENT_PATH and event[1] == b"/new/dir/file"
        with pytest.raises(RuntimeError):
            walker.step(rows)
        with pytest.raises(RuntimeError):
            walker.set_source(None)
    finally:
        work.close()


def test_dry_runs_and_pure_python_take_python_s_loop(tmp_path):
    store, archive = build_tree(tmp_path)
    work = new_work(store, archive, run_id=None)
    try:
        assert work.linker.range_walker(probe=False, tick_every=1000) is None
    finally:
        work.close()


def test_the_walker_indexes_directories_until_told_to_forget_them(tmp_path):
    """The walker keeps the descriptors it looked up from range to range, and drops them when told.

    The linker never rebinds a cached directory and tells the walker to
    forget them all before it closes them; here the cache is rebound behind
    the walker's back to show which of the two answers.
    """
    store, archive = build_tree(tmp_path)
    work = new_work(store, archive)
    cache = work.linker._directories

    def walk_one(path):
        walker = work.linker.range_walker(probe=False, tick_every=1000)
        work._walk_rows(walker, iter([(GOOD, [path])]), Context(), new_tally())
        return walker

    try:
        walk_one(b"/x/one")  # the general route opens and caches /x
        walk_one(b"/x/two")  # the walker finds it in the cache, and indexes it
        os.mkdir(archive + b"/y")
        elsewhere = os.open(archive + b"/y", os.O_PATH | os.O_DIRECTORY)
        cached, cache[b"/x"] = cache[b"/x"], elsewhere
        try:
            walker = walk_one(b"/x/three")
            walker.forget_directories()
            walk_one(b"/x/four")
        finally:
            cache[b"/x"] = cached
            os.close(elsewhere)
    finally:
        work.close()
    assert sorted(os.listdir(archive + b"/x")) == [b"one", b"three", b"two"]
    assert os.listdir(archive + b"/y") == [b"four"]


@pytest.mark.parametrize("spelling", [b"/d/n", b"/d/./n"], ids=["same-spelling", "dot-spelling"])
@pytest.mark.parametrize("variant", ["c", "python"])
def test_a_path_two_blobs_share_ends_as_the_later_blobs_link(tmp_path, variant, spelling):
    """What the run itself changed is never answered from a directory listing read before.

    A catalogue can give one archive path to two blobs. Here ``/d/n`` is a
    link of X when the run starts; a check in ``/d`` reads the directory's
    listing (n: X); then Z's row replaces n in linking mode, or through the
    general route because its path is spelled ``/d/./n``. X's row comes last:
    it must find Z's link there and put X's back, not take the old listing's
    word that n is X.
    """
    contents = sorted((blobid_of(c), c) for c in (b"first", b"second", b"third"))
    (a, a_content), (z, z_content), (x, x_content) = contents
    store, archive = tmp_path / "by-hash", tmp_path / "archive"
    sources = {}
    for blobid, content in contents:
        path = store / os.fsdecode(by_hash_relpath(blobid))
        path.parent.mkdir(parents=True)
        path.write_bytes(content)
        sources[blobid] = path
    (archive / "d").mkdir(parents=True)
    for name, blobid in (("n", x), ("a", a), ("a2", a), ("z", z)):
        os.link(sources[blobid], archive / "d" / name)
    rows = [(a, [b"/d/a", b"/d/a2", b"/d/new"]), (z, [spelling, b"/d/z"]), (x, [b"/d/n"])]
    work = new_work(os.fsencode(store), os.fsencode(archive))
    try:
        ctx, tally = Context(), new_tally()
        if variant == "c":
            linked, expected = work._walk_rows(work.linker.range_walker(probe=False, tick_every=1000), iter(rows),
                                               ctx, tally)
        else:
            linked, expected = work._loop_rows(iter(rows), ctx, tally)
    finally:
        work.close()
    assert os.lstat(archive / "d" / "n").st_ino == os.stat(sources[x]).st_ino
    assert (linked, expected) == ({a: 3, z: 2, x: 1}, {a: 3, z: 2, x: 1})
    assert tally[Outcome.REPLACED] == 2 and ctx.problems == []


def test_a_walker_refuses_what_it_cannot_walk(tmp_path):
    """Misuse is an exception, never a crash: rows that are not an iterator, a walker never initialised."""
    store, archive = build_tree(tmp_path)
    work = new_work(store, archive)
    try:
        walker = work.linker.range_walker(probe=False, tick_every=1000)
        with pytest.raises(TypeError):
            walker.step([(GOOD, [b"/a/list"])])
        assert walker.step(iter([])) is None  # the refusal left the walker usable
    finally:
        work.close()
    bare = linker.RangeWalker.__new__(linker.RangeWalker)
    for call in (lambda: bare.step(iter([])), bare.results, lambda: bare.start(True)):
        with pytest.raises(RuntimeError):
            call()
    with pytest.raises(RuntimeError):
        bare.set_source(None)
    bare.forget_directories()


@pytest.mark.parametrize("variant", ["c", "python"])
def test_a_path_under_another_mediums_mount_is_one_archive_path_with_that_mediums_own(tmp_path, variant):
    """A medium may hold /mnt/ntt/<other>/f (read under its own mount, as the relative form is): the
    same archive path as <other>'s own /mnt/ntt/<other>/f, counted once for the blob."""
    rows = [(GOOD, [b"/mnt/ntt/bbbb/f", b"/mnt/ntt/bbbb/g"]), (GOOD, [b"/mnt/ntt/bbbb/f"])]
    (linked, expected, _tally, _problems, _tree), = walk(tmp_path, variant, CountWork, rows)
    assert expected[GOOD] == 2
