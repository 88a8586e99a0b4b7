"""The SQLite file under both stores: private files, pragmas, schema versions.

Each store is one SQLite file created with mode 0600 (it holds channel
private keys) inside a directory created 0700, opened in autocommit mode with
WAL, ``synchronous=FULL`` and a busy timeout, so every single statement is
committed and fsynced when it returns.

The schema is versioned with ``PRAGMA user_version``. A store lists its
migrations in order (:attr:`Database.MIGRATIONS`); migration *n* brings the
file from version *n-1* to *n*, each in its own ``BEGIN IMMEDIATE``
transaction together with the new version number, so a crash or a second
process opening the same file never sees a half-migrated schema. Migration 1
is the schema as it was before versioning, written with ``IF NOT EXISTS``: an
unversioned file from that time (version 0 with its table present) is
recognised by its columns and adopted as version 1. A file newer than the
code is refused with :class:`StoreSchemaError`.

Entry points::

    open_private_file(path) -> None           # create a 0600 file (0700 directory) if missing
    connect(path) -> sqlite3.Connection       # the pragmas above, rows as sqlite3.Row
    class Database                            # base of PayeeStore / PayerStore
    Database.writer -> GroupWriter            # group commit (see _group), started on first use
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any, ClassVar, Mapping, TypeVar

import orjson

from btcchannel.errors import StoreSchemaError
from btcchannel.store._group import GroupWriter

__all__ = ["Database", "Migration", "StoreSchemaError", "connect", "open_private_file"]

#: one migration: SQL statements run in order inside one transaction
Migration = tuple[str, ...]

#: the table every store keeps its channels in
TABLE = "channels"


def open_private_file(path: str | os.PathLike[str]) -> None:
    """Create ``path`` (and its directory, 0700) as an empty 0600 file if missing.

    An existing file is only chmodded, never opened: closing any descriptor of a file drops
    all of this process's POSIX locks on it, SQLite's included, and another process could
    then take this process's connections for gone and delete the WAL they still write to.
    """
    p = Path(path)
    if not p.parent.exists():
        p.parent.mkdir(parents=True, mode=0o700, exist_ok=True)
    if not p.exists():
        try:
            fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        except FileExistsError:  # created meanwhile by another process
            pass
        else:
            os.close(fd)
    os.chmod(p, 0o600)


def connect(path: str | os.PathLike[str]) -> sqlite3.Connection:
    """Open (creating it private) the SQLite file at ``path``: autocommit, WAL, synchronous=FULL."""
    open_private_file(path)
    old = os.umask(0o077)  # the -wal / -shm files must not be readable by others either
    try:
        conn = sqlite3.connect(str(path), timeout=10.0, isolation_level=None, check_same_thread=False)
        try:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=10000")
            conn.execute("PRAGMA foreign_keys=ON")
        except BaseException:
            conn.close()
            raise
    finally:
        os.umask(old)
    return conn


def decode_row(row: sqlite3.Row | Mapping[str, Any], json_columns: tuple[str, ...]) -> dict[str, Any]:
    """A channel row as record fields: JSON columns parsed, key and signature as bytes."""
    d = dict(row)
    for name in json_columns:
        d[name] = orjson.loads(d[name])
    d["privkey"] = bytes(d["privkey"])
    if d["signature"] is not None:
        d["signature"] = bytes(d["signature"])
    return d


def _user_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def _columns(conn: sqlite3.Connection) -> list[str] | None:
    """The channel table's column names, or None if the file has no such table."""
    rows = conn.execute(f"PRAGMA table_info({TABLE})").fetchall()
    return [str(r[1]) for r in rows] or None


_D = TypeVar("_D", bound="Database")


class Database:
    """One private SQLite file, migrated to the latest schema version on open."""

    #: migration n (1-based) takes the file from version n-1 to n; never edit a released one
    MIGRATIONS: ClassVar[tuple[Migration, ...]] = ()

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._db = connect(self.path)
        try:
            self._migrate()
        except BaseException:
            self._db.close()
            raise

    @classmethod
    def latest_version(cls) -> int:
        """The schema version this code writes."""
        return len(cls.MIGRATIONS)

    @property
    def schema_version(self) -> int:
        """The file's schema version (``PRAGMA user_version``)."""
        return _user_version(self._db)

    _writer: GroupWriter | None = None

    @property
    def writer(self) -> GroupWriter:
        """The group-commit writer (its own connection and thread), started on first use."""
        if self._writer is None:
            self._writer = GroupWriter(connect(self.path))
        return self._writer

    def close(self) -> None:
        """Commit and stop the group writer if one was started, then close the connection."""
        if self._writer is not None:
            self._writer.close()
        self._db.close()

    def __enter__(self: _D) -> _D:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _row(self, channel_id: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self._db.execute(
            f"SELECT * FROM {TABLE} WHERE channel_id=?", (channel_id,)
        ).fetchone()
        return row

    # -- migrations --------------------------------------------------------------
    def _check_not_newer(self, version: int) -> None:
        if version > self.latest_version():
            raise StoreSchemaError(
                f"{self.path} has schema version {version}, newer than this btcchannel "
                f"understands ({self.latest_version()}); upgrade btcchannel to open it"
            )

    @classmethod
    def _version1_columns(cls) -> list[str]:
        """The columns migration 1 creates (read from a scratch in-memory database)."""
        scratch = sqlite3.connect(":memory:")
        try:
            for sql in cls.MIGRATIONS[0]:
                scratch.execute(sql)
            cols = _columns(scratch)
        finally:
            scratch.close()
        assert cols is not None
        return cols

    def _adopt_unversioned(self) -> None:
        """Version 0 with the table present: a file from before versioning, which must look like version 1."""
        cols = _columns(self._db)
        if cols is not None and set(cols) != set(self._version1_columns()):
            raise StoreSchemaError(
                f"{self.path} has no schema version and an unknown channel table layout; refusing to use it"
            )

    def _migrate(self) -> None:
        """Apply every missing migration, each in its own transaction with its version number."""
        self._check_not_newer(_user_version(self._db))
        for version in range(1, self.latest_version() + 1):
            if _user_version(self._db) >= version:
                continue
            self._db.execute("BEGIN IMMEDIATE")
            try:
                current = _user_version(self._db)  # another process may have migrated meanwhile
                self._check_not_newer(current)
                if current < version:
                    if version == 1:
                        self._adopt_unversioned()
                    for sql in self.MIGRATIONS[version - 1]:
                        self._db.execute(sql)
                    self._db.execute(f"PRAGMA user_version={int(version)}")
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
