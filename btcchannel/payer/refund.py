"""The payer's way back to its deposit: the timelocked refund once the chain reaches the expiry.

:class:`Refunds` is a component the payer's client holds (:attr:`btcchannel.payer.client.PayerClient.refunds`;
the client's ``refund`` and ``refund_details`` call it). The chain, not the
payee's report, decides whether a refund is still possible: a deposit still unspent in a block can
be taken back even if the payee said the channel ended, and a funding the payer broadcast but never
recorded (its process died in between) is found on the chain by its script.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from btcchannel.amounts import btc_to_sat
from btcchannel.bitcoind.rpc import Node
from btcchannel.core import script
from btcchannel.core.channel import PayerChannel
from btcchannel.core.params import ChannelParams
from btcchannel.core.state import TERMINAL_STATES, ChannelState
from btcchannel.core.tx import OutPoint, tx_vsize
from btcchannel.errors import AlreadyRefunded, NotOpen
from btcchannel.store import PayerRecord, PayerStore

__all__ = ["Refunds"]


class Refunds:
    """The payer's refunds over its store and node: ``record`` gives the stored channel (refusing one
    of another network), ``network`` checks a destination address."""

    def __init__(self, store: PayerStore, node: Node, network: str, record: Callable[[str], PayerRecord]) -> None:
        self.store = store
        self.node = node
        self.network = network
        self.record = record

    async def _find_funding(self, rec: PayerRecord, params: ChannelParams) -> OutPoint:
        """A funding broadcast but never recorded (the process died in between): the unspent output of
        exactly the deposit to the funding script (``scantxoutset``), recorded now; else NotOpen."""
        found = await self.node.call("scantxoutset", "start", [f"raw({params.funding_script.hex()})"])
        for utxo in found.get("unspents", []) if isinstance(found, dict) else []:
            if btc_to_sat(utxo["amount"]) == params.deposit_sat:
                op = OutPoint(str(utxo["txid"]), int(utxo["vout"]))
                self.store.set_state(
                    rec.channel_id,
                    ChannelState.FUNDING,
                    funding_txid=op.txid,
                    funding_vout=op.vout,
                    params=params.with_funding(op).to_json(),
                )
                return op
        raise NotOpen("the channel was never funded")

    async def refund_details(
        self, channel_id: str, *, fee_rate_sat_vb: float | None = None, dest_address: str | None = None
    ) -> dict[str, Any]:
        """Refund and say what it did: ``refund_txid``, ``amount_sat`` (back to the payer), ``fee_sat``,
        ``fee_rate_sat_vb``.

        ``fee_rate_sat_vb``: sat/vB [default: the node's estimate]. ``NotExpired`` before expiry;
        ``AlreadyRefunded`` when this payer refunded already or the deposit is spent (by a close or a
        refund); ``NotOpen`` when the channel was never funded.
        """
        rec = self.record(channel_id)
        params = ChannelParams.from_json(rec.params)
        funding = params.funding or await self._find_funding(rec, params)  # broadcast, never recorded
        params, rec = params.with_funding(funding), self.store.get(channel_id)
        if rec.state is ChannelState.REFUNDED:
            raise AlreadyRefunded(f"channel {channel_id} was refunded already by {rec.refund_txid}")
        if await self.node.get_txout(funding, include_mempool=False) is None:  # spent in a block
            if not await self.node.tx_confirmations(funding.txid):
                raise NotOpen(f"the funding {funding.txid} is not confirmed")
            how = f" by close {rec.close_txid}" if rec.close_txid else ""
            raise AlreadyRefunded(f"the deposit of channel {channel_id} is already spent in a block{how}")
        # spent only in the mempool (a close not confirmed yet): the refund may replace it
        state = ChannelState(rec.state)
        if state in TERMINAL_STATES:
            # the payee reported an end, but the chain still holds the deposit: the chain decides
            state = ChannelState.CLOSING
        ch = PayerChannel.restore(params, rec.privkey, state)
        tip = await self.node.tip_height()
        rate = fee_rate_sat_vb or await self.node.estimate_fee_rate()
        dest = script.address_to_script(dest_address, self.network) if dest_address else None
        tx = ch.build_refund(tip, rate, dest)
        txid = await self.node.broadcast(tx.serialize().hex())
        self.store.set_state(channel_id, ChannelState.REFUNDED, refund_txid=txid)
        amount = int(tx.vout[0].nValue)
        fee = rec.deposit_sat - amount
        return {
            "channel_id": channel_id,
            "refund_txid": txid,
            "amount_sat": amount,
            "fee_sat": fee,
            "fee_rate_sat_vb": round(fee / tx_vsize(tx), 2),
        }
