"""The CLI's error contract: --version, a hint on every error, one JSON document under --json."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

import btcchannel
from btcchannel.cli import main
from btcchannel.cli._app import UsageProblem
from btcchannel.cli._hints import HINTS, hint_for
from btcchannel.errors import ChannelError, NodeError, _subclasses


def test_version() -> None:
    for flag in ("--version", "-V"):
        out = CliRunner().invoke(main, [flag])
        assert out.exit_code == 0, out.output
        assert out.output == f"btcchannel {btcchannel.__version__}\n"


def test_every_error_code_has_a_hint() -> None:
    codes = {cls.code for cls in [ChannelError, *_subclasses(ChannelError)]}
    assert UsageProblem.code in codes
    missing = sorted(codes - set(HINTS))
    assert missing == []
    assert all(len(h) > 20 for h in HINTS.values())


def test_node_messages_refine_the_hint() -> None:
    err = NodeError("Fee estimation failed. Fallbackfee is disabled.")
    assert "--fee-rate" in hint_for(err)
    assert "fund the wallet" in hint_for(NodeError("Insufficient funds"))
    assert hint_for(NodeError("something else")) == HINTS["node_error"]


def test_text_error_is_the_error_line_then_a_hint(tmp_path: Path) -> None:
    out = CliRunner().invoke(main, ["--datadir", str(tmp_path), "channel", "00" * 16])
    assert out.exit_code == 1
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert lines[0].startswith("error: unknown_channel: ")
    assert lines[1] == f"hint: {HINTS['unknown_channel']}"
    assert len(lines) == 2


def test_json_error_is_one_document_on_stdout(tmp_path: Path) -> None:
    out = CliRunner().invoke(main, ["--datadir", str(tmp_path), "--json", "channel", "00" * 16])
    assert out.exit_code == 1
    doc = json.loads(out.stdout)
    assert set(doc) == {"error"}
    assert doc["error"]["code"] == "unknown_channel"
    assert doc["error"]["message"]
    assert doc["error"]["hint"] == HINTS["unknown_channel"]
    assert out.stderr == ""


def test_json_usage_error_is_a_document_with_exit_status_2(tmp_path: Path) -> None:
    out = CliRunner().invoke(main, ["--datadir", str(tmp_path), "--json", "pay", "00" * 16, "--amount-sat", "-5"])
    assert out.exit_code == 2
    doc = json.loads(out.stdout)
    assert doc["error"]["code"] == "usage"
    assert "--amount-sat" in doc["error"]["message"]
    assert doc["error"]["hint"]


def test_json_error_for_a_missing_node(tmp_path: Path) -> None:
    out = CliRunner().invoke(
        main,
        [
            "--datadir",
            str(tmp_path),
            "--json",
            "open",
            "http://127.0.0.1:1",
            "--deposit-sat",
            "1000",
            "--lifetime-blocks",
            "20",
        ],
        env={"BTCCHANNEL_RPC_URL": None},
    )
    assert out.exit_code == 1
    doc = json.loads(out.stdout)
    assert doc["error"]["code"] == "node_unavailable"
    assert "--rpc-url" in doc["error"]["hint"]
