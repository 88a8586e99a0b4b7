"""The block-driven watcher on a real regtest node: a new block costs one ``getblock`` whatever the
number of channels; a block that touches a channel, and a reorganisation, are noticed."""

from __future__ import annotations

from pathlib import Path

from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.payee.closer import Closer
from btcchannel.payee.http import WATCHER
from btcchannel.payee.shared import ChainTip
from btcchannel.payee.watcher import Watcher
from btcchannel.payer.client import PayerClient
from btcchannel.store import PayeeStore
from btcchannel.testing import fast_config, start_payee
from btcchannel.testing.fixtures import PayeeFactory
from btcchannel.testing.watched import CountingNode, open_watched_channels


async def test_one_block_costs_one_getblock_with_1000_channels(
    bitcoind: RegtestNode,
    funded_wallet: str,
    tmp_path: Path,
) -> None:
    config = fast_config(tmp_path / "payee")
    config.datadir.mkdir(parents=True)
    store = PayeeStore(config.db_path)
    try:
        cids = open_watched_channels(store, bitcoind, funded_wallet, 1000)
        async with CountingNode(bitcoind.rpc_url, cookie_file=bitcoind.cookie_file, wallet="miner") as node:
            closer = Closer(config, store, node)
            watcher = Watcher(config, store, node, closer, ChainTip())
            await closer.start()
            await watcher.start()
            await watcher.step()  # the first pass looks at every channel once
            assert node.calls["gettxout"] >= 1000
            depth = {cid: store.get(cid).confirmations for cid in cids[:5]}
            assert all(d >= 1 for d in depth.values())
            for _ in range(3):
                bitcoind.mine(1)
                node.calls.clear()
                await watcher.step()
                assert node.calls["getblock"] == 1, node.calls
                assert sum(node.calls.values()) <= 3, node.calls  # the tip, the block: nothing per channel
            # the channel object's depth still follows the chain (no per-channel call)
            for cid, d in depth.items():
                assert store.get(cid).confirmations == d + 3
                info = bitcoind.rpc("gettxout", store.get(cid).funding_txid, store.get(cid).funding_vout)
                assert info["confirmations"] == d + 3
            assert store.chain_cursor() == (bitcoind.tip_height(), bitcoind.rpc("getbestblockhash"))
            # a reorganisation: every channel is looked at again
            bitcoind.rpc("invalidateblock", bitcoind.rpc("getbestblockhash"))
            node.calls.clear()
            await watcher.step()
            assert node.calls["gettxout"] >= 1000
            assert all(store.get(cid).state == "open" for cid in cids)
    finally:
        store.close()


async def test_vanished_funding_costs_no_block_scans(
    bitcoind: RegtestNode,
    funded_wallet: str,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    """A funding double-spent after a close request: each pass stays O(new blocks), not O(blocks
    since the channel was created)."""
    async with CountingNode(bitcoind.rpc_url, cookie_file=bitcoind.cookie_file, wallet="miner") as node:
        srv = await start_payee(payee_factory.config("counted", final_confirmations=100), node, run_watcher=False)
        try:
            cid = await payer_client.open_channel(srv.url, 100_000, 300, wait_open=False)
            assert (await payer_client.close(cid))["state"] == "closing"
            funding = srv.store.get(cid).funding_txid
            bitcoind.rpc("bumpfee", funding, wallet=funded_wallet)
            watcher = srv.app[WATCHER]
            await watcher.step()
            for blocks in (1, 20, 60):
                bitcoind.mine(blocks)
                await watcher.step()  # catch up (the conflict is found once, then remembered)
                node.calls.clear()
                bitcoind.mine(1)
                await watcher.step()
                assert node.calls["getblock"] == 1, node.calls  # the new block only
            assert srv.store.get(cid).state == "closing"  # the conflict is not final yet
        finally:
            await srv.stop()
