"""The block-driven watcher on a real regtest node: a new block costs one ``getblock`` whatever the
number of channels; a block that touches a channel, and a reorganisation, are noticed."""

from __future__ import annotations

from pathlib import Path

from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.payee.closer import Closer
from btcchannel.payee.shared import ChainTip
from btcchannel.payee.watcher import Watcher
from btcchannel.store import PayeeStore
from btcchannel.testing import fast_config
from btcchannel.testing.watched import CountingNode, open_watched_channels


async def test_one_block_costs_one_getblock_with_1000_channels(
    bitcoind: RegtestNode, funded_wallet: str, tmp_path: Path,
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
            for _ in range(3):
                bitcoind.mine(1)
                node.calls.clear()
                await watcher.step()
                assert node.calls["getblock"] == 1, node.calls
                assert sum(node.calls.values()) <= 3, node.calls  # the tip, the block: nothing per channel
            assert store.chain_cursor() == (bitcoind.tip_height(), bitcoind.rpc("getbestblockhash"))
            # a reorganisation: every channel is looked at again
            bitcoind.rpc("invalidateblock", bitcoind.rpc("getbestblockhash"))
            node.calls.clear()
            await watcher.step()
            assert node.calls["gettxout"] >= 1000
            assert all(store.get(cid).state == "open" for cid in cids)
    finally:
        store.close()
