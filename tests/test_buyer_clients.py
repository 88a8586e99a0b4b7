"""httpx (sync and async) and requests buying a paid route transparently through a Buyer, on a real
regtest node: the 402 is answered within the budget, the route's exact price is paid, the first
channel is opened at the protocol URL the 402 names and the next one before the first runs out
(a rollover), and the client's own response objects come back with headers and streaming."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
import requests
from aiohttp import web

from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.errors import TermsRefused
from btcchannel.payee.metered import add_paid_route
from btcchannel.payer.buyer import Buyer
from btcchannel.store import PayerStore
from btcchannel.testing import RunningPayee, mining
from btcchannel.testing.fixtures import PayeeFactory
from btcchannel.wire import HDR_PAID

PRICE = 250
DEPOSIT = 10_000  # 40 requests a channel: 45 take two channels
REQUESTS = 45


async def _seller(payee_factory: PayeeFactory) -> RunningPayee:
    async def answer(request: web.Request) -> web.StreamResponse:
        return web.json_response({"answer": 42, "n": request.query.get("n")})

    def hook(app: web.Application) -> None:
        add_paid_route(app, "GET", "/answer", answer, units=PRICE)

    return await payee_factory.start(hook=hook, price_sat=1, mode="prepay")


def _buyer(bitcoind: RegtestNode, wallet: str, datadir: Path, **budget: int) -> Buyer:
    return Buyer(
        datadir=datadir,
        wallet=wallet,
        rpc_url=bitcoind.rpc_url,
        rpc_user=bitcoind.rpc_user,
        rpc_password=bitcoind.rpc_password,
        **{"max_price_sat": 1, "deposit_sat": DEPOSIT, **budget},
    )


def _check_paid(srv: RunningPayee, datadir: Path, channels: list[str]) -> None:
    assert len(channels) >= 2, channels  # rolled over
    with PayerStore(datadir / "regtest" / "payer.db") as store:
        assert sum(store.get(cid).acked_sat for cid in channels) == REQUESTS * PRICE
    assert sum(srv.store.get(cid).amount_sat for cid in channels) == REQUESTS * PRICE


def _buy_sync(buyer: Buyer, url: str, kind: str) -> list[tuple[int, dict[str, object], str | None]]:
    seen: list[tuple[int, dict[str, object], str | None]] = []
    if kind == "httpx":
        with httpx.Client(auth=buyer.httpx_auth(), timeout=60) as http:
            for i in range(REQUESTS - 1):
                resp = http.get(url, params={"n": i})
                seen.append((resp.status_code, resp.json(), resp.headers.get(HDR_PAID)))
            with http.stream("GET", url, params={"n": "s"}) as resp:
                body = b"".join(resp.iter_bytes())
                seen.append((resp.status_code, httpx.Response(200, content=body).json(), resp.headers.get(HDR_PAID)))
    else:
        with requests.Session() as http:
            http.auth = buyer.requests_auth()
            for i in range(REQUESTS - 1):
                resp = http.get(url, params={"n": i}, timeout=60)
                seen.append((resp.status_code, resp.json(), resp.headers.get(HDR_PAID)))
            with http.get(url, params={"n": "s"}, stream=True, timeout=60) as resp:
                body = b"".join(resp.iter_content(64))
                assert resp.history and resp.history[0].status_code == 402
                seen.append((resp.status_code, requests.models.complexjson.loads(body), resp.headers.get(HDR_PAID)))
    return seen


@pytest.mark.parametrize("kind", ["httpx", "requests"])
async def test_sync_clients_buy_across_a_rollover(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    funded_wallet: str,
    tmp_path: Path,
    kind: str,
) -> None:
    srv = await _seller(payee_factory)
    datadir = tmp_path / "buyer"
    buyer = _buyer(bitcoind, funded_wallet, datadir)
    try:
        async with mining(bitcoind):
            seen = await asyncio.to_thread(_buy_sync, buyer, f"{srv.url}/answer", kind)
        channels = buyer.channels
    finally:
        await buyer.aclose()
    assert [s[0] for s in seen] == [200] * REQUESTS
    assert [s[1]["n"] for s in seen] == [str(i) for i in range(REQUESTS - 1)] + ["s"]
    assert all(s[2] is not None and int(s[2]) % PRICE == 0 for s in seen)
    assert buyer.spent_sat == REQUESTS * PRICE
    _check_paid(srv, datadir, channels)


async def test_async_httpx_buys_across_a_rollover_within_its_budget(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    funded_wallet: str,
    tmp_path: Path,
) -> None:
    srv = await _seller(payee_factory)
    url = f"{srv.url}/answer"
    datadir = tmp_path / "buyer"
    async with _buyer(bitcoind, funded_wallet, datadir, max_total_sat=REQUESTS * PRICE) as buyer:
        async with mining(bitcoind), httpx.AsyncClient(auth=buyer.httpx_auth(), timeout=60) as http:
            for i in range(REQUESTS):
                resp = await http.get(url, params={"n": i})
                assert resp.status_code == 200 and resp.json()["n"] == str(i)
            with pytest.raises(TermsRefused):  # the budget is spent: nothing more is paid
                await http.get(url)
        channels = buyer.channels
    assert buyer.spent_sat == REQUESTS * PRICE
    _check_paid(srv, datadir, channels)
    # a budget under the route's price pays nothing and opens nothing
    async with _buyer(bitcoind, funded_wallet, tmp_path / "cheap", max_price_sat=0) as cheap:
        async with httpx.AsyncClient(auth=cheap.httpx_auth()) as http:
            with pytest.raises(TermsRefused):
                await http.get(url)
        assert cheap.channels == []
