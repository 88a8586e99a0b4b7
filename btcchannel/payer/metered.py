"""The payer's side of a metered service: :class:`MeteredPayer` pays for requests to a
metered payee (``btcchannel.payee.metered``) through one open channel, in either mode::

    class MeteredPayer:
        def __init__(self, client: PayerClient, channel_id: str) -> None
        async def fetch(self, url: str, method: str = "GET", *, units: int = 1,
                        data: bytes | None = None) -> tuple[int, bytes]
        async def settle(self) -> int          # postpay: pay the owed total now (also by a timer)
        async def aclose(self) -> None         # stop the settle timer

Every unit served is counted in the payer's store; the client signs nothing above that count
times the agreed price (``AmountNotAgreed``), whatever the payee's headers or channel object
claim is owed. The amount rules are the core's :class:`btcchannel.core.channel.Metering`; the header
names are :mod:`btcchannel.wire`'s.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from btcchannel.core.params import Payment
from btcchannel.core.terms import Metering
from btcchannel.errors import ChannelError, ProtocolViolation, error_for_code
from btcchannel.payer.client import PayerClient
from btcchannel.wire import HDR_AMOUNT, HDR_AUTH, HDR_CHANNEL, HDR_OWED, HDR_PAID, HDR_SIGNATURE

__all__ = ["MeteredPayer"]


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
                rec.amount_sat > rec.acked_sat and rec.signature is not None
                and rec.amount_sat == metering.prepay_amount(rec.acked_sat, units)
            ):
                return Payment(rec.amount_sat, rec.signature)  # never reached the payee: send it again
        if rec.terms is not None and rec.acked_sat >= metering.cost(rec.units + units):
            return None  # paid for and not served: the payee's unit credit
        return await self.client.sign_next(self.channel_id, metering.prepay_amount(rec.amount_sat, units),
                                           units_ahead=units)

    async def fetch(self, url: str, method: str = "GET", *, units: int = 1, data: bytes | None = None) -> tuple[int, bytes]:
        """Request ``url`` paying for ``units`` units; returns (status, body). Errors are typed.

        One request at a time on the channel (its authentication counters must arrive in order); a
        timed settlement waits for the request in flight, so it counts that request's units."""
        async with self._lock:
            return await self._fetch(url, method, units, data)

    async def _fetch(self, url: str, method: str, units: int, data: bytes | None) -> tuple[int, bytes]:
        metering = await self.metering()
        headers = {HDR_CHANNEL: self.channel_id}
        payment: Payment | None = None
        resynced = False
        for _attempt in range(3):
            if metering.mode == "prepay" and metering.cost(units) > 0:
                payment = await self._prepay_payment(metering, units)
                for name in (HDR_AMOUNT, HDR_SIGNATURE):
                    headers.pop(name, None)
                if payment is not None:
                    headers[HDR_AMOUNT] = str(payment.amount_sat)
                    headers[HDR_SIGNATURE] = payment.signature.hex()
            headers[HDR_AUTH] = await self._sign(method, url, data, headers)
            status, body, resp_headers = await self._request(method, url, headers, data)
            if status == 401 and not resynced and self._resync(body):
                resynced = True  # once: the payee named a counter above ours (a store restored from a backup)
                continue
            if status == 402:
                if self._error_code(body) == "credit_cap_reached":
                    self._raise(status, body)  # the payee's cap across channels: settling this one does not help
                if metering.mode == "prepay" and payment is None:
                    if self._failed_units >= units:  # we know they were not served: never paid twice
                        raise ProtocolViolation("the payee refuses the credit of units it answered as failed")
                    # a unit paid ahead that the payee has no credit for: it was served and its answer
                    # lost (prepay's risk, one request's units); counted as received, then paid afresh
                    self.client.store.add_units(self.channel_id, units)
                    continue
                if metering.mode == "postpay":
                    before = self.client.store.get(self.channel_id).acked_sat
                    self._cancel_timer()
                    if await self._settle() > before:
                        continue
                if metering.mode == "prepay":
                    self._failed_units += units  # a paid request is never answered 402: not served
                raise ProtocolViolation(f"payment refused: {body[:200]!r}")
            if status >= 400:
                if status >= 500 and payment is not None and metering.mode == "prepay":
                    self._failed_units += units  # not served, not charged: credited to the next request
                self._raise(status, body)
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
            return status, body
        raise ProtocolViolation("the payee keeps asking for payment")

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
        if last < self.client.store.get(self.channel_id).request_counter:
            return False  # our counter is already above it: not a lost counter, do not loop
        self.client.resync_request_counter(self.channel_id, last)
        return True

    async def _request(
        self, method: str, url: str, headers: dict[str, str], data: bytes | None
    ) -> tuple[int, bytes, dict[str, str]]:
        try:
            async with self.client.session.request(method, url, headers=headers, data=data) as resp:
                return resp.status, await resp.read(), dict(resp.headers)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise self.client.unreachable(method, url, exc) from exc

    @staticmethod
    def _raise(status: int, body: bytes) -> None:
        try:
            err = json.loads(body)["error"]
            code, msg = str(err["code"]), str(err.get("message", ""))
        except (ValueError, KeyError, TypeError):
            raise ProtocolViolation(f"HTTP {status} without an error body") from None
        raise error_for_code(code, msg)
