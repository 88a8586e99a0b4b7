"""Sell any aiohttp handler: per-route prices in satoshis, in the seller's own app or beside btcchannel's.

btcchannel's payee service is an aiohttp application (:func:`btcchannel.payee.http.create_app`):
mount it in your app as a sub-app (``app.add_subapp("/btc", payee_app)``) or run it as your app,
and gate your handlers with a :class:`Seller` made from it::

    payee_app = create_app(config, store, node)
    seller = Seller(payee_app, protocol_path="/btc")
    app.add_subapp("/btc", payee_app)

    @seller.paid(price_sat=250)
    async def answer(request: web.Request) -> web.Response: ...

    app.router.add_get("/answer", answer)

The gating itself is :class:`btcchannel.payee.gate.PaymentGate`'s; :func:`serve_gated` is the
aiohttp side of it (also used by ``paid()`` in :mod:`btcchannel.payee.metered`): it decides only
whether the handler *served* (any status below 500, returned or raised as ``web.HTTPException``:
charged) or *failed* (5xx, or another exception before anything was sent: not charged). A seller's
whole program in one object (node, store, protocol mounted) is :class:`btcchannel.payee.seller.PaidService`.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

from aiohttp import web

from btcchannel.payee.appkeys import SERVICE
from btcchannel.payee.gate import Charge, PaymentGate

__all__ = ["Seller", "serve_gated"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def serve_gated(
    gate: PaymentGate, request: web.Request, handler: Handler, units: int, protocol_path: str = ""
) -> web.StreamResponse:
    """Admit ``request`` for ``units`` units, run ``handler`` if admitted, charge what it served.

    Served (charged): any answer with a status below 500, returned or raised (``raise
    web.HTTPFound(...)`` is a redirect the payer receives); a stream once started. Failed (not
    charged): a status of 500 or more, or an exception other than an HTTP answer raised before
    anything was sent."""
    body = await request.read() if request.body_exists else None  # auth v2 covers it (kept for the handler)
    admitted = await gate.admit(
        request.method,
        request.raw_path,
        request.headers,
        units,
        f"{request.scheme}://{request.host}{protocol_path}",
        body=body,
        peer=request.remote,
    )
    if not isinstance(admitted, Charge):
        return web.json_response(admitted.body, status=admitted.status, headers=admitted.headers)
    try:
        resp = await handler(request)
    except web.HTTPException as answer:  # an answer raised: served unless 5xx
        if answer.status < 500:
            answer.headers.update(await gate.served(admitted, answer.status))
        elif not _started(request):
            await gate.failed(admitted)
        raise
    except BaseException:
        if not _started(request):  # served nothing: charged nothing
            await gate.failed(admitted)  # (a stream the payer broke off was served: it stays charged)
        raise
    extra = await gate.served(admitted, resp.status)
    if not resp.prepared:
        resp.headers.update(extra)
    return resp


def _started(request: web.Request) -> bool:
    """Whether anything of an answer was sent."""
    return request.writer is not None and request.writer.output_size > 0


class Seller:
    """Paid routes priced in satoshis, gated by the payee service of ``payee_app``."""

    def __init__(self, payee_app: web.Application, *, protocol_path: str = "", protocol_url: str | None = None) -> None:
        self.payee_app = payee_app
        self.protocol_path = protocol_path.rstrip("/")
        self.protocol_url = protocol_url
        self._gate: PaymentGate | None = None

    @property
    def gate(self) -> PaymentGate:
        """The gate (made on first use: the service exists once ``payee_app`` is built)."""
        if self._gate is None:
            self._gate = PaymentGate(self.payee_app[SERVICE], self.protocol_url)
        return self._gate

    def paid(self, price_sat: int) -> Callable[[Handler], Handler]:
        """Decorator: the handler runs only once ``price_sat`` is paid (prepay) or on credit (postpay)."""
        units = self.gate.units_for(price_sat)

        def deco(handler: Handler) -> Handler:
            @functools.wraps(handler)
            async def wrapper(request: web.Request) -> web.StreamResponse:
                return await serve_gated(self.gate, request, handler, units, self.protocol_path)

            return wrapper

        return deco
