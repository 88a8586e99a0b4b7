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
import contextvars
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, MutableMapping
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
    """Prices (in satoshis) for routes of an ASGI app, keyed by the app's own route templates:
    ``{"/items/{item_id}": 250, ("POST", "/render"): 2000}``.

    With a Starlette or FastAPI app, a request is priced by the route the app's router picks for it
    (``route.matches(scope)``, mounts included, ``root_path`` handled as the router does), so
    ``HEAD`` on a GET route costs what ``GET`` does; a price on a mount covers everything under it.
    For another ASGI app, the templates are matched against the path without ``root_path``.
    A path that matches no route of the app but lies under a priced template's fixed prefix is
    answered 404 without running the app (it is never served unpaid). :meth:`attach` refuses a
    price that matches no route of the wrapped app, or a websocket route (only HTTP requests are
    metered; a websocket under a priced mount or template is closed, code 1008, unserved). FastAPI
    routes can also carry their price themselves: ``dependencies=[Depends(paid.costs(250))]``.
    """

    #: the largest body a priced request may have (the gate reads it whole before the app runs, since
    #: auth v2 covers it): a bigger one is answered 413 ``too_large`` (as aiohttp's ``client_max_size``)
    max_body_bytes = 1 << 20

    def __init__(
        self,
        prices: Mapping[str | tuple[str, str], int] | None = None,
        gate: PaymentGate | None = None,
        *,
        protocol_path: str = "",
        max_body_bytes: int | None = None,
    ) -> None:
        self.prices: dict[tuple[str, str], int] = {
            ((k[0].upper(), k[1]) if isinstance(k, tuple) else ("*", k)): v for k, v in (prices or {}).items()
        }
        self._gate = gate
        #: where the app serves btcchannel's protocol (the 402 names it, under the request's origin)
        self.protocol_path = protocol_path.rstrip("/")
        self._app: ASGIApp | None = None
        self._table: _PriceTable | None = None
        if max_body_bytes is not None:
            self.max_body_bytes = max_body_bytes

    def costs(self, price_sat: int) -> Callable[[], Awaitable[None]]:
        """A FastAPI dependency that prices its route: ``@api.get(path, dependencies=[Depends(paid.costs(250))])``.

        The price is read from the route when the gate is attached; at request time the dependency
        refuses (an exception: answered 500, nothing served) a request the gate did not admit for
        that price, e.g. when the app runs without :meth:`wrap`."""
        if price_sat < 1:
            raise ValueError("a paid route costs at least 1 sat")

        async def btcchannel_price() -> None:
            if _ADMITTED.get() != price_sat:
                raise RuntimeError(f"this route costs {price_sat} sat: serve the app wrapped by PaidRoutes.wrap()")

        setattr(btcchannel_price, _PRICE_ATTR, price_sat)
        return btcchannel_price

    def attach(self, gate: PaymentGate) -> None:
        """Use ``gate`` (once the payee service runs): every price is checked against its unit price
        and, once :meth:`wrap` has been called, against the app's routes (ValueError for a price
        that matches no route)."""
        if self._app is not None:
            self._table = _PriceTable.build(self._app, self.prices)
            prices = self._table.all_prices()
        else:
            prices = list(self.prices.values())
        for price in prices:
            gate.units_for(price)
        self._gate = gate

    def price(self, method: str, path: str, root_path: str = "") -> int | None:
        """The price of ``method path`` (as the app would route it), or None for a free route."""
        scope = {"type": "http", "method": method.upper(), "path": path, "root_path": root_path, "headers": []}
        found = self._prices().lookup(scope)
        return found if isinstance(found, int) else None

    def _prices(self) -> _PriceTable:
        if self._table is None:
            self._table = _PriceTable.build(self._app, self.prices)
        return self._table

    def wrap(self, app: ASGIApp) -> ASGIApp:
        """``app`` behind the gate."""
        self._app = app
        self._table = None

        async def gated(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "websocket" and self._prices().lookup(scope) is not None:
                await send({"type": "websocket.close", "code": 1008})  # priced (a mount): never served unpaid
                return
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            price = self._prices().lookup(scope)
            if price is None:
                await app(scope, receive, send)
                return
            if price is _UNROUTED:
                await _send_json(send, GateAnswer(404, {"error": {"code": "bad_request", "message": "no such route"}}))
                return
            if self._gate is None:
                raise RuntimeError("PaidRoutes: no payee service attached (call attach() in the lifespan)")
            assert isinstance(price, int)
            await self._serve(self._gate, app, scope, receive, send, price)

        return gated

    async def _serve(
        self, gate: PaymentGate, app: ASGIApp, scope: Scope, receive: Receive, send: Send, price: int
    ) -> None:
        headers = _Headers((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope.get("headers", []))
        target = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        if scope.get("query_string"):
            target += "?" + scope["query_string"].decode("latin-1")
        origin = f"{scope.get('scheme', 'http')}://{headers.get('host') or 'localhost'}"
        if self.protocol_path:
            origin += scope.get("root_path", "") + self.protocol_path
        read = await _read_body(receive, self.max_body_bytes)  # auth v2 covers it; the app receives it as sent
        if read is None:
            await _send_json(
                send,
                GateAnswer(
                    413,
                    {
                        "error": {
                            "code": "too_large",
                            "message": f"a paid request's body is limited to {self.max_body_bytes} bytes",
                        }
                    },
                ),
            )
            return
        body, receive = read
        client = scope.get("client")
        admitted = await gate.admit(
            scope["method"],
            target,
            headers,
            gate.units_for(price),
            origin,
            body=body,
            peer=client[0] if client else None,
        )
        if isinstance(admitted, GateAnswer):
            await _send_json(send, admitted)
            return
        charge: Charge = admitted
        started = False

        async def charged_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start" and not started:
                started = True
                extra = await gate.served(charge, int(message["status"]))
                message = {
                    **message,
                    "headers": [
                        *message.get("headers", []),
                        *((k.lower().encode(), v.encode()) for k, v in extra.items()),
                    ],
                }
            await send(message)

        token = _ADMITTED.set(price)
        try:
            await app(scope, receive, charged_send)
        except BaseException:
            if not started:  # nothing was served
                await gate.failed(charge)
            raise
        finally:
            _ADMITTED.reset(token)


#: the price the gate admitted the request in this context for (what ``costs()`` checks)
_ADMITTED: contextvars.ContextVar[int | None] = contextvars.ContextVar("btcchannel_admitted", default=None)
_PRICE_ATTR = "__btcchannel_price_sat__"
#: a path under a priced prefix that no route of the app matches
_UNROUTED = object()


def _template_regex(template: str) -> re.Pattern[str]:
    """``/items/{item_id}`` as a regex (``{name:path}`` takes the rest of the path)."""
    out, pos = "", 0
    for m in re.finditer(r"{([^}:]+)(?::([^}]+))?}", template):
        out += re.escape(template[pos : m.start()]) + (".*" if m.group(2) == "path" else "[^/]+")
        pos = m.end()
    return re.compile("^" + out + re.escape(template[pos:]) + "$")


def _route_path(scope: Scope) -> str:
    """The path without ``root_path`` (as Starlette's routers see it)."""
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if root and (path == root or path.startswith(root + "/")):
        return path[len(root) :] or "/"
    return path


def _route_prices(route: Any) -> dict[str, int]:
    """Prices a FastAPI route carries as ``costs()`` dependencies ({"*": price})."""
    calls = [getattr(d, "dependency", None) for d in getattr(route, "dependencies", None) or []]
    dependant = getattr(route, "dependant", None)
    calls += [getattr(d, "call", None) for d in getattr(dependant, "dependencies", None) or []]
    found = {getattr(c, _PRICE_ATTR) for c in calls if c is not None and hasattr(c, _PRICE_ATTR)}
    if len(found) > 1:
        raise ValueError(f"route {getattr(route, 'path', route)!r} carries several prices: {sorted(found)}")
    return {"*": found.pop()} if found else {}


@dataclass
class _PriceTable:
    """The prices resolved against an app: per route object (a router), else per template regex."""

    by_route: dict[int, dict[str, int]]
    routes: list[Any] | None
    by_regex: list[tuple[re.Pattern[str], str, int]]
    prefixes: list[str]

    @classmethod
    def build(cls, app: Any, prices: Mapping[tuple[str, str], int]) -> _PriceTable:
        routes = _app_routes(app)
        prefixes = [_prefix(t) for _m, t in prices]
        if routes is None:
            return cls(
                {},
                None,
                [(_template_regex(t), m, v) for (m, t), v in prices.items()],
                sorted({p for p in prefixes if p}),
            )
        by_route: dict[int, dict[str, int]] = {}
        flat = list(_walk(routes, ""))
        for template, route in flat:
            for method, price in _route_prices(route).items():
                by_route.setdefault(id(route), {})[method] = price
                prefixes.append(_prefix(template))
        for (method, template), price in prices.items():
            hits = [r for t, r in flat if t == template and (method == "*" or _allows(r, method))]
            if not hits:
                known = ", ".join(sorted({t for t, _r in flat})) or "none"
                raise ValueError(f"no route of the app matches the price for {method} {template!r} (routes: {known})")
            for route in hits:
                if _is_websocket(route):
                    raise ValueError(f"{template!r} is a websocket route: the gate meters HTTP requests only")
                by_route.setdefault(id(route), {})[method] = price
        return cls(by_route, routes, [], sorted({p for p in prefixes if p}))

    def all_prices(self) -> list[int]:
        return [p for table in self.by_route.values() for p in table.values()] + [p for _r, _m, p in self.by_regex]

    def lookup(self, scope: Scope) -> int | object | None:
        """The price of the request in ``scope``; :data:`_UNROUTED` for an unknown path under a
        priced prefix; None when it is free."""
        method = scope.get("method", "GET")
        if self.routes is not None:
            chain = _find(self.routes, scope)
            if chain:
                if not _allows(chain[-1], method):
                    return None  # the app answers 405 without running a handler
                for route in reversed(chain):  # the innermost price wins; a priced mount covers its routes
                    price = _method_price(self.by_route.get(id(route), {}), method)
                    if price is not None:
                        return price
                return None
        else:
            path = _route_path(scope)
            hits = {m: p for rx, m, p in self.by_regex if rx.match(path)}
            if hits:
                return _method_price(hits, method)
        path = _route_path(scope)
        if any(path.startswith(p + "/") for p in self.prefixes):
            return _UNROUTED
        return None


def _prefix(template: str) -> str:
    """The fixed part of a template with parameters (``/items`` of ``/items/{item_id}``), else ''."""
    return template.split("{", 1)[0].rstrip("/") if "{" in template else ""


def _method_price(table: Mapping[str, int], method: str) -> int | None:
    method = method.upper()
    if method in table:
        return table[method]
    if method == "HEAD" and "GET" in table:
        return table["GET"]
    return table.get("*")


def _app_routes(app: Any) -> list[Any] | None:
    """The routes of a Starlette/FastAPI app (or router), else None."""
    routes = getattr(app, "routes", None)
    if routes is None:
        routes = getattr(getattr(app, "router", None), "routes", None)
    return list(routes) if isinstance(routes, (list, tuple)) else None


def _is_websocket(route: Any) -> bool:
    """Whether ``route`` is a websocket route (Starlette's, or FastAPI's subclass of it)."""
    return any(cls.__name__ == "WebSocketRoute" for cls in type(route).__mro__)


def _allows(route: Any, method: str) -> bool:
    methods = getattr(route, "methods", None)
    return not methods or method.upper() in methods


def _walk(routes: list[Any], prefix: str) -> Iterator[tuple[str, Any]]:
    """(full template, route) of every route, mounts and their routes included."""
    for route in routes:
        path = getattr(route, "path", None)
        if not isinstance(path, str):
            continue
        yield prefix + path, route
        sub = _sub_routes(route)
        if sub:
            yield from _walk(sub, prefix + path)


def _sub_routes(route: Any) -> list[Any]:
    try:
        sub = getattr(route, "routes", None)
    except Exception:  # noqa: BLE001 - a mount whose app has no routes
        return []
    return list(sub) if isinstance(sub, (list, tuple)) else []


def _find(routes: list[Any], scope: Scope) -> list[Any]:
    """The routes the router goes through for ``scope``, outermost first (the first full match,
    else the first partial; a mount, then the route inside it); [] when none matches."""
    partial: list[Any] = []
    for route in routes:
        matches = getattr(route, "matches", None)
        if matches is None:
            continue
        match, child = matches(scope)
        name = getattr(match, "name", str(match))
        if name == "FULL":
            sub = _sub_routes(route)
            return [route, *(_find(sub, {**scope, **child}) if sub else [])]
        if name == "PARTIAL" and not partial:
            partial = [route]
    return partial


async def _read_body(receive: Receive, limit: int) -> tuple[bytes, Receive] | None:
    """The request's whole body, and a ``receive`` that hands it to the app as one message (then
    whatever the server sends next, e.g. ``http.disconnect``); None once it passes ``limit`` bytes
    (nothing more is read: memory stays bounded whatever a client sends)."""
    chunks: list[bytes] = []
    size = 0
    first: Message | None = None
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client left: the app sees that, after the body
            first = message
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]
    if first is not None:
        pending.append(first)

    async def replay() -> Message:
        return pending.pop(0) if pending else await receive()

    return body, replay


async def _send_json(send: Send, answer: GateAnswer) -> None:
    body = json.dumps(answer.body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((k.lower().encode(), v.encode()) for k, v in answer.headers.items()),
    ]
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
