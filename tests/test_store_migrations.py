"""Schema versions: databases written before versioning open, migrate and lose nothing.

``tests/fixtures/payee-v0.db`` and ``payer-v0.db`` were written by the stores of
the release before schema versioning (see ``tests/fixtures/README.md``). Every
test works on a copy.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from btcchannel.core.channel import PayeeChannel, PayerChannel
from btcchannel.core.keys import public_key
from btcchannel.core.params import ChannelParams, Payment
from btcchannel.core.state import ChannelState, sources
from btcchannel.core.tx import OutPoint
from btcchannel.errors import ChannelError, IllegalTransition
from btcchannel.store import PayeeRecord, PayeeStore, PayerStore, StoreSchemaError

FIXTURES = Path(__file__).parent / "fixtures"


def _copy(name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copyfile(FIXTURES / name, dst)
    return dst


def _raw_rows(path: Path) -> dict[str, dict[str, Any]]:
    """Every channel row as stored, read with plain sqlite3 (no store code)."""
    conn = sqlite3.connect(str(path))
    conn.row_factory = sqlite3.Row
    try:
        return {r["channel_id"]: dict(r) for r in conn.execute("SELECT * FROM channels")}
    finally:
        conn.close()


def _user_version(path: Path) -> int:
    conn = sqlite3.connect(str(path))
    try:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])
    finally:
        conn.close()


def _k(i: int) -> bytes:
    return bytes([i]) * 32


def _cid(n: int) -> str:
    return f"{n:02x}" * 16


def test_fixtures_are_unversioned() -> None:
    assert _user_version(FIXTURES / "payee-v0.db") == 0
    assert _user_version(FIXTURES / "payer-v0.db") == 0
    assert not list(FIXTURES.glob("*-wal")) and not list(FIXTURES.glob("*-shm"))


def test_payee_v0_migrates_without_losing_a_key_or_payment(tmp_path: Path) -> None:
    db = _copy("payee-v0.db", tmp_path)
    before = _raw_rows(db)
    assert len(before) == 8
    with PayeeStore(db) as s:
        assert s.schema_version == PayeeStore.latest_version() >= 2
        recs = {r.channel_id: r for r in s.list()}
    assert _user_version(db) == PayeeStore.latest_version()
    after = _raw_rows(db)
    assert set(after) == set(before) == set(recs)
    for cid, old in before.items():
        new = after[cid]
        flagged = (old["end_reason"] or "").endswith("+close_uneconomic")
        for col, value in old.items():
            if col == "end_reason" and flagged:
                continue
            assert new[col] == value, (cid, col)  # byte-for-byte: keys, signatures, amounts, txids
        assert new["close_uneconomic"] == int(flagged)
        rec = recs[cid]
        assert rec.state is ChannelState(old["state"])
        assert rec.privkey == old["privkey"] and rec.signature == old["signature"]
        assert rec.amount_sat == old["amount_sat"] and rec.close_txids == json.loads(old["close_txids"])
        assert rec.close_uneconomic is flagged
        assert rec.wire_end_reason == old["end_reason"]  # the protocol still reports the suffix

    marked = recs[_cid(4)]
    assert marked.state == "closing" and marked.close_uneconomic is True
    assert marked.end_reason == "payer_request" and before[_cid(4)]["end_reason"] == "payer_request+close_uneconomic"
    assert all(not r.close_uneconomic for cid, r in recs.items() if cid != _cid(4))
    closed = recs[_cid(5)]
    assert closed.state == "closed" and closed.close_txids == ["e5" * 32, "f5" * 32] and closed.close_txid == "f5" * 32
    assert recs[_cid(7)].close_txids == ["e7" * 32, "f7" * 32] and recs[_cid(7)].close_fee_rate == 5.0
    assert recs[_cid(8)].exception_txid == "f8" * 32 and recs[_cid(8)].state == "refunded"
    assert recs[_cid(2)].funding_inputs == [["bb" * 32, 1], ["cc" * 32, 0]]
    assert [r.state.value for r in recs.values()] == [
        "proposed",
        "funding",
        "open",
        "closing",
        "closed",
        "failed",
        "closing",
        "refunded",
    ]


def test_migrated_payee_rows_rebuild_valid_channels(tmp_path: Path) -> None:
    """The keys and signatures read back still make channels the core accepts."""
    with PayeeStore(_copy("payee-v0.db", tmp_path)) as s:
        for rec in s.list():
            if rec.signature is None:
                continue
            n = int(rec.channel_id[:2], 16)
            params = ChannelParams.from_json(rec.params)
            assert rec.funding_txid is not None and rec.funding_vout is not None
            params = params.with_funding(OutPoint(rec.funding_txid, rec.funding_vout))
            assert public_key(rec.privkey) == params.payee_pubkey and rec.privkey == _k(2 * n + 2)
            # the payee's machine checks the stored best payment's signature on construction
            ch = PayeeChannel(params, rec.privkey, state=ChannelState.OPEN, best=Payment(rec.amount_sat, rec.signature))
            assert ch.best is not None and ch.best.amount_sat == rec.amount_sat


def test_migrated_payee_store_keeps_working(tmp_path: Path) -> None:
    with PayeeStore(_copy("payee-v0.db", tmp_path)) as s:
        open_cid = _cid(3)
        assert s.record_payment(open_cid, 8_000, b"sig") is not None
        claimed = s.claim_close(open_cid, "operator")
        assert claimed is not None and claimed.state is ChannelState.CLOSING and not claimed.close_uneconomic
        assert s.mark_uneconomic(open_cid) and not s.mark_uneconomic(open_cid)
        rec = s.get(open_cid)
        assert rec.close_uneconomic and rec.end_reason == "operator"
        assert rec.wire_end_reason == "operator+close_uneconomic"
        assert s.count_proposals() == 1
        assert s.set_funding(_cid(1), "a1" * 32, 1, 0)
        assert s.mark_closed(_cid(7), "f7" * 32) and s.get(_cid(7)).close_txids == ["e7" * 32, "f7" * 32]


def test_opening_twice_is_idempotent(tmp_path: Path) -> None:
    db = _copy("payee-v0.db", tmp_path)
    with PayeeStore(db):
        pass
    first = _raw_rows(db)
    with PayeeStore(db) as s:
        assert s.schema_version == PayeeStore.latest_version()
        assert s.get(_cid(4)).end_reason == "payer_request" and s.get(_cid(4)).close_uneconomic
    assert _raw_rows(db) == first
    assert _user_version(db) == PayeeStore.latest_version()


def test_payer_v0_migrates_without_losing_a_key_or_payment(tmp_path: Path) -> None:
    db = _copy("payer-v0.db", tmp_path)
    before = _raw_rows(db)
    for _ in range(2):  # and a second open changes nothing
        with PayerStore(db) as p:
            assert p.schema_version == PayerStore.latest_version() >= 1
            recs = {r.channel_id: r for r in p.list()}
        after = _raw_rows(db)
        assert {cid: {k: row[k] for k in before[cid]} for cid, row in after.items()} == before
        # version 2's columns: no agreed terms (the payee's /v1/info rules), nothing counted yet
        assert all((row["terms"], row["units"], row["payments"]) == (None, 0, 0) for row in after.values())
    assert _user_version(db) == PayerStore.latest_version()
    rec = recs[_cid(3)]
    assert rec.state is ChannelState.OPEN and (rec.amount_sat, rec.acked_sat) == (7_500, 3_000)
    assert rec.privkey == _k(7) and rec.signature == before[_cid(3)]["signature"]
    params = ChannelParams.from_json(rec.params)
    assert params.funding is not None and params.funding.txid == rec.funding_txid
    assert rec.signature is not None
    # the payer machine verifies its stored payment's signature on construction
    ch = PayerChannel(params, rec.privkey, ChannelState.OPEN, Payment(rec.amount_sat, rec.signature))
    assert ch.amount_sat == 7_500
    assert recs[_cid(9)].state is ChannelState.PROPOSED and recs[_cid(9)].signature is None


@pytest.mark.parametrize("store, name", [(PayeeStore, "payee-v0.db"), (PayerStore, "payer-v0.db")])
def test_a_newer_database_is_refused(tmp_path: Path, store: type[PayeeStore] | type[PayerStore], name: str) -> None:
    db = _copy(name, tmp_path)
    with store(db):
        pass
    conn = sqlite3.connect(str(db))
    conn.execute(f"PRAGMA user_version={store.latest_version() + 1}")
    conn.close()
    before = _raw_rows(db)
    with pytest.raises(StoreSchemaError, match="newer") as info:
        store(db)
    assert isinstance(info.value, ChannelError)
    assert _raw_rows(db) == before and _user_version(db) == store.latest_version() + 1


def test_an_unversioned_file_with_another_layout_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "payee.db"
    conn = sqlite3.connect(str(db))
    conn.execute("CREATE TABLE channels (channel_id TEXT PRIMARY KEY, state TEXT NOT NULL)")
    conn.close()
    with pytest.raises(StoreSchemaError, match="unknown"):
        PayeeStore(db)
    assert _user_version(db) == 0


def test_a_fresh_file_is_created_at_the_latest_version(tmp_path: Path) -> None:
    with PayeeStore(tmp_path / "payee.db") as s, PayerStore(tmp_path / "payer.db") as p:
        assert s.schema_version == PayeeStore.latest_version()
        assert p.schema_version == PayerStore.latest_version()
    conn = sqlite3.connect(str(tmp_path / "payee.db"))
    with pytest.raises(sqlite3.IntegrityError):  # the flag is a boolean column
        conn.execute(
            "INSERT INTO channels (channel_id, state, params, privkey, deposit_sat, expiry_height, created_at,"
            " updated_at, close_uneconomic) VALUES ('x', 'proposed', '{}', x'00', 1, 1, 0, 0, 2)"
        )
    conn.close()


def test_transition_follows_the_table(tmp_path: Path) -> None:
    with PayeeStore(_copy("payee-v0.db", tmp_path)) as s:
        assert ChannelState.PROPOSED in sources("failed") and sources("funding_confirmed") == {ChannelState.FUNDING}
        assert s.transition(_cid(1), "funding_confirmed") is None  # proposed: not a source state
        assert s.get(_cid(1)).state is ChannelState.PROPOSED
        rec = s.transition(_cid(2), "funding_confirmed", confirmations=6)
        assert rec is not None and rec.state is ChannelState.OPEN and rec.confirmations == 6
        assert s.transition(_cid(5), "failed") is None  # closed is terminal
        with pytest.raises(ValueError):
            s.transition(_cid(3), "closing", privkey=b"\x00" * 32)
        with pytest.raises(IllegalTransition):
            s.transition(_cid(3), "no_such_event")
        # a close may be claimed while the funding is unconfirmed, as before
        s.insert_proposal(
            PayeeRecord(
                channel_id=_cid(10),
                state=ChannelState.PROPOSED,
                params={},
                privkey=b"\x01" * 32,
                deposit_sat=1,
                expiry_height=1,
            )
        )
        assert s.set_funding(_cid(10), "aa" * 32, 5, 0)
        claimed = s.claim_close(_cid(10), "payer_request")
        assert claimed is not None and claimed.state is ChannelState.CLOSING
        assert s.mark_exception(_cid(10), "refunded", "bb" * 32, "payer_refund")
        assert s.get(_cid(10)).state is ChannelState.REFUNDED
        with pytest.raises(ValueError):
            s.mark_exception(_cid(3), "closed", None, "x")


def test_channels_from_before_terms_run_under_the_current_terms_and_their_stored_end_conditions(
    tmp_path: Path,
) -> None:
    from btcchannel.core.terms import Terms
    from btcchannel.payee.shared import agreed_terms

    current = Terms(price_sat=100, mode="postpay", credit_limit_sat=500, payment_timeout_ms=7_000)
    with PayeeStore(_copy("payee-v0.db", tmp_path)) as s:
        rec = s.get(_cid(3))
        assert (rec.terms, rec.payments, rec.paid_at, rec.request_counter, rec.unit_credit) == (None, 0, None, 0, 0)
        agreed = agreed_terms(rec, current)
        assert agreed == current.with_end_conditions(max_units=10, max_total_sat=50_000)
        # a channel with stored terms keeps them whatever the payee's current ones are
        rec.terms = agreed.to_json()
        assert agreed_terms(rec, Terms(price_sat=999)) == agreed
