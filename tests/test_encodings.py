"""Catalogues whose database is not UTF-8.

Older NTT catalogues kept `path.path` as text; raw path bytes in a text
column live in a SQL_ASCII database, where the driver hands back every text
value as bytes. A catalogue in a single-byte encoding (LATIN1) cannot hold
every character a message about a path may carry.
"""

import json
import os

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from relinker.cli import main
from support import ArchiveWorld

# The older catalogue's shape: no partitions, path.path as text.
FLAT_TEXT_TABLES = """
CREATE TABLE medium (medium_hash text PRIMARY KEY, medium_human text, added_at timestamptz);
CREATE TABLE inode (medium_hash text, dev bigint, ino bigint, nlink int, size bigint, mtime bigint,
    blobid text, copied bool DEFAULT false, copied_to text, errors text[] DEFAULT '{}', fs_type char(1),
    mime_type varchar, processed_at timestamptz, by_hash_created bool DEFAULT false,
    claimed_by text, claimed_at timestamptz, PRIMARY KEY (medium_hash, ino));
CREATE TABLE path (medium_hash text, dev bigint, ino bigint, path text, broken bool DEFAULT false,
    blobid text, exclude_reason text, PRIMARY KEY (medium_hash, path));
CREATE TABLE blobs (blobid text PRIMARY KEY, last_checked timestamptz, created_at timestamptz DEFAULT now(),
    n_hardlinks int DEFAULT 0, expected_hardlinks int);
"""
MEDIUM = "0e0" + "0" * 29


@pytest.fixture
def database_in(pg_admin_dsn):
    """A new, empty database in the encoding asked for; its DSN."""
    made = []

    def make(encoding: str) -> str:
        name = f"relinker_{encoding.lower()}"
        with psycopg.connect(pg_admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            conn.execute(sql.SQL("CREATE DATABASE {} ENCODING {} LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
                         .format(sql.Identifier(name), sql.Literal(encoding)))
        made.append(name)
        return make_conninfo(pg_admin_dsn, dbname=name)

    yield make
    with psycopg.connect(pg_admin_dsn, autocommit=True) as conn:
        for name in made:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def run(world, capsys, *args):
    capsys.readouterr()
    code = main(world.argv(*args, "--json") if args[0] != "status" else world.argv(*args))
    out = capsys.readouterr().out
    return code, (json.loads(out) if args[0] != "status" else out)


def test_an_older_catalogue_of_raw_bytes_in_a_sql_ascii_database(database_in, tmp_path, capsys):
    dsn = database_in("SQL_ASCII")
    world = ArchiveWorld(dsn, tmp_path / "w")
    try:
        world.conn.execute(FLAT_TEXT_TABLES)
        assert main(world.argv("migrate")) == 0
        world.conn.execute("INSERT INTO medium (medium_hash, medium_human) VALUES (%s, 'old disk')", (MEDIUM,))
        raw = b"/mnt/ntt/%s/caf\xe9 \xff" % MEDIUM.encode()  # Latin-1 and a byte no encoding has
        world.conn.execute("INSERT INTO inode (medium_hash, dev, ino, nlink, size, fs_type, blobid, copied) "
                           "VALUES (%s, 1, 7, 1, 7, 'f', %s, true)", (MEDIUM, world.blob(b"content")))
        world.conn.execute("INSERT INTO path (medium_hash, dev, ino, path) VALUES (%s, 1, 7, convert_from(%s, "
                           "'SQL_ASCII'))", (MEDIUM, raw))
        source = tmp_path / "disk"
        source.mkdir()
        (source / "new").write_bytes(b"new content")
        world.conn.execute("INSERT INTO inode (medium_hash, dev, ino, nlink, size, fs_type) "
                           "VALUES (%s, 1, 8, 1, 11, 'f')", (MEDIUM,))
        world.conn.execute("INSERT INTO path (medium_hash, dev, ino, path) VALUES (%s, 1, 8, %s)",
                           (MEDIUM, f"/mnt/ntt/{MEDIUM}/new"))

        code, summary = run(world, capsys, "relink", "--no-progress")
        assert (code, summary["links_created"]) == (0, 1)
        assert os.path.samefile(world.archive_path(raw), world.by_hash / world.blob(b"content")[:2]
                                / world.blob(b"content")[2:4] / world.blob(b"content"))
        code, summary = run(world, capsys, "copy", "--no-progress", "--source-prefix", f"/mnt/ntt/{MEDIUM}={source}")
        assert (code, summary["files_copied"]) == (0, 1)
        assert (world.archive / "mnt/ntt" / MEDIUM / "new").read_bytes() == b"new content"
        assert run(world, capsys, "count", "--no-progress")[0] == 0
        code, summary = run(world, capsys, "verify", "--all", "--hash", "--no-progress")
        assert (code, summary["blobs"]) == (0, 2)
        code, status = run(world, capsys, "status")
        assert code == 0 and "b'" not in status and "verify" in status
    finally:
        world.close()


def test_a_problem_naming_characters_a_latin1_catalogue_lacks(database_in, tmp_path, capsys):
    world = ArchiveWorld(database_in("LATIN1"), tmp_path / "w")
    try:
        assert main(world.argv("migrate", "--base")) == 0
        medium = world.medium("disk")
        world.inode(medium, ["/mnt/ntt/x/日本/a".encode()], world.blob(b"content"))
        (world.archive / "mnt/ntt/x").mkdir(parents=True)
        (world.archive / "mnt/ntt/x/日本").write_bytes(b"in the way")

        code, summary = run(world, capsys, "relink", "--no-progress")

        # the path's problem, not the range's failure
        assert (code, summary["ranges_failed"], summary["problems_by_kind"]) == (1, 0, {"not-a-directory": 1})
        assert world.conn.execute("SELECT detail FROM relinker_problem").fetchone() == (
            "mnt/ntt/x/\\u65e5\\u672c is not a directory",)
    finally:
        world.close()


NAMES = [b"caf\xc3\xa9.txt", "日本.txt".encode(), b"sub/raw \xff name"]


def _tree(root):
    for i, name in enumerate(NAMES):
        path = root / os.fsdecode(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"content %d" % i)
    return root


@pytest.mark.parametrize("encoding", ["SQL_ASCII", "LATIN1"])
@pytest.mark.parametrize("shape", ["production", "older"])
def test_a_medium_named_and_filled_beyond_the_databases_encoding_is_scanned_and_copied(
        database_in, tmp_path, capsys, encoding, shape):
    """A medium's name and its files' names in characters the database's encoding lacks: scanned, copied
    under its name, and its runs' options read back; a name a text column cannot hold as it is, skipped."""
    world = ArchiveWorld(database_in(encoding), tmp_path / "w")
    try:
        if shape == "production":
            assert main(world.argv("migrate", "--base")) == 0
        else:
            world.conn.execute(FLAT_TEXT_TABLES)
            assert main(world.argv("migrate")) == 0
        name = "Disque été 日本"
        tree = _tree(tmp_path / "tree")
        # a text column of SQL_ASCII takes UTF-8 names only (scan says it skipped one); LATIN1 has a
        # character for every byte
        skipped = shape == "older" and encoding == "SQL_ASCII"
        assert main(world.argv("scan", "--medium", name, str(tree))) == (1 if skipped else 0)
        code, summary = run(world, capsys, "copy", "--medium", name, "--no-progress")
        assert (code, summary["files_copied"]) == (0, 2 if skipped else 3), summary["problem_samples"]
        archive = world.archive_root + os.fsencode(tree)
        for i, stored in enumerate(NAMES):
            if not (skipped and i == 2):
                with open(archive + b"/" + stored, "rb") as f:
                    assert f.read() == b"content %d" % i
        code, status = run(world, capsys, "status")
        assert code == 0 and "copy" in status
        assert run(world, capsys, "copy", "--medium", name, "--no-progress")[1]["ranges_total"] == 0
    finally:
        world.close()


@pytest.mark.parametrize("encoding", ["SQL_ASCII", "LATIN1", "EUC_JP"])
def test_a_plain_command_resumes_its_own_run_named_beyond_the_databases_encoding(
        database_in, tmp_path, capsys, encoding):
    """The medium's name as asked compares with the name the run kept, whatever the encoding lacks."""
    world = ArchiveWorld(database_in(encoding), tmp_path / "w")
    try:
        assert main(world.argv("migrate", "--base")) == 0
        name = "Disque été 日本 😀"
        assert main(world.argv("scan", "--medium", name, str(_tree(tmp_path / "tree")))) == 0
        code, first = run(world, capsys, "copy", "--medium", name, "--limit", "1", "--no-progress")
        world.conn.execute("UPDATE relinker_run SET status = 'open', finished_at = NULL WHERE run_id = %s",
                           (first["run_id"],))
        world.conn.execute("UPDATE relinker_range SET status = 'pending' WHERE run_id = %s", (first["run_id"],))
        code, again = run(world, capsys, "copy", "--medium", name, "--limit", "1", "--no-progress")
        assert code == 0 and again["run_id"] == first["run_id"]
        code, named = run(world, capsys, "copy", "--medium", name, "--limit", "1", "--run", str(first["run_id"]),
                          "--no-progress")
        assert code == 0 and named["run_id"] == first["run_id"]
    finally:
        world.close()


@pytest.mark.parametrize("encoding, client", [("UTF8", "LATIN1"), ("SQL_ASCII", "UTF8"), ("LATIN1", "LATIN1")])
def test_what_is_stored_does_not_depend_on_the_callers_client_encoding(database_in, tmp_path, capsys, monkeypatch,
                                                                       encoding, client):
    """PGCLIENTENCODING in one operator's environment and not another's: the same name, the same rows."""
    world = ArchiveWorld(database_in(encoding), tmp_path / "w")
    try:
        assert main(world.argv("migrate", "--base")) == 0
        name = "Disque été 日本"
        monkeypatch.setenv("PGCLIENTENCODING", client)
        assert main(world.argv("scan", "--medium", name, str(_tree(tmp_path / "tree")))) == 0
        code, first = run(world, capsys, "copy", "--medium", name, "--limit", "1", "--no-progress")
        assert code == 0
        world.conn.execute("UPDATE relinker_run SET status = 'open', finished_at = NULL")
        world.conn.execute("UPDATE relinker_range SET status = 'pending'")
        monkeypatch.delenv("PGCLIENTENCODING")
        code, again = run(world, capsys, "copy", "--medium", name, "--limit", "1", "--no-progress")
        assert code == 0 and again["run_id"] == first["run_id"]
        kept = world.conn.execute("SELECT convert_to(medium_human, getdatabaseencoding()) FROM medium").fetchone()[0]
        assert kept == (name.encode() if encoding != "LATIN1" else name.encode("latin-1", "backslashreplace"))
    finally:
        world.close()
