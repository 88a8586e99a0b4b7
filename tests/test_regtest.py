"""The regtest foundation on a real bitcoind: fetch, start, wallets, mining, peers, stop."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from btcchannel.amounts import btc_to_sat
from btcchannel.bitcoind.binary import (
    BitcoindBinary,
    _deb822_uris,
    _one_line_uris,
    debian_archive_uri,
    fetch_bitcoind,
)
from btcchannel.bitcoind.regtest import RegtestNode, _pid_alive
from btcchannel.cli import main
from btcchannel.errors import NodeError, NodeUnavailable
from btcchannel.wait import wait_until

pytest_plugins = ["pytester"]


@dataclass(frozen=True)
class ColdFetch:
    """One cold fetch into an empty cache, shared by the fetch tests of this module."""

    cache: Path
    binary: BitcoindBinary
    seconds: float


@pytest.fixture(scope="module")
def cold_fetch(tmp_path_factory: pytest.TempPathFactory) -> ColdFetch:
    cache = tmp_path_factory.mktemp("fetch-cache")
    assert debian_archive_uri().startswith(("http://", "https://", "file:"))
    t0 = time.monotonic()
    binary = fetch_bitcoind(cache=cache)
    return ColdFetch(cache, binary, time.monotonic() - t0)


def test_fetch_cold_then_warm(cold_fetch: ColdFetch) -> None:
    tmp_path = cold_fetch.cache
    cold = cold_fetch.binary
    assert "Bitcoin" in cold.version
    assert (tmp_path / "knots" / ".complete").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("knots-")], "staging folder left behind"
    t0 = time.monotonic()
    warm = fetch_bitcoind(cache=tmp_path)
    warm_s = time.monotonic() - t0
    assert warm == cold
    print(f"\nprovisioning: cold {cold_fetch.seconds:.1f}s, warm {warm_s:.2f}s")


def _stanza(types: str, uris: str, *lines: str) -> str:
    """One deb822 ``.sources`` stanza: its types, its URIs, then ``lines`` as they are."""
    return "\n".join([f"Types: {types}", f"URIs: {uris}", *lines]) + "\n"


def test_apt_sources_of_both_formats_name_their_archives() -> None:
    """The archive URIs read from apt's one-line lists and deb822 ``.sources`` files: enabled
    ``deb`` entries only, security archives left out (no apt needed)."""
    archive, other = "http://archive.example/debian", "http://other.example/debian"
    one_line = (
        "# deb http://old.example/debian bookworm main\n"
        f"deb [arch=amd64] {archive} bookworm main\n"
        "deb-src http://src.example/debian bookworm main\n"
        "deb http://archive.example/debian-security bookworm-security main\n"
        f"deb {other} bookworm-security main\n"
    )
    assert _one_line_uris(one_line) == [archive]
    deb822 = "\n".join(
        [
            _stanza("deb deb-src", f"{archive} {other}", "Suites: bookworm bookworm-updates", "Components: main"),
            _stanza("deb", "http://archive.example/debian-security", "Suites: bookworm-security"),
            _stanza("deb", "http://disabled.example/debian", "Suites: bookworm", "Enabled: no"),
            _stanza("deb-src", "http://src.example/debian", "Suites: bookworm"),
            "# Types: deb\n" + _stanza("deb", "http://third.example/debian", " continued: line", "Suites: trixie"),
        ]
    )
    assert _deb822_uris(deb822) == [archive, other, "http://third.example/debian"]


def test_broken_cache_is_refetched(cold_fetch: ColdFetch, tmp_path: Path) -> None:
    # a copy of a complete cache (the cold fetch's), then damaged
    shutil.copytree(cold_fetch.cache / "knots", tmp_path / "knots", symlinks=True)
    assert fetch_bitcoind(cache=tmp_path).bitcoind[0].startswith(str(tmp_path))  # the copy is a working cache
    (tmp_path / "knots" / "usr" / "bin" / "bitcoind").unlink()  # a damaged cache
    again = fetch_bitcoind(cache=tmp_path)
    assert (tmp_path / "knots" / "usr" / "bin" / "bitcoind").exists()
    assert "Bitcoin" in again.version


def test_fresh_node_mines_and_spends(
    node_factory: Callable[[], RegtestNode],
) -> None:
    node = node_factory()
    assert node.tip_height() == 0
    node.create_wallet("alice")
    addr = node.new_address("alice")
    assert addr.startswith("bcrt1q")
    node.mine(101, addr)
    assert node.tip_height() == 101
    # one mature coinbase: exactly 50 BTC spendable
    assert node.balance_sat("alice") == 50 * 100_000_000
    node.mine(100)  # past the heights where Knots refuses wallet locktimes
    node.create_wallet("bob")
    txid = node.send("alice", node.new_address("bob"), 123_456_789)
    node.mine(1)
    assert node.rpc("gettransaction", txid, wallet="alice")["confirmations"] == 1
    assert node.balance_sat("bob") == 123_456_789


def test_session_node_is_ready(bitcoind: RegtestNode, funded_wallet: str) -> None:
    assert bitcoind.tip_height() >= 201
    assert bitcoind.balance_sat(funded_wallet) == 10 * 100_000_000
    info = bitcoind.rpc("getwalletinfo", wallet=funded_wallet)
    assert info["descriptors"] is True


def test_rpc_errors_are_typed(bitcoind: RegtestNode) -> None:
    with pytest.raises(NodeError) as e:
        bitcoind.rpc("getblockhash", 10**9)
    assert e.value.rpc_code == -8
    with pytest.raises(NodeError):
        bitcoind.rpc("nosuchmethod")
    amount = bitcoind.rpc("getblock", bitcoind.rpc("getbestblockhash"), 2)["tx"][0]["vout"][0]["value"]
    assert btc_to_sat(amount) > 0


def test_create_wallet_creates_loads_or_keeps(bitcoind: RegtestNode) -> None:
    name = f"again-{os.getpid()}-{time.monotonic_ns()}"
    bitcoind.create_wallet(name)
    bitcoind.create_wallet(name)  # exists and is loaded: kept
    assert name in bitcoind.rpc("listwallets")
    bitcoind.rpc("unloadwallet", name)
    assert name not in bitcoind.rpc("listwallets")
    bitcoind.create_wallet(name)  # exists on disk: loaded
    assert name in bitcoind.rpc("listwallets")
    bitcoind.rpc("unloadwallet", name)


def test_two_nodes_share_the_tip(node_factory: Callable[[], RegtestNode]) -> None:
    a, b = node_factory(), node_factory()
    a.connect(b)
    a.mine(5)
    wait_until(lambda: b.rpc("getbestblockhash") == a.rpc("getbestblockhash"), timeout=30, what="sync")
    assert b.tip_height() == 5


def test_stop_leaves_no_process(node_factory: Callable[[], RegtestNode]) -> None:
    node = node_factory()
    pid = node.pid
    assert pid is not None and _pid_alive(pid)
    node.stop()
    assert not _pid_alive(pid)
    with pytest.raises(NodeUnavailable):
        node.rpc("getblockcount")


def test_process_gone_after_exception(bitcoind_binary: BitcoindBinary, tmp_path: Path) -> None:
    pid = None
    with pytest.raises(RuntimeError):
        with RegtestNode(datadir=tmp_path, binary=bitcoind_binary) as node:
            pid = node.pid
            raise RuntimeError("test body failed")
    assert pid is not None and not _pid_alive(pid)


def test_dead_node_fails_fast(bitcoind_binary: BitcoindBinary, tmp_path: Path) -> None:
    node = RegtestNode(datadir=tmp_path, binary=bitcoind_binary, extra_args=("-nosuchoption=1",))
    t0 = time.monotonic()
    with pytest.raises(NodeUnavailable) as e:
        node.start(timeout=60)
    assert time.monotonic() - t0 < 30
    assert "exited" in str(e.value)


def test_failed_test_keeps_datadir_and_kills_node(pytester: pytest.Pytester) -> None:
    pidfile = pytester.path / "pid"
    pytester.makepyfile(
        f"""
        def test_boom(bitcoind, node_datadir):
            open({str(pidfile)!r}, "w").write(str(bitcoind.pid))
            (node_datadir / "marker").write_text("x")
            raise AssertionError("boom")
        """
    )
    env_cache = os.environ.get("XDG_CACHE_HOME")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-s")
    assert env_cache == os.environ.get("XDG_CACHE_HOME")
    result.assert_outcomes(failed=1)
    pid = int(pidfile.read_text())
    assert not _pid_alive(pid)
    kept = [line.split("datadir kept: ", 1)[1] for line in result.outlines if "datadir kept: " in line]
    assert any((Path(p) / "marker").exists() for p in kept), result.outlines


def test_cli_regtest_lifecycle(tmp_path: Path) -> None:
    runner = CliRunner()
    base = ["--datadir", str(tmp_path), "--json"]
    started = runner.invoke(main, [*base, "regtest", "start"])
    assert started.exit_code == 0, started.output
    doc = json.loads(started.output)
    pid = doc["pid"]
    try:
        assert doc["blocks"] >= 201 and doc["chain"] == "regtest"
        mined = runner.invoke(main, [*base, "regtest", "mine", "10"])
        assert mined.exit_code == 0, mined.output
        assert json.loads(mined.output)["height"] == doc["blocks"] + 10
        status = runner.invoke(main, [*base, "regtest", "status"])
        assert json.loads(status.output)["blocks"] == doc["blocks"] + 10
    finally:
        stopped = runner.invoke(main, [*base, "regtest", "stop"])
    assert stopped.exit_code == 0, stopped.output
    assert not _pid_alive(pid)
    gone = runner.invoke(main, ["--datadir", str(tmp_path), "regtest", "status"])
    assert gone.exit_code == 1
    assert "node_unavailable" in gone.output
    usage = runner.invoke(main, ["regtest", "mine", "zero"])
    assert usage.exit_code == 2


def test_restart_keeps_ports_and_chain(node_factory: Callable[[], RegtestNode]) -> None:
    node = node_factory()
    node.mine(3)
    url = node.rpc_url
    node.stop()
    node.start()
    assert node.rpc_url == url
    assert node.tip_height() == 3


def test_version_policy() -> None:
    from btcchannel.bitcoind.binary import _acceptable

    assert _acceptable("Bitcoin Core version v27.0.0")
    assert _acceptable("Bitcoin Core daemon version v25.1.0")
    assert not _acceptable("Bitcoin Core version v24.1.0")
    assert _acceptable("Bitcoin Knots daemon version v29.4.3.knots20260508")
    assert not _acceptable("Litecoin Core version v0.21.2")
