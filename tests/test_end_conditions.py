"""Every end condition of the method ends a channel with its reason, and the timeouts are the agreed
ones: the agreed total, unit count, number of payments and end time; the prepay idle timeout; an
honest postpay payer settles by itself within the payment timeout and keeps its channel."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.core.terms import PayerLimits
from btcchannel.errors import AmountNotAgreed, ChannelError
from btcchannel.payee.metered import add_file_route, add_paid_route
from btcchannel.payer.client import PayerClient
from btcchannel.payer.metered import MeteredPayer
from btcchannel.testing import RunningPayee, open_channel, wait_until_async
from btcchannel.testing.fixtures import PayeeFactory
from btcchannel.wire import HDR_AUTH, HDR_CHANNEL

PRICE = 1000


async def _payee(payee_factory: PayeeFactory, tmp_path: Path, **kw: object) -> RunningPayee:
    data = tmp_path / "data.bin"
    data.write_bytes(os.urandom(100 * 20))
    return await payee_factory.start(hook=lambda app: add_file_route(app, data, chunk_size=100), price_sat=PRICE, **kw)


async def _ended(srv: RunningPayee, cid: str, reason: str, amount: int) -> None:
    """The payee closes ``cid`` for ``reason`` with its last good payment of ``amount`` (0: nothing to
    broadcast, the payer refunds after expiry)."""
    if amount:
        await wait_until_async(lambda: srv.store.get(cid).close_txid is not None, timeout=30, what=f"close ({reason})")
    else:
        await wait_until_async(lambda: srv.store.get(cid).state == "closing", timeout=30, what=f"ended ({reason})")
    rec = srv.store.get(cid)
    assert (rec.end_reason, rec.amount_sat, rec.state) == (reason, amount, "closing")


async def test_each_agreed_end_condition_ends_its_channel(
    bitcoind: RegtestNode,
    tmp_path: Path,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    srv = await _payee(payee_factory, tmp_path, mode="prepay")
    client = payer_client
    end_time = int(time.time()) + 4
    limits = {
        "agreed_total_reached": PayerLimits(max_total_sat=2 * PRICE),
        "unit_count_reached": PayerLimits(max_units=2),
        "payment_count_reached": PayerLimits(max_payments=2),
        "end_time_reached": PayerLimits(end_time=end_time),
    }
    cids = {}
    for reason, lim in limits.items():
        cids[reason] = await client.open_channel(srv.url, 100_000, 60, wait_open=False, limits=lim)
    bitcoind.mine(1)
    for reason, cid in cids.items():
        await client.wait_open(cid)
        assert srv.store.get(cid).terms == client.store.get(cid).terms
    for reason in ("agreed_total_reached", "unit_count_reached", "payment_count_reached"):
        payer = MeteredPayer(client, cids[reason])
        for i in range(2):
            assert (await payer.fetch(f"{srv.url}/v1/file/{i}"))[0] == 200
        await _ended(srv, cids[reason], reason, 2 * PRICE)
        with pytest.raises(ChannelError):  # the payer signs nothing more (its terms, or the closed channel)
            await payer.fetch(f"{srv.url}/v1/file/2")
        assert client.store.get(cids[reason]).amount_sat == 2 * PRICE
    # the end time: no payment arrives, the payee's watcher ends the channel at the agreed time
    cid = cids["end_time_reached"]
    payer = MeteredPayer(client, cid)
    assert (await payer.fetch(f"{srv.url}/v1/file/0"))[0] == 200
    await _ended(srv, cid, "end_time_reached", PRICE)
    assert time.time() >= end_time
    with pytest.raises(AmountNotAgreed):  # and the payer signs nothing after it
        await client.sign_next(cid, 2 * PRICE, units_ahead=1)
    bitcoind.mine(1)
    for reason, cid in cids.items():
        await wait_until_async(lambda: srv.store.get(cid).state == "closed", timeout=30, what=f"{reason} closed")


async def test_idle_prepay_channel_is_closed_with_its_last_payment(
    bitcoind: RegtestNode,
    tmp_path: Path,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    srv = await _payee(payee_factory, tmp_path, mode="prepay", idle_timeout_s=1.0)
    client = payer_client
    cid = await open_channel(client, bitcoind, srv.url, 100_000)
    assert client.store.get(cid).terms["idle_timeout_ms"] == 1000  # type: ignore[index]
    payer = MeteredPayer(client, cid)
    for i in range(3):
        assert (await payer.fetch(f"{srv.url}/v1/file/{i}"))[0] == 200
    await _ended(srv, cid, "idle_timeout", 3 * PRICE)
    assert time.time() - (srv.store.get(cid).paid_at or 0) > 1.0
    bitcoind.mine(1)
    await wait_until_async(lambda: srv.store.get(cid).state == "closed", timeout=30, what="closed")


async def test_honest_postpay_payer_settles_by_itself_within_the_payment_timeout(
    bitcoind: RegtestNode,
    tmp_path: Path,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    srv = await _payee(payee_factory, tmp_path, mode="postpay", credit_limit_sat=5 * PRICE, payment_timeout_s=1.5)
    client = payer_client
    honest = await client.open_channel(srv.url, 100_000, 60, wait_open=False)
    silent = await client.open_channel(srv.url, 100_000, 60, wait_open=False)
    bitcoind.mine(1)
    for cid in (honest, silent):
        await client.wait_open(cid)
    payer = MeteredPayer(client, honest)
    assert payer.settle_delay_s() == 0.75
    try:
        assert (await payer.fetch(f"{srv.url}/v1/file/0"))[0] == 200
        url = f"{srv.url}/v1/file/0"  # the same unit bought on the other channel, never paid for
        async with (
            aiohttp.ClientSession() as s,
            s.get(
                url,
                headers={
                    HDR_CHANNEL: silent,
                    HDR_AUTH: client.request_auth(silent, "GET", url),
                },
            ) as r,
        ):
            assert r.status == 200
        client.store.add_units(silent, 1)
        # both payers now pause, well inside their credit line, for longer than the payment timeout
        t0 = time.monotonic()
        await _ended(srv, silent, "payment_timeout", 0)
        await asyncio.sleep(max(0.0, 3.0 - (time.monotonic() - t0)))  # the pause under test
        assert payer.settle_error is None
        rec = srv.store.get(honest)
        assert (rec.state, rec.amount_sat, rec.owed_sat) == ("open", PRICE, PRICE)
        assert client.store.get(honest).acked_sat == PRICE
        assert (await payer.fetch(f"{srv.url}/v1/file/1"))[0] == 200  # and it goes on
    finally:
        await payer.aclose()


@pytest.mark.allow_payee_errors
async def test_a_paid_unit_whose_handler_fails_is_credited_to_the_next_request(
    bitcoind: RegtestNode,
    tmp_path: Path,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    failures = {"raise": 1, "503": 1}

    async def flaky(request: web.Request) -> web.StreamResponse:
        if failures["raise"]:
            failures["raise"] -= 1
            raise RuntimeError("the handler broke")
        if failures["503"]:
            failures["503"] -= 1
            return web.Response(status=503, text="busy")
        return web.Response(text="served")

    for mode in ("prepay", "postpay"):
        failures.update({"raise": 1, "503": 1})
        srv = await payee_factory.start(
            hook=lambda app: add_paid_route(app, "GET", "/v1/flaky", flaky),
            price_sat=PRICE,
            mode=mode,
            credit_limit_sat=5 * PRICE,
        )
        client = payer_client
        cid = await open_channel(client, bitcoind, srv.url, 100_000)
        payer = MeteredPayer(client, cid)
        try:
            with pytest.raises(ChannelError):
                await payer.fetch(f"{srv.url}/v1/flaky")  # raised: 500 internal
            with pytest.raises(ChannelError):
                await payer.fetch(f"{srv.url}/v1/flaky")  # answered 503
            rec = srv.store.get(cid)
            if mode == "prepay":  # one payment, nothing served: one unit's price of surplus (credit)
                assert (rec.amount_sat, rec.units, rec.payments) == (PRICE, 0, 1)
            else:  # nothing owed for what was not served
                assert (rec.owed_sat, rec.units, rec.owed_since) == (0, 0, None)
            assert (await payer.fetch(f"{srv.url}/v1/flaky")) == (200, b"served")
            assert (await payer.fetch(f"{srv.url}/v1/flaky")) == (200, b"served")
            await payer.settle()
            rec = srv.store.get(cid)
            assert (rec.amount_sat, rec.units) == (2 * PRICE, 2), mode
            assert (client.store.get(cid).units, client.store.get(cid).acked_sat) == (2, 2 * PRICE)
        finally:
            await payer.aclose()
            await srv.stop()
