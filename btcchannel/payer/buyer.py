"""A buyer for ordinary HTTP clients: answers the ``Btcchannel`` 402 challenge within a budget.

:class:`Buyer` is what the httpx and requests integrations (:mod:`btcchannel.payer.httpx_auth`,
:mod:`btcchannel.payer.requests_auth`) are built on::

    buyer = Buyer(max_price_sat=1, deposit_sat=20_000)      # the node as `btcchannel --wallet payer` finds it
    with httpx.Client(auth=buyer.httpx_auth()) as http:
        print(http.get("http://127.0.0.1:8080/answer").json())
    buyer.close()

A request goes out as the caller made it; a 402 that carries a ``Btcchannel`` challenge names the
route's price, units and protocol URL (:class:`~btcchannel.payer.challenge.Challenge`). Within the
budget (:class:`~btcchannel.payer.buy.Budget`: ``max_price_sat`` per unit, ``deposit_sat`` per
channel, ``max_total_sat`` in all), the buyer pays exactly that route's price through a channel to
that protocol URL and sends the request again; the answer the caller gets is the client's own
response object, headers and streaming included. Channels are opened, and renewed before they
run out of deposit or time, by a :class:`~btcchannel.payer.continuous.ContinuousPayer` per
protocol URL; a channel that ends mid-request is replaced and the request paid through the next.
Over the budget, :class:`~btcchannel.errors.TermsRefused` is raised and nothing is paid.

The buyer's payer client lives on an event loop of its own, in a thread, so that synchronous and
asynchronous clients (any event loop) share its channels; its state is ``<datadir>/payer.db``, as
the command line's.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine, Mapping
from concurrent.futures import Future
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from btcchannel.bitcoind.locate import default_datadir, find_node
from btcchannel.bitcoind.rpc import Node
from btcchannel.core.terms import PayerLimits
from btcchannel.errors import AmountOutOfRange, ChannelClosed, ChannelClosing, NotOpen, TermsRefused
from btcchannel.payer.buy import Budget
from btcchannel.payer.challenge import Challenge, is_challenge
from btcchannel.payer.client import PayerClient
from btcchannel.payer.continuous import ContinuousPayer, RolloverPolicy
from btcchannel.payer.metered import Exchange, MeteredPayer

if TYPE_CHECKING:
    from btcchannel.payer.httpx_auth import BtcchannelAuth
    from btcchannel.payer.requests_auth import BtcchannelRequestsAuth

__all__ = ["Buyer", "Paying", "is_challenge"]

T = TypeVar("T")

# the channel ended or cannot pay this request: the next one pays it
_SWITCH_ERRORS = (AmountOutOfRange, ChannelClosed, ChannelClosing, NotOpen)


class _BudgetedPayer(ContinuousPayer):
    """A continuous payer that opens each channel under the buyer's limits: a payee whose agreed
    price is over ``max_price_sat`` is refused before anything is funded (whatever its 402 said)."""

    def __init__(self, client: PayerClient, server_url: str, policy: RolloverPolicy, limits: PayerLimits) -> None:
        super().__init__(client, server_url, policy)
        self.limits = limits
        #: held while the current channel is found or opened: concurrent first requests open one channel
        self.opening = asyncio.Lock()

    async def _open(self) -> str:
        p = self.policy
        return await self.client.open_channel(
            self.server_url, p.deposit_sat, p.lifetime_blocks, open_timeout=p.open_timeout_s, limits=self.limits
        )


class Paying:
    """One request being paid: its channel's lock is held from :meth:`Buyer.begin` to :meth:`close`;
    the route's price is reserved in the buyer's budget until then (spent if it was served)."""

    def __init__(
        self, buyer: Buyer, continuous: _BudgetedPayer, challenge: Challenge, method: str, url: str, body: bytes | None
    ) -> None:
        self.buyer = buyer
        self.continuous = continuous
        self.challenge = challenge
        self.method = method
        self.url = url
        self.body = body
        self.payer: MeteredPayer | None = None
        self.exchange: Exchange | None = None
        self._switched = False
        self._reserved = challenge.price_sat  # held in the buyer's budget until served or closed

    async def _take(self, payer: MeteredPayer) -> None:
        await payer.lock.acquire()
        self.payer = payer
        try:
            units = self.challenge.units_for(await payer.metering())
        except BaseException:
            self._release()
            raise
        self.exchange = payer.exchange(self.method, self.url, units, self.body)

    def _release(self) -> None:
        if self.payer is not None and self.payer.lock.locked():
            self.payer.lock.release()

    async def _switch(self) -> None:
        """The channel cannot pay: the next one does (once per request)."""
        if self._switched:
            raise
        self._switched = True
        self._release()
        async with self.continuous.opening:  # one switch at a time: the next channel is used once
            current = self.continuous._current
            if current is None or current is self.payer:  # no other request moved on yet
                current = await self.continuous._switch(wait=True)
        await self._take(current)

    async def headers(self) -> dict[str, str]:
        """The channel's headers for the next attempt."""
        assert self.exchange is not None
        try:
            return await self.exchange.headers()
        except _SWITCH_ERRORS:
            await self._switch()
            assert self.exchange is not None
            return await self.exchange.headers()

    async def answered(self, status: int, headers: Mapping[str, str], body: bytes | None) -> bool:
        """What came back (the body only for a status of 400 or more): True when done."""
        assert self.exchange is not None and self.payer is not None
        try:
            done = await self.exchange.answered(status, headers, body)
        except _SWITCH_ERRORS:
            await self._switch()
            return False
        if done:
            self.buyer.spent_sat += self.challenge.price_sat
            self._unreserve()
        return done

    def _unreserve(self) -> None:
        self.buyer._reserved_sat -= self._reserved
        self._reserved = 0

    async def close(self) -> None:
        """Release the channel and what is left of the reservation; start opening the next channel
        if this one nears its end."""
        self._unreserve()
        self._release()
        if self.payer is not None:
            await self.continuous._maybe_prepare(self.payer.channel_id)


class Buyer:
    """Pays ``Btcchannel`` 402 challenges within a budget, for httpx and requests (see the module)."""

    def __init__(
        self,
        *,
        max_price_sat: int | None = None,
        deposit_sat: int | None = None,
        max_total_sat: int | None = None,
        lifetime_blocks: int = 144,
        network: str | None = None,
        datadir: str | Path | None = None,
        wallet: str | None = None,
        rpc_url: str | None = None,
        rpc_cookie: str | Path | None = None,
        rpc_user: str | None = None,
        rpc_password: str | None = None,
        min_remaining_sat: int | None = None,
        min_blocks_left: int | None = None,
        open_timeout_s: float = 600.0,
    ) -> None:
        self.budget = Budget(
            max_price_sat=max_price_sat, max_total_sat=None, deposit_sat=deposit_sat, lifetime_blocks=lifetime_blocks
        )
        if deposit_sat is None:
            raise ValueError("a buyer needs deposit_sat: the deposit of each channel it opens")
        #: the most this buyer pays in all (None: no limit); :attr:`spent_sat` is what it has paid
        self.max_total_sat = max_total_sat
        self.spent_sat = 0
        self._reserved_sat = 0  # the prices of the requests being paid now (within the budget with spent_sat)
        env = os.environ.get
        self.network = network or env("BTCCHANNEL_NETWORK") or "regtest"
        root = Path(datadir or env("BTCCHANNEL_DATADIR") or default_datadir()).expanduser()
        self.datadir = root / self.network
        cookie = rpc_cookie or env("BTCCHANNEL_RPC_COOKIE")
        self._node_args: dict[str, Any] = {
            "wallet": wallet or env("BTCCHANNEL_WALLET") or "payer",
            "rpc_url": rpc_url or env("BTCCHANNEL_RPC_URL"),
            "rpc_cookie": Path(cookie) if cookie else None,
            "rpc_user": rpc_user or env("BTCCHANNEL_RPC_USER"),
            "rpc_password": rpc_password or env("BTCCHANNEL_RPC_PASSWORD"),
            "regtest_dirs": (root / "regtest-node", default_datadir() / "regtest-node"),
        }
        find_node(self.network, **self._node_args)  # a missing node is an error here, not at the first 402
        self.policy = RolloverPolicy(
            deposit_sat=deposit_sat,
            lifetime_blocks=lifetime_blocks,
            min_remaining_sat=min_remaining_sat if min_remaining_sat is not None else deposit_sat // 10,
            min_blocks_left=min_blocks_left if min_blocks_left is not None else min(lifetime_blocks - 1, 12),
            open_timeout_s=open_timeout_s,
        )
        self._continuous: dict[str, _BudgetedPayer] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client: PayerClient | None = None
        self._node: Node | None = None
        self._start_lock = threading.Lock()

    # -- the integrations ---------------------------------------------------------------
    def httpx_auth(self) -> BtcchannelAuth:
        """An ``httpx.Auth`` for ``httpx.Client`` and ``httpx.AsyncClient``."""
        from btcchannel.payer.httpx_auth import BtcchannelAuth

        return BtcchannelAuth(self)

    def requests_auth(self) -> BtcchannelRequestsAuth:
        """A ``requests`` auth (``requests.get(url, auth=...)``, ``session.auth = ...``)."""
        from btcchannel.payer.requests_auth import BtcchannelRequestsAuth

        return BtcchannelRequestsAuth(self)

    @property
    def channels(self) -> list[str]:
        """Every channel this buyer has paid through, in order."""
        return [cid for continuous in self._continuous.values() for cid in continuous.channels]

    # -- running on the buyer's loop ------------------------------------------------------
    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._start_lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=loop.run_forever, name="btcchannel-buyer", daemon=True)
                self._thread.start()
                self._loop = loop
            return self._loop

    def _submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self._ensure_loop())

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the buyer's loop and wait for it (from a synchronous caller)."""
        return self._submit(coro).result()

    async def acall(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the buyer's loop (from any event loop)."""
        return await asyncio.wrap_future(self._submit(coro))

    async def _client_now(self) -> PayerClient:
        if self._client is None:
            self._node = find_node(self.network, **self._node_args)
            self._client = PayerClient(self.datadir, self._node, network=self.network)
        return self._client

    # -- paying (on the buyer's loop) ------------------------------------------------------
    async def begin(self, method: str, url: str, challenge: Challenge, body: bytes | None = None) -> Paying:
        """Start paying ``challenge`` for ``method url``: the budget is checked and the route's price
        reserved in it (requests in flight at once never pay more than the budget together), the
        channel found or opened (one at a time per payee: concurrent first requests open one)."""
        self.budget.check(challenge)
        if challenge.price_sat > self.policy.deposit_sat:
            raise TermsRefused(
                f"the route costs {challenge.price_sat} sat, more than a channel's deposit "
                f"({self.policy.deposit_sat} sat) can pay: no channel is opened"
            )
        committed = self.spent_sat + self._reserved_sat
        if self.max_total_sat is not None and committed + challenge.price_sat > self.max_total_sat:
            raise TermsRefused(
                f"the route costs {challenge.price_sat} sat: over what is left of the budget "
                f"({self.max_total_sat - committed} of {self.max_total_sat} sat)"
            )
        self._reserved_sat += challenge.price_sat
        paying: Paying | None = None
        try:
            client = await self._client_now()
            continuous = self._continuous.get(challenge.protocol_url)
            if continuous is None:
                continuous = self._continuous[challenge.protocol_url] = _BudgetedPayer(
                    client, challenge.protocol_url, self.policy, PayerLimits(max_price_sat=self.budget.max_price_sat)
                )
            paying = Paying(self, continuous, challenge, method, url, body)
            async with continuous.opening:
                payer = await continuous._payer()
            await paying._take(payer)
        except BaseException:
            if paying is not None:
                paying._unreserve()
            else:
                self._reserved_sat -= challenge.price_sat
            raise
        return paying

    async def _aclose(self) -> None:
        for continuous in self._continuous.values():
            await continuous.aclose()
        if self._client is not None:
            await self._client.aclose()
        if self._node is not None:
            await self._node.aclose()

    def close(self) -> None:
        """Settle and stop: the payer client, its node connection and the buyer's loop."""
        loop = self._loop
        if loop is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._aclose(), loop).result()
        finally:
            loop.call_soon_threadsafe(loop.stop)
            if self._thread is not None:
                self._thread.join()
            loop.close()
            self._loop = None

    async def aclose(self) -> None:
        """:meth:`close` from an event loop."""
        await asyncio.to_thread(self.close)

    def __enter__(self) -> Buyer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    async def __aenter__(self) -> Buyer:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
