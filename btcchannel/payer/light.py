"""A payer without RPC access to a full node: its wallet and chain view through BDK (``bdkpython``)
and compact block filters (BIP157/158) from any node that serves them (``-blockfilterindex=1
-peerblockfilters=1``), over the peer-to-peer protocol.

:class:`LightNode` stands in for :class:`~btcchannel.bitcoind.rpc.Node` in a
:class:`~btcchannel.payer.client.PayerClient`: it funds channels from a BDK descriptor wallet,
broadcasts to the peer, and answers the chain questions the payer asks (the tip, a transaction's
confirmations, whether an output is unspent) from that wallet, kept current by a background task
that applies each filter sync. What it sees is what the wallet sees: its own transactions (the
fundings it sends) and every transaction paying it (closes with the payer's change, refunds).

Limits: no mempool (a transaction counts once it is in a block; 0 confirmations before);
broadcasting cannot report a rejection (a refused transaction simply never confirms); a close
that pays the payer nothing (a full drain) is not seen by the wallet, so the refund path's
"already spent" check relies on the payee's report for those. Other node RPCs raise
NodeUnavailable.

::

    node = LightNode(descriptor, change_descriptor, "regtest", [("127.0.0.1", 18444)], datadir)
    await node.start()                  # connects, syncs, keeps syncing
    async with PayerClient(datadir, node, network="regtest") as client: ...
    await node.aclose()
"""

from __future__ import annotations

import asyncio
import ipaddress
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import bdkpython as bdk

from btcchannel.bitcoind.errors import RpcWalletError
from btcchannel.bitcoind.rpc import Node, TxOutInfo
from btcchannel.core.tx import OutPoint
from btcchannel.errors import NodeUnavailable
from btcchannel.wait import wait_until_async

__all__ = ["LightNode"]

_NETWORKS = {
    "mainnet": bdk.Network.BITCOIN,
    "testnet": bdk.Network.TESTNET,
    "testnet4": bdk.Network.TESTNET4,
    "signet": bdk.Network.SIGNET,
    "regtest": bdk.Network.REGTEST,
}


class LightNode(Node):
    """A BDK wallet synced by compact block filters from ``peers``; the payer's view of the chain."""

    def __init__(
        self,
        descriptor: str,
        change_descriptor: str,
        network: str,
        peers: Sequence[tuple[str, int]],
        datadir: str | Path,
        *,
        fee_rate_sat_vb: float = 2.0,
        sync_timeout: float = 60.0,
    ) -> None:
        super().__init__("light://", auth=("", ""))  # no RPC: every method used by the payer is overridden
        if network not in _NETWORKS:
            raise NodeUnavailable(f"unknown network {network!r}")
        self.network = network
        self.fee_rate_sat_vb = fee_rate_sat_vb
        self.sync_timeout = sync_timeout
        self.datadir = Path(datadir)
        self.datadir.mkdir(parents=True, exist_ok=True, mode=0o700)
        kind = bdk.NetworkKind.MAIN if network == "mainnet" else bdk.NetworkKind.TEST
        ext, chg = bdk.Descriptor(descriptor, kind), bdk.Descriptor(change_descriptor, kind)
        self._persister = bdk.Persister.new_sqlite(str(self.datadir / "light-wallet.sqlite"))
        try:
            self._wallet = bdk.Wallet.load(ext, chg, self._persister)
        except bdk.LoadWithPersistError:  # no wallet stored yet
            self._wallet = bdk.Wallet(ext, chg, _NETWORKS[network], self._persister)
        self._peers = [bdk.Peer(address=_ip(host), port=port, v2_transport=False) for host, port in peers]
        self._components: Any = None
        self._thread: threading.Thread | None = None
        self._syncer: asyncio.Task[None] | None = None
        self._synced = asyncio.Event()
        self._problem: str | None = None

    # -- life ------------------------------------------------------------------------------
    def _launch(self) -> None:
        """Build and run the filter client for the wallet (it resumes from the wallet's last checkpoint)."""
        builder = bdk.CbfBuilder().peers(self._peers).connections(len(self._peers))
        builder = builder.data_dir(str(self.datadir / "cbf")).scan_type(bdk.ScanType.SYNC())
        self._components = builder.build(self._wallet)
        self._thread = threading.Thread(target=self._components.node.run, name="cbf-node", daemon=True)
        self._thread.start()

    async def _stop_client(self) -> None:
        if self._components is not None:
            try:
                self._components.client.shutdown()
            except bdk.CbfError:  # already stopped
                pass
            self._components = None
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10.0)
            self._thread = None

    async def start(self) -> LightNode:
        """Connect to the peers and wait for the first filter sync (NodeUnavailable after ``sync_timeout``)."""
        self._launch()
        self._syncer = asyncio.get_running_loop().create_task(self._sync_forever())
        try:
            await asyncio.wait_for(self._synced.wait(), self.sync_timeout)
        except asyncio.TimeoutError:
            await self.aclose()
            raise NodeUnavailable(
                f"no compact block filter sync from {len(self._peers)} peer(s) in "
                f"{self.sync_timeout:g} s ({self._problem or 'no answer'})"
            ) from None
        return self

    async def _sync_forever(self) -> None:
        while True:
            try:
                update = await self._components.client.update()
            except asyncio.CancelledError:
                raise
            except bdk.CbfError as exc:
                # the client stops when it loses its last peer, e.g. one that disconnected it for asking a
                # filter its index had not computed yet (Core builds the filter index after the block):
                # keep the wallet's view and start a new client from its last checkpoint
                self._problem = f"{type(exc).__name__}: {exc}"
                await self._stop_client()
                await asyncio.sleep(0.5)
                self._launch()
                continue
            self._problem = None
            self._wallet.apply_update(update)
            self._wallet.persist(self._persister)
            self._synced.set()

    async def aclose(self) -> None:
        """Stop syncing and disconnect."""
        if self._syncer is not None:
            self._syncer.cancel()
            try:
                await self._syncer
            except asyncio.CancelledError:
                pass
            self._syncer = None
        await self._stop_client()
        await super().aclose()

    # -- what the payer asks --------------------------------------------------------------
    async def call(self, method: str, *params: Any, wallet: str | None = None) -> Any:
        raise NodeUnavailable(f"a light payer has no node RPC ({method})")

    async def tip_height(self) -> int:
        """The height of the last block the wallet synced to."""
        return int(self._wallet.latest_checkpoint().height)

    async def wait_for_height(self, height: int, timeout: float = 60.0) -> int:
        """Wait until the synced tip reaches ``height``; the tip."""

        async def reached() -> int | None:
            tip = await self.tip_height()
            return tip if tip >= height else None

        try:
            return await wait_until_async(reached, timeout=timeout, what=f"the light wallet to sync to height {height}")
        except TimeoutError as exc:
            raise NodeUnavailable(f"{exc} (last filter client problem: {self._problem})") from None

    async def new_address(self) -> str:
        """A fresh receiving address of the wallet (persisted before it is handed out)."""
        info = self._wallet.reveal_next_address(bdk.KeychainKind.EXTERNAL)
        self._wallet.persist(self._persister)
        return str(info.address)

    def balance_sat(self) -> int:
        """The wallet's confirmed and pending balance."""
        return int(self._wallet.balance().total.to_sat())

    async def estimate_fee_rate(self, conf_target: int = 6, fallback_sat_vb: float = 2.0) -> float:
        """The configured rate (a filter client sees no mempool to estimate from)."""
        return max(self.fee_rate_sat_vb, fallback_sat_vb)

    async def fund_output(self, script: bytes, amount_sat: int, *, fee_rate_sat_vb: float | None = None) -> OutPoint:
        """Pay exactly ``amount_sat`` to ``script`` from the wallet, sign, broadcast; the outpoint."""
        rate = max(1, round(fee_rate_sat_vb or self.fee_rate_sat_vb))
        try:
            psbt = (
                bdk.TxBuilder()
                .add_recipient(bdk.Script(script), bdk.Amount.from_sat(amount_sat))
                .fee_rate(bdk.FeeRate.from_sat_per_vb(rate))
                .finish(self._wallet)
            )
            if not self._wallet.sign(psbt):
                raise RpcWalletError("the light wallet could not sign the funding")
        except RpcWalletError:
            raise
        except (bdk.CreateTxError, bdk.SignerError) as exc:  # e.g. insufficient funds
            raise RpcWalletError(f"the light wallet cannot fund {amount_sat} sat: {exc}") from None
        tx = psbt.extract_tx()
        txid = str(tx.compute_txid())
        vout = next(
            n
            for n, out in enumerate(tx.output())
            if out.script_pubkey.to_bytes() == script and out.value.to_sat() == amount_sat
        )
        await self.broadcast(tx.serialize().hex())
        return OutPoint(txid, vout)

    async def broadcast(self, tx_hex: str) -> str:
        """Hand the transaction to the peers (and to the wallet as unconfirmed, so its coins are not reused)."""
        tx = bdk.Transaction(bytes.fromhex(tx_hex))
        await self._components.client.broadcast(tx)
        self._wallet.apply_unconfirmed_txs([bdk.UnconfirmedTx(tx=tx, last_seen=int(time.time()))])
        self._wallet.persist(self._persister)
        return str(tx.compute_txid())

    def _canonical(self) -> list[Any]:
        return list(self._wallet.transactions())

    def _height_of(self, ctx: Any) -> int | None:
        pos = ctx.chain_position
        if pos.is_confirmed():
            return int(pos.confirmation_block_time.block_id.height)
        return None

    async def tx_confirmations(self, txid: str, search_from: int | None = None) -> int | None:
        """Confirmations of a wallet transaction: 0 unconfirmed, None unknown to the wallet
        (``search_from`` is the full node's block-scan hint: the wallet knows its own)."""
        for ctx in self._canonical():
            if str(ctx.transaction.compute_txid()) == txid:
                height = self._height_of(ctx)
                return 0 if height is None else await self.tip_height() - height + 1
        return None

    async def get_transaction(self, txid: str, blockhash: str | None = None) -> dict[str, Any] | None:
        """A wallet transaction as ``{"txid", "hex", "confirmations", "vin"}``; None if the wallet does not
        know it (``blockhash``: the full node's lookup hint, unused here)."""
        for ctx in self._canonical():
            tx = ctx.transaction
            if str(tx.compute_txid()) == txid:
                height = self._height_of(ctx)
                return {
                    "txid": txid,
                    "hex": tx.serialize().hex(),
                    "confirmations": 0 if height is None else await self.tip_height() - height + 1,
                    "vin": [
                        {"txid": str(i.previous_output.txid), "vout": int(i.previous_output.vout)} for i in tx.input()
                    ],
                }
        return None

    async def get_txout(self, outpoint: OutPoint, include_mempool: bool = True) -> TxOutInfo | None:
        """The output at ``outpoint`` of a wallet transaction, unless a wallet transaction spends it (in a
        block, or unconfirmed with ``include_mempool``); None when spent or not a wallet transaction."""
        created: TxOutInfo | None = None
        for ctx in self._canonical():
            tx, height = ctx.transaction, self._height_of(ctx)
            if height is not None or include_mempool:
                if any(
                    str(i.previous_output.txid) == outpoint.txid and int(i.previous_output.vout) == outpoint.vout
                    for i in tx.input()
                ):
                    return None
            if str(tx.compute_txid()) == outpoint.txid and outpoint.vout < len(tx.output()):
                if height is None and not include_mempool:
                    continue
                out = tx.output()[outpoint.vout]
                confs = 0 if height is None else await self.tip_height() - height + 1
                created = TxOutInfo(out.value.to_sat(), out.script_pubkey.to_bytes(), confs)
        return created


def _ip(host: str) -> Any:
    addr = ipaddress.ip_address(host)
    if isinstance(addr, ipaddress.IPv4Address):
        return bdk.IpAddress.from_ipv4(*addr.packed)
    parts = [int.from_bytes(addr.packed[i : i + 2], "big") for i in range(0, 16, 2)]
    return bdk.IpAddress.from_ipv6(*parts)
