"""Benchmark of the payee's continuous backup: one online copy of payee.db against one payment commit.

Fills a payee store with N open channels (parameters and a best payment each, as the service
stores them), then times ``online_backup`` (SQLite's online backup API, copy + fsync-free
rename) and, as the baseline measured in the same run, a payment's durable commit
(``UPDATE`` with ``synchronous=FULL``). Prints medians in milliseconds; the last line is
``channels=<n> db_kib=<k> backup_ms=<x> payment_commit_ms=<y>`` per size.
Run: ``python bench/backup.py``.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from btcchannel import ChannelParams, ChannelState  # noqa: E402
from btcchannel.core.keys import generate_private_key, public_key  # noqa: E402
from btcchannel.store import PayeeRecord, PayeeStore  # noqa: E402
from btcchannel.store.ops import online_backup  # noqa: E402

SIZES = (100, 1_000, 10_000)
ROUNDS = 15


def fill(store: PayeeStore, n: int) -> list[str]:
    payer, payee = public_key(generate_private_key()), public_key(generate_private_key())
    key = generate_private_key()
    params = ChannelParams(
        network="regtest",
        payer_pubkey=payer,
        payee_pubkey=payee,
        expiry_height=10_000,
        deposit_sat=100_000,
        payer_script=b"\x00\x14" + bytes(20),
    ).to_json()
    ids = []
    store._db.execute("BEGIN")  # noqa: SLF001 - one transaction to fill quickly
    for i in range(n):
        cid = f"{i:032x}"
        rec = PayeeRecord(
            channel_id=cid,
            state=ChannelState.PROPOSED,
            params=params,
            privkey=key,
            deposit_sat=100_000,
            expiry_height=10_000,
        )
        store.insert_proposal(rec)
        ids.append(cid)
    store._db.execute(  # noqa: SLF001
        "UPDATE channels SET state='open', amount_sat=1000, signature=?", (os.urandom(71),)
    )
    store._db.execute("COMMIT")  # noqa: SLF001
    return ids


def main() -> None:
    for n in SIZES:
        with tempfile.TemporaryDirectory() as d:
            store = PayeeStore(Path(d) / "payee.db")
            ids = fill(store, n)
            backups = [online_backup(Path(d) / "payee.db", Path(d) / "copy" / "payee.db") * 1000 for _ in range(ROUNDS)]
            commits = []
            for i in range(ROUNDS):
                t = time.perf_counter()
                store._db.execute(  # noqa: SLF001 - the statement record_payment runs, durably
                    "UPDATE channels SET amount_sat=? WHERE channel_id=?", (2000 + i, ids[i % len(ids)])
                )
                commits.append((time.perf_counter() - t) * 1000)
            size = (Path(d) / "copy" / "payee.db").stat().st_size // 1024
            store.close()
            print(
                f"channels={n} db_kib={size} backup_ms={statistics.median(backups):.2f} "
                f"payment_commit_ms={statistics.median(commits):.3f}"
            )


if __name__ == "__main__":
    main()
