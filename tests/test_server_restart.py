"""Restarts: the payee (graceful and SIGKILL, a real subprocess) and the payer, mid-stream."""

from __future__ import annotations

import asyncio
import signal

from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.core import keys
from btcchannel.core.state import ChannelState
from btcchannel.errors import PayeeUnreachable
from btcchannel.payer.client import PayerClient
from btcchannel.store import PayeeStore
from btcchannel.testing import RunningPayee, open_channel, sats, tx_of, wait_until_async
from btcchannel.testing.fixtures import PayeeFactory, PayerFactory


async def _pay_until_gone(client: PayerClient, cid: str) -> None:
    while True:
        try:
            await client.pay(cid, 100)
        except PayeeUnreachable:
            return


async def test_payee_killed_and_restarted_mid_stream(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    payer_factory: PayerFactory,
) -> None:
    cfg = payee_factory.config()
    proc = payee_factory.process(cfg)
    url = await proc.start()
    client = payer_factory(timeout=5)
    cid = await open_channel(client, bitcoind, url, 1_000_000, 60)
    for sig, target in ((signal.SIGTERM, 3_000), (signal.SIGKILL, 8_000)):
        payer = asyncio.ensure_future(_pay_until_gone(client, cid))
        await wait_until_async(lambda: client.store.get(cid).acked_sat >= target, timeout=30, what="payments flowing")
        await proc.stop(sig)  # mid-stream: a payment may be in flight
        await asyncio.wait_for(payer, 30)
        assert await proc.start() == url
        obj = await client.resume(cid)
        rec = client.store.get(cid)
        assert obj["amount_sat"] == rec.amount_sat == rec.acked_sat
    for _ in range(10):
        await client.pay(cid, 100)
    last = client.store.get(cid).acked_sat
    obj = await client.close(cid)
    assert obj["state"] == "closing" and obj["amount_sat"] == last
    bitcoind.mine(1)
    with PayeeStore(cfg.db_path) as store:
        await wait_until_async(lambda: store.get(cid).state == "closed", timeout=30, what="closed")
        close = tx_of(bitcoind, store.get(cid).close_txid)
    assert sats(close["vout"][0]["value"]) == 1_000_000 - last


async def test_payer_restarted_resumes(
    bitcoind: RegtestNode,
    payee: RunningPayee,
    payer_factory: PayerFactory,
) -> None:
    srv = payee
    a = payer_factory()
    cid = await open_channel_and_pay(a, bitcoind, srv.url)
    # crash 1: the payment is signed and stored, then the payer dies before sending it
    await a.sign_next(cid, 1_100)
    await a.aclose()
    b = payer_factory()
    assert srv.store.get(cid).amount_sat == 1_000
    obj = await b.resume(cid)
    assert obj["amount_sat"] == 1_100 == srv.store.get(cid).amount_sat
    # crash 2: sent and stored by the payee, the payer dies before recording the ack
    p = await b.sign_next(cid, 1_200)
    await b.request("POST", f"{srv.url}/v1/channels/{cid}/payments", p.to_json())
    await b.aclose()
    c = payer_factory()
    assert c.store.get(cid).acked_sat == 1_100
    assert await c.pay(cid, 100) == 1_300  # resumes first, never signs below 1,200
    # a backup moved to another machine continues the channel
    backup = c.export_backup()
    await c.aclose()
    d = payer_factory("payer-restored")
    assert d.import_backup(backup) == 1
    assert await d.pay(cid, 100) == 1_400
    assert [r.channel_id for r in d.list()] == [cid]
    await d.close(cid)
    bitcoind.mine(1)
    await wait_until_async(lambda: srv.store.get(cid).state == "closed", timeout=30, what="closed")
    await d.status(cid)
    assert d.store.get(cid).state == "closed"


async def open_channel_and_pay(client: PayerClient, bitcoind: RegtestNode, url: str) -> str:
    cid = await open_channel(client, bitcoind, url, 100_000, 60)
    for _ in range(10):
        await client.pay(cid, 100)
    return cid


async def test_two_payee_processes_share_one_database(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    payer_factory: PayerFactory,
) -> None:
    cfg = payee_factory.config()
    a, b = payee_factory.process(cfg), payee_factory.process(cfg)
    url_a = await a.start()
    b.spec = cfg.datadir.parent / "payee-server-b.json"
    url_b = await b.start()
    assert url_a != url_b
    client = payer_factory(timeout=10)
    cid = await open_channel(client, bitcoind, url_a, 200_000, 60)
    for i in range(20):  # alternate between the two processes
        p = await client.sign_next(cid, 1_000 * (i + 1))
        url = url_a if i % 2 else url_b
        _, ans = await client.request("POST", f"{url}/v1/channels/{cid}/payments", p.to_json())
        assert ans["amount_sat"] == 1_000 * (i + 1)
    # a lower payment is refused by the process that did not see the last one
    stale = await client.sign_next(cid, 21_000)
    await client.request("POST", f"{url_b}/v1/channels/{cid}/payments", stale.to_json())
    sig = keys.sign_digest(client.store.get(cid).privkey, keys.close_request_digest(cid)).hex()
    answers = await asyncio.gather(
        client.request("POST", f"{url_a}/v1/channels/{cid}/close", {"signature": sig}),
        client.request("POST", f"{url_b}/v1/channels/{cid}/close", {"signature": sig}),
    )
    with PayeeStore(cfg.db_path) as store:
        await wait_until_async(lambda: store.get(cid).close_txid is not None, timeout=30, what="close")
        rec = store.get(cid)
        assert rec.close_txids == [rec.close_txid]  # exactly one close
        assert all(ans[1]["state"] == "closing" for ans in answers)
        assert {ans[1]["close_txid"] for ans in answers} == {rec.close_txid}
        spenders = [
            t
            for t in bitcoind.rpc("getrawmempool")
            if any(v.get("txid") == rec.funding_txid for v in tx_of(bitcoind, t)["vin"])
        ]
        assert spenders == [rec.close_txid]
        bitcoind.mine(1)
        await wait_until_async(lambda: store.get(cid).state == "closed", timeout=30, what="closed")
        close = tx_of(bitcoind, store.get(cid).close_txid)
        assert sats(close["vout"][0]["value"]) == 200_000 - 21_000


async def test_a_funding_the_payer_died_before_recording_is_still_refunded(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    """The payer's process dies between broadcasting the funding and recording its outpoint: its
    row is left ``proposed`` without a funding. After expiry the payer still takes its deposit
    back: the refund finds the funding output on the chain by its script."""
    srv = await payee_factory.start()
    client = payer_client
    cid = await client.open_channel(srv.url, 100_000, 12, wait_open=False)
    rec = client.store.get(cid)
    funding = rec.funding_txid
    # the row as that crash leaves it (the funding is in the mempool, the payer does not know it)
    client.store.set_state(
        cid, ChannelState.PROPOSED, funding_txid=None, funding_vout=None, params={**rec.params, "funding": None}
    )
    bitcoind.mine(rec.expiry_height - bitcoind.tip_height())
    assert tx_of(bitcoind, str(funding))["confirmations"] > 0
    refund = await client.refund(cid)
    spent = tx_of(bitcoind, refund)["vin"][0]
    assert spent["txid"] == funding
    bitcoind.mine(1)
    assert tx_of(bitcoind, refund)["confirmations"] == 1
