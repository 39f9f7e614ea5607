"""A catalogue in production's state: the NTT schema, and two media as the NTT tools left them.

Built the way production's was, not by relinker: the NTT schema with its
extras (the status model and its CHECK, ``inode.id bigserial``, partition-level
foreign keys from ``path`` to ``inode``, a statement-level trigger on a
partition, an event trigger on every ``ALTER TABLE``, backup-tracking columns
on ``blobs``, ``medium.problems``/``diagnostics``), then:

- medium **stored**: every regular file copied by the NTT copier's batch mode
  (``blobid``, ``copied``, ``status = 'success'``, ``processed_at`` set;
  ``by_hash_created`` false), its empty files under the SHA-256-named empty
  blob, ``n_hardlinks`` counting inodes, one archive path left linked to an
  orphaned copy of its content, one lost link, one inode the copier gave up
  on (``failed_permanent``); then unmounted: its sources are gone.
- medium **fresh**: enumerated and loaded, still mounted, not copied
  (``status = 'pending'``); its inode numbers are the stored medium's, one
  of its files has a content the stored medium already has, one is empty.

Paths are stored in the NTT mount form (``/mnt/ntt/<medium_hash>/...``), and
on the fresh medium also in the two other forms the reference names: relative
to the mount with a leading slash (``/new/relative.txt``, read under the
mount) and the legacy partition prefix (``p5:/mnt/ntt/<medium_hash>/p5/...``);
one name there is not UTF-8 and holds a newline. One stored path's
``path.blobid`` (the denormalised copy) is stale, NULL: ``inode.blobid`` is
the truth. The fresh medium is "mounted" under the test's directory
(``--source-prefix``); the stored medium's mount point is left behind, empty.
"""

from __future__ import annotations

import os

import blake3
import psycopg

from relinker.catalogue import EMPTY_SHA256
from relinker.paths import by_hash_path
from support import ArchiveWorld

NTT_SCHEMA = """
CREATE TABLE medium (
    medium_hash text PRIMARY KEY, medium_human text, added_at timestamptz DEFAULT now(), health text,
    image_path text, enum_done timestamptz, copy_done timestamptz, problems jsonb, diagnostics jsonb);
CREATE TABLE inode (
    id bigserial,
    medium_hash text NOT NULL, dev bigint, ino bigint NOT NULL, nlink integer, size bigint, mtime bigint,
    blobid text, copied boolean DEFAULT false, copied_to text, errors text[] DEFAULT '{}', fs_type char(1),
    mime_type varchar(255), processed_at timestamptz, by_hash_created boolean DEFAULT false,
    claimed_by text, claimed_at timestamptz,
    status text DEFAULT 'pending'
        CHECK (status IN ('pending', 'success', 'failed_retryable', 'failed_permanent')),
    error_type text,
    -- stricter than production's, to hold writers to the model's meaning
    CONSTRAINT success_has_content CHECK (status IS DISTINCT FROM 'success' OR blobid IS NOT NULL),
    CONSTRAINT failure_has_a_type CHECK (status NOT LIKE 'failed%%' OR error_type IS NOT NULL),
    PRIMARY KEY (medium_hash, ino)
) PARTITION BY LIST (medium_hash);
CREATE TABLE path (
    medium_hash text NOT NULL, dev bigint, ino bigint NOT NULL, path bytea NOT NULL,
    broken boolean DEFAULT false, blobid text, exclude_reason text,
    PRIMARY KEY (medium_hash, path)
) PARTITION BY LIST (medium_hash);
CREATE TABLE blobs (
    blobid text PRIMARY KEY, last_checked timestamptz, created_at timestamptz DEFAULT now(),
    n_hardlinks integer DEFAULT 0, expected_hardlinks integer,
    backed_up_at timestamptz, backup_target text);
CREATE TABLE ntt_audit (at timestamptz DEFAULT clock_timestamp(), what text);
CREATE FUNCTION ntt_note_statement() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO ntt_audit (what) VALUES (TG_OP || ' on ' || TG_TABLE_NAME);
    RETURN NULL;
END $$;
"""
# Event triggers need a superuser; a test server without one gets the rest.
EVENT_TRIGGER = """
CREATE FUNCTION ntt_note_ddl() RETURNS event_trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO ntt_audit (what)
    SELECT command_tag || ' ' || object_identity FROM pg_event_trigger_ddl_commands();
END $$;
CREATE EVENT TRIGGER ntt_ddl_audit ON ddl_command_end WHEN TAG IN ('ALTER TABLE') EXECUTE FUNCTION ntt_note_ddl();
"""
PARTITIONS = """
CREATE TABLE {inode} PARTITION OF inode FOR VALUES IN ('{medium}');
CREATE TABLE {path} PARTITION OF path FOR VALUES IN ('{medium}');
ALTER TABLE {path} ADD CONSTRAINT {path}_inode_fk FOREIGN KEY (medium_hash, ino) REFERENCES {inode} (medium_hash, ino);
"""
STATEMENT_TRIGGER = """
CREATE TRIGGER {table}_noted AFTER INSERT OR UPDATE OR DELETE ON {table}
FOR EACH STATEMENT EXECUTE FUNCTION ntt_note_statement();
"""
#: When the NTT copier processed the stored medium.
COPIER_PROCESSED_AT = "2025-10-02 03:04:05+00"
#: Inode numbers both media use (each medium is its own filesystem).
FIRST_INO = 2


class ProductionWorld(ArchiveWorld):
    """The catalogue, by-hash store and archive of production, in miniature (see the module docstring)."""

    def __init__(self, dsn: str, root):
        self.admin = psycopg.connect(dsn, autocommit=True)
        self._build_schema()
        super().__init__(dsn, root)
        self.stored = "5107ed" + "0" * 26
        self.fresh = "f7e5a1" + "0" * 26
        self.mounts = root / "mounted-media"
        self.fresh_mount = self.mounts / self.fresh
        self._ino = FIRST_INO
        self.orphan = root / "orphaned-copy"
        self._add_medium(self.stored, "stored-by-ntt", trigger=True)
        self._add_medium(self.fresh, "fresh-disk")
        self._fill_stored_medium()
        self._fill_fresh_medium()
        self.conn.execute("ANALYZE")
        self.conn.execute("TRUNCATE ntt_audit")  # what the NTT tools did; tests watch what relinker does

    def close(self):
        super().close()
        self.admin.close()

    # schema -----------------------------------------------------------------

    def _build_schema(self) -> None:
        with self.admin.transaction():
            self.admin.execute(NTT_SCHEMA)
            superuser = self.admin.execute(
                "SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0]
            #: whether the event trigger watches every ALTER TABLE (it needs a superuser)
            self.event_trigger = superuser
            if superuser:
                self.admin.execute(EVENT_TRIGGER)

    def _add_medium(self, medium: str, human: str, trigger: bool = False) -> None:
        inode, path = f"inode_{medium}", f"path_{medium}"
        with self.admin.transaction():
            self.admin.execute("INSERT INTO medium (medium_hash, medium_human, enum_done, problems) "
                               "VALUES (%s, %s, now(), '{}')", (medium, human))
            self.admin.execute(PARTITIONS.format(inode=inode, path=path, medium=medium))
            if trigger:
                self.admin.execute(STATEMENT_TRIGGER.format(table=inode))

    # the stored medium, as the NTT copier left it -------------------------

    def mount_path(self, medium: str, relative: str) -> bytes:
        return b"/mnt/ntt/%s/%s" % (medium.encode(), relative.encode())

    def _ntt_inode(self, medium: str, ino: int, paths: list[bytes], size: int, **columns) -> None:
        values = {**dict(medium_hash=medium, dev=2049, ino=ino, nlink=len(paths), size=size, mtime=1700000000,
                         fs_type="f"), **columns}
        names = list(values)
        self.conn.execute(
            f"INSERT INTO inode ({', '.join(names)}) VALUES ({', '.join('%s' for _ in names)})",
            [values[n] for n in names])
        blobid = columns.get("blobid")
        for p in paths:
            self.conn.execute("INSERT INTO path (medium_hash, dev, ino, path, blobid, exclude_reason) "
                              "VALUES (%s, 2049, %s, %s, %s, %s)",
                              (medium, ino, p, blobid, "excluded: .DS_Store" if p.endswith(b".DS_Store") else None))

    def _next_ino(self) -> int:
        self._ino += 1
        return self._ino

    def _stored_blob(self, content: bytes, blobid: str | None = None) -> str:
        """A by-hash file (as the copier wrote it) and its blobs row; n_hardlinks is set later."""
        blobid = blobid or blake3.blake3(content).hexdigest()
        self.store_file(blobid, content)
        self.conn.execute("INSERT INTO blobs (blobid, created_at) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                          (blobid, COPIER_PROCESSED_AT))
        return blobid

    def _copied(self, medium: str, relatives: list[str], content: bytes, *, link: list[bool] | None = None,
                blobid: str | None = None) -> str:
        """One inode of ``medium`` stored by the copier's batch mode, its archive links made."""
        blobid = self._stored_blob(content, blobid)
        paths = [self.mount_path(medium, r) for r in relatives]
        self._ntt_inode(medium, self._next_ino(), paths, len(content), blobid=blobid, copied=True,
                        status="success", processed_at=COPIER_PROCESSED_AT, by_hash_created=False)
        for stored, make in zip(paths, link or [True] * len(paths)):
            if make and not stored.endswith(b".DS_Store"):
                target = self.archive_path(stored)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                os.link(by_hash_path(self.by_hash_root, blobid), target)
        return blobid

    def _fill_stored_medium(self) -> None:
        m = self.stored
        self.licence = self._copied(m, ["docs/licence.txt", "docs/COPYING"], b"MIT licence text\n" * 50)
        self._copied(m, ["other/LICENSE"], b"MIT licence text\n" * 50)
        # a lost link: the second path of this inode is missing from the archive
        self.readme = self._copied(m, ["docs/README", "docs/readme.txt"], b"read me\n", link=[True, False])
        # the empty content: one blob, named by the SHA-256 of nothing, for every empty file
        self._copied(m, ["empty/a"], b"", blobid=EMPTY_SHA256)
        self._copied(m, ["empty/b", "empty/b-again"], b"", blobid=EMPTY_SHA256)
        # a photo whose archive link points at an orphaned copy of the same
        # content: a second copy replaced the by-hash file after this link was made
        photo = b"\xff\xd8 jpeg bytes " * 300
        self.photo = self._copied(m, ["photos/cat.jpg"], photo, link=[False])
        self.orphan.write_bytes(photo)
        target = self.archive_path(self.mount_path(m, "photos/cat.jpg"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.link(self.orphan, target)
        self._copied(m, ["odd/Icon\r", "odd/.DS_Store"], b"resource fork")
        # not regular files, and one the copier gave up on
        self._ntt_inode(m, self._next_ino(), [self.mount_path(m, "docs")], 4096, fs_type="d")
        self._ntt_inode(m, self._next_ino(), [self.mount_path(m, "bad/sector.bin")], 512, status="failed_permanent",
                        error_type="io_error", errors=["[Errno 5] Input/output error"])
        # path.blobid is a denormalised copy: here a stale one (inode.blobid is the truth)
        self.conn.execute("UPDATE path SET blobid = NULL WHERE path = %s", (self.mount_path(m, "docs/COPYING"),))
        # unmounted: what the umount left behind is an empty directory
        (self.mounts / self.stored).mkdir(parents=True)
        # the copier's n_hardlinks: one per inode, not one per path
        self.conn.execute("""
            UPDATE blobs AS b SET n_hardlinks = c.inodes
            FROM (SELECT blobid, count(*)::int AS inodes FROM inode WHERE blobid IS NOT NULL GROUP BY blobid) AS c
            WHERE b.blobid = c.blobid""")

    # the fresh medium: enumerated, loaded, mounted, not copied ---------------

    def _fresh_file(self, relatives: list[str | bytes], content: bytes, stored: list[bytes] | None = None) -> int:
        """A file of the fresh medium on its mounted disk (hardlinked for several paths) and its rows.

        ``stored``: its paths as the catalogue holds them, if not in the mount form.
        """
        mount = os.fsencode(self.fresh_mount)
        on_disk = [mount + b"/" + os.fsencode(r) for r in relatives]
        os.makedirs(os.path.dirname(on_disk[0]), exist_ok=True)
        with open(on_disk[0], "wb") as f:
            f.write(content)
        for other in on_disk[1:]:
            os.makedirs(os.path.dirname(other), exist_ok=True)
            os.link(on_disk[0], other)
        ino = self._next_ino()
        self._ntt_inode(self.fresh, ino, stored or [self.mount_path(self.fresh, r) for r in relatives], len(content))
        return ino

    def _fill_fresh_medium(self) -> None:
        self._ino = FIRST_INO  # the same inode numbers as the stored medium
        self._fresh_file(["new/notes.txt", "new/notes-link"], b"fresh notes\n" * 20)
        self._fresh_file(["new/COPYING"], b"MIT licence text\n" * 50)  # content the store already has
        self._fresh_file(["new/empty"], b"")
        self._fresh_file(["new/data.bin"], os.urandom(200_000))
        # the reference's other path forms, and a name that is not UTF-8
        self._fresh_file(["new/relative.txt"], b"stored relative to the mount\n", stored=[b"/new/relative.txt"])
        mount_form = self.mount_path(self.fresh, "p5/partition.txt")
        self._fresh_file(["p5/partition.txt"], b"on partition 5\n", stored=[b"p5:" + mount_form])
        self._fresh_file([b"new/caf\xe9\nlist"], b"a newline in the name\n",
                         stored=[self.mount_path(self.fresh, "new/") + b"caf\xe9\nlist"])
        self._ntt_inode(self.fresh, self._next_ino(), [self.mount_path(self.fresh, "new")], 4096, fs_type="d")

    # what tests compare ------------------------------------------------------

    def source_prefix(self) -> str:
        """The ``--source-prefix`` that reads the fresh medium where it is mounted here."""
        return f"/mnt/ntt/{self.fresh}={self.fresh_mount}"

    def rows_of(self, medium: str) -> dict:
        """Every column of every inode and path row of ``medium``, and of the blobs its inodes name."""
        inodes = self.conn.execute("SELECT * FROM inode WHERE medium_hash = %s ORDER BY ino", (medium,)).fetchall()
        paths = self.conn.execute("SELECT * FROM path WHERE medium_hash = %s ORDER BY path", (medium,)).fetchall()
        blobs = self.conn.execute(
            "SELECT * FROM blobs WHERE blobid IN (SELECT blobid FROM inode WHERE medium_hash = %s) ORDER BY blobid",
            (medium,))
        columns = [c.name for c in blobs.description]
        return {"inode": inodes, "path": paths, "blobs": [dict(zip(columns, row)) for row in blobs.fetchall()]}
