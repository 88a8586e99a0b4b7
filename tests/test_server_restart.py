"""Restarts: the payee (graceful and SIGKILL, a real subprocess) and the payer, mid-stream."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from btcchannel.payer.client import PayerClient
from btcchannel.errors import PayeeUnreachable
from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.store import PayeeStore

from _service import ServerProcess, fast_config, node_for, sats, server, tx_of, until


async def _pay_until_gone(client: PayerClient, cid: str) -> None:
    while True:
        try:
            await client.pay(cid, 100)
        except PayeeUnreachable:
            return


async def test_payee_killed_and_restarted_mid_stream(bitcoind: RegtestNode, funded_wallet: str, tmp_path: Path) -> None:
    payer_node = node_for(bitcoind, funded_wallet)
    cfg = fast_config(tmp_path / "payee")
    proc = ServerProcess(cfg, bitcoind)
    url = await proc.start()
    try:
        async with PayerClient(tmp_path / "payer", payer_node, timeout=5) as client:
            cid = await client.open_channel(url, 1_000_000, 60, wait_open=False)
            bitcoind.mine(1)
            await client.wait_open(cid)
            for sig, target in ((signal.SIGTERM, 3_000), (signal.SIGKILL, 8_000)):
                payer = asyncio.ensure_future(_pay_until_gone(client, cid))
                await until(lambda: client.store.get(cid).acked_sat >= target, what="payments flowing")
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
            await until(lambda: PayeeStore(cfg.db_path).get(cid).state == "closed", what="closed")
            close = tx_of(bitcoind, PayeeStore(cfg.db_path).get(cid).close_txid)
            assert sats(close["vout"][0]["value"]) == 1_000_000 - last
    finally:
        await proc.stop(signal.SIGKILL)
        await payer_node.aclose()


async def test_payer_restarted_resumes(bitcoind: RegtestNode, funded_wallet: str, tmp_path: Path) -> None:
    payee_node, payer_node = node_for(bitcoind, "miner"), node_for(bitcoind, funded_wallet)
    async with server(fast_config(tmp_path / "payee"), payee_node) as srv:
        a = PayerClient(tmp_path / "payer", payer_node)
        cid = await open_channel_and_pay(a, bitcoind, srv.url)
        # crash 1: the payment is signed and stored, then the payer dies before sending it
        await a.sign_next(cid, 1_100)
        await a.aclose()
        b = PayerClient(tmp_path / "payer", payer_node)
        assert srv.store.get(cid).amount_sat == 1_000
        obj = await b.resume(cid)
        assert obj["amount_sat"] == 1_100 == srv.store.get(cid).amount_sat
        # crash 2: sent and stored by the payee, the payer dies before recording the ack
        p = await b.sign_next(cid, 1_200)
        await b.request("POST", f"{srv.url}/v1/channels/{cid}/payments", p.to_json())
        await b.aclose()
        c = PayerClient(tmp_path / "payer", payer_node)
        assert c.store.get(cid).acked_sat == 1_100
        assert await c.pay(cid, 100) == 1_300  # resumes first, never signs below 1,200
        # a backup moved to another machine continues the channel
        backup = c.export_backup()
        await c.aclose()
        d = PayerClient(tmp_path / "payer-restored", payer_node)
        assert d.import_backup(backup) == 1
        assert await d.pay(cid, 100) == 1_400
        assert [r.channel_id for r in d.list()] == [cid]
        await d.close(cid)
        bitcoind.mine(1)
        await until(lambda: srv.store.get(cid).state == "closed", what="closed")
        await d.status(cid)
        assert d.store.get(cid).state == "closed"
        await d.aclose()
    await payee_node.aclose()
    await payer_node.aclose()


async def open_channel_and_pay(client: PayerClient, bitcoind: RegtestNode, url: str) -> str:
    cid = await client.open_channel(url, 100_000, 60, wait_open=False)
    bitcoind.mine(1)
    await client.wait_open(cid)
    for _ in range(10):
        await client.pay(cid, 100)
    return cid


async def test_two_payee_processes_share_one_database(bitcoind: RegtestNode, funded_wallet: str, tmp_path: Path) -> None:
    payer_node = node_for(bitcoind, funded_wallet)
    cfg = fast_config(tmp_path / "payee")
    a, b = ServerProcess(cfg, bitcoind), ServerProcess(cfg, bitcoind)
    url_a = await a.start()
    b.spec = tmp_path / "payee-server-b.json"
    url_b = await b.start()
    assert url_a != url_b
    try:
        async with PayerClient(tmp_path / "payer", payer_node, timeout=10) as client:
            cid = await client.open_channel(url_a, 200_000, 60, wait_open=False)
            bitcoind.mine(1)
            await client.wait_open(cid)
            for i in range(20):  # alternate between the two processes
                p = await client.sign_next(cid, 1_000 * (i + 1))
                url = url_a if i % 2 else url_b
                _, ans = await client.request("POST", f"{url}/v1/channels/{cid}/payments", p.to_json())
                assert ans["amount_sat"] == 1_000 * (i + 1)
            # a lower payment is refused by the process that did not see the last one
            stale = await client.sign_next(cid, 21_000)
            await client.request("POST", f"{url_b}/v1/channels/{cid}/payments", stale.to_json())
            sig = client._channel(client.store.get(cid)).close_request_signature(cid).hex()
            answers = await asyncio.gather(
                client.request("POST", f"{url_a}/v1/channels/{cid}/close", {"signature": sig}),
                client.request("POST", f"{url_b}/v1/channels/{cid}/close", {"signature": sig}),
            )
            store = PayeeStore(cfg.db_path)
            await until(lambda: store.get(cid).close_txid is not None, what="close")
            rec = store.get(cid)
            assert rec.close_txids == [rec.close_txid]  # exactly one close
            assert all(ans[1]["state"] == "closing" for ans in answers)
            assert {ans[1]["close_txid"] for ans in answers} == {rec.close_txid}
            spenders = [t for t in bitcoind.rpc("getrawmempool")
                        if any(v.get("txid") == rec.funding_txid for v in tx_of(bitcoind, t)["vin"])]
            assert spenders == [rec.close_txid]
            bitcoind.mine(1)
            await until(lambda: store.get(cid).state == "closed", what="closed")
            close = tx_of(bitcoind, store.get(cid).close_txid)
            assert sats(close["vout"][0]["value"]) == 200_000 - 21_000
            store.close()
    finally:
        await a.stop(signal.SIGTERM)
        await b.stop(signal.SIGTERM)
        await payer_node.aclose()
