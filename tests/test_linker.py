"""ArchiveLinker on a real filesystem: the fast route and the general one agree.

Most paths of a run take a fast route (a plain path below a directory whose
descriptor is cached); everything else takes the general one. These tests
put hostile and unusual paths *below a cached directory*, where only the
checks of the fast route stand between them and a system call. The fast
route exists twice, in C (relinker._speedups) and in Python; every test here
runs through each.
"""

import collections
import os

import pytest

from relinker import linker as linker_module
from relinker.linker import ArchiveLinker, Outcome


@pytest.fixture(autouse=True)
def _through_each_implementation(implementation, monkeypatch):
    """Run every test through each implementation of the linker's system calls."""
    monkeypatch.setattr(linker_module, "fast_route", implementation.fast_route)
    monkeypatch.setattr(linker_module, "lstat_identity", implementation.lstat_identity)


def link_all(linker, source, source_id, paths):
    tally = collections.Counter()
    problems = {}
    done = linker.link_all(source, source_id, paths, tally,
                           lambda path, kind, detail: problems.__setitem__(path, kind))
    return done, tally, problems


def test_hostile_last_components_below_a_cached_directory(roots, tmp_path):
    archive, source, source_id = roots
    (tmp_path / "outside").mkdir()
    with ArchiveLinker(archive) as linker:
        # the first path caches the descriptor of d/, the rest all hit it
        done, tally, problems = link_all(linker, source, source_id, [
            b"/d/first",
            b"/d/..",
            b"/d/.",
            b"/d/",
            b"/d/nul\0byte",
            b"/d/../../outside/escaped",
            b"/d//double",
            b"/d/./dot",
            b"/d/" + b"x" * 300,
            b"relative-name",  # relative forms name the same place as absolute ones
            b"rel/dir/x",
        ])
    assert problems == {
        b"/d/..": "unsafe-path",
        b"/d/nul\0byte": "unsafe-path",
        b"/d/../../outside/escaped": "unsafe-path",
        b"/d/" + b"x" * 300: "name-too-long",
        # '.' and an empty last component name d itself, a directory
        b"/d/.": "is-a-directory",
        b"/d/": "is-a-directory",
    }
    assert done == 5 and tally[Outcome.CREATED] == 5
    assert sorted(os.listdir(archive + b"/d")) == [b"dot", b"double", b"first"]
    assert sorted(os.listdir(archive)) == [b"d", b"rel", b"relative-name"]
    assert os.stat(archive + b"/rel/dir/x").st_ino == source_id[1]
    assert os.listdir(tmp_path / "outside") == []


def test_mixed_archive_every_outcome_in_one_pass(roots):
    archive, source, source_id = roots
    os.makedirs(archive + b"/d")
    os.link(source, archive + b"/d/present-1")
    os.link(source, archive + b"/d/present-2")
    with open(archive + b"/d/stale", "wb") as f:
        f.write(b"content")  # an orphaned copy: the same content
    os.symlink(b"/etc/passwd", archive + b"/d/symlink")
    paths = [b"/d/present-1", b"/d/missing-1", b"/d/present-2", b"/d/stale", b"/d/symlink", b"/d/missing-2"]
    with ArchiveLinker(archive) as linker:
        done, tally, problems = link_all(linker, source, source_id, paths)
        assert problems == {b"/d/symlink": "symlink-in-archive"}
        assert (tally[Outcome.PRESENT], tally[Outcome.CREATED], tally[Outcome.REPLACED]) == (2, 2, 1)
        assert done == 5
        # a second pass over the now complete directory finds everything
        done, tally, problems = link_all(linker, source, source_id, paths)
        assert tally[Outcome.PRESENT] == 5 and done == 5
    for name in (b"present-1", b"missing-1", b"present-2", b"stale", b"missing-2"):
        assert os.stat(archive + b"/d/" + name).st_ino == source_id[1]
    assert os.readlink(archive + b"/d/symlink") == b"/etc/passwd"


def test_probe_all_counts_without_creating(roots):
    archive, source, source_id = roots
    os.makedirs(archive + b"/d")
    os.link(source, archive + b"/d/linked")
    with open(archive + b"/d/other", "wb") as f:
        f.write(b"x")
    with ArchiveLinker(archive) as linker:
        tally = collections.Counter()
        problems = []
        paths = [b"/d/linked", b"/d/other", b"/d/absent", b"/nowhere/absent", b"/d/..", b"/d/linked"]
        done = linker.probe_all(source_id, paths, tally, lambda *p: problems.append(p))
    assert done == 2 and tally[Outcome.PRESENT] == 2 and tally[None] == 3
    assert [p[:2] for p in problems] == [(b"/d/..", "unsafe-path")]
    assert sorted(os.listdir(archive)) == [b"d"]


def test_directories_files_go_into_keep_their_descriptors_first(roots, monkeypatch):
    """With fewer descriptors than directories, the ones files are linked
    into are cached before the ones only passed through."""
    archive, source, source_id = roots
    monkeypatch.setattr(linker_module, "directory_cache_size", lambda: 40)
    # 14 top directories with 2 leaves each: 42 directories and the root for
    # 40 descriptors; 10 go to ancestors, so all 28 leaves fit
    paths = [b"/t%d/l%d/f" % (top, leaf) for top in range(14) for leaf in range(2)]
    with ArchiveLinker(archive) as linker:
        done, tally, problems = link_all(linker, source, source_id, paths)
        assert done == len(paths) and not problems
        cached = set(linker._directories) - {b""}
    leaves = {p.rpartition(b"/")[0] for p in paths}
    assert leaves <= cached
    assert len(cached - leaves) == int(40 * linker_module.ANCESTOR_SHARE)


def test_directories_beyond_the_cache_still_link_and_check(roots, monkeypatch):
    archive, source, source_id = roots
    monkeypatch.setattr(linker_module, "directory_cache_size", lambda: 4)
    paths = [b"/a/b%d/c%d/f" % (i, j) for i in range(5) for j in range(4)]
    with ArchiveLinker(archive) as linker:
        assert link_all(linker, source, source_id, paths)[1][Outcome.CREATED] == len(paths)
        done, tally, problems = link_all(linker, source, source_id, paths)
        assert tally[Outcome.PRESENT] == len(paths) and not problems
        assert len(linker._directories) <= 5  # the root and the 4 allowed
    assert os.stat(source).st_nlink == 1 + len(paths)


def test_sources_relative_to_a_store_root_reached_through_a_symlink(roots, tmp_path):
    archive, source, source_id = roots
    store = tmp_path / "pool" / "by-hash"
    (store / "ab").mkdir(parents=True)
    os.link(source, store / "ab" / "blob")
    (tmp_path / "store-link").symlink_to(store)  # a store moved to another pool
    with ArchiveLinker(archive, source_root=os.fsencode(tmp_path / "store-link")) as linker:
        assert linker.source_identity(b"ab/blob")[:2] == source_id
        done, tally, problems = link_all(linker, source, source_id, [b"/x/absolute-source"])
        assert done == 1
        done, tally, problems = link_all(linker, b"ab/blob", source_id, [b"/x/relative-source", b"/y/too"])
        assert done == 2
        os.unlink(store / "ab" / "blob")
        tally = collections.Counter()
        messages = []
        linker.link_all(b"ab/blob", source_id, [b"/x/after-removal"], tally, lambda *p: messages.append(p))
    assert [(path, kind) for path, kind, _ in messages] == [(b"/x/after-removal", "missing-by-hash")]
    assert os.fsdecode(tmp_path / "store-link" / "ab" / "blob") in messages[0][2]
    assert os.stat(archive + b"/y/too").st_ino == source_id[1]



def test_a_directory_found_missing_is_looked_for_again_in_the_next_range(tmp_path):
    """count and verify keep one linker per worker for all their ranges: a directory a relink made
    meanwhile must be seen, not remembered as missing."""
    from relinker.linker import new_tally

    (tmp_path / "archive").mkdir()
    (tmp_path / "by-hash").mkdir()
    (tmp_path / "by-hash" / "f").write_bytes(b"x")
    linker = ArchiveLinker(os.fsencode(tmp_path / "archive"), source_root=os.fsencode(tmp_path / "by-hash"))
    try:
        identity = linker.source_identity(b"f")[:2]
        assert linker.probe_all(identity, [b"/d/f"], new_tally(), lambda *a: None) == 0
        (tmp_path / "archive" / "d").mkdir()
        os.link(tmp_path / "by-hash" / "f", tmp_path / "archive" / "d" / "f")
        linker.new_range()
        assert linker.probe_all(identity, [b"/d/f"], new_tally(), lambda *a: None) == 1
    finally:
        linker.close()


def test_a_file_compared_before_its_replace_keeps_the_range_alive_and_can_be_stopped(tmp_path):
    """The only name of a large same-size file is read to the end against the by-hash file: the range's
    heartbeat and stop check run after each chunk, and a stop leaves the file where it was."""
    archive = tmp_path / "archive"
    (archive / "d").mkdir(parents=True)
    content = os.urandom(3 * linker_module.COMPARE_CHUNK + 17)
    source = tmp_path / "by-hash-file"
    source.write_bytes(content)
    st = os.stat(source)
    orphan = archive / "d" / "copy"
    orphan.write_bytes(content)
    with ArchiveLinker(os.fsencode(archive)) as linker:
        beats = []
        linker.while_reading = lambda: beats.append(1)
        done, tally, problems = link_all(linker, os.fsencode(source), (st.st_dev, st.st_ino), [b"/d/copy"])
        assert done == 1 and tally[Outcome.REPLACED] == 1 and len(beats) >= 3
        orphan.unlink()
        orphan.write_bytes(content)
        kept = os.stat(orphan).st_ino

        def stop():
            raise KeyboardInterrupt  # as Interrupted from a range's tick: not a problem of the path

        linker.while_reading = stop
        with pytest.raises(KeyboardInterrupt):
            link_all(linker, os.fsencode(source), (st.st_dev, st.st_ino), [b"/d/copy"])
    assert os.stat(orphan).st_ino == kept and os.listdir(archive / "d") == ["copy"]
