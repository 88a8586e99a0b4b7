"""Backups on both sides, on a real regtest node: the payer's backup rewritten before every
funding (never over a user's file), the payee's continuous copy of payee.db, and `restore`
closing every open channel from that copy after payee.db is lost."""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from btcchannel.amounts import btc_to_sat
from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.store import PayerStore
from btcchannel.testing.cli import CliProcess
from btcchannel.wait import wait_until


def _backup_amounts(path: Path) -> dict[str, int]:
    if not path.exists():
        return {}
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {str(r[0]): int(r[1]) for r in conn.execute("SELECT channel_id, amount_sat FROM channels")}
    finally:
        conn.close()


@pytest.fixture
def payee(bitcoind: RegtestNode, tmp_path: Path) -> Iterator[tuple[CliProcess, subprocess.Popen[str], str, Path]]:
    bitcoind.create_wallet("backup-payee")
    cli = CliProcess(bitcoind, tmp_path / "payee", "backup-payee")
    copy = tmp_path / "other-disk" / "payee.db"
    proc = subprocess.Popen(
        cli.argv(
            "--json",
            "serve",
            "--port",
            "0",
            "--price-sat",
            "0",  # free-form payments
            "--backup-db",
            str(copy),
            "--backup-interval",
            "3600",
        ),
        env=cli.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        yield cli, proc, json.loads(proc.stdout.readline())["url"], copy
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


def test_payer_backup_follows_every_open_and_never_overwrites_a_users_file(
    bitcoind: RegtestNode,
    funded_wallet: str,
    tmp_path: Path,
    payee: tuple[CliProcess, subprocess.Popen[str], str, Path],
) -> None:
    _, _, url, _ = payee
    backup = tmp_path / "usb" / "payer.json"
    payer = CliProcess(bitcoind, tmp_path / "payer", funded_wallet)
    payer.env["BTCCHANNEL_PAYER_BACKUP"] = str(backup)
    first = payer.json("open", url, "--deposit-sat", "20000", "--lifetime-blocks", "40", "--no-wait")
    saved = json.loads(backup.read_text())
    assert [c["channel_id"] for c in saved["channels"]] == [first["channel_id"]]
    assert backup.stat().st_mode & 0o077 == 0
    with PayerStore(payer.datadir / "regtest" / "payer.db") as store:
        assert saved["channels"][0]["privkey"] == store.get(first["channel_id"]).privkey.hex()
    second = payer.json("open", url, "--deposit-sat", "20000", "--lifetime-blocks", "40", "--no-wait")
    assert [c["channel_id"] for c in json.loads(backup.read_text())["channels"]] == [
        first["channel_id"],
        second["channel_id"],
    ]

    # a user's own file is never overwritten: not by export, not by the automatic backup
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    out = payer.run("--json", "backup", "export", str(notes))
    assert out.returncode == 1 and json.loads(out.stdout)["error"]["code"] == "bad_request"
    assert notes.read_text() == "my notes\n"
    payer.env["BTCCHANNEL_PAYER_BACKUP"] = str(notes)
    balance = bitcoind.rpc("getbalance", wallet=funded_wallet)
    out = payer.run("open", url, "--deposit-sat", "20000", "--lifetime-blocks", "40", "--no-wait")
    assert out.returncode == 1 and "not overwriting it" in out.stderr
    assert notes.read_text() == "my notes\n"
    assert bitcoind.rpc("getbalance", wallet=funded_wallet) == balance  # nothing funded without a backup
    assert payer.json("backup", "export", str(notes), "--force")["channels"] == 3


def test_payee_restores_from_its_continuous_copy_and_closes_every_open_channel(
    bitcoind: RegtestNode,
    funded_wallet: str,
    tmp_path: Path,
    payee: tuple[CliProcess, subprocess.Popen[str], str, Path],
) -> None:
    payee_cli, proc, url, copy = payee
    payer = CliProcess(bitcoind, tmp_path / "payer", funded_wallet)
    a = payer.json("open", url, "--deposit-sat", "40000", "--lifetime-blocks", "40", "--no-wait")
    b = payer.json("open", url, "--deposit-sat", "30000", "--lifetime-blocks", "40", "--no-wait")
    bitcoind.mine(1)
    for opened in (a, b):
        wait_until(lambda: payee_cli.json("channel", opened["channel_id"])["state"] == "open", timeout=30, what="open")
    payer.json("pay", a["channel_id"], "--amount-sat", "7000")
    payer.json("pay", b["channel_id"], "--amount-sat", "5000")
    payer.json("pay", b["channel_id"], "--amount-sat", "1000")
    # the copy follows every payment (the timer is an hour: these copies are change-driven)
    wait_until(
        lambda: _backup_amounts(copy) == {a["channel_id"]: 7000, b["channel_id"]: 6000},
        timeout=30,
        what="the backup holds the latest payments",
    )

    # the payee's disk dies
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    shutil.rmtree(payee_cli.datadir)
    restored = payee_cli.json("restore", str(copy))
    closes = {o["channel_id"]: o for o in restored["closed"]}
    assert set(closes) == {a["channel_id"], b["channel_id"]}
    assert all(o["state"] == "closing" and o["close_txid"] for o in closes.values())
    bitcoind.mine(1)
    for opened, paid in ((a, 7000), (b, 6000)):
        tx = bitcoind.rpc("getrawtransaction", closes[opened["channel_id"]]["close_txid"], 2)
        assert tx["confirmations"] == 1 and tx["vin"][0]["txid"] == opened["funding_txid"]
        assert btc_to_sat(tx["vout"][0]["value"]) == opened["deposit_sat"] - paid  # the payer's change
        assert btc_to_sat(tx["vout"][1]["value"]) == paid - btc_to_sat(tx["fee"])  # the payee's earnings

    # restoring over a database that exists is refused
    out = payee_cli.run("--json", "restore", str(copy))
    assert out.returncode == 1 and "exists" in json.loads(out.stdout)["error"]["message"]
