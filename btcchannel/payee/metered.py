"""Metered service: sell units of an aiohttp handler through a payment channel.

The payee's ``ServerConfig`` sets ``price_sat`` (per unit), ``mode``
(``prepay`` or ``postpay``), ``credit_limit_sat`` and ``payment_timeout_s``.
An application turns any aiohttp handler into a paid one with one decorator
(or one helper call)::

    @paid()                                   # one unit per request
    async def handler(request: web.Request) -> web.StreamResponse: ...

    add_paid_route(app, "GET", "/v1/answer", handler, units=1)
    add_file_route(app, path, chunk_size=1024)   # built-in example: sells a file's chunks

Request headers (see docs/PROTOCOL.md):

- ``X-Btcchannel-Channel: <channel_id>`` on every paid request;
- prepay: ``X-Btcchannel-Amount: <new cumulative total>`` and
  ``X-Btcchannel-Signature: <hex>`` — exactly the previous total plus
  ``price_sat * units``; the unit is served only after that payment is stored;
- postpay: no payment needed while the unpaid total stays within
  ``credit_limit_sat``; the owed total is then paid (exactly) through
  ``POST /v1/channels/{id}/payments`` or with the same two headers.

A request that can't be served for lack of payment gets **HTTP 402** with
``{"payment": {"price_sat", "mode", "credit_limit_sat", "units",
"info_endpoint", "channel_endpoint", "channel_id", "amount_sat", "owed_sat",
"next_amount_sat"}}``. A payment of the wrong amount (with a valid signature)
ends the channel: the payee closes with the last correct payment and answers
``wrong_amount``. Served responses carry ``X-Btcchannel-Paid`` (stored
total) and ``X-Btcchannel-Owed`` (total owed, postpay).

The payer side::

    class MeteredPayer:
        def __init__(self, client: PayerClient, channel_id: str) -> None
        async def fetch(self, url: str, method: str = "GET", *, units: int = 1,
                        data: bytes | None = None) -> tuple[int, bytes]
        async def settle(self) -> int          # postpay: pay the owed total now

The amount rules (prepay amount, credit, owed total, settlement, end
conditions) are the core's :class:`btcchannel.core.channel.Metering`; this module
only carries them over HTTP.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp
from aiohttp import web

from btcchannel.core.channel import Metering, Payment
from btcchannel.payer.client import PayerClient
from btcchannel.errors import BadRequest, ChannelError, NodeUnavailable, ProtocolViolation, error_for_code
from btcchannel.payee.service import SERVICE, PayeeService, check_channel_id

__all__ = [
    "HDR_CHANNEL", "HDR_AMOUNT", "HDR_SIGNATURE", "HDR_PAID", "HDR_OWED",
    "paid", "add_paid_route", "add_file_route", "MeteredPayer",
]

HDR_CHANNEL = "X-Btcchannel-Channel"
HDR_AMOUNT = "X-Btcchannel-Amount"
HDR_SIGNATURE = "X-Btcchannel-Signature"
HDR_PAID = "X-Btcchannel-Paid"
HDR_OWED = "X-Btcchannel-Owed"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_DIGITS = re.compile(r"^[0-9]{1,16}$")
_HEX = re.compile(r"^(?:[0-9a-f]{2}){1,80}$")


def payment_required(svc: PayeeService, cid: str | None, units: int) -> web.Response:
    """The 402 answer: price, mode and where to open a channel / what to pay next."""
    cfg = svc.config
    metering = cfg.metering
    body: dict[str, Any] = {
        "price_sat": cfg.price_sat, "mode": cfg.mode, "credit_limit_sat": cfg.credit_limit_sat,
        "units": units, "info_endpoint": "/v1/info", "channel_endpoint": "/v1/channels",
        "channel_id": cid, "amount_sat": None, "owed_sat": None, "next_amount_sat": None,
    }
    if cid is not None:
        rec = svc.store.get(cid)
        body["amount_sat"] = rec.amount_sat
        body["owed_sat"] = metering.owed_total(rec.owed_sat, rec.amount_sat)
        body["next_amount_sat"] = metering.next_amount(rec.amount_sat, rec.owed_sat, units)
        body["state"] = rec.state
    return web.json_response({"payment": body}, status=402)


def _payment_headers(request: web.Request) -> tuple[int, bytes] | None:
    amount = request.headers.get(HDR_AMOUNT)
    sig = request.headers.get(HDR_SIGNATURE)
    if amount is None and sig is None:
        return None
    if amount is None or sig is None or not _DIGITS.match(amount) or not _HEX.match(sig):
        raise BadRequest(f"{HDR_AMOUNT} must be decimal satoshis and {HDR_SIGNATURE} lowercase hex")
    return int(amount), bytes.fromhex(sig)


def paid(units: int = 1) -> Callable[[Handler], Handler]:
    """Decorator: the handler runs only once ``units`` units are paid (prepay) or on credit (postpay)."""
    if units < 1:
        raise ValueError("units must be >= 1")

    def deco(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def wrapper(request: web.Request) -> web.StreamResponse:
            svc = request.app[SERVICE]
            metering = svc.config.metering
            if not metering.enabled:
                return await handler(request)
            cid_h = request.headers.get(HDR_CHANNEL)
            if cid_h is None:
                return payment_required(svc, None, units)
            cid = check_channel_id(cid_h)
            pay = _payment_headers(request)
            if metering.mode == "prepay":
                if pay is None:
                    return payment_required(svc, cid, units)
                charged = svc.charge_prepay(cid, pay[0], pay[1], units)
            else:
                if pay is not None:
                    svc.pay_owed(cid, pay[0], pay[1])
                credited = svc.charge_postpay(cid, units)
                if credited is None:
                    return payment_required(svc, cid, units)
                charged = credited
            resp = await handler(request)
            rec = svc.after_payment(charged)
            if not resp.prepared:
                resp.headers[HDR_PAID] = str(rec.amount_sat)
                resp.headers[HDR_OWED] = str(metering.owed_total(rec.owed_sat, rec.amount_sat))
            return resp

        return wrapper

    return deco


def add_paid_route(app: web.Application, method: str, path: str, handler: Handler, *, units: int = 1) -> None:
    """Register ``handler`` at ``method path`` as a paid route."""
    app.router.add_route(method, path, paid(units)(handler))


def add_file_route(app: web.Application, path: Path, *, chunk_size: int = 1024, prefix: str = "/v1/file") -> None:
    """Built-in example: ``GET {prefix}`` (free: size, chunk count, price) and
    ``GET {prefix}/{index}`` (one paid unit per chunk)."""
    data_path = Path(path)
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")

    async def meta(request: web.Request) -> web.Response:
        size = data_path.stat().st_size
        svc = request.app[SERVICE]
        return web.json_response({
            "name": data_path.name, "size": size, "chunk_size": chunk_size,
            "chunks": (size + chunk_size - 1) // chunk_size, "price_sat": svc.config.price_sat,
            "mode": svc.config.mode,
        })

    def _index(request: web.Request) -> int:
        raw = request.match_info["index"]
        if not _DIGITS.match(raw):
            raise BadRequest("chunk index must be a decimal integer")
        idx = int(raw)
        size = data_path.stat().st_size
        if idx * chunk_size >= size:
            raise BadRequest("no such chunk")
        return idx

    async def chunk(request: web.Request) -> web.Response:
        idx = _index(request)
        with data_path.open("rb") as f:
            f.seek(idx * chunk_size)
            body = f.read(chunk_size)
        return web.Response(body=body, content_type="application/octet-stream")

    paid_chunk = paid(1)(chunk)

    async def checked_chunk(request: web.Request) -> web.StreamResponse:
        _index(request)  # refuse a bad index before charging for it
        return await paid_chunk(request)

    app.router.add_get(prefix, meta)
    app.router.add_get(prefix + "/{index}", checked_chunk)


class MeteredPayer:
    """Pays for requests to a metered payee through one open channel, in either mode."""

    def __init__(self, client: PayerClient, channel_id: str) -> None:
        self.client = client
        self.channel_id = channel_id
        self._info: dict[str, Any] | None = None
        self._metering: Metering | None = None

    async def terms(self) -> dict[str, Any]:
        """The payee's price, mode and credit limit (``GET /v1/info``, cached)."""
        if self._info is None:
            rec = self.client.store.get(self.channel_id)
            self._info = await self.client.info(rec.server_url)
        return self._info

    async def metering(self) -> Metering:
        """The payee's terms as the core's :class:`Metering` (cached); ProtocolViolation if they make no sense."""
        if self._metering is None:
            terms = await self.terms()
            try:
                self._metering = Metering(int(terms["price_sat"]), terms["mode"], int(terms["credit_limit_sat"]))
            except ChannelError as exc:
                raise ProtocolViolation(f"the payee's terms are invalid: {exc.message}") from None
        return self._metering

    async def settle(self) -> int:
        """Postpay: pay exactly the owed total now (no-op if nothing is owed). Returns the paid total."""
        obj = await self.client.status(self.channel_id)
        owed = int(obj.get("owed_sat") or 0)
        if owed > obj["amount_sat"]:
            return await self.client.pay(self.channel_id, amount=owed)
        return int(obj["amount_sat"])

    async def _prepay_payment(self, metering: Metering, units: int) -> Payment:
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
        return await self.client.sign_next(self.channel_id, metering.prepay_amount(rec.amount_sat, units))

    async def fetch(self, url: str, method: str = "GET", *, units: int = 1, data: bytes | None = None) -> tuple[int, bytes]:
        """Request ``url`` paying for ``units`` units; returns (status, body). Errors are typed."""
        metering = await self.metering()
        headers = {HDR_CHANNEL: self.channel_id}
        payment: Payment | None = None
        for _attempt in range(3):
            if metering.mode == "prepay" and metering.cost(units) > 0:
                payment = await self._prepay_payment(metering, units)
                headers[HDR_AMOUNT] = str(payment.amount_sat)
                headers[HDR_SIGNATURE] = payment.signature.hex()
            status, body, resp_headers = await self._request(method, url, headers, data)
            if status == 402:
                if metering.mode == "postpay":
                    before = self.client.store.get(self.channel_id).acked_sat
                    if await self.settle() > before:
                        continue
                raise ProtocolViolation(f"payment refused: {body[:200]!r}")
            if status >= 400:
                self._raise(status, body)
            if payment is not None:
                self.client.store.set_acked(self.channel_id, payment.amount_sat)
            if metering.mode == "postpay":
                owed = int(resp_headers.get(HDR_OWED, "0"))
                paid_total = int(resp_headers.get(HDR_PAID, "0"))
                if metering.exceeds_credit(owed, paid_total, units):
                    await self.client.pay(self.channel_id, amount=owed)
            return status, body
        raise ProtocolViolation("the payee keeps asking for payment")

    async def _request(
        self, method: str, url: str, headers: dict[str, str], data: bytes | None
    ) -> tuple[int, bytes, dict[str, str]]:
        try:
            async with self.client.session.request(method, url, headers=headers, data=data) as resp:
                return resp.status, await resp.read(), dict(resp.headers)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise NodeUnavailable(f"payee unreachable: {method} {url}: {exc!r}") from exc

    @staticmethod
    def _raise(status: int, body: bytes) -> None:
        try:
            err = json.loads(body)["error"]
            code, msg = str(err["code"]), str(err.get("message", ""))
        except (ValueError, KeyError, TypeError):
            raise ProtocolViolation(f"HTTP {status} without an error body") from None
        raise error_for_code(code, msg)
