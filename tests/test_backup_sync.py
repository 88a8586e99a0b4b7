"""The payee's synchronous backup (``serve --backup-db``) on a real regtest node and real processes:
the payee is SIGKILLed under load, its datadir deleted, ``restore`` run from the backup, and every
channel closes for at least what the payer was acknowledged (at most what it signed), the channels
being stateless proposals written since the backup's first copy."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
from pathlib import Path

from btcchannel.amounts import btc_to_sat
from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.errors import ChannelError
from btcchannel.testing import wait_until_async
from btcchannel.testing.cli import CliProcess
from btcchannel.testing.fixtures import PayerFactory

CHANNELS = 12
DEPOSIT = 100_000
STEP = 200


async def test_restore_after_a_sigkill_under_load_pays_every_acknowledged_payment(
    bitcoind: RegtestNode,
    payer_factory: PayerFactory,
    tmp_path: Path,
) -> None:
    bitcoind.create_wallet("sync-backup-payee")
    payee = CliProcess(bitcoind, tmp_path / "payee", "sync-backup-payee")
    copy = tmp_path / "other-disk" / "payee.db"
    proc = subprocess.Popen(
        payee.argv(
            "--json", "serve", "--port", "0", "--price-sat", "0", "--backup-db", str(copy), "--backup-interval", "3600"
        ),
        env=payee.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = json.loads(proc.stdout.readline())["url"]
        client = payer_factory(timeout=10)
        ids = [await client.open_channel(url, DEPOSIT, 60, wait_open=False) for _ in range(CHANNELS)]
        # stateless proposals: each channel's row is first written at its funding report, after the
        # backup's first copy (its first payment is mirrored only once a copy holds the row)
        assert all(client.store.get(cid).proposal_token for cid in ids)
        bitcoind.mine(1)
        for cid in ids:
            await client.wait_open(cid, timeout=30)

        async def stream(cid: str) -> None:
            with contextlib.suppress(ChannelError):  # until the payee dies under it
                while True:
                    await client.pay(cid, STEP)

        payers = [asyncio.ensure_future(stream(cid)) for cid in ids]
        await wait_until_async(
            lambda: all(client.store.get(c).acked_sat >= 30 * STEP for c in ids),
            timeout=60,
            what="payments flowing on every channel",
        )
        proc.send_signal(signal.SIGKILL)  # under load: payments in flight
        proc.wait(30)
        await asyncio.wait_for(asyncio.gather(*payers), 60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    acked = {cid: client.store.get(cid).acked_sat for cid in ids}
    signed = {cid: client.store.get(cid).amount_sat for cid in ids}
    assert sum(acked.values()) >= CHANNELS * 30 * STEP

    shutil.rmtree(payee.datadir)  # the payee's disk dies
    restored = payee.json("restore", str(copy))
    closes = {o["channel_id"]: o for o in restored["closed"]}
    assert set(closes) == set(ids)
    bitcoind.mine(1)
    for cid in ids:
        tx = bitcoind.rpc("getrawtransaction", closes[cid]["close_txid"], 2)
        assert tx["confirmations"] == 1
        paid = DEPOSIT - btc_to_sat(tx["vout"][0]["value"])  # the payer's change is deposit - payment
        assert acked[cid] <= paid <= signed[cid], (cid, acked[cid], paid, signed[cid])
