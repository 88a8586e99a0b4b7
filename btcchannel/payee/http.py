"""The payee's HTTP service (aiohttp): the endpoints of ``docs/PROTOCOL.md`` over a
:class:`~btcchannel.payee.service.PayeeService`.

Entry points (what the CLI calls)::

    def create_app(config: ServerConfig, store: PayeeStore, node: Node,
                   *, run_watcher: bool = True) -> aiohttp.web.Application
        # every endpoint of the protocol; assembles service, closer and watcher
        # (app[SERVICE], app[CLOSER], app[WATCHER]); the watcher runs as a background task
        # of the app once this instance holds the store's leader lock (always on SQLite; on
        # PostgreSQL one instance at a time: the others take over when it dies)
        # (run_watcher=False: tests drive ``app[WATCHER].step()`` themselves); the tip
        # follower (app[WATCHER].follow_tip) always runs

    async def serve(config: ServerConfig, node: Node, *,
                    ready: Callable[[str], None] | None = None,
                    app_hook: Callable[[web.Application], None] | None = None) -> None
        # opens the store (<datadir>/payee.db, or config.store_url: postgresql://...), binds host:port (port 0: a
        # free one), writes
        # <datadir>/server.json {"url": ...}, calls ready(url), runs until cancelled
        # (e.g. SIGINT/SIGTERM), then shuts down cleanly. app_hook may add routes
        # (metered.add_file_route, an application's own paid handlers).

    def main(argv: list[str] | None = None) -> None
        # python -m btcchannel.payee CONFIG.json : {"config": {ServerConfig fields},
        #   "node": {"url": ..., "cookie_file": ..., "wallet": ...}, "file": optional path to sell,
        #   "backup_db": optional path of the backup (payee.backup), "backup_async": false}

Errors leave as ``{"error": {"code", "message"}}`` with the code's HTTP status; bad input
never yields a 500. Errors that are not the client's (the node's, the payee's own bugs)
are logged and answered ``internal``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from btcchannel.bitcoind.rpc import Node
from btcchannel.core.state import ChannelState
from btcchannel.errors import (
    BadRequest,
    ChannelError,
    CloseUneconomic,
    IllegalTransition,
    InternalError,
    NodeError,
    NotExpired,
    NotOpen,
    ProtocolViolation,
    TooLarge,
)
from btcchannel.logs import hold_back_repeats
from btcchannel.payee.appkeys import CLIENT_ERRORS, CLOSER, SERVICE, WATCHER
from btcchannel.payee.clientlog import ClientErrorLog
from btcchannel.payee.closer import Closer, is_uneconomic
from btcchannel.payee.config import ServerConfig
from btcchannel.payee.leadership import Leadership
from btcchannel.payee.metered import add_file_route
from btcchannel.payee.metrics import METRICS
from btcchannel.payee.service import PayeeService
from btcchannel.payee.shared import ChainTip
from btcchannel.payee.watcher import Watcher
from btcchannel.store import PayeeStore, open_payee_store
from btcchannel.wire import channel_object, check_channel_id, parse_body

__all__ = [
    "SERVICE",
    "CLOSER",
    "WATCHER",
    "ClientFault",
    "app_runner",
    "create_app",
    "serve",
    "main",
    "read_body",
    "error_response",
]

log = logging.getLogger("btcchannel.payee.http")

#: errors that are not the client's: logged, answered ``internal``
_INTERNAL: tuple[type[ChannelError], ...] = (NodeError, ProtocolViolation, IllegalTransition)
#: errors that mean, to the client, that the channel takes no payment or close now
_NOT_OPEN: tuple[type[ChannelError], ...] = (NotExpired, CloseUneconomic)

#: how often an instance that does not run the watcher retries the leader lock (at most)
LEAD_RETRY_S = 1.0

#: after answering a request whose body was not read whole (too large, too slow), the payee drains
#: what else the client sends for at most this long (so it can read the answer), then closes
LINGER_S = 1.0

#: an instance that lost the leader lock tries to take it again only after this long
LOST_LEAD_BACKOFF_S = 5.0

#: how long POST .../close waits for the close's broadcast so the answer can carry close_txid
CLOSE_WAIT_S = 10.0


def error_response(err: ChannelError) -> web.Response:
    """The protocol's error body with the code's status."""
    return web.json_response(err.to_json(), status=err.http_status)


class ClientFault(Exception):
    """The client did not send its request body (it went away, or was too slow): answered
    ``bad_request`` (if anyone still listens), counted and logged at INFO by :class:`ClientErrorLog`,
    and the connection closed."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind


async def read_body(request: web.Request, limit: int, timeout_s: float | None = None) -> bytes:
    """The whole request body, whatever its framing (a length, chunks, several TCP segments),
    ``TooLarge`` beyond ``limit`` bytes (reading no further than one byte past it). A body that
    does not arrive whole within ``timeout_s`` seconds, or is cut short by a disconnect or broken
    framing, is a :class:`ClientFault`."""
    if request.content_length is not None and request.content_length > limit:
        raise TooLarge(f"request body over {limit} bytes")
    try:
        async with asyncio.timeout(timeout_s):
            return await _read_all(request, limit)
    except TimeoutError:
        raise ClientFault(f"request body not received within {timeout_s:g} s", "body_timeout") from None
    except (ConnectionError, HttpProcessingError, asyncio.IncompleteReadError) as exc:
        raise ClientFault(f"request body incomplete: {type(exc).__name__}", "body_incomplete") from None


async def _read_all(request: web.Request, limit: int) -> bytes:
    parts: list[bytes] = []
    total = 0
    while True:
        chunk = await request.content.read(limit + 1 - total)
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)
        total += len(chunk)
        if total > limit:
            raise TooLarge(f"request body over {limit} bytes")


def _body(request: web.Request) -> Awaitable[bytes]:
    cfg = request.app[SERVICE].config
    return read_body(request, cfg.max_body_bytes, cfg.body_timeout_s)


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except ClientFault as err:
        request.app[CLIENT_ERRORS].client_error(err.kind, f"{request.method} {request.path}: {err.message}")
        response = error_response(BadRequest(err.message))
        response.force_close()
        return response
    except _INTERNAL as err:
        log.warning("%s %s: %s", request.method, request.path, err)
        return error_response(InternalError(err.message))
    except _NOT_OPEN as err:
        return error_response(NotOpen(err.message))
    except ChannelError as err:
        return error_response(err)
    except web.HTTPException as exc:
        if exc.status == 413:
            return error_response(TooLarge("request body too large"))
        if exc.status in (404, 405):
            return web.json_response(
                {"error": {"code": "bad_request", "message": f"no such endpoint: {request.method} {request.path}"}},
                status=exc.status,
            )
        raise
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        return error_response(InternalError("internal error"))


# ----------------------------------------------------------------------------- routes


async def _info(request: web.Request) -> web.Response:
    return web.json_response(request.app[SERVICE].info())


async def _propose(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    body = parse_body(
        await _body(request),
        ("payer_pubkey", "deposit_sat", "expiry_height", "payer_script"),
        ("max_units", "max_total_sat", "terms", "script_version", "stateless"),
    )
    client = svc.config.client_address(request.remote, request.headers.getall("X-Forwarded-For", []))
    return web.json_response(svc.propose(body, client=client), status=201)


async def _funding(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    cid = check_channel_id(request.match_info["cid"])
    body = parse_body(await _body(request), ("txid", "vout"), ("proposal_token",))
    client = svc.config.client_address(request.remote, request.headers.getall("X-Forwarded-For", []))
    return web.json_response(await svc.register_funding(cid, body, client=client))


async def _payment(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    cid = check_channel_id(request.match_info["cid"])
    body = parse_body(await _body(request), ("amount_sat", "signature"))
    # the hot path: orjson, and no charset negotiation (JSON is UTF-8)
    return web.Response(body=orjson.dumps(await svc.pay(cid, body)), content_type="application/json")


async def _get_channel(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    cid = check_channel_id(request.match_info["cid"])
    return web.json_response(channel_object(svc.store.get(cid)))


async def _close(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    closer = request.app[CLOSER]
    cid = check_channel_id(request.match_info["cid"])
    body = parse_body(await _body(request), ("signature",))
    rec = svc.close_request(cid, body)
    # give the broadcast (ours, or another process's that won the claim) up to CLOSE_WAIT_S
    # so the answer can carry close_txid
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CLOSE_WAIT_S
    while (
        rec.state is ChannelState.CLOSING
        and rec.close_txid is None
        and rec.signature is not None
        and not is_uneconomic(rec)
        and loop.time() < deadline
    ):
        done = asyncio.ensure_future(closer.close_done(cid))
        try:  # asyncio.wait, not wait_for: it never swallows a cancellation of this handler
            await asyncio.wait({done}, timeout=0.05)
        finally:
            done.cancel()
        rec = svc.store.get(cid)
        if done.done() and not done.cancelled():
            break  # our own broadcast attempt is over (failed ones are retried by the watcher)
    return web.json_response(channel_object(rec))


# ----------------------------------------------------------------------------- the app


async def _lead(config: ServerConfig, leadership: Leadership, watcher: Watcher) -> None:
    """Run the watcher (and with it the closer's rounds) while this instance holds the store's leader
    lock (always, on SQLite); until then, and again once it is lost (after ``LOST_LEAD_BACKOFF_S``,
    so that another instance, whose database session is healthy, takes it first), retry the lock
    every poll interval (at most a second). The watcher's run ends when the lock is lost."""
    interval = min(config.poll_interval_s, LEAD_RETRY_S)
    while True:
        await leadership.acquire(interval)
        await watcher.run()
        await asyncio.sleep(LOST_LEAD_BACKOFF_S)  # (its session died: let a healthy instance take over first)


def create_app(config: ServerConfig, store: PayeeStore, node: Node, *, run_watcher: bool = True) -> web.Application:
    """The payee's aiohttp application: service, closer and watcher (its background task)."""
    app = web.Application(middlewares=[_errors], client_max_size=config.max_body_bytes)
    app[CLIENT_ERRORS] = ClientErrorLog()
    tip = ChainTip()
    leadership = Leadership(store)
    closer = Closer(config, store, node, leadership=leadership)
    watcher = Watcher(config, store, node, closer, tip)
    app[SERVICE] = PayeeService(config, store, node, closer, tip)
    app[CLOSER] = closer
    app[WATCHER] = watcher
    app.router.add_get("/v1/info", _info)
    app.router.add_post("/v1/channels", _propose)
    app.router.add_post("/v1/channels/{cid}/funding", _funding)
    app.router.add_post("/v1/channels/{cid}/payments", _payment)
    app.router.add_get("/v1/channels/{cid}", _get_channel)
    app.router.add_post("/v1/channels/{cid}/close", _close)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        hold_back_repeats()  # the library's repeated warnings, whoever set up logging
        for warning in config.warnings():
            log.warning("configuration: %s", warning)
        await closer.start()
        await watcher.start()
        tasks = [asyncio.ensure_future(watcher.follow_tip())]
        if run_watcher:
            tasks.append(asyncio.ensure_future(_lead(config, leadership, watcher)))
        yield
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await closer.aclose()

    app.cleanup_ctx.append(lifecycle)
    return app


def app_runner(app: web.Application, config: ServerConfig) -> web.AppRunner:
    """The runner of a payee's app with its bounds on what a client may send: headers complete within
    ``header_timeout_s`` of a connection's opening or last answer (aiohttp's keep-alive timeout),
    ``max_header_bytes`` per line and field, ``max_headers`` fields, at most ``LINGER_S`` spent
    draining a body left unread after the answer; aiohttp's reports of malformed requests go to
    the app's :class:`ClientErrorLog` (counted, INFO, rate-limited)."""
    return web.AppRunner(
        app,
        access_log=None,
        keepalive_timeout=config.header_timeout_s,
        max_line_size=config.max_header_bytes,
        max_field_size=config.max_header_bytes,
        max_headers=config.max_headers,
        logger=app[CLIENT_ERRORS],
        lingering_time=LINGER_S,
    )


async def serve(
    config: ServerConfig,
    node: Node,
    *,
    ready: Callable[[str], None] | None = None,
    app_hook: Callable[[web.Application], None] | None = None,
) -> None:
    """Run the payee's service on ``config.host:config.port`` until cancelled."""
    config.datadir.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = open_payee_store(config.store_target)
    app = create_app(config, store, node)
    if app_hook is not None:
        app_hook(app)
    runner = app_runner(app, config)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port)
        await site.start()
        server = site._server
        assert server is not None and hasattr(server, "sockets")
        port = server.sockets[0].getsockname()[1]
        url = f"http://{config.host}:{port}"
        tmp = config.datadir / "server.json.tmp"
        metrics = app.get(METRICS)
        tmp.write_text(
            json.dumps({"url": url, "pid": os.getpid(), "metrics_url": metrics.url if metrics is not None else None})
        )
        os.replace(tmp, config.datadir / "server.json")
        log.info("payee service on %s", url)
        if ready is not None:
            ready(url)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        store.close()
        _remove_own_record(config.datadir / "server.json")


def _remove_own_record(path: Path) -> None:
    """Remove ``server.json`` if this process wrote it (a newer process may have replaced it)."""
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> None:
    """``python -m btcchannel.payee CONFIG.json``: run a payee service (SIGTERM/SIGINT stop it cleanly)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m btcchannel.payee CONFIG.json")
    spec = json.loads(Path(args[0]).read_text())
    config = ServerConfig.from_json(spec["config"])
    n = spec["node"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per RPC call

    async def run() -> None:
        node = Node(
            n["url"],
            cookie_file=Path(n["cookie_file"]) if n.get("cookie_file") else None,
            auth=tuple(n["auth"]) if n.get("auth") else None,
            wallet=n.get("wallet"),
        )

        def hook(app: web.Application) -> None:
            if spec.get("file"):
                add_file_route(app, Path(spec["file"]), chunk_size=int(spec.get("chunk_size", 1024)))
            if spec.get("backup_db"):
                from btcchannel.payee.backup import install_backup

                install_backup(
                    app, config.db_path, Path(spec["backup_db"]), synchronous=not spec.get("backup_async", False)
                )

        task = asyncio.ensure_future(serve(config, node, app_hook=hook))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await node.aclose()

    asyncio.run(run())
