"""A stateless proposal's channel row, written at its first funding report (SQLite and PostgreSQL
stores): in one statement, idempotent for the same outpoint, refused for another one or an
outpoint another channel holds, written once by processes racing on one database; its key, not
indexed, comes back from the seed and the channel id. The payer keeps the token with its channel
and in its backups."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from btcchannel.core.keys import public_key
from btcchannel.core.seed import derive_stateless_key
from btcchannel.core.state import ChannelState
from btcchannel.errors import FundingMismatch
from btcchannel.store import PayeeRecord, PayeeStore, PayerRecord, PayerStore, open_payee_store


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where the payee's store lives on each backend (an SQLite path or a PostgreSQL URL)."""
    if request.param == "sqlite":
        return str(tmp_path / "payee.db")
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def store(target: str) -> Iterator[PayeeStore]:
    s = open_payee_store(target)
    try:
        yield s
    finally:
        s.close()


def _funded(
    cid: str, txid: str, vout: int = 0, *, state: str = "funding", privkey: bytes = b"\x01" * 32
) -> PayeeRecord:
    return PayeeRecord(
        channel_id=cid,
        state=state,
        params={"payer_pubkey": "02" + "aa" * 32, "payee_pubkey": public_key(privkey).hex()},
        privkey=privkey,
        deposit_sat=100_000,
        expiry_height=500,
        created_at=1_700_000_000.0,
        funding_txid=txid,
        funding_vout=vout,
        confirmations=0 if state == "funding" else 1,
        funding_inputs=[["cc" * 32, 1]],
        max_units=3,
        created_height=250,
        terms={"price_sat": 10},
        payout_script="0014" + "bb" * 20,
        client="10.0.0.1",
    )


def test_the_first_funding_report_writes_the_row_once(store: PayeeStore) -> None:
    s = store
    cid, other = "a1" * 16, "a2" * 16
    rec = s.insert_funded(_funded(cid, "11" * 32))
    assert rec.state is ChannelState.FUNDING and (rec.funding_txid, rec.funding_vout) == ("11" * 32, 0)
    assert rec.key_index is None and rec.lapse_at is None and rec.created_height == 250
    assert rec.funding_inputs == [["cc" * 32, 1]] and rec.terms == {"price_sat": 10} and rec.client == "10.0.0.1"
    assert rec.payer_pubkey == "02" + "aa" * 32 and s.count_proposals() == 0
    again = s.insert_funded(_funded(cid, "11" * 32))  # the same report again: the same row
    assert again == rec and len(s.list()) == 1
    with pytest.raises(FundingMismatch, match="already has a funding"):
        s.insert_funded(_funded(cid, "11" * 32, vout=1))
    with pytest.raises(FundingMismatch, match="another channel"):
        s.insert_funded(_funded(other, "11" * 32))
    assert s.find(other) is None and len(s.list()) == 1 and s.get(cid) == rec
    opened = s.insert_funded(_funded(other, "22" * 32, state="open"))  # deep enough: open at once
    assert opened.state is ChannelState.OPEN and opened.confirmations == 1
    with pytest.raises(ValueError):
        s.insert_funded(dataclasses.replace(_funded("a3" * 16, "33" * 32), state="proposed"))


def test_a_stateless_channels_lost_key_comes_back_from_the_seed(store: PayeeStore) -> None:
    s = store
    seed = s.seed()
    cid = "b1" * 16
    key = derive_stateless_key(seed, cid)
    s.insert_funded(_funded(cid, "44" * 32, privkey=key))
    s.insert_funded(_funded("b2" * 16, "55" * 32))  # a random key (not the seed's): stays lost
    s._db.execute("UPDATE channels SET privkey=?", (b"",))
    assert s.restore_keys() == 1
    assert s.get(cid).privkey == key and s.get("b2" * 16).privkey == b""


_RACE = """
import sys
from btcchannel.errors import FundingMismatch
from btcchannel.store import PayeeRecord, open_payee_store
def funded_row(cid, txid):
    return PayeeRecord(channel_id=cid, state="funding", params={"payer_pubkey": "02" + "aa" * 32},
                       privkey=b"\x01" * 32, deposit_sat=100_000, expiry_height=500, funding_txid=txid,
                       funding_vout=0)
s = open_payee_store(sys.argv[1])
tag, ids = sys.argv[2], sys.argv[3:]
won = 0
for n, cid in enumerate(ids):
    txid = f"{n:064x}" if tag == "same" else f"{tag}{n:063x}"
    try:
        rec = s.insert_funded(funded_row(cid, txid))
    except FundingMismatch:
        continue
    won += rec.funding_txid == txid
print(won)
s.close()
"""


@pytest.mark.parametrize("outpoints", ["same", "different"])
def test_processes_racing_a_funding_report_write_it_once(store: PayeeStore, target: str, outpoints: str) -> None:
    """Three processes report the funding of the same 40 channels at once: with the same outpoint
    every report is answered with the one row; with different outpoints exactly one wins each."""
    ids = [f"{i:032x}" for i in range(40)]
    tags = ["same"] * 3 if outpoints == "same" else ["1", "2", "3"]
    procs = [
        subprocess.Popen([sys.executable, "-c", _RACE, target, tag, *ids], stdout=subprocess.PIPE, text=True)
        for tag in tags
    ]
    won = [int(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    rows = store.list()
    assert sorted(r.channel_id for r in rows) == ids  # one row per channel
    if outpoints == "same":
        assert won == [len(ids)] * 3  # each process was answered with the row holding its outpoint
    else:
        assert sum(won) == len(ids)  # one winner per channel, the others refused
        assert {r.funding_txid[0] for r in rows} <= {"1", "2", "3"}


def test_the_payers_token_is_kept_with_its_channel_and_in_its_backups(tmp_path: Path) -> None:
    with PayerStore(tmp_path / "a" / "payer.db") as a, PayerStore(tmp_path / "b" / "payer.db") as b:
        assert a.schema_version == PayerStore.latest_version() == 5
        for cid, token in (("c1" * 16, "dG9rZW4"), ("c2" * 16, None)):
            a.insert(
                PayerRecord(
                    channel_id=cid,
                    server_url="http://127.0.0.1:1",
                    state="proposed",
                    params={"payer_pubkey": "02" + "aa" * 32},
                    privkey=b"\x01" * 32,
                    deposit_sat=10_000,
                    expiry_height=500,
                    proposal_token=token,
                    proposal_expires_at=1_700_000_600.0 if token else None,
                )
            )
        assert a.get("c1" * 16).proposal_token == "dG9rZW4" and a.get("c2" * 16).proposal_token is None
        assert b.import_backup(a.export_backup()) == 2
        got = b.get("c1" * 16)
        assert (got.proposal_token, got.proposal_expires_at) == ("dG9rZW4", 1_700_000_600.0)
        old = a.export_backup()  # a backup written before tokens existed
        for entry in old["channels"]:
            del entry["proposal_token"], entry["proposal_expires_at"]
        with PayerStore(tmp_path / "c" / "payer.db") as c:
            assert c.import_backup(old) == 2 and c.get("c1" * 16).proposal_token is None
