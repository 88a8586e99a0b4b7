"""Continuous service: the next channel is opened before the current one runs out of deposit or time.

A :class:`ContinuousPayer` buys metered requests from one payee through a succession of
channels. When the current channel has less than ``min_remaining_sat`` of its deposit left,
or fewer than ``min_blocks_left`` blocks before the payee stops taking payments (its expiry
minus the payee's close margin), it opens the next channel in the background and keeps
paying through the current one; once the next one is open, requests move to it and the old
channel is closed cooperatively (its unspent deposit comes back at once). A session whose
channel ends before the next is open waits for the next (never for nothing: it was already
funded), so a long-running session does not stall for an open it could have foreseen::

    policy = RolloverPolicy(deposit_sat=50_000, lifetime_blocks=144, min_remaining_sat=5_000, min_blocks_left=12)
    async with ContinuousPayer(client, "https://payee.example", policy) as payer:
        status, body = await payer.fetch("https://payee.example/v1/data")

``channels`` lists every channel the session used, in order; ``stalls`` counts the requests
that had to wait for a channel to open (0 when the thresholds leave the next open enough time).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from btcchannel.core.state import ChannelState
from btcchannel.errors import AmountOutOfRange, ChannelClosed, ChannelClosing, ChannelError, NotOpen
from btcchannel.payer.client import PayerClient
from btcchannel.payer.metered import MeteredPayer

__all__ = ["ContinuousPayer", "RolloverPolicy"]

log = logging.getLogger("btcchannel.payer.continuous")

# the channel ended or cannot pay this request: switch to the next one and retry once
_SWITCH_ERRORS = (AmountOutOfRange, ChannelClosed, ChannelClosing, NotOpen)


@dataclass(frozen=True)
class RolloverPolicy:
    """How channels are opened and when the next one is: thresholds on deposit left and blocks left."""

    deposit_sat: int
    lifetime_blocks: int
    min_remaining_sat: int
    min_blocks_left: int
    open_timeout_s: float = 3600.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_remaining_sat < self.deposit_sat:
            raise ValueError("min_remaining_sat must be below the deposit")
        if not 0 <= self.min_blocks_left < self.lifetime_blocks:
            raise ValueError("min_blocks_left must be below the lifetime")


class ContinuousPayer:
    """Metered requests to one payee through as many channels as it takes, opened ahead of need."""

    def __init__(self, client: PayerClient, server_url: str, policy: RolloverPolicy) -> None:
        self.client = client
        self.server_url = server_url.rstrip("/")
        self.policy = policy
        self.channels: list[str] = []
        self.stalls = 0
        self._current: MeteredPayer | None = None
        self._next: asyncio.Task[str] | None = None
        self._close_margin: int | None = None

    async def __aenter__(self) -> ContinuousPayer:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop a background open (a funded channel stays in the store) and settle the current channel."""
        if self._next is not None and not self._next.done():
            self._next.cancel()
            with contextlib.suppress(asyncio.CancelledError, ChannelError):
                await self._next
        if self._current is not None:
            with contextlib.suppress(ChannelError):
                await self._current.settle()

    @property
    def next_pending(self) -> bool:
        """Whether the next channel is being opened (funded or not yet open)."""
        return self._next is not None and not self._next.done()

    async def fetch(self, url: str, method: str = "GET", **kw: Any) -> tuple[int, bytes]:
        """One paid request (as :meth:`MeteredPayer.fetch`), through the current channel or the next."""
        payer = await self._payer()
        try:
            result = await payer.fetch(url, method, **kw)
        except _SWITCH_ERRORS as exc:
            log.info("channel %s cannot pay (%s): switching to the next one", payer.channel_id, exc.code)
            if self._next is None or not self._next.done():
                self.stalls += 1
            payer = await self._switch(wait=True)
            result = await payer.fetch(url, method, **kw)
        await self._maybe_prepare(payer.channel_id)
        return result

    # -- internals ------------------------------------------------------------------------
    async def _payer(self) -> MeteredPayer:
        if self._current is None:
            cid = await self._open()
            self._use(cid)
        elif self._next is not None and self._next.done():
            await self._switch(wait=False)
        assert self._current is not None
        return self._current

    def _use(self, cid: str) -> None:
        self._current = MeteredPayer(self.client, cid)
        self.channels.append(cid)

    async def _open(self) -> str:
        p = self.policy
        return await self.client.open_channel(
            self.server_url, p.deposit_sat, p.lifetime_blocks, open_timeout=p.open_timeout_s
        )

    async def _switch(self, *, wait: bool) -> MeteredPayer:
        """Move to the next channel (opening it now if none is on the way) and close the old one."""
        if self._next is None:
            self._next = asyncio.ensure_future(self._open())
        if not wait and not self._next.done():
            assert self._current is not None
            return self._current
        cid = await self._next
        self._next = None
        old = self._current
        self._use(cid)
        if old is not None:
            with contextlib.suppress(ChannelError):
                await old.settle()
                await self.client.close(old.channel_id)  # its unspent deposit comes back now
        assert self._current is not None
        return self._current

    async def _maybe_prepare(self, cid: str) -> None:
        """Start opening the next channel when ``cid`` nears the end of its deposit or its time."""
        if self._next is not None:
            return
        rec = self.client.store.get(cid)
        if rec.state is not ChannelState.OPEN:
            self._next = asyncio.ensure_future(self._open())
            return
        left_sat = rec.deposit_sat - rec.amount_sat
        blocks_left = rec.expiry_height - await self._margin() - await self.client.node.tip_height()
        if left_sat < self.policy.min_remaining_sat or blocks_left < self.policy.min_blocks_left:
            log.info("channel %s has %d sat and %d blocks left: opening the next", cid, left_sat, blocks_left)
            self._next = asyncio.ensure_future(self._open())

    async def _margin(self) -> int:
        if self._close_margin is None:
            self._close_margin = int((await self.client.info(self.server_url)).get("close_margin_blocks") or 0)
        return self._close_margin
