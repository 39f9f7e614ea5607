"""Apply relinker's SQL (``sql/`` in the repository, ``relinker.sql`` when installed).

Numbered files ``NNNN_name.sql`` run once each, in order, each in its own
transaction together with its row in ``relinker_schema_migration`` (so users
can see the schema version). Every file is also idempotent on its own, so a
catalogue that already has, say, the seed's columns is migrated without
complaint. A file whose first line is ``-- relinker: online`` runs outside a
transaction: it holds ``CREATE INDEX CONCURRENTLY`` statements, which this
module also knows how to build on partitioned tables. ``views.sql`` is
re-applied on every migrate.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import logging
import pathlib
import re
import time

import psycopg
from psycopg import sql

from relinker import __version__, db
from relinker.errors import UserError

log = logging.getLogger(__name__)

SQL_PACKAGE = "relinker.sql"
BASE_FILE = "ntt_base.sql"
VIEWS_FILE = "views.sql"
ONLINE_MARKER = "-- relinker: online"
MIGRATION_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
ONLINE_INDEX = re.compile(
    r"CREATE INDEX CONCURRENTLY IF NOT EXISTS (\w+) ON (\w+) \(([\w, ]+)\)(?: INCLUDE \(([\w, ]+)\))?"
    r"(?: WHERE (\w+ IS NULL))?;",
    re.IGNORECASE,
)
#: Serialises concurrent `relinker migrate` runs against one catalogue.
MIGRATE_LOCK_KEY = 0x72656C69  # "reli"
SQL_TRY_LOCK_MIGRATE = "SELECT pg_try_advisory_lock(%s)"
SQL_UNLOCK_MIGRATE = "SELECT pg_advisory_unlock(%s)"

SQL_CREATE_MIGRATION_TABLE = """
CREATE TABLE IF NOT EXISTS relinker_schema_migration (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""
SQL_APPLIED_VERSIONS = "SELECT version FROM relinker_schema_migration ORDER BY version"
SQL_RECORD_MIGRATION = "INSERT INTO relinker_schema_migration (version, name) VALUES (%s, %s)"
# relinker's views are made anew by every migrate, from its own views.sql; the comment of one says
# which: another version's migrate (one before relinker refused newer catalogues) leaves them its own.
SQL_MARK_VIEWS = "COMMENT ON VIEW relinker_run_progress IS {}"
SQL_VIEWS_MARK = """
SELECT obj_description(to_regclass('relinker_run_progress'), 'pg_class') = %(mark)s
       AND NOT EXISTS (SELECT 1 FROM unnest(%(views)s::text[]) AS v WHERE to_regclass(v) IS NULL)
"""

# An index whose key starts with the wanted columns, in order, that also
# holds the wanted included columns (as key or INCLUDE columns), with no
# predicate or expression, serves our lookups as well as our own would.
# Name parts, not regclass text: that comes quoted ("Path_ByInode") and
# would be quoted again as an identifier.
SQL_EQUIVALENT_INDEX = """
SELECT i.indexrelid, i.indisvalid, n.nspname, c.relname
FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE i.indrelid = to_regclass(%(table)s)
  AND i.indpred IS NULL AND i.indexprs IS NULL
  AND (SELECT array_agg(a.attname::text ORDER BY k.n)
       FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n)
       JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
       WHERE k.n <= cardinality(%(columns)s::text[])) = %(columns)s::text[]
  AND (SELECT array_agg(a.attname::text)
       FROM unnest(i.indkey::int2[]) AS k(attnum)
       JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum) @> %(include)s::text[]
ORDER BY i.indisvalid DESC
LIMIT 1
"""
# A partition may live in a schema of its own, outside the search_path.
SQL_PARTITIONS = """
SELECT c.oid, n.nspname, c.relname
FROM pg_inherits h JOIN pg_class c ON c.oid = h.inhrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE h.inhparent = to_regclass(%s) ORDER BY c.relname
"""
SQL_INDEX_STATE = "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)"
# Whether some index of the partition is attached to the parent index already.
SQL_PARTITION_ATTACHED = """
SELECT 1 FROM pg_inherits h JOIN pg_index i ON i.indexrelid = h.inhrelid
WHERE h.inhparent = to_regclass(%(parent)s) AND i.indrelid = %(partition)s
"""


@dataclasses.dataclass(frozen=True)
class Migration:
    """One numbered file of sql/."""

    version: int
    name: str
    text: str

    @property
    def online(self) -> bool:
        """Whether it builds its indexes online, outside a transaction (its first line says so)."""
        return self.text.lstrip().startswith(ONLINE_MARKER)


def _sql_files():
    """The SQL directory: ``sql/`` when run from a checkout, ``relinker.sql`` when installed."""
    # A checkout's own first: run from one (PYTHONPATH) where an editable install of another
    # exists, relinker.sql is found as that install maps it, the other checkout's SQL.
    checkout = pathlib.Path(__file__).resolve().parent.parent / "sql"
    if (checkout / VIEWS_FILE).is_file() and (checkout / BASE_FILE).is_file():
        return checkout
    return importlib.resources.files(SQL_PACKAGE)


def _read(name: str) -> str:
    return _sql_files().joinpath(name).read_text(encoding="utf-8")


def available() -> list[Migration]:
    """Every numbered migration shipped with this version, in order."""
    found = []
    for entry in _sql_files().iterdir():
        match = MIGRATION_FILE.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    return sorted(found, key=lambda m: m.version)


def applied_versions(conn: psycopg.Connection) -> list[int]:
    """Versions recorded in the catalogue ([] when never migrated)."""
    if db.relkind(conn, "relinker_schema_migration") is None:
        return []
    return [v for (v,) in conn.execute(SQL_APPLIED_VERSIONS)]


def require_migrated(conn: psycopg.Connection) -> None:
    """Refuse to run against a catalogue that lacks relinker's schema."""
    db.require_catalogue(conn)
    refuse_hidden_tables(conn)
    try:
        applied = set(applied_versions(conn))
    except psycopg.errors.InsufficientPrivilege:
        # Every command reads it, a dry run too: one line with the GRANT, as preflight says others.
        user = conn.info.user
        raise UserError(f"role {user} may not SELECT relinker_schema_migration, which every command reads "
                        f"(GRANT SELECT ON relinker_schema_migration TO {user})") from None
    refuse_newer(applied)
    missing = [m.version for m in available() if m.version not in applied]
    if missing:
        raise UserError(
            "the catalogue is not migrated for this relinker version "
            f"(missing migrations {', '.join(map(str, missing))}): run `relinker migrate`"
        )
    views = _read(VIEWS_FILE)
    if not conn.execute(SQL_VIEWS_MARK, {"mark": views_mark(views), "views": _view_names(views)}).fetchone()[0]:
        raise UserError("relinker's views in the catalogue are not this relinker version's (another version's "
                        "`relinker migrate` made them, or they were dropped): run `relinker migrate`")


def views_mark(views_sql: str) -> str:
    """What the comment of relinker's views says when ``views_sql`` (this version's views.sql) made them."""
    digest = hashlib.sha256(views_sql.encode("utf-8")).hexdigest()[:16]
    return f"made by relinker migrate from views.sql {digest}"


# relinker's tables (their migration table) in the schemas of this session's search_path, first found
# first: beside the catalogue's or elsewhere, whether that elsewhere holds a catalogue of its own, and
# the catalogue's schema.
SQL_RELINKER_SETS = """
SELECT n.nspname, c.relnamespace = b.relnamespace,
       EXISTS (SELECT 1 FROM pg_class AS other WHERE other.relnamespace = c.relnamespace AND other.relname = 'blobs'),
       b.relnamespace::regnamespace::text
FROM pg_class AS b, pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
WHERE b.oid = to_regclass('blobs') AND c.relname = 'relinker_schema_migration' AND c.relkind = 'r'
  AND n.nspname = ANY(current_schemas(false))
ORDER BY array_position(current_schemas(false), n.nspname)
"""


def refuse_hidden_tables(conn: psycopg.Connection, *, migrating: bool = False) -> None:
    """UserError where this session would find relinker's tables other than those beside the catalogue
    it finds: another catalogue's (its runs and views are not this one's), or a set an earlier relinker
    made in the first schema of a migrating role's search_path ("$user", perhaps) beside a set next to
    the catalogue (runs would go to two sets). ``migrating``: migrate builds beside the catalogue, so
    another catalogue's set first is no matter, but a leftover set is (migrate would make a second)."""
    found = conn.execute(SQL_RELINKER_SETS).fetchall()
    if not found:
        return
    catalogue = found[0][3]
    if not migrating and not found[0][1] and found[0][2]:
        raise UserError(f"the catalogue this session finds is in schema {catalogue}, but the relinker tables it "
                        f"finds first are those of the catalogue in schema {found[0][0]}: put {catalogue} first in "
                        f"the search_path (or migrate it: `relinker migrate` builds beside it)")
    beside = [schema for schema, is_the_catalogues, _, _ in found if is_the_catalogues]
    leftover = [schema for schema, is_the_catalogues, own, _ in found if not is_the_catalogues and not own]
    if leftover and (beside or migrating):
        where = f"both beside the catalogue's (schema {catalogue}) and" if beside else \
            f"apart from the catalogue's (schema {catalogue}, where this relinker makes them),"
        raise UserError(f"relinker's tables are {where} in schema {', '.join(leftover)}, which this role's "
                        f"search_path also reaches (an earlier relinker made them there): keep the set with the "
                        f"runs you want (beside the catalogue), drop the other (DROP TABLE "
                        f"relinker_schema_migration and relinker's other tables and views in it), migrate again")


def refuse_newer(applied: set[int]) -> None:
    """Refuse a catalogue a newer relinker migrated: its runs and views may mean what this one cannot know
    (a run status it would resume), and this one's views would replace the newer ones."""
    known = max(m.version for m in available())
    newer = sorted(v for v in applied if v > known)
    if newer:
        raise UserError(f"the catalogue was migrated by a newer relinker (migration {newer[-1]}; this one, "
                        f"{__version__}, knows up to {known}): run that version")


def migrate(conn: psycopg.Connection, *, base: bool = False) -> list[str]:
    """Bring the catalogue up to date; return the names of what was applied.

    ``conn`` must be in autocommit mode (online index builds need it); each
    ordinary migration gets its own transaction.
    """
    applied_now: list[str] = []
    restore = None
    _wait_for_the_migrate_lock(conn)
    try:
        if base:
            db.require_reachable_catalogue(conn)
            with conn.transaction():
                conn.execute(_read(BASE_FILE))
            applied_now.append(BASE_FILE)
        db.require_catalogue(conn)
        refuse_hidden_tables(conn, migrating=True)  # as this role's sessions find them
        restore = _as_the_catalogue(conn)
        # Checked before anything is made, even with nothing to apply (relinker's views are made
        # anew): a table left by a role that could not finish would be in the way of the owner's.
        require_owner(conn, "migrate", ("inode", "path", "blobs"), "migrations change")
        done = set(applied_versions(conn))
        refuse_newer(done)
        conn.execute(SQL_CREATE_MIGRATION_TABLE)
        for migration in available():
            if migration.version in done:
                continue
            log.info("applying migration %04d_%s", migration.version, migration.name)
            if migration.online:
                _apply_online(conn, migration.text)
                conn.execute(SQL_RECORD_MIGRATION, (migration.version, migration.name))
            else:
                _apply_in_transaction(conn, migration)
            applied_now.append(f"{migration.version:04d}_{migration.name}")
        try:
            views = _read(VIEWS_FILE)
            mark = sql.SQL(SQL_MARK_VIEWS).format(sql.Literal(views_mark(views)))
            briefly_locking(conn, [(views, None), (mark, None), *_grants_of(conn, _view_names(views))],
                            "re-creating relinker's views")
        except psycopg.errors.DependentObjectsStillExist as exc:
            raise UserError(f"re-creating relinker's views: {db.first_line(exc)} (a view of yours built on one "
                            "of relinker's: drop it, migrate, create it again)") from None
    finally:
        # A session the server ended holds no lock, and the unlock's error would hide why it ended.
        if db.alive(conn):
            if restore is not None:
                conn.execute(restore)
            conn.execute(SQL_UNLOCK_MIGRATE, (MIGRATE_LOCK_KEY,))
    return applied_now


# Who owns the catalogue, and whether this role is a member of that owner's, may act as it, and whether
# the owner may create beside its tables.
SQL_CATALOGUE_OWNER = """
SELECT pg_get_userbyid(c.relowner), current_user, c.relnamespace::regnamespace::text,
       pg_has_role(current_user, c.relowner, 'MEMBER'),
       pg_has_role(current_user, c.relowner,
                   CASE WHEN current_setting('server_version_num')::int >= 160000 THEN 'SET' ELSE 'MEMBER' END),
       has_schema_privilege(c.relowner, c.relnamespace, 'CREATE')
FROM pg_class AS c WHERE c.oid = to_regclass('blobs')
"""
# The catalogue's schemas alone in search_path, blobs' first: what is made goes there, and nothing
# migrate names (a view it drops to make anew) is found in another schema, another catalogue's.
SQL_BESIDE_THE_CATALOGUE = """
SELECT current_setting('search_path'),
       set_config('search_path', string_agg(quote_ident(schema), ', ' ORDER BY n), false)
FROM (SELECT ns.nspname AS schema, min(t.n) AS n
      FROM unnest(ARRAY['blobs', 'inode', 'path', 'medium']) WITH ORDINALITY AS t(name, n)
      JOIN pg_class AS c ON c.oid = to_regclass(t.name)
      JOIN pg_namespace AS ns ON ns.oid = c.relnamespace
      GROUP BY 1) AS schemas
"""
SQL_ACTING_AS_ANOTHER = "SELECT current_user <> session_user"
SQL_SET_ROLE = "SET ROLE {}"
SQL_RESET_ROLE = "RESET ROLE"
SQL_SEARCH_PATH_BACK = "SELECT set_config('search_path', {}, false)"


def _as_the_catalogue(conn: psycopg.Connection) -> sql.Composed:
    """Make what migrate makes the catalogue owner's, beside its tables; return the statement that
    undoes it.

    A member of the owner's role would otherwise own relinker's tables, and the owner could neither
    migrate nor grant them again: a member that may not act as the owner, or an owner that may not
    create beside its tables, is refused. A role with a schema of its own (``"$user"`` first in
    search_path) would have them in its schema, where the roles that run find none.
    """
    owner, me, schema, member, may_become, owner_creates = conn.execute(SQL_CATALOGUE_OWNER).fetchone()
    undo = []
    made = f"what migrate makes must be {owner}'s, the owner of the catalogue's tables"
    if (owner == me or member) and not owner_creates:
        raise UserError(f"{owner} may not create in schema {schema}, and {made}: "
                        f"GRANT CREATE ON SCHEMA {schema} TO {owner}")
    if owner != me and member:
        if not may_become:
            raise UserError(f"role {me} may not SET ROLE to {owner}, and {made}: run `relinker migrate` as {owner}, "
                            f"or GRANT {owner} TO {me} WITH SET TRUE")
        # Back to the role the session had (one its caller set, perhaps), not always its login role.
        acting = conn.execute(SQL_ACTING_AS_ANOTHER).fetchone()[0]
        conn.execute(sql.SQL(SQL_SET_ROLE).format(sql.Identifier(owner)))
        undo.append(sql.SQL(SQL_SET_ROLE).format(sql.Identifier(me)) if acting else sql.SQL(SQL_RESET_ROLE))
    moved = conn.execute(SQL_BESIDE_THE_CATALOGUE).fetchone()
    undo.insert(0, sql.SQL(SQL_SEARCH_PATH_BACK).format(sql.Literal(moved[0])))
    return sql.SQL("; ").join(undo)


# Who owns relinker's views now, if not this role, and whether this role may give them back
# (it must be able to SET ROLE to the owner, who must be able to create in the views' schema).
SQL_VIEW_OWNERS = """
SELECT c.relname, pg_get_userbyid(c.relowner),
       pg_has_role(current_user, c.relowner,
                   CASE WHEN current_setting('server_version_num')::int >= 160000 THEN 'SET' ELSE 'MEMBER' END)
       AND has_schema_privilege(c.relowner, c.relnamespace, 'CREATE')
FROM pg_class AS c
WHERE c.oid IN (SELECT to_regclass(v) FROM unnest(%(views)s::text[]) AS v) AND c.relkind = 'v'
  AND c.relowner <> (SELECT oid FROM pg_roles WHERE rolname = current_user)
ORDER BY 1
"""
# What the owner of relinker's views granted others on them: re-granted when they are made again.
SQL_VIEW_GRANTS = """
SELECT c.relname, a.privilege_type, CASE WHEN a.grantee = 0 THEN NULL ELSE pg_get_userbyid(a.grantee) END,
       a.is_grantable
FROM pg_class AS c CROSS JOIN LATERAL aclexplode(c.relacl) AS a
WHERE c.oid IN (SELECT to_regclass(v) FROM unnest(%(views)s::text[]) AS v) AND c.relkind = 'v'
  AND a.grantee <> c.relowner
ORDER BY 1, 2, 3
"""
VIEW_PRIVILEGES = frozenset({"SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER",
                             "MAINTAIN"})


def _view_names(views_sql: str) -> list[str]:
    return sorted(set(re.findall(r"CREATE VIEW (\w+)", views_sql)))


SQL_VIEW_OWNER = "ALTER VIEW {} OWNER TO {}"
# The privilege is one of VIEW_PRIVILEGES (a keyword), the grantee PUBLIC or a role's identifier.
SQL_GRANT_ON_VIEW = "GRANT {} ON {} TO {}{}"


def _grants_of(conn: psycopg.Connection, views: list[str]) -> list[tuple[sql.Composed, None]]:
    """Statements that give ``views`` made again their owners and what others may do with them now
    (dropped with them). Column-level grants are not kept."""
    grants = []
    for view, owner, may_give_back in conn.execute(SQL_VIEW_OWNERS, {"views": views}):
        if may_give_back:
            grants.append((sql.SQL(SQL_VIEW_OWNER).format(sql.Identifier(view), sql.Identifier(owner)), None))
        else:
            log.warning("view %s was %s's and is now %s's: this role may not give it back (run migrate as %s)",
                        view, owner, conn.info.user, owner)
    for view, privilege, grantee, grantable in conn.execute(SQL_VIEW_GRANTS, {"views": views}):
        if privilege not in VIEW_PRIVILEGES:
            continue
        statement = sql.SQL(SQL_GRANT_ON_VIEW).format(
            sql.SQL(privilege), sql.Identifier(view), sql.SQL("PUBLIC") if grantee is None else sql.Identifier(grantee),
            sql.SQL(" WITH GRANT OPTION" if grantable else ""))
        grants.append((statement, None))
    return grants


#: The NTT tables migrations change (columns, indexes) that this role does not own, with their owners.
SQL_NOT_OWNED = """
SELECT t.name, pg_get_userbyid(c.relowner)
FROM unnest(%(names)s::text[]) WITH ORDINALITY AS t(name, n)
JOIN pg_class AS c ON c.oid = to_regclass(t.name)
WHERE NOT pg_has_role(current_user, c.relowner, 'USAGE')
ORDER BY t.n
"""


def require_owner(conn: psycopg.Connection, command: str, tables: tuple[str, ...], why: str) -> None:
    """UserError unless this role owns (or is a member of the owner of) ``tables``, which ``command``
    needs to own (``why``: what it does to them), before anything is made."""
    row = conn.execute(SQL_NOT_OWNED, {"names": list(tables)}).fetchone()
    if row:
        table, owner = row
        raise UserError(f"role {conn.info.user} does not own the catalogue's table {table}, which {why}: "
                        f"run `relinker {command}` as {owner} (its owner)")


#: How often a migrate waiting for another one looks again (s).
MIGRATE_LOCK_POLL = 0.5


def _wait_for_the_migrate_lock(conn: psycopg.Connection) -> None:
    # Polled, never a blocking pg_advisory_lock: a statement waiting for the
    # lock holds a snapshot, and the running migrate's CREATE INDEX
    # CONCURRENTLY waits for every snapshot older than its own: a deadlock.
    waiting = False
    while not conn.execute(SQL_TRY_LOCK_MIGRATE, (MIGRATE_LOCK_KEY,)).fetchone()[0]:
        if not waiting:
            log.warning("another relinker migrate is running: waiting for it")
            waiting = True
        time.sleep(MIGRATE_LOCK_POLL)


#: How long a statement that takes a strong lock waits for it (see briefly_locking).
LOCK_TIMEOUT = "10s"
SQL_LOCK_TIMEOUT = "SELECT set_config('lock_timeout', %s, true)"
#: Tries of such a statement that can simply be run again (an index attach, the views) before migrate gives up.
LOCK_ATTEMPTS = 3


def _apply_in_transaction(conn: psycopg.Connection, migration: Migration) -> None:
    briefly_locking(conn, [(migration.text, None), (SQL_RECORD_MIGRATION, (migration.version, migration.name))],
                    f"migration {migration.version:04d}_{migration.name}", attempts=1)


def briefly_locking(conn: psycopg.Connection, statements, what: str, attempts: int = LOCK_ATTEMPTS,
                    again: str = "run `relinker migrate` again") -> None:
    """Run ``statements`` ((query, params) pairs) in one transaction that waits at most LOCK_TIMEOUT for its locks.

    A DDL statement queued behind a long transaction (a copier's, a
    report's) blocks every later reader of that table while it waits: on a
    live catalogue each try gives up soon, and after the last of
    ``attempts`` a UserError says why (and, with ``again``, what to run once
    that transaction is over), the transaction undone.
    """
    for attempt in range(1, attempts + 1):
        try:
            with conn.transaction():
                conn.execute(SQL_LOCK_TIMEOUT, (LOCK_TIMEOUT,))
                for query, params in statements:
                    conn.execute(query, params)
            return
        except psycopg.errors.LockNotAvailable:
            if attempt == attempts:
                tries = f", {attempts} times" if attempts > 1 else ""
                raise UserError(
                    f"{what} waited {LOCK_TIMEOUT} for a lock another session holds{tries} (a long transaction: "
                    f"see pg_stat_activity); it was not done, {again} once it is over") from None
            time.sleep(attempt)


def _apply_online(conn: psycopg.Connection, text: str) -> None:
    statements = re.findall(r"^CREATE INDEX", text, re.IGNORECASE | re.MULTILINE)
    if len(statements) != len(ONLINE_INDEX.findall(text)):
        # A statement this module cannot read must not be skipped in silence.
        raise ValueError("an online migration holds a CREATE INDEX statement relinker cannot build online")
    for match in ONLINE_INDEX.finditer(text):
        name, table = match[1], match[2]
        columns = [c.strip() for c in match[3].split(",")]
        include = [c.strip() for c in match[4].split(",")] if match[4] else []
        null_column = match[5].split()[0] if match[5] else None
        build_index_online(conn, name, table, columns, include, where_null=null_column)


SQL_PARENT_INDEX = "CREATE INDEX IF NOT EXISTS {} ON ONLY {} {}"
SQL_ATTACH_INDEX = "ALTER INDEX {} ATTACH PARTITION {}"


def build_index_online(conn: psycopg.Connection, name: str, table: str, columns: list[str],
                       include: list[str] = (), where_null: str | None = None) -> None:
    """Create an index without blocking writes, unless an equivalent one exists.

    On a partitioned table: an invalid index ON ONLY the parent, then each
    partition's index built concurrently and attached; the parent index
    becomes valid once every partition has one. ``where_null`` makes it a
    partial index of the rows where that column IS NULL; such an index is
    only ever relinker's own (found by name), never one built by hand.
    """
    wanted = {"table": table, "columns": columns, "include": list(include)}
    existing = None if where_null else conn.execute(SQL_EQUIVALENT_INDEX, wanted).fetchone()
    if existing and existing[1]:
        log.info("index on %s (%s) already exists: %s", table, ", ".join(columns), existing[3])
        return
    cols = sql.SQL("({})").format(sql.SQL(", ").join(map(sql.Identifier, columns)))
    if include:
        cols += sql.SQL(" INCLUDE ({})").format(sql.SQL(", ").join(map(sql.Identifier, include)))
    if where_null:
        cols += sql.SQL(" WHERE {} IS NULL").format(sql.Identifier(where_null))
    if db.relkind(conn, table) != "p":
        _build_concurrently(conn, name, sql.Identifier(table), cols)
        return
    briefly_locking(conn, [(sql.SQL(SQL_PARENT_INDEX).format(
        sql.Identifier(name), sql.Identifier(table), cols), None)], f"creating index {name} on {table}")
    def attach(child_index: sql.Identifier) -> None:
        briefly_locking(conn, [(sql.SQL(SQL_ATTACH_INDEX).format(
            sql.Identifier(name), child_index), None)], f"attaching the index of {partition} to {name}")

    for oid, schema, partition in conn.execute(SQL_PARTITIONS, (table,)).fetchall():
        if conn.execute(SQL_PARTITION_ATTACHED, {"partition": oid, "parent": name}).fetchone():
            continue
        qualified = sql.Identifier(schema, partition)
        child = None if where_null else conn.execute(
            SQL_EQUIVALENT_INDEX, dict(wanted, table=qualified.as_string(conn))).fetchone()
        if child and child[1]:
            try:
                attach(sql.Identifier(child[2], child[3]))
                continue
            except psycopg.errors.InvalidObjectDefinition:
                # It leads with our columns but is not identical (more columns, other
                # INCLUDEs, an operator class): ATTACH takes only an identical one.
                log.info("index %s of %s serves our lookups but cannot be attached: building %s's own",
                         child[3], partition, name)
        attach(_build_concurrently(conn, f"{name[:40]}_{oid}", qualified, cols, schema))


# The sessions a concurrent index build of a table waits for: those that hold a lock on it that
# conflicts with a share lock (a writer), and those that hold a snapshot. A session of another role
# shows its locks but not its snapshot (unless this role may read all statistics).
SQL_BUILD_WAITS_FOR = """
SELECT a.pid, a.state, extract(epoch FROM clock_timestamp() - a.xact_start)::float8
FROM pg_stat_activity AS a
WHERE a.datname = current_database() AND a.pid <> pg_backend_pid() AND a.backend_type = 'client backend'
  AND (a.backend_xmin IS NOT NULL
       OR EXISTS (SELECT 1 FROM pg_locks AS l
                  WHERE l.pid = a.pid AND l.granted AND l.relation = to_regclass(%(table)s)
                    AND l.mode IN ('RowExclusiveLock', 'ShareUpdateExclusiveLock', 'ShareRowExclusiveLock',
                                   'ExclusiveLock', 'AccessExclusiveLock')))
ORDER BY a.xact_start NULLS LAST
"""
SQL_DROP_INDEX = "DROP INDEX CONCURRENTLY IF EXISTS {}"
SQL_BUILD_INDEX = "CREATE INDEX CONCURRENTLY IF NOT EXISTS {} ON {} {}"


def _build_concurrently(conn: psycopg.Connection, name: str, table: sql.Identifier, cols: sql.Composable,
                        schema: str | None = None) -> sql.Identifier:
    """Build index ``name`` of ``table`` (in ``schema``, the table's) concurrently; return its qualified name."""
    qualified = sql.Identifier(schema, name) if schema else sql.Identifier(name)
    # An interrupted CONCURRENTLY build leaves an INVALID index behind that
    # IF NOT EXISTS would happily keep: drop it and build again.
    state = conn.execute(SQL_INDEX_STATE, (qualified.as_string(conn),)).fetchone()
    if state and not state[0]:
        conn.execute(sql.SQL(SQL_DROP_INDEX).format(qualified))
    _name_sessions_waited_for(conn, name, table.as_string(conn))
    # CREATE INDEX takes no schema for its index: it is made in the table's.
    conn.execute(sql.SQL(SQL_BUILD_INDEX).format(
        sql.Identifier(name), table, cols))
    return qualified


def _name_sessions_waited_for(conn: psycopg.Connection, index: str, table: str) -> None:
    """Warn of the sessions whose transactions the concurrent build of ``index`` on ``table`` waits for."""
    sessions = conn.execute(SQL_BUILD_WAITS_FOR, {"table": table}).fetchall()
    if sessions:
        pid, state, age = sessions[0]
        first = f"{pid}, {state} for {age:.0f} s" if state is not None else f"{pid}, of another role"
        log.warning("building index %s waits for the transactions open now to end: %d session%s (the first, "
                    "%s; see pg_stat_activity)", index, len(sessions), "s" if len(sessions) > 1 else "", first)
