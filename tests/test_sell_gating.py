"""What a paid route charges, on real servers and a real channel: an aiohttp handler that answers
by raising an HTTP answer (a redirect, 200, 201, 304) is charged and never credited; an ASGI app
(FastAPI under uvicorn) is priced through its own router: HEAD like GET, under a root path, and
routes with path parameters; a price that matches no route is refused."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
import uvicorn
from aiohttp import web
from fastapi import Depends, FastAPI
from starlette.requests import Request
from starlette.responses import PlainTextResponse

from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.payee.asgi import PaidRoutes, payee_service
from btcchannel.payee.metered import add_paid_route
from btcchannel.payer.client import PayerClient
from btcchannel.payer.metered import MeteredPayer
from btcchannel.testing import open_channel, wait_until_async
from btcchannel.testing.fixtures import PayeeFactory
from btcchannel.wire import HDR_AUTH, HDR_CHANNEL, HDR_PAID

RAISED: dict[str, Callable[[], web.HTTPException]] = {
    "found": lambda: web.HTTPFound("/bought"),
    "ok": lambda: web.HTTPOk(text="ok"),
    "created": lambda: web.HTTPCreated(text="created"),
    "not-modified": lambda: web.HTTPNotModified(),
}


def _raising(make: Callable[[], web.HTTPException]) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        raise make()

    return handler


async def test_raised_http_answers_are_charged_and_never_credited(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    async def bought(request: web.Request) -> web.Response:
        return web.Response(text="the file")

    async def broken(request: web.Request) -> web.Response:
        raise web.HTTPServiceUnavailable()

    def hook(app: web.Application) -> None:
        app.router.add_get("/bought", bought)
        for name, make in RAISED.items():
            add_paid_route(app, "GET", f"/raise/{name}", _raising(make))
        add_paid_route(app, "GET", "/broken", broken)

    srv = await payee_factory.start(hook=hook, price_sat=100, mode="prepay")
    cid = await open_channel(payer_client, bitcoind, srv.url, 100_000)
    payer = MeteredPayer(payer_client, cid)
    async with aiohttp.ClientSession() as http:
        for i, name in enumerate(RAISED, start=1):
            url = f"{srv.url}/raise/{name}"
            answer = await payer.request(url, allow_redirects=False)
            assert answer.status < 400 and answer.headers[HDR_PAID] == str(100 * i), name
            assert srv.store.get(cid).amount_sat == 100 * i
            # nothing was credited back: the same request without a payment is refused
            headers = {HDR_CHANNEL: cid, HDR_AUTH: payer_client.request_auth(cid, "GET", url)}
            async with http.get(url, headers=headers, allow_redirects=False) as resp:
                assert resp.status == 402, name
        # a raised 5xx is not charged: its unit is credited to the next request, which pays nothing
        with pytest.raises(Exception):  # noqa: B017,PT011 - the 503 as the payer's typed error
            await payer.fetch(f"{srv.url}/broken")
        paid = srv.store.get(cid).amount_sat
        assert paid == 100 * (len(RAISED) + 1)
        assert (await payer.request(f"{srv.url}/raise/ok")).status == 200
        assert srv.store.get(cid).amount_sat == paid  # served from the credit of the failed one


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@contextlib.asynccontextmanager
async def _uvicorn(app: object, **kw: object) -> AsyncIterator[str]:
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=_free_port(),
            log_level="warning",  # type: ignore[arg-type]
            lifespan="on",
            **kw,
        )
    )  # type: ignore[arg-type]
    task = asyncio.ensure_future(server.serve())
    try:
        await wait_until_async(lambda: server.started or task.done(), timeout=30, what="uvicorn started")
        assert not task.done(), "uvicorn did not start"
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        await task


@pytest.mark.parametrize("root_path", ["", "/api"], ids=["root", "root-path"])
async def test_asgi_routes_priced_through_the_router(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
    root_path: str,
) -> None:
    config = payee_factory.config(price_sat=1)
    node = payee_factory.node()
    paid = PaidRoutes({"/items/{item_id}": 250, "/page": 100})
    ran: list[str] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with payee_service(config, node) as service:
            paid.attach(service.gate())
            app.state.protocol_url = service.url
            yield

    api = FastAPI(lifespan=lifespan)

    @api.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        ran.append(f"item {item_id}")
        return {"item": item_id}

    async def page(request: Request) -> PlainTextResponse:  # a Starlette route: GET and HEAD
        ran.append("page")
        return PlainTextResponse("the page")

    api.add_route("/page", page, methods=["GET"])

    @api.get("/free")
    async def free() -> dict[str, str]:
        ran.append("free")
        return {"free": "yes"}

    @api.get("/report", dependencies=[Depends(paid.costs(300))])
    async def report() -> dict[str, str]:
        ran.append("report")
        return {"report": "done"}

    async with _uvicorn(paid.wrap(api), root_path=root_path) as origin:
        # uvicorn --root-path: the app is behind a proxy that strips the prefix; uvicorn puts it back
        async with aiohttp.ClientSession() as http:
            for method, path, units in [
                ("HEAD", "/page", 100),
                ("GET", "/page", 100),
                ("GET", "/items/7", 250),
                ("GET", "/report", 300),
            ]:
                async with http.request(method, origin + path) as resp:
                    assert resp.status == 402, (method, path)
                    assert f'units="{units}"' in resp.headers["WWW-Authenticate"], (method, path)
            async with http.get(origin + "/items/7/extra") as resp:  # under a priced prefix: never served
                assert resp.status == 404
            async with http.get(origin + "/free") as resp:
                assert resp.status == 200
        assert ran == ["free"]  # no paid handler ran unpaid
        if root_path:
            return  # (the payer signs the path it sends: paying through the stripping proxy is not set up here)
        cid = await open_channel(payer_client, bitcoind, api.state.protocol_url, 20_000)
        payer = MeteredPayer(payer_client, cid)
        assert (await payer.request(origin + "/items/7")).json() == {"item": 7}
        assert (await payer.request(origin + "/report")).json() == {"report": "done"}
        head = await payer.request(origin + "/page", method="HEAD")
        assert head.status == 200 and head.body == b""
    assert ran == ["free", "item 7", "report", "page"]
    assert payer_client.store.get(cid).acked_sat == 250 + 300 + 100


def test_attach_refuses_a_price_matching_no_route(tmp_path: object) -> None:
    api = FastAPI()

    @api.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"item": item_id}

    class Gate:
        def units_for(self, price_sat: int) -> int:
            return price_sat

    for prices in ({"/items/{id}": 10}, {"/itemz/{item_id}": 10}, {("POST", "/items/{item_id}"): 10}):
        paid = PaidRoutes(prices)
        paid.wrap(api)
        with pytest.raises(ValueError, match="no route"):
            paid.attach(Gate())  # type: ignore[arg-type]
    paid = PaidRoutes({"/items/{item_id}": 10})
    paid.wrap(api)
    paid.attach(Gate())  # type: ignore[arg-type]
    assert paid.price("GET", "/items/3") == 10
    assert paid.price("HEAD", "/items/3") is None  # a FastAPI GET route answers HEAD 405, running nothing
    assert paid.price("GET", "/api/items/3", root_path="/api") == 10
    assert paid.price("GET", "/other") is None

    async def plain(scope: object, receive: object, send: object) -> None:  # an ASGI app without a router
        raise AssertionError("not called")

    paid = PaidRoutes({"/items/{item_id}": 10})
    paid.wrap(plain)  # type: ignore[arg-type]
    paid.attach(Gate())  # type: ignore[arg-type]
    assert paid.price("HEAD", "/items/3") == 10 and paid.price("GET", "/api/items/3", root_path="/api") == 10
    assert paid.price("GET", "/items") is None
