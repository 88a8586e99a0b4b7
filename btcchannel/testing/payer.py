"""The payer's side for tests and the demo: open a channel, fund it, mine, wait until it is open."""

from __future__ import annotations

import inspect
from typing import Any, Protocol

from btcchannel.payer.client import PayerClient

OPEN_TIMEOUT_S = 30.0


class Miner(Protocol):
    """Anything that mines blocks: a :class:`~btcchannel.bitcoind.regtest.RegtestNode` (sync)
    or a :class:`~btcchannel.testing.chain.Chain` (async)."""

    def mine(self, n: int) -> Any: ...


async def open_channel(
    client: PayerClient, miner: Miner, url: str, deposit: int = 1_000_000, lifetime: int = 60,
    *, timeout: float = OPEN_TIMEOUT_S, **kw: Any,
) -> str:
    """Propose a channel to the payee at ``url``, fund it, mine a block, wait until the payee
    calls it open; returns the channel id. ``kw`` go to :meth:`PayerClient.open_channel`."""
    cid = await client.open_channel(url, deposit, lifetime, wait_open=False, **kw)
    mined = miner.mine(1)
    if inspect.isawaitable(mined):
        await mined
    await client.wait_open(cid, timeout=timeout)
    return cid
