"""Selling one's own endpoints, end to end with the payer client on a real regtest node: an
aiohttp seller (btcchannel's app mounted as a sub-app, or the seller's routes inside it) and a
FastAPI seller under uvicorn; per-route prices in satoshis; the 402's header and absolute URLs."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import uvicorn
from aiohttp import web
from fastapi import FastAPI

from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.payee.asgi import PaidRoutes, payee_service
from btcchannel.payee.http import create_app
from btcchannel.payee.sell import Seller
from btcchannel.payer.client import PayerClient
from btcchannel.payer.metered import MeteredPayer
from btcchannel.store import PayeeStore
from btcchannel.testing import wait_until_async
from btcchannel.testing.fixtures import PayeeFactory


async def _paid_twice(bitcoind: RegtestNode, client: PayerClient, protocol_url: str, paid_url: str) -> dict[str, Any]:
    """The unpaid 402, then a channel and two paid requests; what the payer saw."""
    async with aiohttp.ClientSession() as http:
        async with http.get(paid_url) as resp:
            assert resp.status == 402
            header = resp.headers["WWW-Authenticate"]
            body = await resp.json()
        async with http.get(body["payment"]["info_url"]) as info:  # absolute: usable as it is
            assert info.status == 200 and (await info.json())["network"] == "regtest"
    cid = await client.open_channel(protocol_url, 20_000, 50, wait_open=False)
    bitcoind.mine(1)
    await client.wait_open(cid, timeout=30)
    payer = MeteredPayer(client, cid)
    units = body["payment"]["units"]  # the route's price in units of the agreed price, from its 402
    first = await payer.fetch(paid_url, units=units)
    second = await payer.fetch(paid_url, units=units)
    return {
        "header": header,
        "body": body,
        "responses": [first, second],
        "total": client.store.get(cid).acked_sat,
        "cid": cid,
    }


@pytest.mark.parametrize("mounted", [True, False], ids=["sub-app", "own-app"])
async def test_aiohttp_seller(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
    mounted: bool,
) -> None:
    config = payee_factory.config(price_sat=1)  # 1 sat a unit: any route price in sat
    config.datadir.mkdir(parents=True, exist_ok=True)
    store = PayeeStore(config.db_path)
    payee_app = create_app(config, store, payee_factory.node())

    async def answer(request: web.Request) -> web.Response:
        return web.json_response({"answer": 42})

    if mounted:  # the seller's own app, btcchannel's mounted under /btc
        app = web.Application()
        seller = Seller(payee_app, protocol_path="/btc")
        app.router.add_get("/answer", seller.paid(price_sat=250)(answer))
        app.add_subapp("/btc", payee_app)
    else:  # the seller's routes inside btcchannel's app
        app = payee_app
        seller = Seller(payee_app)
        app.router.add_get("/answer", seller.paid(price_sat=250)(answer))
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    origin = f"http://{host}:{port}"
    protocol = f"{origin}/btc" if mounted else origin
    try:
        seen = await _paid_twice(bitcoind, payer_client, protocol, f"{origin}/answer")
    finally:
        await runner.cleanup()
        store.close()
    assert [r[0] for r in seen["responses"]] == [200, 200]
    assert seen["responses"][0][1] == b'{"answer": 42}'
    assert seen["total"] == 500  # 250 sat a request
    payment = seen["body"]["payment"]
    assert payment["info_url"] == f"{protocol}/v1/info" and payment["channels_url"] == f"{protocol}/v1/channels"
    assert payment["network"] == "regtest" and payment["route_price_sat"] == 250
    assert payment["terms"]["price_sat"] == 1
    assert seen["header"].startswith("Btcchannel ")
    assert f'info="{protocol}/v1/info"' in seen["header"] and 'price_sat="250"' in seen["header"]
    assert 'network="regtest"' in seen["header"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_fastapi_seller_under_uvicorn(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    config = payee_factory.config(price_sat=1)
    node = payee_factory.node()
    paid = PaidRoutes({"/answer": 250, ("POST", "/render"): 2000})

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with payee_service(config, node) as service:
            paid.attach(service.gate())
            app.state.protocol_url = service.url
            yield

    api = FastAPI(lifespan=lifespan)

    @api.get("/answer")
    async def answer() -> dict[str, int]:
        return {"answer": 42}

    @api.get("/free")
    async def free() -> dict[str, str]:
        return {"free": "yes"}

    @api.post("/render")
    async def render() -> dict[str, str]:
        return {"rendered": "yes"}

    server = uvicorn.Server(
        uvicorn.Config(paid.wrap(api), host="127.0.0.1", port=_free_port(), log_level="warning", lifespan="on")
    )
    task = asyncio.ensure_future(server.serve())
    try:
        await wait_until_async(lambda: server.started, timeout=30, what="uvicorn started")
        origin = f"http://127.0.0.1:{server.config.port}"
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{origin}/free") as resp:
                assert resp.status == 200 and await resp.json() == {"free": "yes"}
        seen = await _paid_twice(bitcoind, payer_client, api.state.protocol_url, f"{origin}/answer")
    finally:
        server.should_exit = True
        await task
    assert [r[0] for r in seen["responses"]] == [200, 200]
    assert seen["responses"][1][1] == b'{"answer":42}'
    assert seen["total"] == 500
    payment = seen["body"]["payment"]
    assert payment["info_url"] == f"{api.state.protocol_url}/v1/info" and payment["route_price_sat"] == 250
    assert seen["header"].startswith("Btcchannel ") and 'units="250"' in seen["header"]
