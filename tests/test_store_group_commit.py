"""The group-commit writer: concurrent payments share commits, each answered only once it is on disk."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from btcchannel.core.state import ChannelState
from btcchannel.store import PayeeRecord, PayeeStore
from btcchannel.store._db import connect
from btcchannel.store._group import GroupWriter

N = 200


def _open_channels(store: PayeeStore, n: int) -> list[str]:
    ids = []
    for i in range(n):
        cid = f"{i:032x}"
        store.insert_proposal(
            PayeeRecord(
                channel_id=cid,
                state=ChannelState.PROPOSED,
                params={},
                privkey=b"k" * 32,
                deposit_sat=100_000,
                expiry_height=500,
            )
        )
        assert store.set_funding(cid, f"{i:064x}", 0, 1)
        assert store.set_confirmations(cid, 1, open_now=True)
        ids.append(cid)
    return ids


def _on_disk(path: Path, cid: str) -> int:
    """The amount another connection reads: what a crash right now would leave."""
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("SELECT amount_sat FROM channels WHERE channel_id=?", (cid,)).fetchone()[0])
    finally:
        conn.close()


async def test_concurrent_payments_share_commits_and_are_answered_after_them(tmp_path: Path) -> None:
    path = tmp_path / "payee.db"
    with PayeeStore(path) as store:
        ids = _open_channels(store, N)

        async def pay(cid: str, amount: int) -> None:
            rec = await store.record_payment_async(cid, amount, b"s" * 70)
            assert rec is not None and rec.amount_sat == amount
            assert _on_disk(path, cid) == amount  # committed before the answer

        await asyncio.gather(*(pay(cid, 1_000) for cid in ids))
        assert store.writer.statements == N
        assert store.writer.batches < N  # the payments waiting together shared a commit
        # a stale payment (not above the stored one) writes nothing and says so
        assert await store.record_payment_async(ids[0], 1_000, b"t" * 70) is None
        assert await store.record_payment_async(ids[0], 999, b"t" * 70) is None
        assert store.get(ids[0]).signature == b"s" * 70


async def test_a_failing_statement_fails_alone(tmp_path: Path) -> None:
    path = tmp_path / "payee.db"
    with PayeeStore(path) as store:
        a, b = _open_channels(store, 2)
        writer = GroupWriter(connect(path))
        try:
            good = writer.submit("UPDATE channels SET amount_sat=? WHERE channel_id=? RETURNING amount_sat", (5, a))
            bad = writer.submit(
                "UPDATE channels SET funding_txid=(SELECT funding_txid FROM channels"
                " WHERE channel_id=?) WHERE channel_id=?",
                (a, b),
            )  # the unique index refuses
            also = writer.submit("UPDATE channels SET amount_sat=? WHERE channel_id=? RETURNING amount_sat", (7, b))
            assert await good == [{"amount_sat": 5}]
            with pytest.raises(sqlite3.IntegrityError):
                await bad
            assert await also == [{"amount_sat": 7}]
        finally:
            writer.close()
        assert (_on_disk(path, a), _on_disk(path, b)) == (5, 7)
        with pytest.raises(RuntimeError):
            writer.submit("SELECT 1", ())


_READ = (
    "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
    "print(c.execute('SELECT amount_sat FROM channels').fetchone()[0]); c.close()"
)


def test_a_second_connection_in_the_process_keeps_the_wal_alive(tmp_path: Path) -> None:
    """Opening the writer's connection must not drop this process's locks on the file: another
    process closing its connection would take ours for gone and delete the WAL we write to."""
    import subprocess
    import sys

    path = tmp_path / "payee.db"
    with PayeeStore(path) as store:
        (cid,) = _open_channels(store, 1)
        assert store.record_payment(cid, 100, b"s" * 70)
        second = connect(path)  # what the group writer opens, in the same process
        try:
            read = [sys.executable, "-c", _READ, str(path)]
            assert subprocess.run(read, capture_output=True, text=True, check=True).stdout.strip() == "100"
            assert store.record_payment(cid, 200, b"s" * 70)
            assert (tmp_path / "payee.db-wal").exists()
            assert subprocess.run(read, capture_output=True, text=True, check=True).stdout.strip() == "200"
        finally:
            second.close()
