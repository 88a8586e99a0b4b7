"""Sell endpoints of any ASGI application (Starlette, FastAPI, ...): a middleware with per-route prices.

The payee's protocol endpoints (``/v1/info``, ``/v1/channels``...) and its watcher and closer
run in the same event loop as btcchannel's aiohttp service, started by :func:`payee_service`
(for instance in the ASGI app's lifespan); :class:`PaidRoutes` gates the routes it prices::

    from btcchannel.payee.asgi import PaidRoutes, payee_service

    @contextlib.asynccontextmanager
    async def lifespan(app):
        async with payee_service(config, node) as service:   # protocol on config.host:config.port
            paid.attach(service.gate())
            yield

    api = FastAPI(lifespan=lifespan)
    paid = PaidRoutes({"/answer": 250, ("POST", "/render"): 2000})
    app = paid.wrap(api)                     # serve `app` with uvicorn

A request to a priced route is admitted by :class:`btcchannel.payee.gate.PaymentGate` (402,
errors, charge, no charge for a 5xx or an exception); other requests pass through untouched.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from btcchannel.bitcoind.rpc import Node
from btcchannel.payee.appkeys import SERVICE
from btcchannel.payee.config import ServerConfig
from btcchannel.payee.gate import Charge, GateAnswer, PaymentGate
from btcchannel.payee.service import PayeeService
from btcchannel.store import PayeeStore

__all__ = ["PaidRoutes", "RunningService", "payee_service"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass
class RunningService:
    """btcchannel's payee service running in this event loop: its ``url`` and ``service``."""

    url: str
    service: PayeeService

    def gate(self) -> PaymentGate:
        """A payment gate whose 402 answers point at this service's ``url``."""
        return PaymentGate(self.service, self.url)


@contextlib.asynccontextmanager
async def payee_service(config: ServerConfig, node: Node) -> AsyncIterator[RunningService]:
    """Run btcchannel's payee service (protocol endpoints, watcher, closer) on ``config.host:port``."""
    from btcchannel.payee.http import app_runner, create_app

    config.datadir.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = PayeeStore(config.db_path)
    runner: web.AppRunner | None = None
    try:
        app = create_app(config, store, node)
        runner = app_runner(app, config)
        await runner.setup()
        await web.TCPSite(runner, config.host, config.port).start()
        host, port = runner.addresses[0][:2]
        yield RunningService(f"http://{host}:{port}", app[SERVICE])
    finally:
        if runner is not None:
            await runner.cleanup()
        store.close()


class _Headers(dict[str, str]):
    """ASGI's (lower-case) request headers, looked up without regard to case."""

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(key.lower(), default)


class PaidRoutes:
    """Prices (in satoshis) for routes of an ASGI app: ``{"/path": price}`` or ``{("GET", "/path"): price}``."""

    def __init__(self, prices: Mapping[str | tuple[str, str], int], gate: PaymentGate | None = None) -> None:
        self.prices = {(k if isinstance(k, tuple) else ("*", k)): v for k, v in prices.items()}
        self._gate = gate

    def attach(self, gate: PaymentGate) -> None:
        """Use ``gate`` (once the payee service runs); every price is checked against its unit price."""
        for price in self.prices.values():
            gate.units_for(price)
        self._gate = gate

    def price(self, method: str, path: str) -> int | None:
        """The route's price, or None for a free route."""
        return self.prices.get((method, path), self.prices.get(("*", path)))

    def wrap(self, app: ASGIApp) -> ASGIApp:
        """``app`` behind the gate."""
        async def gated(scope: Scope, receive: Receive, send: Send) -> None:
            price = self.price(scope.get("method", ""), scope.get("path", "")) if scope["type"] == "http" else None
            if price is None:
                await app(scope, receive, send)
                return
            if self._gate is None:
                raise RuntimeError("PaidRoutes: no payee service attached (call attach() in the lifespan)")
            await self._serve(self._gate, app, scope, receive, send, price)

        return gated

    async def _serve(self, gate: PaymentGate, app: ASGIApp, scope: Scope, receive: Receive, send: Send,
                     price: int) -> None:
        headers = _Headers((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope.get("headers", []))
        target = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        if scope.get("query_string"):
            target += "?" + scope["query_string"].decode("latin-1")
        origin = f"{scope.get('scheme', 'http')}://{headers.get('host') or 'localhost'}"
        admitted = gate.admit(scope["method"], target, headers, gate.units_for(price), origin)
        if isinstance(admitted, GateAnswer):
            await _send_json(send, admitted)
            return
        charge: Charge = admitted
        started = False

        async def charged_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                extra = gate.served(charge, int(message["status"]))
                message = {**message, "headers": [*message.get("headers", []),
                                                   *((k.lower().encode(), v.encode()) for k, v in extra.items())]}
            await send(message)

        try:
            await app(scope, receive, charged_send)
        except BaseException:
            if not started:  # nothing was served
                gate.failed(charge)
            raise


async def _send_json(send: Send, answer: GateAnswer) -> None:
    body = json.dumps(answer.body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *((k.lower().encode(), v.encode()) for k, v in answer.headers.items())]
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
