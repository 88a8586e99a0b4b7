"""Block notifications over ZMQ on a real regtest node: the payee's watcher processes a new block
at once instead of waiting out its poll interval, and keeps following by polling when the node
announces nothing (no ``-zmqpubhashblock``) or an announcement is lost."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from btcchannel.bitcoind.notify import BlockNotifier, hashblock_endpoint
from btcchannel.bitcoind.regtest import RegtestNode, free_port
from btcchannel.payee.http import WATCHER
from btcchannel.payee.watcher import Watcher
from btcchannel.testing import fast_config, start_payee
from btcchannel.testing.chain import node_for
from btcchannel.testing.fixtures import PayeeFactory
from btcchannel.wait import wait_until_async

LONG_POLL = dict(poll_interval_s=30.0, max_tip_age_s=60.0)


async def _followed(watcher: Watcher, node: RegtestNode, timeout: float) -> float:
    """Seconds until the watcher's block follower (and the shared tip) reached the node's best block."""
    best = node.rpc("getbestblockhash")
    height = node.tip_height()
    start = time.monotonic()
    await wait_until_async(
        lambda: watcher.store.chain_cursor() == (height, best) and watcher.tip.height == height,
        timeout=timeout,
        what=f"the watcher at block {height}",
    )
    return time.monotonic() - start


async def test_a_mined_block_wakes_the_watcher_at_once(bitcoind: RegtestNode, payee_factory: PayeeFactory) -> None:
    endpoint = await hashblock_endpoint(payee_factory.node())
    assert endpoint is not None and endpoint.startswith("tcp://127.0.0.1:")
    payee = await payee_factory.start(**LONG_POLL)
    watcher: Watcher = payee.app[WATCHER]
    notifier = await wait_until_async(lambda: watcher.notifier, timeout=10, what="the block notifier")
    assert notifier.endpoint == endpoint
    await _followed(watcher, bitcoind, timeout=10)  # the first pass
    # ZMQ subscribes asynchronously: a block announced before it took effect is not delivered
    for _ in range(40):
        seen = notifier.count
        bitcoind.mine(1)
        if await notifier.wait(seen, timeout=0.5):
            break
    else:
        raise AssertionError("no block announcement received")
    await _followed(watcher, bitcoind, timeout=5)
    for _ in range(3):  # each new block is processed well within the 30 s poll interval
        bitcoind.mine(1)
        assert await _followed(watcher, bitcoind, timeout=3) < 3


async def test_without_zmq_the_watcher_follows_by_polling(
    node_factory: Callable[..., RegtestNode],
    tmp_path: Path,
) -> None:
    bare = node_factory(zmq=False)
    node = node_for(bare, "miner")
    try:
        assert await hashblock_endpoint(node) is None
        bare.mine(1)
        payee = await start_payee(fast_config(tmp_path / "payee", poll_interval_s=0.2), node)
        try:
            watcher: Watcher = payee.app[WATCHER]
            await _followed(watcher, bare, timeout=10)
            for _ in range(3):
                bare.mine(1)
                await _followed(watcher, bare, timeout=5)
            assert watcher.notifier is None
        finally:
            await payee.stop()
    finally:
        await node.aclose()


async def test_a_lost_announcement_costs_one_poll_interval(bitcoind: RegtestNode, payee_factory: PayeeFactory) -> None:
    payee = await payee_factory.start(poll_interval_s=0.5, max_tip_age_s=10.0)
    watcher: Watcher = payee.app[WATCHER]
    real = await wait_until_async(lambda: watcher.notifier, timeout=10, what="the block notifier")
    # a subscriber that hears nothing (as after a dropped connection): polling still follows
    deaf = BlockNotifier(f"tcp://127.0.0.1:{free_port()}")
    watcher.notifier = deaf
    try:
        for _ in range(3):
            bitcoind.mine(1)
            await _followed(watcher, bitcoind, timeout=5)
        assert deaf.count == 0
    finally:
        watcher.notifier = real
        await deaf.aclose()
