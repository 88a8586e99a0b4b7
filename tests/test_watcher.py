"""The payee's watcher on a real regtest node: end conditions, refunds, RBF bumps (the operator's too, up to
what the payment affords). Its decisions alone are tested without a node in ``test_watcher_decide.py``."""

from __future__ import annotations

from typing import Any

import pytest

from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.errors import ChannelClosing, CloseUneconomic, NotExpired
from btcchannel.payee.closer import operator_bump, operator_close
from btcchannel.payee.http import WATCHER
from btcchannel.payer.client import PayerClient
from btcchannel.testing import RunningPayee, open_channel, sats, tx_of, wait_until_async
from btcchannel.testing.fixtures import PayeeFactory


def _mine_empty(bitcoind: RegtestNode, n: int) -> None:
    addr = bitcoind.new_address("miner")
    for _ in range(n):
        bitcoind.rpc("generateblock", addr, [])


async def _mined_close(bitcoind: RegtestNode, srv: RunningPayee, cid: str) -> dict[str, Any]:
    await wait_until_async(lambda: srv.store.get(cid).close_txid is not None, timeout=30, what="close broadcast")
    bitcoind.mine(1)
    await wait_until_async(lambda: srv.store.get(cid).state == "closed", timeout=30, what="closed")
    return tx_of(bitcoind, srv.store.get(cid).close_txid)


async def test_end_conditions_total_operator_expiry(
    bitcoind: RegtestNode,
    payee: RunningPayee,
    payer_client: PayerClient,
) -> None:
    srv, client, cfg = payee, payer_client, payee.config
    total = await client.open_channel(srv.url, 100_000, 60, wait_open=False, max_total_sat=30_000)
    operator = await client.open_channel(srv.url, 100_000, 60, wait_open=False)
    expiring = await client.open_channel(srv.url, 100_000, 9, wait_open=False)
    bitcoind.mine(1)
    for cid in (total, operator, expiring):
        await client.wait_open(cid)
        await client.pay(cid, 10_000)
    # agreed total reached
    await client.pay(total, 10_000)
    stale = srv.store.get(total)  # the watcher may still hold this 'open' row when the close goes out
    await client.pay(total, 10_000)
    assert srv.store.get(total).end_reason == "agreed_total_reached"
    await wait_until_async(lambda: srv.store.get(total).close_txid is not None, timeout=30, what="close broadcast")
    await srv.app[WATCHER].check(stale, bitcoind.tip_height())
    assert srv.store.get(total).state == "closing"  # our own close is not a conflicting spend
    with pytest.raises(ChannelClosing):
        await client.pay(total, 10_000)
    # operator's command, from another process-like service on the same datadir
    obj = await operator_close(cfg, srv.node, operator)
    assert obj["state"] == "closing" and obj["close_txid"] and obj["end_reason"] == "operator"
    with pytest.raises(ChannelClosing):
        await client.pay(operator, 1000)
    # expiry margin: the watcher closes at expiry - close_margin_blocks
    exp = srv.store.get(expiring).expiry_height
    bitcoind.mine(exp - cfg.close_margin_blocks - bitcoind.tip_height() - 1)
    await client.pay(expiring, 5_000)
    bitcoind.mine(1)
    await wait_until_async(lambda: srv.store.get(expiring).state == "closing", timeout=30, what="auto-close")
    assert srv.store.get(expiring).end_reason == "expiry_margin"
    with pytest.raises(ChannelClosing):
        await client.pay(expiring, 1000)
    for cid, amount in ((total, 30_000), (operator, 10_000), (expiring, 15_000)):
        close = await _mined_close(bitcoind, srv, cid)
        assert sats(close["vout"][0]["value"]) == 100_000 - amount
        assert close["vout"][0]["scriptPubKey"]["hex"] == srv.store.get(cid).params["payer_script"]


async def test_refund_when_payee_gone_is_detected(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    client = payer_client
    cfg = payee_factory.config()
    srv = await payee_factory.start(cfg)
    cid = await open_channel(client, bitcoind, srv.url, 100_000, 10)
    await client.pay(cid, 4_000)
    await srv.stop()  # the payee vanishes
    with pytest.raises(NotExpired):
        await client.refund(cid)
    rec = client.store.get(cid)
    bitcoind.mine(rec.expiry_height - bitcoind.tip_height())
    refund_txid = await client.refund(cid)
    bitcoind.mine(1)
    refund = tx_of(bitcoind, refund_txid)
    assert refund["locktime"] == rec.expiry_height and refund["confirmations"] == 1
    assert 90_000 < sats(refund["vout"][0]["value"]) < 100_000
    assert refund["vin"][0]["txid"] == rec.funding_txid
    assert client.store.get(cid).state == "refunded"
    # the payee comes back: the watcher records the on-chain exception
    srv = await payee_factory.start(cfg)
    await wait_until_async(lambda: srv.store.get(cid).state == "refunded", timeout=30, what="refund detected")
    assert srv.store.get(cid).exception_txid == refund_txid
    assert srv.store.get(cid).end_reason == "payer_refund"


async def test_rbf_bump_of_stuck_close(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    client = payer_client
    srv = await payee_factory.start(bump_after_blocks=2, close_fee_rate_sat_vb=2.0)
    cfg = srv.config
    cid = await open_channel(client, bitcoind, srv.url, 200_000, 60)
    await client.pay(cid, 50_000)

    def fee_of(txid: str) -> int:
        return 200_000 - sum(sats(o["value"]) for o in tx_of(bitcoind, txid)["vout"])

    first = (await client.close(cid))["close_txid"]
    assert first in bitcoind.rpc("getrawmempool")
    _mine_empty(bitcoind, 2)  # blocks that leave the close out: it is stuck
    await wait_until_async(lambda: srv.store.get(cid).close_txid != first, timeout=30, what="RBF bump")
    second = srv.store.get(cid).close_txid
    mempool = bitcoind.rpc("getrawmempool")
    assert second in mempool and first not in mempool
    assert srv.store.get(cid).close_fee_rate == 4.0
    # the operator bumps again by hand
    obj = await operator_bump(cfg, srv.node, cid, 10.0)
    third = obj["close_txid"]
    assert third not in (first, second) and third in bitcoind.rpc("getrawmempool")
    assert fee_of(third) >= 10 * tx_of(bitcoind, third)["vsize"]
    # a bump the payment cannot fully pay takes the most it can; past that it is refused, not faked
    obj = await operator_bump(cfg, srv.node, cid, 1000.0)  # 1,000 sat/vB would cost more than 50,000 sat
    fourth = obj["close_txid"]
    assert fourth not in (first, second, third) and fourth in bitcoind.rpc("getrawmempool")
    assert sats(tx_of(bitcoind, fourth)["vout"][1]["value"]) == 294  # the payee keeps exactly its dust limit
    assert (srv.store.get(cid).close_fee_rate or 0) > 10.0
    with pytest.raises(CloseUneconomic):
        await operator_bump(cfg, srv.node, cid, 2000.0)
    assert srv.store.get(cid).close_txid == fourth
    bitcoind.mine(1)
    await wait_until_async(lambda: srv.store.get(cid).state == "closed", timeout=30, what="closed")
    rec = srv.store.get(cid)
    assert rec.close_txid == fourth and rec.close_txids == [first, second, third, fourth]
    close = tx_of(bitcoind, fourth)
    assert fee_of(fourth) >= 10 * close["vsize"]
    assert sats(close["vout"][0]["value"]) == 150_000
