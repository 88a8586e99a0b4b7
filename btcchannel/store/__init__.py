"""Durable state of both parties (SQLite, WAL, ``synchronous=FULL``).

Two stores live here, one per role; each is a single SQLite file created with
mode 0600 (it holds channel private keys) inside a directory created 0700.

``PayeeStore`` (the payee's ``payee.db``)
    One row per channel holding its parameters, the payee's channel key, the
    state, and the **best** payment only (no per-payment growth). A payment is
    written with one conditional ``UPDATE ... WHERE state='open' AND
    amount_sat < ?`` in autocommit mode, so the method returns only once the
    row is committed and fsynced: the HTTP service answers 200 after that.
    Every state change is a compare-and-set on the current state, so two
    service processes sharing one database never both close a channel: the
    close is claimed by ``claim_close`` (``UPDATE ... WHERE state='open'``),
    and only the process whose update hit the row builds and broadcasts.

``PayerStore`` (the payer's ``payer.db``)
    One row per channel with the payer's key, the parameters and the latest
    *signed* payment, written **before** it is sent (``save_signed``), plus
    the amount the payee has acknowledged. A crashed payer therefore never
    signs a lower amount than one it may already have handed out; on resume
    the client reconciles with ``GET /v1/channels/{id}``.

Entry points::

    PayeeStore(path: str | os.PathLike[str])
    PayerStore(path: str | os.PathLike[str])
    open_private_file(path) -> None           # create a 0600 file if missing

Amounts are integer satoshis; binary values (keys, signatures) are bytes.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, TypeVar

from btcchannel.errors import BadRequest, FundingMismatch, UnknownChannel

_Inputs = list[list[Any]]

__all__ = [
    "PayeeRecord",
    "PayeeStore",
    "PayerRecord",
    "PayerStore",
    "open_private_file",
    "FINAL_STATES",
]

#: channel states after which nothing more happens to a channel
FINAL_STATES = ("closed", "refunded", "failed")


def open_private_file(path: str | os.PathLike[str]) -> None:
    """Create ``path`` (and its directory, 0700) as an empty 0600 file if missing."""
    p = Path(path)
    if not p.parent.exists():
        p.parent.mkdir(parents=True, mode=0o700, exist_ok=True)
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o600)
    os.close(fd)
    os.chmod(p, 0o600)


def _connect(path: str | os.PathLike[str]) -> sqlite3.Connection:
    open_private_file(path)
    old = os.umask(0o077)  # the -wal / -shm files must not be readable by others either
    try:
        conn = sqlite3.connect(str(path), timeout=10.0, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=10000")
        conn.execute("PRAGMA foreign_keys=ON")
    finally:
        os.umask(old)
    return conn


# --------------------------------------------------------------------------- payee


@dataclass
class PayeeRecord:
    """One channel as the payee stores it."""

    channel_id: str
    state: str
    params: dict[str, Any]
    privkey: bytes
    deposit_sat: int
    expiry_height: int
    amount_sat: int = 0
    signature: bytes | None = None
    created_at: float = 0.0
    lapse_at: float | None = None
    funding_txid: str | None = None
    funding_vout: int | None = None
    confirmations: int = 0
    close_txid: str | None = None
    close_txids: list[str] = field(default_factory=list)
    close_fee_rate: float | None = None
    close_height: int | None = None
    close_claimed_at: float | None = None
    end_reason: str | None = None
    exception_txid: str | None = None
    max_units: int | None = None
    max_total_sat: int | None = None
    units: int = 0
    owed_sat: int = 0
    owed_since: float | None = None
    created_height: int = 0
    funding_inputs: list[list[Any]] = field(default_factory=list)
    updated_at: float = 0.0


_PAYEE_SCHEMA = """
CREATE TABLE IF NOT EXISTS channels (
    channel_id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    params TEXT NOT NULL,
    privkey BLOB NOT NULL,
    deposit_sat INTEGER NOT NULL,
    expiry_height INTEGER NOT NULL,
    amount_sat INTEGER NOT NULL DEFAULT 0,
    signature BLOB,
    created_at REAL NOT NULL,
    lapse_at REAL,
    funding_txid TEXT,
    funding_vout INTEGER,
    confirmations INTEGER NOT NULL DEFAULT 0,
    close_txid TEXT,
    close_txids TEXT NOT NULL DEFAULT '[]',
    close_fee_rate REAL,
    close_height INTEGER,
    close_claimed_at REAL,
    end_reason TEXT,
    exception_txid TEXT,
    max_units INTEGER,
    max_total_sat INTEGER,
    units INTEGER NOT NULL DEFAULT 0,
    owed_sat INTEGER NOT NULL DEFAULT 0,
    owed_since REAL,
    created_height INTEGER NOT NULL DEFAULT 0,
    funding_inputs TEXT NOT NULL DEFAULT '[]',
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS channels_state ON channels(state);
CREATE UNIQUE INDEX IF NOT EXISTS channels_funding ON channels(funding_txid, funding_vout)
    WHERE funding_txid IS NOT NULL;
"""


def _decode_row(row: sqlite3.Row, json_columns: tuple[str, ...]) -> dict[str, Any]:
    """A row as record fields: JSON columns parsed, key and signature as bytes."""
    d = dict(row)
    for name in json_columns:
        d[name] = json.loads(d[name])
    d["privkey"] = bytes(d["privkey"])
    if d["signature"] is not None:
        d["signature"] = bytes(d["signature"])
    return d


def _payee_from_row(row: sqlite3.Row) -> PayeeRecord:
    return PayeeRecord(**_decode_row(row, ("params", "close_txids", "funding_inputs")))


_D = TypeVar("_D", bound="_Database")


class _Database:
    """One private SQLite file with its schema applied."""

    SCHEMA: ClassVar[str] = ""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._db = _connect(self.path)
        self._db.executescript(self.SCHEMA)

    def close(self) -> None:
        """Close the database connection."""
        self._db.close()

    def _row(self, channel_id: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self._db.execute(
            "SELECT * FROM channels WHERE channel_id=?", (channel_id,)).fetchone()
        return row

    def __enter__(self: _D) -> _D:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PayeeStore(_Database):
    """The payee's channels: one row each, best payment only, CAS state changes."""

    SCHEMA = _PAYEE_SCHEMA

    # -- reads ---------------------------------------------------------------
    def get(self, channel_id: str) -> PayeeRecord:
        """The channel's row; ``UnknownChannel`` if there is none."""
        rec = self.find(channel_id)
        if rec is None:
            raise UnknownChannel(f"no channel {channel_id}")
        return rec

    def find(self, channel_id: str) -> PayeeRecord | None:
        """The channel's row or None."""
        row = self._row(channel_id)
        return None if row is None else _payee_from_row(row)

    def list(self, states: Iterable[str] | None = None) -> list[PayeeRecord]:
        """All channels, or those in one of ``states``, oldest first."""
        if states is None:
            rows = self._db.execute("SELECT * FROM channels ORDER BY created_at").fetchall()
        else:
            st = list(states)
            q = ",".join("?" * len(st))
            rows = self._db.execute(
                f"SELECT * FROM channels WHERE state IN ({q}) ORDER BY created_at", st
            ).fetchall()
        return [_payee_from_row(r) for r in rows]

    def count_proposals(self) -> int:
        """Number of channels still waiting for their funding transaction."""
        row = self._db.execute("SELECT COUNT(*) FROM channels WHERE state='proposed'").fetchone()
        return int(row[0])

    # -- writes (each one committed and fsynced before it returns) -------------
    def _update(self, sql: str, args: tuple[Any, ...]) -> bool:
        cur = self._db.execute(sql, args)
        return cur.rowcount == 1

    def insert_proposal(self, rec: PayeeRecord) -> None:
        """Store a new proposal (state ``proposed``)."""
        now = time.time()
        self._db.execute(
            "INSERT INTO channels (channel_id, state, params, privkey, deposit_sat, expiry_height, created_at,"
            " lapse_at, max_units, max_total_sat, created_height, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                rec.channel_id, "proposed", json.dumps(rec.params), rec.privkey, rec.deposit_sat,
                rec.expiry_height, rec.created_at or now, rec.lapse_at, rec.max_units, rec.max_total_sat,
                rec.created_height, now,
            ),
        )

    def set_funding(
        self, channel_id: str, txid: str, vout: int, confirmations: int,
        funding_inputs: _Inputs | None = None,
    ) -> bool:
        """``proposed`` -> ``funding`` with the funding outpoint; False if not proposed any more.

        ``funding_inputs`` ([txid, vout] pairs the funding transaction spends)
        let the watcher name the transaction that double-spent a funding.
        """
        try:
            return self._update(
                "UPDATE channels SET state='funding', funding_txid=?, funding_vout=?, confirmations=?,"
                " funding_inputs=?, lapse_at=NULL, updated_at=? WHERE channel_id=? AND state='proposed'",
                (txid, vout, confirmations, json.dumps(funding_inputs or []), time.time(), channel_id),
            )
        except sqlite3.IntegrityError as exc:
            raise FundingMismatch("this funding outpoint is already used by another channel") from exc

    def set_confirmations(self, channel_id: str, confirmations: int, open_now: bool) -> bool:
        """Record funding confirmations; with ``open_now`` also ``funding`` -> ``open``."""
        if open_now:
            return self._update(
                "UPDATE channels SET state='open', confirmations=?, updated_at=? WHERE channel_id=? AND state='funding'",
                (confirmations, time.time(), channel_id),
            )
        return self._update(
            "UPDATE channels SET confirmations=?, updated_at=? WHERE channel_id=?",
            (confirmations, time.time(), channel_id),
        )

    def record_payment(
        self,
        channel_id: str,
        amount_sat: int,
        signature: bytes,
        *,
        units_delta: int = 0,
        owed_sat: int | None = None,
    ) -> PayeeRecord | None:
        """Store a new best payment if the channel is open and it beats the stored one.

        ``owed_sat`` (metered postpay): the owed total this payment settles;
        the payment timer is cleared only if nothing more is owed by now.
        Returns the updated row, committed, or None (nothing written) if the
        row changed under us: the caller re-reads it and decides again.
        """
        if owed_sat is None:
            sql = ("UPDATE channels SET amount_sat=?, signature=?, units=units+?, updated_at=?"
                   " WHERE channel_id=? AND state='open' AND amount_sat<? RETURNING *")
            args: tuple[Any, ...] = (amount_sat, signature, units_delta, time.time(), channel_id, amount_sat)
        else:
            sql = ("UPDATE channels SET amount_sat=?, signature=?, units=units+?,"
                   " owed_since=CASE WHEN owed_sat<=? THEN NULL ELSE owed_since END,"
                   " updated_at=? WHERE channel_id=? AND state='open' AND amount_sat<? RETURNING *")
            args = (amount_sat, signature, units_delta, owed_sat, time.time(), channel_id, amount_sat)
        rows = self._db.execute(sql, args).fetchall()  # stepped to the end: committed and fsynced
        return _payee_from_row(rows[0]) if rows else None

    def record_credit(self, channel_id: str, expected_owed: int, new_owed: int, units_delta: int) -> bool:
        """Postpay: a unit served on credit (CAS on the owed total)."""
        return self._update(
            "UPDATE channels SET owed_sat=?, units=units+?, owed_since=COALESCE(owed_since, ?), updated_at=?"
            " WHERE channel_id=? AND state='open' AND owed_sat=?",
            (new_owed, units_delta, time.time(), time.time(), channel_id, expected_owed),
        )

    def claim_close(self, channel_id: str, reason: str) -> PayeeRecord | None:
        """Claim the right to close: ``open``/``funding`` -> ``closing``.

        Returns the row as of the claim (with the best payment to close with)
        to exactly one caller across all processes; None to everyone else.
        """
        now = time.time()
        self._db.execute("BEGIN IMMEDIATE")
        try:
            cur = self._db.execute(
                "UPDATE channels SET state='closing', end_reason=?, close_claimed_at=?, updated_at=?"
                " WHERE channel_id=? AND state IN ('open','funding')",
                (reason, now, now, channel_id),
            )
            if cur.rowcount != 1:
                self._db.execute("ROLLBACK")
                return None
            row = self._db.execute("SELECT * FROM channels WHERE channel_id=?", (channel_id,)).fetchone()
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        return _payee_from_row(row)

    def reclaim_stale_close(self, channel_id: str, older_than: float) -> bool:
        """Take over a ``closing`` claim that never got a close txid (its process died)."""
        now = time.time()
        return self._update(
            "UPDATE channels SET close_claimed_at=?, updated_at=? WHERE channel_id=? AND state='closing'"
            " AND close_txid IS NULL AND close_claimed_at<?",
            (now, now, channel_id, older_than),
        )

    def set_close_tx(
        self, channel_id: str, txid: str, fee_rate: float, height: int, previous_txid: str | None
    ) -> bool:
        """Record a broadcast close (or its RBF replacement), CAS on the previous close txid."""
        rec = self.get(channel_id)
        txids = rec.close_txids + ([txid] if txid not in rec.close_txids else [])
        return self._update(
            "UPDATE channels SET close_txid=?, close_txids=?, close_fee_rate=?, close_height=?, updated_at=?"
            " WHERE channel_id=? AND state='closing' AND close_txid IS ?",
            (txid, json.dumps(txids), fee_rate, height, time.time(), channel_id, previous_txid),
        )

    def mark_uneconomic(self, channel_id: str) -> bool:
        """A claimed close whose payments do not pay for its fee (``end_reason`` gains ``+close_uneconomic``)."""
        return self._update(
            "UPDATE channels SET end_reason=COALESCE(end_reason, '') || '+close_uneconomic', updated_at=?"
            " WHERE channel_id=? AND state='closing' AND close_txid IS NULL"
            " AND COALESCE(end_reason, '') NOT LIKE '%+close_uneconomic'",
            (time.time(), channel_id),
        )

    def mark_closed(self, channel_id: str, txid: str) -> bool:
        """``closing`` -> ``closed`` once ``txid`` (one of our closes) confirmed."""
        rec = self.get(channel_id)
        txids = rec.close_txids + ([txid] if txid not in rec.close_txids else [])
        return self._update(
            "UPDATE channels SET state='closed', close_txid=?, close_txids=?, updated_at=?"
            " WHERE channel_id=? AND state='closing'",
            (txid, json.dumps(txids), time.time(), channel_id),
        )

    def mark_exception(self, channel_id: str, state: str, txid: str | None, reason: str) -> bool:
        """An on-chain exception: the funding was spent by ``txid`` (not our close) or never existed."""
        if state not in ("refunded", "failed"):
            raise ValueError(state)
        return self._update(
            "UPDATE channels SET state=?, exception_txid=?, end_reason=?, updated_at=?"
            " WHERE channel_id=? AND state NOT IN ('closed','refunded','failed')",
            (state, txid, reason, time.time(), channel_id),
        )

    def lapse_proposals(self, now: float | None = None) -> int:
        """Unfunded proposals past their lapse time -> ``failed`` (reason ``lapsed``)."""
        t = time.time() if now is None else now
        cur = self._db.execute(
            "UPDATE channels SET state='failed', end_reason='lapsed', updated_at=?"
            " WHERE state='proposed' AND lapse_at IS NOT NULL AND lapse_at<?",
            (t, t),
        )
        return int(cur.rowcount)


# --------------------------------------------------------------------------- payer


@dataclass
class PayerRecord:
    """One channel as the payer stores it."""

    channel_id: str
    server_url: str
    state: str
    params: dict[str, Any]
    privkey: bytes
    deposit_sat: int
    expiry_height: int
    amount_sat: int = 0          # latest signed (stored before sending)
    signature: bytes | None = None
    acked_sat: int = 0           # latest the payee acknowledged
    funding_txid: str | None = None
    funding_vout: int | None = None
    close_txid: str | None = None
    refund_txid: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0


_PAYER_SCHEMA = """
CREATE TABLE IF NOT EXISTS channels (
    channel_id TEXT PRIMARY KEY,
    server_url TEXT NOT NULL,
    state TEXT NOT NULL,
    params TEXT NOT NULL,
    privkey BLOB NOT NULL,
    deposit_sat INTEGER NOT NULL,
    expiry_height INTEGER NOT NULL,
    amount_sat INTEGER NOT NULL DEFAULT 0,
    signature BLOB,
    acked_sat INTEGER NOT NULL DEFAULT 0,
    funding_txid TEXT,
    funding_vout INTEGER,
    close_txid TEXT,
    refund_txid TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
"""

_PAYER_FIELDS = (
    "channel_id", "server_url", "state", "params", "privkey", "deposit_sat", "expiry_height", "amount_sat",
    "signature", "acked_sat", "funding_txid", "funding_vout", "close_txid", "refund_txid", "created_at",
    "updated_at",
)


def _payer_from_row(row: sqlite3.Row) -> PayerRecord:
    return PayerRecord(**_decode_row(row, ("params",)))


class PayerStore(_Database):
    """The payer's channels; the signed state is saved before it is sent."""

    SCHEMA = _PAYER_SCHEMA

    def get(self, channel_id: str) -> PayerRecord:
        """The channel's row; ``UnknownChannel`` if there is none."""
        rec = self.find(channel_id)
        if rec is None:
            raise UnknownChannel(f"no channel {channel_id}")
        return rec

    def find(self, channel_id: str) -> PayerRecord | None:
        """The channel's row or None."""
        row = self._row(channel_id)
        return None if row is None else _payer_from_row(row)

    def list(self) -> list[PayerRecord]:
        """All channels, oldest first."""
        rows = self._db.execute("SELECT * FROM channels ORDER BY created_at").fetchall()
        return [_payer_from_row(r) for r in rows]

    def insert(self, rec: PayerRecord) -> None:
        """Store a new channel (before anything is funded)."""
        now = time.time()
        self._db.execute(
            "INSERT INTO channels (channel_id, server_url, state, params, privkey, deposit_sat, expiry_height,"
            " created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?)",
            (
                rec.channel_id, rec.server_url, rec.state, json.dumps(rec.params), rec.privkey, rec.deposit_sat,
                rec.expiry_height, rec.created_at or now, now,
            ),
        )

    def set_state(self, channel_id: str, state: str, **fields: Any) -> None:
        """Set the state and any of funding_txid/funding_vout/close_txid/refund_txid/params."""
        allowed = {"funding_txid", "funding_vout", "close_txid", "refund_txid", "params"}
        bad = set(fields) - allowed
        if bad:
            raise ValueError(f"unknown fields {sorted(bad)}")
        sets = ["state=?", "updated_at=?"]
        args: list[Any] = [state, time.time()]
        for k, v in fields.items():
            sets.append(f"{k}=?")
            args.append(json.dumps(v) if k == "params" else v)
        args.append(channel_id)
        cur = self._db.execute(f"UPDATE channels SET {', '.join(sets)} WHERE channel_id=?", args)
        if cur.rowcount != 1:
            raise UnknownChannel(f"no channel {channel_id}")

    def save_signed(self, channel_id: str, amount_sat: int, signature: bytes) -> bool:
        """Durably store a signed payment before it is sent; False unless it is higher than the stored one."""
        cur = self._db.execute(
            "UPDATE channels SET amount_sat=?, signature=?, updated_at=? WHERE channel_id=? AND amount_sat<?",
            (amount_sat, signature, time.time(), channel_id, amount_sat),
        )
        return cur.rowcount == 1

    def set_acked(self, channel_id: str, amount_sat: int) -> None:
        """Record the amount the payee acknowledged (never lowers it)."""
        self._db.execute(
            "UPDATE channels SET acked_sat=MAX(acked_sat, ?), updated_at=? WHERE channel_id=?",
            (amount_sat, time.time(), channel_id),
        )

    # -- backup ----------------------------------------------------------------
    def export_backup(self) -> dict[str, Any]:
        """Every channel (keys included) as a JSON-able dict; keep it as secret as the database."""
        out = []
        for rec in self.list():
            d = {k: getattr(rec, k) for k in _PAYER_FIELDS}
            d["privkey"] = rec.privkey.hex()
            d["signature"] = rec.signature.hex() if rec.signature is not None else None
            out.append(d)
        return {"version": 1, "kind": "btcchannel-payer-backup", "channels": out}

    def import_backup(self, data: dict[str, Any]) -> int:
        """Merge a backup: unknown channels are added, known ones keep the higher signed amount.

        Returns the number of channels added or raised.
        """
        if not isinstance(data, dict) or data.get("kind") != "btcchannel-payer-backup" or data.get("version") != 1:
            raise BadRequest("not a btcchannel payer backup")
        n = 0
        chans = data.get("channels")
        if not isinstance(chans, list):
            raise BadRequest("backup has no channel list")
        for d in chans:
            try:
                vals = {k: d[k] for k in _PAYER_FIELDS}
                vals["privkey"] = bytes.fromhex(vals["privkey"])
                vals["signature"] = bytes.fromhex(vals["signature"]) if vals["signature"] else None
                vals["params"] = json.dumps(vals["params"])
            except (KeyError, TypeError, ValueError) as exc:
                raise BadRequest(f"malformed backup entry: {exc}") from exc
            cols = ",".join(_PAYER_FIELDS)
            q = ",".join("?" * len(_PAYER_FIELDS))
            cur = self._db.execute(
                f"INSERT OR IGNORE INTO channels ({cols}) VALUES ({q})", [vals[k] for k in _PAYER_FIELDS]
            )
            if cur.rowcount == 1:
                n += 1
                continue
            cur = self._db.execute(
                "UPDATE channels SET amount_sat=?, signature=?, updated_at=? WHERE channel_id=? AND amount_sat<?",
                (vals["amount_sat"], vals["signature"], time.time(), vals["channel_id"], vals["amount_sat"]),
            )
            n += cur.rowcount
        return n
