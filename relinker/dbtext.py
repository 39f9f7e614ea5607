"""Text in and out of a catalogue whose database is not in UTF-8.

Older NTT catalogues kept raw path bytes in ``text`` columns of a SQL_ASCII
database, where the driver hands back text as bytes; a catalogue in a
single-byte encoding (LATIN1) lacks most characters a message or a medium's
name may hold, and refuses JSON escapes of them. Every connection relinker
makes is adapted here (see :func:`adapt_to_encoding`), and what relinker
keeps as JSON is written, and compared, in the form such a database keeps.
"""

from __future__ import annotations

import json

import psycopg
from psycopg._encodings import pg2pyenc
from psycopg.adapt import Loader
from psycopg.pq import Format
from psycopg.types.string import StrDumperUnknown

#: The text types of the catalogue's columns and of relinker's own.
TEXT_TYPES = ("text", "varchar", "bpchar", "name", '"char"')


class _Utf8TextLoader(Loader):
    """Text of a SQL_ASCII database as str: UTF-8 where it is, its other bytes escaped."""

    def load(self, data) -> str:
        return bytes(data).decode("utf-8", "backslashreplace")


class _Utf8TextBinaryLoader(_Utf8TextLoader):
    format = Format.BINARY


class _EscapingStrDumper(StrDumperUnknown):
    """Text for a database whose encoding lacks some characters: those written as ``\\uXXXX`` (see storable)."""

    def __init__(self, cls: type, context=None):
        super().__init__(cls, context)
        self._codec = database_codec(self.connection)

    def dump(self, obj: str) -> bytes:
        if "\x00" in obj:
            raise psycopg.DataError("PostgreSQL text fields cannot contain NUL (0x00) bytes")
        return _as_kept(obj, self._codec).encode(self._encoding)


class _Utf8JsonLoader(Loader):
    """json and jsonb of a SQL_ASCII database: UTF-8 where it is, its other bytes escaped."""

    def load(self, data):
        return json.loads(bytes(data).decode("utf-8", "backslashreplace"))


def client_encoding(conn: psycopg.Connection) -> str:
    """The client encoding relinker's sessions use on ``conn``'s database, whatever the environment asks.

    UTF-8, which the server converts to and from the database's own; but
    SQL_ASCII for a SQL_ASCII database, which converts nothing, so that the
    bytes of its text columns come as they are.
    """
    return "SQL_ASCII" if _server_encoding(conn) == "SQL_ASCII" else "UTF8"


def _server_encoding(conn: psycopg.Connection) -> str:
    return conn.info.parameter_status("server_encoding") or "UTF8"


def database_codec(conn: psycopg.Connection | None) -> str | None:
    """The Python codec of the database's own encoding where it lacks characters (None: UTF-8, or
    SQL_ASCII, which keeps any bytes); an encoding Python does not know is taken as ASCII."""
    if conn is None:
        return None
    server = _server_encoding(conn)
    if server in ("UTF8", "SQL_ASCII"):
        return None
    try:
        return pg2pyenc(server.encode("ascii"))
    except Exception:  # psycopg's NotSupportedError, for an encoding Python has no codec of
        return "ascii"


def text_encoding(conn: psycopg.Connection | None) -> str:
    """The Python codec in which the database keeps text as bytes (SQL_ASCII's: UTF-8, as relinker writes)."""
    return database_codec(conn) or "utf-8"


def json_text(conn: psycopg.Connection, value) -> str:
    """``value`` as JSON text this connection's database takes into a jsonb column.

    A database not in UTF-8 refuses ``\\u`` escapes of characters its
    encoding lacks (and SQL_ASCII all non-ASCII ones): characters are
    written as they are, and those the encoding lacks as the str dumper
    writes them elsewhere (see :func:`storable`).
    """
    return json.dumps(storable(conn, value), ensure_ascii=False)


def storable(conn: psycopg.Connection | None, value):
    """``value`` (strings, in lists and dicts) as this connection's database keeps it: the characters its
    encoding lacks as ``\\uXXXX`` text, so that what is asked compares with what was kept."""
    codec = database_codec(conn)
    if codec is None:
        return value
    if isinstance(value, str):
        return _as_kept(value, codec)
    if isinstance(value, dict):
        return {storable(conn, key): storable(conn, item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [storable(conn, item) for item in value]
    return value


def _as_kept(text: str, codec: str | None) -> str:
    return text if codec is None else text.encode(codec, "backslashreplace").decode(codec)


def adapt_to_encoding(conn: psycopg.Connection) -> None:
    """Make text work on a catalogue whose database is not UTF-8, once the session's client encoding
    is :func:`client_encoding`'s.

    Older catalogues kept raw path bytes in ``text`` columns of a SQL_ASCII
    database, where psycopg returns text as bytes: relinker reads it as str.
    A database in an encoding such as LATIN1 cannot hold every character of
    a message naming a path (a problem's detail): those are escaped, not a
    range's failure.
    """
    server = _server_encoding(conn)
    if server == "SQL_ASCII":  # psycopg writes str as UTF-8 there already
        for name in TEXT_TYPES:
            conn.adapters.register_loader(name, _Utf8TextLoader)
            conn.adapters.register_loader(name, _Utf8TextBinaryLoader)
        for name in ("json", "jsonb"):
            conn.adapters.register_loader(name, _Utf8JsonLoader)
    elif server != "UTF8":
        conn.adapters.register_dumper(str, _EscapingStrDumper)
