"""Following the node's chain: its state (:func:`chain_state`: height, best block hash, initial
block download, chain name), the names bitcoind gives btcchannel's networks, and
:class:`BlockFollower`, which fetches each new block once and walks back to the fork point on a
reorganisation.

::

    async def chain_state(node: Node) -> ChainState      # one getblockchaininfo
    async def mempool_fee(node: Node, txid: str) -> tuple[int, int] | None   # (fee sat, vsize)
    async def mempool_package(node: Node, txid: str) -> MempoolPackage | None  # with its descendants
    async def mempool_spender(node: Node, outpoint: OutPoint) -> str | None  # gettxspendingprevout
    async def require_blocks_after(node: Node, height: int) -> None   # NodePruned if pruned past it
    BlockFollower(node, cursor=(height, hash)).advance(best_hash) -> Advance(blocks, reorg, restart)
    BITCOIND_CHAIN["mainnet"] == "main"                  # btcchannel network -> bitcoind chain
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, Mapping

from btcchannel.amounts import btc_to_sat
from btcchannel.bitcoind.errors import RpcInvalidAddressOrKey
from btcchannel.bitcoind.rpc import Node
from btcchannel.core.tx import OutPoint
from btcchannel.errors import NodeError, NodePruned

__all__ = [
    "BITCOIND_CHAIN",
    "ChainState",
    "chain_state",
    "mempool_fee",
    "MempoolPackage",
    "mempool_package",
    "mempool_spender",
    "require_blocks_after",
    "Advance",
    "BlockFollower",
]

#: btcchannel's network names -> the ``chain`` bitcoind's getblockchaininfo reports
BITCOIND_CHAIN: Final[Mapping[str, str]] = MappingProxyType(
    {
        "mainnet": "main",
        "testnet": "test",
        "testnet4": "testnet4",
        "signet": "signet",
        "regtest": "regtest",
    }
)


@dataclass(frozen=True)
class ChainState:
    """The node's view of the chain at one moment."""

    chain: str  # bitcoind's name: main, test, testnet4, signet, regtest
    height: int  # of the best block
    best_hash: str
    ibd: bool  # the node is in initial block download (its view is not current)
    block_time: int | None = None  # the best block's header time (unix seconds), when the node says


async def chain_state(node: Node) -> ChainState:
    """The node's chain, best block and download state (one ``getblockchaininfo``)."""
    info = await node.call("getblockchaininfo")
    try:
        return ChainState(
            chain=str(info["chain"]),
            height=int(info["blocks"]),
            best_hash=str(info["bestblockhash"]),
            ibd=bool(info.get("initialblockdownload", False)),
            block_time=int(info["time"]) if "time" in info else None,
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


@dataclass(frozen=True)
class MempoolPackage:
    """A mempool transaction with its descendants (``getmempoolentry``): what a replacement of it
    must outbid (BIP125: the fees of everything it evicts, the transaction and all its
    descendants, e.g. a large low-fee child a payer hung on its change)."""

    fee: int  # the transaction's own fee, satoshis
    vsize: int
    descendant_fee: int  # its fee plus every descendant's
    descendant_vsize: int
    descendant_count: int  # itself included

    @property
    def pinned(self) -> bool:
        """Whether other transactions hang on it (a replacement must pay for them too)."""
        return self.descendant_count > 1


async def mempool_package(node: Node, txid: str) -> MempoolPackage | None:
    """``txid``'s :class:`MempoolPackage`, or None if it is not in the node's mempool."""
    try:
        entry = await node.call("getmempoolentry", txid)
    except RpcInvalidAddressOrKey:
        return None
    try:
        fees = entry["fees"]
        return MempoolPackage(
            fee=btc_to_sat(fees["base"]),
            vsize=int(entry["vsize"]),
            descendant_fee=btc_to_sat(fees["descendant"]),
            descendant_vsize=int(entry["descendantsize"]),
            descendant_count=int(entry["descendantcount"]),
        )
    except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
        raise NodeError(f"getmempoolentry: malformed reply: {exc}") from exc


async def require_blocks_after(node: Node, height: int) -> None:
    """Check the node still has every block above ``height`` (the payee's last processed block):
    :class:`~btcchannel.errors.NodePruned` if a pruned node deleted any of them."""
    info = await node.call("getblockchaininfo")
    if not info.get("pruned"):
        return
    prune_height = int(info.get("pruneheight", 0))  # the lowest height whose block is still stored
    if prune_height > height + 1:
        raise NodePruned(
            f"the node has pruned its blocks below height {prune_height}, but the payee last processed "
            f"block {height} and has to read every block after it; resync the node (-reindex) or run "
            f"it with a larger -prune target"
        )


async def mempool_spender(node: Node, outpoint: OutPoint) -> str | None:
    """The txid of the mempool transaction spending ``outpoint`` (``gettxspendingprevout``), or None."""
    res = await node.call("gettxspendingprevout", [{"txid": outpoint.txid, "vout": outpoint.vout}])
    spender = res[0].get("spendingtxid") if res else None
    return str(spender) if spender else None


@dataclass
class Advance:
    """What :meth:`BlockFollower.advance` found: the blocks connected since the last call (oldest
    first, each a ``getblock`` verbosity 2 dict), whether blocks processed before left the chain
    (``reorg``), and whether continuity was lost (``restart``: first call, or too far behind)."""

    blocks: list[dict[str, Any]] = field(default_factory=list)
    reorg: bool = False
    restart: bool = False


class BlockFollower:
    """Follows the node's active chain block by block from the last processed block.

    Each call to :meth:`advance` walks back from the node's best block (``getblock`` verbosity 2,
    which also gives the previous block's hash) to a block it processed before, the fork point on
    a reorganisation, so every new block is fetched exactly once: one RPC call per new block.
    It remembers the last ``keep`` processed blocks; a walk longer than that is a restart.
    """

    def __init__(self, node: Node, cursor: tuple[int, str] | None = None, keep: int = 144) -> None:
        self.node = node
        self.keep = keep
        self._known: dict[str, int] = {}  # hash -> height of the blocks processed, newest `keep`
        self.height, self.hash = cursor if cursor is not None else (-1, "")
        if cursor is not None:
            self._known[cursor[1]] = cursor[0]

    async def advance(self, best_hash: str) -> Advance:
        """The blocks from the last processed one up to ``best_hash`` (see :class:`Advance`)."""
        if best_hash == self.hash:
            return Advance()
        path: list[dict[str, Any]] = []
        h = best_hash
        while h not in self._known:
            block = dict(await self.node.call("getblock", h, 2))
            path.append(block)
            prev = block.get("previousblockhash")
            if not self._known or prev is None or len(path) > self.keep:
                self._reset(int(path[0]["height"]), best_hash)
                return Advance(restart=True)
            h = str(prev)
        fork_height = self._known[h]
        reorg = h != self.hash
        if reorg:
            self._known = {k: v for k, v in self._known.items() if v <= fork_height}
        path.reverse()
        for block in path:
            self._known[str(block["hash"])] = int(block["height"])
        self.height, self.hash = int(path[-1]["height"]) if path else fork_height, best_hash
        if len(self._known) > self.keep:
            floor = self.height - self.keep
            self._known = {k: v for k, v in self._known.items() if v > floor}
        return Advance(path, reorg)

    def _reset(self, height: int, block_hash: str) -> None:
        self._known = {block_hash: height}
        self.height, self.hash = height, block_hash
