"""A payer with no node RPC at all: a BDK wallet synced by compact block filters from a regtest node
serving them (``-blockfilterindex=1 -peerblockfilters=1``). It opens a channel, pays, follows the
funding's depth and a close, and refunds after expiry; the payee runs on its own node, a peer of
the filter node."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from bip32 import BIP32

from btcchannel.bitcoind.binary import BitcoindBinary
from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.core.tx import OutPoint
from btcchannel.errors import NodeUnavailable
from btcchannel.payer.client import PayerClient
from btcchannel.payer.light import LightNode
from btcchannel.testing import RunningPayee, wait_until, wait_until_async


@pytest.fixture
def filter_node(bitcoind: RegtestNode, bitcoind_binary: BitcoindBinary, tmp_path: Path) -> Iterator[RegtestNode]:
    """A node serving compact block filters, a peer of the shared test node (whose blocks it follows)."""
    node = RegtestNode(
        datadir=tmp_path / "filters",
        binary=bitcoind_binary,
        zmq=False,
        extra_args=("-blockfilterindex=1", "-peerblockfilters=1"),
    )
    node.start()
    try:
        node.connect(bitcoind)
        wait_until(lambda: node.tip_height() == bitcoind.tip_height(), timeout=60, what="the filter node to sync")
        yield node
    finally:
        node.stop()


@pytest.fixture
async def light(filter_node: RegtestNode, tmp_path: Path) -> AsyncIterator[LightNode]:
    master = BIP32.from_seed(bytes(range(32)), network="test").get_xpriv()
    node = LightNode(
        f"wpkh({master}/84h/1h/0h/0/*)",
        f"wpkh({master}/84h/1h/0h/1/*)",
        "regtest",
        [("127.0.0.1", filter_node.p2p_port)],
        tmp_path / "light",
    )
    await node.start()
    try:
        yield node
    finally:
        await node.aclose()


def _synced(bitcoind: RegtestNode, filter_node: RegtestNode) -> None:
    wait_until(lambda: filter_node.tip_height() == bitcoind.tip_height(), timeout=60, what="the filter node to sync")


async def test_light_payer_opens_pays_follows_and_refunds(
    bitcoind: RegtestNode,
    filter_node: RegtestNode,
    light: LightNode,
    funded_wallet: str,
    payee: RunningPayee,
    tmp_path: Path,
) -> None:
    with pytest.raises(NodeUnavailable):
        await light.call("getblockchaininfo")  # no RPC: everything below goes through filters and P2P
    bitcoind.send(funded_wallet, await light.new_address(), 2_000_000)
    bitcoind.mine(1)
    _synced(bitcoind, filter_node)
    await wait_until_async(lambda: light.balance_sat() == 2_000_000, timeout=60, what="the light wallet's coins")
    assert await light.tip_height() == bitcoind.tip_height()

    async with PayerClient(tmp_path / "payer", light, network="regtest") as client:
        refunded = await client.open_channel(payee.url, 300_000, 20, wait_open=False)
        closed = await client.open_channel(payee.url, 200_000, 20, wait_open=False)
        funding = {cid: client.store.get(cid).funding_txid for cid in (refunded, closed)}
        assert all(txid in bitcoind.rpc("getrawmempool") for txid in funding.values())  # relayed by the peer
        bitcoind.mine(1)
        _synced(bitcoind, filter_node)
        for cid in (refunded, closed):
            await client.wait_open(cid, timeout=60)
        assert await client.pay(refunded, 1_000) == 1_000
        assert await client.pay(closed, 7_000) == 7_000

        # the funding's depth, as the filters show it
        bitcoind.mine(2)
        _synced(bitcoind, filter_node)
        await light.wait_for_height(bitcoind.tip_height())
        for txid in funding.values():
            assert (
                await light.tx_confirmations(txid) == 3 == bitcoind.rpc("getrawtransaction", txid, 1)["confirmations"]
            )

        # a close: the payer's change comes back to the light wallet, which sees the close in a block
        close_txid = (await client.close(closed))["close_txid"]
        await wait_until_async(lambda: close_txid in bitcoind.rpc("getrawmempool"), timeout=30, what="the close")
        bitcoind.mine(1)
        _synced(bitcoind, filter_node)
        await light.wait_for_height(bitcoind.tip_height())
        assert await light.tx_confirmations(close_txid) == 1
        funding_out = client.store.get(closed)
        assert funding_out.funding_txid is not None and funding_out.funding_vout is not None
        assert await light.get_txout(OutPoint(funding_out.funding_txid, funding_out.funding_vout)) is None

        # the payee vanishes: the deposit comes back after expiry, through the filters and P2P only
        await payee.stop()
        expiry = client.store.get(refunded).expiry_height
        bitcoind.mine(expiry - bitcoind.tip_height())
        _synced(bitcoind, filter_node)
        await light.wait_for_height(expiry)
        before = light.balance_sat()
        refund_txid = await client.refund(refunded)
        await wait_until_async(lambda: refund_txid in bitcoind.rpc("getrawmempool"), timeout=30, what="the refund")
        bitcoind.mine(1)
        _synced(bitcoind, filter_node)
        await light.wait_for_height(bitcoind.tip_height())
        assert await light.tx_confirmations(refund_txid) == 1
        refund = bitcoind.rpc("getrawtransaction", refund_txid, 1)
        assert refund["vin"][0]["txid"] == funding[refunded] and refund["locktime"] == expiry
        got = round(refund["vout"][0]["value"] * 100_000_000)
        assert 300_000 - 1_000 < got < 300_000 and light.balance_sat() == before + got
