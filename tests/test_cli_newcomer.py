"""A newcomer's first hour with the command line, one test per friction: what the commands say
while they wait, which code and hint each mistake gets, and what the output looks like.

The ones that need no node run through click's CliRunner; the rest against the session's
regtest node with ``btcchannel serve`` and the payer's commands as separate processes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from btcchannel.bitcoind import binary
from btcchannel.bitcoind.regtest import RegtestNode, _pid_alive
from btcchannel.cli import main
from btcchannel.cli._logging import setup_logging
from btcchannel.cli.payee import _channel_text, _terms_text
from btcchannel.errors import BitcoindNotFound
from btcchannel.payee.config import ServerConfig
from btcchannel.payee.summary import summary_text
from btcchannel.testing.cli import CliProcess
from btcchannel.wait import wait_until

ROOT = Path(__file__).resolve().parent.parent


def _invoke(tmp_path: Path, *args: str, env: dict[str, str | None] | None = None) -> click.testing.Result:
    return CliRunner().invoke(main, ["--datadir", str(tmp_path), *args], env=env)


# 1. open on regtest says at once, and while it waits, that someone must mine -------------------


def test_open_on_regtest_says_at_once_and_while_it_waits_that_someone_must_mine(
    bitcoind: RegtestNode,
    funded_wallet: str,
    tmp_path: Path,
    payee_process: tuple[CliProcess, subprocess.Popen[str], str],
) -> None:
    _payee, _server, url = payee_process
    payer = CliProcess(bitcoind, tmp_path / "payer", funded_wallet)
    # no --no-wait: the mining hint comes as soon as the funding is out, before the wait ends
    out = payer.run("open", url, "--deposit-sat", "100000", "--lifetime-blocks", "50", "--timeout", "2")
    assert out.returncode == 1, out.stderr
    lines = out.stderr.splitlines()
    hint_at = next(i for i, line in enumerate(lines) if "btcchannel regtest mine 1" in line)
    assert hint_at < next(i for i, line in enumerate(lines) if line.startswith("error: open_timeout"))
    assert any("waiting for confirmations: 0/1 (regtest: `btcchannel regtest mine 1`)" in line for line in lines)
    assert lines[-1].startswith("hint: ") and lines[-1].endswith("`btcchannel regtest mine 1`")
    # --no-wait says it too
    opened = payer.run("open", url, "--deposit-sat", "100000", "--lifetime-blocks", "50", "--no-wait")
    assert "on regtest confirm it with `btcchannel regtest mine 1`" in opened.stdout


# 2, 3. the payer's state follows the chain; pay on a metered channel explains itself ---------------


def test_the_payers_list_follows_the_chain_and_agrees_with_the_payee(
    bitcoind: RegtestNode,
    funded_wallet: str,
    tmp_path: Path,
    payee_process: tuple[CliProcess, subprocess.Popen[str], str],
) -> None:
    payee, _server, url = payee_process
    payer = CliProcess(bitcoind, tmp_path / "payer", funded_wallet)
    cid = payer.json("open", url, "--deposit-sat", "100000", "--lifetime-blocks", "50", "--no-wait")["channel_id"]

    # (3) after the funding block, the payer's list says open without a fetch
    bitcoind.mine(1)
    wait_until(
        lambda: payer.json("list")["channels"][0]["state"] == "open",
        timeout=30,
        what="the payer's list follows the funding block",
    )

    # (2) pay on a metered channel: refused up front, saying what to use instead
    err = payer.error("pay", cid, "--amount-sat", "1000")
    assert err["code"] == "metered_channel" and "None" not in err["message"]
    assert "2000 sat a unit" in err["message"] and "btcchannel fetch" in err["hint"]
    assert "metered" in payer.run("pay", "--help").stdout

    # (3) closing on both sides until the close is final (6 confirmations), then closed on both
    payer.json("fetch", f"{url}/v1/file/0", "--channel", cid)
    close_txid = payer.json("close", cid)["close_txid"] or wait_until(
        lambda: payee.json("channel", cid)["close_txid"], timeout=30, what="the close broadcast"
    )
    wait_until(lambda: close_txid in bitcoind.rpc("getrawmempool"), timeout=30, what="the close in the mempool")
    bitcoind.mine(1)
    assert payer.json("list")["channels"][0]["state"] == "closing"
    assert payee.json("channel", cid)["state"] == "closing"
    bitcoind.mine(5)
    wait_until(lambda: payee.json("channel", cid)["state"] == "closed", timeout=60, what="the payee's final close")
    assert payer.json("list")["channels"][0]["state"] == "closed"

    # (5) list with the node unreachable: a warning naming what is unknown, and node_error in JSON
    gone = ("--rpc-url", "http://127.0.0.1:1", "--rpc-user", "u", "--rpc-password", "p")
    out = payer.run(*gone, "list")
    assert out.returncode == 0 and "warning: node_unavailable" in out.stderr and "blocks_left is unknown" in out.stderr
    doc = json.loads(payer.run(*gone, "--json", "list").stdout)
    assert doc["node_error"]["code"] == "node_unavailable" and doc["tip_height"] is None
    out = payer.run(*gone, "summary")
    assert "warning: node_unavailable" in out.stderr and "refundable now unknown (no node)" in out.stdout

    # (9) one channel is one channel
    assert payer.run("backup", "export", str(tmp_path / "b.json")).stdout.startswith("1 channel written")


def test_a_mistaken_open_gets_the_code_and_hint_of_its_cause(
    bitcoind: RegtestNode,
    tmp_path: Path,
    payee_process: tuple[CliProcess, subprocess.Popen[str], str],
) -> None:
    _payee, _server, url = payee_process
    bitcoind.create_wallet("newcomer-empty")
    poor = CliProcess(bitcoind, tmp_path / "payer", "newcomer-empty")

    # (5) a payee on another network: the user's --network is wrong (a usage error), not the payee
    out = poor.run("--json", "--network", "signet", "open", url, "--deposit-sat", "20000", "--lifetime-blocks", "40")
    assert out.returncode == 2, out.stderr
    err = json.loads(out.stdout)["error"]
    assert err["code"] == "wrong_network" and "regtest" in err["message"] and "--network" in err["hint"]

    # (5) an empty wallet: insufficient_funds, and no channel row is left behind (9)
    err = poor.error("open", url, "--deposit-sat", "20000", "--lifetime-blocks", "40")
    assert err["code"] == "insufficient_funds" and "fund the wallet" in err["hint"]
    assert poor.json("list")["channels"] == []

    # (9) an expiry the payee refuses is said in --lifetime-blocks, not in heights
    err = poor.error("open", url, "--deposit-sat", "20000", "--lifetime-blocks", "5")
    assert err["code"] == "expiry_out_of_range" and "lifetime of 5 blocks" in err["message"]
    assert "12 to 4320 blocks" in err["message"]

    # (5) a URL without its scheme
    err = poor.error("open", url.split("://", 1)[1], "--deposit-sat", "20000", "--lifetime-blocks", "40")
    assert err["code"] == "bad_url" and f"e.g. {url}" in err["message"]


# 4. -v is btcchannel's own log --------------------------------------------------------------------


@pytest.fixture
def cli_logging() -> object:
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    root.setLevel(level)
    for h in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(h)


def _passes(verbose: int, name: str, level: int) -> bool:
    setup_logging(verbose, False)
    handler = next(h for h in logging.getLogger().handlers if getattr(h, "_btcchannel_cli", False))
    record = logging.LogRecord(name, level, __file__, 1, "HTTP Request: POST http://127.0.0.1:18443", (), None)
    return logging.getLogger(name).isEnabledFor(level) and bool(handler.filter(record))


def test_v_logs_btcchannels_lines_and_dependencies_only_at_vv(cli_logging: object) -> None:
    assert _passes(1, "btcchannel.payee.watcher", logging.INFO)
    assert not _passes(1, "httpx", logging.INFO)  # one line per RPC call: not at -v
    assert not _passes(1, "httpcore.connection", logging.DEBUG)
    assert _passes(1, "httpx", logging.WARNING)  # their warnings always show
    assert _passes(2, "httpx", logging.INFO) and _passes(2, "btcchannel.payer", logging.DEBUG)
    assert not _passes(0, "btcchannel.payer", logging.INFO)


# 5. precise codes and hints -----------------------------------------------------------------------


def test_backup_import_errors_have_their_own_code_and_hint(tmp_path: Path) -> None:
    (tmp_path / "notjson.txt").write_text("hello")
    (tmp_path / "other.json").write_text(json.dumps({"kind": "something else"}))
    for name in ("notjson.txt", "other.json"):
        out = _invoke(tmp_path, "--json", "backup", "import", str(tmp_path / name))
        assert out.exit_code == 1
        err = json.loads(out.stdout)["error"]
        assert err["code"] == "bad_backup" and str(tmp_path / name) in err["message"]
        assert "backup export" in err["hint"] and "payee" not in err["hint"]


def test_an_rpc_url_where_nothing_listens_is_reported_as_unreachable(tmp_path: Path) -> None:
    out = _invoke(
        tmp_path,
        "--rpc-url",
        "http://127.0.0.1:1",
        "--json",
        "open",
        "http://127.0.0.1:8402",
        "--deposit-sat",
        "20000",
        "--lifetime-blocks",
        "40",
        env={"BTCCHANNEL_RPC_USER": None, "BTCCHANNEL_RPC_PASSWORD": None},
    )
    assert out.exit_code == 1
    err = json.loads(out.stdout)["error"]
    assert err["code"] == "node_unavailable" and "no node answers at http://127.0.0.1:1" in err["message"]
    assert "cookie" not in err["message"]
    # without its scheme, even with a user: said as a URL to fix, before any connection
    out = _invoke(
        tmp_path,
        "--rpc-url",
        "127.0.0.1:18443",
        "--rpc-user",
        "u",
        "--json",
        "open",
        "http://127.0.0.1:8402",
        "--deposit-sat",
        "20000",
        "--lifetime-blocks",
        "40",
    )
    err = json.loads(out.stdout)["error"]
    assert err["code"] == "node_unavailable" and "give it as http://HOST:PORT" in err["message"]


# 6. progress on a first run -----------------------------------------------------------------------


def test_a_bitcoind_fetch_says_what_it_does_before_it_does_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    heard: list[str] = []
    monkeypatch.setattr(binary.shutil, "which", lambda name: None)  # no apt-get: the fetch stops early
    with pytest.raises(BitcoindNotFound):
        binary.fetch_bitcoind(cache=tmp_path, progress=heard.append)
    assert len(heard) == 1 and heard[0].startswith("fetching bitcoind:") and "bitcoin-knots" in heard[0]


def test_venv_script_says_it_is_installing(tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "regtest").mkdir(parents=True)
    shutil.copy(ROOT / "regtest" / "venv.sh", project / "regtest" / "venv.sh")
    for name in ("setup.cfg", "pyproject.toml"):
        (project / name).write_text("")
    fake = project / ".venv" / "bin" / "python"  # a venv whose pip install only records its call
    fake.parent.mkdir(parents=True)
    fake.write_text(f'#!/bin/sh\necho "$@" >> {project / "pip.log"}\n')
    fake.chmod(0o755)
    out = subprocess.run(
        ["bash", str(project / "regtest" / "venv.sh"), "true"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert out.returncode == 0, out.stderr
    assert "venv.sh: installing btcchannel" in out.stderr and "-e .[test]" in (project / "pip.log").read_text()


# 7. the suite never finds the user's own node -----------------------------------------------------


def test_the_suite_is_isolated_from_a_node_the_user_runs(bitcoind: RegtestNode, tmp_path: Path) -> None:
    """A user's walk-through node (`btcchannel regtest start`) recorded in their home: the CLI test
    that must find no node still finds none when the suite runs under that home."""
    home = tmp_path / "home"
    node_dir = home / ".local" / "share" / "btcchannel" / "regtest-node"
    node_dir.mkdir(parents=True)
    (node_dir / "node.json").write_text(
        json.dumps(
            {
                "pid": bitcoind.pid,
                "rpc_port": bitcoind.rpc_port,
                "p2p_port": bitcoind.p2p_port,
                "rpc_user": bitcoind.rpc_user,
                "rpc_password": bitcoind.rpc_password,
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BTCCHANNEL_", "XDG_DATA", "PYTEST"))}
    env["HOME"] = str(home)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_cli_errors.py::test_json_error_for_a_missing_node",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:]
    assert "1 passed" in out.stdout


# 8. --json after the subcommand -------------------------------------------------------------------


def test_json_is_accepted_after_the_subcommand(tmp_path: Path) -> None:
    out = _invoke(tmp_path, "list", "--json")
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["channels"] == []
    out = _invoke(tmp_path, "backup", "import", str(tmp_path / "missing.json"), "--json")
    assert out.exit_code == 2 and json.loads(out.stdout)["error"]["code"] == "usage"
    # every global option, with its value, in either form, and -vv
    out = CliRunner().invoke(
        main, ["config", "show", "--datadir", str(tmp_path), "--wallet", "w", "--network=signet", "-vv", "--json"]
    )
    assert out.exit_code == 0, out.output
    shown = json.loads(out.stdout)["tables"]["global"]
    assert shown["wallet"] == {"value": "w", "source": "command line"} and shown["network"]["value"] == "signet"
    assert shown["verbose"]["value"] == 2 and shown["datadir"]["value"] == str(tmp_path)
    # a subcommand's own option of a global's name stays the subcommand's
    out = CliRunner().invoke(main, ["--datadir", str(tmp_path), "--json", "regtest", "mine", "1", "--address", "x"])
    assert json.loads(out.stdout)["error"]["code"] != "usage"


# 9. the smaller ones ------------------------------------------------------------------------------


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [prefix]
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            out += _commands(cmd, (*prefix, name))
        else:
            out.append((*prefix, name))
    return out


def test_help_has_no_rst_markup(tmp_path: Path) -> None:
    for path in _commands(main):
        text = _invoke(tmp_path, *path, "--help").output
        assert "``" not in text and ":class:" not in text and ":func:" not in text, path


def test_channel_text_shows_nested_values_without_python_reprs() -> None:
    text = _channel_text(
        {"state": "open", "terms": {"price_sat": 100, "mode": "prepay", "max_units": None}, "close_txid": None}
    )
    assert "terms           price_sat=100, mode=prepay, max_units=-" in text
    assert "{" not in text and "'" not in text and "None" not in text


def test_a_stale_payee_summary_says_the_expiry_passed_and_counts_in_words() -> None:
    doc = {
        "earned_sat": 0,
        "pending_close": {"channels": 1, "amount_sat": 5},
        "open": {
            "channels": 1,
            "amount_sat": 0,
            "deposit_sat": 9,
            "nearest_expiry_height": 300,
            "blocks_to_nearest_expiry": -1,
        },
        "close_fee_rate_sat_vb": None,
        "channels": {"open": 1},
    }
    text = summary_text(doc)
    assert "-1 blocks" not in text and "expired at height 300, 1 block ago" in text
    assert "pending closes 1 channel, 5 sat" in text and "open           1 channel," in text


def test_serve_states_its_terms(tmp_path: Path) -> None:
    text = _terms_text(ServerConfig(datadir=tmp_path, price_sat=100, final_confirmations=3))
    assert "100 sat a unit, prepay" in text and "final at 3 confirmations" in text and "open at 1 confirmation," in text
    assert "--final-confirmations" in _invoke(tmp_path, "serve", "--help").output


def test_config_show_names_the_node_the_commands_would_use(tmp_path: Path) -> None:
    out = _invoke(
        tmp_path,
        "--rpc-url",
        "http://127.0.0.1:18443",
        "--rpc-user",
        "alice",
        "config",
        "show",
        env={"BTCCHANNEL_RPC_PASSWORD": "secret"},
    )
    assert out.exit_code == 0, out.output
    assert "# node: http://127.0.0.1:18443 (user 'alice' with a password; from --rpc-user)" in out.stdout
    assert "secret" not in out.stdout
    doc = json.loads(
        _invoke(
            tmp_path, "--json", "--network", "signet", "--bitcoin-datadir", str(tmp_path / "none"), "config", "show"
        ).stdout
    )
    assert doc["node"]["rpc_url"] is None and "no signet node found" in doc["node"]["problem"]


def test_regtest_start_mine_and_stop_as_a_newcomer_reads_them(tmp_path: Path) -> None:
    env = {**os.environ, "BTCCHANNEL_DATADIR": str(tmp_path)}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "btcchannel", *args], env=env, capture_output=True, text=True, timeout=300
        )

    started = run("regtest", "start")
    assert started.returncode == 0, started.stderr
    try:
        assert "export" not in started.stdout and "find this node by themselves" in started.stdout
        mined = run("regtest", "mine", "1")
        assert re.match(r"mined 1 block, height \d+$", mined.stdout.strip()), mined.stdout
        pid = json.loads(run("--json", "regtest", "status").stdout)["pid"]
    finally:
        stopped = run("regtest", "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert not _pid_alive(pid)  # stop returned only once bitcoind had exited
