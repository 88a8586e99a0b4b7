"""The payer's side for tests and the demo: open a channel (fund it, mine, wait until it is open),
wait for the payee to report a channel state, for its close to be broadcast and confirmed, and
mine whatever waits in the mempool while a buyer opens and renews channels by itself."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Protocol

from btcchannel.payer.client import PayerClient
from btcchannel.testing.chain import Chain
from btcchannel.wait import wait_until_async

if TYPE_CHECKING:
    from btcchannel.bitcoind.regtest import RegtestNode

OPEN_TIMEOUT_S = 30.0


@contextlib.asynccontextmanager
async def mining(bitcoind: RegtestNode) -> AsyncIterator[None]:
    """Mine a block whenever a transaction waits in ``bitcoind``'s mempool (fundings and closes a
    buyer sends by itself confirm), until the block exits."""
    stop = asyncio.Event()

    async def miner() -> None:
        while not stop.is_set():
            await wait_until_async(
                lambda: stop.is_set() or bool(bitcoind.rpc("getrawmempool")),
                timeout=300,
                interval=0.05,
                what="a transaction to mine",
            )
            if not stop.is_set():
                bitcoind.mine(1)

    task = asyncio.ensure_future(miner())
    try:
        yield
    finally:
        stop.set()
        await task


class Miner(Protocol):
    """Anything that mines blocks: a :class:`~btcchannel.bitcoind.regtest.RegtestNode` (sync)
    or a :class:`~btcchannel.testing.chain.Chain` (async)."""

    def mine(self, n: int) -> Any: ...


async def open_channel(
    client: PayerClient,
    miner: Miner,
    url: str,
    deposit: int = 1_000_000,
    lifetime: int = 60,
    *,
    timeout: float = OPEN_TIMEOUT_S,
    **kw: Any,
) -> str:
    """Propose a channel to the payee at ``url``, fund it, mine a block, wait until the payee
    calls it open; returns the channel id. ``kw`` go to :meth:`PayerClient.open_channel`."""
    cid = await client.open_channel(url, deposit, lifetime, wait_open=False, **kw)
    mined = miner.mine(1)
    if inspect.isawaitable(mined):
        await mined
    await client.wait_open(cid, timeout=timeout)
    return cid


async def wait_status(
    client: PayerClient,
    cid: str,
    ok: Callable[[dict[str, Any]], bool],
    what: str,
    *,
    timeout: float = OPEN_TIMEOUT_S,
) -> dict[str, Any]:
    """Poll the payee's view of channel ``cid`` until ``ok(view)``; returns that view."""

    async def status() -> dict[str, Any] | None:
        obj = await client.status(cid)
        return obj if ok(obj) else None

    return await wait_until_async(status, timeout=timeout, what=what)


async def wait_close_broadcast(
    client: PayerClient,
    chain: Chain,
    cid: str,
    *,
    timeout: float = OPEN_TIMEOUT_S,
) -> dict[str, Any]:
    """Wait until the payee reports a close txid and the node has it in its mempool (or a block)."""
    obj = await wait_status(
        client,
        cid,
        lambda o: bool(o.get("close_txid")) and o["state"] in ("closing", "closed"),
        "the payee to broadcast its close",
        timeout=timeout,
    )
    await chain.wait_known(str(obj["close_txid"]), "close", timeout=timeout)
    return obj


async def confirm_close(
    client: PayerClient, chain: Chain, cid: str, close_txid: str, *, timeout: float = OPEN_TIMEOUT_S
) -> dict[str, Any]:
    """Mine a block, wait for ``close_txid`` to confirm and for the payee to call the channel closed."""
    await chain.mine(1)
    await chain.wait_confirmed(close_txid, "close", timeout=timeout)
    return await wait_status(
        client, cid, lambda o: bool(o["state"] == "closed"), "the payee to mark the channel closed", timeout=timeout
    )
