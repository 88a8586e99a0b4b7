"""Async pytest fixtures (pytest-asyncio): payee services and payer clients that clean up.

- ``payee_factory``: :class:`PayeeFactory` starts payee services (in-process or as
  subprocesses) on the session node; all are stopped, and their RPC clients closed, at
  teardown. Teardown then FAILS the test if a payee logged an ERROR (or worse) on a
  ``btcchannel`` logger, unless it is marked ``@pytest.mark.allow_payee_errors``.
- ``payer_factory``: :class:`PayerFactory` makes :class:`PayerClient` objects (closed at teardown);
- ``payer_client``: one client in ``<tmp_path>/payer`` on the ``funded_wallet``.

Modelled on pyln-testing's factory fixtures, which check the daemons' logs at teardown.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.bitcoind.rpc import Node
from btcchannel.payee.config import ServerConfig
from btcchannel.payer.client import PayerClient
from btcchannel.testing.chain import node_for
from btcchannel.testing.payee import AppHook, RunningPayee, ServerProcess, fast_config, start_payee

ALLOW_ERRORS_MARKER = "allow_payee_errors"
#: how often a test's payer asks the payee whether its channel is open (its payee polls as fast)
OPEN_POLL_S = 0.05


class _ErrorRecords(logging.Handler):
    """Keeps the records at ERROR or above that reach the ``btcchannel`` logger."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class _Nodes:
    """One RPC client per wallet, all closed together."""

    def __init__(self, bitcoind: RegtestNode) -> None:
        self.bitcoind = bitcoind
        self._nodes: dict[str | None, Node] = {}

    def node(self, wallet: str | None) -> Node:
        if wallet not in self._nodes:
            self._nodes[wallet] = node_for(self.bitcoind, wallet)
        return self._nodes[wallet]

    async def aclose(self) -> None:
        for node in self._nodes.values():
            await node.aclose()


class PayeeFactory:
    """Starts payee services for one test (see the module docstring)."""

    def __init__(self, bitcoind: RegtestNode, folder: Path) -> None:
        self.bitcoind = bitcoind
        self.folder = folder
        self._nodes = _Nodes(bitcoind)
        self.payees: list[RunningPayee] = []
        self.processes: list[ServerProcess] = []

    def node(self, wallet: str = "miner") -> Node:
        """The RPC client the payees on ``wallet`` use (closed at teardown)."""
        return self._nodes.node(wallet)

    def config(self, name: str = "payee", **kw: Any) -> ServerConfig:
        """:func:`fast_config` in ``<tmp_path>/<name>``."""
        return fast_config(self.folder / name, **kw)

    async def start(
        self,
        config: ServerConfig | None = None,
        *,
        wallet: str = "miner",
        hook: AppHook | None = None,
        run_watcher: bool = True,
        **config_kw: Any,
    ) -> RunningPayee:
        """Start a payee in this process (``config`` defaults to :meth:`config` with ``config_kw``)."""
        if config is None:
            config = self.config(**config_kw)
        payee = await start_payee(config, self.node(wallet), hook, run_watcher=run_watcher)
        self.payees.append(payee)
        return payee

    def process(self, config: ServerConfig, wallet: str = "miner") -> ServerProcess:
        """A payee subprocess (not started yet; stopped at teardown if still running)."""
        proc = ServerProcess(config, self.bitcoind, wallet)
        self.processes.append(proc)
        return proc

    async def aclose(self) -> None:
        try:
            for payee in self.payees:
                await payee.stop()
            for proc in self.processes:
                try:
                    await proc.stop(signal.SIGTERM)
                except TimeoutError:
                    await proc.stop(signal.SIGKILL)
        finally:
            await self._nodes.aclose()


class PayerFactory:
    """Makes payer clients for one test; all are closed at teardown."""

    def __init__(self, bitcoind: RegtestNode, folder: Path, wallet: str) -> None:
        self.folder = folder
        self.wallet = wallet
        self._nodes = _Nodes(bitcoind)
        self.clients: list[PayerClient] = []

    def node(self, wallet: str | None = None) -> Node:
        """The RPC client on ``wallet`` (default: the funded wallet), closed at teardown."""
        return self._nodes.node(wallet or self.wallet)

    def __call__(self, name: str = "payer", *, wallet: str | None = None, **kw: Any) -> PayerClient:
        """A :class:`PayerClient` in ``<tmp_path>/<name>`` funding channels from ``wallet`` (asking the
        payee every ``OPEN_POLL_S`` while it waits for a channel to open, unless told otherwise)."""
        kw.setdefault("open_poll_s", OPEN_POLL_S)
        client = PayerClient(self.folder / name, self.node(wallet), **kw)
        self.clients.append(client)
        return client

    async def aclose(self) -> None:
        try:
            for client in self.clients:
                await client.aclose()
        finally:
            await self._nodes.aclose()


@pytest_asyncio.fixture
async def payee_factory(
    bitcoind: RegtestNode,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> AsyncIterator[PayeeFactory]:
    """Payee services for this test; stopped at its end, which fails on an ERROR they logged."""
    errors = _ErrorRecords()
    logger = logging.getLogger("btcchannel")
    logger.addHandler(errors)
    factory = PayeeFactory(bitcoind, tmp_path)
    try:
        yield factory
    finally:
        try:
            await factory.aclose()
        finally:
            logger.removeHandler(errors)
    lines = [f"{r.name} {r.levelname} {r.getMessage()}" for r in errors.records]
    lines += [line for proc in factory.processes for line in proc.error_lines()]
    if lines and request.node.get_closest_marker(ALLOW_ERRORS_MARKER) is None:
        pytest.fail(
            "the payee logged errors (mark the test allow_payee_errors if they are expected):\n" + "\n".join(lines),
            pytrace=False,
        )


@pytest_asyncio.fixture
async def payer_factory(bitcoind: RegtestNode, funded_wallet: str, tmp_path: Path) -> AsyncIterator[PayerFactory]:
    """Payer clients for this test (on ``funded_wallet`` unless told otherwise), closed at its end."""
    factory = PayerFactory(bitcoind, tmp_path, funded_wallet)
    try:
        yield factory
    finally:
        await factory.aclose()


@pytest_asyncio.fixture
async def payer_client(payer_factory: PayerFactory) -> PayerClient:
    """A payer client in ``<tmp_path>/payer`` funding from ``funded_wallet``."""
    return payer_factory()
