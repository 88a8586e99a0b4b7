"""The payee and the payer on the nodes operators run: pruned (``-prune=550``) and without a
transaction index. Every fixture of this module (``payee_factory``, ``payer_client``...) runs on
such a node; a node pruned for real (``-prune=1 -fastprune`` and ``pruneblockchain``) shows the
payee working past the blocks it deleted, and refusing to start once it deleted blocks the payee
has not read yet."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator

import pytest
import pytest_asyncio

from btcchannel.bitcoind.binary import BitcoindBinary
from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.errors import NodePruned
from btcchannel.payee.http import CLOSER, WATCHER
from btcchannel.payer.client import PayerClient
from btcchannel.testing import node_for, sats, tx_of, wait_until_async
from btcchannel.testing.fixtures import PayeeFactory, PayerFactory
from btcchannel.testing.payee import RunningPayee, start_payee


@pytest.fixture(scope="module")
def bitcoind(bitcoind_binary: BitcoindBinary, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegtestNode]:
    """This module's node: ``-prune=550``, no transaction index (replaces the session's node)."""
    node = RegtestNode(datadir=tmp_path_factory.mktemp("pruned"), binary=bitcoind_binary, txindex=False, prune=550)
    node.start()
    try:
        node.prepare(201)
        yield node
    finally:
        node.stop()
        shutil.rmtree(node.datadir, ignore_errors=True)


def _mine_empty(bitcoind: RegtestNode, n: int) -> None:
    addr = bitcoind.new_address("miner")
    for _ in range(n):
        bitcoind.rpc("generateblock", addr, [])


async def _until(srv: RunningPayee, cid: str, state: str) -> None:
    async def reached() -> bool:
        await srv.app[WATCHER].step()
        await srv.app[CLOSER].aclose()
        return srv.store.get(cid).state == state

    await wait_until_async(reached, timeout=30, what=f"channel {state}")


async def _open(srv: RunningPayee, client: PayerClient, bitcoind: RegtestNode, deposit: int, lifetime: int) -> str:
    """A channel funded, its funding mined and seen by the (stepped) payee, open."""
    cid = await client.open_channel(srv.url, deposit, lifetime, wait_open=False)
    bitcoind.mine(1)
    await srv.app[WATCHER].step()
    await client.wait_open(cid, timeout=30)
    return cid


def test_the_node_is_pruned_without_a_transaction_index(bitcoind: RegtestNode) -> None:
    assert bitcoind.rpc("getblockchaininfo")["pruned"] is True
    assert "txindex" not in bitcoind.rpc("getindexinfo")


async def test_open_pay_close_to_final_depth(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    srv = await payee_factory.start(final_confirmations=3, run_watcher=False)
    cid = await payer_client.open_channel(srv.url, 100_000, 60, wait_open=False)
    rec = srv.store.get(cid)
    assert rec.funding_inputs  # read from the mempool entry, no index needed
    bitcoind.mine(1)
    await _until(srv, cid, "open")
    await payer_client.pay(cid, 20_000)
    assert await payer_client.pay(cid, 15_000) == 35_000  # (increments)
    assert (await payer_client.close(cid))["state"] == "closing"
    await srv.app[CLOSER].aclose()
    close_txid = srv.store.get(cid).close_txid
    assert close_txid is not None and close_txid in bitcoind.rpc("getrawmempool")
    bitcoind.mine(2)
    await srv.app[WATCHER].step()
    assert srv.store.get(cid).state == "closing"  # 2 of 3 confirmations
    bitcoind.mine(1)
    await _until(srv, cid, "closed")
    close = tx_of(bitcoind, close_txid)
    assert sats(close["vout"][0]["value"]) == 100_000 - 35_000  # the payer's change as signed


async def test_a_confirmed_funding_is_read_from_the_block_its_depth_points_at(
    bitcoind: RegtestNode,
    funded_wallet: str,
) -> None:
    """How the payee registers a funding that confirmed before it was registered: ``gettxout``
    gives its depth, which names its block; its inputs (to notice a double-spend after a reorg)
    are read from there, as a node without a transaction index cannot look it up by txid alone."""
    address = bitcoind.new_address("miner")
    script = bytes.fromhex(bitcoind.rpc("getaddressinfo", address, wallet="miner")["scriptPubKey"])
    async with node_for(bitcoind, funded_wallet) as payer, node_for(bitcoind, None) as node:
        outpoint = await payer.fund_output(script, 100_000)
        bitcoind.mine(2)
        assert await node.get_transaction(outpoint.txid) is None  # no index: not found by txid alone
        info = await node.get_txout(outpoint)
        assert info is not None and info.confirmations == 2
        tx = await node.get_transaction(outpoint.txid)
        assert tx is not None and tx["confirmations"] == 2
        assert [[i["txid"], i["vout"]] for i in tx["vin"]] == [
            [i["txid"], i["vout"]] for i in tx_of(bitcoind, outpoint.txid)["vin"]
        ]


async def test_funding_reorged_out_and_double_spent_fails(
    bitcoind: RegtestNode,
    funded_wallet: str,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    srv = await payee_factory.start(final_confirmations=2, run_watcher=False)
    cid = await _open(srv, payer_client, bitcoind, 100_000, 60)
    funding = srv.store.get(cid).funding_txid or ""
    bitcoind.rpc("invalidateblock", bitcoind.transaction(funding)["blockhash"])
    conflict = bitcoind.rpc("bumpfee", funding, wallet=funded_wallet)["txid"]
    await _until(srv, cid, "funding")
    bitcoind.mine(2)
    await _until(srv, cid, "failed")
    rec = srv.store.get(cid)
    assert rec.exception_txid == conflict and rec.end_reason == "funding_double_spent"


async def test_refund_in_the_mempool_is_outbid(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    """Without a transaction index the payee finds the confirmed funding in the block it saw it in:
    a refund in the mempool at expiry is a conflict to outbid, not a lost funding."""
    srv = await payee_factory.start(final_confirmations=2, close_fee_rate_sat_vb=1.0, run_watcher=False)
    cid = await _open(srv, payer_client, bitcoind, 100_000, 12)
    await payer_client.pay(cid, 50_000)
    bitcoind.mine(srv.store.get(cid).expiry_height - bitcoind.tip_height())
    refund = await payer_client.refund(cid, fee_rate_sat_vb=5.0)

    async def outbid() -> bool:
        await srv.app[WATCHER].step()
        await srv.app[CLOSER].aclose()
        rec = srv.store.get(cid)
        return rec.close_txid is not None and rec.close_txid in bitcoind.rpc("getrawmempool")

    await wait_until_async(outbid, timeout=30, what="the refund replaced by our close")
    assert refund not in bitcoind.rpc("getrawmempool")
    bitcoind.mine(2)
    await _until(srv, cid, "closed")


async def test_payer_refund_after_expiry(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    """A payee that never closes: the payer's refund path works on the same node."""
    srv = await payee_factory.start(run_watcher=False)
    cid = await _open(srv, payer_client, bitcoind, 100_000, 8)
    expiry = srv.store.get(cid).expiry_height
    await srv.stop()
    bitcoind.mine(expiry - bitcoind.tip_height())
    refund = await payer_client.refund(cid)
    assert refund in bitcoind.rpc("getrawmempool")
    bitcoind.mine(1)
    assert tx_of(bitcoind, refund)["confirmations"] == 1
    assert payer_client.record(cid).refund_txid == refund


async def test_close_through_a_reorg_and_a_restart(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    """A close confirmed, reorged out, confirmed again while no payee ran: the restarted payee (its
    memory of where transactions were seen lost) still finds it and closes the channel."""
    srv = await payee_factory.start(final_confirmations=2, run_watcher=False)
    cid = await _open(srv, payer_client, bitcoind, 100_000, 60)
    await payer_client.pay(cid, 30_000)
    await payer_client.close(cid)
    await srv.app[CLOSER].aclose()
    close_txid = srv.store.get(cid).close_txid or ""
    block = bitcoind.mine(1)[0]
    await srv.app[WATCHER].step()
    bitcoind.rpc("invalidateblock", block)
    assert close_txid in bitcoind.rpc("getrawmempool")
    await srv.app[WATCHER].step()
    assert srv.store.get(cid).state == "closing"
    await srv.stop()
    bitcoind.mine(2, address=bitcoind.new_address("miner"))  # (not the invalidated block again)
    srv = await payee_factory.start(srv.config, run_watcher=False)
    await _until(srv, cid, "closed")
    assert srv.store.get(cid).close_txid == close_txid


@pytest_asyncio.fixture
async def pruning_node(node_factory: Callable[..., RegtestNode]) -> RegtestNode:
    """A node that prunes on request (``pruneblockchain``), with small block files, no txindex."""
    node = node_factory(txindex=False, prune=1, fastprune=True)
    node.create_wallet("miner")
    node.prepare(201)
    return node


def _prune_below(node: RegtestNode, blocks: int) -> int:
    """Mine ``blocks``, prune what the node allows (it keeps the last 288), return its prune height."""
    node.mine(blocks)
    node.rpc("pruneblockchain", node.tip_height() - 288)
    return int(node.rpc("getblockchaininfo")["pruneheight"])


async def test_payee_works_past_pruned_blocks_and_refuses_once_its_own_are_pruned(
    pruning_node: RegtestNode,
    payee_factory: PayeeFactory,
    payer_factory: PayerFactory,
) -> None:
    node = pruning_node
    node.create_wallet("payer")
    node.send("miner", node.new_address("payer"), 10 * 100_000_000)
    node.mine(1)
    config = payee_factory.config("pruning", final_confirmations=1)
    async with node_for(node, "miner") as rpc, node_for(node, "payer") as payer_rpc:
        srv = await start_payee(config, rpc, run_watcher=False)
        client = PayerClient(payer_factory.folder / "pruning-payer", payer_rpc)
        try:
            await srv.app[WATCHER].step()
            old = await _open(srv, client, node, 100_000, 420)  # its funding's block is pruned below
            await client.pay(old, 50_000)
            funded_at = node.transaction(srv.store.get(old).funding_txid or "")["blockhash"]
            # the payee keeps up while the node deletes old blocks: nothing it has to read is gone
            node.mine(400)
            await srv.app[WATCHER].step()
            pruned = _prune_below(node, 0)
            assert pruned > int(node.rpc("getblockheader", funded_at)["height"]), "the funding's block is kept"
            await srv.stop()
            srv = await start_payee(config, rpc, run_watcher=False)  # its last block is kept: it starts
            # at expiry the payer's refund races the (restarted) payee, whose funding block is gone
            node.mine(srv.store.get(old).expiry_height - node.tip_height())
            refund = await client.refund(old, fee_rate_sat_vb=5.0)

            async def outbid() -> bool:
                await srv.app[WATCHER].step()
                await srv.app[CLOSER].aclose()
                rec = srv.store.get(old)
                return rec.close_txid is not None and rec.close_txid in node.rpc("getrawmempool")

            await wait_until_async(outbid, timeout=30, what="the refund replaced by our close")
            assert refund not in node.rpc("getrawmempool")
            node.mine(1)
            await _until(srv, old, "closed")
            cid = await _open(srv, client, node, 100_000, 30)
            await client.pay(cid, 40_000)
            await client.close(cid)
            await srv.app[CLOSER].aclose()
            node.mine(1)
            await _until(srv, cid, "closed")
            last = srv.store.chain_cursor()
            assert last is not None and last[0] > pruned
            await srv.stop()
            # an outage longer than the node keeps blocks: the payee refuses to start
            assert _prune_below(node, 450) > last[0] + 1
            with pytest.raises(NodePruned, match=f"last processed block {last[0]}") as err:
                await start_payee(config, rpc, run_watcher=False)
            assert err.value.code == "node_pruned"
        finally:
            await srv.stop()
            await client.aclose()
