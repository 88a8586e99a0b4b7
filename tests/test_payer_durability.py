"""The payer's durability on the metered path: one durable commit per paid request, request counters
reserved in blocks (a restarted payer starts above every counter it used), the units received written
without waiting for the disk (a killed process loses none; an operating system crash may under-count
them, never over-count, and the protocol recovers the count)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.payee.metered import add_file_route
from btcchannel.payer.metered import MeteredPayer
from btcchannel.store import PayerRecord, PayerStore
from btcchannel.store.payer import COUNTER_BLOCK
from btcchannel.testing import open_channel
from btcchannel.testing.fixtures import PayeeFactory, PayerFactory

CID = "11" * 16
PRICE = 100
CHUNK = 100


def _store(path: Path) -> PayerStore:
    store = PayerStore(path)
    if store.find(CID) is None:
        store.insert(
            PayerRecord(
                channel_id=CID,
                server_url="http://payee",
                state="open",
                params={"network": "regtest"},
                privkey=b"\x01" * 32,
                deposit_sat=100_000,
                expiry_height=500,
            )
        )
    return store


async def _paid_request(store: PayerStore, amount: int, clock: int) -> int:
    """What a prepay request does in the store: the payment stored before it is sent, the request's
    counter, then the unit counted as received; returns the counter."""
    assert await store.save_signed_async(CID, amount, b"sig%d" % amount, counter_floor=clock)
    counter = await store.next_request_counter_async(CID, clock)
    store.add_units(CID, 1, amount)
    return counter


async def test_a_paid_request_commits_once(tmp_path: Path) -> None:
    store = _store(tmp_path / "payer.db")
    try:
        clock = 1_000_000
        await _paid_request(store, PRICE, clock)  # the first request also reserves a block of counters
        batches = store.writer.batches
        counters, floors = [], []
        for i in range(2, 42):
            clock += COUNTER_BLOCK // 7  # the clock runs: blocks run out and are extended with payments
            floors.append(clock)
            counters.append(await _paid_request(store, i * PRICE, clock))
        assert store.writer.batches - batches == 40  # one durable commit per paid request
        # the units' write on the event loop waits for no disk, and the store's own writes stay durable
        assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # noqa: SLF001 - FULL
        assert counters == sorted(set(counters)) and counters[0] > 0
        assert all(c >= floor for c, floor in zip(counters, floors, strict=True))
        rec = store.get(CID)
        assert (rec.amount_sat, rec.units, rec.acked_sat) == (41 * PRICE, 41, 41 * PRICE)
        assert rec.request_counter >= counters[-1]  # the stored bound covers every counter used
    finally:
        store.close()


async def test_a_restarted_payer_counts_above_every_counter_it_used(tmp_path: Path) -> None:
    path = tmp_path / "payer.db"
    first = _store(path)
    used = [first.next_request_counter(CID, 5)]
    used += [await first.next_request_counter_async(CID, 0) for _ in range(10)]  # a clock stepped back
    used.append(await _paid_request(first, PRICE, 7))
    assert used == sorted(set(used))
    # killed between payments: nothing of its memory survives (the file is opened afresh, the first
    # store is never closed)
    second = _store(path)
    try:
        after = [second.next_request_counter(CID, 0), await second.next_request_counter_async(CID, 0)]
        assert min(after) > max(used) and after[0] < after[1]
        assert second.last_request_counter(CID) == after[1]
        # a resync from the payee's 401 moves the next counter above the one it names
        second.raise_request_counter(CID, after[1] + 10 * COUNTER_BLOCK)
        assert second.next_request_counter(CID, 0) > after[1] + 10 * COUNTER_BLOCK
    finally:
        second.close()
        first.close()


async def test_units_received_survive_a_killed_payer(tmp_path: Path) -> None:
    path = tmp_path / "payer.db"
    first = _store(path)
    await _paid_request(first, PRICE, 1)
    await _paid_request(first, 2 * PRICE, 2)
    killed = _store(path)  # the file as a killed process leaves it (the first store is not closed)
    try:
        rec = killed.get(CID)
        assert (rec.units, rec.acked_sat, rec.amount_sat) == (2, 2 * PRICE, 2 * PRICE)
    finally:
        killed.close()
        first.close()


async def test_a_payer_that_lost_its_units_count_recovers_it(
    bitcoind: RegtestNode,
    tmp_path: Path,
    payee_factory: PayeeFactory,
    payer_factory: PayerFactory,
) -> None:
    data = tmp_path / "data.bin"
    data.write_bytes(os.urandom(CHUNK * 8))
    srv = await payee_factory.start(
        hook=lambda app: add_file_route(app, data, chunk_size=CHUNK), price_sat=PRICE, mode="prepay"
    )
    client = payer_factory("payer")
    cid = await open_channel(client, bitcoind, srv.url, 100_000)
    payer = MeteredPayer(client, cid)
    for i in range(3):
        assert (await payer.fetch(f"{srv.url}/v1/file/{i}"))[0] == 200
    await payer.aclose()
    await client.aclose()
    # the operating system crashed before the last units' count (written without fsync) reached the disk
    db = sqlite3.connect(tmp_path / "payer" / "payer.db")
    with db:
        db.execute("UPDATE channels SET units=units-1, acked_sat=? WHERE channel_id=?", (2 * PRICE, cid))
    db.close()
    restarted = payer_factory("payer")
    rec = restarted.store.get(cid)
    assert (rec.units, rec.amount_sat) == (2, 3 * PRICE)  # under-counted: signs less, never more
    payer = MeteredPayer(restarted, cid)
    try:
        status, body = await payer.fetch(f"{srv.url}/v1/file/3")
    finally:
        await payer.aclose()
    assert status == 200 and body == data.read_bytes()[3 * CHUNK : 4 * CHUNK]
    # the payee's 402 for the unit it had no credit for was counted as received: one payment more
    payee_rec, payer_rec = srv.store.get(cid), restarted.store.get(cid)
    assert (payee_rec.units, payee_rec.amount_sat) == (4, 4 * PRICE)
    assert (payer_rec.units, payer_rec.amount_sat) == (4, 4 * PRICE)
    assert payer_rec.request_counter >= payee_rec.request_counter
