"""The payee's durable state (``payee.db``): one row per channel, best payment only.

A row holds the channel's parameters, the payee's channel key, the state and
the **best** payment only (no per-payment growth). A payment is written with
one conditional ``UPDATE ... WHERE state IN (open) AND amount_sat < ?`` in
autocommit mode, so the method returns only once the row is committed and
fsynced: the HTTP service answers 200 after that.

The store decides no state change: the core's machine does
(:class:`~btcchannel.core.state.PayeeLifecycle`, or the channel's
:class:`~btcchannel.core.channel.PayeeChannel`), and the store persists exactly the
:class:`~btcchannel.core.state.Transition` record it emits (:meth:`PayeeStore.apply`): a
compare-and-set ``UPDATE ... SET state=<new> ... WHERE channel_id=? AND state=<old>``, both states
the record's, which only an edge of the core's table makes. A lost compare-and-set (the row moved
on) is decided again on the row read afresh (:meth:`PayeeStore.fire` asks the caller's decision
again), so two service processes sharing one database never both close a channel: the close is
claimed by ``claim_close`` (the ``closing`` event), and only the process whose update hit the row
builds and broadcasts. The named writes (``set_funding``, ``claim_close``, ``mark_closed``...)
are each one event of the core's lifecycle fired through :meth:`PayeeStore.fire`.

Entry points::

    PayeeStore(path)                                   # opens and migrates payee.db
    PayeeStore.apply(transition) -> PayeeRecord | None # persist one record of the core's
    PayeeStore.fire(channel_id, decide) -> PayeeRecord | None  # decide on the row, apply, re-decide
    PayeeStore.insert_funded(rec) -> PayeeRecord       # a stateless proposal's row, at its funding
    PayeeRecord                                        # one row; state is a ChannelState

A stateless proposal (see :meth:`btcchannel.payee.service.PayeeService.propose`) has no row until
its first funding report: :meth:`PayeeStore.insert_funded` writes it directly in ``funding`` or
``open`` (``INSERT ... ON CONFLICT DO NOTHING``, then read back: instances racing one report write
it once). Its key has no ``key_index``: it derives from the seed and the channel id, and
:meth:`PayeeStore.restore_keys` derives it again when it was lost.

Schema versions (the migrations are in :mod:`btcchannel.store._payee_schema`): 1 is the unversioned schema of earlier
releases; 2 turns the
``+close_uneconomic`` suffix of ``end_reason`` into the boolean column
``close_uneconomic``; 3 adds the agreed ``terms`` (JSON, NULL for older channels), the number
of stored ``payments``, ``paid_at`` (the time of the last one) and ``request_counter`` (the last
authenticated metered request's) and ``unit_credit`` (prepaid units not served); 4 adds
``payout_script`` (fixed per channel when it is proposed) and ``close_tx``/``close_tx_txid`` (the
close, recorded before its broadcast); 5 adds the ``chain_cursor`` table (the last block the watcher
processed); 6 adds ``client`` (who proposed the channel, for the per-client proposal cap); 7 adds the
seed, its next key index and each channel's ``key_index`` (:mod:`btcchannel.store._seed`); 8 adds
``last_request`` (the idempotency key of the last charged metered request) and ``payer_pubkey`` (a
column, for the cross-channel credit caps). Since 8, ``unit_credit`` is no longer written: a prepaid
total above what was served (``amount_sat - price * units``) is the credit, whatever carried it.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Final, Generator, Iterable, Mapping, Sequence

import orjson

from btcchannel.core.keys import public_key
from btcchannel.core.seed import derive_stateless_key
from btcchannel.core.state import ChannelEvent, ChannelState, PayeeLifecycle, Transition, sources
from btcchannel.core.tx import OutPoint
from btcchannel.errors import BadRequest, FundingMismatch, IllegalTransition, UnknownChannel
from btcchannel.store._db import Database, decode_row
from btcchannel.store._group import AfterCommit
from btcchannel.store._payee_schema import MIGRATIONS as _MIGRATIONS
from btcchannel.store._seed import SeedKeys

__all__ = ["CLOSE_UNECONOMIC_SUFFIX", "PayeeRecord", "PayeeStore"]

_Inputs = list[list[Any]]
_Args = list[Any]
_Applied = list["PayeeRecord | None"]
_S = ChannelState

#: how ``end_reason`` reported an uneconomic close before it became a column (and still does on the wire)
CLOSE_UNECONOMIC_SUFFIX: Final = "+close_uneconomic"


@dataclass
class PayeeRecord:
    """One channel as the payee stores it."""

    channel_id: str
    state: ChannelState
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
    #: a claimed close whose payments do not pay for its fee: nothing is broadcast, the payer refunds
    close_uneconomic: bool = False
    #: the agreed terms (``Terms.to_json()``); None for a channel proposed before terms were stored
    terms: dict[str, Any] | None = None
    #: how many payments were stored (an agreed end condition may count them)
    payments: int = 0
    #: when the last payment was stored, or a unit served from the prepaid surplus (the prepay idle timer runs from it)
    paid_at: float | None = None
    #: the highest metered-request counter the payer authenticated (each must be above it)
    request_counter: int = 0
    #: prepaid units whose handler failed: credited to the next requests
    unit_credit: int = 0
    #: where this channel's close pays the payee (hex script), fixed when the channel is proposed
    payout_script: str | None = None
    #: the last close built (raw hex) and its txid, recorded *before* it is broadcast; once the
    #: broadcast is recorded too, ``close_txid`` equals ``close_tx_txid``
    close_tx: str | None = None
    close_tx_txid: str | None = None
    #: who proposed the channel (the client's network address), for the per-client proposal cap
    client: str | None = None
    #: the key's BIP32 index under the datadir's seed; None: a stateless proposal's key (derived from the
    #: seed and the channel id, no index used) or, for a channel from before seeds, a random key
    key_index: int | None = None
    #: the idempotency key of the last charged metered request (its exact retry is served, not charged)
    last_request: bytes | None = None
    #: the payer's channel key (hex), a column of its own for the cross-channel credit caps
    payer_pubkey: str | None = None

    def __post_init__(self) -> None:
        self.state = ChannelState(self.state)
        self.close_uneconomic = bool(self.close_uneconomic)

    @property
    def wire_end_reason(self) -> str | None:
        """``end_reason`` as the protocol reports it: with the ``+close_uneconomic`` suffix when flagged."""
        if not self.close_uneconomic:
            return self.end_reason
        return (self.end_reason or "") + CLOSE_UNECONOMIC_SUFFIX


# ------------------------------------------------------------------ transitions

#: a decision on a channel: the core's record of the event to fire on it, given its lifecycle and its
#: row (IllegalTransition: nothing to do in that state)
Decide = Callable[[PayeeLifecycle, "PayeeRecord"], Transition]

#: a lost compare-and-set is decided again on the row read afresh at most this many times
_FIRE_ATTEMPTS: Final = 5

#: what an event needs of the row besides its state (not a state list: the state is the record's)
_GUARDS: Final[Mapping[ChannelEvent, str]] = {
    ChannelEvent.CLOSE_UNECONOMIC: " AND close_txid IS NULL AND close_uneconomic=0",
}


def _marks(values: Iterable[object]) -> str:
    return ",".join("?" for _ in values)


#: columns :meth:`PayeeStore.transition` may set along with the state
_TRANSITION_FIELDS: Final = frozenset(
    {
        "funding_txid",
        "funding_vout",
        "confirmations",
        "funding_inputs",
        "lapse_at",
        "end_reason",
        "close_claimed_at",
        "close_txid",
        "close_txids",
        "exception_txid",
        "close_uneconomic",
    }
)
_JSON_FIELDS: Final = frozenset({"funding_inputs", "close_txids"})
_PAYEE_JSON = ("params", "close_txids", "funding_inputs")


def _payee_from_row(row: sqlite3.Row | Mapping[str, Any]) -> PayeeRecord:
    d = decode_row(row, _PAYEE_JSON)
    d["terms"] = json.loads(d["terms"]) if d.get("terms") is not None else None
    return PayeeRecord(**d)


# ------------------------------------------------------------------ the store


class PayeeStore(SeedKeys, Database):
    """The payee's channels: one row each, best payment only, CAS state changes from the core's table."""

    MIGRATIONS, PUBKEY_FIELD = _MIGRATIONS, "payee_pubkey"
    #: per channel: the raw ``params`` and ``terms`` last committed, and their parsed values
    _parsed: dict[str, tuple[Any, Any, Any, Any]]

    #: a second durable copy of every stored payment, written before the payment is acknowledged
    #: (the payee's synchronous backup); the group-commit writer calls it as its ``after_commit``
    payment_mirror: AfterCommit | None = None
    #: called before an answer acknowledges a payment stored earlier without writing it again (an
    #: exact retry): the synchronous backup catches up there if one of its writes failed
    payment_barrier: Callable[[], None] | None = None

    def try_lead(self) -> bool:
        """Whether this process runs the watcher and closer: always, on SQLite (see ``PgPayeeStore``)."""
        return True

    def still_leads(self) -> bool:
        """Whether this process still holds the leadership it took with :meth:`try_lead`: always, on
        SQLite (one file, one payee); on PostgreSQL a check of the lock's own session."""
        return True

    def _fence(self) -> tuple[str, tuple[Any, ...]]:
        """The condition (SQL appended to a close's compare-and-set, and its arguments) that holds only
        while this process's leadership is the current one: none on SQLite (see ``PgPayeeStore``)."""
        return "", ()

    def restore_keys(self) -> int:
        """:meth:`SeedKeys.restore_keys`, and also the lost keys of stateless channels (no
        ``key_index``): each derived from the seed and its channel id, kept only if it matches the
        channel's stored public key (a lost random key of an older channel stays lost)."""
        restored = super().restore_keys()
        rows = self._db.execute(
            "SELECT channel_id, params FROM channels WHERE key_index IS NULL AND length(privkey)=0"
        ).fetchall()
        if not rows or not self.has_seed():
            return restored
        seed = self.seed()
        for row in rows:
            cid = str(row["channel_id"])
            try:
                privkey = derive_stateless_key(seed, cid)
            except BadRequest:
                continue
            if public_key(privkey).hex() != json.loads(row["params"]).get(self.PUBKEY_FIELD):
                continue
            self._db.execute(
                "UPDATE channels SET privkey=?, updated_at=? WHERE channel_id=? AND length(privkey)=0",
                (privkey, time.time(), cid),
            )
            restored += 1
        return restored

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

    def list(self, states: Iterable[ChannelState | str] | None = None) -> list[PayeeRecord]:
        """All channels, or those in one of ``states``, oldest first."""
        if states is None:
            rows = self._db.execute("SELECT * FROM channels ORDER BY created_at").fetchall()
        else:
            st = [ChannelState(s).value for s in states]
            rows = self._db.execute(
                f"SELECT * FROM channels WHERE state IN ({_marks(st)}) ORDER BY created_at", st
            ).fetchall()
        return [_payee_from_row(r) for r in rows]

    def chain_cursor(self) -> tuple[int, str] | None:
        """(height, hash) of the last block the watcher processed, or None."""
        row = self._db.execute("SELECT height, hash FROM chain_cursor WHERE id=1").fetchone()
        return None if row is None else (int(row[0]), str(row[1]))

    def set_chain_cursor(self, height: int, block_hash: str) -> None:
        """Remember the last block the watcher processed."""
        self._db.execute(
            "INSERT INTO chain_cursor (id, height, hash) VALUES (1, ?, ?)"
            " ON CONFLICT(id) DO UPDATE SET height=excluded.height, hash=excluded.hash",
            (height, block_hash),
        )

    def count_unfunded(self, ended_since: float, client: str | None = None) -> int:
        """Proposals waiting for their funding plus the unfunded ones (lapsed, cancelled) that ended
        after ``ended_since``: what counts against the proposal caps (of ``client`` if given)."""
        sql = "SELECT COUNT(*) FROM channels WHERE funding_txid IS NULL AND (state=? OR (state=? AND updated_at>?))"
        args: list[Any] = [_S.PROPOSED.value, _S.FAILED.value, ended_since]
        if client is not None:
            sql += " AND client=?"
            args.append(client)
        return int(self._db.execute(sql, args).fetchone()[0])

    def forget_ended_proposals(self, keep: int) -> int:
        """Delete the proposals that ended unfunded (lapsed, cancelled: no funding, no payment) except
        the ``keep`` most recent: a bound on the rows a proposal flood leaves behind. How many went."""
        ended = "state=? AND funding_txid IS NULL AND signature IS NULL"
        cur = self._db.execute(
            f"DELETE FROM channels WHERE {ended} AND updated_at <="
            f" (SELECT updated_at FROM channels WHERE {ended} ORDER BY updated_at DESC LIMIT 1 OFFSET ?)",
            (_S.FAILED.value, _S.FAILED.value, keep),
        )
        return int(cur.rowcount)

    def evictable_proposal(self, created_before: float, below: int) -> str | None:
        """The oldest proposal created before ``created_before`` of the client holding the most
        proposals, if that client holds more than ``below``: the proposal to lapse when the total cap
        is full and a client holding ``below - 1`` asks (None: no client holds that many)."""
        row = self._db.execute(
            "SELECT client, COUNT(*) AS n FROM channels WHERE state=? GROUP BY client ORDER BY n DESC LIMIT 1",
            (_S.PROPOSED.value,),
        ).fetchone()
        if row is None or int(row[1]) <= below:
            return None
        found = self._db.execute(
            "SELECT channel_id FROM channels WHERE state=? AND client IS ? AND created_at<?"
            " ORDER BY created_at LIMIT 1",
            (_S.PROPOSED.value, row[0], created_before),
        ).fetchone()
        return None if found is None else str(found[0])

    def prune(self, ended_before: float) -> int:
        """Delete ``failed`` rows without payments that ended before ``ended_before`` (lapsed or
        cancelled proposals, failed fundings): the retention of rows that hold nothing owed."""
        cur = self._db.execute(
            "DELETE FROM channels WHERE state=? AND amount_sat=0 AND updated_at<?", (_S.FAILED.value, ended_before)
        )
        return int(cur.rowcount)

    def count_proposals(self) -> int:
        """Number of channels still waiting for their funding transaction."""
        row = self._db.execute("SELECT COUNT(*) FROM channels WHERE state=?", (_S.PROPOSED.value,)).fetchone()
        return int(row[0])

    # -- writes (each one committed and fsynced before it returns) -------------
    def _update(self, sql: str, args: tuple[Any, ...]) -> bool:
        cur = self._db.execute(sql, args)
        return cur.rowcount == 1

    @staticmethod
    def _transition_sql(t: Transition) -> tuple[str, _Args]:
        """``t`` as one compare-and-set: the record's new state and fields, where the row is still in
        its old state (and meets the event's guard)."""
        bad = set(t.fields) - _TRANSITION_FIELDS
        if bad:
            raise ValueError(f"transition cannot set {sorted(bad)}")
        sets = ["state=?"]
        args: _Args = [t.new.value]
        for name, value in t.fields.items():
            sets.append(f"{name}=?")
            args.append(json.dumps(value) if name in _JSON_FIELDS else value)
        sets.append("updated_at=?")
        sql = (
            f"UPDATE channels SET {', '.join(sets)} WHERE channel_id=? AND state=?{_GUARDS.get(t.event, '')}"
            " RETURNING *"
        )
        return sql, [*args, time.time(), t.channel_id, t.old.value]

    def apply(self, t: Transition) -> PayeeRecord | None:
        """Persist the core's record ``t``: the row moves from ``t.old`` to ``t.new`` with ``t.fields``.

        A compare-and-set: ``UPDATE ... WHERE channel_id=? AND state=<t.old> RETURNING *``.
        Returns the updated row, committed, or None when the row is in another state now (or
        missing, or the event's guard refused it): read it again and decide again
        (:meth:`fire`). The fields are columns from a fixed list (funding, confirmations, close
        and exception columns; ValueError otherwise); FundingMismatch when the funding outpoint is
        another channel's."""
        sql, args = self._transition_sql(t)
        try:
            rows = self._db.execute(sql, args).fetchall()
        except sqlite3.IntegrityError as exc:
            if t.event is ChannelEvent.FUNDING:
                raise FundingMismatch("this funding outpoint is already used by another channel") from exc
            raise
        return _payee_from_row(rows[0]) if rows else None  # stepped to the end: committed and fsynced

    async def apply_async(self, t: Transition) -> PayeeRecord | None:
        """:meth:`apply` through the group-commit writer (the event loop never waits on the disk)."""
        sql, args = self._transition_sql(t)
        return await self._returning(sql, args)

    def apply_all(self, records: Sequence[Transition]) -> _Applied:
        """:meth:`apply` for each record, all in one transaction (one commit): each one's row, or None."""
        if not records:
            return []
        self._db.execute("BEGIN IMMEDIATE")
        try:
            out: _Applied = []
            for t in records:
                sql, args = self._transition_sql(t)
                rows = self._db.execute(sql, args).fetchall()
                out.append(_payee_from_row(rows[0]) if rows else None)
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        return out

    def _decisions(
        self, channel_id: str, decide: Decide, rec: PayeeRecord | None
    ) -> Generator[Transition, PayeeRecord | None, PayeeRecord | None]:
        """The decide-apply-decide-again loop of :meth:`fire` without its I/O: yields each record to
        apply and is sent what applying it stored (None: the compare-and-set was lost); returns the
        updated row, or None (see :meth:`fire`)."""
        for _attempt in range(_FIRE_ATTEMPTS):
            if rec is None and (rec := self.find(channel_id)) is None:
                return None
            try:
                t = decide(PayeeLifecycle(channel_id, rec.state), rec)
            except IllegalTransition:
                return None
            stored = yield t
            if stored is not None:
                return stored
            rec = self._decide_again(channel_id, t)
            if rec is None:
                return None
        return None

    def fire(self, channel_id: str, decide: Decide, rec: PayeeRecord | None = None) -> PayeeRecord | None:
        """Ask ``decide`` (a core lifecycle event) for the transition of channel ``channel_id`` as
        stored (``rec``, or read now) and :meth:`apply` it; when the compare-and-set is lost, read the
        row again and ask again. Returns the updated row, or None once the decision raises
        IllegalTransition (the event is not allowed in the row's state), the row is missing, or the
        event's guard refused it."""
        steps = self._decisions(channel_id, decide, rec)
        try:
            t = next(steps)
            while True:
                t = steps.send(self.apply(t))
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    async def fire_async(self, channel_id: str, decide: Decide, rec: PayeeRecord | None = None) -> PayeeRecord | None:
        """:meth:`fire`, each record applied through the group-commit writer."""
        steps = self._decisions(channel_id, decide, rec)
        try:
            t = next(steps)
            while True:
                t = steps.send(await self.apply_async(t))
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    def _decide_again(self, channel_id: str, lost: Transition) -> PayeeRecord | None:
        """The row to decide again on after ``lost`` lost its compare-and-set: the row as stored now;
        None when there is nothing to decide again (no row, or the row is still in the old state and
        the event's guard is what refused it)."""
        fresh = self.find(channel_id)
        if fresh is None or (fresh.state is lost.old and lost.event in _GUARDS):
            return None
        return fresh

    def transition(self, channel_id: str, event: ChannelEvent | str, **fields: Any) -> PayeeRecord | None:
        """Fire ``event`` (setting ``fields``) on the channel as stored, through the core's table
        (:meth:`fire`): the updated row, or None when the row's state does not allow it (or is
        missing). IllegalTransition for an unknown event; ValueError for a column outside the
        fixed list."""
        sources(event)  # IllegalTransition for an unknown event
        bad = set(fields) - _TRANSITION_FIELDS
        if bad:
            raise ValueError(f"transition cannot set {sorted(bad)}")
        return self.fire(channel_id, lambda life, _rec: life.fire(event, **fields))

    async def _returning(self, sql: str, args: Sequence[Any]) -> PayeeRecord | None:
        """Run one ``... RETURNING *`` statement through the group-commit writer: the row once committed."""
        rows = await self.writer.submit(sql, args)
        return self._committed(rows[0]) if rows else None

    def _committed(self, row: Mapping[str, Any]) -> PayeeRecord:
        """A row a commit returned, as a record: the channel's ``params`` and ``terms`` (which never
        change once stored) parsed once per channel, not per payment."""
        memo: dict[str, tuple[Any, Any, Any, Any]] | None = getattr(self, "_parsed", None)
        if memo is None:
            memo = {}
            self._parsed = memo
        cid, params, terms = row["channel_id"], row["params"], row["terms"]
        kept = memo.get(cid)
        if kept is None or kept[0] != params or kept[1] != terms:
            parsed = _payee_from_row(row)
            memo[cid] = (params, terms, parsed.params, parsed.terms)
            return parsed
        d = dict(row)
        d["params"], d["terms"] = kept[2], kept[3]
        for name in ("close_txids", "funding_inputs"):
            d[name] = orjson.loads(d[name])
        d["privkey"] = bytes(d["privkey"])
        if d["signature"] is not None:
            d["signature"] = bytes(d["signature"])
        return PayeeRecord(**d)

    async def _changed(self, sql: str, args: Sequence[Any]) -> bool:
        """Run one ``UPDATE ... RETURNING channel_id`` through the writer: whether it hit the row."""
        return bool(await self.writer.submit(sql, args))

    def insert_proposal(self, rec: PayeeRecord) -> None:
        """Store a new proposal (state ``proposed``)."""
        now = time.time()
        self._db.execute(
            "INSERT INTO channels (channel_id, state, params, privkey, deposit_sat, expiry_height, created_at,"
            " lapse_at, max_units, max_total_sat, created_height, updated_at, terms, payout_script, client, key_index,"
            " payer_pubkey) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                rec.channel_id,
                _S.PROPOSED.value,
                json.dumps(rec.params),
                rec.privkey,
                rec.deposit_sat,
                rec.expiry_height,
                rec.created_at or now,
                rec.lapse_at,
                rec.max_units,
                rec.max_total_sat,
                rec.created_height,
                now,
                json.dumps(rec.terms) if rec.terms is not None else None,
                rec.payout_script,
                rec.client,
                rec.key_index,
                rec.params.get("payer_pubkey"),
            ),
        )

    def set_funding(
        self,
        channel_id: str,
        txid: str,
        vout: int,
        confirmations: int,
        funding_inputs: _Inputs | None = None,
    ) -> bool:
        """The core's ``funding`` event: ``proposed`` -> ``funding`` with the funding outpoint; False
        if not proposed any more. FundingMismatch if another channel has that outpoint.

        ``funding_inputs`` ([txid, vout] pairs the funding transaction spends)
        let the watcher name the transaction that double-spent a funding.
        """
        outpoint = OutPoint(txid, vout)
        return (
            self.fire(channel_id, lambda life, _: life.funding_seen(outpoint, confirmations, funding_inputs or ()))
            is not None
        )

    def insert_funded(self, rec: PayeeRecord) -> PayeeRecord:
        """Store a channel whose first row is its registered funding (a stateless proposal's): state
        ``funding`` or ``open`` as ``rec`` says, its funding outpoint set, in one statement.

        Idempotent and safe against other instances on the same database: ``INSERT ... ON CONFLICT
        DO NOTHING``, then the row is read back. The row now stored for the channel with this very
        outpoint is returned (this call's or an earlier one's: a repeated report is answered with
        it); ``FundingMismatch`` when the channel is stored with another outpoint, or when another
        channel holds this outpoint (nothing written)."""
        if rec.state not in (_S.FUNDING, _S.OPEN) or rec.funding_txid is None or rec.funding_vout is None:
            raise ValueError("insert_funded takes a funding or open channel with its outpoint")
        now = time.time()
        values: dict[str, Any] = {
            "channel_id": rec.channel_id,
            "state": _S(rec.state).value,
            "params": json.dumps(rec.params),
            "privkey": rec.privkey,
            "deposit_sat": rec.deposit_sat,
            "expiry_height": rec.expiry_height,
            "created_at": rec.created_at or now,
            "funding_txid": rec.funding_txid,
            "funding_vout": rec.funding_vout,
            "confirmations": rec.confirmations,
            "funding_inputs": json.dumps(rec.funding_inputs),
            "max_units": rec.max_units,
            "max_total_sat": rec.max_total_sat,
            "created_height": rec.created_height,
            "updated_at": now,
            "terms": json.dumps(rec.terms) if rec.terms is not None else None,
            "payout_script": rec.payout_script,
            "client": rec.client,
            "key_index": rec.key_index,
            "payer_pubkey": rec.params.get("payer_pubkey"),
        }
        self._db.execute(
            f"INSERT INTO channels ({', '.join(values)}) VALUES ({_marks(values)}) ON CONFLICT DO NOTHING",
            tuple(values.values()),
        )
        stored = self.find(rec.channel_id)
        if stored is None:
            raise FundingMismatch("this funding outpoint is already used by another channel")
        if (stored.funding_txid, stored.funding_vout) != (rec.funding_txid, rec.funding_vout):
            raise FundingMismatch("this channel already has a funding outpoint")
        return stored

    def funding_lost(self, channel_id: str, confirmations: int) -> bool:
        """The core's ``funding_lost`` event: ``open`` -> ``funding`` (the funding left the active
        chain or fell below its depth)."""
        return self.fire(channel_id, lambda life, _: life.funding_lost(confirmations)) is not None

    def set_confirmations(self, channel_id: str, confirmations: int, open_now: bool) -> bool:
        """Record funding confirmations; with ``open_now`` it is the core's ``funding_confirmed``
        event (``funding`` -> ``open``)."""
        if open_now:
            return self.fire(channel_id, lambda life, _: life.funding_confirmed(confirmations)) is not None
        return self._update(
            "UPDATE channels SET confirmations=?, updated_at=? WHERE channel_id=?",
            (confirmations, time.time(), channel_id),
        )

    def add_confirmations(self, blocks: int) -> int:
        """``blocks`` new blocks on top of the chain (no reorganisation): every ``open`` channel's
        funding is that much deeper. Returns the number of channels updated."""
        cur = self._db.execute(
            "UPDATE channels SET confirmations=confirmations+? WHERE state=? AND confirmations>0",
            (blocks, ChannelState.OPEN.value),
        )
        return int(cur.rowcount)

    @staticmethod
    def _payment_sql(
        channel_id: str,
        amount_sat: int,
        signature: bytes,
        units_delta: int,
        owed_sat: int | None,
        request_counter: int,
        last_request: bytes | None = None,
    ) -> tuple[str, tuple[Any, ...]]:
        now = time.time()
        settle = "" if owed_sat is None else " owed_since=CASE WHEN owed_sat<=? THEN NULL ELSE owed_since END,"
        sql = (
            "UPDATE channels SET amount_sat=?, signature=?, units=units+?, payments=payments+1,"
            + settle
            + " request_counter=MAX(request_counter, ?), last_request=COALESCE(?, last_request),"
            " paid_at=?, updated_at=? WHERE channel_id=? AND state=? AND amount_sat<? RETURNING *"
        )
        args: tuple[Any, ...] = (
            amount_sat,
            signature,
            units_delta,
            *(() if owed_sat is None else (owed_sat,)),
            request_counter,
            last_request,
            now,
            now,
            channel_id,
            _S.OPEN.value,
            amount_sat,
        )
        return sql, args

    def record_payment(
        self,
        channel_id: str,
        amount_sat: int,
        signature: bytes,
        *,
        units_delta: int = 0,
        owed_sat: int | None = None,
        request_counter: int = 0,
    ) -> PayeeRecord | None:
        """Store a new best payment if the channel is open and it beats the stored one.

        ``owed_sat`` (metered postpay): the owed total this payment settles;
        the payment timer is cleared only if nothing more is owed by now.
        ``request_counter``: the authenticated metered request it pays for (kept as the highest).
        Returns the updated row, committed, or None (nothing written) if the
        row changed under us: the caller re-reads it and decides again.
        This one commits on the calling thread; :meth:`record_payment_async`
        shares a commit with the other payments waiting at that moment.
        """
        sql, args = self._payment_sql(channel_id, amount_sat, signature, units_delta, owed_sat, request_counter)
        rows = self._db.execute(sql, args).fetchall()  # stepped to the end: committed and fsynced
        if rows and self.payment_mirror is not None:
            self.payment_mirror([(sql, args, len(rows))])  # in the backup too, before the acknowledgement
        return _payee_from_row(rows[0]) if rows else None

    async def record_payment_async(
        self,
        channel_id: str,
        amount_sat: int,
        signature: bytes,
        *,
        units_delta: int = 0,
        owed_sat: int | None = None,
        request_counter: int = 0,
        last_request: bytes | None = None,
    ) -> PayeeRecord | None:
        """:meth:`record_payment` through the group-commit writer: the event loop never waits on
        the disk, and the result is returned only once the batch holding it is committed.
        ``last_request``: the idempotency key of the metered request the payment pays for."""
        sql, args = self._payment_sql(
            channel_id, amount_sat, signature, units_delta, owed_sat, request_counter, last_request
        )
        rows = await self.writer.submit(sql, args)
        return self._committed(rows[0]) if rows else None

    @staticmethod
    def _credit_sql(
        channel_id: str,
        expected_owed: int,
        new_owed: int,
        units_delta: int,
        request_counter: int,
        last_request: bytes | None = None,
        caps: Sequence[tuple[str | None, Any, int]] = (),
    ) -> tuple[str, tuple[Any, ...]]:
        now = time.time()
        sql = (
            "UPDATE channels SET owed_sat=?, units=units+?, owed_since=COALESCE(owed_since, ?),"
            " request_counter=MAX(request_counter, ?), last_request=COALESCE(?, last_request), updated_at=?"
            " WHERE channel_id=? AND state=? AND owed_sat=? AND request_counter<?"
        )
        args: list[Any] = [
            new_owed,
            units_delta,
            now,
            request_counter,
            last_request,
            now,
            channel_id,
            _S.OPEN.value,
            expected_owed,
            max(request_counter, 1),
        ]
        added = None
        for column, value, limit in caps:  # the outstanding credit across channels stays within each cap
            if added is None:
                row = "(SELECT MAX(c.owed_sat, c.amount_sat) FROM channels c WHERE c.channel_id=?)"
                added, added_args = f"(? - {row})", [new_owed, channel_id]
            where = "" if column is None else f" AND {column}=?"
            sql += (
                f" AND (SELECT COALESCE(SUM(o.owed_sat - o.amount_sat), 0) FROM channels o"
                f" WHERE o.state IN (?, ?) AND o.owed_sat > o.amount_sat{where.replace(' AND ', ' AND o.')})"
                f" + {added} <= ?"
            )
            args += [_S.OPEN.value, _S.FUNDING.value, *(() if column is None else (value,)), *added_args, limit]
        return sql + " RETURNING *", tuple(args)

    def record_credit(
        self, channel_id: str, expected_owed: int, new_owed: int, units_delta: int, request_counter: int = 0
    ) -> bool:
        """Postpay: a unit served on credit (CAS on the owed total, and on the request counter being
        below ``request_counter``, which it becomes: a replayed request is never credited twice)."""
        sql, args = self._credit_sql(channel_id, expected_owed, new_owed, units_delta, request_counter)
        return bool(self._db.execute(sql, args).fetchall())

    async def record_credit_async(
        self,
        channel_id: str,
        expected_owed: int,
        new_owed: int,
        units_delta: int,
        request_counter: int = 0,
        *,
        last_request: bytes | None = None,
        caps: Sequence[tuple[str | None, Any, int]] = (),
    ) -> PayeeRecord | None:
        """:meth:`record_credit` through the group-commit writer: the updated row, or None if the
        owed total or the counter changed under us, or a cap would be passed. ``caps``: (column,
        value, limit) triples, each bounding the outstanding credit (owed minus paid, over open and
        funding channels) of the channels whose ``column`` is ``value`` (None: all channels), this
        unit included; checked in the same statement as the write."""
        return await self._returning(
            *self._credit_sql(channel_id, expected_owed, new_owed, units_delta, request_counter, last_request, caps)
        )

    def outstanding_credit(self, column: str | None = None, value: Any = None) -> int:
        """The unpaid credit (owed minus paid) over open and funding channels (whose ``column`` is ``value``)."""
        if column not in (None, "payer_pubkey", "client"):
            raise ValueError(column)
        where = "" if column is None else f" AND {column}=?"
        row = self._db.execute(
            "SELECT COALESCE(SUM(owed_sat - amount_sat), 0) FROM channels WHERE state IN (?, ?)"
            f" AND owed_sat > amount_sat{where}",
            (_S.OPEN.value, _S.FUNDING.value, *(() if column is None else (value,))),
        ).fetchone()
        return int(row[0])

    @staticmethod
    def _unserve_sql(
        channel_id: str, units: int, owed_delta: int, last_request: bytes | None
    ) -> tuple[str, tuple[Any, ...]]:
        forget = "last_request=CASE WHEN last_request=? THEN NULL ELSE last_request END"
        if owed_delta == 0:
            return (
                f"UPDATE channels SET units=units-?, {forget}, updated_at=?"
                " WHERE channel_id=? AND units>=? RETURNING channel_id",
                (units, last_request, time.time(), channel_id, units),
            )
        return (
            f"UPDATE channels SET units=units-?, owed_sat=owed_sat-?, {forget},"
            " owed_since=CASE WHEN owed_sat-?<=amount_sat THEN NULL ELSE owed_since END, updated_at=?"
            " WHERE channel_id=? AND units>=? AND owed_sat>=? RETURNING channel_id",
            (units, owed_delta, last_request, owed_delta, time.time(), channel_id, units, owed_delta),
        )

    def unserve(self, channel_id: str, units: int, owed_delta: int = 0, last_request: bytes | None = None) -> bool:
        """A charged request whose handler failed: its ``units`` are not counted as served. Prepay
        (``owed_delta`` 0): what was paid for them is surplus, the credit of the next requests;
        postpay: the owed total is lowered by ``owed_delta`` (the payment timer stops if nothing more
        is owed). ``last_request``: that request's idempotency key, forgotten if it is the last one."""
        sql, args = self._unserve_sql(channel_id, units, owed_delta, last_request)
        return bool(self._db.execute(sql, args).fetchall())

    async def unserve_async(
        self, channel_id: str, units: int, owed_delta: int = 0, last_request: bytes | None = None
    ) -> bool:
        """:meth:`unserve` through the group-commit writer."""
        return await self._changed(*self._unserve_sql(channel_id, units, owed_delta, last_request))

    @staticmethod
    def _surplus_sql(
        channel_id: str, units: int, price_sat: int, request_counter: int, last_request: bytes | None
    ) -> tuple[str, tuple[Any, ...]]:
        now = time.time()  # a unit served from what was paid ahead is activity: paid_at (the idle timer) moves
        return (
            "UPDATE channels SET units=units+?, request_counter=?, last_request=?, paid_at=?, updated_at=?"
            " WHERE channel_id=? AND state=? AND amount_sat - units * ? >= ? AND request_counter<? RETURNING *",
            (
                units,
                request_counter,
                last_request,
                now,
                now,
                channel_id,
                _S.OPEN.value,
                price_sat,
                price_sat * units,
                request_counter,
            ),
        )

    def use_surplus(
        self, channel_id: str, units: int, price_sat: int, request_counter: int, last_request: bytes | None = None
    ) -> PayeeRecord | None:
        """Prepay: serve ``units`` from the prepaid surplus (``amount_sat - price_sat * units`` served)
        for the authenticated request ``request_counter``; None if the surplus is short (or the counter used)."""
        rows = self._db.execute(
            *self._surplus_sql(channel_id, units, price_sat, request_counter, last_request)
        ).fetchall()
        return _payee_from_row(rows[0]) if rows else None

    async def use_surplus_async(
        self, channel_id: str, units: int, price_sat: int, request_counter: int, last_request: bytes | None = None
    ) -> PayeeRecord | None:
        """:meth:`use_surplus` through the group-commit writer."""
        return await self._returning(*self._surplus_sql(channel_id, units, price_sat, request_counter, last_request))

    def claim_close(self, channel_id: str, reason: str, rec: PayeeRecord | None = None) -> PayeeRecord | None:
        """Claim the right to close, the core's ``closing`` event: ``open``/``funding`` -> ``closing``.

        Returns the row as of the claim (with the best payment to close with)
        to exactly one caller across all processes; None to everyone else.
        ``rec``: the row as the caller last read it (read here if not given).
        """
        return self.fire(channel_id, lambda life, _: life.closing(reason, time.time()), rec)

    async def claim_close_async(
        self, channel_id: str, reason: str, rec: PayeeRecord | None = None
    ) -> PayeeRecord | None:
        """:meth:`claim_close` through the group-commit writer."""
        return await self.fire_async(channel_id, lambda life, _: life.closing(reason, time.time()), rec)

    def reclaim_stale_close(self, channel_id: str, older_than: float) -> bool:
        """Take over a ``closing`` claim that never got a close txid (its process died); fenced
        by the leadership (:meth:`_fence`)."""
        now = time.time()
        fence, fence_args = self._fence()
        return self._update(
            "UPDATE channels SET close_claimed_at=?, updated_at=? WHERE channel_id=? AND state=?"
            " AND close_txid IS NULL AND close_claimed_at<?" + fence,
            (now, now, channel_id, _S.CLOSING.value, older_than, *fence_args),
        )

    def record_close_intent(
        self, channel_id: str, txid: str, raw_tx: str, fee_rate: float, previous_txid: str | None
    ) -> bool:
        """Record the close about to be broadcast (or its RBF replacement): its raw transaction,
        txid and fee rate, CAS on the current close txid and on the leadership (:meth:`_fence`).
        Called *before* the broadcast, so a process that dies in between leaves a close the next
        one sends byte for byte; a False means: do not broadcast it."""
        rec = self.get(channel_id)
        txids = rec.close_txids + ([txid] if txid not in rec.close_txids else [])
        fence, fence_args = self._fence()
        return self._update(
            "UPDATE channels SET close_tx=?, close_tx_txid=?, close_txids=?, close_fee_rate=?, updated_at=?"
            " WHERE channel_id=? AND state=? AND close_txid IS ?" + fence,
            (
                raw_tx,
                txid,
                json.dumps(txids),
                fee_rate,
                time.time(),
                channel_id,
                _S.CLOSING.value,
                previous_txid,
                *fence_args,
            ),
        )

    def record_close_intents(
        self, channel_ids: Sequence[str], txid: str, raw_tx: str, fee_rate: float, previous_txid: str | None
    ) -> bool:
        """:meth:`record_close_intent` for every channel of one shared close, all or none in one
        transaction: True only if every one was recorded (a close spending several fundings is
        broadcast only when each of them records it)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            ok = all(self.record_close_intent(cid, txid, raw_tx, fee_rate, previous_txid) for cid in channel_ids)
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT" if ok else "ROLLBACK")
        return ok

    def set_close_tx(self, channel_id: str, txid: str, fee_rate: float, height: int, previous_txid: str | None) -> bool:
        """Record a broadcast close (or its RBF replacement), CAS on the previous close txid and on
        the leadership (:meth:`_fence`)."""
        rec = self.get(channel_id)
        txids = rec.close_txids + ([txid] if txid not in rec.close_txids else [])
        fence, fence_args = self._fence()
        return self._update(
            "UPDATE channels SET close_txid=?, close_txids=?, close_fee_rate=?, close_height=?, updated_at=?"
            " WHERE channel_id=? AND state=? AND close_txid IS ?" + fence,
            (
                txid,
                json.dumps(txids),
                fee_rate,
                height,
                time.time(),
                channel_id,
                _S.CLOSING.value,
                previous_txid,
                *fence_args,
            ),
        )

    def release_close_claim(self, channel_id: str) -> bool:
        """Leave a ``closing`` claim without a close txid to whichever process takes it first
        (an operator's claim made while the node was down: the running service broadcasts it)."""
        return self._update(
            "UPDATE channels SET close_claimed_at=0, updated_at=? WHERE channel_id=? AND state=?"
            " AND close_txid IS NULL",
            (time.time(), channel_id, _S.CLOSING.value),
        )

    def mark_uneconomic(self, channel_id: str, rec: PayeeRecord | None = None) -> bool:
        """The core's ``close_uneconomic`` event: a claimed close whose payments do not pay for its
        fee is flagged (False if flagged already, or a close was recorded)."""
        return self.fire(channel_id, lambda life, _: life.close_uneconomic(), rec) is not None

    def mark_closed(self, channel_id: str, txid: str) -> bool:
        """The core's ``closed`` event once ``txid`` (one of our closes) confirmed."""
        return self.fire(channel_id, lambda life, rec: life.closed(txid, rec.close_txids)) is not None

    def mark_exception(self, channel_id: str, state: ChannelState | str, txid: str | None, reason: str) -> bool:
        """An on-chain exception: the funding was spent by ``txid`` (not our close) or never existed.

        ``state`` is ``refunded`` or ``failed`` (the core's event of that name fires).
        ``reason`` replaces ``end_reason`` whole, so ``close_uneconomic`` is cleared with it.
        """
        if state not in (_S.REFUNDED, _S.FAILED):
            raise ValueError(state)
        if ChannelState(state) is _S.REFUNDED:
            return self.fire(channel_id, lambda life, _: life.refunded(txid, reason)) is not None
        return self.fire(channel_id, lambda life, _: life.failed(reason, txid)) is not None

    def end_proposal(self, channel_id: str, reason: str) -> bool:
        """The core's end of an unfunded proposal (``lapsed``, ``cancelled_by_payer``...): ``proposed``
        -> ``failed``; False if the channel is not (or no longer) a proposal."""
        return self.fire(channel_id, lambda life, _: life.proposal_ended(reason)) is not None

    def lapse_proposals(self, now: float | None = None) -> int:
        """Unfunded proposals past their lapse time -> ``failed`` (reason ``lapsed``), each by the
        core's :meth:`~btcchannel.core.state.PayeeLifecycle.proposal_ended`, all in one commit; a
        proposal funded meanwhile keeps its funding (its compare-and-set is lost). How many lapsed."""
        t = time.time() if now is None else now
        rows = self._db.execute(
            "SELECT channel_id, state FROM channels WHERE state=? AND lapse_at IS NOT NULL AND lapse_at<?",
            (_S.PROPOSED.value, t),
        ).fetchall()
        records = [PayeeLifecycle(str(r[0]), ChannelState(r[1])).proposal_ended("lapsed") for r in rows]
        return sum(1 for rec in self.apply_all(records) if rec is not None)
