"""The NTT catalogue's own conventions, which relinker follows where it writes.

Two of them are not visible in the schema's names:

- **The empty content** has one blob ID that is not the BLAKE3 of its bytes:
  the NTT copier named every empty file ``e3b0c442…b855`` (the SHA-256 of
  nothing, its ``EMPTY_FILE_HASH``) and stored an empty by-hash file under
  that name. relinker gives empty files the ID the catalogue already uses,
  and accepts an empty by-hash file under either empty ID as correct.
- **The status model** of ``inode`` (``status``, ``error_type``), where the
  catalogue has it: ``processed_at`` means "successfully processed", and the
  NTT tools select their work on ``status``. Older catalogues lack it.
"""

from __future__ import annotations

import dataclasses
import errno

import psycopg

#: The NTT copier's ID of the empty content (SHA-256 of nothing): the catalogue's most linked blob.
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
#: BLAKE3 of nothing: what relinker 0.1 named empty files.
EMPTY_BLAKE3 = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
#: Blob IDs that stand for the empty content, the one a catalogue prefers first.
EMPTY_BLOB_IDS = (EMPTY_SHA256, EMPTY_BLAKE3)

#: The largest value of the catalogue's bigint columns (a count, a limit, an ID).
BIGINT_MAX = 2**63 - 1

SQL_EMPTY_BLOBS_HELD = "SELECT blobid FROM blobs WHERE blobid = ANY(%s)"
SQL_COUNT_BLOBS = "SELECT count(*) FROM blobs"
SQL_INODE_COLUMNS = """
SELECT a.attname FROM pg_attribute AS a
WHERE a.attrelid = to_regclass('inode') AND a.attnum > 0 AND NOT a.attisdropped
"""

#: The status model's failures (its CHECK allows these, 'pending' and 'success').
FAILED_RETRYABLE, FAILED_PERMANENT = "failed_retryable", "failed_permanent"


def empty_blobid(conn: psycopg.Connection) -> str:
    """The blob ID this catalogue gives empty content.

    The one ``blobs`` already holds (the NTT copier's constant before
    relinker 0.1's BLAKE3 of nothing, should a catalogue hold both); the NTT
    copier's constant for a catalogue that holds neither yet. Two primary-key
    lookups: no scan of ``inode`` for its empty files.
    """
    held = {blobid for (blobid,) in conn.execute(SQL_EMPTY_BLOBS_HELD, (list(EMPTY_BLOB_IDS),))}
    return next((blobid for blobid in EMPTY_BLOB_IDS if blobid in held), EMPTY_SHA256)


def content_matches(blobid: str, digest: str, size: int) -> bool:
    """Whether content of ``size`` bytes hashing to ``digest`` (BLAKE3) is the content of ``blobid``."""
    return digest == blobid or (size == 0 and blobid in EMPTY_BLOB_IDS)


@dataclasses.dataclass(frozen=True)
class InodeColumns:
    """Which of the optional NTT columns this catalogue's ``inode`` has."""

    status: bool = False
    error_type: bool = False

    @classmethod
    def of(cls, conn: psycopg.Connection) -> "InodeColumns":
        names = {name for (name,) in conn.execute(SQL_INODE_COLUMNS)}
        return cls(status="status" in names, error_type="error_type" in names)


#: errno values of a source that is not there as catalogued while its medium is:
#: the medium no longer holds that file (ELOOP: a symlink where a file was, never followed).
GONE_FROM_MEDIUM = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP})
