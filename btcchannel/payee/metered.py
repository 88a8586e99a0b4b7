"""Metered service: sell units of an aiohttp handler through a payment channel.

The payee's ``ServerConfig`` sets ``price_sat`` (per unit), ``mode``
(``prepay`` or ``postpay``), ``credit_limit_sat`` and ``payment_timeout_s``.
An application turns any aiohttp handler into a paid one with one decorator
(or one helper call)::

    @paid()                                   # one unit per request
    async def handler(request: web.Request) -> web.StreamResponse: ...

    add_paid_route(app, "GET", "/v1/answer", handler, units=1)
    add_file_route(app, path, chunk_size=1024)   # built-in example: sells a file's chunks

Request headers (see docs/PROTOCOL.md; their names are in :mod:`btcchannel.wire`):

- ``X-Btcchannel-Channel: <channel_id>`` and ``X-Btcchannel-Auth: <counter>.<signature>`` on every
  paid request: the payer's channel key signs (channel, counter, method, request target) with a
  counter above the last one (:func:`btcchannel.core.keys.request_digest`), so the channel id alone
  buys nothing (``unauthorized``, 401);
- prepay: ``X-Btcchannel-Amount: <new cumulative total>`` and
  ``X-Btcchannel-Signature: <hex>`` — exactly the previous total plus
  ``price_sat * units``; the unit is served only after that payment is stored;
- a charged request whose handler fails (raises before sending anything, or answers 5xx) is not
  charged (a streamed answer the payer breaks off half way stays charged): prepay, its units
  are credited to the next requests (sent without a payment); postpay, the owed total goes back;
- postpay: no payment needed while the unpaid total stays within
  ``credit_limit_sat``; the owed total is then paid (exactly) through
  ``POST /v1/channels/{id}/payments`` or with the same two headers.

A request that can't be served for lack of payment gets **HTTP 402** with
``{"payment": {"price_sat", "mode", "credit_limit_sat", "units",
"info_endpoint", "channel_endpoint", "channel_id", "amount_sat", "owed_sat",
"next_amount_sat"}}`` (:func:`btcchannel.wire.payment_required_body`). A payment
of the wrong amount (with a valid signature) ends the channel: the payee closes
with the last correct payment and answers ``wrong_amount``. Served responses
carry ``X-Btcchannel-Paid`` (stored total) and ``X-Btcchannel-Owed`` (total
owed, postpay).

The payer's side is :class:`btcchannel.payer.metered.MeteredPayer`. The amount
rules (prepay amount, credit, owed total, settlement, end conditions) are the
core's :class:`btcchannel.core.channel.Metering`; this module only carries them
over HTTP.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Awaitable, Callable

from aiohttp import web

from btcchannel.errors import BadRequest
from btcchannel.payee.appkeys import SERVICE
from btcchannel.payee.gate import PaymentGate, gate_of
from btcchannel.payee.sell import serve_gated
from btcchannel.payee.service import PayeeService
from btcchannel.wire import check_decimal

__all__ = ["paid", "add_paid_route", "add_file_route", "payment_required", "Handler"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def payment_required(svc: PayeeService, cid: str | None, units: int, origin: str = "") -> web.Response:
    """The 402 answer: price, mode and where to open a channel / what to pay next (see the gate)."""
    answer = PaymentGate(svc).payment_required(cid, units, origin)
    return web.json_response(answer.body, status=answer.status, headers=answer.headers)


def paid(units: int = 1) -> Callable[[Handler], Handler]:
    """Decorator: the handler runs only once ``units`` units are paid (prepay) or on credit (postpay).

    The handler must run in btcchannel's own app (``request.app`` holds the service); in another
    app use :class:`btcchannel.payee.sell.Seller`. The gating is :class:`~btcchannel.payee.gate.PaymentGate`'s.
    """
    if units < 1:
        raise ValueError("units must be >= 1")

    def deco(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def wrapper(request: web.Request) -> web.StreamResponse:
            return await serve_gated(gate_of(request.app[SERVICE]), request, handler, units)

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
        return web.json_response(
            {
                "name": data_path.name,
                "size": size,
                "chunk_size": chunk_size,
                "chunks": (size + chunk_size - 1) // chunk_size,
                "price_sat": svc.config.price_sat,
                "mode": svc.config.mode,
            }
        )

    def _index(request: web.Request) -> int:
        idx = check_decimal(request.match_info["index"], "chunk index")
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
