"""The payee's store on a real PostgreSQL server: the SQLite store's rules, schema versions,
group commit, the leader lock, and compare-and-set across processes."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from btcchannel.errors import FundingMismatch, StoreSchemaError, UnknownChannel
from btcchannel.payee.config import ServerConfig
from btcchannel.store import PayeeRecord, PayeeStore, open_payee_store
from btcchannel.store.postgres import PG_MIGRATIONS, PgPayeeStore
from btcchannel.wait import wait_until


def _proposal(cid: str, lapse_at: float | None = None) -> PayeeRecord:
    return PayeeRecord(
        channel_id=cid,
        state="proposed",
        params={"x": 1},
        privkey=b"\x01" * 32,
        deposit_sat=100_000,
        expiry_height=500,
        lapse_at=lapse_at,
    )


def _open(s: PayeeStore, cid: str, n: int = 1) -> None:
    s.insert_proposal(_proposal(cid))
    assert s.set_funding(cid, f"{n:064x}", 0, 1)
    assert s.set_confirmations(cid, 1, open_now=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PayeeStore]:
    """The payee's store on each backend."""
    target = tmp_path / "payee.db" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    s = open_payee_store(target)
    assert isinstance(s, PgPayeeStore) == (request.param == "postgresql")
    try:
        yield s
    finally:
        s.close()


async def test_credit_caps_across_channels_on_both_stores(store: PayeeStore) -> None:
    """The cross-channel caps on outstanding postpay credit hold in the credit's own statement."""
    s = store
    key, other = "02" + "aa" * 32, "03" + "bb" * 32
    for n, (cid, payer) in enumerate((("e1" * 16, key), ("e2" * 16, key), ("e3" * 16, key), ("e4" * 16, other))):
        s.insert_proposal(dataclasses.replace(_proposal(cid), params={"payer_pubkey": payer}, client="10.0.0.1"))
        assert s.set_funding(cid, f"{n + 40:064x}", 0, 1) and s.set_confirmations(cid, 1, open_now=True)
    per_key = [("payer_pubkey", key, 250)]
    assert await s.record_credit_async("e1" * 16, 0, 100, 1, 1, caps=per_key) is not None
    assert await s.record_credit_async("e2" * 16, 0, 100, 1, 1, caps=per_key) is not None
    assert s.outstanding_credit("payer_pubkey", key) == 200 and s.outstanding_credit() == 200
    assert await s.record_credit_async("e3" * 16, 0, 100, 1, 1, caps=per_key) is None  # 300 > 250
    assert await s.record_credit_async("e1" * 16, 100, 150, 1, 2, caps=per_key) is not None  # 250: within
    assert await s.record_credit_async("e4" * 16, 0, 100, 1, 1, caps=[("payer_pubkey", other, 250)]) is not None
    assert await s.record_credit_async("e3" * 16, 0, 100, 1, 1, caps=[("client", "10.0.0.1", 400)]) is None
    assert await s.record_credit_async("e3" * 16, 0, 50, 1, 1, caps=[(None, None, 400)]) is not None  # 400
    assert s.outstanding_credit("client", "10.0.0.1") == 400 and s.get("e3" * 16).owed_sat == 50
    assert s.record_payment("e1" * 16, 150, b"s", owed_sat=150)  # paid: no longer outstanding
    assert s.outstanding_credit("payer_pubkey", key) == 150


def test_the_same_rules_on_both_stores(store: PayeeStore) -> None:
    s = store
    cid = "ab" * 16
    s.insert_proposal(_proposal(cid))
    assert s.count_proposals() == 1
    with pytest.raises(UnknownChannel):
        s.get("cd" * 16)
    assert not s.record_payment(cid, 10, b"sig")  # no payment before open
    assert s.set_funding(cid, "11" * 32, 0, 0)
    assert not s.set_funding(cid, "11" * 32, 0, 0)
    assert s.set_confirmations(cid, 1, open_now=True)
    assert s.record_payment(cid, 10, b"s10")
    assert s.record_payment(cid, 20, b"s20", units_delta=1)
    assert not s.record_payment(cid, 15, b"s15")
    assert not s.record_payment(cid, 20, b"s20")
    rec = s.get(cid)
    assert (rec.amount_sat, rec.signature, rec.units, rec.state) == (20, b"s20", 1, "open")
    s.insert_proposal(_proposal("ef" * 16))
    with pytest.raises(FundingMismatch):  # one funding outpoint, one channel
        s.set_funding("ef" * 16, "11" * 32, 0, 0)
    claimed = s.claim_close(cid, "payer_request")
    assert claimed is not None and claimed.amount_sat == 20 and claimed.state == "closing"
    assert s.claim_close(cid, "again") is None
    assert not s.record_payment(cid, 30, b"s30")
    assert s.mark_uneconomic(cid) and not s.mark_uneconomic(cid)
    assert s.get(cid).wire_end_reason == "payer_request+close_uneconomic"
    assert s.set_close_tx(cid, "22" * 32, 2.0, 300, None)
    assert not s.set_close_tx(cid, "33" * 32, 4.0, 301, None)  # CAS on the previous txid (NULL here)
    assert s.set_close_tx(cid, "33" * 32, 4.0, 301, "22" * 32)
    assert s.get(cid).close_txids == ["22" * 32, "33" * 32]
    assert s.mark_closed(cid, "33" * 32)
    assert s.get(cid).state == "closed"
    assert not s.mark_exception(cid, "failed", "44" * 32, "x")
    # postpay credit: compare-and-set on the owed total
    _open(s, "cc" * 16, 7)
    assert s.record_credit("cc" * 16, 0, 100, 1) and not s.record_credit("cc" * 16, 0, 100, 1)
    assert s.record_payment("cc" * 16, 100, b"s", owed_sat=100)
    assert s.get("cc" * 16).owed_since is None
    # metered request counters and unit credit (schema version 3)
    _open(s, "dd" * 16, 8)
    rec = s.record_payment("dd" * 16, 100, b"p", units_delta=1, request_counter=5)
    assert rec is not None and (rec.payments, rec.request_counter, rec.units) == (1, 5, 1) and rec.paid_at
    assert s.record_payment("dd" * 16, 200, b"q", units_delta=1, request_counter=3).request_counter == 5  # type: ignore[union-attr]
    # 200 paid, one unit of 100 served after the other was unserved: 100 of surplus, one unit's credit
    assert s.unserve("dd" * 16, 1) and s.get("dd" * 16).units == 1
    assert s.use_surplus("dd" * 16, 1, 100, 5) is None  # the counter was used
    assert s.use_surplus("dd" * 16, 2, 100, 6) is None  # the surplus holds one unit, not two
    credited = s.use_surplus("dd" * 16, 1, 100, 6, b"k" * 32)
    assert credited is not None and (credited.units, credited.request_counter, credited.last_request) == (
        2,
        6,
        b"k" * 32,
    )
    assert s.use_surplus("dd" * 16, 1, 100, 7) is None  # spent
    # lapse
    s.insert_proposal(_proposal("01" * 16, lapse_at=time.time() - 1))
    assert s.lapse_proposals() == 1 and s.get("01" * 16).state == "failed"
    assert [r.channel_id for r in s.list(["open"])] == ["cc" * 16, "dd" * 16]


async def test_group_commit_on_both_stores(store: PayeeStore) -> None:
    ids = [f"{i:032x}" for i in range(100)]
    for i, cid in enumerate(ids):
        _open(store, cid, i + 1)
    recs = await asyncio.gather(*(store.record_payment_async(cid, 500, b"s" * 70) for cid in ids))
    assert all(r is not None and r.amount_sat == 500 for r in recs)
    assert store.writer.statements == 100 and store.writer.batches < 100
    assert all(store.get(cid).amount_sat == 500 for cid in ids)
    assert await store.record_payment_async(ids[0], 400, b"t" * 70) is None


def test_postgres_schema_versions(postgres_url: str) -> None:
    assert len(PG_MIGRATIONS) == len(PayeeStore.MIGRATIONS)  # one PostgreSQL migration per SQLite one
    with PgPayeeStore(postgres_url) as s:
        assert s.schema_version == PgPayeeStore.latest_version() == PayeeStore.latest_version()
    with PgPayeeStore(postgres_url) as s:  # opening again migrates nothing
        assert s.schema_version == PayeeStore.latest_version()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("INSERT INTO btcchannel_schema (version) VALUES (%s)", (PayeeStore.latest_version() + 1,))
    with pytest.raises(StoreSchemaError):
        PgPayeeStore(postgres_url)


def test_leader_lock_moves_when_the_leader_goes(postgres_url: str, tmp_path: Path) -> None:
    a, b = PgPayeeStore(postgres_url), PgPayeeStore(postgres_url)
    try:
        assert a.try_lead() and a.try_lead()
        assert not b.try_lead()
        a.close()  # its connections go: PostgreSQL releases the lock
        wait_until(b.try_lead, timeout=10, what="the other store to take the lead")
    finally:
        b.close()
    with PayeeStore(tmp_path / "payee.db") as lite:
        assert lite.try_lead()  # SQLite: every process leads


def test_server_config_store_url(tmp_path: Path, postgres_url: str) -> None:
    cfg = ServerConfig(datadir=tmp_path, store_url=postgres_url)
    assert cfg.store_target == postgres_url
    assert ServerConfig.from_json(cfg.to_json()).store_url == postgres_url
    assert ServerConfig(datadir=tmp_path).store_target == tmp_path / "payee.db"
    with pytest.raises(ValueError):
        ServerConfig(datadir=tmp_path, store_url="mysql://x")


_RACE = """
import sys
from btcchannel.store.postgres import PgPayeeStore
s = PgPayeeStore(sys.argv[1])
print(sum(1 for cid in sys.argv[2:] if s.claim_close(cid, "race") is not None))
"""


def test_processes_never_both_claim_a_close(postgres_url: str) -> None:
    with PgPayeeStore(postgres_url) as s:
        ids = [f"{i:032x}" for i in range(60)]
        for i, cid in enumerate(ids):
            _open(s, cid, i + 1)
        procs = [
            subprocess.Popen([sys.executable, "-c", _RACE, postgres_url, *ids], stdout=subprocess.PIPE, text=True)
            for _ in range(3)
        ]
        assert sum(int(p.communicate(timeout=60)[0]) for p in procs) == len(ids)
        assert all(r.state == "closing" for r in s.list())
