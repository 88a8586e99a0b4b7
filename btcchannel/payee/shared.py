"""What the payee's service, closer and watcher share in memory (nothing here is durable):

- :class:`ChainTip`: the chain tip as last seen and when; the watcher's tip follower updates it,
  the service reads it (and refuses payments when it is stale);
- :func:`agreed_terms`: a channel's agreed terms (the payee's current ones for a channel
  proposed before terms were stored);
- :class:`Channels`: the core channels rebuilt from stored rows, with a cache of open ones
  (and of their current rows, as the payment path's commits wrote them) that whoever changes a
  channel's state invalidates.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from btcchannel.bitcoind.chain import BITCOIND_CHAIN, ChainState
from btcchannel.core.channel import PayeeChannel
from btcchannel.core.params import ChannelParams, Payment
from btcchannel.core.state import ChannelState
from btcchannel.core.terms import Terms
from btcchannel.core.tx import OutPoint
from btcchannel.store import PayeeRecord, PayeeStore

__all__ = ["ChainTip", "Channels", "agreed_terms"]


def agreed_terms(rec: PayeeRecord, current: Terms) -> Terms:
    """The terms channel ``rec`` was agreed under. A row from before terms were stored gets the
    payee's ``current`` terms with the end conditions stored in its own columns."""
    if rec.terms is not None:
        return Terms.from_json(rec.terms)
    return current.required().with_end_conditions(max_units=rec.max_units, max_total_sat=rec.max_total_sat)


@dataclass
class ChainTip:
    """The best block as the payee last saw it (height 0: not fetched yet) and how fresh that is.

    ``checked_at`` is the ``time.monotonic()`` of the last successful query of the node's tip
    (None: never); ``problem`` says why the node's view cannot be trusted even though it answers
    (initial block download, another chain than configured)."""

    height: int = 0
    best_hash: str | None = None
    checked_at: float | None = None
    problem: str | None = None

    def update(
        self, state: ChainState, network: str, max_block_age_s: float | None = None, now: float | None = None
    ) -> None:
        """Take a fresh answer of the node (``network``: the payee's configured network;
        ``max_block_age_s``: how old its best block may be, by wall clock ``now``)."""
        expected = BITCOIND_CHAIN[network]
        block_age = None if state.block_time is None else (time.time() if now is None else now) - state.block_time
        if state.chain != expected:
            self.problem = f"the node follows chain {state.chain!r}, not {expected!r}"
        elif state.ibd:
            self.problem = "the node is in initial block download"
        elif max_block_age_s is not None and block_age is not None and block_age > max_block_age_s:
            self.problem = (
                f"the node's best block is {block_age:.0f}s old (more than {max_block_age_s:g}s):"
                " it may be cut off from the network"
            )
        else:
            self.problem = None
        self.height, self.best_hash = state.height, state.best_hash
        self.checked_at = time.monotonic()

    def stale_reason(self, max_age_s: float, now: float | None = None) -> str | None:
        """Why the payee must not rely on this view now (None: it is fresh enough)."""
        if self.problem is not None:
            return self.problem
        if self.checked_at is None:
            return "the node's tip was never fetched"
        age = (time.monotonic() if now is None else now) - self.checked_at
        if age > max_age_s:
            return f"no answer from the node for {age:.1f}s (more than {max_age_s:g}s)"
        return None

    def age_s(self) -> float | None:
        """Seconds since the last successful tip query (None: never)."""
        return None if self.checked_at is None else time.monotonic() - self.checked_at


class Channels:
    """Core ``PayeeChannel`` machines rebuilt from the store; open ones are cached."""

    def __init__(self, store: PayeeStore, close_margin_blocks: int) -> None:
        self.store = store
        self.close_margin_blocks = close_margin_blocks
        self._cache: dict[str, PayeeChannel] = {}
        self._rows: dict[str, PayeeRecord] = {}

    @staticmethod
    def params_of(rec: PayeeRecord) -> ChannelParams:
        """The channel's parameters (with the funding outpoint once known)."""
        params = ChannelParams.from_json(rec.params)
        if rec.funding_txid is not None and rec.funding_vout is not None and params.funding is None:
            params = params.with_funding(OutPoint(rec.funding_txid, rec.funding_vout))
        return params

    def build(self, rec: PayeeRecord) -> PayeeChannel:
        """The core ``PayeeChannel`` of a stored row, in the row's state."""
        best = Payment(rec.amount_sat, rec.signature) if rec.signature is not None else None
        return PayeeChannel.restore(
            self.params_of(rec),
            rec.privkey,
            rec.state,
            best=best,
            close_margin_blocks=self.close_margin_blocks,
        )

    def get(self, cid: str) -> PayeeChannel:
        """The cached core channel of an open channel (rebuilt from the store on a miss)."""
        ch = self._cache.get(cid)
        if ch is None:
            rec = self.store.get(cid)
            ch = self.build(rec)
            if rec.state is ChannelState.OPEN:
                self._cache[cid] = ch
        return ch

    def row(self, cid: str) -> PayeeRecord:
        """An open channel's current row as the last commit of this process wrote it (read from the
        store on a miss; ``UnknownChannel`` if there is none). It may lag behind another process's
        writes: decisions taken on it are written with compare-and-set, and re-taken on fresh data
        when that fails."""
        rec = self._rows.get(cid)
        if rec is None:
            rec = self.store.get(cid)
            self.remember(rec)
        return rec

    def remember(self, rec: PayeeRecord) -> None:
        """Keep ``rec``, a row a commit just returned (only an open channel's, and never one older than
        the row kept: the charged request counter and the paid total only grow)."""
        cid = rec.channel_id
        if rec.state is not ChannelState.OPEN:
            self._rows.pop(cid, None)
            return
        kept = self._rows.get(cid)
        if kept is None or (
            rec.request_counter >= kept.request_counter
            and rec.amount_sat >= kept.amount_sat
            and rec.units + rec.owed_sat >= kept.units + kept.owed_sat
        ):
            self._rows[cid] = rec
        else:
            self._rows.pop(cid, None)  # commits seen out of order: read it again when next needed

    def forget_row(self, cid: str) -> None:
        """Drop the kept row (it was changed by a write that returned no row)."""
        self._rows.pop(cid, None)

    def prune(self, live: set[str]) -> None:
        """Forget the cached channels not in ``live``."""
        for cid in [c for c in self._cache if c not in live]:
            del self._cache[cid]
        for cid in [c for c in self._rows if c not in live]:
            del self._rows[cid]

    def invalidate(self, cid: str) -> None:
        """Forget the cached channel and row (after any state change)."""
        self._cache.pop(cid, None)
        self._rows.pop(cid, None)
