"""The payee's store on PostgreSQL, for several payee instances sharing one database.

:class:`PgPayeeStore` is :class:`~btcchannel.store.payee.PayeeStore` with the
connection swapped: every query, compare-and-set and transition of the SQLite
store runs unchanged through :class:`PgConnection`, a psycopg 3 connection in
autocommit mode that speaks the small part of ``sqlite3`` the stores use
(``?`` placeholders, ``IS ?``, ``BEGIN IMMEDIATE``, booleans as 0/1). So the two
stores cannot drift apart in their rules: only the schema's dialect differs.

Schema versions are the SQLite store's, one for one (:data:`PG_MIGRATIONS` has
an entry for each of ``PayeeStore.MIGRATIONS``), recorded in the table
``btcchannel_schema``; migrations run under a transaction-level advisory lock,
so instances starting together migrate once. A database newer than the code is
refused with :class:`StoreSchemaError`.

Payments go through the same group-commit writer (its own connection and
thread): one transaction, one WAL flush (``synchronous_commit=on``) for all the
payments waiting at that moment, each acknowledged only after that commit.

Exactly one instance runs the watcher and the closer: :meth:`PgPayeeStore.try_lead`
takes a session-level advisory lock on a connection of its own, held until the
process (or that connection) dies, when PostgreSQL releases it and another
instance's next attempt takes it.

The lock alone does not fence an instance that lost it without noticing (its lock session was
terminated, a network blip, a pooler, ``idle_session_timeout``, a database restart): so taking
the lock also takes a new *leader epoch* (``btcchannel_leader``: one row, its number raised by
each new leader in the lock's own session), and every close compare-and-set of the store
(``record_close_intent``, ``set_close_tx``, ``reclaim_stale_close``) also requires that the
epoch is still this instance's (:meth:`PgPayeeStore._fence`). A stale leader's close
compare-and-set fails, so it records no close intent and broadcasts nothing;
:meth:`PgPayeeStore.still_leads` checks the lock's session (the lock still granted to it, the
epoch still its own) before each watcher step and each broadcast.

Entry points::

    PgPayeeStore(url)                      # postgresql://... ; migrates on open
    PgPayeeStore.try_lead() -> bool        # the leader lock (SQLite stores always lead)
    PgPayeeStore.still_leads() -> bool     # the lock's session alive, holding the lock, epoch current
    PgPayeeStore.epoch -> int | None       # the epoch this instance took with the lock
"""

from __future__ import annotations

import contextlib
import functools
import re
import sqlite3
from pathlib import Path
from typing import Any, Callable, Final, Sequence

import psycopg

from btcchannel.errors import StoreSchemaError
from btcchannel.store._db import Migration
from btcchannel.store._group import GroupWriter
from btcchannel.store._seed import PG_SEED_MIGRATION
from btcchannel.store.payee import PayeeStore

__all__ = ["PG_MIGRATIONS", "PgConnection", "PgPayeeStore"]

#: advisory lock keys (any 64-bit numbers, fixed for the project)
LEADER_KEY: Final = 0x6274_6363_6C65_6164  # "btccleader"
MIGRATE_KEY: Final = 0x6274_6363_6D69_6772  # "btccmigr"

_PG_V1: Migration = (
    """CREATE TABLE IF NOT EXISTS channels (
    channel_id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    params TEXT NOT NULL,
    privkey BYTEA NOT NULL,
    deposit_sat BIGINT NOT NULL,
    expiry_height BIGINT NOT NULL,
    amount_sat BIGINT NOT NULL DEFAULT 0,
    signature BYTEA,
    created_at DOUBLE PRECISION NOT NULL,
    lapse_at DOUBLE PRECISION,
    funding_txid TEXT,
    funding_vout BIGINT,
    confirmations BIGINT NOT NULL DEFAULT 0,
    close_txid TEXT,
    close_txids TEXT NOT NULL DEFAULT '[]',
    close_fee_rate DOUBLE PRECISION,
    close_height BIGINT,
    close_claimed_at DOUBLE PRECISION,
    end_reason TEXT,
    exception_txid TEXT,
    max_units BIGINT,
    max_total_sat BIGINT,
    units BIGINT NOT NULL DEFAULT 0,
    owed_sat BIGINT NOT NULL DEFAULT 0,
    owed_since DOUBLE PRECISION,
    created_height BIGINT NOT NULL DEFAULT 0,
    funding_inputs TEXT NOT NULL DEFAULT '[]',
    updated_at DOUBLE PRECISION NOT NULL
)""",
    "CREATE INDEX IF NOT EXISTS channels_state ON channels(state)",
    """CREATE UNIQUE INDEX IF NOT EXISTS channels_funding ON channels(funding_txid, funding_vout)
    WHERE funding_txid IS NOT NULL""",
)

_PG_V2_CLOSE_UNECONOMIC: Migration = (
    "ALTER TABLE channels ADD COLUMN close_uneconomic INTEGER NOT NULL DEFAULT 0 CHECK (close_uneconomic IN (0, 1))",
    "UPDATE channels SET close_uneconomic=1,"
    " end_reason=NULLIF(left(end_reason, length(end_reason) - length('+close_uneconomic')), '')"
    " WHERE right(end_reason, length('+close_uneconomic')) = '+close_uneconomic'",
)

_PG_V3_TERMS: Migration = (
    "ALTER TABLE channels ADD COLUMN terms TEXT",
    "ALTER TABLE channels ADD COLUMN payments BIGINT NOT NULL DEFAULT 0",
    "ALTER TABLE channels ADD COLUMN paid_at DOUBLE PRECISION",
    "ALTER TABLE channels ADD COLUMN request_counter BIGINT NOT NULL DEFAULT 0",
    "ALTER TABLE channels ADD COLUMN unit_credit BIGINT NOT NULL DEFAULT 0",
)

_PG_V4_CLOSE_INTENT: Migration = (
    "ALTER TABLE channels ADD COLUMN payout_script TEXT",
    "ALTER TABLE channels ADD COLUMN close_tx TEXT",
    "ALTER TABLE channels ADD COLUMN close_tx_txid TEXT",
)

_PG_V5_CHAIN_CURSOR: Migration = (
    "CREATE TABLE IF NOT EXISTS chain_cursor (id INTEGER PRIMARY KEY CHECK (id = 1),"
    " height BIGINT NOT NULL, hash TEXT NOT NULL)",
)

_PG_V6_PROPOSAL_CLIENT: Migration = (
    "ALTER TABLE channels ADD COLUMN client TEXT",
    "CREATE INDEX IF NOT EXISTS channels_unfunded ON channels(updated_at) WHERE funding_txid IS NULL",
)

_PG_V8_METERED_V2: Migration = (
    "ALTER TABLE channels ADD COLUMN last_request BYTEA",
    "ALTER TABLE channels ADD COLUMN payer_pubkey TEXT",
    "UPDATE channels SET payer_pubkey=(params::json)->>'payer_pubkey'",
    "CREATE INDEX IF NOT EXISTS channels_owing ON channels(state) WHERE owed_sat > amount_sat",
)

#: the leader lock's session notices a dead network within seconds (TCP keepalives, and at most
#: 10 s of unacknowledged data) instead of the kernel's defaults (minutes to hours): its next check
#: fails and the instance stops leading (ignored on a Unix socket)
LOCK_SESSION_PARAMS: Final[dict[str, Any]] = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 10_000,
    "connect_timeout": 10,
}

#: the leader epoch: one row, raised by each instance that takes the leader lock (outside the
#: versioned schema, like ``btcchannel_schema``: it holds no channel data)
_LEADER_TABLE: Final = (
    "CREATE TABLE IF NOT EXISTS btcchannel_leader (id INTEGER PRIMARY KEY CHECK (id = 1), epoch BIGINT NOT NULL)"
)

#: whether the lock's session holds the leader lock and the epoch is still ``?`` (the bigint key
#: of an advisory lock is its classid (high 32 bits) and objid (low 32 bits), objsubid 1)
_STILL_LEADS: Final = (
    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
    " AND granted AND objsubid = 1 AND classid::bigint = ? AND objid::bigint = ?)"
    " AND EXISTS (SELECT 1 FROM btcchannel_leader WHERE id = 1 AND epoch = ?) AS ok"
)

#: the SQLite store's migrations in PostgreSQL's dialect, same numbers, same meaning
PG_MIGRATIONS: Final[tuple[Migration, ...]] = (
    _PG_V1,
    _PG_V2_CLOSE_UNECONOMIC,
    _PG_V3_TERMS,
    _PG_V4_CLOSE_INTENT,
    _PG_V5_CHAIN_CURSOR,
    _PG_V6_PROPOSAL_CLIENT,
    PG_SEED_MIGRATION,
    _PG_V8_METERED_V2,
)


@functools.lru_cache(maxsize=512)
def _translate(sql: str) -> str:
    """SQLite's SQL as the stores write it, in PostgreSQL's (psycopg's placeholders).

    ``IS ?`` (SQLite's null-safe equality) becomes ``IS NOT DISTINCT FROM``; SQLite's
    two-argument scalar ``MAX(a, b)``, written in capitals by the stores, becomes ``GREATEST``
    (the aggregate is written ``max(...)`` in this module)."""
    if sql.startswith("BEGIN"):
        return "BEGIN"
    sql = sql.replace("%", "%%")
    sql = re.sub(r"\bIS \?", "IS NOT DISTINCT FROM ?", sql)
    sql = re.sub(r"\bMAX\(", "GREATEST(", sql)
    return sql.replace("?", "%s")


class Row(dict[str, Any]):
    """A result row read by column name or by position, like ``sqlite3.Row``."""

    def __init__(self, names: list[str], values: Sequence[Any]) -> None:
        super().__init__(zip(names, values))
        self._values = values

    def __getitem__(self, key: str | int) -> Any:
        return self._values[key] if isinstance(key, int) else super().__getitem__(key)


def _rows(cursor: psycopg.Cursor[Any]) -> Callable[[Sequence[Any]], Row]:
    names = [d.name for d in cursor.description or ()]
    return lambda values: Row(names, values)


def _arg(value: Any) -> Any:
    return int(value) if isinstance(value, bool) else value  # 0/1 columns, as in SQLite


class PgConnection:
    """A psycopg connection (autocommit, rows as :class:`Row`) with the ``sqlite3`` interface the stores use."""

    def __init__(self, url: str, **params: Any) -> None:
        """``params``: libpq connection parameters over the URL's (e.g. TCP keepalives)."""
        self._conn: psycopg.Connection[Row] = psycopg.connect(url, autocommit=True, row_factory=_rows, **params)

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> psycopg.Cursor[Row]:
        """Run one statement; an integrity violation raises ``sqlite3.IntegrityError`` like SQLite's."""
        try:
            return self._conn.execute(_translate(sql), [_arg(v) for v in parameters])
        except psycopg.IntegrityError as exc:
            raise sqlite3.IntegrityError(str(exc)) from exc

    @property
    def in_transaction(self) -> bool:
        return self._conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE

    def close(self) -> None:
        self._conn.close()


class PgPayeeStore(PayeeStore):
    """The payee's channels in PostgreSQL: the SQLite store's queries over :class:`PgConnection`."""

    MIGRATIONS = PG_MIGRATIONS

    def __init__(self, url: str) -> None:  # no super().__init__(): it opens SQLite files
        self.url = url
        self.path = Path("postgresql")  # for messages only; the URL may carry a password
        self._db = PgConnection(url)  # type: ignore[assignment]
        self._lead: PgConnection | None = None
        #: the leader epoch this instance took with the lock (None: it never led); kept when the
        #: lock is lost, so that the fenced compare-and-sets of a stale leader fail
        self.epoch: int | None = None
        self._leading = False
        try:
            self._migrate()
        except BaseException:
            self._db.close()
            raise

    @property
    def writer(self) -> GroupWriter:
        """The group-commit writer on a connection of its own."""
        if self._writer is None:
            self._writer = GroupWriter(PgConnection(self.url))
        return self._writer

    @property
    def schema_version(self) -> int:
        row = self._db.execute("SELECT max(version) AS v FROM btcchannel_schema").fetchone()
        return int(row["v"] or 0)

    def _migrate(self) -> None:
        db = self._db
        db.execute("BEGIN")
        try:
            db.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATE_KEY,))
            db.execute("CREATE TABLE IF NOT EXISTS btcchannel_schema (version INTEGER NOT NULL)")
            row = db.execute("SELECT max(version) AS v FROM btcchannel_schema").fetchone()
            current = int(row["v"] or 0)
            if current > self.latest_version():
                raise StoreSchemaError(
                    f"the PostgreSQL database has schema version {current}, newer than this btcchannel "
                    f"understands ({self.latest_version()}); upgrade btcchannel to open it"
                )
            for version in range(current + 1, self.latest_version() + 1):
                for sql in self.MIGRATIONS[version - 1]:
                    db.execute(sql)
                db.execute("INSERT INTO btcchannel_schema (version) VALUES (?)", (version,))
            db.execute(_LEADER_TABLE)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def try_lead(self) -> bool:
        """Take (or hold) the leader lock: True while this instance runs the watcher and closer.

        Taking it raises the leader epoch in the lock's session (:attr:`epoch`); holding it is
        checked with :meth:`still_leads`."""
        if self._leading:
            return self.still_leads()
        try:
            if self._lead is None:
                self._lead = PgConnection(self.url, **LOCK_SESSION_PARAMS)
            row = self._lead.execute("SELECT pg_try_advisory_lock(?) AS ok", (LEADER_KEY,)).fetchone()
            if row is None or not row["ok"]:
                return False
            row = self._lead.execute(
                "INSERT INTO btcchannel_leader (id, epoch) VALUES (1, 1)"
                " ON CONFLICT (id) DO UPDATE SET epoch = btcchannel_leader.epoch + 1 RETURNING epoch"
            ).fetchone()
            assert row is not None
            self.epoch, self._leading = int(row["epoch"]), True
            return True
        except psycopg.Error:
            self._drop_lead()
            return False

    def still_leads(self) -> bool:
        """Whether this instance still leads: its lock's session answers, holds the leader lock, and
        the epoch is still the one it took. False from the first failure on (the lock's connection
        is dropped; :meth:`try_lead` may take the lock again, with a new epoch)."""
        if not self._leading or self._lead is None or self.epoch is None:
            return False
        try:
            row = self._lead.execute(
                _STILL_LEADS, ((LEADER_KEY >> 32) & 0xFFFF_FFFF, LEADER_KEY & 0xFFFF_FFFF, self.epoch)
            ).fetchone()
            if row is not None and bool(row["ok"]):
                return True
        except psycopg.Error:
            pass
        self._drop_lead()
        return False

    def _drop_lead(self) -> None:
        self._leading = False
        if self._lead is not None:
            with contextlib.suppress(psycopg.Error):
                self._lead.close()
        self._lead = None

    def _fence(self) -> tuple[str, tuple[Any, ...]]:
        """Once this instance has led, its close compare-and-sets hold only while its epoch is the
        current one (a store that never led, e.g. an operator's tool, is not fenced)."""
        if self.epoch is None:
            return "", ()
        return " AND EXISTS (SELECT 1 FROM btcchannel_leader WHERE id = 1 AND epoch = ?)", (self.epoch,)

    def close(self) -> None:
        """Stop the writer, release the leader lock (its connection), close."""
        self._drop_lead()
        super().close()
