"""What the payee's service, closer and watcher share in memory (nothing here is durable):

- :class:`ChainTip`: the chain height as last seen; the watcher updates it, the service reads it;
- :class:`Channels`: the core channels rebuilt from stored rows, with a cache of open ones
  that whoever changes a channel's state invalidates.
"""

from __future__ import annotations

from dataclasses import dataclass

from btcchannel.core.channel import PayeeChannel
from btcchannel.core.params import ChannelParams, Payment
from btcchannel.core.state import ChannelState
from btcchannel.core.tx import OutPoint
from btcchannel.store import PayeeRecord, PayeeStore

__all__ = ["ChainTip", "Channels"]


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
