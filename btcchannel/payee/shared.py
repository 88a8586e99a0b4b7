"""What the payee's service, closer and watcher share in memory (nothing here is durable):

- :class:`ChainTip`: the chain height as last seen; the watcher updates it, the service reads it;
- :func:`agreed_terms`: a channel's agreed terms (the payee's current ones for a channel
  proposed before terms were stored);
- :class:`Channels`: the core channels rebuilt from stored rows, with a cache of open ones
  that whoever changes a channel's state invalidates.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    """The height of the best block as the payee last saw it (0: not fetched yet)."""

    height: int = 0


class Channels:
    """Core ``PayeeChannel`` machines rebuilt from the store; open ones are cached."""

    def __init__(self, store: PayeeStore, close_margin_blocks: int) -> None:
        self.store = store
        self.close_margin_blocks = close_margin_blocks
        self._cache: dict[str, PayeeChannel] = {}

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
            self.params_of(rec), rec.privkey, rec.state, best=best, close_margin_blocks=self.close_margin_blocks,
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

    def invalidate(self, cid: str) -> None:
        """Forget the cached channel (after any state change)."""
        self._cache.pop(cid, None)
