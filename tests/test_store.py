"""Tests of the durable stores (no node needed)."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from btcchannel.core.state import ChannelState, PayeeLifecycle, Transition, transition
from btcchannel.errors import BadRequest, FundingMismatch, UnknownChannel
from btcchannel.store import PayeeRecord, PayeeStore, PayerRecord, PayerStore


def _proposal(cid: str = "aa" * 16, lapse_at: float | None = None) -> PayeeRecord:
    return PayeeRecord(
        channel_id=cid,
        state="proposed",
        params={"x": 1},
        privkey=b"\x01" * 32,
        deposit_sat=100_000,
        expiry_height=500,
        lapse_at=lapse_at,
    )


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_files_are_private(tmp_path: Path) -> None:
    s = PayeeStore(tmp_path / "d" / "payee.db")
    s.insert_proposal(_proposal())
    assert _mode(tmp_path / "d") == 0o700
    for f in (tmp_path / "d").iterdir():
        assert _mode(f) == 0o600, f
    p = PayerStore(tmp_path / "payer.db")
    assert _mode(tmp_path / "payer.db") == 0o600
    s.close()
    p.close()


def test_payee_lifecycle_and_best_payment(tmp_path: Path) -> None:
    s = PayeeStore(tmp_path / "payee.db")
    cid = "ab" * 16
    s.insert_proposal(_proposal(cid))
    assert s.count_proposals() == 1
    with pytest.raises(UnknownChannel):
        s.get("cd" * 16)
    # no payment before open
    assert not s.record_payment(cid, 10, b"sig")
    assert s.set_funding(cid, "11" * 32, 0, 0)
    assert not s.set_funding(cid, "11" * 32, 0, 0)
    assert s.set_confirmations(cid, 1, open_now=True)
    assert s.record_payment(cid, 10, b"s10")
    assert s.record_payment(cid, 20, b"s20", units_delta=1)
    assert not s.record_payment(cid, 15, b"s15")
    assert not s.record_payment(cid, 20, b"s20")
    rec = s.get(cid)
    assert (rec.amount_sat, rec.signature, rec.units, rec.state) == (20, b"s20", 1, "open")
    # the same funding outpoint can't be claimed by a second channel
    s.insert_proposal(_proposal("ef" * 16))
    with pytest.raises(FundingMismatch):
        s.set_funding("ef" * 16, "11" * 32, 0, 0)
    claimed = s.claim_close(cid, "payer_request")
    assert claimed is not None and claimed.amount_sat == 20 and claimed.state == "closing"
    assert s.claim_close(cid, "again") is None
    assert not s.record_payment(cid, 30, b"s30")
    assert s.set_close_tx(cid, "22" * 32, 2.0, 300, None)
    assert not s.set_close_tx(cid, "33" * 32, 4.0, 301, None)  # CAS on previous txid
    assert s.set_close_tx(cid, "33" * 32, 4.0, 301, "22" * 32)
    assert s.get(cid).close_txids == ["22" * 32, "33" * 32]
    assert s.mark_closed(cid, "33" * 32)
    assert s.get(cid).state == "closed"
    assert not s.mark_exception(cid, "failed", "44" * 32, "x")
    s.close()


def test_postpay_credit_cas(tmp_path: Path) -> None:
    s = PayeeStore(tmp_path / "payee.db")
    cid = "ab" * 16
    s.insert_proposal(_proposal(cid))
    s.set_funding(cid, "11" * 32, 0, 1)
    s.set_confirmations(cid, 1, open_now=True)
    assert s.record_credit(cid, 0, 100, 1)
    assert not s.record_credit(cid, 0, 100, 1)
    rec = s.get(cid)
    assert rec.owed_sat == 100 and rec.owed_since is not None
    assert s.record_credit(cid, 100, 200, 1)
    assert s.record_payment(cid, 100, b"s", owed_sat=100)
    assert s.get(cid).owed_since is not None  # 100 more owed since
    assert s.record_payment(cid, 200, b"t", owed_sat=200)
    rec = s.get(cid)
    assert rec.owed_since is None and rec.amount_sat == 200 and rec.owed_sat == 200


def test_lapse(tmp_path: Path) -> None:
    s = PayeeStore(tmp_path / "payee.db")
    s.insert_proposal(_proposal("01" * 16, lapse_at=time.time() - 1))
    s.insert_proposal(_proposal("02" * 16, lapse_at=time.time() + 100))
    assert s.lapse_proposals() == 1
    assert s.get("01" * 16).state == "failed"
    assert s.count_proposals() == 1


_RACE = """
import sys
from btcchannel.store import PayeeStore
s = PayeeStore(sys.argv[1])
n = 0
for cid in sys.argv[2:]:
    if s.claim_close(cid, "race") is not None:
        n += 1
print(n)
"""


def test_two_processes_never_both_claim_a_close(tmp_path: Path) -> None:
    db = tmp_path / "payee.db"
    s = PayeeStore(db)
    ids = [f"{i:032x}" for i in range(60)]
    for cid in ids:
        s.insert_proposal(_proposal(cid))
        s.set_funding(cid, f"{int(cid, 16):064x}", 0, 1)
        s.set_confirmations(cid, 1, open_now=True)
    procs = [
        subprocess.Popen([sys.executable, "-c", _RACE, str(db), *ids], stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    total = sum(int(p.communicate(timeout=60)[0]) for p in procs)
    assert total == len(ids)
    assert all(r.state == "closing" for r in s.list())


def test_payer_store_signed_before_sent_and_backup(tmp_path: Path) -> None:
    p = PayerStore(tmp_path / "payer.db")
    cid = "cd" * 16
    p.insert(
        PayerRecord(
            channel_id=cid,
            server_url="http://x",
            state="proposed",
            params={"a": 1},
            privkey=b"\x02" * 32,
            deposit_sat=50_000,
            expiry_height=400,
        )
    )
    assert p.save_signed(cid, 100, b"s100")
    assert not p.save_signed(cid, 90, b"s90")
    p.set_acked(cid, 100)
    p.set_acked(cid, 50)
    rec = p.get(cid)
    assert (rec.amount_sat, rec.acked_sat, rec.signature) == (100, 100, b"s100")
    p.set_state(cid, "open", funding_txid="ab" * 32, funding_vout=1)
    backup = p.export_backup()
    q = PayerStore(tmp_path / "other.db")
    assert q.import_backup(backup) == 1
    assert q.get(cid) == p.get(cid)
    assert p.save_signed(cid, 200, b"s200")
    assert q.import_backup(p.export_backup()) == 1
    assert q.get(cid).amount_sat == 200
    with pytest.raises(BadRequest):
        q.import_backup({"kind": "nope"})


def test_record_payment_returns_the_committed_row(tmp_path: Path) -> None:
    s = PayeeStore(tmp_path / "payee.db")
    cid = "ab" * 16
    s.insert_proposal(_proposal(cid))
    s.set_funding(cid, "11" * 32, 0, 1)
    s.set_confirmations(cid, 1, open_now=True)
    rec = s.record_payment(cid, 10, b"s10", units_delta=2)
    assert rec is not None and rec.amount_sat == 10 and rec.units == 2 and rec.signature == b"s10"
    assert not s._db.in_transaction
    # another connection sees it at once: the row was committed before record_payment returned
    other = sqlite3.connect(str(tmp_path / "payee.db"))
    assert other.execute("SELECT amount_sat FROM channels WHERE channel_id=?", (cid,)).fetchone()[0] == 10
    other.close()
    s.close()


def test_a_transition_is_persisted_exactly_and_decided_again_when_its_row_moved(tmp_path: Path) -> None:
    s = PayeeStore(tmp_path / "payee.db")
    cid = "ab" * 16
    s.insert_proposal(_proposal(cid))
    assert s.set_funding(cid, "11" * 32, 0, 1) and s.set_confirmations(cid, 1, open_now=True)
    kept = s.get(cid)  # read while open
    assert s.funding_lost(cid, 0)  # then another writer takes it back to funding
    # the record decided on the kept row is persisted only while the row is still in its old state
    assert s.apply(PayeeLifecycle(cid, kept.state).closing("operator", 1.0)) is None
    assert s.get(cid).state is ChannelState.FUNDING and s.get(cid).end_reason is None
    # fired on the kept row, it loses that compare-and-set and is decided again on the stored one
    decided: list[ChannelState] = []

    def claim(life: PayeeLifecycle, rec: PayeeRecord) -> Transition:
        decided.append(life.state)
        return life.closing("operator", 2.0)

    claimed = s.fire(cid, claim, kept)
    assert decided == [ChannelState.OPEN, ChannelState.FUNDING]
    assert claimed is not None and claimed.state is ChannelState.CLOSING and claimed.close_claimed_at == 2.0
    # an event the stored state does not allow is not tried; a guard that refuses is not retried
    assert s.fire(cid, lambda life, _: life.funding_confirmed(1)) is None
    assert s.mark_uneconomic(cid) and not s.mark_uneconomic(cid)
    with pytest.raises(ValueError):
        s.apply(transition(cid, ChannelState.CLOSING, "closed", privkey=b"\x00" * 32))
    assert s.get(cid).state is ChannelState.CLOSING
    s.close()


def test_a_proposal_ends_unfunded_only_while_it_is_one(tmp_path: Path) -> None:
    s = PayeeStore(tmp_path / "payee.db")
    s.insert_proposal(_proposal("01" * 16, lapse_at=time.time() - 1))
    s.insert_proposal(_proposal("02" * 16, lapse_at=time.time() - 1))
    assert s.set_funding("02" * 16, "22" * 32, 0, 0)  # funded before it lapsed: no lapse any more
    assert not s.end_proposal("02" * 16, "cancelled_by_payer")
    assert s.lapse_proposals() == 1
    assert s.get("01" * 16).end_reason == "lapsed" and s.get("02" * 16).state is ChannelState.FUNDING
    assert not s.end_proposal("01" * 16, "cancelled_by_payer")  # failed already
    s.close()
