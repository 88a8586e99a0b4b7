"""The seller's path against hostile buyers and sellers, on real servers and a real regtest node:
a buyer's budget holds under concurrent requests, a handler's charged 4xx reaches the caller as its
answer and counts against the budget, a lying 402 never makes a buyer fund a channel it will not
use, a route no channel can carry opens nothing, and a websocket route cannot be priced (the gate
cannot meter it, so it would be served unpaid)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import requests
import uvicorn
from aiohttp import web
from fastapi import FastAPI, WebSocket
from starlette.routing import Mount, Router, WebSocketRoute

from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.errors import TermsRefused
from btcchannel.payee.asgi import PaidRoutes, payee_service
from btcchannel.payee.metered import add_paid_route
from btcchannel.payee.seller import PaidService
from btcchannel.payer.buyer import Buyer
from btcchannel.payer.client import PayerClient
from btcchannel.payer.metered import MeteredPayer
from btcchannel.testing import RunningPayee, mining, open_channel, wait_until_async
from btcchannel.testing.fixtures import PayeeFactory

PRICE = 250
DEPOSIT = 10_000


async def _seller(payee_factory: PayeeFactory) -> RunningPayee:
    async def answer(request: web.Request) -> web.StreamResponse:
        return web.json_response({"answer": 42})

    async def missing(request: web.Request) -> web.StreamResponse:  # the seller's own 404, after payment
        return web.json_response({"detail": "no such item"}, status=404)

    def hook(app: web.Application) -> None:
        add_paid_route(app, "GET", "/answer", answer, units=PRICE)
        add_paid_route(app, "GET", "/missing", missing, units=PRICE)

    return await payee_factory.start(hook=hook, price_sat=1, mode="prepay")


def _buyer(bitcoind: RegtestNode, wallet: str, datadir: Path, **budget: Any) -> Buyer:
    return Buyer(
        datadir=datadir,
        wallet=wallet,
        rpc_url=bitcoind.rpc_url,
        rpc_user=bitcoind.rpc_user,
        rpc_password=bitcoind.rpc_password,
        **{"max_price_sat": 1, "deposit_sat": DEPOSIT, **budget},
    )


def _paid_at(srv: RunningPayee, channels: list[str]) -> int:
    return sum(srv.store.get(cid).amount_sat for cid in channels)


async def test_concurrent_requests_stay_within_the_total_budget(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    funded_wallet: str,
    tmp_path: Path,
) -> None:
    srv = await _seller(payee_factory)
    url = f"{srv.url}/answer"
    async with _buyer(bitcoind, funded_wallet, tmp_path / "buyer", max_total_sat=2 * PRICE) as buyer:
        async with mining(bitcoind), httpx.AsyncClient(auth=buyer.httpx_auth(), timeout=120) as http:
            results = await asyncio.gather(*(http.get(url) for _ in range(5)), return_exceptions=True)
        channels = buyer.channels
        served = [r for r in results if isinstance(r, httpx.Response) and r.status_code == 200]
        refused = [r for r in results if isinstance(r, TermsRefused)]
        assert (len(served), len(refused)) == (2, 3), results
        assert buyer.spent_sat == 2 * PRICE
    assert _paid_at(srv, channels) == 2 * PRICE  # nothing paid over the budget


@pytest.mark.parametrize("kind", ["httpx", "requests"])
async def test_a_charged_4xx_is_the_callers_answer_and_counts_against_the_budget(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    funded_wallet: str,
    tmp_path: Path,
    kind: str,
) -> None:
    srv = await _seller(payee_factory)

    def buy(buyer: Buyer) -> list[tuple[int, Any]]:
        out: list[tuple[int, Any]] = []
        if kind == "httpx":
            with httpx.Client(auth=buyer.httpx_auth(), timeout=120) as http:
                for path in ("/missing", "/answer", "/missing"):
                    resp = http.get(srv.url + path)
                    out.append((resp.status_code, resp.json()))
        else:
            with requests.Session() as http:
                http.auth = buyer.requests_auth()
                for path in ("/missing", "/answer", "/missing"):
                    answer = http.get(srv.url + path, timeout=120)
                    out.append((answer.status_code, answer.json()))
        return out

    async with _buyer(bitcoind, funded_wallet, tmp_path / "buyer", max_total_sat=3 * PRICE) as buyer:
        async with mining(bitcoind):
            seen = await asyncio.to_thread(buy, buyer)
            assert seen == [(404, {"detail": "no such item"}), (200, {"answer": 42}), (404, {"detail": "no such item"})]
            assert buyer.spent_sat == 3 * PRICE  # the 404s were charged: they count
            with pytest.raises(TermsRefused):  # and the budget is spent
                await asyncio.to_thread(buy, buyer)
        channels = buyer.channels
    assert _paid_at(srv, channels) == 3 * PRICE


async def test_a_lying_402_makes_the_buyer_fund_nothing(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    funded_wallet: str,
    tmp_path: Path,
) -> None:
    """A route whose 402 claims 1 sat while the payee's agreed terms are 250 sat a unit: the buyer's
    per-unit limit refuses the payee's terms before anything is funded."""
    payee = await payee_factory.start(price_sat=PRICE, mode="prepay")

    async def lure(request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {"payment": {}},
            status=402,
            headers={
                "WWW-Authenticate": (
                    f'Btcchannel realm="{payee.url}", network="regtest", info="{payee.url}/v1/info", '
                    f'channels="{payee.url}/v1/channels", price_sat="1", units="1", mode="prepay"'
                )
            },
        )

    def hook(app: web.Application) -> None:
        app.router.add_get("/x", lure)

    liar = await payee_factory.start(payee_factory.config("liar"), hook=hook)
    before = bitcoind.rpc("getmempoolinfo")["size"]
    async with _buyer(bitcoind, funded_wallet, tmp_path / "buyer") as buyer:
        async with httpx.AsyncClient(auth=buyer.httpx_auth(), timeout=120) as http:
            with pytest.raises(TermsRefused):
                await http.get(f"{liar.url}/x")
        assert buyer.channels == []
    assert bitcoind.rpc("getmempoolinfo")["size"] == before  # no funding was sent


async def test_a_route_no_channel_can_carry_opens_nothing(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    funded_wallet: str,
    tmp_path: Path,
) -> None:
    async def dear(request: web.Request) -> web.StreamResponse:
        return web.json_response({"dear": True})

    srv = await payee_factory.start(
        hook=lambda app: add_paid_route(app, "GET", "/dear", dear, units=2 * DEPOSIT), price_sat=1, mode="prepay"
    )
    before = bitcoind.rpc("getmempoolinfo")["size"]
    async with _buyer(bitcoind, funded_wallet, tmp_path / "buyer") as buyer:
        async with httpx.AsyncClient(auth=buyer.httpx_auth(), timeout=120) as http:
            with pytest.raises(TermsRefused, match="deposit"):
                await http.get(f"{srv.url}/dear")
        assert buyer.channels == []
    assert bitcoind.rpc("getmempoolinfo")["size"] == before


class _Gate:
    def units_for(self, price_sat: int) -> int:
        return price_sat


def test_a_websocket_route_cannot_be_priced() -> None:
    api = FastAPI()

    @api.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        raise AssertionError("not reached")

    paid = PaidRoutes({"/ws": 10})
    paid.wrap(api)
    with pytest.raises(ValueError, match="websocket"):
        paid.attach(_Gate())  # type: ignore[arg-type]


async def test_a_websocket_under_a_priced_mount_is_refused() -> None:
    ran: list[str] = []

    async def ws(websocket: Any) -> None:
        ran.append("ws")
        await websocket.accept()
        await websocket.close()

    app = Router(routes=[Mount("/paid", routes=[WebSocketRoute("/ws", ws)])])
    paid = PaidRoutes({"/paid": 10})
    gated = paid.wrap(app)
    paid.attach(_Gate())  # type: ignore[arg-type]
    sent: list[dict[str, Any]] = []
    incoming: list[dict[str, Any]] = [{"type": "websocket.connect"}, {"type": "websocket.disconnect", "code": 1000}]

    async def receive() -> dict[str, Any]:
        return incoming.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "websocket",
        "path": "/paid/ws",
        "raw_path": b"/paid/ws",
        "root_path": "",
        "headers": [],
        "query_string": b"",
        "scheme": "ws",
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
        "subprotocols": [],
    }
    await gated(scope, receive, send)  # type: ignore[arg-type]
    assert ran == [] and sent[0]["type"] == "websocket.close"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def _raw(origin: str, request_line: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """``request_line`` written byte for byte; (status, body)."""
    parts = urlsplit(origin)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        head = [
            request_line,
            f"Host: {parts.netloc}",
            "Connection: close",
            "Content-Length: 0",
            *(f"{k}: {v}" for k, v in (headers or {}).items()),
        ]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout=30)
    finally:
        writer.close()
    top, _, body = raw.partition(b"\r\n\r\n")
    return int(top.split(b" ", 2)[1]), body


async def test_asgi_path_and_method_tricks_never_run_a_priced_handler(
    payee_factory: PayeeFactory,
    tmp_path: Path,
) -> None:
    """Raw request targets a router might see differently from the pricing: each is answered 402
    (priced), or by the app without running the handler (404, 405, a redirect)."""
    config = payee_factory.config(price_sat=1)
    node = payee_factory.node()
    paid = PaidRoutes({"/items/{item_id}": 250, "/answer": 100, "/docs-area": 50})
    ran: list[str] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with payee_service(config, node) as service:
            paid.attach(service.gate())
            yield

    api = FastAPI(lifespan=lifespan)

    @api.get("/items/{item_id}")
    async def item(item_id: str) -> dict[str, str]:
        ran.append(f"item {item_id}")
        return {"item": item_id}

    @api.get("/answer")
    async def answer() -> dict[str, int]:
        ran.append("answer")
        return {"answer": 42}

    async def area(scope: Any, receive: Any, send: Any) -> None:  # a mounted raw ASGI app, priced whole
        ran.append("area " + scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"area"})

    api.mount("/docs-area", area)

    @api.get("/{anything:path}")
    async def catch_all(anything: str) -> dict[str, str]:  # a free catch-all after the priced routes
        return {"free": anything}

    server = uvicorn.Server(
        uvicorn.Config(paid.wrap(api), host="127.0.0.1", port=_free_port(), log_level="warning", lifespan="on")
    )
    task = asyncio.ensure_future(server.serve())
    try:
        await wait_until_async(lambda: server.started or task.done(), timeout=30, what="uvicorn started")
        origin = f"http://127.0.0.1:{server.config.port}"
        for line in [
            "GET /answer HTTP/1.1",
            "GET /answer?x=1 HTTP/1.1",
            "GET /items/7 HTTP/1.1",
            "GET /items%2F7 HTTP/1.1",
            "GET /items/%37 HTTP/1.1",
            "GET /%61nswer HTTP/1.1",
            "GET /docs-area/x HTTP/1.1",
            "POST /docs-area/x HTTP/1.1",
            "GET /docs-area/../answer HTTP/1.1",
        ]:
            status, body = await _raw(origin, line)
            assert status == 402, (line, status, body)
        for line in [
            "HEAD /answer HTTP/1.1",
            "OPTIONS /answer HTTP/1.1",
            "POST /answer HTTP/1.1",
            "get /answer HTTP/1.1",
            "GET /answer/ HTTP/1.1",
            "GET //answer HTTP/1.1",
            "GET /ANSWER HTTP/1.1",
            "GET /answer/../answer HTTP/1.1",
            "GET /items/7/ HTTP/1.1",
            "GET /items/a%2Fb HTTP/1.1",
            f"GET {origin}/answer HTTP/1.1",
            "GET /docs-area HTTP/1.1",
        ]:
            status, body = await _raw(origin, line)
            assert status != 200 or b"free" in body, (line, status, body)
        assert ran == []  # no priced handler ran unpaid
    finally:
        server.should_exit = True
        await task


@pytest.mark.parametrize("kind", ["httpx", "httpx-async", "requests"])
async def test_a_402_behind_a_redirect_is_paid_where_it_was_answered(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    funded_wallet: str,
    tmp_path: Path,
    kind: str,
) -> None:
    """A free route that redirects to a paid route of another host: the paid request goes to the
    URL that answered 402, signed for it, paid once (never with another host's signature)."""
    seller = await _seller(payee_factory)

    async def go(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(f"{seller.url}/answer")

    def hook(app: web.Application) -> None:
        app.router.add_get("/go", go)

    front = await payee_factory.start(payee_factory.config("front"), hook=hook)
    url = f"{front.url}/go"

    def buy_sync(buyer: Buyer) -> tuple[int, Any, str]:
        if kind == "httpx":
            with httpx.Client(auth=buyer.httpx_auth(), timeout=120, follow_redirects=True) as http:
                resp = http.get(url)
                return resp.status_code, resp.json(), str(resp.url)
        with requests.Session() as session:
            session.auth = buyer.requests_auth()
            answer = session.get(url, timeout=120)
            return answer.status_code, answer.json(), answer.url

    async with _buyer(bitcoind, funded_wallet, tmp_path / "buyer") as buyer:
        async with mining(bitcoind):
            if kind == "httpx-async":
                async with httpx.AsyncClient(auth=buyer.httpx_auth(), timeout=120, follow_redirects=True) as http:
                    resp = await http.get(url)
                    seen: tuple[int, Any, str] = (resp.status_code, resp.json(), str(resp.url))
            else:
                seen = await asyncio.to_thread(buy_sync, buyer)
        channels = buyer.channels
        assert seen == (200, {"answer": 42}, f"{seller.url}/answer")
        assert buyer.spent_sat == PRICE
    assert _paid_at(seller, channels) == PRICE


async def test_a_public_seller_needs_its_public_url(payee_factory: PayeeFactory, tmp_path: Path) -> None:
    """PaidService's own listener is internal (loopback): on a real network the 402's URLs must come
    from the configured public URL, never from a buyer's Host header."""
    node = payee_factory.node()
    with pytest.raises(ValueError, match="public_url"):
        PaidService(network="signet", datadir=tmp_path, price_sat=1, node=node)
    seller = PaidService(
        network="signet", datadir=tmp_path, price_sat=1, node=node, public_url="https://api.example/btc"
    )
    await seller.stop()


async def test_a_lost_paid_answer_is_received_by_the_exact_retry(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    """The connection breaks after the payee charged the unit (its answer is lost): the payer sends the
    exact request again and receives the unit it paid for, charged once."""
    calls: list[int] = []

    async def fragile(request: web.Request) -> web.StreamResponse:
        calls.append(1)
        if len(calls) == 1:
            assert request.transport is not None
            request.transport.close()  # the answer of the charged request never arrives
        return web.Response(text="the unit")

    srv = await payee_factory.start(
        hook=lambda app: add_paid_route(app, "GET", "/unit", fragile), price_sat=100, mode="prepay"
    )
    cid = await open_channel(payer_client, bitcoind, srv.url, 100_000)
    payer = MeteredPayer(payer_client, cid)
    try:
        answer = await payer.request(f"{srv.url}/unit", units=1)
        assert (answer.status, answer.body, len(calls)) == (200, b"the unit", 2)
        assert (await payer.request(f"{srv.url}/unit", units=1)).status == 200
    finally:
        await payer.aclose()
    rec = srv.store.get(cid)
    assert (rec.amount_sat, rec.units) == (200, 2)  # two units received, two paid
    assert payer_client.store.get(cid).acked_sat == 200


async def test_an_asgi_paid_body_is_bounded(payee_factory: PayeeFactory) -> None:
    """The gate reads a priced request's body whole (auth v2 covers it) before anything else: past the
    bound it stops reading and answers 413, so no client can make it hold an unbounded body."""
    config = payee_factory.config(price_sat=1)
    node = payee_factory.node()
    paid = PaidRoutes({"/upload": 10}, max_body_bytes=64 * 1024)
    ran: list[int] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with payee_service(config, node) as service:
            paid.attach(service.gate())
            yield

    api = FastAPI(lifespan=lifespan)

    @api.post("/upload")
    async def upload() -> dict[str, str]:
        ran.append(1)
        return {"ok": "yes"}

    server = uvicorn.Server(
        uvicorn.Config(paid.wrap(api), host="127.0.0.1", port=_free_port(), log_level="warning", lifespan="on")
    )
    task = asyncio.ensure_future(server.serve())
    try:
        await wait_until_async(lambda: server.started or task.done(), timeout=30, what="uvicorn started")
        async with httpx.AsyncClient(timeout=30) as http:
            url = f"http://127.0.0.1:{server.config.port}/upload"
            big = await http.post(url, content=b"x" * (256 * 1024), headers={"X-Btcchannel-Channel": "00" * 16})
            assert big.status_code == 413 and big.json()["error"]["code"] == "too_large"

            async def chunks() -> AsyncIterator[bytes]:  # chunked: no Content-Length to refuse up front
                for _ in range(16):
                    yield b"y" * 16384

            streamed = await http.post(url, content=chunks())
            assert streamed.status_code == 413
            small = await http.post(url, content=b"z" * 1024)
            assert small.status_code == 402  # within the bound: the gate answers as ever
        assert ran == []
    finally:
        server.should_exit = True
        await task
