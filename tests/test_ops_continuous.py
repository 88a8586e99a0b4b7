"""Continuous service across rollovers, on a real regtest node: the next channel is opened
before the current one runs out of deposit (or of blocks), requests move to it without
waiting, and the old channel is closed; a session that outruns its open waits, then goes on."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.core.state import ChannelState
from btcchannel.payee.metered import add_file_route
from btcchannel.payer.client import PayerClient
from btcchannel.payer.continuous import ContinuousPayer, RolloverPolicy
from btcchannel.testing import wait_until_async
from btcchannel.testing.fixtures import PayeeFactory

CHUNK = 100


@contextlib.asynccontextmanager
async def miner(bitcoind: RegtestNode, client: PayerClient) -> AsyncIterator[None]:
    """The chain's part, in the background: a block as soon as the payer broadcasts a funding."""

    async def run() -> None:
        while True:
            await wait_until_async(
                lambda: any(r.state is ChannelState.FUNDING for r in client.store.list()),
                timeout=600,
                what="a funding to mine",
            )
            bitcoind.mine(1)
            await wait_until_async(
                lambda: all(r.state is not ChannelState.FUNDING for r in client.store.list()),
                timeout=60,
                what="the funded channel open",
            )

    task = asyncio.ensure_future(run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _file_payee(payee_factory: PayeeFactory, tmp_path: Path, price: int, chunks: int) -> tuple[str, bytes]:
    data = os.urandom(chunks * CHUNK)
    (tmp_path / "data.bin").write_bytes(data)
    srv = await payee_factory.start(
        hook=lambda app: add_file_route(app, tmp_path / "data.bin", chunk_size=CHUNK), price_sat=price, mode="prepay"
    )
    return srv.url, data


async def test_rollover_before_the_deposit_runs_out(
    bitcoind: RegtestNode,
    tmp_path: Path,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    url, data = await _file_payee(payee_factory, tmp_path, 500, 10)
    # 20 units of 500 sat per channel; the next one is opened when less than 2,500 sat are left
    policy = RolloverPolicy(deposit_sat=10_000, lifetime_blocks=100, min_remaining_sat=2_500, min_blocks_left=5)
    used: list[str] = []
    async with miner(bitcoind, payer_client), ContinuousPayer(payer_client, url, policy) as payer:
        for i in range(40):
            status, body = await payer.fetch(f"{url}/v1/file/{i % 10}")
            assert status == 200 and body == data[(i % 10) * CHUNK : (i % 10 + 1) * CHUNK]
            assert payer._current is not None
            used.append(payer._current.channel_id)
            if payer.next_pending:  # a client with think time: the next channel opens meanwhile
                await wait_until_async(lambda: not payer.next_pending, timeout=60, what="the next channel open")
        assert payer.stalls == 0
        channels = list(payer.channels)
    assert len(channels) == 3 and used[0] == channels[0] and used[-1] == channels[-1]
    for old in channels[:-1]:
        rec = payer_client.store.get(old)
        assert rec.acked_sat == used.count(old) * 500 == 10_000 - 2_000  # moved on with 2,000 sat left
        obj = await payer_client.status(old)
        assert obj["state"] in ("closing", "closed")  # closed cooperatively once the next was open
    assert sum(payer_client.store.get(c).acked_sat for c in channels) == 40 * 500


async def test_a_session_that_outruns_its_open_waits_then_goes_on(
    bitcoind: RegtestNode,
    tmp_path: Path,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    url, _ = await _file_payee(payee_factory, tmp_path, 500, 1)
    policy = RolloverPolicy(deposit_sat=10_000, lifetime_blocks=100, min_remaining_sat=1_000, min_blocks_left=5)
    async with miner(bitcoind, payer_client), ContinuousPayer(payer_client, url, policy) as payer:
        for _ in range(25):  # no think time: the deposit runs out before the next channel is open
            status, _body = await payer.fetch(f"{url}/v1/file/0")
            assert status == 200
        assert len(payer.channels) == 2 and payer.stalls == 1


async def test_rollover_before_the_channel_expires(
    bitcoind: RegtestNode,
    tmp_path: Path,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    url, _ = await _file_payee(payee_factory, tmp_path, 100, 1)
    policy = RolloverPolicy(deposit_sat=10_000, lifetime_blocks=14, min_remaining_sat=1_000, min_blocks_left=4)
    async with miner(bitcoind, payer_client), ContinuousPayer(payer_client, url, policy) as payer:
        await payer.fetch(f"{url}/v1/file/0")
        first = payer_client.store.get(payer.channels[0])
        while len(payer.channels) == 1:
            bitcoind.mine(1)  # time passes: a block per request
            await payer.fetch(f"{url}/v1/file/0")
            if payer.next_pending:
                await wait_until_async(lambda: not payer.next_pending, timeout=60, what="the next channel open")
        switched_at = bitcoind.tip_height()
        await payer.fetch(f"{url}/v1/file/0")
        assert payer.stalls == 0
    assert switched_at < first.expiry_height - 3  # before the payee's closing height (close margin 3)
    assert payer_client.store.get(first.channel_id).acked_sat < 10_000 - policy.min_remaining_sat  # time, not money


@pytest.mark.parametrize("kw", [dict(min_remaining_sat=10_000), dict(min_blocks_left=14)])
def test_policy_thresholds_must_leave_room(kw: dict[str, int]) -> None:
    base = dict(deposit_sat=10_000, lifetime_blocks=14, min_remaining_sat=1_000, min_blocks_left=4)
    with pytest.raises(ValueError):
        RolloverPolicy(**{**base, **kw})
