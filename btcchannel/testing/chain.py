"""The node as tests and the demo read it: RPC clients per wallet, transactions with their fees.

- :func:`node_for`: a :class:`~btcchannel.bitcoind.rpc.Node` on a wallet of a regtest node;
- :func:`sats`, :func:`tx_of`: BTC floats to satoshis, a decoded transaction;
- :class:`Chain`: an async view of any regtest node (ours or one given by URL): mine, wallets
  and balances, :class:`TxView` (size, fee, fee rate, outputs), spenders of an outpoint,
  :class:`ChannelView` (a funding output, its confirmed spend and who that spend pays);
- :func:`assert_node_error`, :func:`assert_node_error_async`: a call must fail with this RPC
  error (a code or a :class:`~btcchannel.errors.NodeError` class), like Bitcoin Core's
  ``assert_raises_rpc_error``.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from btcchannel.amounts import btc_to_sat, sat_to_btc
from btcchannel.bitcoind.errors import RpcWalletAlreadyLoaded, RpcWalletError
from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.bitcoind.rpc import Node
from btcchannel.errors import ChannelError, NodeError
from btcchannel.wait import wait_until_async

WAIT_S = 30.0
SEARCH_BLOCKS = 2_000  # without a transaction index, confirmed transactions are looked for this deep


def node_for(bitcoind: RegtestNode, wallet: str | None) -> Node:
    """An async RPC client on ``bitcoind`` bound to ``wallet`` (the caller closes it)."""
    return Node(bitcoind.rpc_url, cookie_file=bitcoind.cookie_file, wallet=wallet)


def sats(btc: float) -> int:
    """A BTC amount as the node prints it, in satoshis."""
    return round(btc * 100_000_000)


def tx_of(bitcoind: RegtestNode, txid: str) -> dict[str, Any]:
    """``getrawtransaction txid true``, also on a node without a transaction index
    (:meth:`~btcchannel.bitcoind.regtest.RegtestNode.transaction`)."""
    return bitcoind.transaction(txid, 1)


def _matches(err: NodeError, expected: int | type[NodeError], message: str | None) -> bool:
    kind = err.rpc_code == expected if isinstance(expected, int) else isinstance(err, expected)
    return kind and (message is None or message in str(err))


def _unexpected(expected: int | type[NodeError], message: str | None, got: object) -> AssertionError:
    want = f"RPC error {expected}" if isinstance(expected, int) else expected.__name__
    return AssertionError(f"expected {want}" + (f" containing {message!r}" if message else "") + f", got {got!r}")


def assert_node_error(
    expected: int | type[NodeError], fn: Callable[..., Any], *args: Any, message: str | None = None
) -> NodeError:
    """``fn(*args)`` must raise a :class:`NodeError` with this ``rpc_code`` (or of this class)."""
    try:
        got = fn(*args)
    except NodeError as err:
        if not _matches(err, expected, message):
            raise _unexpected(expected, message, err) from err
        return err
    raise _unexpected(expected, message, got)


async def assert_node_error_async(
    expected: int | type[NodeError],
    call: Callable[..., Awaitable[Any]] | Awaitable[Any],
    *args: Any,
    message: str | None = None,
) -> NodeError:
    """:func:`assert_node_error` for a coroutine function (with ``args``) or an awaitable."""
    try:
        got = await (call if inspect.isawaitable(call) else call(*args))
    except NodeError as err:
        if not _matches(err, expected, message):
            raise _unexpected(expected, message, err) from err
        return err
    raise _unexpected(expected, message, got)


@dataclass(frozen=True)
class TxView:
    """One transaction as the node shows it (amounts in satoshis)."""

    txid: str
    vsize: int
    fee_sat: int
    confirmations: int
    height: int | None
    outputs: list[tuple[int, str, str]]  # (value_sat, scriptPubKey hex, address or "")

    @property
    def fee_rate(self) -> float:
        return self.fee_sat / self.vsize


@dataclass(frozen=True)
class ChannelView:
    """A channel as the node shows it: its funding, the confirmed spends of the funding output,
    and what the first spend pays each wallet asked about (``""``: outputs none of them own)."""

    funding: TxView
    spenders: list[str]
    spend: TxView | None
    paid_to: dict[str, int]

    @property
    def onchain_transactions(self) -> int:
        return 1 + len(self.spenders)

    @property
    def channel_vbytes(self) -> int:
        return self.funding.vsize + (self.spend.vsize if self.spend is not None else 0)


class Chain:
    """An async view of a regtest node through :class:`~btcchannel.bitcoind.rpc.Node`."""

    def __init__(self, url: str, auth: tuple[str, str] | None = None, cookie_file: Any = None) -> None:
        self.url, self.auth, self.cookie_file = url, auth, cookie_file
        self.node = Node(url, auth=auth, cookie_file=cookie_file)
        self._wallet_nodes: list[Node] = []
        self._mining_address: str | None = None

    @classmethod
    def of(cls, bitcoind: RegtestNode) -> Chain:
        """The view of a node this process started."""
        return cls(bitcoind.rpc_url, auth=(bitcoind.rpc_user, bitcoind.rpc_password))

    def wallet_node(self, wallet: str) -> Node:
        """A :class:`Node` bound to ``wallet`` (closed with the chain)."""
        node = Node(self.url, auth=self.auth, cookie_file=self.cookie_file, wallet=wallet)
        self._wallet_nodes.append(node)
        return node

    async def aclose(self) -> None:
        for node in [*self._wallet_nodes, self.node]:
            await node.aclose()

    async def __aenter__(self) -> Chain:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def rpc(self, method: str, *params: Any, wallet: str | None = None) -> Any:
        return await self.node.call(method, *params, wallet=wallet)

    async def tip(self) -> int:
        return await self.node.tip_height()

    async def ensure_wallet(self, name: str) -> None:
        """Create (or load) a descriptor wallet."""
        try:
            await self.rpc("createwallet", name)
        except RpcWalletError:  # it already exists
            try:
                await self.rpc("loadwallet", name)
            except RpcWalletAlreadyLoaded:
                pass

    async def new_address(self, wallet: str) -> str:
        return str(await self.rpc("getnewaddress", "", "bech32", wallet=wallet))

    async def mine(self, n: int) -> None:
        """Mine ``n`` blocks to the ``miner`` wallet."""
        if self._mining_address is None:
            self._mining_address = await self.new_address("miner")
        await self.rpc("generatetoaddress", n, self._mining_address)

    async def balance_sat(self, wallet: str) -> int:
        return btc_to_sat(await self.rpc("getbalance", wallet=wallet))

    async def in_mempool(self, txid: str) -> bool:
        try:
            await self.rpc("getmempoolentry", txid)
        except NodeError:
            return False
        return True

    async def raw(self, txid: str) -> dict[str, Any] | None:
        """The transaction (``getrawtransaction`` verbose), also without a transaction index: a
        confirmed one is looked for in the last ``SEARCH_BLOCKS`` blocks; None if not found."""
        tx = await self.node.get_transaction(txid)
        if tx is None:
            tip = await self.tip()
            if await self.node.tx_confirmations(txid, search_from=tip - SEARCH_BLOCKS) is not None:
                tx = await self.node.get_transaction(txid)
        return tx

    async def confirmations(self, txid: str) -> int:
        """Confirmations of ``txid``: 0 in the mempool, -1 unknown."""
        tx = await self.raw(txid)
        return int(tx.get("confirmations", 0)) if tx else -1

    async def known(self, txid: str) -> bool:
        """In the mempool or in a block."""
        return await self.in_mempool(txid) or await self.confirmations(txid) >= 1

    async def wait_known(self, txid: str, what: str, timeout: float = WAIT_S) -> None:
        await wait_until_async(lambda: self.known(txid), timeout=timeout, what=f"{what} {txid} to reach the node")

    async def wait_confirmed(self, txid: str, what: str, timeout: float = WAIT_S) -> None:
        async def confirmed() -> bool:
            return await self.confirmations(txid) >= 1

        await wait_until_async(confirmed, timeout=timeout, what=f"{what} {txid} to confirm")

    async def view(self, txid: str) -> TxView:
        """Size, fee (its inputs looked up too), outputs and confirmations of ``txid``."""
        tx = await self.raw(txid)
        if tx is None:
            raise NodeError(f"the node does not know transaction {txid}")
        inputs = 0
        for vin in tx["vin"]:
            prev = await self.raw(vin["txid"])
            if prev is None:
                raise NodeError(f"the node does not know {vin['txid']} (not in the last {SEARCH_BLOCKS} blocks)")
            inputs += btc_to_sat(prev["vout"][vin["vout"]]["value"])
        outputs = [
            (btc_to_sat(o["value"]), str(o["scriptPubKey"]["hex"]), str(o["scriptPubKey"].get("address", "")))
            for o in tx["vout"]
        ]
        height = None
        if tx.get("blockhash"):
            height = int((await self.rpc("getblockheader", tx["blockhash"]))["height"])
        return TxView(
            txid=txid,
            vsize=int(tx["vsize"]),
            fee_sat=inputs - sum(v for v, _, _ in outputs),
            confirmations=int(tx.get("confirmations", 0)),
            height=height,
            outputs=outputs,
        )

    async def spenders(self, txid: str, vout: int, from_height: int) -> list[str]:
        """Every confirmed transaction spending ``txid:vout`` (blocks ``from_height`` .. tip)."""
        found = []
        for height in range(from_height, await self.tip() + 1):
            block = await self.rpc("getblock", await self.rpc("getblockhash", height), 2)
            for tx in block["tx"]:
                if any(i.get("txid") == txid and i.get("vout") == vout for i in tx["vin"]):
                    found.append(str(tx["txid"]))
        return found

    async def is_mine(self, address: str, wallet: str) -> bool:
        return bool(address) and bool((await self.rpc("getaddressinfo", address, wallet=wallet))["ismine"])

    async def channel_view(self, funding_txid: str, funding_vout: int, wallets: tuple[str, ...]) -> ChannelView:
        """The funding transaction, the confirmed spends of ``funding_txid:funding_vout`` and how
        the first one's outputs split among ``wallets``."""
        funding = await self.view(funding_txid)
        spenders = [] if funding.height is None else await self.spenders(funding_txid, funding_vout, funding.height)
        spend = await self.view(spenders[0]) if spenders else None
        paid_to = dict.fromkeys((*wallets, ""), 0)
        for value, _, address in spend.outputs if spend is not None else []:
            owner = ""
            for wallet in wallets:
                if await self.is_mine(address, wallet):
                    owner = wallet
                    break
            paid_to[owner] += value
        return ChannelView(funding, spenders, spend, paid_to)

    async def prepare(self, wallets: tuple[str, ...], fund: dict[str, int], height: int = 201) -> None:
        """Check it is a regtest node (with its transaction index synced, if it keeps one), mine
        past ``height``, create ``wallets`` (and ``miner``) and pay each wallet of ``fund`` its
        amount, confirmed."""
        info = await self.rpc("getblockchaininfo")
        if info["chain"] != "regtest":
            raise ChannelError(f"this mines blocks: it needs a regtest node, not {info['chain']}")

        async def synced() -> bool:
            index = (await self.rpc("getindexinfo")).get("txindex")
            return index is None or bool(index["synced"])

        await wait_until_async(synced, timeout=WAIT_S, what="the txindex to sync")
        for wallet in ("miner", *wallets):
            await self.ensure_wallet(wallet)
        tip = await self.tip()
        if tip < height:
            await self.mine(height - tip)
        if await self.balance_sat("miner") < sum(fund.values()) + 100_000_000:
            await self.mine(101)
        for wallet, amount in fund.items():
            txid = str(
                await self.rpc("sendtoaddress", await self.new_address(wallet), sat_to_btc(amount), wallet="miner")
            )
            await wait_until_async(
                lambda: self.in_mempool(txid), timeout=WAIT_S, what=f"the funding of {wallet} to reach the mempool"
            )
        await self.mine(1)
