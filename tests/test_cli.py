"""The ``btcchannel`` command line: CliRunner checks and real processes on a regtest node."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from btcchannel.amounts import btc_to_sat
from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.bitcoind.rpc import Node
from btcchannel.cli import main
from btcchannel.errors import PayeeUnreachable
from btcchannel.payer.client import PayerClient
from btcchannel.testing.cli import CliProcess
from btcchannel.wait import wait_until


def invoke(*args: str) -> Any:
    result = CliRunner().invoke(main, list(args))
    return result


def test_every_command_has_an_example() -> None:
    def walk(group: Any, path: list[str]) -> Iterator[list[str]]:
        for name, cmd in group.commands.items():
            yield [*path, name]
            if hasattr(cmd, "commands"):
                yield from walk(cmd, [*path, name])

    for path in walk(main, []):
        out = invoke(*path, "--help")
        assert out.exit_code == 0, (path, out.output)
        assert "Example" in out.output, path


def test_errors_are_one_line_with_a_code_and_a_hint(tmp_path: Path) -> None:
    out = invoke("--datadir", str(tmp_path), "channel", "00" * 16)
    assert out.exit_code == 1
    lines = out.output.strip().splitlines()
    assert len(lines) == 2 and lines[1].startswith("hint: ")
    assert out.output.startswith("error: unknown_channel:")
    assert "Traceback" not in out.output
    out = invoke("--datadir", str(tmp_path), "pay", "00" * 16, "--amount-sat", "-5")
    assert out.exit_code == 2
    out = invoke(
        "--datadir",
        str(tmp_path),
        "--rpc-url",
        "http://127.0.0.1:1",
        "--rpc-user",
        "u",
        "--rpc-password",
        "p",
        "open",
        "http://127.0.0.1:1",
        "--deposit-sat",
        "100000",
        "--lifetime-blocks",
        "20",
    )
    assert out.exit_code == 1 and "error: " in out.output
    out = invoke("--datadir", str(tmp_path), "backup", "import", str(tmp_path / "nope.json"))
    assert out.exit_code == 2
    (tmp_path / "bad.json").write_text("{")
    out = invoke("--datadir", str(tmp_path), "backup", "import", str(tmp_path / "bad.json"))
    assert out.exit_code == 1 and out.output.startswith("error: bad_backup:")


@pytest.fixture
def closed_port() -> int:
    """A local TCP port that nothing listens on (bound once, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_client_call_to_a_closed_port_is_payee_unreachable(tmp_path: Path, closed_port: int) -> None:
    url = f"http://127.0.0.1:{closed_port}"
    node = Node("http://127.0.0.1:1", auth=("u", "p"), wallet="payer")
    try:
        async with PayerClient(tmp_path, node, timeout=5) as client:
            with pytest.raises(PayeeUnreachable) as e:
                await client.info(url)
    finally:
        await node.aclose()
    assert e.value.code == "payee_unreachable"
    assert (
        e.value.message == f"payee unreachable: GET {url}/v1/info: cannot connect to 127.0.0.1:{closed_port}: "
        "Connection refused"
    )


def test_cli_reports_an_unreachable_payee_with_its_code(tmp_path: Path, closed_port: int) -> None:
    url = f"http://127.0.0.1:{closed_port}"
    out = invoke(
        "--datadir",
        str(tmp_path),
        "--rpc-url",
        "http://127.0.0.1:1",
        "--rpc-user",
        "u",
        "--rpc-password",
        "p",
        "open",
        url,
        "--deposit-sat",
        "100000",
        "--lifetime-blocks",
        "20",
    )
    assert out.exit_code == 1
    last = out.output.strip().splitlines()[-2]
    assert last == (
        f"error: payee_unreachable: payee unreachable: GET {url}/v1/info: "
        f"cannot connect to 127.0.0.1:{closed_port}: Connection refused"
    )
    assert "Traceback" not in out.output and "Error(" not in out.output


def test_json_output_of_empty_lists(tmp_path: Path) -> None:
    out = invoke("--datadir", str(tmp_path), "--json", "list")
    assert out.exit_code == 0, out.output
    assert json.loads(out.output) == {"channels": [], "tip_height": None}
    out = invoke("--datadir", str(tmp_path), "--json", "--rpc-url", "http://127.0.0.1:1", "channels")
    assert out.exit_code == 0, out.output
    assert json.loads(out.output) == {"channels": [], "tip_height": None}


def test_env_vars_set_global_options(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["list"], env={"BTCCHANNEL_DATADIR": str(tmp_path), "BTCCHANNEL_JSON": "1"})
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["channels"] == []


# ----------------------------------------------------------------------- real processes


def test_two_processes_open_fetch_close_and_refund(
    bitcoind: RegtestNode,
    funded_wallet: str,
    tmp_path: Path,
    payee_process: tuple[CliProcess, subprocess.Popen[str], str],
) -> None:
    payee, server, url = payee_process
    payer = CliProcess(bitcoind, tmp_path / "payer", funded_wallet)

    # a payee asking more than the payer's limit: refused before anything is funded
    assert "terms_refused" in payer.fails(
        "open", url, "--deposit-sat", "200000", "--lifetime-blocks", "50", "--max-price-sat", "1999", "--no-wait"
    )
    assert payer.json("list")["channels"] == []
    # a channel opened, used for a paid download (nothing more: the payer pays only for units), closed
    opened = payer.json(
        "open",
        url,
        "--deposit-sat",
        "200000",
        "--lifetime-blocks",
        "50",
        "--no-wait",
        "--max-price-sat",
        "2000",
        "--max-total-sat",
        "150000",
    )
    cid = opened["channel_id"]
    assert opened["state"] == "funding"
    bitcoind.mine(1)
    out = tmp_path / "got.bin"
    fetched = payer.json("fetch", f"{url}/v1/file", "--out", str(out))
    assert out.read_bytes() == (tmp_path / "data.bin").read_bytes()
    assert fetched["units"] == 10 and fetched["amount_sat"] == 20000
    assert "metered_channel" in payer.fails("pay", cid, "--amount-sat", "5000")
    listed = {c["channel_id"]: c for c in payee.json("channels")["channels"]}
    assert listed[cid]["amount_sat"] == 20000 and listed[cid]["state"] == "open"
    assert listed[cid]["terms"]["price_sat"] == 2000 and listed[cid]["terms"]["max_total_sat"] == 150000
    closing = payer.json("close", cid)
    close_txid = closing["close_txid"]
    bitcoind.mine(1)
    tx = bitcoind.rpc("getrawtransaction", close_txid, 2)
    assert tx["vin"][0]["txid"] == opened["funding_txid"]
    values = [btc_to_sat(v["value"]) for v in tx["vout"]]
    assert values[0] == 200000 - 20000  # the payer's change, exactly
    assert values[1] == 20000 - btc_to_sat(tx["fee"])
    assert payee.json("channel", cid)["state"] == "closing"  # 1 confirmation is not final
    bitcoind.mine(5)  # a close is final at final_confirmations (6 by default)
    wait_until(lambda: payee.json("channel", cid)["state"] == "closed", timeout=30, what="payee sees the close")

    # the payee closes a channel on its own, then bumps its close by RBF
    third = payer.json("open", url, "--deposit-sat", "100000", "--lifetime-blocks", "50", "--no-wait")
    cid3 = third["channel_id"]
    bitcoind.mine(1)
    payer.json("fetch", f"{url}/v1/file/1")
    assert "metered_channel" in payer.fails("pay", cid3, "--amount-sat", "20000")
    first_close = payee.json("close", cid3, "--fee-rate", "3")["close_txid"]
    bumped = payee.json("bump", cid3, "--fee-rate", "6")["close_txid"]
    assert bumped != first_close
    mempool = bitcoind.rpc("getrawmempool")
    assert bumped in mempool and first_close not in mempool
    bitcoind.mine(1)
    btx = bitcoind.rpc("getrawtransaction", bumped, 2)
    assert btx["confirmations"] == 1 and btc_to_sat(btx["fee"]) >= 6 * btx["vsize"]
    assert btc_to_sat(btx["vout"][0]["value"]) == 100000 - 2000

    # a second channel: the payee vanishes, the payer restores a backup elsewhere and refunds
    second = payer.json("open", url, "--deposit-sat", "100000", "--lifetime-blocks", "12", "--no-wait")
    cid2 = second["channel_id"]
    bitcoind.mine(1)
    assert payer.json("fetch", f"{url}/v1/file/0")["amount_sat"] == 2000
    server.send_signal(signal.SIGKILL)
    server.wait(30)
    payer.json("backup", "export", str(tmp_path / "backup.json"))
    assert (tmp_path / "backup.json").stat().st_mode & 0o077 == 0
    restored = CliProcess(bitcoind, tmp_path / "restored", funded_wallet)
    assert restored.json("backup", "import", str(tmp_path / "backup.json"))["imported"] == 3
    assert "not_expired" in restored.fails("refund", cid2)
    bitcoind.mine(second["expiry_height"] - bitcoind.tip_height())
    refund_txid = restored.json("refund", cid2)["refund_txid"]
    bitcoind.mine(1)
    rtx = bitcoind.rpc("getrawtransaction", refund_txid, 2)
    assert rtx["confirmations"] == 1
    assert rtx["vin"][0]["txid"] == second["funding_txid"]
    assert btc_to_sat(rtx["vout"][0]["value"]) == 100000 - btc_to_sat(rtx["fee"])


def test_close_tx_prints_the_last_state_as_a_transaction_any_node_accepts(
    bitcoind: RegtestNode,
    funded_wallet: str,
    tmp_path: Path,
    payee_process: tuple[CliProcess, subprocess.Popen[str], str],
) -> None:
    payee, server, url = payee_process
    payer = CliProcess(bitcoind, tmp_path / "payer", funded_wallet)
    opened = payer.json("open", url, "--deposit-sat", "100000", "--lifetime-blocks", "50", "--no-wait")
    cid = opened["channel_id"]
    bitcoind.mine(1)
    for i in range(3):
        payer.json("fetch", f"{url}/v1/file/{i}")
    server.send_signal(signal.SIGKILL)  # the payee's service is gone; its datadir is all there is
    server.wait(30)
    doc = payee.json("channel", cid, "--close-tx", "--fee-rate", "2")
    assert doc["amount_sat"] == 3 * 2000
    plain = subprocess.run(
        payee.argv("channel", cid, "--close-tx"), env=payee.env, capture_output=True, text=True, timeout=300
    )
    decoded = bitcoind.rpc("decoderawtransaction", plain.stdout.strip())  # the hex alone, for a pipe
    assert decoded["vin"][0]["txid"] == opened["funding_txid"] and len(decoded["vin"][0]["txinwitness"]) == 4
    txid = bitcoind.rpc("sendrawtransaction", doc["hex"])
    assert txid == doc["txid"]
    bitcoind.mine(1)
    tx = bitcoind.rpc("getrawtransaction", txid, 2)
    assert tx["confirmations"] == 1 and tx["vin"][0]["txid"] == opened["funding_txid"]
    assert btc_to_sat(tx["vout"][0]["value"]) == 100000 - 3 * 2000  # the payer's change, exactly as signed
    assert btc_to_sat(tx["vout"][1]["value"]) == 3 * 2000 - btc_to_sat(tx["fee"])
