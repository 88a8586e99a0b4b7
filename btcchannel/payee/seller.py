"""A seller in one object: :class:`PaidService` finds the node as the command line does, opens the
payee's store, and mounts btcchannel's protocol in the seller's own app, on the same port.

aiohttp::

    service = PaidService(price_sat=1)              # the node of `btcchannel --wallet payee serve`

    @service.paid(price_sat=250)
    async def answer(request: web.Request) -> web.Response: ...

    app = web.Application()
    app.router.add_get("/answer", answer)
    service.mount(app)                               # the protocol at /btc/v1/...
    web.run_app(app, port=8080)

ASGI (FastAPI, Starlette)::

    service = PaidService(price_sat=1)
    api = FastAPI()
    ...
    app = service.asgi(api, {"/answer": 250})        # uvicorn module:app

The node and the payee's state are found as ``btcchannel serve`` finds them: ``network``,
``datadir``, ``wallet`` (default ``payee``), ``rpc_url``/``rpc_cookie``/``rpc_user``/
``rpc_password``, ``bitcoin_datadir``/``bitcoin_conf``, else the ``BTCCHANNEL_<NAME>`` environment
variables, else the ``config`` file's ``[global]`` table (its ``[serve]`` table gives the terms:
``price-sat``, ``mode``, ``credit-limit-sat``...), else the defaults; on regtest a node left
running by ``btcchannel regtest start`` is found too. Other :class:`ServerConfig` fields are
keyword arguments. Off regtest a seller needs ``public_url`` (``public-url`` in ``[serve]``): where
buyers reach the protocol, e.g. ``https://api.example/btc``; the 402's URLs are built from it, never
from a buyer's ``Host`` header (unless ``trust_host_header``).

Under ASGI the protocol's requests are handed to btcchannel's aiohttp service, which listens on a
loopback port of its own; the buyer only ever sees the seller's port.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from btcchannel.bitcoind.locate import default_datadir, find_node
from btcchannel.bitcoind.rpc import Node
from btcchannel.payee.asgi import ASGIApp, Message, PaidRoutes, Receive, Scope, Send
from btcchannel.payee.config import ServerConfig
from btcchannel.payee.gate import PaymentGate
from btcchannel.payee.http import create_app
from btcchannel.payee.sell import Handler, Seller
from btcchannel.store import open_payee_store

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["PaidService", "read_config_file"]

#: the node options of the command line's [global] table, as PaidService's arguments
_GLOBAL = {
    "network": "network",
    "datadir": "datadir",
    "wallet": "wallet",
    "rpc-url": "rpc_url",
    "rpc-cookie": "rpc_cookie",
    "rpc-user": "rpc_user",
    "rpc-password": "rpc_password",
    "bitcoin-datadir": "bitcoin_datadir",
    "bitcoin-conf": "bitcoin_conf",
}
_GLOBAL_OTHER = frozenset({"json", "verbose", "log-json", "payer-backup"})
#: the terms of the command line's [serve] table, as ServerConfig fields
_SERVE = {
    "price-sat": "price_sat",
    "mode": "mode",
    "credit-limit-sat": "credit_limit_sat",
    "payment-timeout": "payment_timeout_s",
    "idle-timeout": "idle_timeout_s",
    "close-margin-blocks": "close_margin_blocks",
    "min-confirmations": "min_confirmations",
    "payee-address": "payee_address",
    "store": "store_url",
    "public-url": "public_url",
    "trust-host-header": "trust_host_header",
}
_SERVE_OTHER = frozenset({"host", "port", "serve-file", "chunk-size", "metrics", "backup-db", "backup-interval"})
#: the header by which the ASGI side tells btcchannel's service the buyer's address
_CLIENT_HEADER = "X-Btcchannel-Client"
_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "upgrade", "host", "content-length", _CLIENT_HEADER.lower()}
)


def read_config_file(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The node options (``[global]``) and the service's fields (``[serve]``) of a ``--config``
    file, as :class:`PaidService`'s arguments; ValueError for a missing file or an unknown key."""
    try:
        with Path(path).open("rb") as f:
            doc = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the config file: {exc}") from exc
    node: dict[str, Any] = {}
    for key, value in (doc.get("global") or {}).items():
        if key in _GLOBAL:
            node[_GLOBAL[key]] = value
        elif key not in _GLOBAL_OTHER:
            raise ValueError(f"{path}: [global] {key}: unknown key")
    fields: dict[str, Any] = {}
    for key, value in (doc.get("serve") or {}).items():
        if key in _SERVE:
            fields[_SERVE[key]] = value
        elif key not in _SERVE_OTHER:
            raise ValueError(f"{path}: [serve] {key}: unknown key")
    return node, fields


class PaidService:
    """btcchannel's payee service inside a seller's own app (aiohttp or ASGI), found as the CLI finds it."""

    def __init__(
        self,
        *,
        network: str | None = None,
        datadir: str | Path | None = None,
        config: str | Path | None = None,
        wallet: str | None = None,
        rpc_url: str | None = None,
        rpc_cookie: str | Path | None = None,
        rpc_user: str | None = None,
        rpc_password: str | None = None,
        bitcoin_datadir: str | Path | None = None,
        bitcoin_conf: str | Path | None = None,
        protocol_path: str = "/btc",
        node: Node | None = None,
        **fields: Any,
    ) -> None:
        given = {
            "network": network,
            "datadir": datadir,
            "wallet": wallet,
            "rpc_url": rpc_url,
            "rpc_cookie": rpc_cookie,
            "rpc_user": rpc_user,
            "rpc_password": rpc_password,
            "bitcoin_datadir": bitcoin_datadir,
            "bitcoin_conf": bitcoin_conf,
        }
        config = config or os.environ.get("BTCCHANNEL_CONFIG")
        from_file, file_fields = read_config_file(Path(config)) if config else ({}, {})
        opts: dict[str, Any] = {
            k: v if v is not None else os.environ.get(f"BTCCHANNEL_{k.upper()}", from_file.get(k))
            for k, v in given.items()
        }
        net = str(opts["network"] or "regtest")
        root = Path(opts["datadir"]).expanduser() if opts["datadir"] else default_datadir()
        self.config = ServerConfig(datadir=root / net, network=net, **{**file_fields, **fields})
        self.protocol_path = "/" + protocol_path.strip("/")
        cfg = self.config
        if cfg.price_sat > 0 and net != "regtest" and cfg.public_url is None and not cfg.trust_host_header:
            # (config.host is the internal loopback listener here, not where the seller's app is reached)
            raise ValueError(
                f"a seller on {net} needs public_url: where buyers reach the protocol (e.g. "
                f"https://api.example{self.protocol_path}); the 402's URLs are built from it, never "
                "from a request's Host header (or trust_host_header=True behind a proxy that sets it)"
            )

        def as_path(v: Any) -> Path | None:
            return Path(v).expanduser() if v else None

        self.node = node or find_node(
            net,
            wallet=opts["wallet"] or "payee",
            rpc_url=opts["rpc_url"],
            rpc_cookie=as_path(opts["rpc_cookie"]),
            rpc_user=opts["rpc_user"],
            rpc_password=opts["rpc_password"],
            bitcoin_datadir=as_path(opts["bitcoin_datadir"]),
            bitcoin_conf=as_path(opts["bitcoin_conf"]),
            regtest_dirs=(root / "regtest-node", default_datadir() / "regtest-node"),
        )
        self._own_node = node is None
        self.config.datadir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.store = open_payee_store(self.config.store_target)
        #: btcchannel's aiohttp application (the protocol, the watcher and the closer)
        self.payee_app = create_app(self.config, self.store, self.node)
        self._token = secrets.token_hex(16)
        self.payee_app.middlewares.append(_client_address(self._token))
        self._seller = Seller(self.payee_app, protocol_path=self.protocol_path)
        #: the ASGI app's prices (set by :meth:`asgi`)
        self.routes = PaidRoutes(protocol_path=self.protocol_path)
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._internal_url = ""

    # -- aiohttp -------------------------------------------------------------------------
    @property
    def gate(self) -> PaymentGate:
        """The payment gate of this service."""
        return self._seller.gate

    def paid(self, price_sat: int) -> Callable[[Handler], Handler]:
        """Decorator for an aiohttp handler: it runs only once ``price_sat`` is paid (see :class:`Seller`)."""
        return self._seller.paid(price_sat)

    def mount(self, app: web.Application) -> None:
        """Serve the protocol in ``app`` under :attr:`protocol_path`; the service starts and stops with ``app``."""
        app.add_subapp(self.protocol_path, self.payee_app)
        app.on_cleanup.append(self._cleanup)

    async def _cleanup(self, _app: web.Application | None = None) -> None:
        self.store.close()
        if self._own_node:
            await self.node.aclose()

    # -- ASGI ----------------------------------------------------------------------------
    def asgi(self, app: ASGIApp, prices: Mapping[str | tuple[str, str], int] | None = None) -> ASGIApp:
        """``app`` with its priced routes gated (``prices`` keyed by route template, and any
        ``Depends(service.costs(...))``), the protocol under :attr:`protocol_path`, and the service
        started and stopped by the app's lifespan."""
        self.routes = PaidRoutes(prices, protocol_path=self.protocol_path)
        gated = self.routes.wrap(app)
        prefix = self.protocol_path

        async def serve(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "lifespan":
                await self._lifespan(gated, scope, receive, send)
                return
            if scope["type"] == "http":
                path = _route_path(scope)
                if path == prefix or path.startswith(prefix + "/"):
                    await self._forward(scope, receive, send, path[len(prefix) :] or "/")
                    return
            await gated(scope, receive, send)

        return serve

    def costs(self, price_sat: int) -> Callable[[], Awaitable[None]]:
        """A FastAPI dependency pricing its route (see :meth:`PaidRoutes.costs`)."""
        return self.routes.costs(price_sat)

    async def start(self) -> None:
        """Start btcchannel's service (what the ASGI lifespan does): the protocol on a loopback port."""
        self._runner = web.AppRunner(self.payee_app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        host, port = self._runner.addresses[0][:2]
        self._internal_url = f"http://{host}:{port}"
        self._session = aiohttp.ClientSession(auto_decompress=False)
        self.routes.attach(self.gate)

    async def stop(self) -> None:
        """Stop btcchannel's service and close the store."""
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()
        await self._cleanup()

    async def _lifespan(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        failed: list[BaseException] = []

        async def rcv() -> Message:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                try:
                    await self.start()
                except Exception as exc:  # noqa: BLE001 - reported to the server as a failed startup
                    failed.append(exc)
            return msg

        async def snd(msg: Message) -> None:
            if msg["type"] == "lifespan.startup.complete" and failed:
                msg = {"type": "lifespan.startup.failed", "message": f"btcchannel: {failed[0]}"}
            elif msg["type"] == "lifespan.shutdown.complete":
                await self.stop()
            await send(msg)

        await app(scope, rcv, snd)

    async def _forward(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        """A protocol request handed to btcchannel's service, its answer sent back as it is."""
        if self._session is None:
            raise RuntimeError("PaidService: not started (serve the app with its lifespan)")
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if len(body) > self.config.max_body_bytes or not msg.get("more_body"):
                break
        headers = {
            k.decode("latin-1"): v.decode("latin-1")
            for k, v in scope.get("headers", [])
            if k.decode("latin-1").lower() not in _HOP
        }
        client = scope.get("client")
        headers[_CLIENT_HEADER] = f"{self._token} {client[0] if client else ''}"
        url = (
            self._internal_url
            + path
            + ("?" + scope["query_string"].decode("latin-1") if scope.get("query_string") else "")
        )
        try:
            async with self._session.request(scope["method"], url, headers=headers, data=body) as resp:
                data = await resp.read()
                out = [
                    (k.lower().encode("latin-1"), v.encode("latin-1"))
                    for k, v in resp.headers.items()
                    if k.lower() not in _HOP
                ]
                status = resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError):
            status, data, out = (
                502,
                b'{"error": {"code": "internal", "message": "payee service unreachable"}}',
                [(b"content-type", b"application/json")],
            )
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [*out, (b"content-length", str(len(data)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": data})


def _client_address(token: str) -> Any:
    """A middleware of btcchannel's app: a request the ASGI side handed over (it carries this
    process's ``token``) is seen from the buyer's address, so per-client limits apply per buyer."""

    @web.middleware
    async def client_address(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        claimed = request.headers.get(_CLIENT_HEADER)
        if claimed is not None:
            given, _, address = claimed.partition(" ")
            if secrets.compare_digest(given, token) and address:
                request = request.clone(remote=address)
        return await handler(request)

    return client_address


def _route_path(scope: Scope) -> str:
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if root and (path == root or path.startswith(root + "/")):
        return path[len(root) :] or "/"
    return path
