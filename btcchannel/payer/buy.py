"""Buying from a route's 402: the payer's budget and the channel to pay a challenge with.

A paid route that is not paid for answers 402 and names its price, its units and its payee's
protocol URL (:class:`~btcchannel.payer.challenge.Challenge`). :func:`channel_for_challenge` finds
the channel to pay it with: the one given, else an open one to that protocol URL, else (when the
:class:`Budget` allows opening: a deposit is given) a new one opened there under the budget's
limits; otherwise :class:`NoChannel`, which carries the exact ``btcchannel open`` command.
:meth:`Budget.check` is the budget's word on one route: its unit price at most
``max_price_sat``, its price at most ``max_total_sat``.
"""

from __future__ import annotations

import asyncio
import shlex
from dataclasses import dataclass

import aiohttp

from btcchannel.core.terms import PayerLimits
from btcchannel.errors import NotOpen, TermsRefused
from btcchannel.payer.challenge import Challenge
from btcchannel.payer.client import PayerClient, Progress

__all__ = ["Budget", "NoChannel", "ask_price", "channel_for_challenge", "open_command"]

#: the lifetime of a channel opened for a challenge when the budget names none (one day of blocks)
DEFAULT_LIFETIME_BLOCKS = 144


@dataclass(frozen=True)
class Budget:
    """What a buyer may spend: ``max_price_sat`` per unit, ``max_total_sat`` per channel (proposed as
    its agreed total), ``deposit_sat`` per channel opened (None: never open one), and the channels'
    ``lifetime_blocks``."""

    max_price_sat: int | None = None
    max_total_sat: int | None = None
    deposit_sat: int | None = None
    lifetime_blocks: int = DEFAULT_LIFETIME_BLOCKS

    def __post_init__(self) -> None:
        for name in ("max_price_sat", "max_total_sat", "deposit_sat"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must not be negative")
        if self.lifetime_blocks < 1:
            raise ValueError("lifetime_blocks must be at least 1")

    @property
    def limits(self) -> PayerLimits:
        """The limits a channel is opened under."""
        return PayerLimits(max_price_sat=self.max_price_sat, max_total_sat=self.max_total_sat)

    def check(self, challenge: Challenge) -> None:
        """``TermsRefused`` if the route's price is over the budget (nothing is paid then)."""
        if self.max_price_sat is not None and challenge.unit_price_sat > self.max_price_sat:
            raise TermsRefused(
                f"the route asks {challenge.unit_price_sat} sat per unit ({challenge.price_sat} sat "
                f"for {challenge.units} units), over the limit {self.max_price_sat}"
            )
        if self.max_total_sat is not None and challenge.price_sat > self.max_total_sat:
            raise TermsRefused(f"the route costs {challenge.price_sat} sat, over the total limit {self.max_total_sat}")


class NoChannel(NotOpen):
    """No channel to the route's payee can pay, and the budget opens none (code ``not_open``);
    :attr:`open_command` is the command that opens one at the protocol URL the 402 names."""

    def __init__(self, challenge: Challenge, message: str) -> None:
        super().__init__(message)
        self.challenge = challenge
        self.open_command = open_command(challenge)


def open_command(
    challenge: Challenge, deposit_sat: int | None = None, lifetime_blocks: int = DEFAULT_LIFETIME_BLOCKS
) -> str:
    """``btcchannel open <protocol URL> ...`` for the route of ``challenge`` (a deposit of 100 of
    its requests unless given; the route's unit price as the limit)."""
    deposit = deposit_sat or max(10_000, 100 * challenge.price_sat)
    return (
        f"btcchannel open {shlex.quote(challenge.protocol_url)} --deposit-sat {deposit} "
        f"--lifetime-blocks {lifetime_blocks} --max-price-sat {challenge.unit_price_sat}"
    )


async def channel_for_challenge(
    client: PayerClient,
    challenge: Challenge,
    budget: Budget | None = None,
    *,
    channel_id: str | None = None,
    open_timeout: float = 600.0,
    progress: Progress | None = None,
) -> str:
    """The open channel to pay ``challenge`` with (see the module); the budget is checked first."""
    budget = budget or Budget()
    budget.check(challenge)
    if channel_id is None:
        try:
            channel_id = await client.pick_channel(challenge.protocol_url, min_remaining_sat=challenge.price_sat)
        except NotOpen as exc:
            if budget.deposit_sat is None:
                raise NoChannel(
                    challenge,
                    f"no usable channel to {challenge.protocol_url} ({exc.message}); "
                    f"the route costs {challenge.price_sat} sat",
                ) from None
            return await client.open_channel(
                challenge.protocol_url,
                budget.deposit_sat,
                budget.lifetime_blocks,
                open_timeout=open_timeout,
                limits=budget.limits,
                progress=progress,
            )
    await client.wait_open(channel_id, timeout=open_timeout)
    return channel_id


async def ask_price(client: PayerClient, url: str, method: str = "GET") -> tuple[Challenge | None, int, bytes]:
    """Request ``url`` without a channel: the route's challenge if it answers 402 (else None), the
    status and the body (a free route's answer)."""
    try:
        async with client.session.request(method, url) as resp:
            body = await resp.read()
            if resp.status != 402:
                return None, resp.status, body
            return Challenge.from_answer(resp.headers, body), resp.status, body
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise client.unreachable(method, url, exc) from exc
