"""relinker._speedups called as a hostile caller would call it.

relinker itself hands the C route exact bytes, exact str and plain lists;
the extension's API must still hold for anything else: a bytes or str
subclass whose ``__hash__`` or ``__eq__`` runs Python code while the C code
looks it up, a rows iterator that calls back into the walker, arguments of
the wrong type. Each must end in an exception or in the same answer as the
Python twin, never in a crash. Tests whose failure could be a crash run in a
child interpreter (this module's ``child_*`` functions), so a segfault fails
the test instead of ending the session; under AddressSanitizer (``tox -e
asan``) the child's report fails it the same way.
"""

import json
import os
import subprocess
import sys

import pytest
from blake3 import blake3

import relinker
from relinker import fastroute, linker
from relinker.paths import by_hash_relpath

try:
    from relinker import _speedups
except ImportError:  # built without a compiler
    _speedups = None

needs_speedups = pytest.mark.skipif(_speedups is None, reason="relinker._speedups is not built")

GOOD = blake3(b"good").hexdigest()
OTHER = blake3(b"other").hexdigest()


def in_child(function, *args):
    """Run this module's ``function(*args)`` in a fresh interpreter; return the JSON it printed.

    The child imports the relinker (and extension) this session imported,
    and inherits the environment (AddressSanitizer's settings included).
    """
    package_parent = os.path.dirname(os.path.dirname(relinker.__file__))
    here = os.path.dirname(__file__)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([package_parent, here] + [p for p in [env.get("PYTHONPATH")] if p])
    script = f"import sys, {__name__.rpartition('.')[2]} as m; m.{function}(*sys.argv[1:])"
    done = subprocess.run([sys.executable, "-c", script, *(os.fsdecode(a) for a in args)], env=env,
                          capture_output=True, text=True, timeout=300, cwd="/")
    assert done.returncode == 0, f"{function} exited with {done.returncode}:\n{done.stderr[-6000:]}"
    return json.loads(done.stdout)


def make_tree(base):
    """A by-hash store holding GOOD and OTHER, and an archive with one directory d/: (store, archive)."""
    base = os.fsencode(base)
    store, archive = base + b"/by-hash", base + b"/archive"
    for blobid in (GOOD, OTHER):
        path = store + b"/" + by_hash_relpath(blobid)
        os.makedirs(os.path.dirname(path))
        with open(path, "wb") as f:
            f.write(b"good" if blobid == GOOD else b"other")
    os.makedirs(archive + b"/d")
    return store, archive


class Colliding(bytes):
    """A key with the hash of another (its twin) that runs ``action`` once when compared.

    Put in a dict or set before its twin, it is the first entry a lookup of
    the twin compares with: the lookup runs ``action``.
    """

    def __new__(cls, value, twin):
        self = super().__new__(cls, value)
        self.twin, self.action = twin, None
        return self

    def __hash__(self):
        return hash(self.twin)

    def __eq__(self, other):
        action, self.action = self.action, None
        if action is not None:
            action()
        return bytes(self) == other

    def __ne__(self, other):
        return not self.__eq__(other)


def names(directory):
    return sorted(os.fsdecode(n) for n in os.listdir(directory))


# --- 1: the paths list changes while the C loop walks it ------------------------------------


def child_paths_change_during_a_lookup(workdir, where, change, variant):
    """fast_route over 200 paths of one directory; the first lookup of that directory changes the list.

    ``where`` holds the colliding key: ``directories`` (linking into cached
    d/) or ``verified`` (checking below d/, walked before but not cached).
    ``change``: ``clear`` the list, or ``replace`` its items with 300 others.
    """
    store, archive = make_tree(os.path.join(workdir, variant))
    source = store + b"/" + by_hash_relpath(GOOD)
    st = os.stat(source)
    paths = [b"/d/%03d" % i for i in range(200)]  # fresh objects, over 512 bytes of items: malloc'ed
    others = [b"/d/new%03d" % i for i in range(300)]
    checking = where == "verified"
    if checking:
        for path in paths + others:
            os.link(source, archive + path)
    root_fd = os.open(archive, os.O_RDONLY | os.O_DIRECTORY)
    d_fd = os.open(archive + b"/d", os.O_PATH | os.O_DIRECTORY)
    colliding = Colliding(b"/elsewhere", b"/d")
    if checking:
        directories, verified = {b"": root_fd}, {colliding, b"/d"}
    else:
        directories, verified = {colliding: -1, b"/d": d_fd}, None
    colliding.action = paths.clear if change == "clear" else lambda: paths.__setitem__(slice(None), others)
    fast_route = _speedups.fast_route if variant == "c" else fastroute._fast_route_python
    result = fast_route(paths, 0, directories, None, source, st.st_dev, st.st_ino, checking, None, verified,
                        root_fd)
    print(json.dumps({"result": result, "names": len(os.listdir(archive + b"/d"))}))


@needs_speedups
@pytest.mark.parametrize("where, change", [("directories", "clear"), ("directories", "replace"),
                                           ("verified", "clear"), ("verified", "replace")])
def test_the_paths_list_may_change_while_fast_route_walks_it(tmp_path, where, change):
    """Item 1: the C loop re-reads the list at each step and holds the path it works on, as Python's does."""
    found = {variant: in_child("child_paths_change_during_a_lookup", tmp_path, where, change, variant)
             for variant in ("c", "python")}
    assert found["c"] == found["python"]
    # The first path was taken before the list changed; then the list as it is now.
    if change == "clear":
        expected = [0, 1, 0] if where == "verified" else [1, 0, 0]
        assert found["c"] == {"result": expected, "names": 1 if where == "directories" else 500}
    else:
        expected = [0, 300, 300] if where == "verified" else [300, 0, 300]
        assert found["c"] == {"result": expected, "names": 300 if where == "directories" else 500}


def walker_for(workdir, extra_directories=()):
    """A RangeWalker linking into archive d/ from the store of make_tree, and what it needs."""
    store, archive = make_tree(workdir)
    store_fd = os.open(store, os.O_PATH | os.O_DIRECTORY)
    root_fd = os.open(archive, os.O_RDONLY | os.O_DIRECTORY)
    d_fd = os.open(archive + b"/d", os.O_PATH | os.O_DIRECTORY)
    directories = dict(extra_directories)
    directories.update({b"": root_fd, b"/d": d_fd})
    return _speedups.RangeWalker(directories, store_fd, root_fd, False), archive


def walk(walker, rows):
    """Step through rows, answering every event as the general route would fail it; the walker's results."""
    events = []
    while (event := walker.step(rows)) is not None:
        events.append(event[0])
        if event[0] == _speedups.EVENT_PATH:
            walker.resolved(False, False)
        elif event[0] == _speedups.EVENT_SOURCE:
            walker.set_source(None)
    linked, expected = walker.results()
    return {"events": events, "linked": {str(k): v for k, v in linked.items()},
            "expected": {str(k): v for k, v in expected.items()}}


def child_walker_paths_change_during_a_lookup(workdir):
    colliding = Colliding(b"/elsewhere", b"/d")
    walker, archive = walker_for(workdir, {colliding: -1})
    paths = [b"/d/%03d" % i for i in range(200)]
    colliding.action = paths.clear
    found = walk(walker, iter([(GOOD, paths)]))
    found["names"] = names(archive + b"/d")
    print(json.dumps(found))


@needs_speedups
def test_the_row_s_paths_may_change_while_the_walker_walks_them(tmp_path):
    """Item 1 through RangeWalker: the event it hands back is read from the list as it is now."""
    found = in_child("child_walker_paths_change_during_a_lookup", tmp_path)
    assert found == {"events": [], "linked": {GOOD: 1}, "expected": {GOOD: 200}, "names": ["000"]}


# --- 2, 3: a walker's own objects freed by a callback ---------------------------------------


def calls_back(walker, refusals):
    """What a hostile __hash__ does: start the walker over (which frees its sets and dicts)."""
    try:
        walker.start(False)
        refusals.append("allowed")
    except RuntimeError as exc:
        refusals.append(f"refused: {exc}")


def child_path_hash_calls_back(workdir):
    refusals = []

    class Path(bytes):
        def __hash__(self):
            calls_back(walker, refusals)
            return bytes.__hash__(self)

    walker, archive = walker_for(workdir)
    # Two inodes of one blob: the second row's paths are looked up in the set of the first's.
    found = walk(walker, iter([(GOOD, [b"/d/a"]), (GOOD, [Path(b"/d/b"), b"/d/a"])]))
    found["refusals"] = sorted(set(refusals))
    found["names"] = names(archive + b"/d")
    print(json.dumps(found))


@needs_speedups
def test_a_path_whose_hash_starts_the_walker_over_is_refused(tmp_path):
    """Item 2: the set of a blob's paths seen so far must not be freed while a path is looked up in it."""
    found = in_child("child_path_hash_calls_back", tmp_path)
    assert found["refusals"] == ["refused: RangeWalker.start() called while step() runs"]
    assert found["names"] == ["a", "b"]
    assert (found["linked"], found["expected"]) == ({GOOD: 2}, {GOOD: 2})


def child_blobid_hash_calls_back(workdir):
    refusals = []

    class BlobID(str):
        def __hash__(self):
            calls_back(walker, refusals)
            return str.__hash__(self)

    walker, archive = walker_for(workdir)
    found = walk(walker, iter([(BlobID(GOOD), [b"/d/a"]), (OTHER, [b"/d/b", b"/d/c"])]))
    found["refusals"] = sorted(set(refusals))
    found["names"] = names(archive + b"/d")
    print(json.dumps(found))


@needs_speedups
def test_a_blob_id_whose_hash_starts_the_walker_over_is_refused(tmp_path):
    """Item 3: the counts by blob, and the blob ID being counted, must outlive the lookup of that ID."""
    found = in_child("child_blobid_hash_calls_back", tmp_path)
    assert found["refusals"] == ["refused: RangeWalker.start() called while step() runs"]
    assert (found["linked"], found["expected"]) == ({GOOD: 1, OTHER: 2}, {GOOD: 1, OTHER: 2})
    assert found["names"] == ["a", "b", "c"]


# --- 4: re-entry -----------------------------------------------------------------------------


class CallingRows:
    """A rows iterator that calls ``call`` before it hands over each row, and records what became of the call."""

    def __init__(self, rows, call):
        self.rows, self.call, self.outcomes = iter(rows), call, []

    def __iter__(self):
        return self

    def __next__(self):
        try:
            self.call()
            self.outcomes.append("allowed")
        except RuntimeError as exc:
            self.outcomes.append(f"refused: {exc}")
        return next(self.rows)


def child_rows_call_back(workdir, method):
    walker, archive = walker_for(workdir)
    inner_paths = [b"/d/inner"]
    before = sys.getrefcount(inner_paths)
    calls = {
        "step": lambda: walker.step(iter([(OTHER, inner_paths)])),
        "start": lambda: walker.start(False),
        "set_source": lambda: walker.set_source(None),
        "resolved": lambda: walker.resolved(True, False),
        "forget_directories": walker.forget_directories,
    }
    rows = CallingRows([(GOOD, [b"/d/a", b"/d/b"]), (OTHER, [b"/d/c"])], calls[method])
    found = walk(walker, rows)
    found["outcomes"] = sorted(set(rows.outcomes))
    found["names"] = names(archive + b"/d")
    found["inner_paths_references"] = sys.getrefcount(inner_paths) - before
    print(json.dumps(found))


@needs_speedups
@pytest.mark.parametrize("method", ["step", "start", "set_source", "resolved", "forget_directories"])
def test_a_walker_refuses_to_be_called_while_it_steps(tmp_path, method):
    """Item 4: a rows iterator that calls back into the walker gets RuntimeError; the walk goes on unharmed."""
    found = in_child("child_rows_call_back", tmp_path, method)
    assert found["outcomes"] == [f"refused: RangeWalker.{method}() called while step() runs"]
    assert found["inner_paths_references"] == 0
    assert found["names"] == ["a", "b", "c"]
    assert (found["linked"], found["expected"]) == ({GOOD: 2, OTHER: 1}, {GOOD: 2, OTHER: 1})


def child_rows_step_unhandled(workdir):
    walker, archive = walker_for(workdir)

    class Rows:
        def __iter__(self):
            return self

        def __next__(self):
            walker.step(iter([]))
            return (GOOD, [b"/d/a"])

    try:
        walker.step(Rows())
        outcome = "no exception"
    except RuntimeError as exc:
        outcome = str(exc)
    walker.start(False)  # usable again
    found = walk(walker, iter([(GOOD, [b"/d/b"])]))
    found["outcome"] = outcome
    found["names"] = names(archive + b"/d")
    print(json.dumps(found))


@needs_speedups
def test_a_refused_re_entry_leaves_the_walker_usable(tmp_path):
    found = in_child("child_rows_step_unhandled", tmp_path)
    assert found["outcome"] == "RangeWalker.step() called while step() runs"
    assert found["names"] == ["b"]
    assert (found["linked"], found["expected"]) == ({GOOD: 1}, {GOOD: 1})


# --- 5: arguments, descriptors, cycles ---------------------------------------------------------


@needs_speedups
def test_set_source_takes_only_the_walked_blob_s_by_hash_name(tmp_path):
    """Item 5: anything but None or ``(b"ab/cd/<the blob's ID>", (dev, ino))`` is refused, and the event stays open."""
    walker, archive = walker_for(tmp_path)
    missing = blake3(b"missing").hexdigest()
    assert walker.step(iter([(missing, [b"/d/a"])])) == (_speedups.EVENT_SOURCE, missing)
    relpath = by_hash_relpath(missing)
    refused = [
        (TypeError, [relpath, (1, 2)]),
        (TypeError, relpath),
        (TypeError, (relpath,)),
        (TypeError, (relpath, (1, 2), 3)),
        (TypeError, (relpath.decode(), (1, 2))),
        (TypeError, (relpath, [1, 2])),
        (TypeError, (relpath, (1, 2, 3))),
        (TypeError, (relpath, (1.0, 2))),
        (TypeError, (relpath, (1, "2"))),
        (ValueError, (relpath, (-1, 2))),
        (ValueError, (relpath, (1, -2))),
        (ValueError, (relpath, (2**64, 2))),
        (ValueError, (b"x" * 70, (1, 2))),
        (ValueError, (b"x" * 64, (1, 2))),
        (ValueError, (relpath + b"0", (1, 2))),
        (ValueError, (relpath[:-1] + b"\0", (1, 2))),
        (ValueError, (relpath.upper(), (1, 2))),
        (ValueError, (by_hash_relpath(GOOD), (1, 2))),  # another blob's
    ]
    for error, source in refused:
        with pytest.raises(error):
            walker.set_source(source)
    # The event is still waiting for its answer: a right one now links from it.
    store_file = tmp_path / "by-hash" / os.fsdecode(relpath)
    store_file.parent.mkdir(parents=True)
    store_file.write_bytes(b"missing")
    st = os.stat(store_file)
    walker.set_source((relpath, (st.st_dev, st.st_ino)))
    assert walker.step(iter([])) is None
    assert walker.results() == ({missing: 1}, {missing: 1})
    assert os.stat(archive + b"/d/a").st_ino == st.st_ino


def child_listing_of_a_bogus_descriptor(workdir):
    import resource

    listings = _speedups.DirectoryListings(1000)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    results = [_speedups.fast_route([b"/d/x"], 0, {b"/d": fd}, None, b"", 0, 1, True, listings)
               for fd in (2**24, 2**31 - 1)]
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024
    print(json.dumps({"results": results, "grown_mb": grown_mb, "directories": listings.directories}))


@needs_speedups
def test_a_listing_is_never_made_room_for_a_descriptor_that_is_not_open(tmp_path):
    """Item 5: the listings' table grew to the largest fd number handed in, open or not (2**24: 1 GiB)."""
    found = in_child("child_listing_of_a_bogus_descriptor", tmp_path)
    assert found["results"] == [[0, 0, 0], [0, 0, 0]]
    assert found["directories"] == 0
    assert found["grown_mb"] < 64


@needs_speedups
def test_a_walker_in_a_reference_cycle_is_collected(tmp_path):
    """Item 5: a cycle through a RangeWalker (here through its directories) is garbage like any other."""
    import gc
    import weakref

    class Holder:
        pass

    store, archive = make_tree(tmp_path)
    root_fd = os.open(archive, os.O_RDONLY | os.O_DIRECTORY)
    try:
        holder = Holder()
        walker = _speedups.RangeWalker({b"": root_fd, b"/cycle": holder}, root_fd, root_fd, False)
        holder.walker = walker
        assert walk(walker, iter([(GOOD, [b"/x"])]))["expected"] == {GOOD: 1}
        gone = weakref.ref(holder)
        del holder, walker
        gc.collect()
        assert gone() is None
    finally:
        os.close(root_fd)


@needs_speedups
def test_directory_listings_cannot_be_part_of_a_cycle():
    """They hold no Python object and cannot be subclassed (where a subclass could add some): no GC needed."""
    import gc

    assert not gc.is_tracked(_speedups.DirectoryListings(10))
    with pytest.raises(TypeError):
        type("Listings", (_speedups.DirectoryListings,), {})


def test_both_fast_routes_refuse_the_same_arguments(roots, implementation):
    """Item 5: the twins disagreed on NUL in source, a negative start, and more; now both refuse them."""
    archive, source, (dev, ino) = roots
    root_fd = os.open(archive, os.O_RDONLY | os.O_DIRECTORY)
    good = {"paths": [b"/f"], "start": 0, "directories": {b"": root_fd}, "source_fd": None, "source": source,
            "dev": dev, "ino": ino, "expect_present": False, "listings": None, "verified": None, "root_fd": None}

    class DictSubclass(dict):
        pass

    refused = [
        (ValueError, {"source": source + b"\0"}),
        (ValueError, {"start": -1}),
        (TypeError, {"start": 1.0}),
        (TypeError, {"paths": iter([b"/f"])}),
        (TypeError, {"paths": b"/f"}),
        (TypeError, {"paths": ["/f"]}),
        (TypeError, {"paths": [memoryview(b"/f")]}),
        (TypeError, {"paths": [bytearray(b"/f")]}),
        (TypeError, {"paths": [None]}),
        (TypeError, {"directories": DictSubclass({b"": root_fd})}),
        (TypeError, {"directories": [(b"", root_fd)]}),
        (TypeError, {"source": os.fsdecode(source)}),
        (ValueError, {"dev": -1}),
        (ValueError, {"ino": 2**64}),
        (TypeError, {"ino": float(ino)}),
        (ValueError, {"source_fd": -5}),
        (ValueError, {"source_fd": 2**31}),
        (TypeError, {"source_fd": str(root_fd)}),
        (TypeError, {"listings": object()}),
        (TypeError, {"verified": [b"/x"]}),
        (ValueError, {"verified": {b"/x"}}),  # without root_fd
        (TypeError, {"root_fd": 1.5}),
    ]
    try:
        for error, change in refused:
            with pytest.raises(error):
                implementation.fast_route(*{**good, **change}.values())
        assert os.listdir(archive) == []
        assert implementation.fast_route(*good.values()) == (1, 0, 1)
        assert implementation.fast_route(*{**good, "start": 5}.values()) == (0, 0, 1)
    finally:
        os.close(root_fd)


class Misleading(bytes):
    """Bytes whose methods lie: the C route reads the bytes themselves, and so must its twin."""

    def rpartition(self, sep):
        return (b"/elsewhere", b"/", b"else")

    def __getitem__(self, index):
        return b"/elsewhere/else"

    def __contains__(self, item):
        return False


def test_both_fast_routes_read_a_bytes_subclass_as_its_bytes(roots, implementation):
    archive, source, (dev, ino) = roots
    root_fd = os.open(archive, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert implementation.fast_route([Misleading(b"/f")], 0, {b"": root_fd}, None, Misleading(source), dev, ino,
                                         False) == (1, 0, 1)
        assert os.listdir(archive) == [b"f"]
        with pytest.raises(ValueError):  # its NUL is seen, whatever its __contains__ says
            implementation.fast_route([b"/g"], 0, {b"": root_fd}, None, Misleading(source + b"\0"), dev, ino, False)
        assert implementation.lstat_identity(Misleading(source), None)[:2] == (dev, ino)
    finally:
        os.close(root_fd)


def test_both_lstat_identities_take_only_bytes(roots, implementation):
    archive, source, (dev, ino) = roots
    for path in (os.fsdecode(source), memoryview(source), bytearray(source), None, 3):
        with pytest.raises(TypeError):
            implementation.lstat_identity(path, None)
    for dir_fd, error in ((-1, ValueError), (2**31, ValueError), ("3", TypeError), (3.0, TypeError)):
        with pytest.raises(error):
            implementation.lstat_identity(b"relative", dir_fd)
    assert implementation.lstat_identity(source, None)[:2] == (dev, ino)


# --- the two fast routes against each other -----------------------------------------------------

FUZZ_CALLS = 20_000


class FuzzTree:
    """One of two identical trees the fuzz runs the C and the Python route on, with its descriptors."""

    BIG = [b"n%040d" % i for i in range(700)]  # more entries than one 32 KiB getdents64 read holds

    def __init__(self, base):
        base = os.fsencode(base)
        os.makedirs(base + b"/store/dir")
        for name in (b"src", b"other"):
            with open(base + b"/store/" + name, "wb") as f:
                f.write(name)
        os.symlink(b"src", base + b"/store/link")
        self.archive = base + b"/archive"
        for directory in (b"d/sub", b"e/sub", b"big", b"u"):
            os.makedirs(self.archive + b"/" + directory)
        for directory in (b"/d", b"/e", b"/u"):
            os.link(base + b"/store/src", self.archive + directory + b"/linked")
            os.link(base + b"/store/src", self.archive + directory + b"/" + b"x" * 255)
            os.link(base + b"/store/other", self.archive + directory + b"/other")
            os.symlink(base + b"/store/src", self.archive + directory + b"/sym")
        for i, name in enumerate(self.BIG):
            os.link(base + b"/store/" + (b"other" if i % 7 == 0 else b"src"), self.archive + b"/big/" + name)
        self.identities = {kind: os.stat(base + b"/store/" + kind)[1:3][::-1] for kind in (b"src", b"other")}
        self.store_fd = os.open(base + b"/store", os.O_PATH | os.O_DIRECTORY)
        self.root_fd = os.open(self.archive, os.O_RDONLY | os.O_DIRECTORY)
        self.directories = {b"": self.root_fd, b"/missing": linker._MISSING}
        for key in (b"/d", b"/big", b"/d/sub"):
            self.directories[key] = os.open(self.archive + key, os.O_PATH | os.O_DIRECTORY)
        self.verified = {b"/e", b"/e/sub"}

    def close(self):
        for fd in [self.store_fd, *self.directories.values()]:
            if fd >= 0:
                os.close(fd)

    def state(self):
        """Every entry below the archive, files named by the store file they are a link of."""
        labels = {ino: kind.decode() for kind, (_dev, ino) in self.identities.items()}
        found = set()
        for top, dirs, files in os.walk(self.archive):
            for name in dirs + files:
                st = os.lstat(os.path.join(top, name))
                kind = labels.get(st.st_ino, "file") if os.path.isfile(os.path.join(top, name)) else st.st_mode >> 12
                found.add((os.path.relpath(os.path.join(top, name), self.archive), kind))
        return found


def fuzz_paths(rng, fresh):
    """A few catalogue paths: most of them plain (so that calls get far), many hostile."""
    parents = [b"/d", b"/e", b"/big", b"/u", b"/missing", b"/d/sub", b"/e/sub", b"", b"/d/", b"d", b"//d", b"/d/.",
               b"/e/..", b"/nowhere"]
    names = [b"linked", b"other", b"sym", b"sub", b"absent", b"x" * 255, b"y" * 255, b"z" * 256, b".", b"..", b"",
             b"a\0b", b"linked/", b"linked/below", *rng.sample(FuzzTree.BIG, 3), *rng.sample(fresh, 3)]
    plain_parents = [b"/d", b"/e", b"/big"]
    plain_names = [b"linked", b"x" * 255, *FuzzTree.BIG[1:7], *rng.sample(fresh, 3)]
    paths = []
    for _ in range(rng.randrange(0, 9)):
        if rng.random() < 0.7:
            path = rng.choice(plain_parents) + b"/" + rng.choice(plain_names)
        else:
            parent, name = rng.choice(parents), rng.choice(names)
            path = parent + b"/" + name if parent or rng.random() < 0.5 else name
        roll = rng.random()
        if roll < 0.01:
            path = rng.choice([os.fsdecode(path), bytearray(path), memoryview(path), None])
        elif roll < 0.04:
            path = Colliding(path, path)  # a bytes subclass, hashed and compared as its value
        paths.append(path)
    return rng.choice([list, list, tuple])(paths)


def outcome(call):
    try:
        return call()
    except (TypeError, ValueError) as exc:
        return type(exc).__name__


@needs_speedups
def test_c_and_python_fast_routes_agree_on_random_hostile_calls(tmp_path):
    """A seeded differential fuzz: each call on two identical trees, C on one and Python on the other.

    Results (or the exception's type) must be the same call for call, and the
    trees the same at the end. The C route also reads directory listings with
    budgets from nothing to plenty: they may change its cost, never an outcome.
    """
    import random

    seed = int(os.environ.get("RELINKER_FUZZ_SEED", "19"))
    rng = random.Random(seed)
    trees = {"c": FuzzTree(tmp_path / "c"), "python": FuzzTree(tmp_path / "python")}
    routes = {"c": _speedups.fast_route, "python": fastroute._fast_route_python}
    fresh = [b"new%d" % i for i in range(1000)]
    listings = None
    try:
        for call in range(FUZZ_CALLS):
            if call % 100 == 0:
                if listings is not None:
                    listings.clear()
                listings = _speedups.DirectoryListings(rng.choice([0, 1, 5, 100, 100_000]))
            paths = fuzz_paths(rng, fresh)
            start = rng.choice([0] * 12 + [1, 2, len(paths), len(paths) + 3, -1])
            expect_present = rng.random() < 0.6
            source = rng.choice([b"src"] * 20 + [b"other", b"absent", b"dir", b"link", b"bad\0"])
            kind = rng.choice([b"src"] * 4 + [b"other"])
            twist = rng.choice([None] * 30 + ["no such inode", "dev+1", "negative"])
            use_verified = rng.random() < 0.7
            found = {}
            for variant, tree in trees.items():
                dev, ino = tree.identities[kind]
                if twist == "no such inode":  # (ino + 1 may be the other file's, in one tree only)
                    ino = 2**64 - 2
                elif twist == "dev+1":
                    dev += 1
                elif twist == "negative":
                    ino = -ino
                args = (paths, start, tree.directories, tree.store_fd, source, dev, ino, expect_present,
                        listings if variant == "c" else None, tree.verified if use_verified else None,
                        tree.root_fd if use_verified or rng.random() < 0.5 else None)
                found[variant] = outcome(lambda: routes[variant](*args))
            assert found["c"] == found["python"], (found, seed, call, paths, start, expect_present, source, kind, twist)
            if call % 500 == 499:
                assert trees["c"].state() == trees["python"].state(), (seed, call)
        assert trees["c"].state() == trees["python"].state()
    finally:
        if listings is not None:
            listings.clear()
        for tree in trees.values():
            tree.close()


@needs_speedups
def test_c_and_python_lstat_identities_agree(tmp_path):
    import random

    rng = random.Random(19)
    tree = FuzzTree(tmp_path)
    try:
        candidates = [b"src", b"other", b"dir", b"link", b"absent", b"src/below", b"", b".", b"..", b"a\0b",
                      b"x" * 256, tree.archive, tree.archive + b"/d/sym", b"/proc/self/fd/0", "src",
                      bytearray(b"src"), memoryview(b"src"), None]
        for _ in range(500):
            path, dir_fd = rng.choice(candidates), rng.choice([None, tree.store_fd, tree.root_fd, -1, 2**31])
            found = []
            for lstat_identity in (_speedups.lstat_identity, fastroute._lstat_identity_python):
                try:
                    found.append(lstat_identity(path, dir_fd))
                except OSError as exc:
                    found.append((type(exc).__name__, exc.errno, exc.filename))
                except (TypeError, ValueError) as exc:
                    found.append(type(exc).__name__)
            assert found[0] == found[1], (path, dir_fd)
    finally:
        tree.close()
