"""The payer's side of a metered service: :class:`MeteredPayer` pays for requests to a
metered payee (``btcchannel.payee.metered``) through one open channel, in either mode::

    class MeteredPayer:
        def __init__(self, client: PayerClient, channel_id: str) -> None
        async def fetch(self, url: str, method: str = "GET", *, units: int | None = 1,
                        data: bytes | None = None) -> tuple[int, bytes]
        async def request(self, url, method="GET", *, units=None, data=None, headers=None,
                          allow_redirects=True) -> PaidResponse   # units None: as the route's 402 says
        def stream(self, url, ...) -> AsyncContextManager[aiohttp.ClientResponse]   # the answer unread
        async def settle(self) -> int          # postpay: pay the owed total now (also by a timer)
        async def aclose(self) -> None         # stop the settle timer

Every unit served is counted in the payer's store; the client signs nothing above that count
times the agreed price (``AmountNotAgreed``), whatever the payee's headers or channel object
claim is owed. The amount rules are the core's :class:`btcchannel.core.channel.Metering`; the header
names are :mod:`btcchannel.wire`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from btcchannel.core.params import Payment
from btcchannel.core.terms import Metering
from btcchannel.errors import ChannelError, ProtocolViolation, error_for_code
from btcchannel.payer.challenge import Challenge
from btcchannel.payer.client import PayerClient
from btcchannel.wire import HDR_AMOUNT, HDR_AUTH, HDR_CHANNEL, HDR_OWED, HDR_PAID, HDR_SIGNATURE

__all__ = ["Exchange", "MeteredPayer", "PaidResponse"]


class MeteredPayer:
    """Pays for requests to a metered payee through one open channel, in either mode."""

    def __init__(self, client: PayerClient, channel_id: str) -> None:
        self.client = client
        self.channel_id = channel_id
        self._info: dict[str, Any] | None = None
        self._metering: Metering | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._settling: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # one request or settlement at a time (the timer's waits for a fetch)
        #: what the last timed settle raised (a failure is kept, never lost in the background)
        self.settle_error: BaseException | None = None
        #: prepay: units paid for whose request the payee answered 5xx (it owes their credit)
        self._failed_units = 0

    def settle_delay_s(self) -> float | None:
        """Postpay: how long after the first unpaid unit the payer settles by itself: half the agreed
        payment timeout (None without agreed terms or outside postpay)."""
        terms = self.client.terms(self.channel_id)
        if terms is None or terms.mode != "postpay" or terms.price_sat == 0:
            return None
        return terms.payment_timeout_ms / 2000

    def _arm_timer(self) -> None:
        """After a unit served on credit: settle by itself within the agreed payment timeout."""
        delay = self.settle_delay_s()
        if delay is None or self._timer is not None:
            return
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        if self._settling is None or self._settling.done():
            self._settling = asyncio.ensure_future(self._timed_settle())

    async def _timed_settle(self) -> None:
        try:
            await self.settle()
        except ChannelError as exc:  # kept for the caller; the next fetch or settle reports it too
            self.settle_error = exc

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def aclose(self) -> None:
        """Stop the settle timer (and wait for a settle it started)."""
        self._cancel_timer()
        if self._settling is not None:
            await asyncio.gather(self._settling, return_exceptions=True)

    async def terms(self) -> dict[str, Any]:
        """The payee's price, mode and credit limit (``GET /v1/info``, cached)."""
        if self._info is None:
            rec = self.client.store.get(self.channel_id)
            self._info = await self.client.info(rec.server_url)
        return self._info

    async def metering(self) -> Metering:
        """The channel's agreed terms as the core's :class:`Metering` (cached): the terms stored at
        open, never what the payee states later; for a channel stored before terms, the payee's
        ``/v1/info``. ProtocolViolation if they make no sense."""
        if self._metering is None:
            agreed = self.client.terms(self.channel_id)
            if agreed is not None:
                self._metering = agreed.metering
                return self._metering
            terms = await self.terms()
            try:
                self._metering = Metering(int(terms["price_sat"]), terms["mode"], int(terms["credit_limit_sat"]))
            except ChannelError as exc:
                raise ProtocolViolation(f"the payee's terms are invalid: {exc.message}") from None
        return self._metering

    async def settle(self) -> int:
        """Postpay: pay exactly the owed total now (no-op if nothing is owed). Returns the paid total.

        Also called by itself (a timer) half the agreed payment timeout after a unit was served on
        credit, so an honest payer that pauses inside its credit line keeps its channel."""
        self._cancel_timer()
        async with self._lock:
            return await self._settle()

    async def _settle(self) -> int:
        """:meth:`settle` with the lock held."""
        obj = await self.client.status(self.channel_id)
        owed = int(obj.get("owed_sat") or 0)
        if owed > obj["amount_sat"]:
            return await self.client.pay(self.channel_id, amount=owed)
        return int(obj["amount_sat"])

    async def _prepay_payment(self, metering: Metering, units: int) -> Payment | None:
        """The payment for the next ``units`` (None: they are already paid for, by units whose
        handler failed and that the payee credits to the next request)."""
        store = self.client.store
        rec = store.get(self.channel_id)
        if rec.amount_sat > rec.acked_sat:
            await self.client.status(self.channel_id)  # did the payee get our last one?
            rec = store.get(self.channel_id)
            if (
                rec.amount_sat > rec.acked_sat
                and rec.signature is not None
                and rec.amount_sat == metering.prepay_amount(rec.acked_sat, units)
            ):
                return Payment(rec.amount_sat, rec.signature)  # never reached the payee: send it again
        if rec.terms is not None and rec.acked_sat >= metering.cost(rec.units + units):
            return None  # paid for and not served: the payee's unit credit
        return await self.client.sign_next(
            self.channel_id, metering.prepay_amount(rec.amount_sat, units), units_ahead=units, record=rec
        )

    async def fetch(
        self, url: str, method: str = "GET", *, units: int | None = 1, data: bytes | None = None
    ) -> tuple[int, bytes]:
        """Request ``url`` paying for ``units`` units; returns (status, body). Errors are typed.

        ``units=None``: pay what the route's 402 asks (see :meth:`request`, which also gives the
        headers). One request at a time on the channel (its authentication counters must arrive
        in order); a timed settlement waits for the request in flight, so it counts its units."""
        answer = await self.request(url, method, units=units, data=data)
        return answer.status, answer.body

    async def request(
        self,
        url: str,
        method: str = "GET",
        *,
        units: int | None = None,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        allow_redirects: bool = True,
    ) -> PaidResponse:
        """Request ``url`` and pay for it: the status, headers and body (:class:`PaidResponse`).

        Without ``units`` the route says what it costs: the request is first sent without a
        payment and the payee's 402 names the route's units (``WWW-Authenticate: Btcchannel ...
        units=...``); the payment of exactly those units follows (a route that costs nothing
        more, e.g. on the credit of a failed request, is served at once). Nothing is ever
        signed for an amount other than the route's price. :meth:`stream` gives the answer
        unread."""
        async with self.stream(
            url, method, units=units, data=data, headers=headers, allow_redirects=allow_redirects
        ) as resp:
            try:
                body = await resp.read()
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                raise self.client.unreachable(method, url, exc) from exc
            return PaidResponse(resp.status, resp.headers.copy(), body)

    @contextlib.asynccontextmanager
    async def stream(
        self,
        url: str,
        method: str = "GET",
        *,
        units: int | None = None,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        allow_redirects: bool = True,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """As :meth:`request`, but the paid answer is given unread (``async for chunk in
        resp.content.iter_chunked(n)``), and released when the block ends."""
        async with self._lock:
            exchange = self.exchange(method, url, units, data)
            while True:
                sent = {**(headers or {}), **await exchange.headers()}
                try:
                    resp = await self.client.session.request(
                        method, url, headers=sent, data=data, allow_redirects=allow_redirects
                    )
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    raise self.client.unreachable(method, url, exc) from exc
                try:
                    error_body = await resp.read() if resp.status >= 400 else None
                    done = await exchange.answered(resp.status, resp.headers, error_body)
                except BaseException:
                    resp.release()
                    raise
                if done:
                    if resp.status >= 400:  # a charged 4xx of the handler: counted, then the typed error
                        resp.release()
                        self._raise(resp.status, error_body or b"")
                    break
                resp.release()
        try:
            yield resp
        finally:
            resp.release()

    async def _sign(self, method: str, url: str, data: bytes | None, headers: dict[str, str]) -> str:
        """``X-Btcchannel-Auth`` (v2) of the request about to be sent with ``headers`` and body ``data``,
        under the channel's next durable counter."""
        return await self.client.request_auth_async(self.channel_id, method, url, data, headers)

    @staticmethod
    def _error_code(body: bytes) -> str | None:
        """The ``error.code`` of an answer's JSON body (None if it has none)."""
        try:
            code = json.loads(body)["error"]["code"]
        except (ValueError, KeyError, TypeError):
            return None
        return code if isinstance(code, str) else None

    def _resync(self, body: bytes) -> bool:
        """A 401 naming ``last_counter`` at or above ours: store it, so the next counter is above it
        (True: retry once). Any other 401 is final."""
        try:
            err = json.loads(body)["error"]
            last = err.get("last_counter") if err.get("code") == "unauthorized" else None
        except (ValueError, KeyError, TypeError, AttributeError):
            return False
        if not isinstance(last, int) or isinstance(last, bool) or not 0 <= last < 2**63 - 1:
            return False
        if last < self.client.store.last_request_counter(self.channel_id):
            return False  # our counter is already above it: not a lost counter, do not loop
        self.client.resync_request_counter(self.channel_id, last)
        return True

    def exchange(self, method: str, url: str, units: int | None, data: bytes | None = None) -> Exchange:
        """One paid request, transport-free: :meth:`Exchange.headers` to send, then
        :meth:`Exchange.answered` with what came back, until it says done (the caller holds
        :attr:`lock`). What the HTTP client integrations are built on."""
        return Exchange(self, method, url, units, data)

    @property
    def lock(self) -> asyncio.Lock:
        """Held for one request at a time on the channel."""
        return self._lock

    async def _after_served(
        self, metering: Metering, units: int, payment: Payment | None, resp_headers: Mapping[str, str]
    ) -> None:
        """A served answer: count its units, and in postpay settle when the credit runs out."""
        if payment is None and metering.mode == "prepay":
            self._failed_units = max(0, self._failed_units - units)
        self.client.store.add_units(self.channel_id, units, payment.amount_sat if payment is not None else None)
        if metering.mode == "postpay":
            owed = int(resp_headers.get(HDR_OWED, "0"))
            paid_total = int(resp_headers.get(HDR_PAID, "0"))
            if metering.exceeds_credit(owed, paid_total, units):
                if owed > self.client.store.get(self.channel_id).acked_sat:
                    await self.client.pay(self.channel_id, amount=owed)
                self._cancel_timer()
            else:
                self._arm_timer()

    @staticmethod
    def _raise(status: int, body: bytes) -> None:
        try:
            err = json.loads(body)["error"]
            code, msg = str(err["code"]), str(err.get("message", ""))
        except (ValueError, KeyError, TypeError):
            raise ProtocolViolation(f"HTTP {status} without an error body") from None
        raise error_for_code(code, msg)


@dataclass(frozen=True)
class PaidResponse:
    """A paid request's answer: ``status``, ``headers`` and ``body``."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        """The body as JSON."""
        return json.loads(self.body)


class Exchange:
    """One paid request, whatever sends it: :meth:`headers` gives the channel's headers for the next
    attempt (the payment, if one is due, signed and stored first); :meth:`answered` takes the
    status, headers and, for a status of 400 or more, the body, and says whether the request is
    done (True) or must be sent again with fresh headers (False: a 402 named the route's units,
    or a credit was used up); typed errors otherwise."""

    #: attempts before the payee is taken to be asking for payment forever
    max_attempts = 4

    def __init__(self, payer: MeteredPayer, method: str, url: str, units: int | None, data: bytes | None) -> None:
        if units is not None and units < 1:
            raise ValueError("units must be at least 1")
        self.payer = payer
        self.method = method.upper()
        self.url = url
        self.units = units
        self.data = data
        self.payment: Payment | None = None
        self.attempts = 0
        self.resynced = False
        #: the route's 402 challenge, once one was seen
        self.challenge: Challenge | None = None

    async def headers(self) -> dict[str, str]:
        """The channel's headers for the next attempt (a payment only once the units are known)."""
        self.attempts += 1
        if self.attempts > self.max_attempts:
            raise ProtocolViolation("the payee keeps asking for payment")
        payer = self.payer
        metering = await payer.metering()
        out = {HDR_CHANNEL: payer.channel_id}
        self.payment = None
        if self.units is not None and metering.mode == "prepay" and metering.cost(self.units) > 0:
            self.payment = await payer._prepay_payment(metering, self.units)
            if self.payment is not None:
                out[HDR_AMOUNT] = str(self.payment.amount_sat)
                out[HDR_SIGNATURE] = self.payment.signature.hex()
        out[HDR_AUTH] = await payer._sign(self.method, self.url, self.data, out)
        return out

    async def answered(self, status: int, headers: Mapping[str, str], body: bytes | None) -> bool:
        """What came back: True when served (its units counted; a 4xx of the handler, which carries
        ``X-Btcchannel-Paid``, was served and charged too), False to send again."""
        payer = self.payer
        metering = await payer.metering()
        if status == 401 and not self.resynced and payer._resync(body or b""):
            self.resynced = True  # once: the payee named a counter above ours (a store restored from a backup)
            return False
        if status == 402:
            return await self._payment_required(metering, headers, body)
        if status >= 400:
            self._refused(metering, status, headers, body)
        units = self.units
        if units is None:  # served without a 402 (a free route, a unit credit, postpay credit)
            units = self._served_units(metering, headers)
            if units == 0:
                return True
        await payer._after_served(metering, units, self.payment, headers)
        return True

    async def _payment_required(self, metering: Metering, headers: Mapping[str, str], body: bytes | None) -> bool:
        """A 402: False to send the request again (with the units the route names, after a prepaid
        unit whose answer was lost, or after settling the owed total); typed errors when paying
        again cannot help."""
        payer = self.payer
        if body is not None and payer._error_code(body) == "credit_cap_reached":
            payer._raise(402, body)  # the payee's cap across channels: settling this one does not help
        if self.units is None:  # the route names its price: pay exactly that, or nothing
            self.challenge = Challenge.from_answer(headers, body)
            self.units = self.challenge.units_for(metering)
            return False
        if metering.mode == "prepay" and self.payment is None:
            self._count_units_paid_ahead(self.units)
            return False
        if metering.mode == "postpay" and await self._settled():
            return False
        if metering.mode == "prepay":
            payer._failed_units += self.units  # a paid request is never answered 402: not served
        raise ProtocolViolation(f"payment refused: {(body or b'')[:200]!r}")

    def _count_units_paid_ahead(self, units: int) -> None:
        """Prepay, a request sent without a payment answered 402: the units paid ahead that the payee
        has no credit for were served and their answer lost (prepay's risk, one request's units).
        They are counted as received, to be paid afresh; never units known to have failed, which
        would be paid twice."""
        payer = self.payer
        if payer._failed_units >= units:  # we know they were not served: never paid twice
            raise ProtocolViolation("the payee refuses the credit of units it answered as failed")
        payer.client.store.add_units(payer.channel_id, units)

    async def _settled(self) -> bool:
        """Postpay, a 402: settle the owed total now (the timer's settlement is not waited for);
        True when the payee acknowledged more than before."""
        payer = self.payer
        before = payer.client.store.get(payer.channel_id).acked_sat
        payer._cancel_timer()
        return await payer._settle() > before

    def _refused(self, metering: Metering, status: int, headers: Mapping[str, str], body: bytes | None) -> None:
        """A status of 400 or more other than 402: the payee's error, raised typed; unless it is the
        handler's own 4xx, served and charged (the payee's errors carry no ``X-Btcchannel-Paid``). A
        prepaid request answered 5xx was neither served nor charged: its units are credited to the
        next request."""
        if status < 500 and HDR_PAID in headers:
            return
        if status >= 500 and self.payment is not None and metering.mode == "prepay":
            self.payer._failed_units += self.units or 0
        self.payer._raise(status, body or b"")

    def _served_units(self, metering: Metering, headers: Mapping[str, str]) -> int:
        """The units a request sent without a price was charged: from the owed total it reports."""
        if HDR_OWED not in headers or metering.price_sat == 0:
            return 0  # not metered
        rec = self.payer.client.store.get(self.payer.channel_id)
        owed = int(headers[HDR_OWED])
        units, rest = divmod(owed - metering.cost(rec.units), metering.price_sat)
        if rest or units < 0:
            raise ProtocolViolation(
                f"the payee reports {owed} sat owed after {rec.units} units at "
                f"{metering.price_sat} sat: not a whole number of units more"
            )
        return units
