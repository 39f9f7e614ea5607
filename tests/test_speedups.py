"""The linker's system calls per path and per blob exist twice: in C (relinker._speedups) and in Python.

The two must agree on every path, hostile ones included; the C one is what
runs wherever relinker was installed with a compiler.
"""

import errno
import os
import stat
import subprocess
import sys

import pytest

from conftest import _speedups
from relinker import fastroute, linker


def test_the_c_fast_route_is_used_where_required():
    """CI sets RELINKER_REQUIRE_SPEEDUPS: there a missing compiler must not pass unnoticed."""
    if not os.environ.get("RELINKER_REQUIRE_SPEEDUPS"):
        pytest.skip("RELINKER_REQUIRE_SPEEDUPS is not set")
    assert _speedups is not None, "relinker._speedups was not built"
    assert linker.fast_route is _speedups.fast_route
    assert linker.lstat_identity is _speedups.lstat_identity


def test_fast_route_stops_at_the_first_path_it_cannot_settle(roots, implementation, tmp_path):
    """Each case in both modes: what the fast route settles, and where it hands over."""
    fast_route = implementation.fast_route
    archive, source, source_id = roots
    dev, ino = source_id
    os.makedirs(archive + b"/d")
    os.link(source, archive + b"/d/linked")
    (tmp_path / "archive" / "d" / "other").write_bytes(b"another file")
    os.symlink(source, archive + b"/d/symlink-to-source")
    os.mkdir(archive + b"/d/subdir")
    root_fd = os.open(archive, os.O_RDONLY | os.O_DIRECTORY)
    d_fd = os.open(archive + b"/d", os.O_PATH | os.O_DIRECTORY)
    directories = {b"": root_fd, b"/d": d_fd, b"/never-made": linker._MISSING}
    try:
        def run(paths, expect_present, start=0):
            return fast_route(paths, start, directories, None, source, dev, ino, expect_present)

        # (path, created by a link attempt, found by a check)
        cases = [
            (b"/d/new", True, False),
            (b"/d/linked", False, True),  # link: EEXIST
            (b"/d/other", False, False),
            (b"/d/symlink-to-source", False, False),  # never followed
            (b"/d/subdir", False, False),
            (b"/d/absent", True, False),
            (b"/top", True, False),
            (b"top-relative", True, False),
            (b"/d/.", False, False),
            (b"/d/..", False, False),
            (b"/d/", False, False),
            (b"/d//double", False, False),  # parent spelled "/d/": not cached
            (b"/d/nul\0byte", False, False),
            (b"/d/" + b"x" * 300, False, False),
            (b"/not-cached/x", False, False),
            (b"/never-made/x", False, False),
            (b"", False, False),
            (b"d/relative", False, False),
        ]
        for path, creates, finds in cases:
            assert run([path], True) == ((0, 1, 1) if finds else (0, 0, 0)), path
        for path, creates, finds in cases:
            assert run([path], False) == ((1, 0, 1) if creates else (0, 0, 0)), path
            if creates:
                assert os.stat(path.lstrip(b"/"), dir_fd=root_fd, follow_symlinks=False).st_ino == ino
        # several at once: counts up to the stop, and a restart after it
        paths = [b"/d/a", b"/d/b", b"/d/linked", b"/d/c"]
        assert run(paths, False) == (2, 0, 2)
        assert run(paths, False, start=3) == (1, 0, 4)
        assert run(paths, True) == (0, 4, 4)
        assert run((b"/d/a", b"/d/absent-now"), True) == (0, 1, 1)
        assert run([], True) == (0, 0, 0)
        assert run(paths, True, start=4) == (0, 0, 4)
        with pytest.raises(TypeError):
            run(["/d/a str"], True)
    finally:
        os.close(d_fd)
        os.close(root_fd)


def test_checks_below_a_directory_walked_before_but_not_cached(roots, implementation, tmp_path):
    """Beyond the descriptor cache a check goes by the path from the root, and only below a verified directory."""
    archive, source, (dev, ino) = roots
    os.makedirs(archive + b"/e/subdir")
    os.makedirs(archive + b"/unverified")
    for directory in (b"/e", b"/unverified"):
        os.link(source, archive + directory + b"/linked")
    (tmp_path / "archive" / "e" / "other").write_bytes(b"another file")
    os.symlink(source, archive + b"/e/symlink-to-source")
    root_fd = os.open(archive, os.O_RDONLY | os.O_DIRECTORY)
    directories, verified = {b"": root_fd}, {b"/e"}
    try:
        def run(paths, expect_present=True):
            return implementation.fast_route(paths, 0, directories, None, source, dev, ino, expect_present,
                                             None, verified, root_fd)

        assert run([b"/e/linked", b"/e/linked"]) == (0, 2, 2)
        for path in (b"/e/other", b"/e/symlink-to-source", b"/e/subdir", b"/e/absent", b"/e/.", b"/e/..",
                     b"/e/./linked", b"/e//linked", b"/unverified/linked", b"e/linked", b"/e/nul\0byte"):
            assert run([path]) == (0, 0, 0), path
        # linking below an uncached directory is the general route's: it opens it safely
        assert run([b"/e/new"], expect_present=False) == (0, 0, 0)
        assert not os.path.lexists(archive + b"/e/new")
        with pytest.raises(ValueError):
            implementation.fast_route([b"/e/linked"], 0, directories, None, source, dev, ino, True, None, verified)
    finally:
        os.close(root_fd)


def test_lstat_identity_is_an_lstat(roots, implementation, tmp_path):
    archive, source, (dev, ino) = roots
    lstat_identity = implementation.lstat_identity
    os.symlink(source, tmp_path / "symlink")
    store_fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        assert lstat_identity(source, None)[:2] == (dev, ino)  # absolute
        assert lstat_identity(source, store_fd)[:2] == (dev, ino)  # absolute: the descriptor does not matter
        found_dev, found_ino, mode = lstat_identity(b"by-hash-file", store_fd)
        assert (found_dev, found_ino) == (dev, ino) and stat.S_ISREG(mode)
        assert stat.S_ISLNK(lstat_identity(b"symlink", store_fd)[2])  # not followed
        assert stat.S_ISDIR(lstat_identity(b"archive", store_fd)[2])
        with pytest.raises(FileNotFoundError) as missing:
            lstat_identity(b"ab/cd/absent", store_fd)
        assert missing.value.filename == b"ab/cd/absent" and missing.value.errno == errno.ENOENT
        with pytest.raises(NotADirectoryError):
            lstat_identity(b"by-hash-file/below", store_fd)
        with pytest.raises(ValueError):
            lstat_identity(b"nul\0byte", store_fd)
    finally:
        os.close(store_fd)


# --- directory listings (C route only) ------------------------------------------

@pytest.fixture
def listed_directory(roots, tmp_path):
    """A directory d/ of the archive with a descriptor as the linker caches it, and a check through listings."""
    if _speedups is None:
        pytest.skip("relinker._speedups is not built (no C compiler at install time)")
    archive, source, (dev, ino) = roots
    os.makedirs(archive + b"/d")
    d_fd = os.open(archive + b"/d", os.O_PATH | os.O_DIRECTORY)
    directories = {b"/d": d_fd}
    listings = _speedups.DirectoryListings(1000)

    def check(paths, source_id=(dev, ino)):
        """How many of paths the fast route finds linked to source_id before it stops."""
        created, present, stop = _speedups.fast_route(
            paths, 0, directories, None, source, source_id[0], source_id[1], True, listings)
        assert created == 0 and present == stop
        return present

    try:
        yield archive, source, listings, check
    finally:
        listings.clear()
        os.close(d_fd)


def another_source(tmp_path, name):
    other = tmp_path / name
    other.write_bytes(name.encode())
    return os.fsencode(other), os.stat(other).st_ino


def test_a_check_reads_its_directory_once_and_answers_as_fstatat_would(listed_directory, roots, tmp_path):
    archive, source, listings, check = listed_directory
    os.link(source, archive + b"/d/linked")
    os.link(source, archive + b"/d/also linked \xff")
    (tmp_path / "archive" / "d" / "other").write_bytes(b"another file")
    os.symlink(source, archive + b"/d/symlink-to-source")
    os.mkdir(archive + b"/d/subdir")
    assert check([b"/d/linked", b"/d/also linked \xff"]) == 2
    assert (listings.directories, listings.entries) == (1, 5)
    for path in (b"/d/other", b"/d/symlink-to-source", b"/d/subdir", b"/d/absent", b"/d/linked/below"):
        assert check([path]) == 0, path
    assert listings.directories == 1  # read once
    # A listing answers for the moment it was read: this is how it saves the system call.
    os.unlink(archive + b"/d/linked")
    assert check([b"/d/linked"]) == 1
    # New names are not in it: they are checked by fstatat.
    os.link(source, archive + b"/d/new")
    assert check([b"/d/new"]) == 1
    os.unlink(archive + b"/d/new")
    assert check([b"/d/new"]) == 0


def test_a_name_found_with_another_inode_is_never_answered_from_the_listing_again(listed_directory, roots, tmp_path):
    """A catalogue that gives one path to two blobs: the second check must see what the first changed."""
    archive, source, listings, check = listed_directory
    _dev, ino = roots[2]
    other, other_ino = another_source(tmp_path, "other-blob")
    os.link(source, archive + b"/d/shared")
    assert check([b"/d/shared"], (roots[2][0], other_ino)) == 0  # listed as the first blob's
    # ... so the general route replaces it with the second blob's file
    os.link(other, archive + b"/d/tmp")
    os.rename(archive + b"/d/tmp", archive + b"/d/shared")
    assert check([b"/d/shared"], (roots[2][0], ino)) == 0
    assert check([b"/d/shared"], (roots[2][0], other_ino)) == 1


def test_a_name_this_process_links_or_replaces_is_forgotten_by_the_listing(roots, tmp_path):
    """The listing knew another file by that name: after relinker changed it, a check must look again.

    The fast route forgets a name it links; the linker's general route calls
    DirectoryListings.forget for what it links or replaces.
    """
    if _speedups is None:
        pytest.skip("relinker._speedups is not built (no C compiler at install time)")
    archive, source, (dev, ino) = roots
    other, other_ino = another_source(tmp_path, "other-blob")
    os.makedirs(archive + b"/d")
    for name in (b"linked-here", b"replaced-here"):
        os.link(other, archive + b"/d/" + name)
    os.link(source, archive + b"/d/reader")
    d_fd = os.open(archive + b"/d", os.O_PATH | os.O_DIRECTORY)
    directories = {b"/d": d_fd}
    listings = _speedups.DirectoryListings(1000)

    def route(paths, source_id, expect_present):
        return _speedups.fast_route(paths, 0, directories, None, source, dev, source_id, expect_present, listings)

    try:
        assert route([b"/d/reader"], ino, True) == (0, 1, 1)
        assert listings.entries == 3  # read: both names as the other blob's
        os.unlink(archive + b"/d/linked-here")  # someone else removed it...
        assert route([b"/d/linked-here"], ino, False) == (1, 0, 1)  # ... and the fast route links it
        os.link(source, archive + b"/d/tmp")  # the general route's replacement, by hand
        os.rename(archive + b"/d/tmp", archive + b"/d/replaced-here")
        listings.forget(d_fd, b"replaced-here")
        listings.forget(d_fd + 1000, b"replaced-here")  # a directory never listed: nothing to forget
        for name in (b"/d/linked-here", b"/d/replaced-here"):
            assert route([name], other_ino, True) == (0, 0, 0), name  # not the other blob's any more
            assert route([name], ino, True) == (0, 1, 1), name
        assert listings.directories == 1
        with pytest.raises(TypeError):
            listings.forget(d_fd, "a str")
    finally:
        listings.clear()
        os.close(d_fd)


def test_a_listing_answers_only_for_its_own_filesystem(listed_directory, roots):
    archive, source, listings, check = listed_directory
    dev, ino = roots[2]
    os.link(source, archive + b"/d/linked")
    assert check([b"/d/linked"], (dev + 1, ino)) == 0  # same inode number, another device
    assert check([b"/d/linked"], (dev, ino)) == 1


def test_listings_keep_to_their_budget(roots, tmp_path):
    """Beyond the budget nothing more is read; every check is still right."""
    archive, source, (dev, ino) = roots
    for directory in (b"/d", b"/e"):
        os.makedirs(archive + directory)
        for n in range(5):
            os.link(source, archive + directory + b"/f%d" % n)
    os.unlink(archive + b"/d/f4")
    fds = {key: os.open(archive + key, os.O_PATH | os.O_DIRECTORY) for key in (b"/d", b"/e")}
    listings = _speedups.DirectoryListings(3) if _speedups else pytest.skip("no relinker._speedups")
    try:
        paths = [directory + b"/f%d" % n for directory in (b"/d", b"/e") for n in range(5)]
        found = [_speedups.fast_route([path], 0, fds, None, source, dev, ino, True, listings)[1] for path in paths]
        assert found == [1, 1, 1, 1, 0, 1, 1, 1, 1, 1]
        assert (listings.directories, listings.entries) == (1, 3)
        listings.clear()
        assert (listings.directories, listings.entries) == (0, 0)
        assert _speedups.fast_route(paths[5:], 0, fds, None, source, dev, ino, True, listings) == (0, 5, 5)
        assert (listings.directories, listings.entries) == (1, 3)  # the budget is whole again after clear()
        with pytest.raises(TypeError):
            _speedups.fast_route(paths, 0, fds, None, source, dev, ino, True, object())
        with pytest.raises(ValueError):
            _speedups.DirectoryListings(-1)
    finally:
        listings.clear()
        for fd in fds.values():
            os.close(fd)


def test_the_linker_checks_a_complete_directory_from_one_listing(roots):
    if linker.DirectoryListings is None:
        pytest.skip("no directory listings: pure-Python route")
    archive, source, source_id = roots
    paths = [b"/d/f%d" % n for n in range(50)]
    with linker.ArchiveLinker(archive) as archive_linker:
        tally = linker.new_tally()
        assert archive_linker.link_all(source, source_id, paths, tally, None) == 50
        assert tally[linker.Outcome.CREATED] == 50
        listings = archive_linker._listings
        assert listings.directories == 0  # linking reads nothing
        tally = linker.new_tally()
        assert archive_linker.probe_all(source_id, paths, tally, None) == 50
        assert tally[linker.Outcome.PRESENT] == 50
        assert (listings.directories, listings.entries) == (1, 50)
    assert (listings.directories, listings.entries) == (0, 0)  # closing the linker forgets them


@pytest.mark.parametrize("setting, listings", [("", True), ("1", False)])
def test_directory_listings_can_be_switched_off(setting, listings):
    """RELINKER_NO_DIRECTORY_LISTINGS=1: the C loop checks every path by fstatat (the benchmark's baseline)."""
    if _speedups is None:
        pytest.skip("relinker._speedups is not built (no C compiler at install time)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELINKER_")}
    env["RELINKER_NO_DIRECTORY_LISTINGS"] = setting
    probe = "from relinker import linker; print(linker.DirectoryListings is not None, linker.fast_route.__module__)"
    # cwd=/: the installed relinker (with its extension), not the checkout's sources
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True,
                          cwd="/")
    assert done.stdout.split() == [str(listings), "relinker._speedups"]


@pytest.mark.parametrize("value, verified", [(2**70, None), (None, {b"/d"}), ("3", None)])
def test_both_routes_stop_alike_at_a_directory_value_that_is_no_descriptor(roots, value, verified):
    """The twins' contract on values ArchiveLinker never stores: an int beyond C's long, None (a value,
    not a missing key, even for a verified parent), a str. Each stops at that path, and raises nothing."""
    if _speedups is None:
        pytest.skip("relinker._speedups is not built")
    archive, source, (dev, ino) = roots
    os.makedirs(archive + b"/d")
    os.link(source, archive + b"/d/f")
    root_fd = os.open(archive, os.O_RDONLY | os.O_DIRECTORY)
    try:
        outcomes = [route([b"/d/f"], 0, {b"": root_fd, b"/d": value}, None, source, dev, ino, True, None,
                          verified, root_fd)
                    for route in (fastroute._fast_route_python, _speedups.fast_route)]
    finally:
        os.close(root_fd)
    assert outcomes == [(0, 0, 0), (0, 0, 0)]
