"""What an operator sees, on a real regtest node with the payee in its own process: /metrics
scraped and parsed, `summary` for both roles, the payer's list as the chain sees it, failed
opens marked and forgotten, and no stale server.json after SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.testing.cli import CliProcess
from btcchannel.wait import wait_until


@pytest.fixture
def served(bitcoind: RegtestNode, tmp_path: Path) -> Iterator[tuple[CliProcess, subprocess.Popen[str], str]]:
    bitcoind.create_wallet("ops-payee")
    cli = CliProcess(bitcoind, tmp_path / "payee", "ops-payee")
    (tmp_path / "data.bin").write_bytes(os.urandom(3000))
    log = (tmp_path / "payee.log").open("w")
    proc = subprocess.Popen(
        cli.argv(
            "--json",
            "-v",
            "--log-json",
            "serve",
            "--port",
            "0",
            "--price-sat",
            "1000",
            "--serve-file",
            str(tmp_path / "data.bin"),
            "--chunk-size",
            "1000",
        ),
        env=cli.env,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    try:
        assert proc.stdout is not None
        yield cli, proc, json.loads(proc.stdout.readline())["url"]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        log.close()


def _samples(metrics_url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(metrics_url, timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_metrics_summary_chain_view_forget_and_a_clean_sigterm(
    bitcoind: RegtestNode,
    funded_wallet: str,
    tmp_path: Path,
    served: tuple[CliProcess, subprocess.Popen[str], str],
) -> None:
    payee, proc, url = served
    payer = CliProcess(bitcoind, tmp_path / "payer", funded_wallet)
    cid = payer.json("open", url, "--deposit-sat", "50000", "--lifetime-blocks", "40", "--no-wait")["channel_id"]
    short = payer.json("open", url, "--deposit-sat", "30000", "--lifetime-blocks", "20", "--no-wait")
    bitcoind.mine(1)
    payer.json("fetch", f"{url}/v1/file/0", "--channel", cid)
    assert payer.json("fetch", f"{url}/v1/file", "--channel", cid)["amount_sat"] == 4000  # 3 chunks more

    # /metrics, parsed: payments, channels and sats by state, latency by route pattern
    assert httpx.get(f"{url}/metrics", timeout=10).status_code == 404  # not on the public port by default
    metrics_url = json.loads((payee.datadir / "regtest" / "server.json").read_text())["metrics_url"]
    assert metrics_url.startswith("http://127.0.0.1:") and not metrics_url.startswith(url)
    m = _samples(metrics_url)
    assert m[("btcchannel_payments_total", (("kind", "metered"),))] == 4.0
    assert m[("btcchannel_channels", (("state", "open"),))] == 2.0
    assert m[("btcchannel_paid_sat", (("state", "open"),))] == 4000.0
    assert m[("btcchannel_deposit_sat", (("state", "open"),))] == 80000.0
    assert m[("btcchannel_chain_tip_height", ())] == bitcoind.tip_height()
    assert 0 <= m[("btcchannel_node_tip_age_seconds", ())] < 30 and m[("btcchannel_node_problem", ())] == 0
    route = (("route", "/v1/file/{index}"),)
    # four paid chunks, and the unpaid request of `fetch URL` that reads the route's price (its 402)
    assert m[("btcchannel_http_request_seconds_count", route)] == 5.0
    assert m[("btcchannel_http_requests_total", (("route", "/v1/file/{index}"), ("status", "200")))] == 4.0
    assert m[("btcchannel_http_requests_total", (("route", "/v1/file/{index}"), ("status", "402")))] == 1.0

    # the payee's log: JSON lines, the first payment as an event
    events = [json.loads(line) for line in (tmp_path / "payee.log").read_text().splitlines()]
    paid = [e for e in events if e.get("event") == "payment"]
    assert paid and paid[0]["channel_id"] == cid and paid[0]["amount_sat"] == 1000

    # close, confirm: the payer's list follows the chain (closing -> closed); the summaries add up
    payer.json("close", cid)
    assert {c["channel_id"]: c["state"] for c in payer.json("list")["channels"]}[cid] == "closing"
    close_txid = wait_until(lambda: payee.json("channel", cid)["close_txid"], timeout=30, what="the close broadcast")
    assert close_txid in bitcoind.rpc("getrawmempool")
    bitcoind.mine(1)
    listed = {c["channel_id"]: c for c in payer.json("list")["channels"]}
    assert listed[cid]["state"] == "closing" and listed[cid]["close_txid"] == close_txid  # as the payee says
    assert payee.json("channel", cid)["state"] == "closing"
    bitcoind.mine(5)  # both hold a close final at 6 confirmations (final_confirmations)
    wait_until(lambda: payee.json("channel", cid)["state"] == "closed", timeout=60, what="the payee sees the close")
    assert {c["channel_id"]: c["state"] for c in payer.json("list")["channels"]}[cid] == "closed"
    s = payee.json("summary")["payee"]
    assert s["earned_sat"] == 4000 and s["channels"]["closed"] == 1
    assert s["open"] == {
        "channels": 1,
        "amount_sat": 0,
        "deposit_sat": 30000,
        "nearest_expiry_height": short["expiry_height"],
        "blocks_to_nearest_expiry": short["expiry_height"] - bitcoind.tip_height(),
    }
    assert s["close_fee_rate_sat_vb"]["last"] >= 1.0
    text = payee.run("summary").stdout
    assert "earned         4000 sat" in text and "close fees" in text

    # past expiry: flagged refundable in the list and in the payer's summary
    bitcoind.mine(short["expiry_height"] - bitcoind.tip_height())
    listed = {c["channel_id"]: c for c in payer.json("list")["channels"]}
    assert listed[short["channel_id"]]["refundable"] is True and listed[short["channel_id"]]["blocks_left"] == 0
    assert "expired: refundable" in payer.run("list").stdout
    ps = payer.json("summary")["payer"]
    assert ps["spent_sat"] == 4000
    assert [x["channel_id"] for x in ps["refundable"]] == [short["channel_id"]]
    assert cid not in [x["channel_id"] for x in ps["refundable_later"]]

    # an open the wallet cannot fund (an empty wallet) keeps no row; forget refuses a live channel
    bitcoind.create_wallet("ops-empty")
    poor = CliProcess(bitcoind, tmp_path / "payer", "ops-empty")
    before = len(payer.json("list")["channels"])
    out = poor.run("open", url, "--deposit-sat", "20000", "--lifetime-blocks", "40")
    assert out.returncode == 1 and "error: insufficient_funds:" in out.stderr and "hint: fund the wallet" in out.stderr
    assert len(payer.json("list")["channels"]) == before
    refused = payer.run("--json", "forget", short["channel_id"])
    assert refused.returncode == 1 and json.loads(refused.stdout)["error"]["code"] == "illegal_transition"

    # SIGTERM: a clean exit and no stale server.json
    record = payee.datadir / "regtest" / "server.json"
    assert json.loads(record.read_text())["url"] == url
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert not record.exists()
