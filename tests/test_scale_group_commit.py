"""Group commit under load: 100 concurrent payers, the payee SIGKILLed mid-stream (a real subprocess).

Every payment the payee acknowledged before it died is in its database afterwards, and after a
restart each channel's close (confirmed on the node) pays exactly its last acknowledged amount.
"""

from __future__ import annotations

import asyncio
import signal

from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.errors import PayeeUnreachable
from btcchannel.payer.client import PayerClient
from btcchannel.store import PayeeStore
from btcchannel.testing import open_channel, sats, tx_of, wait_until_async
from btcchannel.testing.fixtures import PayeeFactory, PayerFactory

CHANNELS = 100
PAYERS = 10  # clients, each paying on CHANNELS // PAYERS channels at once
DEPOSIT = 1_000_000
STEP = 500
OPEN_BATCH = 20  # fundings chained in the mempool before a block (the wallet's chain limit)


async def _pay_until_gone(client: PayerClient, cid: str) -> None:
    while True:
        try:
            await client.pay(cid, STEP)
        except PayeeUnreachable:
            return


async def _open_all(clients: list[PayerClient], bitcoind: RegtestNode, url: str) -> dict[str, PayerClient]:
    owner: dict[str, PayerClient] = {}
    per = CHANNELS // len(clients)
    for client in clients:
        for start in range(0, per, OPEN_BATCH):
            for _ in range(min(OPEN_BATCH, per - start)):
                owner[await client.open_channel(url, DEPOSIT, 60, wait_open=False)] = client
            bitcoind.mine(1)
    for cid, client in owner.items():
        await client.wait_open(cid, timeout=60)
    return owner


async def test_sigkill_under_100_concurrent_payers_loses_no_acknowledged_payment(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    payer_factory: PayerFactory,
) -> None:
    cfg = payee_factory.config()
    proc = payee_factory.process(cfg)
    url = await proc.start()
    clients = [payer_factory(f"payer{i}", timeout=10) for i in range(PAYERS)]
    owner = await _open_all(clients, bitcoind, url)
    assert len(owner) == CHANNELS

    payers = [asyncio.ensure_future(_pay_until_gone(client, cid)) for cid, client in owner.items()]
    await wait_until_async(
        lambda: all(c.store.get(cid).acked_sat >= 3 * STEP for cid, c in owner.items()),
        timeout=120,
        what="every channel to have payments acknowledged",
    )
    assert await proc.stop(signal.SIGKILL) == -signal.SIGKILL  # mid-stream: payments in flight
    await asyncio.wait_for(asyncio.gather(*payers), 60)

    acked = {cid: c.store.get(cid).acked_sat for cid, c in owner.items()}
    signed = {cid: c.store.get(cid).amount_sat for cid, c in owner.items()}
    with PayeeStore(cfg.db_path) as store:
        stored = {cid: store.get(cid).amount_sat for cid in owner}
    for cid in owner:
        assert acked[cid] <= stored[cid] <= signed[cid], (cid, acked[cid], stored[cid], signed[cid])
    assert sum(acked.values()) >= CHANNELS * 3 * STEP

    assert await proc.start() == url
    last: dict[str, int] = {}
    for cid, client in owner.items():
        obj = await client.resume(cid)
        rec = client.store.get(cid)
        assert obj["amount_sat"] == rec.amount_sat == rec.acked_sat >= acked[cid]
        last[cid] = await client.pay(cid, STEP)  # the restarted payee takes payments again
    closes = {}
    for cid, client in owner.items():
        obj = await client.close(cid)
        assert obj["state"] == "closing" and obj["amount_sat"] == last[cid]
    with PayeeStore(cfg.db_path) as store:
        await wait_until_async(
            lambda: all(store.get(cid).close_txid for cid in owner), timeout=60, what="every close broadcast"
        )
        bitcoind.mine(1)
        await wait_until_async(
            lambda: all(store.get(cid).state == "closed" for cid in owner), timeout=60, what="every channel closed"
        )
        closes = {cid: store.get(cid).close_txid for cid in owner}
    for cid, txid in closes.items():
        assert txid is not None
        close = tx_of(bitcoind, txid)
        assert close["confirmations"] >= 1
        assert sats(close["vout"][0]["value"]) == DEPOSIT - last[cid]  # the payer's change: exactly the rest


async def test_an_exact_retry_during_the_commit_is_answered_with_its_amount(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    payer_factory: PayerFactory,
) -> None:
    payee = await payee_factory.start()
    client = payer_factory(timeout=10)
    cid = await open_channel(client, bitcoind, payee.url, 100_000, 60)
    for amount in (1_000, 2_000, 3_000):
        payment = await client.sign_next(cid, amount)
        url = f"{payee.url}/v1/channels/{cid}/payments"
        answers = await asyncio.gather(*(client.request("POST", url, payment.to_json()) for _ in range(5)))
        assert [ans["amount_sat"] for _, ans in answers] == [amount] * 5  # never the amount before it
        assert payee.store.get(cid).amount_sat == amount
