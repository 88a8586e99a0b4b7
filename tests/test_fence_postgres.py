"""Fencing of the leader on PostgreSQL (a real server, a real regtest node, real processes).

The leader's lock session is ended under its feet (``pg_terminate_backend``, what a network blip,
a pooler or ``idle_session_timeout`` does): it stops acting at once, another instance leads, and
the stale leader's close compare-and-sets fail (the leader epoch). A close whose intent was not
recorded (by this leader, for every channel it spends) is never broadcast.
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.core import keys
from btcchannel.core.tx import OutPoint
from btcchannel.payee.http import CLOSER, WATCHER
from btcchannel.payee.leadership import LEAD_LINE, LOST_LINE
from btcchannel.payer.client import PayerClient
from btcchannel.store import PayeeRecord
from btcchannel.store.postgres import PgPayeeStore
from btcchannel.testing import ServerProcess, open_channel, sats, tx_of, wait_until_async
from btcchannel.testing.fixtures import PayeeFactory, PayerFactory
from btcchannel.testing.payee import RunningPayee
from btcchannel.testing.postgres import terminate_leader
from btcchannel.wait import wait_until

DEPOSIT = 200_000
CONFIG: dict[str, Any] = dict(close_margin_blocks=6, close_fee_rate_sat_vb=1.0, final_confirmations=1)


def _proposal(cid: str) -> PayeeRecord:
    return PayeeRecord(
        channel_id=cid, state="proposed", params={"x": 1}, privkey=b"\x01" * 32, deposit_sat=100_000, expiry_height=500
    )


def _closing(s: PgPayeeStore, cid: str, n: int) -> None:
    s.insert_proposal(_proposal(cid))
    assert s.set_funding(cid, f"{n:064x}", 0, 1)
    assert s.set_confirmations(cid, 1, open_now=True)
    assert s.claim_close(cid, "operator") is not None


def test_a_stale_leader_cannot_record_or_claim_a_close(postgres_url: str) -> None:
    a, b = PgPayeeStore(postgres_url), PgPayeeStore(postgres_url)
    try:
        assert a.try_lead() and a.still_leads() and not b.try_lead()
        first = a.epoch
        for i, cid in enumerate(["aa" * 16, "bb" * 16, "cc" * 16]):
            _closing(a, cid, i + 1)
        assert terminate_leader(postgres_url) is not None
        wait_until(b.try_lead, timeout=10, what="the other store to take the lead")
        assert b.epoch is not None and first is not None and b.epoch > first
        assert not a.still_leads()
        # the stale leader's close compare-and-sets fail; the new leader's succeed
        assert not a.record_close_intent("aa" * 16, "11" * 32, "00", 1.0, None)
        assert not a.set_close_tx("aa" * 16, "11" * 32, 1.0, 300, None)
        assert not a.reclaim_stale_close("aa" * 16, time.time() + 60)
        assert not a.record_close_intents(["bb" * 16, "cc" * 16], "22" * 32, "00", 1.0, None)
        assert a.get("aa" * 16).close_tx_txid is None and a.get("bb" * 16).close_tx_txid is None
        assert b.record_close_intent("aa" * 16, "11" * 32, "00", 1.0, None)
        # a shared close is recorded for all of its channels or none
        assert b.set_close_tx("cc" * 16, "33" * 32, 1.0, 300, None)  # broadcast by someone else
        assert not b.record_close_intents(["bb" * 16, "cc" * 16], "44" * 32, "00", 1.0, None)
        assert b.get("bb" * 16).close_tx_txid is None and b.get("cc" * 16).close_tx_txid is None
        # the stale one takes the lock again only once it is free, with a new epoch
        assert not a.try_lead()
        b.close()
        wait_until(a.try_lead, timeout=10, what="the first store to lead again")
        assert a.epoch is not None and a.epoch > (b.epoch or 0)
        assert a.record_close_intents(["bb" * 16], "55" * 32, "00", 1.0, None)
    finally:
        a.close()
        b.close()


async def _paid_channels(srv: RunningPayee, client: PayerClient, bitcoind: RegtestNode) -> list[str]:
    cids = [await client.open_channel(srv.url, DEPOSIT, 30, wait_open=False) for _ in range(3)]
    bitcoind.mine(1)
    await srv.app[WATCHER].step()
    for cid, amount in zip(cids, (20_000, 30_000, 40_000)):
        await client.wait_open(cid, timeout=30)
        await client.pay(cid, amount)
    return cids


def _unspent(bitcoind: RegtestNode, rec: PayeeRecord) -> bool:
    assert rec.funding_txid is not None and rec.funding_vout is not None
    out = OutPoint(rec.funding_txid, rec.funding_vout)
    return bitcoind.rpc("gettxout", out.txid, out.vout, True) is not None


async def test_a_close_whose_intent_lost_its_compare_and_set_is_never_broadcast(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
    postgres_url: str,
) -> None:
    srv = await payee_factory.start(run_watcher=False, store_url=postgres_url, **CONFIG)
    closer = srv.app[CLOSER]
    await closer.leadership.acquire(0.05)
    *cids, late = await _paid_channels(srv, payer_client, bitcoind)
    for c in cids:
        assert closer.claim_only(c, "operator") is not None
    # another process records a broadcast close of the second channel while the batch is recorded:
    # the batch (spending both fundings) must not go out
    other = PgPayeeStore(postgres_url)
    record = srv.store.record_close_intent

    def raced(cid: str, *args: Any) -> bool:
        if cid == cids[1]:
            assert other.set_close_tx(cids[1], "ab" * 32, 1.0, bitcoind.tip_height(), None)
        return record(cid, *args)

    srv.store.record_close_intent = raced  # type: ignore[method-assign]
    try:
        await closer.close_claimed(cids)
    finally:
        del srv.store.record_close_intent
        other.close()
    recs = [srv.store.get(c) for c in cids]
    assert all(_unspent(bitcoind, r) for r in recs)  # nothing spent either funding
    assert recs[0].close_tx_txid is None and recs[0].close_txid is None  # all or none recorded

    # the leader's lock session ends; another instance leads: this one sends nothing any more
    with PgPayeeStore(postgres_url) as other:
        assert terminate_leader(postgres_url) is not None
        wait_until(other.try_lead, timeout=10, what="another instance to take the lead")
        await closer.close_claimed([cids[0]])
        assert not closer.leadership.held
        assert _unspent(bitcoind, srv.store.get(cids[0]))
        assert srv.store.get(cids[0]).close_tx_txid is None
        # a close the stale instance is asked for is claimed (no more payments) but left to the leader
        assert closer.claim(late, "operator") is not None
        await closer.aclose()  # (waits for any background broadcast: there must be none)
        assert _unspent(bitcoind, srv.store.get(late))
        assert srv.store.get(late).close_claimed_at == 0  # the leader adopts it at its next pass


def _log(proc: ServerProcess) -> str:
    return proc.log_file.read_text(errors="replace") if proc.log_file.exists() else ""


async def test_leader_lock_session_terminated_under_load(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    payer_factory: PayerFactory,
    postgres_url: str,
) -> None:
    """Payments flow through two instances; the leader's lock session is terminated: the old leader
    stops within 2 s (no step, no broadcast, no close compare-and-set), the other leads, and every
    channel closes once, for exactly what the payer was acknowledged."""
    a = payee_factory.process(payee_factory.config("payee-a", store_url=postgres_url, **CONFIG))
    b = payee_factory.process(payee_factory.config("payee-b", store_url=postgres_url, **CONFIG))
    url_a = await a.start()
    await wait_until_async(lambda: LEAD_LINE in _log(a), timeout=10, what="the first instance to lead")
    url_b = await b.start()
    client = payer_factory(timeout=10)
    ids = [await open_channel(client, bitcoind, url_a if i % 2 else url_b, DEPOSIT, 16) for i in range(4)]

    stop = asyncio.Event()

    async def stream(cid: str) -> None:
        i = 0
        while not stop.is_set():
            payment = await client.sign_next(cid, client.store.get(cid).amount_sat + 100)
            _, ans = await client.request(
                "POST", f"{url_a if i % 2 else url_b}/v1/channels/{cid}/payments", payment.to_json()
            )
            assert ans["amount_sat"] == payment.amount_sat
            client.store.set_acked(cid, payment.amount_sat)
            i += 1

    payers = [asyncio.ensure_future(stream(cid)) for cid in ids]
    await wait_until_async(
        lambda: all(client.store.get(c).acked_sat >= 1_000 for c in ids),
        timeout=60,
        what="payments flowing through both instances",
    )
    assert terminate_leader(postgres_url) is not None
    await wait_until_async(lambda: LOST_LINE in _log(a), timeout=2, what="the old leader to stop")
    await wait_until_async(lambda: LEAD_LINE in _log(b), timeout=10, what="the other instance to lead")
    await wait_until_async(
        lambda: all(client.store.get(c).acked_sat >= 2_000 for c in ids),
        timeout=60,
        what="payments flowing on after the change of leader",
    )
    stop.set()
    await asyncio.wait_for(asyncio.gather(*payers), 30)
    acked = {cid: client.store.get(cid).acked_sat for cid in ids}
    # a close asked of the old leader: claimed there (no more payments), sent by the new leader
    sig = keys.sign_digest(client.store.get(ids[0]).privkey, keys.close_request_digest(ids[0])).hex()
    _, obj = await client.request("POST", f"{url_a}/v1/channels/{ids[0]}/close", {"signature": sig})
    assert obj["state"] == "closing" and obj["amount_sat"] == acked[ids[0]]

    # every channel reaches its closing height: only the new leader closes
    with PgPayeeStore(postgres_url) as store:
        expiry = max(store.get(c).expiry_height for c in ids)
        bitcoind.mine(expiry - 6 - bitcoind.tip_height())
        await wait_until_async(
            lambda: all(store.get(c).close_txid for c in ids), timeout=30, what="every close broadcast"
        )
        bitcoind.mine(1)
        await wait_until_async(
            lambda: all(store.get(c).state == "closed" for c in ids), timeout=30, what="the closes confirmed"
        )
        for cid in ids:
            rec = store.get(cid)
            assert len(rec.close_txids) == 1  # one closer: no competing close was ever recorded
            close = tx_of(bitcoind, str(rec.close_txid))
            i = [(v["txid"], v["vout"]) for v in close["vin"]].index((rec.funding_txid, rec.funding_vout))
            assert sats(close["vout"][i]["value"]) == DEPOSIT - acked[cid]  # exactly what was acknowledged
    after = _log(a).split(LOST_LINE, 1)[1]
    assert "broadcast" not in after and LEAD_LINE not in after  # the old leader acted no more
    assert "broadcast" in _log(b)
    assert await a.stop(signal.SIGTERM) == 0 and not a.error_lines() and not b.error_lines()
