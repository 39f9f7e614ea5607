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
    """Text for a database whose encoding lacks some characters: those written as ``\\uXXXX``."""

    def dump(self, obj: str) -> bytes:
        if "\x00" in obj:
            raise psycopg.DataError("PostgreSQL text fields cannot contain NUL (0x00) bytes")
        return obj.encode(self._encoding, "backslashreplace")


class _EncodedJsonLoader(Loader):
    """json and jsonb as a database in another encoding than UTF-8 sends them (the driver's assume UTF-8)."""

    def __init__(self, oid: int, context=None):
        super().__init__(oid, context)
        self._encoding = text_encoding(self.connection)

    def load(self, data):
        return json.loads(bytes(data).decode(self._encoding, "backslashreplace"))


def text_encoding(conn: psycopg.Connection | None) -> str:
    """The Python codec text is read and written in on ``conn`` (SQL_ASCII's bytes as UTF-8)."""
    encoding = conn.info.encoding if conn is not None else "utf-8"
    return "utf-8" if encoding == "ascii" else encoding


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
    encoding = text_encoding(conn)
    if encoding == "utf-8":
        return value
    if isinstance(value, str):
        return value.encode(encoding, "backslashreplace").decode(encoding)
    if isinstance(value, dict):
        return {storable(conn, key): storable(conn, item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [storable(conn, item) for item in value]
    return value


def adapt_to_encoding(conn: psycopg.Connection) -> None:
    """Make text work on a catalogue whose database is not UTF-8.

    Older catalogues kept raw path bytes in ``text`` columns of a SQL_ASCII
    database, where psycopg returns text as bytes: relinker reads it as str.
    A database in an encoding such as LATIN1 cannot hold every character of
    a message naming a path (a problem's detail): those are escaped, not a
    range's failure.
    """
    encoding = conn.info.encoding
    if encoding == "ascii":  # SQL_ASCII: psycopg already writes str as UTF-8
        for name in TEXT_TYPES:
            conn.adapters.register_loader(name, _Utf8TextLoader)
            conn.adapters.register_loader(name, _Utf8TextBinaryLoader)
    elif encoding != "utf-8":
        conn.adapters.register_dumper(str, _EscapingStrDumper)
    if encoding != "utf-8":
        for name in ("json", "jsonb"):
            conn.adapters.register_loader(name, _EncodedJsonLoader)
