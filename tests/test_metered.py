"""Metered service: prepay and postpay over a real channel, the 402 answer, the end conditions."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.errors import AmountNotAgreed, BadRequest, WrongAmount
from btcchannel.payee.metered import add_file_route, add_paid_route
from btcchannel.payer.client import PayerClient
from btcchannel.payer.metered import MeteredPayer
from btcchannel.testing import RunningPayee, open_channel, sats, tx_of, wait_until_async
from btcchannel.testing.fixtures import PayeeFactory
from btcchannel.wire import HDR_AMOUNT, HDR_AUTH, HDR_CHANNEL, HDR_SIGNATURE

CHUNK = 100


def _auth(client: PayerClient, cid: str, url: str, **extra: str) -> dict[str, str]:
    """The headers of a metered GET of ``url`` on channel ``cid``, authenticated by the payer's key."""
    return {HDR_CHANNEL: cid, HDR_AUTH: client.request_auth(cid, "GET", url, None, extra), **extra}


def _file(tmp_path: Path, chunks: int = 12) -> Path:
    p = tmp_path / "data.bin"
    p.write_bytes(os.urandom(CHUNK * chunks - 37))
    return p


async def _closed_with(bitcoind: RegtestNode, srv: RunningPayee, cid: str, amount: int) -> dict[str, Any]:
    await wait_until_async(lambda: srv.store.get(cid).close_txid is not None, timeout=30, what="close broadcast")
    rec = srv.store.get(cid)
    assert rec.amount_sat == amount
    bitcoind.mine(1)
    await wait_until_async(lambda: srv.store.get(cid).state == "closed", timeout=30, what="closed")
    close = tx_of(bitcoind, srv.store.get(cid).close_txid)
    payer_out = [sats(o["value"]) for o in close["vout"] if o["scriptPubKey"]["hex"] == rec.params["payer_script"]]
    assert payer_out == ([rec.deposit_sat - amount] if amount < rec.deposit_sat else [])
    return close


async def test_prepay_file_chunks(
    bitcoind: RegtestNode,
    tmp_path: Path,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    data = _file(tmp_path)
    srv = await payee_factory.start(
        hook=lambda app: add_file_route(app, data, chunk_size=CHUNK), price_sat=100, mode="prepay"
    )
    client = payer_client
    async with aiohttp.ClientSession() as s:
        # unpaid: 402 with the price and where to open a channel
        async with s.get(f"{srv.url}/v1/file/0") as r:
            assert r.status == 402
            body = (await r.json())["payment"]
            assert body["price_sat"] == 100 and body["mode"] == "prepay" and body["channel_endpoint"] == "/v1/channels"
        async with s.get(f"{srv.url}/v1/file") as r:
            meta = await r.json()
        assert meta["chunks"] == 12
        cid = await open_channel(client, bitcoind, srv.url, 200_000)
        async with s.get(f"{srv.url}/v1/file/0", headers=_auth(client, cid, f"{srv.url}/v1/file/0")) as r:
            assert r.status == 402 and (await r.json())["payment"]["next_amount_sat"] == 100
        payer = MeteredPayer(client, cid)
        got = b""
        for i in range(10):
            status, chunk = await payer.fetch(f"{srv.url}/v1/file/{i}")
            assert status == 200
            got += chunk
        assert got == data.read_bytes()[: 10 * CHUNK]
        rec = srv.store.get(cid)
        assert (rec.amount_sat, rec.units) == (1000, 10)
        # a bad index is refused before anything is charged
        with pytest.raises(BadRequest):
            await payer.fetch(f"{srv.url}/v1/file/99")
        assert srv.store.get(cid).amount_sat == 1000
        # replaying the last payment buys nothing
        last = srv.store.get(cid)
        hdr = _auth(
            client,
            cid,
            f"{srv.url}/v1/file/3",
            **{HDR_AMOUNT: str(last.amount_sat), HDR_SIGNATURE: last.signature.hex()},
        )
        async with s.get(f"{srv.url}/v1/file/3", headers=hdr) as r:
            assert r.status == 409 and (await r.json())["error"]["code"] == "stale_payment"
        # a forged payment of the wrong amount does not end the channel
        hdr = _auth(client, cid, f"{srv.url}/v1/file/3", **{HDR_AMOUNT: "1200", HDR_SIGNATURE: last.signature.hex()})
        async with s.get(f"{srv.url}/v1/file/3", headers=hdr) as r:
            assert r.status == 400 and (await r.json())["error"]["code"] == "bad_signature"
        assert srv.store.get(cid).state == "open"
        # the payment signed for the refused chunk is used for the next one
        assert (await payer.fetch(f"{srv.url}/v1/file/10"))[0] == 200
        assert srv.store.get(cid).amount_sat == 1100
        # a signed payment of the wrong amount ends it: closed with the last correct payment
        # (the payer's client refuses to sign it: 1350 is not 11 units at the agreed 100 sat)
        with pytest.raises(AmountNotAgreed):
            await client.sign_next(cid, 1350)
        wrong = client._channel(client.store.get(cid)).sign_payment(1350)
        hdr = _auth(client, cid, f"{srv.url}/v1/file/10", **{HDR_AMOUNT: "1350", HDR_SIGNATURE: wrong.signature.hex()})
        async with s.get(f"{srv.url}/v1/file/10", headers=hdr) as r:
            assert r.status == 400 and (await r.json())["error"]["code"] == "wrong_amount"
        assert srv.store.get(cid).end_reason == "wrong_amount"
        await _closed_with(bitcoind, srv, cid, 1100)


async def test_prepay_unit_count_and_capacity(
    bitcoind: RegtestNode,
    tmp_path: Path,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    data = _file(tmp_path)
    srv = await payee_factory.start(
        hook=lambda app: add_file_route(app, data, chunk_size=CHUNK),
        price_sat=5000,
        mode="prepay",
        min_deposit_sat=15_000,
    )
    client = payer_client
    units = await client.open_channel(srv.url, 100_000, 60, wait_open=False, max_units=3)
    capacity = await client.open_channel(srv.url, 20_000, 60, wait_open=False)
    bitcoind.mine(1)
    await client.wait_open(units)
    await client.wait_open(capacity)
    p_units, p_cap = MeteredPayer(client, units), MeteredPayer(client, capacity)
    for i in range(3):
        assert (await p_units.fetch(f"{srv.url}/v1/file/{i}"))[0] == 200
    assert srv.store.get(units).end_reason == "unit_count_reached"
    with pytest.raises(AmountNotAgreed):  # the payer signs nothing past the agreed unit count
        await p_units.fetch(f"{srv.url}/v1/file/3")
    # 20,000 sat at 5,000 a unit: the 4th unit takes the whole deposit (no payer output)
    for i in range(4):
        assert (await p_cap.fetch(f"{srv.url}/v1/file/{i}"))[0] == 200
    assert srv.store.get(capacity).end_reason == "capacity_exhausted"
    await _closed_with(bitcoind, srv, units, 15_000)
    close = await _closed_with(bitcoind, srv, capacity, 20_000)
    assert len(close["vout"]) == 1


async def test_postpay_credit_timeout_and_wrong_amount(
    bitcoind: RegtestNode,
    tmp_path: Path,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    data = _file(tmp_path)
    srv = await payee_factory.start(
        hook=lambda app: add_file_route(app, data, chunk_size=CHUNK),
        price_sat=1000,
        mode="postpay",
        credit_limit_sat=3000,
        payment_timeout_s=1.0,
    )
    client = payer_client
    async with aiohttp.ClientSession() as s:
        good = await client.open_channel(srv.url, 100_000, 60, wait_open=False)
        late = await client.open_channel(srv.url, 100_000, 60, wait_open=False)
        wrong = await client.open_channel(srv.url, 100_000, 60, wait_open=False)
        bitcoind.mine(1)
        for cid in (good, late, wrong):
            await client.wait_open(cid)
        payer = MeteredPayer(client, good)
        for i in range(12):
            assert (await payer.fetch(f"{srv.url}/v1/file/{i}"))[0] == 200
        rec = srv.store.get(good)
        assert rec.units == 12 and rec.owed_sat == 12000 and rec.owed_sat - rec.amount_sat <= 3000
        assert await payer.settle() == 12000
        # beyond the credit limit without paying: 402 with the owed total
        for i in range(3):
            async with s.get(f"{srv.url}/v1/file/{i}", headers=_auth(client, late, f"{srv.url}/v1/file/{i}")) as r:
                assert r.status == 200
        async with s.get(f"{srv.url}/v1/file/3", headers=_auth(client, late, f"{srv.url}/v1/file/3")) as r:
            assert r.status == 402 and (await r.json())["payment"]["owed_sat"] == 3000
        client.store.add_units(late, 3)  # received outside MeteredPayer: counted by hand
        with pytest.raises(WrongAmount):
            await client.pay(late, amount=2000)  # wrong: owes 3000
        # the payee closes with the last correct payment (none here)
        await wait_until_async(lambda: srv.store.get(late).state == "closing", timeout=30, what="closing")
        assert srv.store.get(late).end_reason == "wrong_amount"
        assert srv.store.get(late).amount_sat == 0
        # timeout: units served on credit, never paid
        for i in range(2):
            async with s.get(f"{srv.url}/v1/file/{i}", headers=_auth(client, wrong, f"{srv.url}/v1/file/{i}")) as r:
                assert r.status == 200
        client.store.add_units(wrong, 2)
        await client.pay(wrong, amount=2000)
        async with s.get(f"{srv.url}/v1/file/2", headers=_auth(client, wrong, f"{srv.url}/v1/file/2")) as r:
            assert r.status == 200
        await wait_until_async(lambda: srv.store.get(wrong).state == "closing", timeout=10, what="timeout close")
        assert srv.store.get(wrong).end_reason == "payment_timeout"
        await _closed_with(bitcoind, srv, wrong, 2000)
        await client.close(good)
        await _closed_with(bitcoind, srv, good, 12000)


@pytest.mark.allow_payee_errors  # the handler's write fails once the payer dropped the connection
async def test_a_streamed_unit_the_payer_breaks_off_is_still_charged(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    """A malicious payer reads most of a paid streamed answer, then drops the connection: the
    handler's next write fails. What it received was served: the unit stays charged (no credit
    for a free next request), whatever the handler raised afterwards."""
    piece = b"x" * (256 * 1024)
    pieces = 256  # 64 MiB: more than the socket buffers hold
    finished: list[str] = []

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        try:
            for _ in range(pieces):
                await resp.write(piece)
        except BaseException as exc:
            finished.append(type(exc).__name__)
            raise
        finished.append("done")
        return resp

    srv = await payee_factory.start(
        hook=lambda app: add_paid_route(app, "GET", "/v1/stream", stream), price_sat=100, mode="prepay"
    )
    client = payer_client
    cid = await open_channel(client, bitcoind, srv.url, 100_000)
    url = f"{srv.url}/v1/stream"
    payment = await client.sign_next(cid, 100, units_ahead=1)
    headers = _auth(client, cid, url, **{HDR_AMOUNT: "100", HDR_SIGNATURE: payment.signature.hex()})
    async with aiohttp.ClientSession() as s:
        r = await s.get(url, headers=headers)
        assert r.status == 200
        got = 0
        while got < 16 * len(piece):
            got += len(await r.content.read(len(piece)))
        r.close()  # most of it received: the connection is dropped
    await wait_until_async(lambda: finished, timeout=30, what="the handler ended")
    assert finished != ["done"]  # the handler's write failed after the payer left
    await wait_until_async(
        lambda: srv.store.get(cid).units + srv.store.get(cid).unit_credit == 1, timeout=30, what="the unit settled"
    )
    rec = srv.store.get(cid)
    assert (rec.amount_sat, rec.units, rec.unit_credit) == (100, 1, 0)
