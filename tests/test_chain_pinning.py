"""Closes that cannot be pinned, and closes the node lost, on a real regtest node.

A payer hangs a large, low-feerate child on its change output of a close (a pin: BIP125 makes any
replacement pay for the child too); the payee's deadline bump still replaces the whole package,
for a single close and for a batch, whose urgent member is split out even when the others'
replacement is not made. A node restarted without its mempool, or whose block carrying the close
was invalidated, gets the close back from the payee itself (its log event and metric), with no
wallet loaded that could have re-sent it."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from bip32 import BIP32

from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.core.descriptor import add_checksum
from btcchannel.payee.http import CLOSER, WATCHER
from btcchannel.payee.metrics import METRICS, install_metrics
from btcchannel.payer.client import PayerClient
from btcchannel.testing import node_for, sats, tx_of, wait_until_async
from btcchannel.testing.fixtures import PayeeFactory
from btcchannel.testing.payee import RunningPayee, fast_config, start_payee

DEPOSIT = 200_000
PIN_VSIZE = 50_000
# closes at 1 sat/vB, bumped every 2 blocks up to 3 sat/vB, at the deadline in the last 3 blocks
CONFIG: dict[str, Any] = dict(
    close_margin_blocks=6,
    bump_after_blocks=2,
    close_fee_rate_sat_vb=1.0,
    max_fee_rate_sat_vb=3.0,
    final_confirmations=2,
)


def _mine_empty(bitcoind: RegtestNode, n: int) -> None:
    """Blocks that leave every mempool transaction out (a fee spike, as far as our closes go)."""
    addr = bitcoind.new_address("miner")
    for _ in range(n):
        bitcoind.rpc("generateblock", addr, [])


async def _step(srv: RunningPayee) -> None:
    await srv.app[WATCHER].step()
    await srv.app[CLOSER].aclose()


async def _open(srv: RunningPayee, client: PayerClient, bitcoind: RegtestNode, deposit: int, lifetime: int) -> str:
    """A channel funded, its funding mined and seen by the (stepped) payee, open."""
    cid = await client.open_channel(srv.url, deposit, lifetime, wait_open=False)
    bitcoind.mine(1)
    await srv.app[WATCHER].step()
    await client.wait_open(cid, timeout=30)
    return cid


def _small_coins(bitcoind: RegtestNode, wallet: str, vsize: int = PIN_VSIZE) -> list[dict[str, Any]]:
    """Enough confirmed 2,000 sat coins in ``wallet`` for a child of about ``vsize`` vbytes."""
    n = vsize // 68
    # one ranged descriptor imported into the wallet: its n addresses in two calls, not n getnewaddress
    xprv = BIP32.from_seed(os.urandom(32), network="test").get_xpriv()
    desc = add_checksum(f"wpkh({xprv}/0/*)")
    imported = bitcoind.rpc(
        "importdescriptors", [{"desc": desc, "range": [0, n - 1], "timestamp": "now"}], wallet=wallet
    )
    assert imported[0]["success"], imported
    public = bitcoind.rpc("getdescriptorinfo", desc)["descriptor"]
    addresses = bitcoind.rpc("deriveaddresses", public, [0, n - 1])
    txid = bitcoind.rpc("sendmany", "", {a: "0.00002" for a in addresses}, wallet="miner")
    bitcoind.mine(1)
    outs = tx_of(bitcoind, txid)["vout"]
    mine = set(addresses)
    coins = [{"txid": txid, "vout": o["n"]} for o in outs if o["scriptPubKey"].get("address") in mine]
    bitcoind.rpc("lockunspent", False, coins, wallet=wallet)  # kept for the pin, never for a funding
    return coins


def _pin(bitcoind: RegtestNode, wallet: str, close_txid: str, vout: int, coins: list[dict[str, Any]]) -> str:
    """The payer hangs a child of about PIN_VSIZE vB at 1 sat/vB on its change (``vout``) of the close."""
    change = sats(tx_of(bitcoind, close_txid)["vout"][vout]["value"])
    fee = 69 * (len(coins) + 1) + 60  # a little over 1 sat/vB: every input is P2WPKH
    value = change + 2_000 * len(coins) - fee
    raw = bitcoind.rpc(
        "createrawtransaction",
        [{"txid": close_txid, "vout": vout}, *coins],
        [{bitcoind.new_address(wallet): f"{value / 1e8:.8f}"}],
    )
    signed = bitcoind.rpc("signrawtransactionwithwallet", raw, wallet=wallet)
    assert signed["complete"], signed
    child = str(bitcoind.rpc("sendrawtransaction", signed["hex"]))
    entry = bitcoind.rpc("getmempoolentry", close_txid)
    assert entry["descendantcount"] == 2 and entry["descendantsize"] > PIN_VSIZE * 0.9
    assert sats(bitcoind.rpc("getmempoolentry", child)["fees"]["base"]) < 1.1 * PIN_VSIZE
    return child


def _fee(bitcoind: RegtestNode, txid: str, deposits: int) -> int:
    return deposits - sum(sats(o["value"]) for o in tx_of(bitcoind, txid)["vout"])


async def _metric(srv: RunningPayee, name: str) -> float:
    async with httpx.AsyncClient(timeout=10) as http:
        url = srv.app[METRICS].url  # the metrics listener of its own (loopback)
        assert url is not None
        text = (await http.get(url)).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


async def test_a_pinned_close_is_replaced_with_its_child_before_the_deadline(
    bitcoind: RegtestNode,
    funded_wallet: str,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    srv = await payee_factory.start(run_watcher=False, hook=install_metrics, **CONFIG)
    coins = _small_coins(bitcoind, funded_wallet)
    cid = await _open(srv, payer_client, bitcoind, DEPOSIT, 20)
    await payer_client.pay(cid, 150_000)
    await payer_client.close(cid)
    await srv.app[CLOSER].aclose()
    first = srv.store.get(cid).close_txid or ""
    first_fee = _fee(bitcoind, first, DEPOSIT)
    child = _pin(bitcoind, funded_wallet, first, 0, coins)
    child_fee = sats(bitcoind.rpc("getmempoolentry", child)["fees"]["base"])
    expiry = srv.store.get(cid).expiry_height
    _mine_empty(bitcoind, 2)  # a bump is due, but outbidding the pin costs more than the rate cap
    await _step(srv)
    assert srv.store.get(cid).close_txid == first and {first, child} <= set(bitcoind.rpc("getrawmempool"))
    assert srv.app[CLOSER].events["pinned"] >= 1 and await _metric(srv, "btcchannel_close_pinned_total") >= 1
    while srv.store.get(cid).close_txid == first:  # empty blocks until the deadline bump outbids it all
        assert bitcoind.tip_height() < expiry - 1, "the pinned close was never replaced"
        _mine_empty(bitcoind, 1)
        await _step(srv)
    replaced = srv.store.get(cid).close_txid or ""
    mempool = set(bitcoind.rpc("getrawmempool"))
    assert replaced in mempool and not {first, child} & mempool
    assert _fee(bitcoind, replaced, DEPOSIT) > child_fee + first_fee
    bitcoind.mine(2)
    await _step(srv)
    assert srv.store.get(cid).state == "closed"
    assert tx_of(bitcoind, replaced)["confirmations"] == 2 and bitcoind.tip_height() - 1 < expiry


async def _pinned_batch(
    srv: RunningPayee,
    client: PayerClient,
    bitcoind: RegtestNode,
    wallet: str,
    lifetimes: tuple[int, ...],
    amounts: tuple[int, ...],
) -> tuple[list[str], str, str, int]:
    """Channels paid ``amounts``, closed in one batch, a pin hung on the first one's payer change.
    Returns (channel ids, the batch's txid, the child's txid, the batch's fee)."""
    coins = _small_coins(bitcoind, wallet)
    cids = [await client.open_channel(srv.url, DEPOSIT, life, wait_open=False) for life in lifetimes]
    bitcoind.mine(1)
    await srv.app[WATCHER].step()
    for cid, amount in zip(cids, amounts):
        await client.wait_open(cid, timeout=30)
        await client.pay(cid, amount)
    closer = srv.app[CLOSER]
    for c in cids:  # claimed by this process in one pass (the operator's end condition)
        assert closer.claim_only(c, "operator") is not None
    await closer.close_claimed(sorted(cids))
    batch = srv.store.get(cids[0]).close_txid or ""
    assert {srv.store.get(c).close_txid for c in cids} == {batch}
    first = srv.store.get(cids[0])
    pinned_in = [(v["txid"], v["vout"]) for v in tx_of(bitcoind, batch)["vin"]].index(
        (first.funding_txid, first.funding_vout)
    )
    batch_fee = _fee(bitcoind, batch, len(cids) * DEPOSIT)
    return cids, batch, _pin(bitcoind, wallet, batch, pinned_in, coins), batch_fee


async def test_a_pinned_batch_is_replaced_with_its_child_at_the_deadline(
    bitcoind: RegtestNode,
    funded_wallet: str,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    srv = await payee_factory.start(run_watcher=False, **CONFIG)
    cids, batch, child, batch_fee = await _pinned_batch(
        srv, payer_client, bitcoind, funded_wallet, (16, 16, 16), (40_000, 40_000, 40_000)
    )
    child_fee = sats(bitcoind.rpc("getmempoolentry", child)["fees"]["base"])
    expiry = srv.store.get(cids[0]).expiry_height
    while srv.store.get(cids[0]).close_txid == batch:  # empty blocks until the deadline bump outbids it all
        assert bitcoind.tip_height() < expiry - 1, "the pinned batch was never replaced"
        _mine_empty(bitcoind, 1)
        await _step(srv)
    replaced = srv.store.get(cids[0]).close_txid or ""
    assert {srv.store.get(c).close_txid for c in cids} == {replaced}  # still one close for all three
    mempool = set(bitcoind.rpc("getrawmempool"))
    assert replaced in mempool and not {batch, child} & mempool
    assert _fee(bitcoind, replaced, 3 * DEPOSIT) > child_fee + batch_fee
    bitcoind.mine(2)
    await _step(srv)
    assert [srv.store.get(c).state for c in cids] == ["closed"] * 3


async def test_a_pinned_batch_splits_out_its_urgent_member_and_every_channel_closes(
    bitcoind: RegtestNode,
    funded_wallet: str,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    """A batch of three, pinned by a child on one payer's change: the two non-urgent members'
    replacement is not worth outbidding the pin yet, and the urgent one is split out regardless,
    its own close replacing the batch and the child; the two others then close on their own."""
    srv = await payee_factory.start(run_watcher=False, hook=install_metrics, **CONFIG)
    amounts = (40_000, 150_000, 40_000)
    cids, batch, child, batch_fee = await _pinned_batch(
        srv, payer_client, bitcoind, funded_wallet, (40, 16, 40), amounts
    )
    near = cids[1]  # the pin hangs on cids[0]'s payer change, a member not yet urgent
    closer = srv.app[CLOSER]
    child_fee = sats(bitcoind.rpc("getmempoolentry", child)["fees"]["base"])
    _mine_empty(bitcoind, srv.store.get(near).expiry_height - 3 - bitcoind.tip_height())
    await _step(srv)
    alone = srv.store.get(near).close_txid or ""
    mempool = set(bitcoind.rpc("getrawmempool"))
    assert alone != batch and alone in mempool and not {batch, child} & mempool
    assert _fee(bitcoind, alone, DEPOSIT) > child_fee + batch_fee
    assert closer.events["pinned"] >= 1

    async def all_sent() -> bool:
        await _step(srv)
        pool = set(bitcoind.rpc("getrawmempool"))
        return all(srv.store.get(c).close_txid in pool for c in cids)

    await wait_until_async(all_sent, timeout=30, what="the other two closes sent on their own")
    bitcoind.mine(2)
    await _step(srv)
    assert [srv.store.get(c).state for c in cids] == ["closed"] * 3
    for c, amount in zip(cids, amounts):
        close = tx_of(bitcoind, srv.store.get(c).close_txid or "")
        rec = srv.store.get(c)
        i = [(v["txid"], v["vout"]) for v in close["vin"]].index((rec.funding_txid, rec.funding_vout))
        assert sats(close["vout"][i]["value"]) == DEPOSIT - amount  # every payer's change as signed
    assert srv.store.get(near).close_txid != srv.store.get(cids[0]).close_txid


async def test_the_payee_resends_its_close_to_a_node_that_lost_it(
    node_factory: Callable[..., RegtestNode],
    payee_factory: PayeeFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The node restarts without a mempool (``-persistmempool=0``), later with the block holding
    the close invalidated: each time the payee sends its recorded close again, logged
    (``close_rebroadcast``) and counted (``btcchannel_close_rebroadcasts_total``). No wallet is
    loaded after a restart, so no wallet re-sent it."""
    node = node_factory(persist_mempool=False)
    node.create_wallet("miner")
    node.prepare(201)
    node.fund_wallet("payer", 5 * 100_000_000)
    spare = node.new_address("miner")  # to mine to once no wallet is loaded
    config = fast_config(payee_factory.folder / "resend", final_confirmations=3)
    caplog.set_level(logging.INFO, logger="btcchannel")
    async with node_for(node, "miner") as rpc, node_for(node, "payer") as payer_rpc:
        srv = await start_payee(config, rpc, install_metrics, run_watcher=False)
        client = PayerClient(payee_factory.folder / "resend-payer", payer_rpc)
        try:
            cid = await _open(srv, client, node, 100_000, 60)
            await client.pay(cid, 30_000)
            await client.close(cid)
            await srv.app[CLOSER].aclose()
            close = srv.store.get(cid).close_txid or ""
            assert close in node.rpc("getrawmempool")

            def restart() -> None:
                node.stop()
                node.start()
                assert node.rpc("listwallets") == []  # nothing but the payee can re-send the close

            restart()
            assert close not in node.rpc("getrawmempool")
            await _step(srv)
            assert close in node.rpc("getrawmempool")
            assert srv.app[CLOSER].events["rebroadcast"] == 1
            assert await _metric(srv, "btcchannel_close_rebroadcasts_total") == 1
            assert [
                r
                for r in caplog.records
                if getattr(r, "event", None) == "close_rebroadcast" and getattr(r, "txid", None) == close
            ]
            block = node.mine(1)[0]
            await _step(srv)
            assert srv.store.get(cid).state == "closing"  # 1 of 3 confirmations
            node.rpc("invalidateblock", block)
            restart()
            assert close not in node.rpc("getrawmempool")
            await _step(srv)
            assert close in node.rpc("getrawmempool") and srv.app[CLOSER].events["rebroadcast"] == 2
            node.mine(3, address=spare)  # (a block other than the invalidated one)
            await _step(srv)
            assert srv.store.get(cid).state == "closed" and srv.store.get(cid).close_txid == close
        finally:
            await srv.stop()
            await client.aclose()
