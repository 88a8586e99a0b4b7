"""The README's two seller programs (aiohttp, FastAPI under uvicorn), taken from README.md and run
as written against a real regtest node, each bought from by the command line (which pays exactly
the route's 250 sat, opening its channel at the protocol URL the 402 names) and by the library."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.payer.buy import ask_price
from btcchannel.payer.client import PayerClient
from btcchannel.payer.metered import MeteredPayer
from btcchannel.testing import open_channel, wait_until
from btcchannel.testing.cli import CliProcess

ROOT = Path(__file__).resolve().parent.parent
SECTION = (ROOT / "README.md").read_text().split("## Sell your endpoint", 1)[1].split("\n## ", 1)[0]
PROGRAMS = dict(zip(["aiohttp", "fastapi"], re.findall(r"```python\n(.*?)```", SECTION, re.S)))
QUICKSTART = re.findall(
    r"```python\n(.*?)```", (ROOT / "README.md").read_text().split("## Buy with httpx or requests", 1)[1], re.S
)[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - a local test server
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def _running(program: str, tmp_path: Path, bitcoind: RegtestNode) -> Iterator[str]:
    """The README program running as its own process; its origin."""
    source = tmp_path / "seller.py"
    source.write_text(program)
    port = _free_port()
    env = {
        **os.environ,
        "PORT": str(port),
        "BTCCHANNEL_DATADIR": str(tmp_path / "seller"),
        "BTCCHANNEL_RPC_URL": bitcoind.rpc_url,
        "BTCCHANNEL_RPC_USER": bitcoind.rpc_user,
        "BTCCHANNEL_RPC_PASSWORD": bitcoind.rpc_password,
        "BTCCHANNEL_WALLET": "miner",
    }
    log = tmp_path / "seller.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, str(source)], env=env, stdout=out, stderr=subprocess.STDOUT)
    origin = f"http://127.0.0.1:{port}"
    try:
        wait_until(
            lambda: proc.poll() is not None or _answers(f"{origin}/btc/v1/info"),
            timeout=60,
            what="the seller's program to answer",
        )
        assert proc.poll() is None, log.read_text()
        yield origin
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert "Traceback" not in log.read_text(), log.read_text()


@pytest.mark.parametrize("framework", ["aiohttp", "fastapi"])
async def test_readme_seller_bought_by_cli_and_library(
    bitcoind: RegtestNode,
    funded_wallet: str,
    payer_client: PayerClient,
    tmp_path: Path,
    framework: str,
) -> None:
    cli = CliProcess(bitcoind, tmp_path / "buyer", funded_wallet)
    with _running(PROGRAMS[framework], tmp_path, bitcoind) as origin:
        url = f"{origin}/answer"
        # no channel and no deposit: nothing is paid, the exact `open` command is named
        err = cli.error("fetch", url)
        assert err["code"] == "not_open"
        assert (
            f"btcchannel open {origin}/btc --deposit-sat 25000 --lifetime-blocks 144 --max-price-sat 1" in err["hint"]
        )
        # with a deposit, fetch opens the channel at the protocol URL itself and pays exactly 250 sat
        progress = tmp_path / "fetch.err"
        with progress.open("w") as err_out:
            opening = subprocess.Popen(
                cli.argv("fetch", url, "--deposit-sat", "20000", "--max-price-sat", "1"),
                env=cli.env,
                stdout=subprocess.PIPE,
                stderr=err_out,
                text=True,
            )
        wait_until(
            lambda: opening.poll() is not None or "waiting for confirmations" in progress.read_text(),
            timeout=60,
            what="the funding broadcast",
        )
        bitcoind.mine(1)
        stdout, _ = opening.communicate(timeout=120)
        assert opening.returncode == 0, progress.read_text()
        assert json.loads(stdout) == {"answer": 42}
        [channel] = cli.json("list")["channels"]
        assert (channel["amount_sat"], channel["state"], channel["server_url"]) == (250, "open", f"{origin}/btc")
        again = cli.json("fetch", url)  # the same channel, found by the protocol URL
        assert (again["channel_id"], again["paid_sat"], again["amount_sat"]) == (channel["channel_id"], 250, 500)
        # the library: the 402 names the protocol URL; the route's own price is paid
        challenge, status, _ = await ask_price(payer_client, url)
        assert status == 402 and challenge is not None
        assert (challenge.protocol_url, challenge.price_sat, challenge.units) == (f"{origin}/btc", 250, 250)
        cid = await open_channel(payer_client, bitcoind, challenge.protocol_url, 20_000)
        payer = MeteredPayer(payer_client, cid)
        answer = await payer.request(url)
        assert answer.status == 200 and answer.json() == {"answer": 42}
        assert answer.headers["X-Btcchannel-Paid"] == "250"
        if framework == "fastapi":
            assert (await payer.request(f"{origin}/items/3")).json() == {"item": 3}
            assert payer_client.store.get(cid).acked_sat == 260
        status = (await payer_client.status(cid))["state"]
        assert status == "open"
        if framework == "aiohttp":  # the httpx quickstart, as written, against this seller
            assert len([line for line in QUICKSTART.splitlines() if line.strip()]) <= 5
            quick = subprocess.Popen(
                [sys.executable, "-c", QUICKSTART.replace("http://127.0.0.1:8080", origin)],
                env={**cli.env, "BTCCHANNEL_DATADIR": str(tmp_path / "quick")},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            wait_until(
                lambda: quick.poll() is not None or bool(bitcoind.rpc("getrawmempool")),
                timeout=60,
                what="the quickstart's funding",
            )
            bitcoind.mine(1)
            out, err = quick.communicate(timeout=120)
            assert quick.returncode == 0, err
            assert out.strip() == "{'answer': 42}"
    closed = cli.json("list")
    assert [c["state"] for c in closed["channels"]] == ["open"]
