"""Following the node's chain: its state (:func:`chain_state`: height, best block hash, initial
block download, chain name) and the names bitcoind gives btcchannel's networks.

::

    async def chain_state(node: Node) -> ChainState      # one getblockchaininfo
    async def mempool_fee(node: Node, txid: str) -> tuple[int, int] | None   # (fee sat, vsize)
    BITCOIND_CHAIN["mainnet"] == "main"                  # btcchannel network -> bitcoind chain
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, Mapping

from btcchannel.amounts import btc_to_sat
from btcchannel.bitcoind.rpc import Node
from btcchannel.errors import NodeError, RpcInvalidAddressOrKey

__all__ = ["BITCOIND_CHAIN", "ChainState", "chain_state", "mempool_fee"]

#: btcchannel's network names -> the ``chain`` bitcoind's getblockchaininfo reports
BITCOIND_CHAIN: Final[Mapping[str, str]] = MappingProxyType({
    "mainnet": "main", "testnet": "test", "testnet4": "testnet4", "signet": "signet", "regtest": "regtest",
})


@dataclass(frozen=True)
class ChainState:
    """The node's view of the chain at one moment."""

    chain: str           # bitcoind's name: main, test, testnet4, signet, regtest
    height: int          # of the best block
    best_hash: str
    ibd: bool            # the node is in initial block download (its view is not current)


async def chain_state(node: Node) -> ChainState:
    """The node's chain, best block and download state (one ``getblockchaininfo``)."""
    info = await node.call("getblockchaininfo")
    try:
        return ChainState(
            chain=str(info["chain"]), height=int(info["blocks"]), best_hash=str(info["bestblockhash"]),
            ibd=bool(info.get("initialblockdownload", False)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise NodeError(f"getblockchaininfo: malformed reply: {exc}") from exc


async def mempool_fee(node: Node, txid: str) -> tuple[int, int] | None:
    """(fee in satoshis, vsize) of ``txid`` in the node's mempool; None if it is not there."""
    try:
        entry = await node.call("getmempoolentry", txid)
    except RpcInvalidAddressOrKey:
        return None
    try:
        return btc_to_sat(entry["fees"]["base"]), int(entry["vsize"])
    except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
        raise NodeError(f"getmempoolentry: malformed reply: {exc}") from exc
