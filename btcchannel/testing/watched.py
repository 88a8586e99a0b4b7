"""Many open channels at once for the watcher's tests and benchmark, and a Node that counts its calls.

- :class:`CountingNode`: a :class:`~btcchannel.bitcoind.rpc.Node` that counts its RPC calls by method;
- :func:`open_watched_channels`: ``n`` open channels in a payee's store, funded by one real
  transaction (``sendmany`` to the ``n`` funding addresses), mined.
"""

from __future__ import annotations

import secrets
import time
from collections import Counter
from typing import Any

from btcchannel.amounts import sat_to_btc
from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.bitcoind.rpc import Node
from btcchannel.core import keys, script
from btcchannel.core.params import ChannelParams
from btcchannel.core.state import ChannelState
from btcchannel.store import PayeeRecord, PayeeStore

__all__ = ["CountingNode", "open_watched_channels"]


class CountingNode(Node):
    """A Node that counts its RPC calls (``calls[method]``)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.calls: Counter[str] = Counter()

    async def call(self, method: str, *params: Any, wallet: str | None = None) -> Any:
        self.calls[method] += 1
        return await super().call(method, *params, wallet=wallet)


def open_watched_channels(
    store: PayeeStore,
    bitcoind: RegtestNode,
    wallet: str,
    n: int,
    *,
    deposit_sat: int = 10_000,
    lifetime_blocks: int = 1000,
) -> list[str]:
    """``n`` open channels in ``store``, funded by one transaction from ``wallet`` and mined."""
    tip = bitcoind.tip_height()
    payer_script = script.address_to_script(bitcoind.new_address(wallet), "regtest")
    payout = script.address_to_script(bitcoind.new_address("miner"), "regtest")
    made: list[tuple[str, ChannelParams, bytes]] = []
    for _ in range(n):
        payee_priv = keys.generate_private_key()
        params = ChannelParams(
            network="regtest",
            payer_pubkey=keys.public_key(keys.generate_private_key()),
            payee_pubkey=keys.public_key(payee_priv),
            expiry_height=tip + lifetime_blocks,
            deposit_sat=deposit_sat,
            payer_script=payer_script,
        )
        made.append((secrets.token_hex(16), params, payee_priv))
    txid = bitcoind.rpc("sendmany", "", {p.funding_address: sat_to_btc(deposit_sat) for _, p, _ in made}, wallet=wallet)
    vouts = {o["scriptPubKey"]["hex"]: o["n"] for o in bitcoind.transaction(txid)["vout"]}
    bitcoind.mine(1)
    now = time.time()
    for cid, params, priv in made:
        store.insert_proposal(
            PayeeRecord(
                channel_id=cid,
                state=ChannelState.PROPOSED,
                params=params.to_json(),
                privkey=priv,
                deposit_sat=deposit_sat,
                expiry_height=params.expiry_height,
                created_at=now,
                created_height=tip,
                payout_script=payout.hex(),
            )
        )
        store.set_funding(cid, txid, vouts[params.funding_script.hex()], 1)
        store.set_confirmations(cid, 1, open_now=True)
    return [cid for cid, _, _ in made]
