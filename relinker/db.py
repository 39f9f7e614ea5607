"""Connections to the catalogue, and which database errors are worth retrying."""

from __future__ import annotations

import logging
import os
import re
import socket
import time

import psycopg
import tenacity

from relinker.dbtext import adapt_to_encoding, client_encoding
from relinker.errors import UserError
from relinker.paths import display

log = logging.getLogger(__name__)

NTT_TABLES = ("medium", "inode", "path", "blobs")

#: How long a worker keeps retrying a transient error before giving up (s).
DEFAULT_RETRY_TIMEOUT = 300.0

SQL_MISSING_TABLES = """
SELECT t.name
FROM unnest(%(names)s::text[]) AS t(name)
WHERE to_regclass(t.name) IS NULL
"""


def worker_name() -> str:
    """Identify this process in claims and in ``relinker_range.worker``."""
    return f"{socket.gethostname()}:{os.getpid()}"


#: What relinker's sessions are called in pg_stat_activity (and how a claim
#: tells them from other programs' sessions).
APPLICATION_NAME = "relinker"


def connect(dsn: str, *, autocommit: bool = False, connect_timeout: int = 10) -> psycopg.Connection:
    """Open a connection; psycopg errors propagate (workers retry them)."""
    conn = psycopg.connect(
        dsn, autocommit=autocommit, application_name=APPLICATION_NAME, connect_timeout=connect_timeout
    )
    try:
        conn.execute(SQL_SESSION_SETTINGS, {"client_encoding": client_encoding(conn)})
        for name, since in SESSION_TIMEOUTS:
            if conn.info.server_version >= since:
                conn.execute(SQL_SET, (name, "0"))
        if not autocommit:
            conn.commit()  # settings made in a transaction end with it
        adapt_to_encoding(conn)
    except BaseException:
        conn.close()
        raise
    return conn


# What a role's defaults (or the caller's environment) must not decide for
# relinker's sessions: a run streams a range's rows while it links them, and
# migrate builds indexes on millions of rows, for longer than any
# statement_timeout meant for interactive use; the driver reads timestamps in
# the ISO style only; what relinker stores must not depend on the client
# encoding (see dbtext.client_encoding); a bytea sent by COPY in text form is
# escaped for standard strings (with them off, the server stored the text of
# each path's hex form).
SQL_SESSION_SETTINGS = """
SELECT set_config('statement_timeout', '0', false), set_config('DateStyle', 'ISO', false),
       set_config('client_encoding', %(client_encoding)s, false),
       set_config('standard_conforming_strings', 'on', false)
"""

SQL_SET = "SELECT set_config(%s, %s, false)"


#: Timeouts a role or database may set that relinker's sessions turn off, with the first server version
#: that has each. A worker's control session speaks only at heartbeats: ended as idle, it would take
#: its range's lock with it, and another worker would take over a range still being worked. A copy
#: range's transaction stays open while its files sync, and a range's rows stream for as long as its
#: links take: ended, they would be redone forever. relinker ends its own stalled sessions (see
#: checkpoint.SQL_STALLED_ROW_HOLDERS).
SESSION_TIMEOUTS = [("idle_in_transaction_session_timeout", 90600), ("idle_session_timeout", 140000),
                    ("transaction_timeout", 170000)]


#: Session settings of a worker's data connection, with why:
#: (name, value, the first server version that has the setting).
RANGE_SESSION_SETTINGS = [
    # Parallel query would only add process start-up to each small range
    # query and take cores from the workers themselves.
    ("max_parallel_workers_per_gather", "0", 90600),
    # The range query's estimate is inflated by its per-inode subquery (far
    # above jit_above_cost), so a server built with LLVM would compile every
    # range's query, a large share of its time, and never reuse it.
    ("jit", "off", 110000),
    # Each inode's paths are looked up once: a Memoize node only costs.
    ("enable_memoize", "off", 140000),
]


def connect_for_ranges(dsn: str) -> psycopg.Connection:
    """A worker's data connection, streaming one range at a time (see RANGE_SESSION_SETTINGS)."""
    conn = connect(dsn, autocommit=True)
    try:
        for name, value, since in RANGE_SESSION_SETTINGS:
            if conn.info.server_version >= since:
                conn.execute(SQL_SET, (name, value))
    except BaseException:
        conn.close()
        raise
    return conn


def connect_for_user(dsn: str, *, autocommit: bool = False) -> psycopg.Connection:
    """Open a connection for a CLI command; failure becomes one clear line."""
    try:
        return connect(dsn, autocommit=autocommit)
    except psycopg.Error as exc:
        reason = first_line(exc)
        if isinstance(exc, psycopg.ProgrammingError):  # libpq could not parse it
            reason = without_dsn_pieces(reason)
        # The DSN is right: the server has no session to spare.
        hint = ("no more connections allowed now: see max_connections and CONNECTION LIMIT; a run's "
                "workers take two each" if SERVER_FULL.search(reason)
                else "set --db-url, RELINKER_DB_URL or the PG* variables")
        raise UserError(f"cannot connect to the catalogue database: {reason} ({hint})") from None


def without_dsn_pieces(reason: str) -> str:
    """libpq's reason a DSN cannot be parsed without the pieces of it it quotes: any may hold a password
    (an unencoded '%' in one, a space, a mistyped scheme). A key name it calls an invalid option stays."""
    def piece(match: re.Match) -> str:
        text = match[1]
        named = match.string.startswith("invalid connection option ", max(0, match.start() - 26)) and \
            re.fullmatch(r"[a-z_]+", text)
        return match[0] if len(text) <= 1 or named else '"..."'
    return re.sub(r'"([^"]*)"', piece, reason)


#: PostgreSQL's refusals of a session for want of a slot (sorry, too many clients already; remaining
#: connection slots are reserved ...; too many connections for role or database).
SERVER_FULL = re.compile(r"too many clients|remaining connection slots are reserved|too many connections for")


class RangeConnection:
    """A worker's data connection: opened on first use, dropped after a transient error."""

    def __init__(self, dsn: str):
        self.dsn = dsn
        self._conn: psycopg.Connection | None = None

    def get(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = connect_for_ranges(self.dsn)
        return self._conn

    def reset(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def text_array(values) -> str:
    """A PostgreSQL array literal for ``values`` (str), to bind as one ``text[]`` parameter.

    Building the literal with join is several times faster than letting the
    driver adapt a list of thousands of strings element by element.
    """
    return "{" + ",".join('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values) + "}"


def int_array(values) -> str:
    """A PostgreSQL array literal for ``values`` (int), to bind as one ``int[]``/``bigint[]`` parameter."""
    return "{" + ",".join(map(str, values)) + "}"


def bool_array(values) -> str:
    """A PostgreSQL array literal for ``values`` (truth values), to bind as one ``bool[]`` parameter."""
    return "{" + ",".join("t" if value else "f" for value in values) + "}"


def in_callers_transaction(conn: psycopg.Connection) -> bool:
    """Whether a statement on ``conn`` would run inside a transaction its caller has open (or will
    commit): not an autocommit session outside any transaction block."""
    return not conn.autocommit or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE


def alive(conn: psycopg.Connection | None) -> bool:
    """Whether ``conn`` is a session still there: not closed here, not lost to the server."""
    return conn is not None and not conn.closed and not conn.broken


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (a path of an OSError as relinker shows paths)."""
    if isinstance(exc, OSError) and exc.strerror and isinstance(exc.filename, (str, bytes)):
        where = display(os.fsencode(exc.filename))
        if isinstance(exc.filename2, (str, bytes)):  # a rename's, a link's other end
            where += f" -> {display(os.fsencode(exc.filename2))}"
        return f"[Errno {exc.errno}] {exc.strerror}: {where}"
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    hint = exc.diag.message_hint if isinstance(exc, psycopg.Error) and exc.diag is not None else None
    if hint and (exc.sqlstate or "").startswith("53"):
        # Insufficient resources: "out of shared memory" alone reads like RAM; the hint names the setting.
        line += f" ({hint})"
    return line


#: SQLSTATEs that go away if the same work is tried again on a fresh
#: connection: serialization failure, deadlock, a lock not available, too many
#: connections, the server shutting down, crashing or starting, a session
#: ended for idling. Class 08 (connection exceptions) comes on top.
TRANSIENT_SQLSTATES = frozenset({"40001", "40P01", "55P03", "53300", "57P01", "57P02", "57P03", "57P05", "25P03"})


def is_transient(exc: BaseException) -> bool:
    """True for errors that go away if the same work is tried again later.

    A lost connection (no SQLSTATE: the client saw the socket go) and the
    SQLSTATEs above. Everything else fails at once, even where psycopg
    calls it operational: out of memory or of lock table space, disk full,
    a cancelled query (statement_timeout) would fail the same way on every
    try, and retrying each range for the whole retry timeout would stall a
    run for hours.
    """
    if not isinstance(exc, psycopg.Error):
        return False
    sqlstate = exc.sqlstate
    if sqlstate is not None:
        # by SQLSTATE whatever psycopg's class (25P03 is an InternalError)
        return sqlstate.startswith("08") or sqlstate in TRANSIENT_SQLSTATES
    return isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError))


def retrying(timeout: float = DEFAULT_RETRY_TIMEOUT) -> tenacity.Retrying:
    """A tenacity policy for transient database errors.

    Exponential backoff with full jitter (so a pool of workers does not
    reconnect in lockstep after a server restart), for ``timeout`` seconds
    from the first failure.
    """
    return tenacity.Retrying(
        retry=_retry_transient,
        wait=tenacity.wait_random_exponential(multiplier=0.1, max=5),
        stop=_StopAfterOutage(timeout),
        before_sleep=_log_retry,
        reraise=True,
    )


class _Outage:
    """When this process's database calls began to fail without one succeeding since (None: they succeed).

    One clock for every retry of the process: a heartbeat's retries, then
    the range's, then its give-back's must not each wait ``--retry-timeout``
    over again for a server that stays down.
    """

    since: float | None = None
    #: when a retry was last told as a warning: one a minute per outage, the others debug lines
    warned = float("-inf")


def outage_ended() -> None:
    """A database call succeeded: the next failure starts a new outage.

    Call it where a retried call returns from inside its attempt (tenacity
    then never sees the success).
    """
    _Outage.since = None
    _Outage.warned = float("-inf")  # the next outage is told at its first retry


def _retry_transient(state: tenacity.RetryCallState) -> bool:
    if state.outcome.failed and is_transient(state.outcome.exception()):
        return True
    outage_ended()  # an answer, even an error that is no outage (a lost range): the database is there
    return False


class _Stopping:
    """What tells this process it has been asked to stop (see give_up_retrying_once), and when it first
    heard so."""

    requested = None
    heard: float | None = None
    patience = 0.0


def give_up_retrying_once(requested, patience: float) -> None:
    """Make every retry loop of this process give up ``patience`` seconds after ``requested()`` turns
    true: a process told to stop does not wait out an outage (--retry-timeout is minutes) to give a
    range back or commit one; the range is free for the next claim once its session is gone."""
    _Stopping.requested, _Stopping.heard, _Stopping.patience = requested, None, patience


class _StopAfterOutage(tenacity.stop.stop_base):
    """Stop once failures have gone on for ``timeout`` seconds, counted from the first of the outage.

    Not from the first attempt's start (tenacity's ``stop_after_delay``): a
    range's work before its first failure (an hour of ``verify --hash``) is
    no outage, and a server restart late in it must be retried like any other.
    """

    def __init__(self, timeout: float):
        self.timeout = timeout

    def __call__(self, state: tenacity.RetryCallState) -> bool:
        if _Outage.since is None:
            _Outage.since = state.outcome_timestamp
        if _Stopping.requested is not None and _Stopping.requested():
            if _Stopping.heard is None:
                _Stopping.heard = state.outcome_timestamp
            if state.outcome_timestamp - _Stopping.heard >= _Stopping.patience:
                return True
        return state.outcome_timestamp - _Outage.since >= self.timeout


def outage_over_timeout(exc: BaseException) -> bool:
    """Whether ``exc`` ended a wait for the database that lasted the whole retry timeout (see _Outage)."""
    return _Outage.since is not None and is_transient(exc)


#: Seconds between two warnings of one process about a database it keeps retrying (the others: debug).
RETRY_WARNING_INTERVAL = 60.0


def _log_retry(state: tenacity.RetryCallState) -> None:
    # A five-minute outage would otherwise be a warning per retry per worker in the log.
    exc = state.outcome.exception() if state.outcome else None
    now = time.monotonic()
    level = logging.WARNING if now - _Outage.warned >= RETRY_WARNING_INTERVAL else logging.DEBUG
    if level == logging.WARNING:
        _Outage.warned = now
    log.log(level, "database error, retrying (attempt %d): %s", state.attempt_number,
            first_line(exc) if exc else "?")


def missing_ntt_tables(conn: psycopg.Connection) -> list[str]:
    """Names of the NTT base tables this database lacks."""
    rows = conn.execute(SQL_MISSING_TABLES, {"names": list(NTT_TABLES)}).fetchall()
    return [name for (name,) in rows]


# Schemas outside this session's search_path that hold a table of each of these names.
SQL_SCHEMAS_ELSEWHERE = """
SELECT n.nspname FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
WHERE c.relname = ANY(%(names)s::text[]) AND c.relkind IN ('r', 'p')
  AND n.nspname <> ALL(current_schemas(true))
GROUP BY n.nspname HAVING count(DISTINCT c.relname) = cardinality(%(names)s::text[])
ORDER BY 1
"""


SQL_SEARCH_PATH = "SELECT current_setting('search_path')"


def require_reachable_catalogue(conn: psycopg.Connection) -> None:
    """Refuse a session whose search_path misses the catalogue's tables where another schema has them
    (``migrate --base`` would make a second, empty catalogue)."""
    missing = missing_ntt_tables(conn)
    schemas = [s for (s,) in conn.execute(SQL_SCHEMAS_ELSEWHERE, {"names": missing})] if missing else []
    if schemas:
        path = conn.execute(SQL_SEARCH_PATH).fetchone()[0]
        raise UserError(
            f"the catalogue's tables ({', '.join(missing)}) are in schema {', '.join(schemas)}, which this "
            f"session's search_path ({path}) does not reach: add it (ALTER ROLE ... SET search_path, or "
            "options=-csearch_path=... in the DSN)")


def require_catalogue(conn: psycopg.Connection) -> None:
    """Refuse to work on a database that is not an NTT catalogue."""
    require_reachable_catalogue(conn)
    missing = missing_ntt_tables(conn)
    if missing:
        raise UserError(
            f"this database is not an NTT catalogue (missing tables: {', '.join(missing)}); "
            "point --db-url at the catalogue, or run `relinker migrate --base` to create one"
        )


def relkind(conn: psycopg.Connection, table: str) -> str | None:
    """pg_class.relkind of ``table`` ('r' plain, 'p' partitioned), None if absent."""
    row = conn.execute(
        "SELECT c.relkind FROM pg_class c WHERE c.oid = to_regclass(%s)", (table,)
    ).fetchone()
    return row[0] if row else None


def column_type(conn: psycopg.Connection, table: str, column: str) -> str | None:
    """The type of ``table.column`` (``bytea``, ``text``), ``table`` found as queries find it (search_path)."""
    row = conn.execute(
        """SELECT format_type(a.atttypid, NULL) FROM pg_attribute AS a
           WHERE a.attrelid = to_regclass(%s) AND a.attname = %s AND NOT a.attisdropped""",
        (table, column),
    ).fetchone()
    return row[0] if row else None
