"""The payer's durable state (``payer.db``): keys, parameters and the latest signed payment.

One row per channel with the payer's key, the parameters and the latest
*signed* payment, written **before** it is sent (``save_signed``), plus the
amount the payee has acknowledged. A crashed payer therefore never signs a
lower amount than one it may already have handed out; on resume the client
reconciles with ``GET /v1/channels/{id}``. The state is the payee's, as last
reported: the client steps each report through the transition table
(:mod:`btcchannel.payer.reported`) and records the result (``set_state``).

Entry points::

    PayerStore(path)                  # opens and migrates payer.db
    PayerStore.export_backup() / import_backup(data)
    PayerRecord                       # one row; state is a ChannelState

Schema versions: 1 is the unversioned schema of earlier releases; 2 adds the agreed ``terms``,
the metered ``units`` received and the number of signed ``payments``; 3 adds the seed (one per
payer datadir), its next key index and each channel's ``key_index`` (see :mod:`btcchannel.core.seed`);
4 adds ``request_counter``, the bound of the metered-request counters reserved (auth v2: every counter used
is at or below it, so a restart, which starts above it, or a clock stepped back never reuses or lowers
one; a restored backup resyncs from the payee's 401); 5 adds ``proposal_token`` (a stateless proposal's
token, sent with every funding report of the channel) and ``proposal_expires_at`` (when the payer stops
counting on that token: the payer's clock before it proposed, plus the payee's ``proposal_ttl_s``).

**One durable commit per paid request.** Counters are reserved in blocks (:data:`COUNTER_BLOCK`) and
handed out from memory below the stored bound, so most requests commit no counter; a payment that
finds its block running low extends it in the payment's own commit (``save_signed_async(...,
counter_floor=...)``). The units received (and the total the payee acknowledged with them) are
written at once but without waiting for the disk (``add_units``: no fsync): a killed process loses
nothing, an operating system crash may lose the last count, never raise it, and an under-count is
what the metered protocol recovers from (the payee's 402 for a unit it has no credit for is counted
as received).
A channel with a ``key_index`` has its key derived from the seed, and :meth:`PayerStore.restore_keys`
re-derives a lost key; the ``privkey`` column stays authoritative (older channels have random keys).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from btcchannel.core.keys import public_key
from btcchannel.core.seed import derive_channel_key
from btcchannel.core.state import ChannelState
from btcchannel.errors import BadRequest, UnknownChannel
from btcchannel.store._db import Database, Migration, decode_row
from btcchannel.store._seed import SEED_MIGRATION, SeedKeys

__all__ = ["PayerRecord", "PayerStore"]


@dataclass
class PayerRecord:
    """One channel as the payer stores it."""

    channel_id: str
    server_url: str
    state: ChannelState
    params: dict[str, Any]
    privkey: bytes
    deposit_sat: int
    expiry_height: int
    amount_sat: int = 0  # latest signed (stored before sending)
    signature: bytes | None = None
    acked_sat: int = 0  # latest the payee acknowledged
    funding_txid: str | None = None
    funding_vout: int | None = None
    close_txid: str | None = None
    refund_txid: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    #: the terms agreed at open (``Terms.to_json()``); None for a channel opened before terms
    terms: dict[str, Any] | None = None
    #: metered units received (served to us): with the agreed price, the most we ever sign
    units: int = 0
    #: how many payments we signed
    payments: int = 0
    #: the BIP32 index of the key under the datadir's seed; None for a random key (before seeds)
    key_index: int | None = None
    #: the last metered-request counter this payer used on the channel (auth v2: each is above it)
    request_counter: int = 0
    #: a stateless proposal's token (the payee stored nothing before the funding report that carries it)
    proposal_token: str | None = None
    #: when that token lapses, on the payer's clock (None: no token, or a payee that did not say its TTL)
    proposal_expires_at: float | None = None

    def __post_init__(self) -> None:
        self.state = ChannelState(self.state)


_V1: Migration = (
    """CREATE TABLE IF NOT EXISTS channels (
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
)""",
)

_V2_TERMS: Migration = (
    "ALTER TABLE channels ADD COLUMN terms TEXT",
    "ALTER TABLE channels ADD COLUMN units INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE channels ADD COLUMN payments INTEGER NOT NULL DEFAULT 0",
)

_V4_REQUEST_COUNTER: Migration = ("ALTER TABLE channels ADD COLUMN request_counter INTEGER NOT NULL DEFAULT 0",)

_V5_PROPOSAL_TOKEN: Migration = (
    "ALTER TABLE channels ADD COLUMN proposal_token TEXT",
    "ALTER TABLE channels ADD COLUMN proposal_expires_at REAL",
)

_PAYER_FIELDS = (
    "channel_id",
    "server_url",
    "state",
    "params",
    "privkey",
    "deposit_sat",
    "expiry_height",
    "amount_sat",
    "signature",
    "acked_sat",
    "funding_txid",
    "funding_vout",
    "close_txid",
    "refund_txid",
    "created_at",
    "updated_at",
)

_SET_STATE_FIELDS = frozenset({"funding_txid", "funding_vout", "close_txid", "refund_txid", "params"})


#: optional in a backup (written since schema version 2)
_PAYER_EXTRA = ("terms", "units", "payments", "key_index", "proposal_token", "proposal_expires_at")


def _payer_from_row(row: sqlite3.Row) -> PayerRecord:
    d = decode_row(row, ("params",))
    d["terms"] = json.loads(d["terms"]) if d.get("terms") is not None else None
    return PayerRecord(**d)


#: metered-request counters reserved per commit: 30 s of the microsecond clock (the counters' floor)
COUNTER_BLOCK = 30_000_000

#: the largest counter (auth v2: below 2^63)
_MAX_COUNTER = 2**63 - 1


class PayerStore(SeedKeys, Database):
    """The payer's channels; the signed state is saved before it is sent."""

    MIGRATIONS = (_V1, _V2_TERMS, SEED_MIGRATION, _V4_REQUEST_COUNTER, _V5_PROPOSAL_TOKEN)
    PUBKEY_FIELD = "payer_pubkey"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        #: per channel, (the last request counter handed out, the bound reserved in the store)
        self._counters: dict[str, tuple[int, int]] = {}
        super().__init__(path)

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
            " created_at, updated_at, terms, key_index, proposal_token, proposal_expires_at)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                rec.channel_id,
                rec.server_url,
                ChannelState(rec.state).value,
                json.dumps(rec.params),
                rec.privkey,
                rec.deposit_sat,
                rec.expiry_height,
                rec.created_at or now,
                now,
                json.dumps(rec.terms) if rec.terms is not None else None,
                rec.key_index,
                rec.proposal_token,
                rec.proposal_expires_at,
            ),
        )

    def delete(self, channel_id: str) -> bool:
        """Remove a channel's row (the caller decides that it holds nothing); whether one was removed."""
        self._counters.pop(channel_id, None)
        return self._db.execute("DELETE FROM channels WHERE channel_id=?", (channel_id,)).rowcount == 1

    def set_state(self, channel_id: str, state: ChannelState | str, **fields: Any) -> None:
        """Set the state and any of funding_txid/funding_vout/close_txid/refund_txid/params."""
        bad = set(fields) - _SET_STATE_FIELDS
        if bad:
            raise ValueError(f"unknown fields {sorted(bad)}")
        sets = ["state=?", "updated_at=?"]
        args: list[Any] = [ChannelState(state).value, time.time()]
        for k, v in fields.items():
            sets.append(f"{k}=?")
            args.append(json.dumps(v) if k == "params" else v)
        args.append(channel_id)
        cur = self._db.execute(f"UPDATE channels SET {', '.join(sets)} WHERE channel_id=?", args)
        if cur.rowcount != 1:
            raise UnknownChannel(f"no channel {channel_id}")

    @staticmethod
    def _signed_sql(
        channel_id: str, amount_sat: int, signature: bytes, counter_bound: int
    ) -> tuple[str, tuple[Any, ...]]:
        return (
            "UPDATE channels SET amount_sat=?, signature=?, payments=payments+1,"
            " request_counter=MAX(request_counter, ?), updated_at=?"
            " WHERE channel_id=? AND amount_sat<? RETURNING request_counter",
            (amount_sat, signature, counter_bound, time.time(), channel_id, amount_sat),
        )

    def save_signed(self, channel_id: str, amount_sat: int, signature: bytes) -> bool:
        """Durably store a signed payment before it is sent; False unless it is higher than the stored one."""
        return bool(self._db.execute(*self._signed_sql(channel_id, amount_sat, signature, 0)).fetchall())

    def add_units(self, channel_id: str, units: int, acked_sat: int | None = None) -> None:
        """Record ``units`` more metered units received (and the total the payee acknowledged with them).

        Written at once without waiting for the disk (``synchronous=NORMAL`` for this statement, so no
        fsync on the event loop): it survives the process being killed; an operating system crash may
        lose it (an under-count: the payer signs less, and the protocol recovers the count), never raise it."""
        self._db.execute("PRAGMA synchronous=NORMAL")
        try:
            self._db.execute(
                "UPDATE channels SET units=units+?, acked_sat=MAX(acked_sat, ?), updated_at=? WHERE channel_id=?",
                (units, acked_sat or 0, time.time(), channel_id),
            )
        finally:
            self._db.execute("PRAGMA synchronous=FULL")

    def set_acked(self, channel_id: str, amount_sat: int) -> None:
        """Record the amount the payee acknowledged (never lowers it)."""
        self._db.execute(
            "UPDATE channels SET acked_sat=MAX(acked_sat, ?), updated_at=? WHERE channel_id=?",
            (amount_sat, time.time(), channel_id),
        )

    async def save_signed_async(
        self, channel_id: str, amount_sat: int, signature: bytes, *, counter_floor: int | None = None
    ) -> bool:
        """:meth:`save_signed` through the group commit: True once committed, False if not higher.

        With ``counter_floor`` (the clock, the floor of the next counters) the same commit also extends
        the channel's reserved request counters when fewer than half a block is left, so the request
        that carries this payment commits nothing else."""
        bound = 0
        held = self._counters.get(channel_id) if counter_floor is not None else None
        if held is not None and counter_floor is not None:
            last, reserved = held
            if max(last + 1, counter_floor) + COUNTER_BLOCK // 2 > reserved:
                bound = min(max(last + 1, counter_floor) + COUNTER_BLOCK, _MAX_COUNTER)
        rows = await self.writer.submit(*self._signed_sql(channel_id, amount_sat, signature, bound))
        if rows and bound and int(rows[0]["request_counter"]) == bound:
            held = self._counters.get(channel_id)
            if held is not None:  # (not dropped by a resync meanwhile) the block now ends at ``bound``
                self._counters[channel_id] = (held[0], max(held[1], bound))
        return bool(rows)

    @staticmethod
    def _reserve_sql(channel_id: str, at_least: int) -> tuple[str, tuple[Any, ...]]:
        return (
            "UPDATE channels SET request_counter=MIN(MAX(request_counter + 1, ?) + ?, ?), updated_at=?"
            " WHERE channel_id=? AND request_counter < ? RETURNING request_counter",
            (at_least, COUNTER_BLOCK, _MAX_COUNTER, time.time(), channel_id, _MAX_COUNTER),
        )

    def _hand_out(self, channel_id: str, at_least: int) -> int | None:
        """The next counter from the reserved block, or None if it needs a new block."""
        counters = self._counters
        held = counters.get(channel_id)
        if held is None:
            return None
        last, reserved = held
        counter = max(last + 1, at_least)
        if counter > reserved:
            return None
        counters[channel_id] = (counter, reserved)
        return counter

    def _new_block(
        self, channel_id: str, at_least: int, rows: Sequence[Any], bound_of: Callable[[Any], Any]
    ) -> int | None:
        """Take the block a reserve statement stored (its new bound in ``rows``): the next counter, or
        None if counters handed out meanwhile are already past it."""
        if not rows:
            raise UnknownChannel(f"no channel {channel_id} (or its request counter is exhausted)")
        bound = int(bound_of(rows[0]))
        counter = max(at_least, bound - COUNTER_BLOCK)  # max(stored before + 1, at_least): above every one used
        held = self._counters.get(channel_id)
        if held is not None:  # another task took a block meanwhile: stay above what it handed out
            counter, bound = max(counter, held[0] + 1), max(bound, held[1])
        if counter > bound:
            return None
        self._counters[channel_id] = (counter, bound)
        return counter

    def next_request_counter(self, channel_id: str, at_least: int) -> int:
        """Take the channel's next metered-request counter, ``max(last + 1, at_least)``: handed out from
        the block reserved in the store (durable before any counter of it is used), a new block
        reserved when it runs out. No counter is used twice, across restarts (which start above the
        stored bound) and clock steps."""
        while True:
            counter = self._hand_out(channel_id, at_least)
            if counter is None:
                rows = self._db.execute(*self._reserve_sql(channel_id, at_least)).fetchall()
                counter = self._new_block(channel_id, at_least, rows, lambda r: r[0])
            if counter is not None:
                return counter

    async def next_request_counter_async(self, channel_id: str, at_least: int) -> int:
        """:meth:`next_request_counter`, a new block reserved through the group commit."""
        while True:
            counter = self._hand_out(channel_id, at_least)
            if counter is None:
                rows = await self.writer.submit(*self._reserve_sql(channel_id, at_least))
                counter = self._new_block(channel_id, at_least, rows, lambda r: r["request_counter"])
            if counter is not None:
                return counter

    def last_request_counter(self, channel_id: str) -> int:
        """The last counter handed out on the channel (after a restart: the stored bound, which is
        at or above every counter used before)."""
        held = self._counters.get(channel_id)
        return held[0] if held is not None else self.get(channel_id).request_counter

    def raise_request_counter(self, channel_id: str, at_least: int) -> None:
        """Resync: the payee accepted ``at_least`` already (a counter lost with an older copy of this
        store): the next counter is above it."""
        self._db.execute(
            "UPDATE channels SET request_counter=MAX(request_counter, ?), updated_at=? WHERE channel_id=?",
            (at_least, time.time(), channel_id),
        )
        held = self._counters.get(channel_id)
        if held is not None:
            last, reserved = held
            if at_least >= reserved:
                del self._counters[channel_id]
            else:
                self._counters[channel_id] = (max(last, at_least), reserved)

    async def set_acked_async(self, channel_id: str, amount_sat: int) -> None:
        """:meth:`set_acked` through the group commit (returns once committed)."""
        await self.writer.submit(
            "UPDATE channels SET acked_sat=MAX(acked_sat, ?), updated_at=? WHERE channel_id=?",
            (amount_sat, time.time(), channel_id),
        )

    # -- backup ----------------------------------------------------------------
    def export_backup(self, keys: bool = True) -> dict[str, Any]:
        """Every channel (keys included) as a JSON-able dict; keep it as secret as the database.

        With ``keys=False`` a channel whose key derives from the seed (``key_index``) is written
        without it (``"privkey": null``): importing it needs the seed (:meth:`restore_seed`).
        """
        out = []
        for rec in self.list():
            d = {k: getattr(rec, k) for k in _PAYER_FIELDS + _PAYER_EXTRA}
            d["state"] = rec.state.value
            d["privkey"] = None if not keys and rec.key_index is not None else rec.privkey.hex()
            d["signature"] = rec.signature.hex() if rec.signature is not None else None
            out.append(d)
        return {"version": 1, "kind": "btcchannel-payer-backup", "channels": out}

    def import_backup(self, data: dict[str, Any]) -> int:
        """Merge a backup: unknown channels are added, known ones keep the higher signed amount.

        Returns the number of channels added or raised.
        """
        if not isinstance(data, dict) or data.get("kind") != "btcchannel-payer-backup" or data.get("version") != 1:
            raise BadRequest("not a btcchannel payer backup")
        chans = data.get("channels")
        if not isinstance(chans, list):
            raise BadRequest("backup has no channel list")
        entries = [self._import_entry(d) for d in chans]  # all checked before anything is written
        n = 0
        for vals in entries:
            names = _PAYER_FIELDS + _PAYER_EXTRA
            cols = ",".join(names)
            q = ",".join("?" * len(names))
            cur = self._db.execute(f"INSERT OR IGNORE INTO channels ({cols}) VALUES ({q})", [vals[k] for k in names])
            if cur.rowcount == 1:
                n += 1
                continue
            cur = self._db.execute(
                "UPDATE channels SET amount_sat=?, signature=?, updated_at=? WHERE channel_id=? AND amount_sat<?",
                (vals["amount_sat"], vals["signature"], time.time(), vals["channel_id"], vals["amount_sat"]),
            )
            n += cur.rowcount
            self._db.execute(
                "UPDATE channels SET privkey=? WHERE channel_id=? AND length(privkey)=0",
                (vals["privkey"], vals["channel_id"]),
            )  # a key this row lost
        self.restore_keys()
        return n

    def _import_entry(self, d: Any) -> dict[str, Any]:
        """One backup entry as column values; a missing key is derived from this store's seed.

        An entry's ``key_index`` is kept only if this store's seed derives its key there (another
        datadir's index means nothing here); a keyless entry whose key the seed does not derive,
        or whose index another channel holds, is refused (``BadRequest``).
        """
        try:
            vals = {k: d[k] for k in _PAYER_FIELDS}
            vals["state"] = ChannelState(vals["state"]).value
            vals["privkey"] = bytes.fromhex(vals["privkey"]) if vals["privkey"] is not None else None
            vals["signature"] = bytes.fromhex(vals["signature"]) if vals["signature"] else None
            pubkey = vals["params"].get("payer_pubkey") if isinstance(vals["params"], dict) else None
            vals["params"] = json.dumps(vals["params"])
            extra = {k: d.get(k) for k in _PAYER_EXTRA}
            vals["terms"] = json.dumps(extra["terms"]) if extra["terms"] is not None else None
            vals["units"] = int(extra["units"] or 0)
            vals["payments"] = int(extra["payments"] or 0)
            index = int(extra["key_index"]) if extra["key_index"] is not None else None
            token = extra["proposal_token"]
            vals["proposal_token"] = str(token) if token is not None else None
            expires = extra["proposal_expires_at"]
            vals["proposal_expires_at"] = float(expires) if expires is not None else None
        except (KeyError, TypeError, ValueError) as exc:
            raise BadRequest(f"malformed backup entry: {exc}") from exc
        derived = None
        if index is not None and self.has_seed():
            derived = derive_channel_key(self.seed(), index)
            if public_key(derived).hex() != pubkey:
                derived = None
        if vals["privkey"] is None:
            if derived is None:
                raise BadRequest(
                    f"channel {vals['channel_id']} has no key in the backup and this datadir's seed"
                    " does not derive it: restore its seed first (`seed restore`)"
                )
            vals["privkey"] = derived
        vals["key_index"] = index if derived is not None else None
        taken = self._db.execute(
            "SELECT channel_id FROM channels WHERE key_index=? AND channel_id<>?",
            (vals["key_index"], vals["channel_id"]),
        ).fetchone()
        if taken is not None:
            raise BadRequest(f"key index {vals['key_index']} already belongs to channel {taken[0]}")
        return vals
