"""Agreed terms on a real channel: stated by the payee, checked against the payer's limits, agreed
at open, stored by both sides and kept; a rogue payee cannot make the payer sign more than the
units it received times the agreed price."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import aiohttp
import pytest
from aiohttp import web

from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.core.keys import generate_private_key, public_key, request_digest, sign_digest
from btcchannel.core.terms import PayerLimits, Terms
from btcchannel.errors import AmountNotAgreed, ChannelError, TermsChanged, TermsRefused
from btcchannel.payee.metered import add_file_route, add_paid_route
from btcchannel.payer.client import PayerClient
from btcchannel.payer.metered import MeteredPayer
from btcchannel.testing import RunningPayee, open_channel, sats, tx_of, wait_until_async
from btcchannel.testing.fixtures import PayeeFactory
from btcchannel.wire import HDR_AMOUNT, HDR_AUTH, HDR_CHANNEL, HDR_OWED

CHUNK = 100
PRICE = 100


def _file(tmp_path: Path, chunks: int = 20) -> Path:
    p = tmp_path / "data.bin"
    p.write_bytes(os.urandom(CHUNK * chunks))
    return p


async def _payee(payee_factory: PayeeFactory, tmp_path: Path, **kw: Any) -> RunningPayee:
    data = _file(tmp_path)
    return await payee_factory.start(hook=lambda app: add_file_route(app, data, chunk_size=CHUNK), **kw)


async def _post(url: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.post(url, data=json.dumps(body)) as r:
        return r.status, await r.json()


async def _confirmed_close(bitcoind: RegtestNode, srv: RunningPayee, cid: str) -> dict[str, Any]:
    await wait_until_async(lambda: srv.store.get(cid).close_txid is not None, timeout=30, what="close broadcast")
    bitcoind.mine(1)
    await wait_until_async(lambda: srv.store.get(cid).state == "closed", timeout=30, what="closed")
    return tx_of(bitcoind, str(srv.store.get(cid).close_txid))


def _paid_to_payee(close: dict[str, Any], payer_script: str, deposit: int) -> int:
    """What a close takes from the deposit: the deposit minus the payer's output."""
    return deposit - sum(sats(o["value"]) for o in close["vout"] if o["scriptPubKey"]["hex"] == payer_script)


async def test_terms_are_agreed_at_open_and_kept_by_both_sides(
    bitcoind: RegtestNode,
    tmp_path: Path,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    srv = await _payee(
        payee_factory, tmp_path, price_sat=PRICE, mode="prepay", payment_timeout_s=7.5, idle_timeout_s=3600.0
    )
    client = payer_client
    info = await client.info(srv.url)
    assert info["terms"] == {
        "price_sat": PRICE,
        "mode": "prepay",
        "credit_limit_sat": 0,
        "payment_timeout_ms": 7500,
        "idle_timeout_ms": 3_600_000,
        "max_total_sat": None,
        "max_units": None,
        "max_payments": None,
        "end_time": None,
    }
    # outside the payer's limits: refused before anything is proposed or funded
    for limits in (PayerLimits(max_price_sat=PRICE - 1), PayerLimits(mode="postpay")):
        with pytest.raises(TermsRefused):
            await client.open_channel(srv.url, 100_000, 60, limits=limits)
    assert client.list() == [] and srv.store.list() == []
    end_time = int(time.time()) + 3600
    limits = PayerLimits(max_price_sat=PRICE, max_total_sat=5_000, max_payments=40, end_time=end_time)
    cid = await open_channel(client, bitcoind, srv.url, 100_000, limits=limits)
    agreed = {**info["terms"], "max_total_sat": 5_000, "max_payments": 40, "end_time": end_time}
    assert client.store.get(cid).terms == agreed and srv.store.get(cid).terms == agreed
    assert (await client.status(cid))["terms"] == agreed
    # the payee's configuration changes: new channels get the new price, this one keeps its terms
    srv.config.price_sat = 5 * PRICE
    assert (await client.info(srv.url))["terms"]["price_sat"] == 5 * PRICE
    payer = MeteredPayer(client, cid)
    for i in range(3):
        assert (await payer.fetch(f"{srv.url}/v1/file/{i}"))[0] == 200
    assert (srv.store.get(cid).amount_sat, srv.store.get(cid).units) == (3 * PRICE, 3)
    # the payer signs nothing beyond units received x agreed price, nor beyond the agreed total
    with pytest.raises(AmountNotAgreed):
        await client.pay(cid, amount=4 * PRICE)
    assert client.store.get(cid).amount_sat == 3 * PRICE
    with pytest.raises(TermsRefused):  # the payer's old limit refuses the new price
        await client.open_channel(srv.url, 100_000, 60, limits=limits)


async def test_payee_checks_proposed_terms_and_keeps_old_clients_working(
    bitcoind: RegtestNode,
    tmp_path: Path,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    srv = await _payee(payee_factory, tmp_path, price_sat=PRICE, mode="postpay", credit_limit_sat=500)
    tip = bitcoind.rpc("getblockcount")
    base = {
        "payer_pubkey": public_key(generate_private_key()).hex(),
        "deposit_sat": 100_000,
        "expiry_height": tip + 60,
        "payer_script": "0014" + "22" * 20,
    }
    required = Terms.from_json((await payer_client.info(srv.url))["terms"])
    url = f"{srv.url}/v1/channels"
    # an old client (no terms): the payee's current terms with its legacy end conditions
    status, ans = await _post(url, {**base, "max_units": 7})
    assert status == 201 and ans["terms"] == required.with_end_conditions(max_units=7).to_json()
    assert srv.store.get(ans["channel_id"]).terms == ans["terms"]
    # terms that are not the payee's: terms_mismatch; malformed or out of bounds: bad_request
    for name, value in (
        ("price_sat", PRICE - 1),
        ("mode", "prepay"),
        ("credit_limit_sat", 501),
        ("payment_timeout_ms", 1),
        ("idle_timeout_ms", 1000),
    ):
        status, ans = await _post(url, {**base, "terms": {**required.to_json(), name: value}})
        assert (status, ans["error"]["code"]) == (409, "terms_mismatch"), name
    bad_terms: list[dict[str, Any]] = [
        {**required.to_json(), "max_units": 10**100},
        {**required.to_json(), "max_total_sat": -1},
        {**required.to_json(), "end_time": 2**40},
        {**required.to_json(), "end_time": int(time.time()) - 10},
        {**required.to_json(), "max_payments": True},
        {**required.to_json(), "extra": 1},
        {k: v for k, v in required.to_json().items() if k != "end_time"},
        [1, 2],
    ]
    for terms in bad_terms:
        status, ans = await _post(url, {**base, "terms": terms})
        assert (status, ans["error"]["code"]) == (400, "bad_request"), terms
    status, ans = await _post(url, {**base, "terms": required.to_json(), "max_units": 3})
    assert (status, ans["error"]["code"]) == (400, "bad_request")
    status, ans = await _post(url, {**base, "terms": required.with_end_conditions(max_payments=2).to_json()})
    assert status == 201 and ans["terms"]["max_payments"] == 2


class RoguePayee:
    """A payee that lies: a proxy in front of a real one that rewrites its answers (``rewrite``)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.rewrite: Callable[[str, Any], Any] = lambda path, body: body
        self.owed_bonus = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.forward)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    async def forward(self, request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower().startswith("x-btcchannel")}
        headers["Host"] = request.host  # a reverse proxy that keeps the authority the payer signed
        async with (
            aiohttp.ClientSession() as s,
            s.request(
                request.method,
                self.target + request.path_qs,
                data=await request.read(),
                headers=headers,
            ) as r,
        ):
            raw = await r.read()
            out_headers = {k: v for k, v in r.headers.items() if k.lower().startswith("x-btcchannel")}
            if HDR_OWED in out_headers and self.owed_bonus:
                out_headers[HDR_OWED] = str(int(out_headers[HDR_OWED]) + self.owed_bonus)
            if r.content_type == "application/json":
                body = self.rewrite(request.path, json.loads(raw))
                if isinstance(body, dict) and "owed_sat" in body and self.owed_bonus:
                    body["owed_sat"] += self.owed_bonus
                return web.json_response(body, status=r.status, headers=out_headers)
            return web.Response(body=raw, status=r.status, headers=out_headers, content_type=r.content_type)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


async def test_rogue_payee_cannot_change_terms_or_inflate_what_is_owed(
    bitcoind: RegtestNode,
    tmp_path: Path,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    P = 10 * PRICE  # noqa: N806 - three units pay for a close
    srv = await _payee(payee_factory, tmp_path, price_sat=P, mode="postpay", credit_limit_sat=10 * P)
    rogue = RoguePayee(srv.url)
    await rogue.start()
    client = payer_client
    try:
        # drops the terms from its answer to the proposal, or changes them: nothing is funded
        def drop(path: str, body: Any) -> Any:
            return {k: v for k, v in body.items() if k != "terms"} if path == "/v1/channels" else body

        def halve_credit(path: str, body: Any) -> Any:
            if path == "/v1/channels":
                return {**body, "terms": {**body["terms"], "price_sat": 2 * P}}
            return body

        for rewrite in (drop, halve_credit):
            rogue.rewrite = rewrite
            with pytest.raises(TermsChanged):
                await client.open_channel(rogue.url, 100_000, 60, wait_open=False)
        assert client.list() == []
        assert all(rec.funding_txid is None for rec in srv.store.list())
        rogue.rewrite = lambda path, body: body
        cid = await open_channel(client, bitcoind, rogue.url, 100_000)
        payer = MeteredPayer(client, cid)
        for i in range(3):
            assert (await payer.fetch(f"{rogue.url}/v1/file/{i}"))[0] == 200

        # raises the price after open (in /v1/info and the channel object): the payer keeps the agreed one
        def raise_price(path: str, body: Any) -> Any:
            if path == "/v1/info":
                return {**body, "price_sat": 10 * P, "terms": {**body["terms"], "price_sat": 10 * P}}
            if "terms" in body and isinstance(body["terms"], dict):
                return {**body, "terms": {**body["terms"], "price_sat": 10 * P}}
            return body

        rogue.rewrite = raise_price
        with pytest.raises(TermsChanged):
            await client.status(cid)
        assert (await payer.metering()).price_sat == P
        # inflates the owed total (header and channel object): the payer refuses to sign it
        rogue.rewrite = lambda path, body: body
        rogue.owed_bonus = 90_000 - 3 * P
        with pytest.raises(AmountNotAgreed):
            await payer.settle()
        assert client.store.get(cid).amount_sat == 0
        rogue.owed_bonus = 0
        assert await payer.settle() == 3 * P
        rogue.owed_bonus = 50 * P
        for i in range(3, 5):  # the inflated header comes back with each unit served on credit
            try:
                await payer.fetch(f"{rogue.url}/v1/file/{i}")
            except AmountNotAgreed:
                pass
        units = client.store.get(cid).units
        assert client.store.get(cid).amount_sat <= units * P
        rogue.owed_bonus = 0
        await client.close(cid)
        close = await _confirmed_close(bitcoind, srv, cid)
        rec = srv.store.get(cid)
        taken = _paid_to_payee(close, rec.params["payer_script"], rec.deposit_sat)
        assert taken == rec.amount_sat <= units * P
    finally:
        await rogue.stop()


async def test_third_party_with_the_channel_id_gets_nothing(
    bitcoind: RegtestNode,
    tmp_path: Path,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    P = 10 * PRICE  # noqa: N806 - two units pay for a close
    srv = await _payee(payee_factory, tmp_path, price_sat=P, mode="postpay", credit_limit_sat=10 * P)
    client = payer_client
    cid = await open_channel(client, bitcoind, srv.url, 100_000)
    payer = MeteredPayer(client, cid)
    for i in range(2):
        assert (await payer.fetch(f"{srv.url}/v1/file/{i}"))[0] == 200
    stranger_key = generate_private_key()
    other = client._channel(client.store.get(cid))
    forged = f"{time.time_ns() // 1000}.{sign_digest(stranger_key, request_digest(cid, 1, 'GET', '/v1/file/5')).hex()}"
    captured = client.request_auth(cid, "GET", f"{srv.url}/v1/file/5")
    async with aiohttp.ClientSession() as s:
        url = f"{srv.url}/v1/file/5"
        for headers in (
            {HDR_CHANNEL: cid},  # the channel id alone
            {HDR_CHANNEL: cid, HDR_AUTH: forged},  # another key
            {HDR_CHANNEL: cid, HDR_AUTH: "1.00"},  # malformed
            {HDR_CHANNEL: cid, HDR_AUTH: client.request_auth(cid, "GET", f"{srv.url}/v1/file/6")},  # other path
            {HDR_CHANNEL: cid, HDR_AUTH: client.request_auth(cid, "POST", url)},  # other method
            {
                HDR_CHANNEL: cid,
                HDR_AUTH: f"1.{other.request_signature(cid, 1, 'GET', '/v1/file/5').hex()}",
            },  # old counter
        ):
            async with s.get(url, headers=headers) as r:
                assert r.status == 401 and (await r.json())["error"]["code"] == "unauthorized", headers
        # a request the payer signed is charged once; repeated exactly (a lost answer's retry) while it
        # is the last charged request, it is served again and charged nothing
        async with s.get(url, headers={HDR_CHANNEL: cid, HDR_AUTH: captured}) as r:
            assert r.status == 200
        client.store.add_units(cid, 1)  # the payer's own request: it counts it
        async with s.get(url, headers={HDR_CHANNEL: cid, HDR_AUTH: captured}) as r:
            assert r.status == 200 and r.headers["X-Btcchannel-Owed"] == str(3 * P)
        assert (srv.store.get(cid).units, srv.store.get(cid).owed_sat) == (3, 3 * P)
        # once a later request is charged, the old one is an older counter: 401, naming the last counter
        assert (await payer.fetch(f"{srv.url}/v1/file/6"))[0] == 200
        async with s.get(url, headers={HDR_CHANNEL: cid, HDR_AUTH: captured}) as r:
            err = (await r.json())["error"]
            assert r.status == 401 and err["code"] == "unauthorized"
            assert err["last_counter"] == srv.store.get(cid).request_counter == client.store.last_request_counter(cid)
            assert client.store.get(cid).request_counter >= err["last_counter"]  # the reserved bound covers it
    rec = srv.store.get(cid)
    assert (rec.units, rec.owed_sat) == (4, 4 * P)
    assert await payer.settle() == 4 * P
    await client.close(cid)
    close = await _confirmed_close(bitcoind, srv, cid)
    assert _paid_to_payee(close, rec.params["payer_script"], rec.deposit_sat) == 4 * P


async def test_the_authenticated_target_is_the_path_and_query_as_sent(
    bitcoind: RegtestNode,
    tmp_path: Path,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    async def echo(request: web.Request) -> web.StreamResponse:
        return web.Response(text=request.query.get("q", ""))

    srv = await payee_factory.start(
        hook=lambda app: add_paid_route(app, "GET", "/v1/echo", echo),
        price_sat=PRICE,
        mode="postpay",
        credit_limit_sat=10 * PRICE,
    )
    client = payer_client
    cid = await open_channel(client, bitcoind, srv.url, 100_000)
    payer = MeteredPayer(client, cid)
    try:
        assert await payer.fetch(f"{srv.url}/v1/echo?q=a b ü") == (200, "a b ü".encode())
        signed_for = client.request_auth(cid, "GET", f"{srv.url}/v1/echo?q=a")
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"{srv.url}/v1/echo?q=b", headers={HDR_CHANNEL: cid, HDR_AUTH: signed_for}) as r,
        ):
            assert r.status == 401 and (await r.json())["error"]["code"] == "unauthorized"
        assert srv.store.get(cid).units == 1
    finally:
        await payer.aclose()


class FailingRogue(RoguePayee):
    """A payee that keeps each prepaid unit it serves but answers ``status`` instead (500: "not
    charged, credited to your next request" by the protocol; 402: "pay first"), then refuses the
    credit with a 402."""

    def __init__(self, target: str, status: int) -> None:
        super().__init__(target)
        self.status = status

    async def forward(self, request: web.Request) -> web.StreamResponse:
        resp = await super().forward(request)
        if HDR_AMOUNT in request.headers and resp.status == 200:
            return web.json_response({"error": {"code": "internal", "message": "no"}}, status=self.status)
        return resp


@pytest.mark.parametrize("status", [500, 402])
async def test_a_payee_that_fails_paid_units_and_refuses_their_credit_is_not_paid_again(
    bitcoind: RegtestNode,
    tmp_path: Path,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
    status: int,
) -> None:
    srv = await _payee(payee_factory, tmp_path, price_sat=PRICE, mode="prepay")
    rogue = FailingRogue(srv.url, status)
    await rogue.start()
    client = payer_client
    try:
        cid = await open_channel(client, bitcoind, rogue.url, 100_000)
        payer = MeteredPayer(client, cid)
        received = 0
        for i in range(4):
            try:
                await payer.fetch(f"{rogue.url}/v1/file/{i}")
                received += 1
            except ChannelError:
                pass
        # one prepaid unit is prepay's risk; every further one would be paid for nothing
        assert received == 0
        assert client.store.get(cid).amount_sat <= PRICE * (received + 1)
        assert srv.store.get(cid).amount_sat <= PRICE * (received + 1)
    finally:
        await rogue.stop()
