"""`relinker migrate` on both catalogue shapes, twice, and its errors."""

import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import psycopg.sql
import pytest
from psycopg.conninfo import make_conninfo

import relinker
from relinker import migrations
from relinker.cli import main
from relinker.errors import UserError

# An older NTT catalogue: no partitions, path.path as text, none of the seed's columns.
OLD_SHAPE = """
CREATE TABLE medium (medium_hash text PRIMARY KEY, medium_human text, added_at timestamptz);
CREATE TABLE inode (medium_hash text, dev bigint, ino bigint, nlink int, size bigint, mtime bigint,
    blobid text, copied bool, copied_to text, errors text[], fs_type char(1), mime_type varchar,
    processed_at timestamptz, claimed_by text, claimed_at timestamptz, PRIMARY KEY (medium_hash, ino));
CREATE TABLE path (medium_hash text, dev bigint, ino bigint, path text, broken bool DEFAULT false,
    blobid text, exclude_reason text, PRIMARY KEY (medium_hash, path));
CREATE TABLE blobs (blobid text PRIMARY KEY, last_checked timestamptz, created_at timestamptz DEFAULT now());
INSERT INTO medium VALUES ('m1', 'old disk', now());
INSERT INTO path (medium_hash, dev, ino, path) VALUES ('m1', 1, 10, '/mnt/ntt/m1/Icon' || chr(13));
"""

def empty_roots(tmp_path) -> list[str]:
    """An empty store and archive under ``tmp_path``, as the command line's options."""
    (tmp_path / "by-hash").mkdir()
    (tmp_path / "archive").mkdir()
    return ["--by-hash-root", str(tmp_path / "by-hash"), "--archive-root", str(tmp_path / "archive")]


def connected_as(db_url: str, role: str) -> psycopg.Connection:
    """A session of ``role`` (one of login_roles') on the test's database, in autocommit."""
    return psycopg.connect(make_conninfo(db_url, user=role), autocommit=True)


@contextlib.contextmanager
def login_roles(db_url: str, names: tuple[str, ...], *setup: str):
    """Login roles ``names``, made by the test's superuser with the statements ``setup`` after them,
    dropped with all they own (the last first) once the test is done."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        for name in names:
            conn.execute(f"CREATE ROLE {name} LOGIN")
        for statement in setup:
            conn.execute(statement)
    try:
        yield
    finally:
        with psycopg.connect(db_url, autocommit=True) as conn:
            for name in reversed(names):
                conn.execute(f"DROP OWNED BY {name}")
                conn.execute(f"DROP ROLE {name}")


# The production shape as it was before the seed's change: partitioned, bytea paths.
PRODUCTION_SHAPE = """
CREATE TABLE medium (medium_hash text PRIMARY KEY, medium_human text, added_at timestamptz,
    health text, image_path text, enum_done timestamptz, copy_done timestamptz);
CREATE TABLE inode (medium_hash text, dev bigint, ino bigint, nlink int, size bigint, mtime bigint,
    blobid text, copied bool, copied_to text, errors text[], fs_type char(1), mime_type varchar,
    processed_at timestamptz, claimed_by text, claimed_at timestamptz, PRIMARY KEY (medium_hash, ino))
    PARTITION BY LIST (medium_hash);
CREATE TABLE path (medium_hash text, dev bigint, ino bigint, path bytea, broken bool DEFAULT false,
    blobid text, exclude_reason text, PRIMARY KEY (medium_hash, path)) PARTITION BY LIST (medium_hash);
CREATE TABLE blobs (blobid text PRIMARY KEY, last_checked timestamptz, created_at timestamptz DEFAULT now());
CREATE TABLE inode_m1 PARTITION OF inode FOR VALUES IN ('m1');
CREATE TABLE inode_m2 PARTITION OF inode FOR VALUES IN ('m2');
CREATE TABLE path_m1 PARTITION OF path FOR VALUES IN ('m1');
CREATE TABLE path_m2 PARTITION OF path FOR VALUES IN ('m2');
-- an index the operators built by hand on one partition (a name that needs
-- quoting): reused, not duplicated
CREATE INDEX "Path_M2_ByInode" ON path_m2 (medium_hash, ino);
-- a plain blobid index does not cover what relinker reads: relinker adds its own
CREATE INDEX inode_m1_by_blob ON inode_m1 (blobid);
INSERT INTO inode (medium_hash, ino, fs_type, blobid) VALUES ('m1', 10, 'f', 'ab'), ('m2', 20, 'f', 'cd');
INSERT INTO path (medium_hash, ino, path) VALUES ('m1', 10, '\\x2f612f5c72'::bytea), ('m2', 20, '\\x2fff'::bytea);
"""

SCHEMA_FINGERPRINT = """
SELECT string_agg(format('%s.%s:%s:%s', c.relname, a.attname, format_type(a.atttypid, a.atttypmod),
                         pg_get_expr(d.adbin, d.adrelid)), ' ' ORDER BY c.relname, a.attnum)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
WHERE n.nspname = 'public'
"""
INDEXES = """
SELECT string_agg(format('%s:%s', c.relname, i.indisvalid), ' ' ORDER BY c.relname)
FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'public'
"""


def fingerprint(dsn):
    with psycopg.connect(dsn) as conn:
        return conn.execute(SCHEMA_FINGERPRINT).fetchone()[0], conn.execute(INDEXES).fetchone()[0]


def columns(conn, table):
    return {name for (name,) in conn.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = %s", (table,))}


def test_base_creates_production_shape_and_second_run_changes_nothing(db_url, capsys):
    assert main(["--db-url", db_url, "migrate", "--base"]) == 0
    first = fingerprint(db_url)
    assert main(["--db-url", db_url, "migrate", "--base"]) == 0
    assert main(["--db-url", db_url, "migrate"]) == 0
    assert fingerprint(db_url) == first
    out = capsys.readouterr().out
    assert f"schema is at version {migrations.available()[-1].version}" in out
    with psycopg.connect(db_url) as conn:
        kinds = dict(conn.execute(
            "SELECT relname, relkind FROM pg_class WHERE relname IN ('inode', 'path', 'blobs', 'medium')"))
        assert kinds == {"inode": "p", "path": "p", "blobs": "r", "medium": "r"}
        assert conn.execute("SELECT data_type FROM information_schema.columns "
                            "WHERE table_name = 'path' AND column_name = 'path'").fetchone() == ("bytea",)
        versions = [v for (v,) in conn.execute("SELECT version FROM relinker_schema_migration ORDER BY 1")]
        assert versions == [m.version for m in migrations.available()]


@pytest.mark.parametrize("shape", ["production", "old"])
def test_migrate_existing_catalogue_twice(db_url, shape):
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(PRODUCTION_SHAPE if shape == "production" else OLD_SHAPE)
    assert main(["--db-url", db_url, "migrate"]) == 0
    first = fingerprint(db_url)
    assert main(["--db-url", db_url, "migrate"]) == 0
    assert fingerprint(db_url) == first
    with psycopg.connect(db_url) as conn:
        assert {"by_hash_created"} <= columns(conn, "inode")
        assert {"n_hardlinks", "expected_hardlinks"} <= columns(conn, "blobs")
        for table in ("relinker_run", "relinker_range", "relinker_problem", "relinker_verify_failure"):
            assert columns(conn, table)
        for view in ("relinker_run_progress", "relinker_open_ranges", "relinker_problem_kinds",
                     "relinker_incomplete_blobs"):
            conn.execute(f"SELECT * FROM {view}").fetchall()
        # the view relinker reads paths through always yields bytes
        paths = sorted(p for (p,) in conn.execute("SELECT path FROM relinker_path"))
        invalid = [name for name, valid in (x.split(":") for x in fingerprint(db_url)[1].split()) if valid != "t"]
        assert invalid == []
        # the range query's covering index: the linked paths only, on every partition
        links_indexes = conn.execute(
            "SELECT pg_get_indexdef(i.indexrelid) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "WHERE c.relname LIKE 'relinker_path_links_idx%' AND c.relkind = 'i'").fetchall()
        assert len(links_indexes) == (2 if shape == "production" else 1)
        assert all("(ino, medium_hash) INCLUDE (path) WHERE (exclude_reason IS NULL)" in d for (d,) in links_indexes)
    if shape == "production":
        assert paths == [b"/a/\\r", b"/\xff"]
        indexes = fingerprint(db_url)[1]
        assert "relinker_path_inode_idx" in indexes and "relinker_inode_blobid_idx" in indexes
        assert "Path_M2_ByInode" in indexes  # reused for partition m2 ...
        assert indexes.count("relinker_path_inode_idx_") == 1  # ... so only m1 got a new one
        assert indexes.count("relinker_inode_blobid_idx_") == 2  # a plain blobid index does not cover
    else:
        assert paths == [b"/mnt/ntt/m1/Icon\r"]


def test_partitions_in_a_schema_of_their_own_get_their_indexes(db_url):
    """Operators may keep a catalogue's partitions outside the search_path: found by their schema."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(PRODUCTION_SHAPE)
        conn.execute('CREATE SCHEMA "Parts"')
        conn.execute('ALTER TABLE path_m1 SET SCHEMA "Parts"; ALTER TABLE inode_m2 SET SCHEMA "Parts"')
    assert main(["--db-url", db_url, "migrate"]) == 0
    with psycopg.connect(db_url) as conn:
        built = conn.execute(
            "SELECT t.relnamespace::regnamespace::text, t.relname, count(*) FILTER (WHERE i.indisvalid) "
            "FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_class t ON t.oid = i.indrelid "
            "WHERE c.relname LIKE 'relinker%%' AND t.relispartition GROUP BY 1, 2 ORDER BY 2").fetchall()
        # each partition has relinker's indexes (m2's lookup by inode is the operators' own)
        assert built == [("public", "inode_m1", 1), ('"Parts"', "inode_m2", 1), ('"Parts"', "path_m1", 2),
                         ("public", "path_m2", 1)]
        assert not conn.execute("SELECT 1 FROM pg_index WHERE NOT indisvalid").fetchone()
    assert main(["--db-url", db_url, "migrate"]) == 0


def test_a_catalogue_an_earlier_relinker_gave_a_plain_blobid_index_gets_a_covering_one(db_url):
    """Before 0003 covered the inode's key, it made a plain (blobid) index under the same name: a later
    migrate builds the covering one beside it, and builds nothing where 0003's already covers."""
    covering = ("SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid WHERE c.relispartition "
                "AND c.relname LIKE 'inode%%' AND pg_get_indexdef(i.indexrelid) LIKE "
                "'%%(blobid) INCLUDE (medium_hash, ino, fs_type)'")
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(PRODUCTION_SHAPE)
    assert main(["--db-url", db_url, "migrate"]) == 0
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert conn.execute(covering).fetchone() == (2,)
        assert not conn.execute("SELECT to_regclass('relinker_inode_blobid_cover_idx')").fetchone()[0]
        # as an earlier relinker left it
        conn.execute("DROP INDEX relinker_inode_blobid_idx")
        conn.execute("CREATE INDEX relinker_inode_blobid_idx ON inode (blobid)")
        conn.execute("DELETE FROM relinker_schema_migration WHERE version = 11")
        assert conn.execute(covering).fetchone() == (0,)
    assert main(["--db-url", db_url, "migrate"]) == 0
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert conn.execute(covering).fetchone() == (2,)
        assert not conn.execute("SELECT 1 FROM pg_index WHERE NOT indisvalid").fetchone()


def test_migrate_resumes_after_an_interrupted_concurrent_index_build(db_url):
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(PRODUCTION_SHAPE)
        # what a CONCURRENTLY build cancelled half-way leaves behind
        covering = "(blobid) INCLUDE (medium_hash, ino, fs_type)"
        conn.execute(f"CREATE INDEX relinker_inode_blobid_idx ON ONLY inode {covering}")
        conn.execute(f"CREATE INDEX relinker_inode_blobid_idx_x ON inode_m1 {covering}")
        conn.execute("UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'relinker_inode_blobid_idx_x'::regclass")
    assert main(["--db-url", db_url, "migrate"]) == 0
    with psycopg.connect(db_url) as conn:
        valid = conn.execute("SELECT indisvalid FROM pg_index WHERE indexrelid = "
                             "'relinker_inode_blobid_idx'::regclass").fetchone()
        assert valid == (True,)


def test_an_index_build_names_the_open_transactions_it_waits_for(db_url, capsys):
    """A concurrent build waits for the transactions that hold a snapshot (or wrote to the table),
    however long they stay open: migrate says which sessions it waits for, and goes on once they end.
    One idle in a transaction that holds no snapshot is no wait, and is not named."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(PRODUCTION_SHAPE)
    with psycopg.connect(db_url) as reader, psycopg.connect(db_url) as idle:  # sessions of other tools
        reader.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        reader.execute("SELECT 1")  # its snapshot lasts until its transaction ends
        idle.execute("SELECT 1")
        ended = threading.Timer(2.0, reader.commit)
        ended.start()
        try:
            started = time.monotonic()
            assert main(["--db-url", db_url, "migrate"]) == 0
        finally:
            ended.join()
        assert time.monotonic() - started >= 1.5  # it did wait for the reader
        warned = [line for line in capsys.readouterr().err.splitlines() if "waits for the transactions open now" in line]
        assert warned and all("1 session (the first, " in line for line in warned)
        assert f"the first, {reader.info.backend_pid}, idle in transaction for" in warned[0]


def test_an_online_migration_relinker_cannot_read_is_refused(catalogue_url):
    """A CREATE INDEX the online builder does not understand fails the migration instead of being skipped."""
    text = "-- relinker: online\nCREATE INDEX CONCURRENTLY IF NOT EXISTS x ON path USING hash (ino);\n"
    with psycopg.connect(catalogue_url, autocommit=True) as conn:
        with pytest.raises(ValueError, match="cannot build online"):
            migrations._apply_online(conn, text)


def test_migrate_without_ntt_tables_says_what_to_do(db_url, capsys):
    assert main(["--db-url", db_url, "migrate"]) == 2
    err = capsys.readouterr().err
    assert "not an NTT catalogue" in err and "migrate --base" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", [["migrate", "--base"], ["migrate"], ["status"], ["relink", "--no-progress"]])
def test_a_search_path_that_misses_the_catalogue_says_so_and_makes_none(db_url, capsys, tmp_path, command):
    """The catalogue in a schema of its own, the role's search_path without it: every command said "not
    an NTT catalogue" and told the user to make one, and migrate --base made a second, empty one."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA ntt; SET search_path = ntt")
        conn.execute(PRODUCTION_SHAPE)
    roots = empty_roots(tmp_path)
    roots = roots if command[0] == "relink" else []
    assert main(["--db-url", db_url, *roots, *command]) == 2
    err = capsys.readouterr().err
    assert err.startswith("relinker: error: the catalogue's tables (medium, inode, path, blobs) are in schema ntt, "
                          "which this session's search_path") and "migrate --base" not in err, err
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert conn.execute("SELECT to_regclass('public.blobs')").fetchone() == (None,)
    # with the schema in its search_path, the same command works
    reaching = make_conninfo(db_url, options="-csearch_path=ntt")
    assert main(["--db-url", reaching, "migrate"]) == 0
    # (relink ends with problems: the catalogue's blobs have no by-hash files)
    assert main(["--db-url", reaching, *roots, *command]) == (1 if command[0] == "relink" else 0)


def test_a_table_of_an_ntt_name_in_another_schema_is_no_catalogue_out_of_reach(db_url, capsys):
    """An application's own `path` table in its schema: the catalogue is not elsewhere, and
    migrate --base makes it here."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA app; CREATE TABLE app.path (id int)")
    assert main(["--db-url", db_url, "status"]) == 2
    assert "not an NTT catalogue (missing tables: medium, inode, path, blobs)" in capsys.readouterr().err
    assert main(["--db-url", db_url, "migrate", "--base"]) == 0


def test_relinkers_tables_an_earlier_migrate_put_in_a_roles_own_schema_are_named_not_doubled(db_url, capsys):
    """An earlier relinker built its tables in the first schema of the migrating role's search_path
    ("$user"); migrate now builds beside the catalogue, and the role's sessions would find the old set
    first: runs split between two sets, status as the owner saying "no runs yet"."""
    suffix = os.getpid()
    owner, member = f"owner8_{suffix}", f"member8_{suffix}"
    with login_roles(db_url, (owner, member), f"GRANT {owner} TO {member}", f"CREATE SCHEMA AUTHORIZATION {member}",
                     f"GRANT CREATE ON SCHEMA public TO {owner}"):
        with connected_as(db_url, owner) as conn:
            conn.execute(PRODUCTION_SHAPE)
            migrations.migrate(conn)
        with connected_as(db_url, member) as conn:
            conn.execute("CREATE TABLE relinker_schema_migration (LIKE public.relinker_schema_migration)")
            assert conn.execute("SELECT relnamespace::regnamespace::text FROM pg_class "
                                "WHERE oid = to_regclass('relinker_schema_migration')").fetchone() == (member,)
        for command in (["migrate"], ["status"]):
            assert main(["--db-url", make_conninfo(db_url, user=member), *command]) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"relinker: error: relinker's tables are both beside the catalogue's (schema "
                                  f"public) and in schema {member}, which this role's search_path also reaches"), err
        assert main(["--db-url", make_conninfo(db_url, user=owner), "status"]) == 0  # its path reaches one
        capsys.readouterr()
        # the old set alone, none beside the catalogue yet: migrate would make a second one
        with connected_as(db_url, owner) as conn:
            conn.execute("DROP TABLE relinker_schema_migration CASCADE")
        assert main(["--db-url", make_conninfo(db_url, user=member), "migrate"]) == 2
        assert capsys.readouterr().err.startswith(
            f"relinker: error: relinker's tables are apart from the catalogue's (schema public, where this relinker "
            f"makes them), in schema {member}")


def test_two_catalogues_in_two_schemas_each_keep_their_own_relinker_tables(db_url, capsys):
    """A role whose search_path reaches a second catalogue's schema too: its relinker tables are that
    catalogue's, not an earlier relinker's leftovers (every command was refused, told to drop them)."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(PRODUCTION_SHAPE)
        conn.execute("CREATE SCHEMA second")
    assert main(["--db-url", db_url, "migrate"]) == 0
    second = make_conninfo(db_url, options="-csearch_path=second")
    with psycopg.connect(second, autocommit=True) as conn:
        conn.execute(PRODUCTION_SHAPE)
    assert main(["--db-url", second, "migrate"]) == 0
    capsys.readouterr()
    for path in ("second,public", "public,second"):
        assert main(["--db-url", make_conninfo(db_url, options=f"-csearch_path={path}"), "status"]) == 0, \
            capsys.readouterr().err


def test_a_catalogue_not_yet_migrated_beside_a_migrated_one_is_migrated_beside_itself(db_url, capsys):
    """Two catalogues, the second migrated, a search_path reaching both with the first unmigrated one
    first: commands found the second's tables (runs planned into its run table, ranges failing), and
    migrate dropped the second's views to make its own."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(PRODUCTION_SHAPE)
        conn.execute("CREATE SCHEMA second")
    second = make_conninfo(db_url, options="-csearch_path=second")
    with psycopg.connect(second, autocommit=True) as conn:
        conn.execute(PRODUCTION_SHAPE)
    assert main(["--db-url", second, "migrate"]) == 0
    both = make_conninfo(db_url, options="-csearch_path=public,second")
    capsys.readouterr()
    assert main(["--db-url", both, "status"]) == 2
    assert capsys.readouterr().err == ("relinker: error: the catalogue this session finds is in schema public, but "
                                       "the relinker tables it finds first are those of the catalogue in schema "
                                       "second: put public first in the search_path (or migrate it: `relinker "
                                       "migrate` builds beside it)\n")
    assert main(["--db-url", both, "migrate"]) == 0
    with psycopg.connect(db_url, autocommit=True) as conn:
        views = dict(conn.execute("SELECT relnamespace::regnamespace::text, count(*) FROM pg_class "
                                  "WHERE relkind = 'v' AND relname LIKE 'relinker%' GROUP BY 1"))
    assert views == {"public": 5, "second": 5}
    for dsn in (both, second):
        assert main(["--db-url", dsn, "status"]) == 0, capsys.readouterr().err


def test_a_catalogue_whose_tables_lie_in_two_schemas_migrates(db_url, capsys):
    """blobs in public, the rest in a schema of its own, a search_path reaching both: migrate, working with
    blobs' schema alone in its search_path, no longer found inode and path. (A schema's name that must be
    quoted was quoted twice.)"""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute('CREATE SCHEMA "Ntt Here"; SET search_path = "Ntt Here"')
        conn.execute(PRODUCTION_SHAPE)
        conn.execute('ALTER TABLE "Ntt Here".blobs SET SCHEMA public')
    split = make_conninfo(db_url, options='-csearch_path="Ntt\\ Here",public')
    for _ in range(2):
        assert main(["--db-url", split, "migrate"]) == 0, capsys.readouterr().err
    assert main(["--db-url", split, "status"]) == 0


def test_migrate_gives_the_session_back_the_role_its_caller_set(db_url):
    """A caller's own SET ROLE (a member of the owner's role) was undone with RESET ROLE, back to the
    login role, on success and on refusal alike."""
    suffix = os.getpid()
    owner, middle, login = f"owner10_{suffix}", f"middle10_{suffix}", f"login10_{suffix}"
    with login_roles(db_url, (owner, middle, login), f"GRANT {owner} TO {middle}", f"GRANT {middle} TO {login}",
                     f"GRANT CREATE ON SCHEMA public TO {owner}"):
        with connected_as(db_url, owner) as conn:
            conn.execute(PRODUCTION_SHAPE)
        with connected_as(db_url, login) as conn:
            conn.execute(f"SET ROLE {middle}")
            migrations.migrate(conn)
            assert conn.execute("SELECT current_user").fetchone() == (middle,)
        with connected_as(db_url, owner) as conn:
            conn.execute("INSERT INTO relinker_schema_migration (version, name) VALUES (999, 'a newer one')")
        with connected_as(db_url, login) as conn:
            conn.execute(f"SET ROLE {middle}")
            with pytest.raises(UserError):
                migrations.migrate(conn)
            assert conn.execute("SELECT current_user").fetchone() == (middle,)


def test_an_owner_that_may_not_create_beside_its_tables_is_told_the_grant(db_url, capsys):
    """The owner itself, refused CREATE on its tables' schema since it made them, met a bare "permission
    denied for schema" where a member was told the GRANT."""
    suffix = os.getpid()
    owner = f"owner9_{suffix}"
    with login_roles(db_url, (owner,), f"GRANT CREATE ON SCHEMA public TO {owner}"):
        with connected_as(db_url, owner) as conn:
            conn.execute(PRODUCTION_SHAPE)
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(f"REVOKE CREATE ON SCHEMA public FROM {owner}")
        assert main(["--db-url", make_conninfo(db_url, user=owner), "migrate"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"relinker: error: {owner} may not create in schema public") and \
            err.rstrip().endswith(f"GRANT CREATE ON SCHEMA public TO {owner}") and len(err.splitlines()) == 1, err


def test_unreachable_database_is_one_line_exit_2(tmp_path, capsys):
    dsn = f"host={tmp_path} port=1 dbname=nothing connect_timeout=2"
    assert main(["--db-url", dsn, "migrate"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("relinker: error: cannot connect to the catalogue database")
    assert len(err.strip().splitlines()) == 1


def test_wrong_credentials_are_one_line_exit_2(db_url, capsys):
    dsn = psycopg.conninfo.make_conninfo(db_url, user="no_such_role")
    assert main(["--db-url", dsn, "migrate"]) == 2
    err = capsys.readouterr().err
    assert "cannot connect" in err and "no_such_role" in err and len(err.strip().splitlines()) == 1


def test_a_role_out_of_connection_slots_is_not_told_to_fix_its_dsn(db_url, capsys):
    with login_roles(db_url, ("relinker_full",), "ALTER ROLE relinker_full CONNECTION LIMIT 0"):
        assert main(["--db-url", make_conninfo(db_url, user="relinker_full"), "status"]) == 2
    err = capsys.readouterr().err
    assert 'too many connections for role "relinker_full"' in err and len(err.strip().splitlines()) == 1
    assert err.endswith("(no more connections allowed now: see max_connections and CONNECTION LIMIT; a run's "
                        "workers take two each)\n")


@pytest.mark.parametrize("dsn, said", [
    ("postgresql://copier:S3cretPassw0rd@[dbhost/copyjob", 'in IPv6 host address in URI: "..."'),
    ("postgresql://archivist:S3cretPassw0rd%!@db.example/catalogue", 'invalid percent-encoded token: "..."'),
    ("postgresql//copier:S3cretPassw0rd@db.example/catalogue", 'missing "=" after "..." in connection info'),
    ("POSTGRESQL://u:S3cretPassw0rd@h/db?foo=bar", 'invalid connection option "..."'),
    ("host=dbhost password=S3cret Passw0rd", 'missing "=" after "..." in connection info'),
    ("host=dbhost sslmod=require", 'invalid connection option "sslmod"'),  # a key's name helps, and stays
])
def test_a_password_in_a_dsn_libpq_cannot_parse_is_never_printed(capsys, tmp_path, dsn, said):
    """libpq quotes the pieces of a DSN it cannot parse, a password's among them: none is printed or logged."""
    log_file = tmp_path / "relinker.log"
    assert main(["--log-file", str(log_file), "--db-url", dsn, "status"]) == 2
    err = capsys.readouterr().err
    assert "cannot connect" in err and said in err and "S3cret" not in err and "Passw0rd" not in err
    assert said in log_file.read_text() and "S3cret" not in log_file.read_text()


def test_commands_refuse_an_unmigrated_catalogue(db_url):
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(PRODUCTION_SHAPE)
        with pytest.raises(Exception, match="run `relinker migrate`"):
            migrations.require_migrated(conn)


def test_a_catalogue_a_newer_relinker_migrated_is_refused_and_keeps_its_views(db_url, capsys, tmp_path):
    """Its runs may have statuses this relinker would resume, and its views would be replaced by older ones."""
    assert main(["--db-url", db_url, "migrate", "--base"]) == 0
    newer = max(m.version for m in migrations.available()) + 1
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("INSERT INTO relinker_schema_migration (version, name) VALUES (%s, 'future')", (newer,))
        conn.execute("DROP VIEW relinker_problem_kinds")
        conn.execute("CREATE VIEW relinker_problem_kinds AS SELECT 1 AS future_column")
    capsys.readouterr()
    roots = empty_roots(tmp_path)
    for argv in (["migrate"], [*roots, "relink", "--no-progress"], ["status"]):
        assert main(["--db-url", db_url, *argv]) == 2
        err = capsys.readouterr().err
        assert err == (f"relinker: error: the catalogue was migrated by a newer relinker (migration {newer}; "
                       f"this one, {relinker.__version__}, knows up to {newer - 1}): run that version\n")
    with psycopg.connect(db_url) as conn:
        assert columns(conn, "relinker_problem_kinds") == {"future_column"}
        assert conn.execute("SELECT count(*) FROM relinker_run").fetchone()[0] == 0


def test_views_another_versions_migrate_made_are_refused_until_this_one_migrates(db_url, capsys, tmp_path):
    """A relinker from before the refusal of newer catalogues migrates one of ours: it finds nothing to
    apply and makes its own, older views. Every command says to migrate, not a column it cannot find."""
    assert main(["--db-url", db_url, "migrate", "--base"]) == 0
    with psycopg.connect(db_url, autocommit=True) as conn:
        # an older version's views.sql, as it re-made them: a column this version reads is missing
        conn.execute("DROP VIEW relinker_run_progress")
        conn.execute("CREATE VIEW relinker_run_progress AS SELECT run_id, mode, status FROM relinker_run")
    capsys.readouterr()
    roots = empty_roots(tmp_path)
    for argv in ([*roots, "relink", "--no-progress"], ["status"], [*roots, "verify", "--all", "--no-progress"]):
        assert main(["--db-url", db_url, *argv]) == 2
        assert capsys.readouterr().err == (
            "relinker: error: relinker's views in the catalogue are not this relinker version's (another "
            "version's `relinker migrate` made them, or they were dropped): run `relinker migrate`\n")
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM relinker_run").fetchone()[0] == 0  # nothing was started
    assert main(["--db-url", db_url, "migrate"]) == 0
    assert main(["--db-url", db_url, "status"]) == 0
    with psycopg.connect(db_url) as conn:
        assert "at_work" in columns(conn, "relinker_run_progress")


def test_views_marked_as_made_from_another_views_sql_are_refused_until_this_one_migrates(db_url, capsys):
    """Two versions with the same migrations may differ in their views: the mark names the views.sql
    that made them, not only that some relinker did."""
    assert main(["--db-url", db_url, "migrate", "--base"]) == 0
    another = migrations.views_mark(migrations._read(migrations.VIEWS_FILE) + "\n-- another version's view\n")
    assert another != migrations.views_mark(migrations._read(migrations.VIEWS_FILE))
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL(migrations.SQL_MARK_VIEWS).format(psycopg.sql.Literal(another)))
    capsys.readouterr()
    assert main(["--db-url", db_url, "status"]) == 2
    assert "relinker's views in the catalogue are not this relinker version's" in capsys.readouterr().err
    assert main(["--db-url", db_url, "migrate"]) == 0
    assert main(["--db-url", db_url, "status"]) == 0


def test_a_view_of_relinkers_dropped_is_a_migrate_to_run_not_a_database_error(catalogue_url, capsys, tmp_path):
    with psycopg.connect(catalogue_url, autocommit=True) as conn:
        conn.execute("DROP VIEW relinker_path")
    roots = empty_roots(tmp_path)
    assert main(["--db-url", catalogue_url, *roots, "relink", "--no-progress"]) == 2
    assert "run `relinker migrate`" in capsys.readouterr().err
    assert main(["--db-url", catalogue_url, "migrate"]) == 0
    assert main(["--db-url", catalogue_url, *roots, "relink", "--no-progress"]) == 0


def test_a_checkout_run_by_its_path_reads_its_own_sql(tmp_path):
    """A checkout put on PYTHONPATH migrates with its own sql/, even where an editable install of
    another maps relinker.sql elsewhere (as a developer comparing two versions has it)."""
    checkout = Path(__file__).resolve().parent.parent
    shutil.copytree(checkout / "relinker", tmp_path / "relinker", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copytree(checkout / "sql", tmp_path / "sql", ignore=shutil.ignore_patterns("__pycache__"))
    with open(tmp_path / "sql" / "views.sql", "a", encoding="utf-8") as f:
        f.write("-- this checkout's own\n")
    read = subprocess.run([sys.executable, "-c", "from relinker import migrations; print(migrations._read('views.sql'))"],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)}, capture_output=True, text=True,
                          check=True)
    assert read.stdout.rstrip().endswith("-- this checkout's own")


def test_migrations_load_from_the_installed_package():
    found = migrations.available()
    assert [m.version for m in found] == sorted({m.version for m in found})
    assert found[0].version == 1 and any(m.online for m in found)


def test_a_migration_behind_a_long_transaction_gives_up_with_one_line(db_url, capsys, monkeypatch):
    """DDL waiting for a lock would block every later reader of the table: it waits LOCK_TIMEOUT, no more."""
    monkeypatch.setattr(migrations, "LOCK_TIMEOUT", "300ms")
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(OLD_SHAPE)  # no by_hash_created: migration 0001 must alter inode
    with psycopg.connect(db_url) as long_reader:
        long_reader.execute("SELECT count(*) FROM inode").fetchone()  # holds its lock until it ends
        assert main(["--db-url", db_url, "migrate"]) == 2
        err = capsys.readouterr().err
        assert "migration 0001_hardlink_tracking waited 300ms" in err and "Traceback" not in err
    assert main(["--db-url", db_url, "migrate"]) == 0  # once the reader is gone


def test_views_behind_a_long_transaction_and_a_users_own_view_stop_migrate_in_one_line(
        db_url, capsys, monkeypatch):
    """Re-creating relinker's views never queues for long behind a reader, and never drops a view of the user's."""
    monkeypatch.setattr(migrations, "LOCK_TIMEOUT", "200ms")
    monkeypatch.setattr(migrations.time, "sleep", lambda seconds: None)
    with psycopg.connect(db_url, autocommit=True) as conn:
        migrations.migrate(conn, base=True)
    with psycopg.connect(db_url) as long_reader:
        long_reader.execute("SELECT count(*) FROM relinker_open_ranges").fetchone()  # holds its lock
        assert main(["--db-url", db_url, "migrate"]) == 2
        err = capsys.readouterr().err
        assert "re-creating relinker's views waited 200ms" in err and err.count("\n") == 1
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("CREATE VIEW my_open_ranges AS SELECT * FROM relinker_open_ranges")
        assert main(["--db-url", db_url, "migrate"]) == 2
        err = capsys.readouterr().err
        assert "a view of yours built on one of relinker's" in err and err.count("\n") == 1
        assert conn.execute("SELECT count(*) FROM pg_views WHERE viewname = 'my_open_ranges'").fetchone() == (1,)
        conn.execute("DROP VIEW my_open_ranges")
    assert main(["--db-url", db_url, "migrate"]) == 0


def test_hardlink_columns_already_there_take_no_lock(db_url, capsys, monkeypatch):
    """Production has the seed's columns: migrating it must not queue behind its readers on inode and blobs."""
    monkeypatch.setattr(migrations, "LOCK_TIMEOUT", "300ms")
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(PRODUCTION_SHAPE)
        conn.execute("ALTER TABLE inode ADD COLUMN by_hash_created boolean DEFAULT false; "
                     "ALTER TABLE blobs ADD COLUMN n_hardlinks integer DEFAULT 0, "
                     "ADD COLUMN expected_hardlinks integer")
    with psycopg.connect(db_url) as long_reader, psycopg.connect(db_url, autocommit=True) as conn:
        long_reader.execute("SELECT count(*) FROM inode, blobs").fetchone()  # holds its locks until it ends
        conn.execute(migrations.SQL_CREATE_MIGRATION_TABLE)
        hardlink_tracking = migrations.available()[0]
        assert hardlink_tracking.name == "hardlink_tracking"
        migrations._apply_in_transaction(conn, hardlink_tracking)  # would give up after 300ms if it waited
        assert migrations.applied_versions(conn) == [1]


def test_a_second_migrate_waits_for_the_first(db_url):
    """Two migrates at once: the second waits (polling, so the first's concurrent builds never wait on it)."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        migrations.migrate(conn, base=True)
    with psycopg.connect(db_url, autocommit=True) as first, psycopg.connect(db_url, autocommit=True) as second:
        first.execute("SELECT pg_advisory_lock(%s)", (migrations.MIGRATE_LOCK_KEY,))  # a migrate under way
        done, states = [], []
        waiting = threading.Thread(target=lambda: done.append(migrations.migrate(second)), daemon=True)
        waiting.start()
        try:
            time.sleep(1.0)
            assert done == [] and waiting.is_alive()
            # Between polls the second session is idle (nothing for a concurrent build to wait on); a
            # blocking pg_advisory_lock would show 'active' every time.
            for _ in range(5):
                states += first.execute("SELECT state FROM pg_stat_activity WHERE pid = %s",
                                        (second.info.backend_pid,)).fetchone()
                time.sleep(0.05)
        finally:
            first.execute("SELECT pg_advisory_unlock(%s)", (migrations.MIGRATE_LOCK_KEY,))
            waiting.join(timeout=30)
    assert "idle" in states
    assert done == [[]]


@pytest.mark.parametrize("theirs", ["(medium_hash, ino, dev)", "(medium_hash, ino) INCLUDE (dev)"])
def test_a_partitions_index_that_only_starts_like_ours_is_not_attached_but_built_beside(db_url, theirs):
    """ATTACH takes only an identical index: one that merely leads with our columns gets ours beside it."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(PRODUCTION_SHAPE)
        partition = conn.execute("SELECT c.relname FROM pg_inherits h JOIN pg_class c ON c.oid = h.inhrelid "
                                 "WHERE h.inhparent = 'path'::regclass LIMIT 1").fetchone()[0]
        conn.execute(f"CREATE INDEX theirs ON {partition} {theirs}")
        migrations.build_index_online(conn, "relinker_path_inode_idx", "path", ["medium_hash", "ino"])
        valid = conn.execute("SELECT indisvalid FROM pg_index WHERE indexrelid = 'relinker_path_inode_idx'::regclass")
        assert valid.fetchone() == (True,)
        assert conn.execute("SELECT count(*) FROM pg_index WHERE indexrelid = 'theirs'::regclass").fetchone() == (1,)
        migrations.build_index_online(conn, "relinker_path_inode_idx", "path", ["medium_hash", "ino"])  # twice


def test_a_second_migrate_keeps_what_was_granted_on_relinkers_views(catalogue_url):
    """psql is a way in: a monitoring role granted SELECT on the views keeps it when migrate makes them again."""
    role = f"monitor_{os.getpid()}"
    with psycopg.connect(catalogue_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(f"GRANT SELECT ON relinker_run_progress, relinker_open_ranges, relinker_run, relinker_range "
                     f"TO {role}")
        conn.execute(f"GRANT SELECT ON relinker_problem_kinds TO {role} WITH GRANT OPTION")
        before = sorted(conn.execute("SELECT relname, relacl::text FROM pg_class WHERE relname LIKE 'relinker%' "
                                     "AND relkind = 'v'").fetchall())
    try:
        assert main(["--db-url", catalogue_url, "migrate"]) == 0
        with psycopg.connect(make_conninfo(catalogue_url, user=role)) as monitor:
            monitor.execute("SELECT * FROM relinker_run_progress").fetchall()
        with psycopg.connect(catalogue_url, autocommit=True) as conn:
            after = sorted(conn.execute("SELECT relname, relacl::text FROM pg_class WHERE relname LIKE 'relinker%' "
                                        "AND relkind = 'v'").fetchall())
        assert after == before
    finally:
        with psycopg.connect(catalogue_url, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")


def test_a_migrate_by_a_role_that_does_not_own_the_catalogue_leaves_nothing(db_url, capsys, tmp_path):
    """Refused before anything is made: a table it left would be in the way of the owner's migrate.
    A scan, which makes a medium's partitions, is refused the same way (not with the database's
    "permission denied for schema public")."""
    suffix = os.getpid()
    owner, other = f"owner_{suffix}", f"other_{suffix}"
    with login_roles(db_url, (owner, other), f"GRANT CREATE ON SCHEMA public TO {owner}, {other}"):
        with connected_as(db_url, owner) as conn:
            conn.execute(PRODUCTION_SHAPE)  # the catalogue's owner, no superuser
            conn.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {other}")
        assert main(["--db-url", make_conninfo(db_url, user=other), "migrate"]) == 2
        assert capsys.readouterr().err == (f"relinker: error: role {other} does not own the catalogue's table inode, "
                                           f"which migrations change: run `relinker migrate` as {owner} (its owner)\n")
        assert main(["--db-url", make_conninfo(db_url, user=owner), "migrate"]) == 0
        capsys.readouterr()
        # nothing left to apply: refused all the same (migrate makes relinker's views anew)
        assert main(["--db-url", make_conninfo(db_url, user=other), "migrate"]) == 2
        assert capsys.readouterr().err == (f"relinker: error: role {other} does not own the catalogue's table inode, "
                                           f"which migrations change: run `relinker migrate` as {owner} (its owner)\n")
        with connected_as(db_url, owner) as conn:
            conn.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {other}")
        assert main(["--db-url", make_conninfo(db_url, user=other), "scan", "--medium", "disk", str(tmp_path)]) == 2
        assert capsys.readouterr().err == (
            f"relinker: error: role {other} does not own the catalogue's table inode, which a scan gives a "
            f"medium's partitions and rows: run `relinker scan` as {owner} (its owner)\n")


def test_a_migrate_whose_session_the_server_ends_says_why(db_url, capsys, monkeypatch):
    """A server restart or an administrator's pg_terminate_backend during a migration: the server's own
    reason, not "the connection is closed" from the lock's release on the dead session."""
    assert main(["--db-url", db_url, "migrate", "--base"]) == 0
    capsys.readouterr()
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("DELETE FROM relinker_schema_migration WHERE version = (SELECT max(version) "
                     "FROM relinker_schema_migration)")
    real_apply = migrations._apply_in_transaction

    def ended_by_the_administrator(conn, migration):
        with psycopg.connect(db_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
        return real_apply(conn, migration)

    monkeypatch.setattr(migrations, "_apply_in_transaction", ended_by_the_administrator)
    assert main(["--db-url", db_url, "migrate"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("relinker: database error: terminating connection due to administrator command"), err
    monkeypatch.setattr(migrations, "_apply_in_transaction", real_apply)
    assert main(["--db-url", db_url, "migrate"]) == 0  # again: finishes what was left


def test_a_scan_by_a_member_of_the_owners_role_leaves_partitions_the_owners_migrate_can_index(db_url, capsys, tmp_path):
    """Operators scanning as members of the role that owns the catalogue: the partitions they make are
    the owner's, so the owner's next migrate (a new index on every partition) goes through."""
    suffix = os.getpid()
    owner, member = f"catowner_{suffix}", f"operator_{suffix}"
    as_owner, as_member = make_conninfo(db_url, user=owner), make_conninfo(db_url, user=member)
    (tmp_path / "f").write_bytes(b"x")
    with login_roles(db_url, (owner, member), f"GRANT CREATE ON SCHEMA public TO {owner}",
                     f"GRANT {owner} TO {member}"):
        with psycopg.connect(as_owner, autocommit=True) as conn:
            conn.execute(PRODUCTION_SHAPE)
        assert main(["--db-url", as_owner, "migrate"]) == 0
        assert main(["--db-url", as_member, "scan", "--medium", "disk", str(tmp_path)]) == 0
        with psycopg.connect(as_owner, autocommit=True) as conn:
            owners = {row[0] for row in conn.execute(
                "SELECT pg_get_userbyid(c.relowner) FROM pg_inherits AS h JOIN pg_class AS c ON c.oid = h.inhrelid "
                "WHERE h.inhparent IN ('inode'::regclass, 'path'::regclass)")}
            assert owners == {owner}
            # a later relinker's migration: an index on every partition
            conn.execute("DELETE FROM relinker_schema_migration WHERE version = 5")
            conn.execute("DROP INDEX relinker_path_links_idx")
        capsys.readouterr()
        assert main(["--db-url", as_owner, "migrate"]) == 0, capsys.readouterr().err


def test_migrate_finds_the_catalogue_as_queries_find_it_and_builds_beside_it(db_url):
    """A role with a schema of its own ("$user" first in search_path): the NTT tables are public's, and
    relinker's go beside them, where the roles that run find them (not in the migrating role's schema)."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(PRODUCTION_SHAPE)
        conn.execute("CREATE SCHEMA AUTHORIZATION CURRENT_USER")
        search_path = conn.execute("SELECT current_setting('search_path')").fetchone()[0]
        assert conn.execute("SELECT current_schema() <> 'public'").fetchone() == (True,)
        migrations.migrate(conn)
        assert conn.execute("SELECT current_setting('search_path')").fetchone() == (search_path,)
        assert conn.execute("SELECT pg_typeof(path)::text FROM relinker_path LIMIT 1").fetchone() == ("bytea",)
        from relinker import db
        assert db.column_type(conn, "path", "path") == "bytea"
        schemas = {row[0] for row in conn.execute(
            "SELECT DISTINCT relnamespace::regnamespace::text FROM pg_class WHERE relname LIKE 'relinker%'")}
        assert schemas == {"public"}


def test_a_member_of_the_owners_role_migrates_as_the_owner(db_url, capsys):
    """An operator in the owning role runs migrate: relinker's tables were the operator's, and the owner
    (and every other member) could neither migrate again nor grant what the roles that run need."""
    suffix = os.getpid()
    owner, member, other = f"owner7_{suffix}", f"member7_{suffix}", f"other7_{suffix}"
    with login_roles(db_url, (owner, member, other), f"GRANT {owner} TO {member}", f"GRANT {owner} TO {other}",
                     f"GRANT CREATE ON SCHEMA public TO {owner}"):
        with connected_as(db_url, owner) as conn:
            conn.execute(PRODUCTION_SHAPE)
        assert main(["--db-url", make_conninfo(db_url, user=member), "migrate"]) == 0
        with psycopg.connect(db_url, autocommit=True) as conn:
            owners = {row[0] for row in conn.execute(
                "SELECT DISTINCT relowner::regrole::text FROM pg_class WHERE relname LIKE 'relinker%'")}
            assert owners == {owner}
        with connected_as(db_url, owner) as conn:
            conn.execute(f"GRANT SELECT ON relinker_run TO {other}")
            conn.execute("DELETE FROM relinker_schema_migration WHERE version = 13")  # a later relinker's
        capsys.readouterr()
        assert main(["--db-url", make_conninfo(db_url, user=other), "migrate"]) == 0, capsys.readouterr().err
        assert main(["--db-url", make_conninfo(db_url, user=owner), "migrate"]) == 0, capsys.readouterr().err


def test_the_owner_keeps_its_views_when_a_member_of_it_migrates(db_url):
    """A member of the owning role may migrate: the views it makes again are given back to their owner."""
    suffix = os.getpid()
    owner, member = f"owner_{suffix}", f"member_{suffix}"
    with login_roles(db_url, (owner, member), f"GRANT {owner} TO {member}",
                     f"GRANT CREATE ON SCHEMA public TO {owner}"):
        with connected_as(db_url, owner) as conn:
            conn.execute(PRODUCTION_SHAPE)
            migrations.migrate(conn)
            if conn.info.server_version >= 170000:
                conn.execute(f"GRANT SELECT, MAINTAIN ON relinker_path TO {member}")
        with psycopg.connect(db_url, autocommit=True) as conn:
            before = conn.execute("SELECT relname, relowner::regrole::text, relacl::text FROM pg_class "
                                  "WHERE relkind = 'v' AND relname LIKE 'relinker%' ORDER BY 1").fetchall()
        assert main(["--db-url", make_conninfo(db_url, user=member), "migrate"]) == 0
        with connected_as(db_url, owner) as conn:
            conn.execute("SELECT count(*) FROM relinker_path").fetchone()  # relink's work query reads it
        with psycopg.connect(db_url, autocommit=True) as conn:
            after = conn.execute("SELECT relname, relowner::regrole::text, relacl::text FROM pg_class "
                                 "WHERE relkind = 'v' AND relname LIKE 'relinker%' ORDER BY 1").fetchall()
        assert after == before


@pytest.mark.parametrize("why", ["the owner may no longer create in the schema", "a member that may not SET ROLE"])
def test_a_member_that_cannot_act_as_the_owner_is_refused_before_anything_is_made(db_url, capsys, why):
    """What migrate makes must be the owner's: a member's own views stopped the owner's next migrate
    ("must be owner of view"). A member that may not SET ROLE to the owner, or an owner that may not
    create in the schema, is refused, with the GRANT that lets it through; nothing is made."""
    suffix = os.getpid()
    owner, member = f"owner5_{suffix}", f"member5_{suffix}"
    with psycopg.connect(db_url, autocommit=True) as conn:
        if why.startswith("a member") and conn.info.server_version < 160000:
            pytest.skip("the SET option of a membership is PostgreSQL 16's")
    with login_roles(db_url, (owner, member),
                     f"GRANT {owner} TO {member}" + (" WITH INHERIT TRUE, SET FALSE" if why.startswith("a member")
                                                     else ""),
                     f"GRANT CREATE ON SCHEMA public TO {owner}"):
        with connected_as(db_url, owner) as conn:
            conn.execute(PRODUCTION_SHAPE)
            migrations.migrate(conn)
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(f"GRANT CREATE ON SCHEMA public TO {member}")
            if why.startswith("the owner"):
                conn.execute(f"REVOKE CREATE ON SCHEMA public FROM {owner}")
            before = conn.execute("SELECT relname, relowner::regrole::text FROM pg_class "
                                  "WHERE relname LIKE 'relinker%' ORDER BY 1").fetchall()
        assert main(["--db-url", make_conninfo(db_url, user=member), "migrate"]) == 2
        err = capsys.readouterr().err
        grant = (f"GRANT {owner} TO {member} WITH SET TRUE" if why.startswith("a member")
                 else f"GRANT CREATE ON SCHEMA public TO {owner}")
        assert err.startswith("relinker: error: ") and err.rstrip().endswith(grant) and len(err.splitlines()) == 1
        with psycopg.connect(db_url, autocommit=True) as conn:
            assert conn.execute("SELECT relname, relowner::regrole::text FROM pg_class "
                                "WHERE relname LIKE 'relinker%' ORDER BY 1").fetchall() == before


def test_a_member_that_may_act_as_the_owner_but_not_use_its_privileges_migrates_as_the_owner(db_url):
    """GRANT owner TO member WITH INHERIT FALSE: the member has none of the owner's privileges until it
    becomes the owner, which migrate does first (it was refused as a role that does not own the tables)."""
    suffix = os.getpid()
    owner, member = f"owner6_{suffix}", f"member6_{suffix}"
    with psycopg.connect(db_url, autocommit=True) as conn:
        if conn.info.server_version < 160000:
            pytest.skip("the INHERIT and SET options of a membership are PostgreSQL 16's")
    with login_roles(db_url, (owner, member), f"GRANT {owner} TO {member} WITH INHERIT FALSE, SET TRUE",
                     f"GRANT CREATE ON SCHEMA public TO {owner}"):
        with connected_as(db_url, owner) as conn:
            conn.execute(PRODUCTION_SHAPE)
        assert main(["--db-url", make_conninfo(db_url, user=member), "migrate"]) == 0
        with psycopg.connect(db_url, autocommit=True) as conn:
            assert {row[0] for row in conn.execute(
                "SELECT DISTINCT relowner::regrole::text FROM pg_class WHERE relname LIKE 'relinker%'")} == {owner}
