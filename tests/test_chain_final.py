"""Final depth, reorged closes and the race with the payer's refund, on a real regtest node."""

from __future__ import annotations

from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.payee.http import WATCHER
from btcchannel.payer.client import PayerClient
from btcchannel.testing import open_channel, sats, tx_of, wait_until_async
from btcchannel.testing.fixtures import PayeeFactory


def _mine_empty(bitcoind: RegtestNode, n: int) -> None:
    """Blocks that leave every mempool transaction out (a fee spike, as far as our closes go)."""
    addr = bitcoind.new_address("miner")
    for _ in range(n):
        bitcoind.rpc("generateblock", addr, [])


async def test_close_is_final_only_at_final_depth_and_survives_a_reorg(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    srv = await payee_factory.start(final_confirmations=3)
    cid = await open_channel(payer_client, bitcoind, srv.url, 100_000, 60)
    await payer_client.pay(cid, 30_000)
    txid = (await payer_client.close(cid))["close_txid"]
    block = bitcoind.mine(1)[0]
    assert tx_of(bitcoind, txid)["confirmations"] == 1
    await srv.app[WATCHER].step()
    assert srv.store.get(cid).state == "closing"  # one confirmation is not final
    bitcoind.rpc("invalidateblock", block)  # the close leaves the chain
    assert txid in bitcoind.rpc("getrawmempool")
    await srv.app[WATCHER].step()
    assert srv.store.get(cid).state == "closing" and srv.store.get(cid).close_txid == txid
    bitcoind.mine(2, bitcoind.new_address("miner"))  # another branch (a new coinbase): the close 2 deep
    await srv.app[WATCHER].step()
    assert srv.store.get(cid).state == "closing"
    bitcoind.mine(1)
    await wait_until_async(lambda: srv.store.get(cid).state == "closed", timeout=30, what="closed at depth 3")
    assert srv.store.get(cid).close_txid == txid


async def test_refund_racing_a_stuck_close_at_expiry_is_outbid(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    """The payee's close is kept out of blocks until expiry; the payer's refund replaces it in the
    mempool; the payee replaces the refund with a close that pays more, which confirms."""
    srv = await payee_factory.start(
        final_confirmations=2, close_fee_rate_sat_vb=1.0, max_fee_rate_sat_vb=3.0, bump_after_blocks=2
    )
    client = payer_client
    cid = await open_channel(client, bitcoind, srv.url, 100_000, 12)
    await client.pay(cid, 50_000)
    first = (await client.close(cid))["close_txid"]
    expiry = srv.store.get(cid).expiry_height
    while bitcoind.tip_height() < expiry:  # every block leaves our closes out; the payee keeps bumping
        _mine_empty(bitcoind, 1)
        await srv.app[WATCHER].step()

    def settled() -> bool:  # the last bump (this block's) is broadcast and recorded
        rec = srv.store.get(cid)
        return rec.close_txid == rec.close_tx_txid and rec.close_txid in bitcoind.rpc("getrawmempool")

    await wait_until_async(settled, timeout=30, what="the last bump sent")
    stuck = srv.store.get(cid)
    assert stuck.state == "closing" and stuck.close_height == bitcoind.tip_height()
    assert stuck.close_txid != first and (stuck.close_fee_rate or 0) <= 3.0  # bumped, within its cap
    # the node accepts the refund in place of the payee's close (it pays a higher fee)
    refund = await client.refund(cid, fee_rate_sat_vb=20.0)

    def outbid() -> bool:
        rec = srv.store.get(cid)
        return rec.close_txid not in (None, stuck.close_txid) and rec.close_txid in bitcoind.rpc("getrawmempool")

    await wait_until_async(outbid, timeout=30, what="the refund replaced by our close")
    assert refund not in bitcoind.rpc("getrawmempool")
    assert srv.store.get(cid).state == "closing"  # a refund in the mempool was never final
    bitcoind.mine(2)
    await wait_until_async(lambda: srv.store.get(cid).state == "closed", timeout=30, what="closed")
    close = tx_of(bitcoind, srv.store.get(cid).close_txid or "")
    fee = 100_000 - sum(sats(o["value"]) for o in close["vout"])
    assert sats(close["vout"][0]["value"]) == 50_000  # the payer's change as signed
    assert 20 * close["vsize"] < fee < 50_000  # more than the refund paid; the payee keeps the rest


async def test_refund_in_the_mempool_before_any_close_is_outbid(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    """The payee's watcher was not running through the closing window (its process down); at
    expiry the payer's refund reaches the mempool first and the payee's first close, at its usual
    rate, is refused as an under-priced replacement. The payee still replaces the refund with a
    close paying more (the refund is not final), instead of waiting forever for its own close."""
    srv = await payee_factory.start(final_confirmations=2, close_fee_rate_sat_vb=1.0, run_watcher=False)
    client = payer_client
    watcher = srv.app[WATCHER]
    cid = await client.open_channel(srv.url, 100_000, 12, wait_open=False)
    bitcoind.mine(1)
    await watcher.step()
    await client.wait_open(cid, timeout=30)
    await client.pay(cid, 50_000)
    expiry = srv.store.get(cid).expiry_height
    bitcoind.mine(expiry - bitcoind.tip_height())
    refund = await client.refund(cid, fee_rate_sat_vb=5.0)

    async def outbid() -> bool:
        await watcher.step()
        await srv.svc.closer.aclose()
        rec = srv.store.get(cid)
        return rec.close_txid is not None and rec.close_txid in bitcoind.rpc("getrawmempool")

    await wait_until_async(outbid, timeout=30, what="the refund replaced by our close")
    assert refund not in bitcoind.rpc("getrawmempool")
    bitcoind.mine(2)

    async def closed() -> bool:
        await watcher.step()
        return srv.store.get(cid).state == "closed"

    await wait_until_async(closed, timeout=30, what="closed")
    close = tx_of(bitcoind, srv.store.get(cid).close_txid or "")
    assert sats(close["vout"][0]["value"]) == 50_000  # the payer's change as signed
    fee = 100_000 - sum(sats(o["value"]) for o in close["vout"])
    assert 5 * close["vsize"] < fee < 50_000


async def test_a_refund_pinned_by_a_child_is_still_outbid(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    """At expiry the payer's refund reaches the mempool with a child spending its output that pays
    a large fee (a pin: a replacement must pay more than both). The payee's close pays more than
    the refund *and* its child, as long as the payment affords it, and confirms."""
    srv = await payee_factory.start(final_confirmations=2, close_fee_rate_sat_vb=1.0, run_watcher=False)
    client = payer_client
    watcher = srv.app[WATCHER]
    cid = await client.open_channel(srv.url, 100_000, 12, wait_open=False)
    bitcoind.mine(1)
    await watcher.step()
    await client.wait_open(cid, timeout=30)
    await client.pay(cid, 50_000)
    expiry = srv.store.get(cid).expiry_height
    bitcoind.mine(expiry - bitcoind.tip_height())
    refund = await client.refund(cid, fee_rate_sat_vb=2.0, dest_address=bitcoind.new_address("miner"))
    value = sats(tx_of(bitcoind, refund)["vout"][0]["value"])
    child_fee = 15_000
    raw = bitcoind.rpc(
        "createrawtransaction",
        [{"txid": refund, "vout": 0}],
        [{bitcoind.new_address("miner"): f"{(value - child_fee) / 1e8:.8f}"}],
    )
    child = bitcoind.rpc("sendrawtransaction", bitcoind.rpc("signrawtransactionwithwallet", raw, wallet="miner")["hex"])
    assert {refund, child} <= set(bitcoind.rpc("getrawmempool"))

    async def outbid() -> bool:
        await watcher.step()
        await srv.svc.closer.aclose()
        rec = srv.store.get(cid)
        return rec.close_txid is not None and rec.close_txid in bitcoind.rpc("getrawmempool")

    await wait_until_async(outbid, timeout=30, what="the pinned refund replaced by our close")
    assert not {refund, child} & set(bitcoind.rpc("getrawmempool"))
    bitcoind.mine(2)

    async def closed() -> bool:
        await watcher.step()
        return srv.store.get(cid).state == "closed"

    await wait_until_async(closed, timeout=30, what="closed")
    close = tx_of(bitcoind, srv.store.get(cid).close_txid or "")
    fee = 100_000 - sum(sats(o["value"]) for o in close["vout"])
    assert child_fee < fee < 50_000  # more than refund and child paid; the payee keeps the rest
