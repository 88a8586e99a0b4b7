"""No payment on a stale chain view: the payee's node goes away (a TCP relay in front of the real
regtest node is cut), payments and proposals are refused with ``node_unavailable`` and
``/v1/info`` says why; the node comes back, payments are accepted again."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from btcchannel.bitcoind.chain import ChainState
from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.bitcoind.rpc import Node
from btcchannel.errors import NodeUnavailable, NotOpen
from btcchannel.payee.http import WATCHER
from btcchannel.payee.shared import ChainTip
from btcchannel.payer.client import PayerClient
from btcchannel.testing import fast_config, node_for, open_channel, start_payee, wait_until_async
from btcchannel.testing.fixtures import PayeeFactory


class Relay:
    """A TCP relay to ``target`` on a fixed local port that can be cut and restored."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for w in list(self._writers):
            w.close()
        await self._server.wait_closed()
        self._server = None

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            self._writers.difference_update((writer, up_writer))


async def test_payments_refused_while_the_node_is_away(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    host, port = bitcoind.rpc_url.split("//", 1)[1].rsplit(":", 1)
    relay = Relay(host, int(port))
    await relay.start()
    config = payee_factory.config(max_tip_age_s=1.0)
    async with Node(
        f"http://127.0.0.1:{relay.port}", cookie_file=bitcoind.cookie_file, wallet="miner", timeout=2.0
    ) as node:
        srv = await start_payee(config, node)
        try:
            client = payer_client
            cid = await open_channel(client, bitcoind, srv.url, 100_000, 60)
            await client.pay(cid, 1_000)
            info = await client.info(srv.url)
            assert info["chain_fresh"] is True and info["chain_problem"] is None
            assert info["final_confirmations"] == config.final_confirmations

            await relay.cut()  # the payee's node is gone

            async def stale() -> bool:
                return (await client.info(srv.url))["chain_fresh"] is False

            await wait_until_async(stale, timeout=30, what="stale chain view")
            info = await client.info(srv.url)
            assert "no answer from the node" in info["chain_problem"] and info["tip_age_s"] > 1.0
            paid = srv.store.get(cid).amount_sat
            with pytest.raises(NodeUnavailable, match="stale"):
                await client.pay(cid, 1_000)
            with pytest.raises(NodeUnavailable):
                await client.open_channel(srv.url, 100_000, 60, wait_open=False)
            assert srv.store.get(cid).amount_sat == paid  # nothing was stored while the view was stale

            await relay.start()  # the node is back (same port)
            await wait_until_async(
                lambda: srv.svc.tip.stale_reason(config.max_tip_age_s) is None, timeout=30, what="fresh tip"
            )
            assert await client.pay(cid, 1_000) == paid + 2_000  # the refused payment is re-sent, then this one
            assert srv.store.get(cid).amount_sat == paid + 2_000
            assert (await client.info(srv.url))["chain_fresh"] is True
        finally:
            await srv.stop()
            with contextlib.suppress(AssertionError):
                await relay.cut()


async def test_tip_follows_the_node_without_watcher_passes(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
) -> None:
    srv = await payee_factory.start(run_watcher=False)  # no pass ever runs: only the tip follower
    before = srv.svc.tip.checked_at
    bitcoind.mine(1)
    await wait_until_async(lambda: srv.svc.tip.height == bitcoind.tip_height(), timeout=30, what="tip followed")
    assert srv.svc.tip.best_hash == bitcoind.rpc("getbestblockhash")
    assert before is not None and srv.svc.tip.checked_at is not None and srv.svc.tip.checked_at > before


def test_node_in_ibd_or_on_another_chain_is_a_stale_view() -> None:
    tip = ChainTip()
    assert tip.stale_reason(10.0) == "the node's tip was never fetched"
    tip.update(ChainState(chain="regtest", height=5, best_hash="00" * 32, ibd=False), "regtest")
    assert tip.stale_reason(10.0) is None
    assert tip.checked_at is not None and tip.stale_reason(10.0, now=tip.checked_at + 11) is not None
    tip.update(ChainState(chain="regtest", height=5, best_hash="00" * 32, ibd=True), "regtest")
    assert tip.stale_reason(10.0) == "the node is in initial block download"
    tip.update(ChainState(chain="main", height=5, best_hash="00" * 32, ibd=False), "regtest")
    assert tip.stale_reason(10.0) == "the node follows chain 'main', not 'regtest'"


class FlakyRelay(Relay):
    """A relay that drops every connection carrying a call of one of the methods in ``failing``."""

    def __init__(self, target_host: str, target_port: int) -> None:
        super().__init__(target_host, target_port)
        self.failing: set[str] = set()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                if any(f'"{m}"'.encode() in data for m in self.failing):
                    break  # the call is lost: both sides of this connection are closed
                writer.write(data)
                await writer.drain()
        writer.close()


async def test_a_reorg_pass_the_node_fails_is_not_forgotten(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    """The funding of an open channel leaves the chain; the one watcher pass that sees the reorg
    cannot look at the channel (the node drops that call). The next pass looks again: the channel
    leaves ``open`` and takes no more payments on a funding that is not in the chain."""
    host, port = bitcoind.rpc_url.split("//", 1)[1].rsplit(":", 1)
    relay = FlakyRelay(host, int(port))
    await relay.start()
    async with Node(
        f"http://127.0.0.1:{relay.port}", cookie_file=bitcoind.cookie_file, wallet="miner", timeout=5.0
    ) as node:
        srv = await start_payee(payee_factory.config("flaky"), node, run_watcher=False)
        try:
            watcher = srv.app[WATCHER]
            client = payer_client
            await watcher.step()
            cid = await client.open_channel(srv.url, 100_000, 60, wait_open=False)
            bitcoind.mine(1)
            await watcher.step()
            await client.wait_open(cid, timeout=30)
            await client.pay(cid, 1_000)
            funding = str(srv.store.get(cid).funding_txid)
            bitcoind.rpc("invalidateblock", str(bitcoind.transaction(funding)["blockhash"]))
            assert funding in bitcoind.rpc("getrawmempool")
            relay.failing = {"gettxout"}
            await watcher.step()  # sees the reorg, cannot look at the channel
            relay.failing = set()
            await watcher.step()  # no new block
            assert srv.store.get(cid).state == "funding"
            with pytest.raises(NotOpen):
                await client.pay(cid, 1_000)
            assert srv.store.get(cid).amount_sat == 1_000
        finally:
            await srv.stop()
            with contextlib.suppress(AssertionError):
                await relay.cut()


async def test_a_node_with_an_old_best_block_is_a_stale_view(
    node_factory: Callable[..., RegtestNode],
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    """A node cut off from its peers still answers, with an old tip: past ``max_block_age_s`` the
    payee refuses proposals and payments until a recent block arrives."""
    lonely = node_factory()
    lonely.create_wallet("miner")
    now = int(time.time())
    lonely.rpc("setmocktime", now - 7200)  # its best block is two hours old
    lonely.mine(1)
    lonely.rpc("setmocktime", 0)
    config = payee_factory.config("lonely", max_block_age_s=3600.0)
    async with node_for(lonely, "miner") as node:
        srv = await start_payee(config, node)
        try:
            info = await payer_client.info(srv.url)
            assert info["chain_fresh"] is False and "best block is" in info["chain_problem"]
            with pytest.raises(NodeUnavailable):
                await payer_client.open_channel(srv.url, 100_000, 60, wait_open=False)
            lonely.mine(1)  # a recent block: the view is current again
            await wait_until_async(
                lambda: srv.svc.tip.stale_reason(config.max_tip_age_s) is None,
                timeout=30,
                what="fresh view after a recent block",
            )
            assert (await payer_client.info(srv.url))["chain_fresh"] is True
        finally:
            await srv.stop()


def test_block_age_bound_per_network(tmp_path: Path) -> None:
    assert fast_config(tmp_path / "r").block_age_bound_s is None  # regtest: blocks come when mined
    assert fast_config(tmp_path / "s", network="signet").block_age_bound_s == 7200.0
    assert fast_config(tmp_path / "m", network="signet", max_block_age_s=600.0).block_age_bound_s == 600.0
    tip = ChainTip()
    old = ChainState(chain="signet", height=5, best_hash="00" * 32, ibd=False, block_time=1_000)
    tip.update(old, "signet", 7200.0, now=1_000 + 7201)
    assert tip.stale_reason(10.0) is not None and "best block" in (tip.problem or "")
    tip.update(old, "signet", 7200.0, now=1_000 + 7199)
    assert tip.stale_reason(10.0) is None
