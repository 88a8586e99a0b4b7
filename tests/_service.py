"""Helpers shared by the service tests: a payee service on a real loopback port, a payer client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

from aiohttp import web

from btcchannel.payer.client import PayerClient
from btcchannel.bitcoind.rpc import Node
from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.payee.config import ServerConfig
from btcchannel.payee.http import SERVICE, create_app
from btcchannel.payee.service import PayeeService
from btcchannel.store import PayeeStore


def node_for(bitcoind: RegtestNode, wallet: str | None) -> Node:
    return Node(bitcoind.rpc_url, cookie_file=bitcoind.cookie_file, wallet=wallet)


def fast_config(datadir: Path, **kw: Any) -> ServerConfig:
    base = dict(poll_interval_s=0.05, min_lifetime_blocks=6, close_margin_blocks=3, min_deposit_sat=10_000,
                close_fee_rate_sat_vb=2.0)
    base.update(kw)
    return ServerConfig(datadir=datadir, **base)


class Running:
    """A payee service on 127.0.0.1:<free port>."""

    def __init__(self, app: web.Application, runner: web.AppRunner, url: str, store: PayeeStore) -> None:
        self.app, self.runner, self.url, self.store = app, runner, url, store

    @property
    def svc(self) -> PayeeService:
        return self.app[SERVICE]

    async def stop(self) -> None:
        await self.runner.cleanup()
        self.store.close()


async def start_server(
    config: ServerConfig, node: Node, hook: Callable[[web.Application], None] | None = None,
    run_watcher: bool = True, port: int = 0,
) -> Running:
    store = PayeeStore(config.db_path)
    app = create_app(config, store, node, run_watcher=run_watcher)
    if hook is not None:
        hook(app)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return Running(app, runner, f"http://127.0.0.1:{port}", store)


@contextlib.asynccontextmanager
async def server(config: ServerConfig, node: Node, **kw: Any) -> AsyncIterator[Running]:
    r = await start_server(config, node, **kw)
    try:
        yield r
    finally:
        await r.stop()


async def until(pred: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
    """Await a (sync or async) predicate becoming truthy; TimeoutError otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if asyncio.iscoroutine(v):
            v = await v
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what or pred}")
        await asyncio.sleep(0.02)


async def open_channel(client: PayerClient, bitcoind: RegtestNode, url: str, deposit: int = 1_000_000,
                       lifetime: int = 60, **kw: Any) -> str:
    cid = await client.open_channel(url, deposit, lifetime, wait_open=False, **kw)
    bitcoind.mine(1)
    await client.wait_open(cid, timeout=30)
    return cid


def tx_of(bitcoind: RegtestNode, txid: str) -> dict[str, Any]:
    return dict(bitcoind.rpc("getrawtransaction", txid, True))


def sats(btc: float) -> int:
    return round(btc * 100_000_000)


class ServerProcess:
    """The payee service as a real subprocess (``python -m btcchannel.payee``)."""

    def __init__(self, config: ServerConfig, bitcoind: RegtestNode, wallet: str = "miner") -> None:
        self.config = config
        self.spec = config.datadir.parent / f"{config.datadir.name}-server.json"
        self.bitcoind = bitcoind
        self.wallet = wallet
        self.proc: subprocess.Popen[bytes] | None = None
        self.url: str | None = None

    async def start(self) -> str:
        cfg = self.config.to_json()
        if self.url is not None:
            cfg["port"] = int(self.url.rsplit(":", 1)[1])  # keep the URL the payer knows
        self.config.datadir.mkdir(parents=True, exist_ok=True)
        info = self.config.datadir / "server.json"
        info.unlink(missing_ok=True)
        self.spec.write_text(json.dumps({"config": cfg, "node": {
            "url": self.bitcoind.rpc_url, "cookie_file": str(self.bitcoind.cookie_file), "wallet": self.wallet}}))
        log = open(self.config.datadir.parent / f"{self.config.datadir.name}-server.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "btcchannel.payee", str(self.spec)],
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()
        await until(lambda: info.exists() or self.proc.poll() is not None, timeout=30, what="server start")  # type: ignore[union-attr]
        assert self.proc.poll() is None, "server process died"
        self.url = json.loads(info.read_text())["url"]
        return self.url

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        await until(lambda: self.proc.poll() is not None, timeout=30, what="server exit")  # type: ignore[union-attr]
        return int(self.proc.returncode)
