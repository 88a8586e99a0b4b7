"""The configuration file: --config / BTCCHANNEL_CONFIG, the order flag > environment > file >
default, a usage error naming the file and key for an unknown key, a wrong type or a missing
file, `config show` with secrets masked, the README's example, and `serve` run from a file on a
real regtest node."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result

from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.cli import main
from btcchannel.cli._config import mask
from btcchannel.cli._hints import HINTS
from btcchannel.wait import wait_until

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _clean_env(**env: str) -> dict[str, str | None]:
    """No BTCCHANNEL_* of the calling environment, then ``env``."""
    out: dict[str, str | None] = {k: None for k in os.environ if k.startswith("BTCCHANNEL_")}
    out.update(env)
    return out


def _invoke(args: list[str], **env: str) -> Result:
    return CliRunner().invoke(main, args, env=_clean_env(**env))


def _show(args: list[str], **env: str) -> dict[str, Any]:
    out = _invoke([*args, "--json", "config", "show"], **env)
    assert out.exit_code == 0, out.output
    doc: dict[str, Any] = json.loads(out.stdout)
    return doc


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_flag_beats_environment_beats_file_beats_default(tmp_path: Path) -> None:
    conf = _write(
        tmp_path / "btcchannel.toml",
        f"""
[global]
wallet = "file-wallet"
rpc-user = "file-user"
rpc-password = "s3cret-in-file"
datadir = "{tmp_path / "from-file"}"

[serve]
price-sat = 100
port = 9000
mode = "prepay"
store = "postgresql://pay:db-s3cret@db.example/payee"

[regtest.mine]
address = "bcrt1qexample"
""",
    )
    doc = _show(
        ["--config", str(conf), "--wallet", "flag-wallet"],
        BTCCHANNEL_RPC_USER="env-user",
        BTCCHANNEL_SERVE_PRICE_SAT="7",
    )
    g, serve = doc["tables"]["global"], doc["tables"]["serve"]
    assert doc["file"] == str(conf)
    assert g["wallet"] == {"value": "flag-wallet", "source": "command line"}
    assert g["rpc-user"] == {"value": "env-user", "source": "environment"}
    assert g["datadir"] == {"value": str(tmp_path / "from-file"), "source": "config file"}
    assert g["network"] == {"value": "regtest", "source": "default"}
    assert serve["price-sat"] == {"value": 7, "source": "environment"}
    assert serve["port"] == {"value": 9000, "source": "config file"}
    assert serve["mode"] == {"value": "prepay", "source": "config file"}
    assert serve["host"] == {"value": "127.0.0.1", "source": "default"}
    assert doc["tables"]["regtest.mine"]["address"] == {"value": "bcrt1qexample", "source": "config file"}
    # secrets masked: the rpc password and the database URL's password never printed
    assert g["rpc-password"] == {"value": "***", "source": "config file"}
    assert serve["store"]["value"] == "postgresql://pay:***@db.example/payee"
    text = _invoke(["--config", str(conf), "config", "show"], BTCCHANNEL_RPC_USER="env-user")
    assert text.exit_code == 0, text.output
    assert "s3cret" not in text.output and "s3cret" not in json.dumps(doc)
    assert 'wallet = "file-wallet"  # config file' in text.output
    assert 'rpc-user = "env-user"  # environment' in text.output
    # the text is itself a config file: read back, it gives the same values (the masked password aside)
    again = _write(tmp_path / "again.toml", text.output)
    back = _show(["--config", str(again)])["tables"]
    shown = _show(["--config", str(conf)], BTCCHANNEL_RPC_USER="env-user")["tables"]
    values = {(t, k): e["value"] for t, entries in back.items() for k, e in entries.items()}
    assert values == {(t, k): e["value"] for t, entries in shown.items() for k, e in entries.items()}
    # the file by BTCCHANNEL_CONFIG; a --config flag wins over it
    assert _show([], BTCCHANNEL_CONFIG=str(conf))["tables"]["global"]["wallet"]["value"] == "file-wallet"
    other = _write(tmp_path / "other.toml", '[global]\nwallet = "other"\n')
    doc = _show(["--config", str(other)], BTCCHANNEL_CONFIG=str(conf))
    assert doc["file"] == str(other) and doc["tables"]["global"]["wallet"]["value"] == "other"
    # without a file: every value is a default
    plain = _show([])
    assert plain["file"] is None
    assert plain["tables"]["global"].pop("json") == {"value": True, "source": "command line"}
    assert {e["source"] for t in plain["tables"].values() for e in t.values()} == {"default"}


def test_the_file_reaches_the_command(tmp_path: Path) -> None:
    """A global from the file is what the command runs with (here the datadir `list` reads)."""
    conf = _write(
        tmp_path / "c.toml",
        f'[global]\ndatadir = "{tmp_path / "dd"}"\nnetwork = "signet"\n'
        f'rpc-url = "http://127.0.0.1:1"\nrpc-user = "u"\n',
    )
    out = _invoke(["--config", str(conf), "--json", "backup", "export", str(tmp_path / "b.json")])
    # the payer's datadir of the file's network is the one read: an empty one has nothing to export
    assert out.exit_code in (0, 1), out.output
    assert (tmp_path / "dd" / "signet").is_dir()
    assert not (tmp_path / "dd" / "regtest").exists()


def _bad(tmp_path: Path, text: str, *cmd: str) -> tuple[str, str]:
    """``cmd`` under a file holding ``text``: exit status 2, one JSON error document, and the
    text form on stderr; returns (message, stderr)."""
    conf = _write(tmp_path / "bad.toml", text)
    out = _invoke(["--config", str(conf), "--json", *cmd])
    assert out.exit_code == 2, out.output
    doc = json.loads(out.stdout)  # exactly one document
    assert set(doc) == {"error"} and doc["error"]["code"] == "bad_config"
    assert doc["error"]["hint"] == HINTS["bad_config"]
    message: str = doc["error"]["message"]
    assert message.startswith(f"{conf}: ")
    plain = _invoke(["--config", str(conf), *cmd])
    assert plain.exit_code == 2 and plain.stdout == ""
    assert plain.stderr.splitlines() == [f"error: bad_config: {message}", f"hint: {HINTS['bad_config']}"]
    return message, plain.stderr


def test_unknown_keys_are_usage_errors_naming_file_and_key(tmp_path: Path) -> None:
    msg, _ = _bad(tmp_path, "[serve]\nprice = 100\n", "serve")  # serve would have bound a port: it did not run
    assert "[serve]: unknown key 'price' (did you mean 'price-sat'?)" in msg
    msg, _ = _bad(tmp_path, "[global]\nnetwrok = 'signet'\n", "config", "show")
    assert "[global]: unknown key 'netwrok' (did you mean 'network'?)" in msg
    msg, _ = _bad(tmp_path, "[serv]\nport = 1\n", "summary")
    assert "top level: unknown key 'serv' (did you mean 'serve'?)" in msg
    msg, _ = _bad(tmp_path, "network = 'signet'\n", "summary")
    assert "network: a global option belongs in the [global] table" in msg
    msg, _ = _bad(tmp_path, "[regtest.mine]\naddres = 'x'\n", "summary")
    assert "[regtest.mine]: unknown key 'addres' (did you mean 'address'?)" in msg
    msg, _ = _bad(tmp_path, "[global]\nconfig = 'other.toml'\n", "summary")  # no file names another
    assert "unknown key 'config'" in msg
    msg, _ = _bad(tmp_path, "[global]\nserve = 1\n", "summary")  # a command's table is not a global option
    assert "[global]: unknown key 'serve'" in msg


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[serve]\nprice-sat = '100'\n", "[serve] price-sat: expected an integer, got str '100'"),
        ("[serve]\nport = true\n", "[serve] port: expected an integer, got bool True"),
        ("[serve]\nprice-sat = -1\n", "[serve] price-sat: -1 is not in the range x>=0"),
        ("[serve]\nmode = 'free'\n", "[serve] mode: 'free' is not one of 'prepay', 'postpay'"),
        ("[serve]\nmetrics = 'no'\n", "[serve] metrics: expected true or false, got str 'no'"),
        ("[serve]\npayment-timeout = 'soon'\n", "[serve] payment-timeout: expected a number, got str 'soon'"),
        ("[serve]\nport = 1.5\n", "[serve] port: expected an integer, got float 1.5"),
        ("[global]\nnetwork = 'moonnet'\n", "[global] network: 'moonnet' is not one of"),
        ("[global]\nverbose = 'yes'\n", "[global] verbose: expected an integer"),
        ("[global]\nwallet = 3\n", "[global] wallet: expected a string, got int 3"),
        ("serve = 5\n", "serve: expected a table [serve]"),
        ("[regtest]\nstart = 1\n", "[regtest] start: expected a table [regtest.start]"),
    ],
)
def test_wrong_types_are_usage_errors_naming_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    msg, _ = _bad(tmp_path, text, "serve")
    assert expected in msg, msg


def test_a_missing_or_malformed_file_is_a_usage_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"
    for args, env in ((["--config", str(missing)], {}), ([], {"BTCCHANNEL_CONFIG": str(missing)})):
        out = _invoke([*args, "--json", "summary"], **env)
        assert out.exit_code == 2, out.output
        err = json.loads(out.stdout)["error"]
        assert err == {"code": "bad_config", "message": f"{missing}: no such config file", "hint": HINTS["bad_config"]}
    msg, _ = _bad(tmp_path, "[serve\nport = 1\n", "summary")
    assert "not valid TOML" in msg and "line 1" in msg


def test_mask() -> None:
    assert mask("rpc-password", "x") == "***" and mask("rpc-password", None) is None
    assert mask("rpc-url", "http://u:p@h:1/") == "http://u:***@h:1/"
    assert mask("rpc-url", "http://h:1/") == "http://h:1/"
    assert mask("store", "postgresql://u@h/db") == "postgresql://u@h/db"


def test_readme_example_file_is_valid(tmp_path: Path) -> None:
    section = README.split("## Operate", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```toml\n(.*?)```", section, re.S)
    assert len(blocks) == 1
    conf = _write(tmp_path / "btcchannel.toml", blocks[0])
    doc = _show(["--config", str(conf)])
    file_keys = {
        (t, k) for t, entries in doc["tables"].items() for k, e in entries.items() if e["source"] == "config file"
    }
    assert {("global", "network"), ("global", "wallet"), ("serve", "price-sat"), ("serve", "backup-db")} <= file_keys


@pytest.fixture
def served_from_file(bitcoind: RegtestNode, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    bitcoind.create_wallet("conf-payee")
    conf = _write(
        tmp_path / "btcchannel.toml",
        f"""
[global]
datadir = "{tmp_path / "data"}"
rpc-url = "{bitcoind.rpc_url}"
rpc-user = "{bitcoind.rpc_user}"
rpc-password = "{bitcoind.rpc_password}"
wallet = "conf-payee"

[serve]
port = 0
price-sat = 1234
mode = "postpay"
credit-limit-sat = 5000
backup-db = "{tmp_path / "copy" / "payee.db"}"
""",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("BTCCHANNEL_")}
    env["BTCCHANNEL_CONFIG"] = str(conf)
    env["BTCCHANNEL_SERVE_CREDIT_LIMIT_SAT"] = "3000"  # the environment still beats the file
    log = (tmp_path / "payee.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "btcchannel", "--json", "serve"], env=env, stdout=subprocess.PIPE, stderr=log, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, (tmp_path / "payee.log").read_text()
        yield json.loads(line)["url"], tmp_path
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        log.close()


def test_serve_from_a_config_file_on_a_real_node(served_from_file: tuple[str, Path]) -> None:
    url, tmp_path = served_from_file
    info = httpx.get(f"{url}/v1/info", timeout=10).json()
    assert info["price_sat"] == 1234 and info["mode"] == "postpay" and info["network"] == "regtest"
    assert info["credit_limit_sat"] == 3000  # from BTCCHANNEL_SERVE_CREDIT_LIMIT_SAT, not the file's 5000
    assert (tmp_path / "data" / "regtest" / "payee.db").exists()  # the file's datadir
    wait_until(lambda: (tmp_path / "copy" / "payee.db").exists(), timeout=30, what="the file's backup-db copy")
