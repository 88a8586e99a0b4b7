"""pytest fixtures for applications built on btcchannel: a real regtest bitcoind.

Registered through the ``pytest11`` entry point, so any project that installs
btcchannel gets them:

- ``bitcoind`` (session): a running :class:`~btcchannel.bitcoind.regtest.RegtestNode`
  past height 200, with a ``miner`` wallet holding mature coins; it keeps a transaction index,
  or, with ``--btcchannel-node=pruned``, runs as most operators' nodes do: ``-prune=550`` and
  no transaction index (:data:`NODE_KINDS`);
- ``funded_wallet``: the name of a fresh wallet on it holding 10 BTC, confirmed (unloaded after the test);
- ``node_datadir``: a per-test folder, removed when the test passes and kept
  (its path printed) when it fails;
- ``node_factory``: starts more nodes for a test (stopped at its end), with the node options of
  :class:`~btcchannel.bitcoind.regtest.RegtestNode` (``txindex``, ``prune``, ``fastprune``,
  ``persist_mempool``);
- ``postgres`` (session): a real PostgreSQL server (:mod:`btcchannel.testing.postgres`);
  ``postgres_url``: a fresh empty database on it for one test;
- with pytest-asyncio installed, ``payee_factory``, ``payer_factory`` and ``payer_client``
  (:mod:`btcchannel.testing.fixtures`): payee services and payer clients stopped at the end
  of the test, which fails if a payee logged an ERROR, unless marked
  ``@pytest.mark.allow_payee_errors``.

The session node's datadir is kept when any test of the session failed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from btcchannel.bitcoind.binary import BitcoindBinary, find_bitcoind
from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.errors import NodeError, NodeUnavailable
from btcchannel.testing.postgres import PostgresServer, start_postgres

FUNDED_WALLET_SAT = 10 * 100_000_000
#: ``--btcchannel-node`` -> the session node's storage options
NODE_KINDS: dict[str, dict[str, Any]] = {
    "full": {"txindex": True, "prune": 0},
    "pruned": {"txindex": False, "prune": 550},
}
_wallet_numbers = itertools.count(1)

if importlib.util.find_spec("pytest_asyncio") is not None:
    from btcchannel.testing.fixtures import payee_factory, payer_client, payer_factory

    __all__ = ["payee_factory", "payer_client", "payer_factory"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--btcchannel-node",
        choices=sorted(NODE_KINDS),
        default="full",
        help="the session bitcoind: full (every block, a transaction index) or pruned "
        "(-prune=550, no transaction index)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "allow_payee_errors: the test provokes payee errors on purpose; "
        "do not fail it for ERROR records its payee services log",
    )


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Any:
    report = yield
    setattr(item, f"btcchannel_rep_{report.when}", report)
    return report


def _failed(request: pytest.FixtureRequest) -> bool:
    return any(
        getattr(request.node, f"btcchannel_rep_{when}", None) is not None
        and getattr(request.node, f"btcchannel_rep_{when}").failed
        for when in ("setup", "call")
    )


@pytest.fixture(scope="session")
def bitcoind_binary(request: pytest.FixtureRequest) -> BitcoindBinary:
    """The bitcoind every node of the session runs (found or fetched once; a fetch's steps are
    written on the terminal as they happen, past pytest's output capture)."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")

    def progress(line: str) -> None:
        if reporter is not None:
            reporter.write_line(line)

    return find_bitcoind(progress=progress)


@pytest.fixture(scope="session")
def bitcoind(
    bitcoind_binary: BitcoindBinary,
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> Iterator[RegtestNode]:
    """A regtest node for the whole session, mined past height 200 (``--btcchannel-node``: its kind)."""
    datadir = tmp_path_factory.mktemp("bitcoind")
    kind = NODE_KINDS[str(request.config.getoption("--btcchannel-node"))]
    node = RegtestNode(datadir=datadir, binary=bitcoind_binary, **kind)
    node.start()
    try:
        node.prepare(201)
        yield node
    finally:
        node.stop()
        if request.session.testsfailed:
            print(f"\nbitcoind datadir kept: {datadir}")
        else:
            shutil.rmtree(datadir, ignore_errors=True)


@pytest.fixture
def node_datadir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder for this test's node; kept (and named) if the test fails."""
    path = tmp_path_factory.mktemp("node")
    yield path
    if _failed(request):
        print(f"\ndatadir kept: {path}")
    else:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def funded_wallet(bitcoind: RegtestNode) -> Iterator[str]:
    """The name of a fresh wallet holding 10 BTC, confirmed; unloaded after the test (its file stays),
    so the session node does not keep one more wallet to update for every later block."""
    name = f"funded{next(_wallet_numbers)}"
    bitcoind.fund_wallet(name, FUNDED_WALLET_SAT)
    yield name
    with contextlib.suppress(NodeError, NodeUnavailable):
        bitcoind.rpc("unloadwallet", name)


@pytest.fixture
def node_factory(
    bitcoind_binary: BitcoindBinary,
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., RegtestNode]]:
    """Start extra regtest nodes for one test (``node_factory(zmq=False)``: one that announces no
    blocks over ZMQ; ``node_factory(txindex=False, prune=1, fastprune=True)``: a pruned one, see
    :class:`~btcchannel.bitcoind.regtest.RegtestNode`); all are stopped when it ends."""
    nodes: list[RegtestNode] = []

    def start(*, zmq: bool = True, **options: Any) -> RegtestNode:
        node = RegtestNode(datadir=tmp_path_factory.mktemp("extra-node"), binary=bitcoind_binary, zmq=zmq, **options)
        nodes.append(node)
        return node.start()

    yield start
    for node in nodes:
        node.stop()
        if _failed(request):
            print(f"\ndatadir kept: {node.datadir}")
        else:
            shutil.rmtree(node.datadir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """A PostgreSQL server for the whole session (found on PATH, else pgserver's)."""
    server = start_postgres(tmp_path_factory.mktemp("postgres"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres: PostgresServer) -> str:
    """A fresh, empty database for this test: its ``postgresql://`` URL."""
    return postgres.create_database()
