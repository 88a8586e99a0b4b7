"""The commands layer under the command line (no node): the payer's and the payee's commands open
their stores and build the documents; the command line itself imports no store."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

import btcchannel.cli
from btcchannel.core import keys
from btcchannel.core.params import ChannelParams
from btcchannel.core.script import SCRIPT_DESCRIPTOR
from btcchannel.core.state import ChannelState
from btcchannel.errors import BadBackup, IllegalTransition, UnknownChannel
from btcchannel.payee import commands as payee
from btcchannel.payer import commands as payer
from btcchannel.store import PayerRecord, PayerStore

S = ChannelState


def _channel(datadir: Path, cid: str, state: ChannelState, *, funded: bool = True, expiry: int = 500) -> None:
    privkey = keys.generate_private_key()
    params = ChannelParams(
        network="regtest",
        payer_pubkey=keys.public_key(privkey),
        payee_pubkey=keys.public_key(keys.generate_private_key()),
        expiry_height=expiry,
        deposit_sat=100_000,
        payer_script=b"\x00\x14" + bytes(20),
        script_version=SCRIPT_DESCRIPTOR,
    )
    with PayerStore(payer.store_path(datadir)) as store:
        store.insert(
            PayerRecord(
                channel_id=cid,
                server_url="http://127.0.0.1:1",
                state=S.PROPOSED,
                params=params.to_json(),
                privkey=privkey,
                deposit_sat=100_000,
                expiry_height=expiry,
            )
        )
        store.set_state(cid, state, **({"funding_txid": "ee" * 32, "funding_vout": 0} if funded else {}))


def test_the_command_line_imports_no_store() -> None:
    """Every module of btcchannel.cli, read as source: no import of btcchannel.store (lint-imports
    checks the same as a contract, indirect imports through the commands allowed)."""
    found: list[str] = []
    for path in Path(btcchannel.cli.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            found += [f"{path.name}: {n}" for n in names if (n + ".").startswith("btcchannel.store.")]
    assert found == []


@pytest.mark.parametrize(
    ("state", "funded", "forgettable"),
    [
        (S.FAILED, True, True),
        (S.CLOSED, True, True),
        (S.REFUNDED, True, True),
        (S.PROPOSED, False, True),
        (S.PROPOSED, True, False),
        (S.FUNDING, True, False),
        (S.OPEN, True, False),
        (S.CLOSING, True, False),
    ],
)
def test_forget_only_what_holds_nothing(tmp_path: Path, state: ChannelState, funded: bool, forgettable: bool) -> None:
    cid = "ab" * 16
    _channel(tmp_path, cid, state, funded=funded)
    if forgettable:
        payer.forget(tmp_path, cid)
        assert not payer.knows(tmp_path, cid)
    else:
        with pytest.raises(IllegalTransition, match="may still hold the deposit"):
            payer.forget(tmp_path, cid)
        assert payer.knows(tmp_path, cid)


def test_list_marks_what_is_refundable_at_the_tip(tmp_path: Path) -> None:
    _channel(tmp_path, "01" * 16, S.OPEN, expiry=500)
    _channel(tmp_path, "02" * 16, S.CLOSED, expiry=500)
    _channel(tmp_path, "03" * 16, S.OPEN, expiry=600)
    assert payer.has_channels(tmp_path)
    at = {o["channel_id"]: o for o in payer.channel_list(tmp_path, 550)}
    assert [(at[c]["blocks_left"], at[c]["refundable"]) for c in ("01" * 16, "02" * 16, "03" * 16)] == [
        (-50, True),
        (-50, False),
        (50, False),
    ]
    assert all(o["blocks_left"] is None and not o["refundable"] for o in payer.channel_list(tmp_path, None))


def test_descriptors_and_knowledge_without_a_store_create_nothing(tmp_path: Path) -> None:
    assert not payer.knows(tmp_path, "ab" * 16) and not payee.knows(tmp_path, "ab" * 16)
    assert payer.descriptor_doc(tmp_path, "ab" * 16, private=False) is None
    with pytest.raises(UnknownChannel):
        payee.descriptor_doc(tmp_path, "ab" * 16)
    assert not payer.has_store(tmp_path) and not payee.has_store(tmp_path)


def test_payer_descriptor_and_backup_round_trip(tmp_path: Path) -> None:
    cid = "ab" * 16
    _channel(tmp_path / "a", cid, S.OPEN)
    doc = payer.descriptor_doc(tmp_path / "a", cid, private=True)
    assert doc is not None and doc["role"] == "payer" and doc["private"] and doc["descriptor"].startswith("wsh(")
    file = tmp_path / "backup.json"
    assert payer.export_backup(tmp_path / "a", file) == 1
    assert payer.import_backup(tmp_path / "b", file) == 1
    assert payer.knows(tmp_path / "b", cid)
    file.write_text("not json")
    with pytest.raises(BadBackup, match="not JSON"):
        payer.import_backup(tmp_path / "b", file)
    file.write_text(json.dumps({"something": "else"}))
    with pytest.raises(BadBackup):
        payer.import_backup(tmp_path / "b", file)


def test_seeds_of_each_role(tmp_path: Path) -> None:
    value, index = payer.seed_info(tmp_path)
    assert len(value) >= 16 and index == 0
    assert payer.restore_seed(tmp_path, value) == (False, 0)  # the same seed: nothing new
    assert payee.restore_seed(tmp_path, value) == (True, 0)  # the payee's store is another
    assert payee.seed_info(tmp_path) == (value, 0)
