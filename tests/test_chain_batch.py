"""Batched closes on a real regtest node: channels due in the same watcher pass close in one
transaction (every payer's change exact, one payee output), its RBF bumps keep every payment, a
channel raced by its refund or nearer its deadline is split out, and a recorded batch is re-sent
byte for byte after a restart."""

from __future__ import annotations

from typing import Any

from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.core.channel import build_multi_close
from btcchannel.payee.closer import Closer
from btcchannel.payee.http import CLOSER, WATCHER
from btcchannel.payer.client import PayerClient
from btcchannel.store import PayeeStore
from btcchannel.testing import sats, tx_of, wait_until_async
from btcchannel.testing.fixtures import PayeeFactory
from btcchannel.testing.payee import RunningPayee

DEPOSIT = 100_000
AMOUNTS = [20_000, 31_337, 45_000]
# closes sent 6 blocks before expiry, bumped every 2 blocks, at the deadline rate in the last 3
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


async def _three_channels(
    srv: RunningPayee, client: PayerClient, bitcoind: RegtestNode, lifetimes: tuple[int, int, int] = (14, 14, 14)
) -> list[str]:
    """Three channels proposed at the same tip (same expiry for the same lifetime), open, paid AMOUNTS."""
    cids = [await client.open_channel(srv.url, DEPOSIT, life, wait_open=False) for life in lifetimes]
    bitcoind.mine(1)
    await srv.app[WATCHER].step()
    for cid, amount in zip(cids, AMOUNTS):
        await client.wait_open(cid, timeout=30)
        await client.pay(cid, amount)
    return cids


def _check_close(bitcoind: RegtestNode, srv: RunningPayee, txid: str, cids: list[str], max_rate: int = 10) -> None:
    """``txid`` closes exactly ``cids``: input i's payer gets its change at output i, one payee output
    with the sum of the payments minus the fee, to the first channel's (by id) stored payout script."""
    close = tx_of(bitcoind, txid)
    recs = {(r.funding_txid, r.funding_vout): r for r in (srv.store.get(c) for c in cids)}
    assert len(close["vin"]) == len(cids) and len(close["vout"]) == len(cids) + 1
    paid = 0
    for i, vin in enumerate(close["vin"]):
        rec = recs[(vin["txid"], vin["vout"])]
        assert sats(close["vout"][i]["value"]) == DEPOSIT - rec.amount_sat  # the payer's change as signed
        paid += rec.amount_sat
    fee = DEPOSIT * len(cids) - sum(sats(o["value"]) for o in close["vout"])
    assert sats(close["vout"][-1]["value"]) == paid - fee and 0 < fee < max_rate * close["vsize"]
    first = srv.store.get(min(cids)).payout_script
    assert close["vout"][-1]["scriptPubKey"]["hex"] == first


async def _step(srv: RunningPayee) -> None:
    await srv.app[WATCHER].step()
    await srv.app[CLOSER].aclose()


async def test_three_channels_due_in_one_pass_close_in_one_transaction(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    srv = await payee_factory.start(run_watcher=False, **CONFIG)
    cids = await _three_channels(srv, payer_client, bitcoind)
    expiry = srv.store.get(cids[0]).expiry_height
    bitcoind.mine(expiry - 6 - bitcoind.tip_height())  # the expiry margin of all three
    await _step(srv)
    txids = {srv.store.get(c).close_txid for c in cids}
    assert len(txids) == 1 and None not in txids
    txid = txids.pop() or ""
    assert txid in bitcoind.rpc("getrawmempool")
    for c in cids:
        rec = srv.store.get(c)
        assert rec.state == "closing" and rec.end_reason == "expiry_margin"
        assert rec.close_tx_txid == txid and rec.close_txids == [txid]
    bitcoind.mine(2)
    await _step(srv)
    assert [srv.store.get(c).state for c in cids] == ["closed"] * 3
    _check_close(bitcoind, srv, txid, cids)
    assert sorted(srv.store.get(c).amount_sat for c in cids) == sorted(AMOUNTS)


async def test_a_bump_of_a_batch_keeps_every_payment(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    srv = await payee_factory.start(run_watcher=False, **CONFIG)
    cids = await _three_channels(srv, payer_client, bitcoind)
    expiry = srv.store.get(cids[0]).expiry_height
    bitcoind.mine(expiry - 6 - bitcoind.tip_height())
    await _step(srv)
    first = srv.store.get(cids[0]).close_txid or ""
    _mine_empty(bitcoind, 2)  # unconfirmed for bump_after_blocks: one replacement, all three in it
    await _step(srv)
    bumped = {srv.store.get(c).close_txid for c in cids}
    assert len(bumped) == 1 and first not in bumped
    second = bumped.pop() or ""
    mempool = bitcoind.rpc("getrawmempool")
    assert second in mempool and first not in mempool
    assert (srv.store.get(cids[0]).close_fee_rate or 0) >= 2.0
    for c in cids:
        assert srv.store.get(c).close_txids == [first, second]
    await _step(srv)  # the same block: no second replacement
    assert {srv.store.get(c).close_txid for c in cids} == {second}
    bitcoind.mine(2)
    await _step(srv)
    assert [srv.store.get(c).state for c in cids] == ["closed"] * 3
    _check_close(bitcoind, srv, second, cids)


async def test_a_refund_racing_one_channel_of_a_batch_is_outbid_and_the_others_close(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    """The batch is kept out of blocks until expiry; the payer of one channel replaces it with its
    refund (paying more); that channel is split out and outbids the refund, the other two close."""
    srv = await payee_factory.start(run_watcher=False, **CONFIG)
    cids = await _three_channels(srv, payer_client, bitcoind)
    expiry = srv.store.get(cids[0]).expiry_height
    bitcoind.mine(expiry - 6 - bitcoind.tip_height())
    await _step(srv)
    while bitcoind.tip_height() < expiry:  # every block leaves the batch out; the payee keeps bumping it
        _mine_empty(bitcoind, 1)
        await _step(srv)
    batch = srv.store.get(cids[0]).close_txid
    assert {srv.store.get(c).close_txid for c in cids} == {batch} and batch in bitcoind.rpc("getrawmempool")
    assert len(tx_of(bitcoind, batch or "")["vin"]) == 3
    racer, others = cids[1], [cids[0], cids[2]]
    refund = await payer_client.refund(racer, fee_rate_sat_vb=20.0)
    assert batch not in bitcoind.rpc("getrawmempool")  # the refund replaced the whole batch
    refund_fee = sats(bitcoind.rpc("getmempoolentry", refund)["fees"]["base"])

    async def settled() -> bool:
        await _step(srv)
        mempool = bitcoind.rpc("getrawmempool")
        return refund not in mempool and all(srv.store.get(c).close_txid in mempool for c in cids)

    await wait_until_async(settled, timeout=60, what="the refund outbid, the others' closes sent")
    bitcoind.mine(2)
    await _step(srv)
    assert [srv.store.get(c).state for c in cids] == ["closed"] * 3
    alone = tx_of(bitcoind, srv.store.get(racer).close_txid or "")
    assert len(alone["vin"]) == 1 and alone["vin"][0]["txid"] == srv.store.get(racer).funding_txid
    assert sats(alone["vout"][0]["value"]) == DEPOSIT - AMOUNTS[1]  # the payer's change as signed
    assert DEPOSIT - sum(sats(o["value"]) for o in alone["vout"]) > refund_fee  # outbid
    for c in others:
        close = tx_of(bitcoind, srv.store.get(c).close_txid or "")
        rec = srv.store.get(c)
        i = [(v["txid"], v["vout"]) for v in close["vin"]].index((rec.funding_txid, rec.funding_vout))
        assert sats(close["vout"][i]["value"]) == DEPOSIT - rec.amount_sat
        assert len(close["vin"]) == len(close["vout"]) - 1  # each input's payer paid back, one payee output


async def test_a_member_nearer_its_deadline_is_split_out_at_a_bump(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    """Three channels claimed in one pass with different expiries share a close; when the nearest
    one's last blocks come while the others' do not, it gets its own close at the deadline rate
    and the other two a replacement batch (neither delayed)."""
    srv = await payee_factory.start(run_watcher=False, **CONFIG)
    cids = await _three_channels(srv, payer_client, bitcoind, lifetimes=(40, 14, 40))
    near = cids[1]
    closer = srv.app[CLOSER]
    for c in cids:  # claimed by this process in one pass (the operator's end condition)
        assert closer.claim_only(c, "operator") is not None
    await closer.close_claimed(sorted(cids))
    batch = srv.store.get(near).close_txid
    assert {srv.store.get(c).close_txid for c in cids} == {batch}
    _mine_empty(bitcoind, srv.store.get(near).expiry_height - 3 - bitcoind.tip_height())
    await _step(srv)
    rest = [c for c in cids if c != near]
    alone, pair = srv.store.get(near).close_txid, srv.store.get(rest[0]).close_txid
    assert alone not in (None, batch) and pair not in (None, batch, alone)
    assert srv.store.get(rest[1]).close_txid == pair
    mempool = bitcoind.rpc("getrawmempool")
    assert alone in mempool and pair in mempool and batch not in mempool
    assert srv.store.get(near).close_fee_rate == 3.0  # the deadline rate
    bitcoind.mine(2)
    await _step(srv)
    assert [srv.store.get(c).state for c in cids] == ["closed"] * 3
    _check_close(bitcoind, srv, pair or "", rest)
    _check_close(bitcoind, srv, alone or "", [near])


async def test_a_recorded_batch_is_sent_byte_for_byte_after_a_restart(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    srv = await payee_factory.start(run_watcher=False, **CONFIG)
    cids = await _three_channels(srv, payer_client, bitcoind)
    await srv.stop()
    store = PayeeStore(srv.config.db_path)
    try:  # the dying process: claims all three, records its batch, never sends it
        closer = Closer(srv.config, store, payee_factory.node())
        await closer.start()
        for c in cids:
            assert closer.claim_only(c, "operator") is not None

        async def no_send(raw: str) -> str:
            raise KeyboardInterrupt("the process dies before the broadcast")

        closer.node.broadcast = no_send  # type: ignore[method-assign]
        try:
            await closer.close_claimed(cids)
        except KeyboardInterrupt:
            pass
        recorded = {(store.get(c).close_tx_txid, store.get(c).close_tx) for c in cids}
        assert len(recorded) == 1
        txid, raw = recorded.pop()
        assert txid is not None and raw is not None and txid not in bitcoind.rpc("getrawmempool")
        assert all(store.get(c).close_txid is None for c in cids)
    finally:
        del closer.node.broadcast
        store.close()
    srv = await payee_factory.start(srv.config, run_watcher=False)
    await _step(srv)
    assert txid in bitcoind.rpc("getrawmempool")
    assert tx_of(bitcoind, txid)["hex"] == raw  # byte for byte
    bitcoind.mine(2)
    await _step(srv)
    assert [srv.store.get(c).state for c in cids] == ["closed"] * 3
    assert all(srv.store.get(c).close_txids == [txid] for c in cids)
    _check_close(bitcoind, srv, txid, cids)


async def test_a_deadline_bump_of_a_batch_pays_the_most_its_payments_afford(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    """In the last blocks before expiry the batch is bumped toward a deadline rate its payments cannot
    pay: it is replaced by the batch paying the most they afford (the payee output at its dust
    limit), every payer's change still exact."""
    srv = await payee_factory.start(run_watcher=False, **{**CONFIG, "max_fee_rate_sat_vb": 1000.0})
    cids = await _three_channels(srv, payer_client, bitcoind)
    expiry = srv.store.get(cids[0]).expiry_height
    bitcoind.mine(expiry - 6 - bitcoind.tip_height())
    await _step(srv)
    first = srv.store.get(cids[0]).close_txid
    _mine_empty(bitcoind, 3)  # 3 blocks before expiry: the deadline schedule
    await _step(srv)
    last = srv.store.get(cids[0]).close_txid
    assert last not in (None, first) and {srv.store.get(c).close_txid for c in cids} == {last}
    close = tx_of(bitcoind, last or "")
    assert sats(close["vout"][-1]["value"]) == 294  # the dust limit of the payee's P2WPKH output
    assert close["vout"][-1]["scriptPubKey"]["type"] == "witness_v0_keyhash"
    bitcoind.mine(2)
    await _step(srv)
    assert [srv.store.get(c).state for c in cids] == ["closed"] * 3
    _check_close(bitcoind, srv, last or "", cids, max_rate=1000)


async def test_a_batch_recorded_by_part_of_its_channels_before_a_crash_closes_them_all(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    """The process died after two of the three channels recorded the batch: the restarted payee
    sends it byte for byte; the third channel, whose own close is refused (its funding is spent
    by the batch), adopts the batch as its close, so all three close with their exact payments.
    (Had the third been looked at first, its own close would have gone out and the other two would
    each close alone once their claims are stale: safe either way, this test fixes the order.)"""
    srv = await payee_factory.start(run_watcher=False, **CONFIG)
    cids = await _three_channels(srv, payer_client, bitcoind)
    await srv.stop()
    store = PayeeStore(srv.config.db_path)
    try:
        closer = Closer(srv.config, store, payee_factory.node())
        await closer.start()
        recs = [store.claim_close(c, "operator") for c in sorted(cids)]
        assert None not in recs
        tx = build_multi_close(
            [closer.channels.build(r) for r in recs if r is not None], closer.payout_of(store.get(min(cids))), 1.0
        )
        txid = bytes(tx.GetTxid())[::-1].hex()
        for c in cids[:2]:  # the third never recorded it (looked at last: the channels go oldest first)
            assert store.record_close_intent(c, txid, tx.serialize().hex(), 1.0, None)
        third = cids[2]
        assert store.release_close_claim(third)  # its claim is stale by now (the process is gone)
    finally:
        store.close()
    srv = await payee_factory.start(srv.config, run_watcher=False)
    await _step(srv)
    assert txid in bitcoind.rpc("getrawmempool")
    bitcoind.mine(2)

    async def closed() -> bool:
        await _step(srv)
        return [srv.store.get(c).state for c in cids] == ["closed"] * 3

    await wait_until_async(closed, timeout=30, what="all three closed by the batch")
    assert {srv.store.get(c).close_txid for c in cids} == {txid}
    _check_close(bitcoind, srv, txid, cids)
