"""A payee service for tests and the demo: in this process on a free loopback port, or as a subprocess.

- :func:`fast_config`: a :class:`ServerConfig` that polls fast and takes short channels;
- :func:`start_payee` / :func:`running_payee`: the service's app on ``127.0.0.1:<free port>``
  (an optional hook adds routes, e.g. a metered file), as a :class:`RunningPayee`;
- :class:`ServerProcess`: ``python -m <PAYEE_MODULE> CONFIG.json`` in a subprocess, logging to
  a file that :meth:`ServerProcess.error_lines` reads back.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.bitcoind.rpc import Node
from btcchannel.payee.config import ServerConfig
from btcchannel.payee.http import SERVICE, app_runner, create_app
from btcchannel.payee.service import PayeeService
from btcchannel.store import PayeeStore, open_payee_store
from btcchannel.wait import wait_until_async

PAYEE_MODULE = "btcchannel.payee"  # run as ``python -m PAYEE_MODULE CONFIG.json``
START_TIMEOUT_S = 30.0
_ERROR_LINE = re.compile(r" btcchannel[\w.]* (ERROR|CRITICAL) ")

AppHook = Callable[[web.Application], None]


def fast_config(datadir: Path, **kw: Any) -> ServerConfig:
    """A payee configuration for tests: 50 ms polling, 6-block minimum lifetime, 2 sat/vB closes,
    closes and conflicts final at 1 confirmation (tests of depth and reorgs ask for more)."""
    base: dict[str, Any] = dict(
        poll_interval_s=0.05,
        min_lifetime_blocks=6,
        close_margin_blocks=3,
        min_deposit_sat=10_000,
        close_fee_rate_sat_vb=2.0,
        final_confirmations=1,
    )
    base.update(kw)
    return ServerConfig(datadir=datadir, **base)


class RunningPayee:
    """A payee service listening on ``url``; :meth:`stop` (idempotent) shuts it down."""

    def __init__(
        self, app: web.Application, runner: web.AppRunner, url: str, store: PayeeStore, config: ServerConfig, node: Node
    ) -> None:
        self.app, self.runner, self.url, self.store = app, runner, url, store
        self.config, self.node = config, node
        self.stopped = False

    @property
    def svc(self) -> PayeeService:
        return self.app[SERVICE]

    async def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        try:
            await self.runner.cleanup()
        finally:
            self.store.close()


async def start_payee(
    config: ServerConfig,
    node: Node,
    hook: AppHook | None = None,
    *,
    run_watcher: bool = True,
) -> RunningPayee:
    """Start the payee's app for ``config`` on ``config.host`` and a free port (``config.port`` if set)."""
    config.datadir.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = open_payee_store(config.store_target)
    try:
        app = create_app(config, store, node, run_watcher=run_watcher)
        if hook is not None:
            hook(app)
        runner = app_runner(app, config)
        await runner.setup()
    except BaseException:
        store.close()
        raise
    try:
        site = web.TCPSite(runner, config.host, config.port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        store.close()
        raise
    host, port = runner.addresses[0][:2]
    return RunningPayee(app, runner, f"http://{host}:{port}", store, config, node)


@contextlib.asynccontextmanager
async def running_payee(
    config: ServerConfig,
    node: Node,
    hook: AppHook | None = None,
    *,
    run_watcher: bool = True,
) -> AsyncIterator[RunningPayee]:
    """:func:`start_payee`, stopped when the block ends."""
    payee = await start_payee(config, node, hook, run_watcher=run_watcher)
    try:
        yield payee
    finally:
        await payee.stop()


class ServerProcess:
    """The payee service as a real subprocess (``python -m PAYEE_MODULE SPEC.json``).

    A restart keeps the URL the payer knows. ``spec`` (the JSON file given to the process) may be
    changed before :meth:`start` to run a second process on the same datadir.
    """

    def __init__(self, config: ServerConfig, bitcoind: RegtestNode, wallet: str = "miner") -> None:
        self.config = config
        self.spec = config.datadir.parent / f"{config.datadir.name}-server.json"
        self.bitcoind = bitcoind
        self.wallet = wallet
        self.proc: subprocess.Popen[bytes] | None = None
        self.url: str | None = None

    @property
    def log_file(self) -> Path:
        return self.spec.with_suffix(".log")

    def _exited(self) -> bool:
        return self.proc is None or self.proc.poll() is not None

    async def start(self) -> str:
        """Start the process; returns its URL once it listens."""
        cfg = self.config.to_json()
        if self.url is not None:
            cfg["port"] = int(self.url.rsplit(":", 1)[1])  # keep the URL the payer knows
        self.config.datadir.mkdir(parents=True, exist_ok=True)
        info = self.config.datadir / "server.json"
        info.unlink(missing_ok=True)
        self.spec.write_text(
            json.dumps(
                {
                    "config": cfg,
                    "node": {
                        "url": self.bitcoind.rpc_url,
                        "cookie_file": str(self.bitcoind.cookie_file),
                        "wallet": self.wallet,
                    },
                }
            )
        )
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", PAYEE_MODULE, str(self.spec)], stdout=log, stderr=subprocess.STDOUT
            )
        await wait_until_async(
            lambda: info.exists() or self._exited(), timeout=START_TIMEOUT_S, what="the payee process to listen"
        )
        assert not self._exited(), f"payee process died:\n{self.log_file.read_text()[-3000:]}"
        self.url = str(json.loads(info.read_text())["url"])
        return self.url

    async def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Send ``sig`` and wait for the exit; its status (None if it was not running)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        await wait_until_async(self._exited, timeout=START_TIMEOUT_S, what="the payee process to exit")
        return int(self.proc.returncode)

    def error_lines(self) -> list[str]:
        """Lines of the process's log that record an ERROR (or worse) on a ``btcchannel`` logger."""
        if not self.log_file.exists():
            return []
        return [line for line in self.log_file.read_text(errors="replace").splitlines() if _ERROR_LINE.search(line)]
