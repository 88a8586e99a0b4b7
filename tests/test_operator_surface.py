"""The payee's operator defaults (a real regtest node): /metrics on a loopback listener of its own,
not on the public port; the 402's URLs from the configured public URL, never from a client's
Host header on a public address; secrets (the RPC password, the seed, the store URL) from a file,
standard input or the environment; repeated library warnings held back whatever the entry point."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.cli import main
from btcchannel.logs import RepeatFilter, hold_back_repeats
from btcchannel.payee.appkeys import CLIENT_ERRORS
from btcchannel.payee.config import ServerConfig
from btcchannel.payee.metered import add_file_route
from btcchannel.payee.metrics import METRICS, install_metrics
from btcchannel.store import PayeeStore
from btcchannel.testing import wait_until_async
from btcchannel.testing.cli import CliProcess
from btcchannel.testing.fixtures import PayeeFactory


def _file_route(path: Path) -> object:
    path.write_bytes(os.urandom(2000))

    def hook(app: object) -> None:
        add_file_route(app, path, chunk_size=1000)  # type: ignore[arg-type]
        install_metrics(app)  # type: ignore[arg-type]

    return hook


async def test_metrics_are_not_public_and_402_urls_come_from_the_public_url(
    payee_factory: PayeeFactory,
    tmp_path: Path,
) -> None:
    cfg = payee_factory.config(price_sat=100, public_url="https://pay.example/btc/")
    payee = await payee_factory.start(cfg, hook=_file_route(tmp_path / "data.bin"))  # type: ignore[arg-type]
    async with httpx.AsyncClient(timeout=10) as http:
        # /metrics: absent from the payee's port, on a loopback listener of its own
        assert (await http.get(f"{payee.url}/metrics")).status_code == 404
        metrics_url = payee.app[METRICS].url
        assert metrics_url is not None and metrics_url.startswith("http://127.0.0.1:")
        assert "btcchannel_channels" in (await http.get(metrics_url)).text
        # the 402 names the configured public URL, whatever Host the client sends
        answer = await http.get(f"{payee.url}/v1/file/0", headers={"Host": "evil.example"})
        assert answer.status_code == 402
        payment = answer.json()["payment"]
        assert payment["channels_url"] == "https://pay.example/btc/v1/channels"
        assert payment["info_url"] == "https://pay.example/btc/v1/info"
        assert "evil.example" not in answer.headers["WWW-Authenticate"]
    # what clients get wrong is counted (here: a body cut short by a disconnect)
    host, port = payee.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /v1/channels HTTP/1.1\r\nHost: x\r\nContent-Length: 90\r\n\r\n{")
    await writer.drain()
    writer.close()
    errors = payee.app[CLIENT_ERRORS]
    await wait_until_async(lambda: errors.kinds["body_incomplete"] == 1, timeout=10, what="the client error counted")
    async with httpx.AsyncClient(timeout=10) as http:
        assert 'btcchannel_client_errors_total{kind="body_incomplete"} 1.0' in (await http.get(metrics_url)).text


async def test_the_host_header_is_only_a_fallback_on_loopback_or_regtest(
    payee_factory: PayeeFactory,
    tmp_path: Path,
) -> None:
    payee = await payee_factory.start(price_sat=100, hook=_file_route(tmp_path / "data.bin"))  # type: ignore[arg-type]
    async with httpx.AsyncClient(timeout=10) as http:  # regtest on loopback: the documented fallback
        answer = await http.get(f"{payee.url}/v1/file/0", headers={"Host": "127.0.0.1:1234"})
        assert answer.json()["payment"]["channels_url"] == "http://127.0.0.1:1234/v1/channels"
    with pytest.raises(ValueError, match="public_url"):  # a public address on a public network: refused
        ServerConfig(datadir=tmp_path, network="signet", host="0.0.0.0", price_sat=100)
    assert ServerConfig(
        datadir=tmp_path, network="signet", host="0.0.0.0", price_sat=100, public_url="https://pay.example"
    ).host_header_allowed
    assert ServerConfig(
        datadir=tmp_path, network="signet", host="0.0.0.0", price_sat=100, trust_host_header=True
    ).host_header_allowed
    assert ServerConfig(datadir=tmp_path, network="signet", host="::1", price_sat=100).host_header_allowed
    with pytest.raises(ValueError, match="public_url"):
        ServerConfig(datadir=tmp_path, public_url="ftp://x")


def test_secrets_from_a_file_stdin_or_the_environment(bitcoind: RegtestNode, tmp_path: Path) -> None:
    bitcoind.create_wallet("secret-payee")
    cli = CliProcess(bitcoind, tmp_path / "payee", "secret-payee")
    # the RPC password from a file, not the command line or the environment
    password = tmp_path / "rpc-password"
    password.write_text(bitcoind.rpc_password + "\n")
    env = {k: v for k, v in cli.env.items() if k != "BTCCHANNEL_RPC_PASSWORD"}

    serve = cli.argv("--json", "--rpc-password-file", str(password), "serve", "--port", "0")
    proc = subprocess.Popen(serve, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:  # the service starts: the node accepted the password from the file
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline())["url"].startswith("http://127.0.0.1:")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    password.write_text("wrong\n")
    out = subprocess.run(serve, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and json.loads(out.stdout)["error"]["code"] == "node_unavailable"
    # the seed from standard input (never on the command line)
    seed = "ab" * 32
    out = subprocess.run(
        cli.argv("--json", "seed", "restore", "--role", "payee", "--from-file", "-"),
        input=seed + "\n",
        env=cli.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    with PayeeStore(cli.datadir / "regtest" / "payee.db") as store:
        assert store.seed().hex() == seed
    out = subprocess.run(
        cli.argv("seed", "restore", "--role", "payee"), env=cli.env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2 and "SEED_HEX or --from-file" in out.stderr
    # the store's URL from the environment: BTCCHANNEL_STORE (a bad one is refused as a usage error)
    refused = CliRunner().invoke(
        main, ["--datadir", str(tmp_path / "x"), "serve"], env={"BTCCHANNEL_STORE": "mysql://user:secret@db/x"}
    )
    assert refused.exit_code == 2 and "postgresql://" in refused.output


async def test_repeated_library_warnings_are_held_back_whatever_the_entry_point(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hold_back_repeats()
    log = logging.getLogger("btcchannel.payee.watcher")
    assert any(isinstance(f, RepeatFilter) for f in log.filters)
    with caplog.at_level(logging.WARNING, logger="btcchannel.payee.watcher"):
        for _ in range(400):
            log.warning("watcher pass skipped: %s", "the node is in initial block download (test)")
            await asyncio.sleep(0)
        log.warning("watcher pass skipped: %s", "another reason (test)")
    lines = [r.getMessage() for r in caplog.records if "(test)" in r.getMessage()]
    assert len(lines) == 2  # once, then held back; a different warning still passes
