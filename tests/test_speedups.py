"""The linker's system calls per path and per blob exist twice: in C (relinker._speedups) and in Python.

The two must agree on every path, hostile ones included; the C one is what
runs wherever relinker was installed with a compiler.
"""

import errno
import os
import stat

import pytest

from conftest import _speedups
from relinker import linker


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
