"""Packaging: what a source distribution carries, how the C extension builds, and when the version changes."""

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import relinker
from relinker import migrations

CHECKOUT = Path(__file__).resolve().parent.parent
#: The newest migration of each version: one that adds a migration is a new version (pip replaces an
#: installed wheel only with another version; a refusal of a newer catalogue names versions).
NEWEST_MIGRATION_OF = {"0.2.0": 13}


def test_the_source_distribution_holds_the_sql_the_tests_helpers_the_benchmarks_and_the_licence(tmp_path):
    # egg_info goes to tmp_path too: building leaves nothing in the checkout but build/ (ignored)
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path),
                    "sdist", "--dist-dir", str(tmp_path)], cwd=CHECKOUT, check=True, capture_output=True)
    (archive,) = tmp_path.glob("relinker-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {name.partition("/")[2] for name in tar.getnames()}
    wanted = {"LICENSE", "README.md", "setup.cfg", "setup.py", "pyproject.toml", "tox.ini", ".ci/run", ".ci/asan",
              "relinker/_speedups.c", "sql/views.sql", "sql/ntt_base.sql", "config/relinker.conf.example",
              "benchmarks/README.md", "benchmarks/benchlib.py"}
    wanted |= {f"sql/{name}" for name in os.listdir(CHECKOUT / "sql") if name.endswith(".sql")}
    # every module of the tests: test_*.py need conftest and the worlds they import
    wanted |= {f"tests/{name}" for name in os.listdir(CHECKOUT / "tests") if name.endswith(".py")}
    assert wanted - names == set()
    assert not [name for name in names if name.endswith((".so", ".pyc"))]  # nothing built for this machine


@pytest.mark.parametrize("in_place", [False, True], ids=["into build", "in place"])
def test_a_build_without_a_compiler_leaves_no_extension_an_earlier_build_made(tmp_path, in_place):
    """pip builds in the checkout's build/, an editable install in place: a compile that fails must leave
    no .so built before from other sources, where README promises the pure-Python route and a warning."""
    sources = tmp_path / "src"
    sources.mkdir()
    for name in ("setup.py", "setup.cfg", "pyproject.toml", "README.md"):
        (sources / name).write_bytes((CHECKOUT / name).read_bytes())
    (sources / "relinker").mkdir()
    for name in ("__init__.py", "_speedups.c"):
        (sources / "relinker" / name).write_bytes((CHECKOUT / "relinker" / name).read_bytes())
    lib = tmp_path / "lib"
    build = [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(lib), "--build-temp", str(tmp_path / "tmp")]
    if in_place:
        build.append("--inplace")
    subprocess.run(build, cwd=sources, check=True, capture_output=True)
    built = next(((sources if in_place else lib) / "relinker").glob("_speedups*.so"), None)
    if built is None:
        pytest.skip("no C compiler here: nothing built to be left behind")
    later = built.stat().st_mtime + 10
    os.utime(sources / "relinker" / "_speedups.c", (later, later))  # the sources changed since
    env = {**os.environ, "CC": "/bin/false", "LDSHARED": "/bin/false"}
    done = subprocess.run(build, cwd=sources, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr  # optional: the build goes on
    assert "failed" in done.stderr
    assert not built.exists()
    assert not list(sources.rglob("_speedups*.so")) and not list(lib.rglob("_speedups*.so"))


def test_a_new_migration_comes_with_a_new_version():
    newest = max(m.version for m in migrations.available())
    assert NEWEST_MIGRATION_OF.get(relinker.__version__) == newest, (
        f"relinker {relinker.__version__} ships migration {newest}: raise relinker.__version__ and record the "
        "new version in NEWEST_MIGRATION_OF")
