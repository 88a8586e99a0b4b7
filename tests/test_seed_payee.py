"""The payee's channel keys derive from its seed (SQLite and PostgreSQL stores), and a payee whose
payee.db lost its keys re-derives them when it starts and still closes with its earnings."""

from __future__ import annotations

import signal
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.core.keys import public_key
from btcchannel.core.seed import derive_channel_key, derive_stateless_key
from btcchannel.errors import BadRequest
from btcchannel.store import PayeeRecord, PayeeStore, open_payee_store
from btcchannel.testing import open_channel, sats, tx_of, wait_until_async
from btcchannel.testing.fixtures import PayeeFactory, PayerFactory


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PayeeStore]:
    target = tmp_path / "payee.db" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    s = open_payee_store(target)
    try:
        yield s
    finally:
        s.close()


def _proposal(cid: str, privkey: bytes, key_index: int | None) -> PayeeRecord:
    return PayeeRecord(
        channel_id=cid,
        state="proposed",
        params={"payee_pubkey": public_key(privkey).hex()},
        privkey=privkey,
        deposit_sat=100_000,
        expiry_height=500,
        key_index=key_index,
    )


def test_payee_seed_indexes_and_restore_on_both_stores(store: PayeeStore) -> None:
    seed = store.seed()
    assert store.seed() == seed and len(seed) == 32
    reserved = [store.reserve_key() for _ in range(3)]
    assert [i for i, _ in reserved] == [0, 1, 2]
    assert all(k == derive_channel_key(seed, i) for i, k in reserved)
    store.insert_proposal(_proposal("aa" * 16, reserved[1][1], 1))
    with pytest.raises(sqlite3.IntegrityError):  # one index, one channel (also on PostgreSQL)
        store.insert_proposal(_proposal("bb" * 16, reserved[1][1], 1))
    store._db.execute("UPDATE channels SET privkey=? WHERE channel_id=?", (b"", "aa" * 16))
    with pytest.raises(BadRequest, match="another seed"):
        store.restore_seed(b"\x11" * 32)
    assert store.restore_keys() == 1 and store.get("aa" * 16).privkey == reserved[1][1]
    assert store.reserve_key()[0] == 3


@pytest.mark.parametrize("stateless", [False, True], ids=["stored", "stateless"])
async def test_payee_restores_wiped_keys_from_its_seed_and_closes(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    payer_factory: PayerFactory,
    stateless: bool,
) -> None:
    """A stored proposal's key is the seed's at its index; a stateless proposal's (no index) is the
    seed's at the path its channel id gives: both come back from the seed alone."""
    cfg = payee_factory.config()
    proc = payee_factory.process(cfg)
    url = await proc.start()
    client = payer_factory(timeout=5)
    client.stateless_proposals = stateless
    cid = await open_channel(client, bitcoind, url, 300_000, 60)
    for _ in range(5):
        await client.pay(cid, 1_000)
    with PayeeStore(cfg.db_path) as store:
        rec, seed = store.get(cid), store.seed()
    if stateless:
        assert rec.key_index is None and rec.privkey == derive_stateless_key(seed, cid)
    else:
        assert rec.key_index is not None and rec.privkey == derive_channel_key(seed, rec.key_index)
    assert rec.params["payee_pubkey"] == public_key(rec.privkey).hex()
    await proc.stop(signal.SIGKILL)
    conn = sqlite3.connect(cfg.db_path)  # the keys are lost, the seed is not
    conn.execute("UPDATE channels SET privkey=x''")
    conn.commit()
    conn.close()
    assert await proc.start() == url  # re-derives and checks the key before serving
    with PayeeStore(cfg.db_path) as store:
        assert store.get(cid).privkey == rec.privkey
    await client.resume(cid)
    obj = await client.close(cid)
    assert obj["state"] == "closing" and obj["amount_sat"] == 5_000
    bitcoind.mine(1)
    with PayeeStore(cfg.db_path) as store:
        await wait_until_async(lambda: store.get(cid).state == "closed", timeout=30, what="closed")
        close = tx_of(bitcoind, store.get(cid).close_txid)
    assert sats(close["vout"][0]["value"]) == 300_000 - 5_000
