"""Networks in the CLI: one datadir per network, the node found as bitcoin-cli finds it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.cli import main
from btcchannel.cli._network import derive_node_access, read_bitcoin_conf
from btcchannel.core import keys
from btcchannel.core.params import ChannelParams
from btcchannel.core.state import ChannelState
from btcchannel.store import PayerRecord, PayerStore


def _regtest_channel(db: Path) -> str:
    params = ChannelParams(
        network="regtest",
        payer_pubkey=keys.public_key(keys.generate_private_key()),
        payee_pubkey=keys.public_key(keys.generate_private_key()),
        expiry_height=500,
        deposit_sat=100_000,
        payer_script=b"\x00\x14" + bytes(20),
    )
    cid = "ab" * 16
    with PayerStore(db) as store:
        store.insert(
            PayerRecord(
                channel_id=cid,
                server_url="http://127.0.0.1:1",
                state=ChannelState.PROPOSED,
                params=params.to_json(),
                privkey=keys.generate_private_key(),
                deposit_sat=100_000,
                expiry_height=500,
            )
        )
    return cid


def test_each_network_has_its_own_datadir(tmp_path: Path) -> None:
    cid = _regtest_channel(tmp_path / "regtest" / "payer.db")

    def listed(network: str) -> list[str]:
        out = CliRunner().invoke(main, ["--datadir", str(tmp_path), "--network", network, "--json", "list"])
        assert out.exit_code == 0, out.output
        return [c["channel_id"] for c in json.loads(out.stdout)["channels"]]

    assert listed("regtest") == [cid]
    assert listed("mainnet") == []
    assert listed("signet") == []

    # a regtest channel copied into the mainnet datadir still cannot be paid there
    for leftover in (tmp_path / "mainnet").glob("payer.db*"):
        leftover.unlink()
    shutil.copy(tmp_path / "regtest" / "payer.db", tmp_path / "mainnet" / "payer.db")
    out = CliRunner().invoke(
        main,
        [
            "--datadir",
            str(tmp_path),
            "--network",
            "mainnet",
            "--json",
            "--rpc-url",
            "http://127.0.0.1:1",
            "--rpc-user",
            "u",
            "--rpc-password",
            "p",
            "pay",
            cid,
            "--amount-sat",
            "1",
        ],
    )
    assert out.exit_code == 1
    err = json.loads(out.stdout)["error"]
    assert err["code"] == "unknown_channel"
    assert err["message"] == f"channel {cid} is a regtest channel, and this client runs on mainnet"
    assert "--network" in err["hint"]


def test_conf_sections_and_defaults_as_bitcoind_reads_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    access = derive_node_access("signet", None, None)
    assert access.url == "http://127.0.0.1:38332"
    assert access.cookie == tmp_path / "home" / ".bitcoin" / "signet" / ".cookie"
    assert derive_node_access("mainnet", None, None).cookie == tmp_path / "home" / ".bitcoin" / ".cookie"
    assert derive_node_access("testnet", None, None).url.endswith(":18332")

    conf = tmp_path / "b.conf"
    conf.write_text(
        "rpcport=1111\nrpcconnect=10.0.0.2\ndatadir=/srv/btc\n[signet]\nrpcport=2222\n"
        "[test]\nrpcuser=alice\nrpcpassword=secret # comment\nregtest.rpcport=3333\n"
    )
    assert read_bitcoin_conf(conf, "mainnet")["rpcport"] == "1111"
    assert read_bitcoin_conf(conf, "signet")["rpcport"] == "2222"
    assert "rpcport" not in read_bitcoin_conf(conf, "testnet4")  # network-only: not from the top level
    assert read_bitcoin_conf(conf, "regtest")["rpcport"] == "3333"
    signet = derive_node_access("signet", None, conf)
    assert signet.url == "http://10.0.0.2:2222" and signet.cookie == Path("/srv/btc/signet/.cookie")
    test = derive_node_access("testnet", None, conf)
    assert (test.user, test.password, test.cookie) == ("alice", "secret", None)


def _tip_seen(args: list[str], env: dict[str, str | None] | None = None) -> object:
    out = CliRunner().invoke(main, [*args, "--json", "channels"], env=env)
    assert out.exit_code == 0, out.output
    return json.loads(out.stdout)["tip_height"]


def test_node_found_from_its_datadir_as_bitcoin_cli_does(bitcoind: RegtestNode, tmp_path: Path) -> None:
    env: dict[str, str | None] = {"BTCCHANNEL_RPC_URL": None, "XDG_DATA_HOME": str(tmp_path / "xdg")}
    assert bitcoind.cookie_file.exists()
    # the port from bitcoin.conf's [regtest] section, the cookie from <datadir>/regtest/.cookie
    assert (
        _tip_seen(["--datadir", str(tmp_path), "--bitcoin-datadir", str(bitcoind.datadir)], env)
        == bitcoind.tip_height()
    )
    assert (
        _tip_seen(
            [
                "--datadir",
                str(tmp_path),
                "--bitcoin-conf",
                str(bitcoind.datadir / "bitcoin.conf"),
                "--bitcoin-datadir",
                str(bitcoind.datadir),
            ],
            env,
        )
        == bitcoind.tip_height()
    )
    # nothing there: no node, said in one error with the cookie path looked at
    out = CliRunner().invoke(
        main,
        ["--datadir", str(tmp_path), "--bitcoin-datadir", str(tmp_path / "none"), "--json", "close", "00" * 16],
        env=env,
    )
    assert out.exit_code == 1
    assert json.loads(out.stdout)["error"]["code"] in ("node_unavailable", "unknown_channel")


def test_regtest_node_found_from_a_custom_datadir(bitcoind: RegtestNode, tmp_path: Path) -> None:
    xdg = tmp_path / "xdg"
    record = xdg / "btcchannel" / "regtest-node" / "node.json"
    record.parent.mkdir(parents=True)
    # what `btcchannel regtest start` leaves behind in the default datadir (this process stands in for the node)
    record.write_text(
        json.dumps(
            {
                "pid": os.getpid(),
                "rpc_port": bitcoind.rpc_port,
                "p2p_port": bitcoind.p2p_port,
                "rpc_user": bitcoind.rpc_user,
                "rpc_password": bitcoind.rpc_password,
            }
        )
    )
    env: dict[str, str | None] = {"BTCCHANNEL_RPC_URL": None, "XDG_DATA_HOME": str(xdg)}
    assert _tip_seen([], env) == bitcoind.tip_height()
    assert _tip_seen(["--datadir", str(tmp_path / "elsewhere")], env) == bitcoind.tip_height()
