"""The payer's commands as a user meets them, on a real regtest node with the payee in another process.

open shows progress (funding txid, confirmations) and never ends in a traceback; --no-wait does
not say it waits; fetch picks a usable channel or says why none is, and keeps the body under
--json; pay explains increment, total and remainder; bump and refund say what they did (or that
they did nothing) with fee rates; one code per condition.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.store import PayerStore
from btcchannel.testing.cli import CliProcess
from btcchannel.wait import wait_until

CHUNK = 1000


@pytest.fixture
def payee(
    bitcoind: RegtestNode, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[CliProcess, str, bytes]]:
    """A payee process selling 1000-byte chunks at 100 sat (``indirect`` parameter: another price)."""
    price = str(getattr(request, "param", 100))
    bitcoind.create_wallet("flow-payee")
    cli = CliProcess(bitcoind, tmp_path / "payee", "flow-payee")
    data = os.urandom(4 * CHUNK)
    (tmp_path / "data.bin").write_bytes(data)
    proc = subprocess.Popen(
        cli.argv(
            "--json",
            "serve",
            "--port",
            "0",
            "--price-sat",
            price,
            "--serve-file",
            str(tmp_path / "data.bin"),
            "--chunk-size",
            str(CHUNK),
        ),
        env=cli.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = json.loads(proc.stdout.readline())["url"]
        yield cli, url, data
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_open_reports_progress_and_a_timeout_without_a_traceback(
    bitcoind: RegtestNode,
    funded_wallet: str,
    tmp_path: Path,
    payee: tuple[CliProcess, str, bytes],
) -> None:
    _, url, _ = payee
    payer = CliProcess(bitcoind, tmp_path / "payer", funded_wallet)

    # --no-wait: the funding txid, and no word of waiting
    out = payer.run("open", url, "--deposit-sat", "100000", "--lifetime-blocks", "50", "--no-wait", "--fee-rate", "3")
    assert out.returncode == 0, out.stderr
    assert "wait" not in out.stderr.lower()
    with PayerStore(payer.datadir / "regtest" / "payer.db") as store:
        first = store.list()[-1]
    assert first.funding_txid is not None
    assert f"funding transaction {first.funding_txid} broadcast (fee " in out.stderr
    assert "3.0 sat/vB" in out.stderr or "3.01 sat/vB" in out.stderr
    assert f"funding {first.funding_txid}" in out.stdout and "opens once the funding confirms" in out.stdout

    # a wait that runs out: a clear error naming the funding, the channel stays funded
    out = payer.run("open", url, "--deposit-sat", "100000", "--lifetime-blocks", "50", "--timeout", "1")
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    with PayerStore(payer.datadir / "regtest" / "payer.db") as store:
        second = store.list()[-1]
    assert f"error: open_timeout: channel {second.channel_id} is funded by {second.funding_txid}" in out.stderr
    assert "waiting for confirmations: 0/1" in out.stderr
    assert "hint: nothing is lost" in out.stderr

    # a wait that ends: confirmations counted up to open
    proc = subprocess.Popen(
        payer.argv("open", url, "--deposit-sat", "100000", "--lifetime-blocks", "50"),
        env=payer.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    def funded() -> bool:
        with PayerStore(payer.datadir / "regtest" / "payer.db") as store:
            return len(store.list()) == 3 and store.list()[-1].funding_txid is not None

    wait_until(funded, timeout=60, what="the third channel funded")
    bitcoind.mine(1)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    third = PayerStore(payer.datadir / "regtest" / "payer.db")
    with third:
        rec = third.list()[-1]
    assert f"funding transaction {rec.funding_txid} broadcast" in stderr
    assert f"channel {rec.channel_id} is open" in stderr
    assert f"channel {rec.channel_id} open:" in stdout


def test_fetch_picks_a_usable_channel_and_keeps_the_body(
    bitcoind: RegtestNode,
    funded_wallet: str,
    tmp_path: Path,
    payee: tuple[CliProcess, str, bytes],
) -> None:
    payee_cli, url, data = payee
    payer = CliProcess(bitcoind, tmp_path / "payer", funded_wallet)

    # no channel at all: fetch says so, with the command to run
    err = payer.error("fetch", f"{url}/v1/file/0")
    assert err["code"] == "not_open" and "btcchannel open" in err["message"]

    # an open channel, then a newer one still unconfirmed: fetch pays with the open one
    old = payer.json("open", url, "--deposit-sat", "20000", "--lifetime-blocks", "50", "--no-wait")
    bitcoind.mine(1)
    wait_until(lambda: payee_cli.json("channel", old["channel_id"])["state"] == "open", timeout=30, what="open")
    newer = payer.json("open", url, "--deposit-sat", "20000", "--lifetime-blocks", "50", "--no-wait")
    assert newer["state"] == "funding"
    raw = subprocess.run(payer.argv("fetch", f"{url}/v1/file/1"), env=payer.env, capture_output=True, timeout=60)
    assert raw.returncode == 0, raw.stderr
    assert raw.stdout == data[CHUNK : 2 * CHUNK]  # without --out and --json: the body on stdout
    got = payer.json("fetch", f"{url}/v1/file/2")
    assert got["channel_id"] == old["channel_id"]
    assert base64.b64decode(got["body_base64"]) == data[2 * CHUNK : 3 * CHUNK]
    assert got["amount_sat"] == 200 and got["remaining_sat"] == 20000 - 200

    # one code for one condition: paying a closing channel, by pay or by fetch
    assert payer.json("close", old["channel_id"])["state"] == "closing"
    by_pay = payer.error("pay", old["channel_id"], "--amount-sat", "1")
    by_fetch = payer.error("fetch", f"{url}/v1/file/0", "--channel", old["channel_id"])
    assert by_pay["code"] == by_fetch["code"] == "channel_closing"


@pytest.mark.parametrize("payee", [0], indirect=True)  # free-form payments: no price per unit
def test_pay_bump_and_refund_say_what_they_did(
    bitcoind: RegtestNode,
    funded_wallet: str,
    tmp_path: Path,
    payee: tuple[CliProcess, str, bytes],
) -> None:
    payee_cli, url, _ = payee
    payer = CliProcess(bitcoind, tmp_path / "payer", funded_wallet)
    old = payer.json("open", url, "--deposit-sat", "20000", "--lifetime-blocks", "50", "--no-wait")
    newer = payer.json("open", url, "--deposit-sat", "20000", "--lifetime-blocks", "50", "--no-wait")
    bitcoind.mine(1)
    wait_until(lambda: payee_cli.json("channel", old["channel_id"])["state"] == "open", timeout=30, what="open")
    payer.json("pay", old["channel_id"], "--amount-sat", "200")

    # pay: an increment, the new total and what remains
    paid = payer.json("pay", old["channel_id"], "--amount-sat", "1000")
    assert paid["increment_sat"] == 1000 and paid["amount_sat"] == 1200
    assert paid["remaining_sat"] == 20000 - 1200 and paid["closing"] is False
    text = payer.run("pay", old["channel_id"], "--amount-sat", "800")
    assert text.stdout.splitlines() == ["paid 800 sat more: total 2000 of the 20000 sat deposit, 18000 sat remaining"]

    # bump on an open channel replaces nothing
    err = payee_cli.error("bump", old["channel_id"], "--fee-rate", "5")
    assert err["code"] == "nothing_to_replace" and "open" in err["message"]

    # paying the remainder ends the channel, and says so
    out = payer.run("pay", old["channel_id"], "--amount-sat", "18000")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "paid 18000 sat more: total 20000 of the 20000 sat deposit, 0 sat remaining"
    assert "the payee closes it" in lines[1]

    # the payee's close, bumped: both transactions and both fee rates; then nothing to replace
    close_txid = payee_cli.json("channel", old["channel_id"])["close_txid"]
    wait_until(lambda: bool(bitcoind.rpc("getrawmempool")), timeout=30, what="close in the mempool")
    bumped = payee_cli.run("bump", old["channel_id"], "--fee-rate", "90")  # above any estimate of a shared node
    assert bumped.returncode == 0, bumped.stderr
    new_txid = payee_cli.json("channel", old["channel_id"])["close_txid"]
    assert new_txid != close_txid
    assert bumped.stdout.startswith(f"close {close_txid} (")
    assert bumped.stdout.rstrip().endswith(f"replaced by {new_txid} (90.00 sat/vB)")
    bitcoind.mine(1)
    err = payee_cli.error("bump", old["channel_id"], "--fee-rate", "200")
    assert err["code"] == "nothing_to_replace"

    # the newer channel, never used: refunded after expiry, with the fee rate; twice is a clear error
    bitcoind.mine(newer["expiry_height"] - bitcoind.tip_height())
    refund = payer.json("refund", newer["channel_id"], "--fee-rate", "2")
    assert refund["fee_rate_sat_vb"] >= 2 and refund["amount_sat"] + refund["fee_sat"] == 20000
    text = payer.run("refund", newer["channel_id"])
    assert text.returncode == 1 and "Traceback" not in text.stderr
    assert text.stderr.startswith(
        f"error: already_refunded: channel {newer['channel_id']} was refunded already by {refund['refund_txid']}"
    )
