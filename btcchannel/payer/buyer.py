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
from btcchannel.errors import AmountOutOfRange, ChannelClosed, ChannelClosing, NotOpen, TermsRefused
from btcchannel.payer.buy import Budget
from btcchannel.payer.challenge import Challenge, parse_www_authenticate
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


def is_challenge(status: int, headers: Mapping[str, str]) -> bool:
    """Whether an answer is a ``Btcchannel`` 402 challenge."""
    if status != 402:
        return False
    value = headers.get("WWW-Authenticate") or headers.get("www-authenticate") or ""
    return parse_www_authenticate(value) is not None


class Paying:
    """One request being paid: its channel's lock is held from :meth:`Buyer.begin` to :meth:`close`."""

    def __init__(
        self, buyer: Buyer, continuous: ContinuousPayer, challenge: Challenge, method: str, url: str, body: bytes | None
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
        current = self.continuous._current
        if current is not None and current is not self.payer:  # another request already moved on
            await self._take(current)
            return
        await self._take(await self.continuous._switch(wait=True))

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
        return done

    async def close(self) -> None:
        """Release the channel; start opening the next one if this one nears its end."""
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
        self._continuous: dict[str, ContinuousPayer] = {}
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
        """Start paying ``challenge`` for ``method url``: the budget is checked, the channel found or opened."""
        self.budget.check(challenge)
        if self.max_total_sat is not None and self.spent_sat + challenge.price_sat > self.max_total_sat:
            raise TermsRefused(
                f"the route costs {challenge.price_sat} sat: over what is left of the budget "
                f"({self.max_total_sat - self.spent_sat} of {self.max_total_sat} sat)"
            )
        client = await self._client_now()
        continuous = self._continuous.get(challenge.protocol_url)
        if continuous is None:
            continuous = self._continuous[challenge.protocol_url] = ContinuousPayer(
                client, challenge.protocol_url, self.policy
            )
        paying = Paying(self, continuous, challenge, method, url, body)
        await paying._take(await continuous._payer())
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
