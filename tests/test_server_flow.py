"""Payee service + payer client on a real regtest node over loopback HTTP."""

from __future__ import annotations

from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.payer.client import PayerClient
from btcchannel.testing import RunningPayee, open_channel, sats, tx_of, wait_until_async


async def test_thousand_payments_one_close(
    bitcoind: RegtestNode, payee: RunningPayee, payer_client: PayerClient
) -> None:
    srv, client = payee, payer_client
    deposit = 1_000_000
    cid = await open_channel(client, bitcoind, srv.url, deposit)
    for _ in range(1000):
        await client.pay(cid, 100)
    assert srv.store.get(cid).amount_sat == 100_000
    obj = await client.close(cid)
    assert obj["state"] == "closing" and obj["close_txid"]
    bitcoind.mine(1)
    await wait_until_async(lambda: srv.store.get(cid).state == "closed", timeout=30, what="closed")
    rec = srv.store.get(cid)
    close = tx_of(bitcoind, rec.close_txid)
    assert rec.close_txids == [rec.close_txid]  # one close
    assert [(i["txid"], i["vout"]) for i in close["vin"]] == [(rec.funding_txid, rec.funding_vout)]
    outs = [sats(o["value"]) for o in close["vout"]]
    payer_script = rec.params["payer_script"]
    assert close["vout"][0]["scriptPubKey"]["hex"] == payer_script
    assert outs[0] == deposit - 100_000
    fee = deposit - sum(outs)
    assert outs[1] == 100_000 - fee and 0 < fee < 2000
    # the channel touched the chain twice: funding and close
    funding = tx_of(bitcoind, rec.funding_txid)
    assert funding["confirmations"] >= 2 and close["confirmations"] >= 1
    st = await client.status(cid)
    assert st["state"] == "closed"
