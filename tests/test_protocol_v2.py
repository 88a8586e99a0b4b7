"""Protocol revision 2 of the metered service, on a real node: exact retries (the final payment, a
lost prepay answer), counters (older ones refused, a clock jump survived across a restart), prepaid
surplus as credit, the state headers, auth v2 over the body, the cross-channel credit cap, and the
uneconomic close's outcome. Where the wire matters the requests go out through a raw socket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import uvicorn
from aiohttp import web
from fastapi import FastAPI, Request, Response

from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.core.keys import request_digest, sign_digest
from btcchannel.payee.asgi import PaidRoutes, payee_service
from btcchannel.payee.gate import Charge, GateAnswer, PaymentGate
from btcchannel.payee.metered import add_file_route, add_paid_route
from btcchannel.payer.client import PayerClient
from btcchannel.payer.metered import MeteredPayer
from btcchannel.testing import open_channel, wait_until_async
from btcchannel.testing.fixtures import PayeeFactory, PayerFactory
from btcchannel.wire import HDR_AMOUNT, HDR_AUTH, HDR_CHANNEL, HDR_END_REASON, HDR_SIGNATURE, HDR_STATE

PRICE = 100
CHUNK = 64

Answer = tuple[int, dict[str, str], bytes]


async def _raw(url: str, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> Answer:
    """One HTTP/1.1 request written byte for byte to a socket; (status, headers, body) as read."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        head = [
            f"{method} {path} HTTP/1.1",
            f"Host: {parts.netloc}",
            "Connection: close",
            f"Content-Length: {len(body)}",
            *(f"{k}: {v}" for k, v in headers.items()),
        ]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout=30)
    finally:
        writer.close()
    top, _, payload = raw.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    answer_headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), answer_headers, payload


def _file(tmp_path: Path) -> Path:
    p = tmp_path / "data.bin"
    p.write_bytes(os.urandom(CHUNK * 20))
    return p


async def _prepay_headers(client: PayerClient, cid: str, url: str, units: int = 1) -> dict[str, str]:
    """A prepay request's headers: the next payment (signed and stored, not sent) and auth v2 over it."""
    rec = client.store.get(cid)
    payment = await client.sign_next(cid, rec.amount_sat + PRICE * units, units_ahead=units)
    pay = {HDR_CHANNEL: cid, HDR_AMOUNT: str(payment.amount_sat), HDR_SIGNATURE: payment.signature.hex()}
    return {**pay, HDR_AUTH: client.request_auth(cid, "GET", url, None, pay)}


def _auth_only(
    client: PayerClient, cid: str, url: str, method: str = "GET", body: bytes | None = None
) -> dict[str, str]:
    return {HDR_CHANNEL: cid, HDR_AUTH: client.request_auth(cid, method, url, body)}


async def _pay_ahead(url: str, client: PayerClient, cid: str, units: int) -> int:
    """A payment on ``/payments`` of ``units`` units ahead (what an older payer, or another
    implementation, may send); returns the acknowledged total."""
    rec = client.store.get(cid)
    payment = await client.sign_next(cid, rec.amount_sat + PRICE * units, units_ahead=units)
    status, _, raw = await _raw(
        url,
        "POST",
        f"/v1/channels/{cid}/payments",
        {"Content-Type": "application/json"},
        json.dumps(payment.to_json()).encode(),
    )
    assert status == 200, raw
    client.store.set_acked(cid, payment.amount_sat)
    return int(json.loads(raw)["amount_sat"])


async def test_the_retried_final_payment_is_answered_200(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    srv = await payee_factory.start()
    client = payer_client
    cid = await open_channel(client, bitcoind, srv.url, 20_000)
    await client.pay(cid, amount=5_000)
    await client.pay(cid, amount=20_000)  # drains the deposit: the channel ends with this payment
    rec = client.store.get(cid)
    assert rec.signature is not None and srv.store.get(cid).state == "closing"
    body = json.dumps({"amount_sat": 20_000, "signature": rec.signature.hex()}).encode()
    path = f"/v1/channels/{cid}/payments"
    status, _, raw = await _raw(srv.url, "POST", path, {"Content-Type": "application/json"}, body)
    assert status == 200, raw
    assert json.loads(raw) == {"channel_id": cid, "amount_sat": 20_000, "state": "closing"}
    # anything but the stored payment is still refused
    forged = json.dumps({"amount_sat": 20_000, "signature": rec.signature.hex()[:-4] + "0082"}).encode()
    status, _, raw = await _raw(srv.url, "POST", path, {"Content-Type": "application/json"}, forged)
    assert status == 409 and json.loads(raw)["error"]["code"] == "channel_closing"
    # still the stored result once the close is final
    await wait_until_async(lambda: srv.store.get(cid).close_txid is not None, timeout=30, what="close broadcast")
    bitcoind.mine(1)
    await wait_until_async(lambda: srv.store.get(cid).state == "closed", timeout=30, what="closed")
    status, _, raw = await _raw(srv.url, "POST", path, {"Content-Type": "application/json"}, body)
    assert status == 200 and json.loads(raw)["state"] == "closed"


async def test_a_lost_prepay_answer_is_served_again_and_charged_once(
    bitcoind: RegtestNode,
    tmp_path: Path,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    data = _file(tmp_path)
    srv = await payee_factory.start(
        hook=lambda app: add_file_route(app, data, chunk_size=CHUNK), price_sat=PRICE, mode="prepay"
    )
    client = payer_client
    cid = await open_channel(client, bitcoind, srv.url, 100_000)
    headers = await _prepay_headers(client, cid, f"{srv.url}/v1/file/3")
    first = await _raw(srv.url, "GET", "/v1/file/3", headers)  # its answer is "lost": sent again as it was
    again = await _raw(srv.url, "GET", "/v1/file/3", headers)
    assert first[0] == again[0] == 200 and first[2] == again[2] == data.read_bytes()[3 * CHUNK : 4 * CHUNK]
    assert again[1]["x-btcchannel-paid"] == str(PRICE) and again[1]["x-btcchannel-state"] == "open"
    rec = srv.store.get(cid)
    assert (rec.amount_sat, rec.units, rec.payments) == (PRICE, 1, 1)
    # only to the same target: the same payment and counter for another chunk is not served
    status, _, raw = await _raw(srv.url, "GET", "/v1/file/4", headers)
    assert status == 401 and json.loads(raw)["error"]["code"] == "unauthorized"
    assert (srv.store.get(cid).amount_sat, srv.store.get(cid).units) == (PRICE, 1)
    # a retry racing its original (both in flight at once): both served, one charge
    client.store.add_units(cid, 1, PRICE)
    headers = await _prepay_headers(client, cid, f"{srv.url}/v1/file/5")
    answers = await asyncio.gather(*(_raw(srv.url, "GET", "/v1/file/5", headers) for _ in range(3)))
    assert [a[0] for a in answers] == [200, 200, 200]
    rec = srv.store.get(cid)
    assert (rec.amount_sat, rec.units, rec.payments) == (2 * PRICE, 2, 2)


@pytest.mark.allow_payee_errors
async def test_a_request_is_served_again_only_once_the_synchronous_backup_holds_its_payment(
    bitcoind: RegtestNode,
    tmp_path: Path,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    """Serving the exact retry of a charged request acknowledges its payment: while the synchronous
    backup is behind and cannot take a copy (its store's payment barrier fails), the retry is not
    served; once the backup holds it, it is, charged once."""
    data = _file(tmp_path)
    srv = await payee_factory.start(
        hook=lambda app: add_file_route(app, data, chunk_size=CHUNK), price_sat=PRICE, mode="prepay"
    )
    cid = await open_channel(payer_client, bitcoind, srv.url, 100_000)
    headers = await _prepay_headers(payer_client, cid, f"{srv.url}/v1/file/2")
    assert (await _raw(srv.url, "GET", "/v1/file/2", headers))[0] == 200  # its answer is "lost"
    barriers: list[str] = []

    def behind_and_unwritable() -> None:
        barriers.append("failed")
        raise sqlite3.OperationalError("disk I/O error")

    srv.store.payment_barrier = behind_and_unwritable
    status, _, raw = await _raw(srv.url, "GET", "/v1/file/2", headers)
    assert status >= 500 and raw != data.read_bytes()[2 * CHUNK : 3 * CHUNK] and barriers == ["failed"]
    srv.store.payment_barrier = lambda: barriers.append("caught up")
    status, _, raw = await _raw(srv.url, "GET", "/v1/file/2", headers)
    assert status == 200 and raw == data.read_bytes()[2 * CHUNK : 3 * CHUNK]
    assert barriers == ["failed", "caught up"]
    rec = srv.store.get(cid)
    assert (rec.amount_sat, rec.units, rec.payments) == (PRICE, 1, 1)


async def test_an_older_counter_is_refused_naming_the_last(
    bitcoind: RegtestNode,
    tmp_path: Path,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    data = _file(tmp_path)
    srv = await payee_factory.start(
        hook=lambda app: add_file_route(app, data, chunk_size=CHUNK), price_sat=PRICE, mode="prepay"
    )
    client = payer_client
    cid = await open_channel(client, bitcoind, srv.url, 100_000)
    old = await _prepay_headers(client, cid, f"{srv.url}/v1/file/0")
    assert (await _raw(srv.url, "GET", "/v1/file/0", old))[0] == 200
    client.store.add_units(cid, 1, PRICE)
    new = await _prepay_headers(client, cid, f"{srv.url}/v1/file/1")
    assert (await _raw(srv.url, "GET", "/v1/file/1", new))[0] == 200
    status, hdrs, raw = await _raw(srv.url, "GET", "/v1/file/0", old)  # no longer the last charged request
    err = json.loads(raw)["error"]
    assert status == 401 and err["code"] == "unauthorized" and hdrs["x-btcchannel-state"] == "open"
    assert err["last_counter"] == int(new[HDR_AUTH].split(".")[1]) == srv.store.get(cid).request_counter
    rec = srv.store.get(cid)
    assert (rec.amount_sat, rec.units) == (2 * PRICE, 2)


async def test_prepaid_surplus_is_spent_by_auth_only_requests(
    bitcoind: RegtestNode,
    tmp_path: Path,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    data = _file(tmp_path)
    srv = await payee_factory.start(
        hook=lambda app: add_file_route(app, data, chunk_size=CHUNK), price_sat=PRICE, mode="prepay"
    )
    client = payer_client
    cid = await open_channel(client, bitcoind, srv.url, 100_000)
    assert await _pay_ahead(srv.url, client, cid, 3) == 3 * PRICE  # paid on /payments: three units ahead
    for i in range(3):
        headers = _auth_only(client, cid, f"{srv.url}/v1/file/{i}")
        assert HDR_AMOUNT not in headers
        status, hdrs, chunk = await _raw(srv.url, "GET", f"/v1/file/{i}", headers)
        assert status == 200 and chunk == data.read_bytes()[i * CHUNK : (i + 1) * CHUNK]
        assert hdrs["x-btcchannel-paid"] == str(3 * PRICE)
    rec = srv.store.get(cid)
    assert (rec.amount_sat, rec.units) == (3 * PRICE, 3)
    status, _, raw = await _raw(srv.url, "GET", "/v1/file/3", _auth_only(client, cid, f"{srv.url}/v1/file/3"))
    ans = json.loads(raw)
    assert status == 402 and ans["error"]["code"] == "payment_required"
    assert ans["payment"]["next_amount_sat"] == 4 * PRICE
    # the payer's own client uses such a surplus too, paying nothing more for it
    client.store.add_units(cid, 3)
    assert await _pay_ahead(srv.url, client, cid, 2) == 5 * PRICE
    payer = MeteredPayer(client, cid)
    try:
        assert (await payer.fetch(f"{srv.url}/v1/file/3"))[0] == 200
        assert (await payer.fetch(f"{srv.url}/v1/file/4"))[0] == 200
    finally:
        await payer.aclose()
    rec = srv.store.get(cid)
    assert (rec.amount_sat, rec.units) == (5 * PRICE, 5)


async def test_the_unit_that_ends_the_channel_says_so(
    bitcoind: RegtestNode,
    tmp_path: Path,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    data = _file(tmp_path)
    srv = await payee_factory.start(
        hook=lambda app: add_file_route(app, data, chunk_size=CHUNK), price_sat=PRICE, mode="prepay"
    )
    client = payer_client
    cid = await open_channel(client, bitcoind, srv.url, 100_000, max_units=2)
    status, hdrs, _ = await _raw(
        srv.url, "GET", "/v1/file/0", await _prepay_headers(client, cid, f"{srv.url}/v1/file/0")
    )
    assert status == 200 and hdrs["x-btcchannel-state"] == "open" and "x-btcchannel-end-reason" not in hdrs
    client.store.add_units(cid, 1, PRICE)
    last = await _prepay_headers(client, cid, f"{srv.url}/v1/file/1")
    status, hdrs, _ = await _raw(srv.url, "GET", "/v1/file/1", last)
    assert status == 200
    assert (hdrs[HDR_STATE.lower()], hdrs[HDR_END_REASON.lower()]) == ("closing", "unit_count_reached")
    # its exact retry is served again with the same headers (and not charged)
    status, hdrs, _ = await _raw(srv.url, "GET", "/v1/file/1", last)
    assert status == 200 and hdrs["x-btcchannel-state"] == "closing" and hdrs["x-btcchannel-paid"] == str(2 * PRICE)
    assert (srv.store.get(cid).units, srv.store.get(cid).amount_sat) == (2, 2 * PRICE)


async def test_a_swapped_body_is_refused(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    async def echo(request: web.Request) -> web.StreamResponse:
        return web.Response(body=await request.read())

    srv = await payee_factory.start(
        hook=lambda app: add_paid_route(app, "POST", "/v1/echo", echo),
        price_sat=PRICE,
        mode="postpay",
        credit_limit_sat=10 * PRICE,
    )
    client = payer_client
    cid = await open_channel(client, bitcoind, srv.url, 100_000)
    url = f"{srv.url}/v1/echo"
    signed = _auth_only(client, cid, url, "POST", b'{"buy": 1}')
    status, _, raw = await _raw(srv.url, "POST", "/v1/echo", signed, b'{"buy": 9}')  # swapped in transit
    assert status == 401 and json.loads(raw)["error"]["code"] == "unauthorized"
    assert srv.store.get(cid).units == 0
    # a v1 signature does not cover the body: refused on any request that has one
    counter = client.store.next_request_counter(cid, client.clock_us())
    v1_sig = sign_digest(client.store.get(cid).privkey, request_digest(cid, counter, "POST", "/v1/echo"))
    v1 = f"{counter}.{v1_sig.hex()}"
    status, _, raw = await _raw(srv.url, "POST", "/v1/echo", {HDR_CHANNEL: cid, HDR_AUTH: v1}, b'{"buy": 1}')
    assert status == 401 and "v2" in json.loads(raw)["error"]["message"]
    # the body it was signed for is served and charged
    status, _, raw = await _raw(
        srv.url, "POST", "/v1/echo", _auth_only(client, cid, url, "POST", b'{"buy": 1}'), b'{"buy": 1}'
    )
    assert (status, raw) == (200, b'{"buy": 1}')
    # so is the same through the payer's client (it signs the body it sends)
    payer = MeteredPayer(client, cid)
    try:
        assert await payer.fetch(url, "POST", data=b"xyz") == (200, b"xyz")
    finally:
        await payer.aclose()
    assert (srv.store.get(cid).units, srv.store.get(cid).owed_sat) == (2, 2 * PRICE)


async def test_a_clock_jump_and_a_restart_do_not_lock_the_channel(
    bitcoind: RegtestNode,
    tmp_path: Path,
    payee_factory: PayeeFactory,
    payer_factory: PayerFactory,
) -> None:
    data = _file(tmp_path)
    srv = await payee_factory.start(
        hook=lambda app: add_file_route(app, data, chunk_size=CHUNK),
        price_sat=PRICE,
        mode="postpay",
        credit_limit_sat=10 * PRICE,
    )
    client = payer_factory("payer")
    cid = await open_channel(client, bitcoind, srv.url, 100_000)
    ten_years_us = 10 * 365 * 86_400 * 1_000_000
    ahead = client.clock_us() + ten_years_us
    client.clock_us = lambda: ahead  # type: ignore[method-assign]
    payer = MeteredPayer(client, cid)
    assert (await payer.fetch(f"{srv.url}/v1/file/0"))[0] == 200
    await payer.aclose()
    assert srv.store.get(cid).request_counter == ahead
    await client.aclose()
    restarted = payer_factory("payer")  # the clock is back to now, the process is new
    payer = MeteredPayer(restarted, cid)
    try:
        assert (await payer.fetch(f"{srv.url}/v1/file/1"))[0] == 200
        assert (await payer.fetch(f"{srv.url}/v1/file/2"))[0] == 200
    finally:
        await payer.aclose()
    # counters are reserved in blocks: the restarted payer starts above the stored bound, which is
    # above every counter used before (so nothing used before the restart is ever used again)
    used = srv.store.get(cid).request_counter
    assert ahead < used <= restarted.store.get(cid).request_counter
    await restarted.aclose()
    # a payer store that lost its counter (restored from an older copy) resyncs once from the 401
    db = sqlite3.connect(restarted.store.path)
    with db:
        db.execute("UPDATE channels SET request_counter=0 WHERE channel_id=?", (cid,))
    db.close()
    restarted = payer_factory("payer")
    payer = MeteredPayer(restarted, cid)
    try:
        assert (await payer.fetch(f"{srv.url}/v1/file/3"))[0] == 200
    finally:
        await payer.aclose()
    assert srv.store.get(cid).units == 4


async def test_credit_across_channels_is_capped(
    bitcoind: RegtestNode,
    tmp_path: Path,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    price = 1_000
    data = _file(tmp_path)
    srv = await payee_factory.start(
        hook=lambda app: add_file_route(app, data, chunk_size=CHUNK),
        price_sat=price,
        mode="postpay",
        credit_limit_sat=2 * price,
        credit_cap_per_client_sat=6 * price,
    )
    client = payer_client
    cids = [await client.open_channel(srv.url, 100_000, 60, wait_open=False) for _ in range(4)]
    bitcoind.mine(1)
    for cid in cids:
        await client.wait_open(cid, timeout=60)

    async def unit(cid: str, i: int) -> Answer:
        return await _raw(srv.url, "GET", f"/v1/file/{i}", _auth_only(client, cid, f"{srv.url}/v1/file/{i}"))

    for cid in cids[:3]:  # each channel within its own limit: 2 units on credit, never paid
        for i in range(2):
            assert (await unit(cid, i))[0] == 200
    status, _, raw = await unit(cids[3], 0)
    assert status == 402 and json.loads(raw)["error"]["code"] == "credit_cap_reached"
    assert srv.store.get(cids[3]).units == 0 and srv.store.outstanding_credit() == 6 * price
    # once one channel settles what it owes, the fourth gets credit
    client.store.add_units(cids[0], 2)
    assert await client.pay(cids[0], amount=2 * price) == 2 * price
    assert (await unit(cids[3], 0))[0] == 200
    info: dict[str, Any] = srv.svc.info()
    assert info["credit_cap_per_client_sat"] == 6 * price and info["credit_cap_total_sat"] is None


async def test_an_uneconomic_close_ends_refunded(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    srv = await payee_factory.start(close_fee_rate_sat_vb=5.0)
    client = payer_client
    cid = await open_channel(client, bitcoind, srv.url, 20_000, lifetime=20)
    await client.pay(cid, amount=300)  # cannot pay for a close at any rate
    sig = client.store.get(cid).signature
    assert sig is not None
    await client.close(cid)
    await wait_until_async(lambda: srv.store.get(cid).close_uneconomic, timeout=30, what="close found uneconomic")
    obj = await client.status(cid)
    assert (obj["state"], obj["close_txid"], obj["end_reason"]) == ("closing", None, "payer_request+close_uneconomic")
    expiry = srv.store.get(cid).expiry_height
    bitcoind.mine(max(0, expiry - bitcoind.rpc("getblockcount")))
    txid = await client.refund(cid)
    refund = bitcoind.rpc("getrawtransaction", txid, True)
    assert refund["vin"][0]["sequence"] == 0xFFFFFFFD  # signals BIP125 replacement
    assert refund["locktime"] == expiry
    bitcoind.mine(1)
    await wait_until_async(lambda: srv.store.get(cid).state == "refunded", timeout=30, what="refunded")
    assert srv.store.get(cid).exception_txid == txid
    # the stored payment, retried after the end, is still answered with its stored result
    status, _, raw = await _raw(
        srv.url,
        "POST",
        f"/v1/channels/{cid}/payments",
        {"Content-Type": "application/json"},
        json.dumps({"amount_sat": 300, "signature": sig.hex()}).encode(),
    )
    assert status == 200 and json.loads(raw) == {"channel_id": cid, "amount_sat": 300, "state": "refunded"}


async def test_paid_requests_need_tls_or_a_loopback_client(
    bitcoind: RegtestNode,
    tmp_path: Path,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    data = _file(tmp_path)
    srv = await payee_factory.start(
        hook=lambda app: add_file_route(app, data, chunk_size=CHUNK),
        price_sat=PRICE,
        mode="postpay",
        credit_limit_sat=10 * PRICE,
    )
    cid = await open_channel(payer_client, bitcoind, srv.url, 100_000)
    gate = PaymentGate(srv.svc)
    url = "http://api.example/v1/file/0"
    headers = {"Host": "api.example", **_auth_only(payer_client, cid, url)}
    refused = await gate.admit("GET", "/v1/file/0", headers, 1, "http://api.example", peer="203.0.113.5")
    assert isinstance(refused, GateAnswer) and (refused.status, refused.body["error"]["code"]) == (403, "tls_required")
    assert srv.store.get(cid).units == 0
    for origin, peer in (("https://api.example", "203.0.113.5"), ("http://api.example", "::1")):
        headers = {"Host": "api.example", **_auth_only(payer_client, cid, url)}
        admitted = await gate.admit("GET", "/v1/file/0", headers, 1, origin, peer=peer)
        assert isinstance(admitted, Charge) and admitted.rec is not None
        assert (await gate.served(admitted, 200))["X-Btcchannel-State"] == "open"
    assert srv.store.get(cid).units == 2
    srv.svc.config.allow_plain_http = True  # the operator's opt-out
    headers = {"Host": "api.example", **_auth_only(payer_client, cid, url)}
    assert isinstance(
        await gate.admit("GET", "/v1/file/0", headers, 1, "http://api.example", peer="203.0.113.5"), Charge
    )


async def test_an_asgi_paid_post_is_signed_over_its_body(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    config = payee_factory.config(price_sat=1, mode="postpay", credit_limit_sat=10_000)
    paid = PaidRoutes({("POST", "/echo"): 100})

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with payee_service(config, payee_factory.node()) as service:
            paid.attach(service.gate())
            app.state.protocol_url = service.url
            yield

    api = FastAPI(lifespan=lifespan)

    @api.post("/echo")
    async def echo(request: Request) -> Response:
        return Response(await request.body())  # the app still receives the body the gate read

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(paid.wrap(api), host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    task = asyncio.ensure_future(server.serve())
    try:
        await wait_until_async(lambda: server.started, timeout=30, what="uvicorn started")
        origin = f"http://127.0.0.1:{port}"
        cid = await open_channel(payer_client, bitcoind, api.state.protocol_url, 20_000)
        payer = MeteredPayer(payer_client, cid)
        try:
            assert await payer.fetch(f"{origin}/echo", "POST", units=100, data=b"a" * 70_000) == (200, b"a" * 70_000)
        finally:
            await payer.aclose()
        signed = _auth_only(payer_client, cid, f"{origin}/echo", "POST", b"pay 1")
        status, _, raw = await _raw(origin, "POST", "/echo", signed, b"pay 9")
        assert status == 401 and json.loads(raw)["error"]["code"] == "unauthorized"
        signed = _auth_only(payer_client, cid, f"{origin}/echo", "POST", b"pay 1")
        assert (await _raw(origin, "POST", "/echo", signed, b"pay 1"))[::2] == (200, b"pay 1")
    finally:
        server.should_exit = True
        await task


async def test_a_retry_served_while_its_original_fails_keeps_the_unit_charged(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    """The exact retry of a charged request, served while its original still runs: when the original
    then fails (5xx), the unit the retry delivered stays charged (no credit for a served unit)."""
    calls: list[str] = []
    release = asyncio.Event()

    async def flaky(request: web.Request) -> web.StreamResponse:
        calls.append("in")
        if len(calls) == 1:  # the original: waits (bounded) for its retry to be served, then fails
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(release.wait(), timeout=10)
            raise web.HTTPServiceUnavailable()
        release.set()
        return web.Response(text="the work")

    srv = await payee_factory.start(
        hook=lambda app: add_paid_route(app, "GET", "/work", flaky), price_sat=PRICE, mode="prepay"
    )
    client = payer_client
    cid = await open_channel(client, bitcoind, srv.url, 100_000)
    url = f"{srv.url}/work"
    payment = await client.sign_next(cid, PRICE, units_ahead=1)
    pay = {HDR_CHANNEL: cid, HDR_AMOUNT: str(payment.amount_sat), HDR_SIGNATURE: payment.signature.hex()}
    headers = {**pay, HDR_AUTH: client.request_auth(cid, "GET", url, None, pay)}
    original = asyncio.ensure_future(_raw(srv.url, "GET", "/work", headers))
    await wait_until_async(lambda: len(calls) == 1, timeout=10, what="the original running")
    retry = await _raw(srv.url, "GET", "/work", headers)
    first = await original
    assert (first[0], retry[0]) == (503, 200)
    rec = srv.store.get(cid)
    assert (rec.amount_sat, rec.units) == (PRICE, 1)  # one payment, one unit served, nothing credited back
    auth_only = {HDR_CHANNEL: cid, HDR_AUTH: client.request_auth(cid, "GET", url)}
    status, _, raw = await _raw(srv.url, "GET", "/work", auth_only)
    assert status == 402, raw  # no credit left to serve from
