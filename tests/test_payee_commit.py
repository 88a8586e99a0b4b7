"""The payee's service checks a payment with the core, stores it, then commits it to the channel's
machine (no node: a store on disk, the core's machines, a fixed chain tip): a durable write that
fails leaves the machine's best as it was, with nothing to roll back; two services on one database
taking concurrent payments of one channel keep the highest; an exact retry is acknowledged only once
the synchronous backup holds it."""

from __future__ import annotations

import asyncio
import hashlib
import random
import sqlite3
import time
from pathlib import Path
from typing import Any, cast

import pytest

from btcchannel.bitcoind.rpc import Node
from btcchannel.core.channel import PayerChannel
from btcchannel.core.keys import public_key
from btcchannel.core.params import ChannelParams
from btcchannel.core.script import p2wpkh_script
from btcchannel.core.state import ChannelState
from btcchannel.core.tx import OutPoint
from btcchannel.errors import StalePayment
from btcchannel.payee.backup import SyncBackup
from btcchannel.payee.closer import Closer
from btcchannel.payee.config import ServerConfig
from btcchannel.payee.service import PayeeService
from btcchannel.payee.shared import ChainTip
from btcchannel.store import PayeeRecord, PayeeStore

PAYER_KEY = hashlib.sha256(b"commit-payer").digest()
PAYEE_KEY = hashlib.sha256(b"commit-payee").digest()
FUNDING = OutPoint("3c" * 32, 0)
CID = "c0" * 16


def _service(tmp_path: Path) -> tuple[PayeeService, PayerChannel]:
    config = ServerConfig(datadir=tmp_path)
    store = PayeeStore(tmp_path / "payee.db")
    params = ChannelParams(
        network="regtest",
        payer_pubkey=public_key(PAYER_KEY),
        payee_pubkey=public_key(PAYEE_KEY),
        expiry_height=1_000,
        deposit_sat=100_000,
        payer_script=p2wpkh_script(public_key(PAYER_KEY)),
    )
    store.insert_proposal(
        PayeeRecord(
            channel_id=CID,
            state=ChannelState.PROPOSED,
            params=params.to_json(),
            privkey=PAYEE_KEY,
            deposit_sat=params.deposit_sat,
            expiry_height=params.expiry_height,
            created_at=time.time(),
        )
    )
    assert store.set_funding(CID, FUNDING.txid, FUNDING.vout, 1)
    assert store.set_confirmations(CID, 1, open_now=True)
    node = cast(Node, object())  # no payment asks the node anything
    svc = PayeeService(config, store, node, Closer(config, store, node), ChainTip(height=100))
    return svc, PayerChannel.restore(params.with_funding(FUNDING), PAYER_KEY, ChannelState.OPEN)


async def test_a_failed_write_leaves_the_machine_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    svc, payer = _service(tmp_path)
    try:
        first, second = payer.sign_payment(1_000), payer.sign_payment(2_000)
        stored = await svc.accept(CID, first.amount_sat, first.signature)
        assert stored is not None and stored.amount_sat == 1_000
        machine = svc.channel(CID)
        assert machine.best == first

        async def disk_full(*args: Any, **kwargs: Any) -> PayeeRecord | None:
            raise OSError("disk full")

        monkeypatch.setattr(svc.store, "record_payment_async", disk_full)
        with pytest.raises(OSError):
            await svc.accept(CID, second.amount_sat, second.signature)
        assert svc.channel(CID) is machine  # not dropped to undo anything: nothing was committed to it
        assert machine.best == first and svc.store.get(CID).amount_sat == 1_000
        monkeypatch.undo()
        # the same payment again: new to the machine, stored and committed now
        stored = await svc.accept(CID, second.amount_sat, second.signature)
        assert stored is not None and stored.amount_sat == 2_000 and machine.best == second
        assert await svc.accept(CID, second.amount_sat, second.signature) is None  # an exact retry
        with pytest.raises(StalePayment):
            await svc.accept(CID, first.amount_sat, first.signature)
    finally:
        await svc.closer.aclose()
        svc.store.close()


async def test_a_write_lost_to_another_writer_is_decided_again_on_the_stored_row(tmp_path: Path) -> None:
    svc, payer = _service(tmp_path)
    try:
        first, second, third = (payer.sign_payment(a) for a in (1_000, 2_000, 3_000))
        assert await svc.accept(CID, first.amount_sat, first.signature) is not None
        machine = svc.channel(CID)
        other = PayeeStore(svc.store.path)  # another instance stores a higher payment
        try:
            assert other.record_payment(CID, third.amount_sat, third.signature) is not None
        finally:
            other.close()
        with pytest.raises(StalePayment):  # lost its compare-and-set, then refused on the stored best
            await svc.accept(CID, second.amount_sat, second.signature)
        assert machine.best == first  # the machine that checked it committed nothing
        assert svc.channel(CID).best == third  # the one rebuilt from the stored row
    finally:
        await svc.closer.aclose()
        svc.store.close()


async def test_concurrent_payments_through_two_instances_keep_the_highest(tmp_path: Path) -> None:
    """Two payee services on one database take 40 payments of one channel at once, in shuffled order
    and alternately: each is stored and acknowledged, or refused stale; the stored best is the
    highest; each machine's best is at least the highest it acknowledged (a lower one committed late
    never replaces it); both go on from the stored row."""
    svc, payer = _service(tmp_path)
    config = ServerConfig(datadir=tmp_path / "b")
    store_b = PayeeStore(svc.store.path)
    node = cast(Node, object())
    svc_b = PayeeService(config, store_b, node, Closer(config, store_b, node), ChainTip(height=100))
    try:
        payments = [payer.sign_payment(1_000 * n) for n in range(1, 41)]
        order = list(range(40))
        random.Random(7).shuffle(order)

        async def send(n: int) -> tuple[PayeeService, int, PayeeRecord | None | Exception]:
            target = (svc, svc_b)[n % 2]
            p = payments[order[n]]
            try:
                return target, p.amount_sat, await target.accept(CID, p.amount_sat, p.signature)
            except StalePayment as exc:
                return target, p.amount_sat, exc

        results = await asyncio.gather(*(send(n) for n in range(40)))
        acked = [(t, amount) for t, amount, got in results if isinstance(got, PayeeRecord)]
        for _t, amount, got in results:
            assert isinstance(got, (PayeeRecord, StalePayment)), got  # never an exact retry, nor an error
            if isinstance(got, PayeeRecord):
                assert got.amount_sat == amount
        assert max(a for _t, a in acked) == 40_000 and svc.store.get(CID).amount_sat == 40_000
        for s in (svc, svc_b):
            mine = [a for t, a in acked if t is s]
            best = s.channel(CID).best
            # the highest it acknowledged at least (a lower one committed late never replaces it), or
            # a higher one another instance stored (its machine rebuilt from the row on a lost write)
            assert best is not None and max(mine, default=0) <= best.amount_sat <= 40_000
        last = payer.sign_payment(41_000)
        for s in (svc_b, svc):  # each goes on from the stored row
            if s is svc_b:
                stored = await s.accept(CID, last.amount_sat, last.signature)
                assert stored is not None and stored.amount_sat == 41_000
            else:
                assert await s.accept(CID, last.amount_sat, last.signature) is None  # an exact retry there
        with pytest.raises(StalePayment):
            await svc.accept(CID, payments[-1].amount_sat, payments[-1].signature)
    finally:
        await svc_b.closer.aclose()
        store_b.close()
        await svc.closer.aclose()
        svc.store.close()


class _Unwritable:
    """A backup database that refuses every write (its disk gone)."""

    in_transaction = False

    def execute(self, *args: Any) -> Any:
        raise sqlite3.OperationalError("disk I/O error")

    def close(self) -> None:
        """(nothing to close)"""


async def test_an_exact_retry_is_acknowledged_only_once_the_synchronous_backup_holds_it(tmp_path: Path) -> None:
    """A payment committed to payee.db whose write to the synchronous backup failed is not
    acknowledged; its exact retry writes nothing, so it is acknowledged only after the backup took a
    whole copy (not at all while the backup cannot be written): ``restore`` never closes below an
    acknowledged payment."""
    svc, payer = _service(tmp_path)
    svc.tip.checked_at = time.monotonic()  # the node's tip just fetched (pay checks the chain view)
    copy = tmp_path / "other-disk" / "payee.db"
    sync = SyncBackup(svc.store.path, copy)
    svc.store.payment_mirror = svc.store.writer.after_commit = sync.mirror
    svc.store.payment_barrier = sync.catch_up
    try:
        first, second = payer.sign_payment(1_000), payer.sign_payment(2_000)
        assert await svc.accept(CID, first.amount_sat, first.signature) is not None
        disk, sync._conn = sync._conn, cast(sqlite3.Connection, _Unwritable())  # the backup's disk goes
        copy_whole = sync._copy_locked

        def gone() -> float:
            raise sqlite3.OperationalError("disk I/O error")

        sync._copy_locked = gone  # type: ignore[method-assign]
        with pytest.raises(sqlite3.OperationalError):
            await svc.accept(CID, second.amount_sat, second.signature)  # in payee.db, not in the backup
        assert svc.store.get(CID).amount_sat == 2_000 and sync.behind
        with pytest.raises(sqlite3.OperationalError):  # its retry: still no backup, still no acknowledgement
            await svc.pay(CID, {"amount_sat": second.amount_sat, "signature": second.signature.hex()})
        sync._conn, sync._copy_locked = disk, copy_whole  # type: ignore[method-assign]  # the disk is back
        answer = await svc.pay(CID, {"amount_sat": second.amount_sat, "signature": second.signature.hex()})
        assert answer["amount_sat"] == 2_000 and not sync.behind and sync.stats.catch_ups == 1
        with PayeeStore(copy) as backup:
            assert backup.get(CID).amount_sat == 2_000
        assert await svc.accept(CID, second.amount_sat, second.signature) is None  # in sync now: no copy
        assert sync.stats.catch_ups == 1
    finally:
        svc.store.payment_mirror = svc.store.writer.after_commit = svc.store.payment_barrier = None
        sync.close()
        await svc.closer.aclose()
        svc.store.close()
