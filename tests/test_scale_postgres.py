"""Two payee processes on one PostgreSQL database (a real server, a real regtest node).

Payments on the same channels alternate between the instances; the instance running the
watcher and closer is SIGKILLed mid-stream; the other takes the lead within seconds, no
acknowledged payment is lost, and every channel's close (confirmed on the node, seen by the new
leader's watcher) pays exactly the last acknowledged amount.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.core import keys
from btcchannel.core.params import Payment
from btcchannel.errors import PayeeUnreachable
from btcchannel.payer.client import PayerClient
from btcchannel.store.postgres import PgPayeeStore
from btcchannel.testing import ServerProcess, open_channel, sats, tx_of, wait_until_async
from btcchannel.testing.fixtures import PayeeFactory, PayerFactory

LEADER_LINE = "this instance runs the watcher and the closer"
CHANNELS = 6
DEPOSIT = 500_000
STEP = 300


def _leads(proc: ServerProcess) -> bool:
    return proc.log_file.exists() and LEADER_LINE in proc.log_file.read_text(errors="replace")


async def _pay_via(client: PayerClient, cid: str, url: str) -> int:
    """Sign the next payment and send it to the instance at ``url``; the acknowledged amount."""
    payment = await client.sign_next(cid, client.store.get(cid).amount_sat + STEP)
    return await _send(client, cid, url, payment)


async def _send(client: PayerClient, cid: str, url: str, payment: Payment) -> int:
    _, ans = await client.request("POST", f"{url}/v1/channels/{cid}/payments", payment.to_json())
    assert ans["amount_sat"] == payment.amount_sat
    client.store.set_acked(cid, payment.amount_sat)
    return payment.amount_sat


async def test_two_instances_leader_killed_follower_takes_over(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    payer_factory: PayerFactory,
    postgres_url: str,
) -> None:
    a = payee_factory.process(payee_factory.config("payee-a", store_url=postgres_url))
    b = payee_factory.process(payee_factory.config("payee-b", store_url=postgres_url))
    url_a = await a.start()
    await wait_until_async(lambda: _leads(a), timeout=10, what="the first instance to lead")
    url_b = await b.start()
    client = payer_factory(timeout=10)
    ids = [await open_channel(client, bitcoind, url_a if i % 2 else url_b, DEPOSIT, 60) for i in range(CHANNELS)]
    assert not _leads(b)

    # payments on every channel alternate between the two instances, all channels at once
    async def alternate(cid: str) -> None:
        for i in range(10):
            await _pay_via(client, cid, url_a if i % 2 else url_b)

    await asyncio.gather(*(alternate(cid) for cid in ids))

    # the leader dies mid-stream; payers move to the other instance
    killed = asyncio.Event()

    async def stream(cid: str) -> None:
        i, after = 0, 0
        while after < 5:
            url = url_b if killed.is_set() or i % 2 == 0 else url_a
            try:
                await _pay_via(client, cid, url)
            except PayeeUnreachable:
                rec = client.store.get(cid)  # signed, maybe stored by the dead one: send it to the other
                assert rec.signature is not None
                await _send(client, cid, url_b, Payment(rec.amount_sat, rec.signature))
            i += 1
            after += killed.is_set()

    payers = [asyncio.ensure_future(stream(cid)) for cid in ids]
    await wait_until_async(
        lambda: all(client.store.get(c).acked_sat >= 14 * STEP for c in ids),
        timeout=60,
        what="payments flowing through both instances",
    )
    assert await a.stop(signal.SIGKILL) == -signal.SIGKILL
    killed.set()
    await asyncio.wait_for(asyncio.gather(*payers), 60)
    await wait_until_async(lambda: _leads(b), timeout=10, what="the other instance to take the lead")

    acked = {cid: client.store.get(cid).acked_sat for cid in ids}
    with PgPayeeStore(postgres_url) as store:
        assert {cid: store.get(cid).amount_sat for cid in ids} == acked  # nothing acknowledged is lost
    # the new leader's watcher opens new channels ...
    late = await open_channel(client, bitcoind, url_b, DEPOSIT, 60)
    assert await _pay_via(client, late, url_b) == STEP
    # ... and sees closes confirm; each close pays exactly the last acknowledged amount
    for cid in ids:
        sig = keys.sign_digest(client.store.get(cid).privkey, keys.close_request_digest(cid)).hex()
        _, obj = await client.request("POST", f"{url_b}/v1/channels/{cid}/close", {"signature": sig})
        assert obj["state"] == "closing" and obj["amount_sat"] == acked[cid]
    with PgPayeeStore(postgres_url) as store:
        await wait_until_async(
            lambda: all(store.get(cid).close_txid for cid in ids), timeout=30, what="every close broadcast"
        )
        bitcoind.mine(1)
        await wait_until_async(
            lambda: all(store.get(cid).state == "closed" for cid in ids),
            timeout=30,
            what="the new leader to see the closes confirmed",
        )
        for cid in ids:
            close = tx_of(bitcoind, str(store.get(cid).close_txid))
            assert sats(close["vout"][0]["value"]) == DEPOSIT - acked[cid]


def test_cli_serve_with_a_postgresql_store(bitcoind: RegtestNode, tmp_path: Path, postgres_url: str) -> None:
    bitcoind.create_wallet("pg-cli-payee")
    env = {
        **os.environ,
        "BTCCHANNEL_DATADIR": str(tmp_path / "payee"),
        "BTCCHANNEL_RPC_URL": bitcoind.rpc_url,
        "BTCCHANNEL_RPC_USER": bitcoind.rpc_user,
        "BTCCHANNEL_RPC_PASSWORD": bitcoind.rpc_password,
        "BTCCHANNEL_WALLET": "pg-cli-payee",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "btcchannel", "--json", "serve", "--port", "0", "--store", postgres_url],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        assert json.loads(line)["url"].startswith("http://127.0.0.1:")
        with PgPayeeStore(postgres_url) as store:
            assert store.schema_version == PgPayeeStore.latest_version()  # migrated by the service
            assert not store.try_lead()  # the service holds the leader lock
        bad = subprocess.run(
            [sys.executable, "-m", "btcchannel", "serve", "--store", "sqlite:///x"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert bad.returncode == 2 and "postgresql://" in bad.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
