"""Descriptor channels: the funding output is the miniscript ``and_v(or_i(v:pk(PAYEE),v:after(N)),pk(PAYER))``.

Core checks: BIP380 checksums, both script versions built and parsed, the JSON of a legacy channel
unchanged, spends of either script classified. On a real node: Bitcoin Core computes the same
checksums, addresses and miniscript; Core's wallet alone, given the private descriptor, sweeps the
deposit once the tip reaches the expiry (and cannot before); legacy-script channels (asked for, or
from an older client that does not ask) still open, close and refund.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import signal
import sqlite3
import subprocess
from pathlib import Path
from typing import Any, Callable

import aiohttp
import pytest
from bitcoin.core import CTransaction
from coincurve import PublicKey

from btcchannel.amounts import btc_to_sat
from btcchannel.bitcoind.binary import BitcoindBinary
from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.core.channel import PayeeChannel
from btcchannel.core.descriptor import (
    add_checksum,
    descriptor_checksum,
    funding_descriptor,
    seed_key_expression,
    strip_checksum,
    wif,
)
from btcchannel.core.keys import public_key
from btcchannel.core.params import ChannelParams
from btcchannel.core.script import (
    SCRIPT_DESCRIPTOR,
    SCRIPT_LEGACY,
    funding_witness_script,
    parse_channel_script,
    parse_funding_witness_script,
)
from btcchannel.core.seed import derive_channel_key
from btcchannel.core.state import ChannelState, SpendKind, classify_spend
from btcchannel.core.tx import OutPoint, bip143_sighash
from btcchannel.errors import BadRequest, BadScript
from btcchannel.payer.client import PayerClient
from btcchannel.payer.descriptors import descriptor_backup, write_descriptor_backup
from btcchannel.store import PayeeStore, PayerRecord, PayerStore
from btcchannel.testing import RunningPayee, open_channel, tx_of, wait_until_async
from btcchannel.testing.cli import CliProcess
from btcchannel.testing.fixtures import PayerFactory

PAYER_KEY = hashlib.sha256(b"descriptor payer").digest()
PAYEE_KEY = hashlib.sha256(b"descriptor payee").digest()
PAYER, PAYEE = public_key(PAYER_KEY), public_key(PAYEE_KEY)
CHANGE = bytes.fromhex("0014" + "22" * 20)
FIXTURES = Path(__file__).resolve().parent / "fixtures"
README = (FIXTURES.parent.parent / "README.md").read_text()


def _params(version: int, expiry: int = 300) -> ChannelParams:
    return ChannelParams("regtest", PAYER, PAYEE, expiry, 100_000, CHANGE, script_version=version)


# -- core ---------------------------------------------------------------------------------


def test_checksum_of_the_bip380_example_and_any_changed_character_is_refused() -> None:
    assert add_checksum("raw(deadbeef)") == "raw(deadbeef)#89f8spxm"  # BIP380's valid example
    assert strip_checksum("raw(deadbeef)#89f8spxm") == "raw(deadbeef)"
    for bad in ("raw(deadbeef)#89f8spxn", "raw(deedbeef)#89f8spxm", "raw(deadbeef)#89f8spx", "raw(deadbeef)"):
        with pytest.raises(BadRequest):
            strip_checksum(bad)
    with pytest.raises(BadRequest):
        descriptor_checksum("raw(deadbeef)\u00e9")


def test_the_two_script_versions_differ_in_one_opcode_and_parse_back() -> None:
    legacy = funding_witness_script(PAYER, PAYEE, 300, SCRIPT_LEGACY)
    new = funding_witness_script(PAYER, PAYEE, 300, SCRIPT_DESCRIPTOR)
    assert len(legacy) == len(new) and [i for i, (a, b) in enumerate(zip(legacy, new)) if a != b] == [41]
    assert legacy[40] == new[40] == 0xB1 and (legacy[41], new[41]) == (
        0x75,
        0x69,
    )  # OP_DROP, OP_VERIFY after OP_CHECKLOCKTIMEVERIFY
    assert parse_channel_script(legacy) == (PAYER, PAYEE, 300, SCRIPT_LEGACY)
    assert parse_channel_script(new) == (PAYER, PAYEE, 300, SCRIPT_DESCRIPTOR)
    assert parse_funding_witness_script(new) == (PAYER, PAYEE, 300)
    with pytest.raises(BadScript):
        parse_channel_script(new[:41] + b"\x76" + new[42:])  # OP_DUP: neither form
    with pytest.raises(BadRequest):
        funding_witness_script(PAYER, PAYEE, 300, 2)


def test_params_json_of_a_legacy_channel_is_unchanged_and_the_version_round_trips() -> None:
    legacy, new = _params(SCRIPT_LEGACY), _params(SCRIPT_DESCRIPTOR)
    assert "script_version" not in legacy.to_json()  # rows and backups of old channels read as before
    assert new.to_json()["script_version"] == SCRIPT_DESCRIPTOR
    assert ChannelParams.from_json(new.to_json()) == new and ChannelParams.from_json(legacy.to_json()) == legacy
    assert new.funding_script != legacy.funding_script
    for bad in (2, True, "1"):
        with pytest.raises(BadRequest):
            ChannelParams.from_json({**new.to_json(), "script_version": bad})


def test_descriptors_of_both_forms() -> None:
    new = _params(SCRIPT_DESCRIPTOR, 700_000)
    assert strip_checksum(funding_descriptor(new)) == (
        f"wsh(and_v(or_i(v:pk({PAYEE.hex()}),v:after(700000)),pk({PAYER.hex()})))"
    )
    assert strip_checksum(funding_descriptor(new, payer_key=wif(PAYER_KEY, "regtest"))).endswith(
        f"pk({wif(PAYER_KEY, 'regtest')})))"
    )
    legacy = _params(SCRIPT_LEGACY)
    assert funding_descriptor(legacy) == add_checksum(f"addr({legacy.funding_address})")
    with pytest.raises(BadRequest):
        funding_descriptor(legacy, payer_key=wif(PAYER_KEY, "regtest"))  # not miniscript: no keyed form
    assert wif(PAYER_KEY, "mainnet")[0] in "KL" and wif(PAYER_KEY, "regtest")[0] == "c"
    expr = seed_key_expression(bytes(range(32)), 7, "regtest")
    assert expr.startswith("[") and "/7h]tprv" in expr
    assert seed_key_expression(bytes(range(32)), 7, "mainnet").split("]")[1].startswith("xprv")


@pytest.mark.parametrize("version", [SCRIPT_LEGACY, SCRIPT_DESCRIPTOR])
def test_spends_of_either_script_are_classified(version: int) -> None:
    ws = _params(version).witness_script
    other = _params(1 - version).witness_script
    sig = b"\x30" * 71
    assert classify_spend([sig, sig, b"\x01", ws], ws) is SpendKind.CLOSE
    assert classify_spend([sig, b"", ws], ws) is SpendKind.REFUND
    assert classify_spend([sig, b"", other], ws) is SpendKind.OTHER  # the other form is another script
    assert classify_spend([sig, b"\x01", ws], ws) is SpendKind.OTHER


def test_old_channels_of_the_committed_fixtures_keep_the_legacy_script(tmp_path: Path) -> None:
    """The fixture rows have no script version: their stored payments verify only against the legacy script."""
    db = tmp_path / "payee.db"
    db.write_bytes((FIXTURES / "payee-v0.db").read_bytes())
    with PayeeStore(db) as store:
        rec = store.get(bytes([3]).hex() * 16)
    assert rec.signature is not None and "script_version" not in rec.params
    assert rec.funding_txid is not None and rec.funding_vout is not None
    funding = OutPoint(rec.funding_txid, rec.funding_vout)
    params = ChannelParams.from_json(rec.params).with_funding(funding)
    assert params.script_version == SCRIPT_LEGACY and parse_channel_script(params.witness_script)[3] == SCRIPT_LEGACY
    PayeeChannel.restore(params, rec.privkey, ChannelState.OPEN).verify_payment(rec.amount_sat, rec.signature)
    as_new = ChannelParams.from_json({**rec.params, "script_version": SCRIPT_DESCRIPTOR}).with_funding(funding)
    with pytest.raises(Exception, match="signature"):
        PayeeChannel.restore(as_new, rec.privkey, ChannelState.OPEN).verify_payment(rec.amount_sat, rec.signature)


# -- on a real node -------------------------------------------------------------------------


def test_bitcoin_core_computes_the_same_descriptors(bitcoind: RegtestNode) -> None:
    seed = bytes(range(32))
    seeded = ChannelParams(
        "regtest",
        public_key(derive_channel_key(seed, 3)),
        PAYEE,
        450,
        100_000,
        CHANGE,
        script_version=SCRIPT_DESCRIPTOR,
    )
    cases = [
        (funding_descriptor(_params(SCRIPT_DESCRIPTOR)), _params(SCRIPT_DESCRIPTOR)),
        (funding_descriptor(_params(SCRIPT_DESCRIPTOR, 499_999_999)), _params(SCRIPT_DESCRIPTOR, 499_999_999)),
        (
            funding_descriptor(_params(SCRIPT_DESCRIPTOR), payer_key=wif(PAYER_KEY, "regtest")),
            _params(SCRIPT_DESCRIPTOR),
        ),
        (funding_descriptor(seeded, payer_key=seed_key_expression(seed, 3, "regtest")), seeded),
        (funding_descriptor(_params(SCRIPT_LEGACY)), _params(SCRIPT_LEGACY)),
    ]
    for desc, params in cases:
        info = bitcoind.rpc("getdescriptorinfo", strip_checksum(desc))
        assert info["checksum"] == desc[-8:], desc
        assert bitcoind.rpc("deriveaddresses", desc) == [params.funding_address]
    for params in (_params(SCRIPT_DESCRIPTOR), seeded):  # Core reads the witness script as this miniscript
        decoded = bitcoind.rpc("decodescript", params.witness_script.hex())
        assert decoded["segwit"]["desc"] == funding_descriptor(params)
    assert (
        "OP_CHECKLOCKTIMEVERIFY OP_VERIFY"
        in bitcoind.rpc("decodescript", _params(SCRIPT_DESCRIPTOR).witness_script.hex())["asm"]
    )


def _kill(server: subprocess.Popen[str]) -> None:
    server.send_signal(signal.SIGKILL)  # the payee vanishes: only the refund gets the deposit back
    server.wait(30)


def _readme_bitcoin_cli(
    node: RegtestNode,
    binary: BitcoindBinary,
    tmp_path: Path,
    descriptors: Path,
) -> list[Callable[..., str]]:
    """The README's ``bitcoin-cli`` lines of "Refund with Bitcoin Core alone", each as a function running it
    on ``node`` (placeholders given as keyword arguments); its stdout."""
    section = README.split("### Refund with Bitcoin Core alone", 1)[1].split("\n## ", 1)[0]
    lines = [
        line.split("  #", 1)[0].strip()
        for block in re.findall(r"```sh\n(.*?)```", section, re.S)
        for line in block.splitlines()
        if line.startswith("bitcoin-cli ")
    ]
    assert len(lines) == 4
    cli = " ".join(
        shlex.quote(a)
        for a in (
            *binary.bitcoin_cli,
            f"-datadir={node.datadir}",
            f"-rpcuser={node.rpc_user}",
            f"-rpcpassword={node.rpc_password}",
        )
    )

    def runner(line: str) -> Callable[..., str]:
        def run(**values: str) -> str:
            command = line.replace("bitcoin-cli", cli, 1).replace("descriptors.json", str(descriptors))
            for name, value in values.items():
                command = command.replace(name, value)
            done = subprocess.run(
                ["bash", "-c", command], capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False
            )
            assert done.returncode == 0, (command, done.stderr)
            return done.stdout

        return run

    return [runner(line) for line in lines]


def test_core_wallet_alone_sweeps_the_deposit_after_expiry(
    bitcoind: RegtestNode,
    bitcoind_binary: BitcoindBinary,
    funded_wallet: str,
    tmp_path: Path,
    payee_process: tuple[CliProcess, subprocess.Popen[str], str],
) -> None:
    payee_cli, server, url = payee_process
    payer = CliProcess(bitcoind, tmp_path / "payer", funded_wallet)
    opened = payer.json("open", url, "--deposit-sat", "100000", "--lifetime-blocks", "12", "--no-wait")
    cid, expiry = opened["channel_id"], opened["expiry_height"]
    bitcoind.mine(1)
    public = payer.json("channel", cid, "--descriptor")
    assert public["script_version"] == SCRIPT_DESCRIPTOR and public["role"] == "payer"
    assert payee_cli.json("channel", cid, "--descriptor")["descriptor"] == public["descriptor"]
    funding = tx_of(bitcoind, opened["funding_txid"])
    out = next(o for o in funding["vout"] if btc_to_sat(o["value"]) == 100_000)
    assert bitcoind.rpc("deriveaddresses", public["descriptor"]) == [out["scriptPubKey"]["address"]]
    assert (
        bitcoind.rpc("getdescriptorinfo", strip_checksum(public["descriptor"]))["checksum"] == public["descriptor"][-8:]
    )
    assert "private" in payee_cli.fails("channel", cid, "--descriptor", "--private")

    private = payer.json("channel", cid, "--descriptor", "--private")["descriptor"]
    index = payer.json("seed", "show")["next_key_index"] - 1
    assert f"/{index}h]tprv" in private  # the key as its seed path's xprv
    backup = tmp_path / "descriptors.json"
    written = payer.json("backup", "export", "--descriptors", str(backup))
    assert written["descriptors"] == 1 and written["left_out"] == []
    requests: list[dict[str, Any]] = json.loads(backup.read_text())
    assert [r["desc"] for r in requests] == [private] and backup.stat().st_mode & 0o077 == 0
    _kill(server)

    # Bitcoin Core alone, by the README's commands: a blank descriptor wallet, the backup imported as is
    readme = _readme_bitcoin_cli(bitcoind, bitcoind_binary, tmp_path, backup)
    created, imported, listed, sendall = readme
    created()
    assert [r["success"] for r in json.loads(imported())] == [True]
    utxos = json.loads(listed())
    assert [(u["txid"], btc_to_sat(u["amount"]), u["solvable"]) for u in utxos] == [
        (opened["funding_txid"], 100_000, True)
    ]
    dest = bitcoind.new_address(funded_wallet)
    assert bitcoind.tip_height() < expiry
    # before the expiry: signed with the expiry as locktime, the node refuses it as non-final ...
    early = bitcoind.rpc(
        "sendall", [dest], None, "unset", 2, {"locktime": expiry, "add_to_wallet": False}, wallet="refund"
    )
    assert early["complete"]
    [verdict] = bitcoind.rpc("testmempoolaccept", [early["hex"]])
    assert not verdict["allowed"] and verdict["reject-reason"] == "non-final"
    # ... and with a locktime below the expiry the wallet cannot satisfy after(expiry) at all
    assert not bitcoind.rpc("sendall", [dest], None, "unset", 2, {"add_to_wallet": False}, wallet="refund")["complete"]
    assert bitcoind.rpc("gettxout", opened["funding_txid"], out["n"]) is not None
    bitcoind.mine(expiry - bitcoind.tip_height())
    sent = json.loads(sendall(ADDRESS=dest, EXPIRY=str(expiry)))
    assert sent["complete"]
    bitcoind.mine(1)
    sweep = tx_of(bitcoind, sent["txid"])
    assert sweep["confirmations"] == 1 and sweep["locktime"] == expiry
    assert [(i["txid"], i["vout"]) for i in sweep["vin"]] == [(opened["funding_txid"], out["n"])]
    [paid] = sweep["vout"]
    fee = 100_000 - btc_to_sat(paid["value"])
    assert paid["scriptPubKey"]["address"] == dest and 0 < fee < 10_000  # the wallet's fallback rate, 20 sat/vB
    # Core's own refund has the witness btcchannel's refund has: the payee's watcher calls it a refund
    witness = [bytes.fromhex(x) for x in sweep["vin"][0]["txinwitness"]]
    assert classify_spend(witness, bytes.fromhex(public_key_script(payer, cid))) is SpendKind.REFUND
    assert len(witness) == 3 and witness[1] == b""


def public_key_script(payer: CliProcess, cid: str) -> str:
    with PayerStore(payer.datadir / "regtest" / "payer.db") as store:
        return ChannelParams.from_json(store.get(cid).params).witness_script.hex()


async def _propose_raw(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/v1/channels", json=body) as resp:
            return resp.status, await resp.json()


async def test_a_proposal_without_the_field_keeps_the_legacy_script(bitcoind: RegtestNode, payee: RunningPayee) -> None:
    info = await _info(payee.url)
    assert info["script_versions"] == [SCRIPT_LEGACY, SCRIPT_DESCRIPTOR]
    base = {
        "payer_pubkey": PAYER.hex(),
        "deposit_sat": 100_000,
        "expiry_height": info["tip_height"] + 50,
        "payer_script": CHANGE.hex(),
    }
    status, old = await _propose_raw(payee.url, base)  # an older client's proposal
    assert status == 201 and old["script_version"] == SCRIPT_LEGACY
    assert parse_channel_script(bytes.fromhex(old["witness_script"]))[3] == SCRIPT_LEGACY
    status, new = await _propose_raw(payee.url, {**base, "script_version": SCRIPT_DESCRIPTOR})
    assert status == 201 and new["script_version"] == SCRIPT_DESCRIPTOR
    assert parse_channel_script(bytes.fromhex(new["witness_script"])) == (
        PAYER,
        bytes.fromhex(new["payee_pubkey"]),
        base["expiry_height"],
        SCRIPT_DESCRIPTOR,
    )
    assert ChannelParams.from_json(payee.store.get(new["channel_id"]).params).script_version == SCRIPT_DESCRIPTOR
    for bad in (2, True, "1", -1):
        status, err = await _propose_raw(payee.url, {**base, "script_version": bad})
        assert status == 400 and err["error"]["code"] == "bad_request", bad


async def _info(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}/v1/info") as resp:
            return dict(await resp.json())


async def test_legacy_and_descriptor_channels_both_close_on_chain(
    bitcoind: RegtestNode,
    payee: RunningPayee,
    payer_client: PayerClient,
) -> None:
    cids = {}
    for version in (SCRIPT_LEGACY, SCRIPT_DESCRIPTOR):
        cids[version] = cid = await open_channel(payer_client, bitcoind, payee.url, 200_000, script_version=version)
        assert ChannelParams.from_json(payee.store.get(cid).params).script_version == version
        await payer_client.pay(cid, 5_000)
        await payer_client.close(cid)
    bitcoind.mine(1)
    for version, cid in cids.items():
        await wait_until_async(
            lambda c=cid: payee.store.get(c).state in ("closing", "closed") and bool(payee.store.get(c).close_txid),
            timeout=30,
            what="close broadcast",
        )
        rec = payee.store.get(cid)
        close = tx_of(bitcoind, rec.close_txid)
        ws = ChannelParams.from_json(rec.params).witness_script
        vin = next(i for i in close["vin"] if i["txid"] == rec.funding_txid)
        witness = [bytes.fromhex(x) for x in vin["txinwitness"]]
        assert witness[-1] == ws and classify_spend(witness, ws) is SpendKind.CLOSE
        assert parse_channel_script(ws)[3] == version and close.get("confirmations", 0) >= 1


async def test_legacy_and_descriptor_channels_both_refund_after_expiry(
    bitcoind: RegtestNode,
    payee: RunningPayee,
    payer_factory: PayerFactory,
) -> None:
    client = payer_factory("refunder")
    cids = {
        v: await open_channel(client, bitcoind, payee.url, 100_000, lifetime=14, script_version=v)
        for v in (SCRIPT_LEGACY, SCRIPT_DESCRIPTOR)
    }
    expiry = max(payee.store.get(c).expiry_height for c in cids.values())
    await payee.stop()  # the payee vanishes
    bitcoind.mine(expiry - bitcoind.tip_height())
    for version, cid in cids.items():
        txid = await client.refund(cid)
        tx = tx_of(bitcoind, txid)
        rec = client.store.get(cid)
        ws = ChannelParams.from_json(rec.params).witness_script
        witness = [bytes.fromhex(x) for x in tx["vin"][0]["txinwitness"]]
        assert classify_spend(witness, ws) is SpendKind.REFUND and parse_channel_script(ws)[3] == version
    bitcoind.mine(1)
    for cid in cids.values():
        assert tx_of(bitcoind, client.store.get(cid).refund_txid)["confirmations"] == 1


def test_sqlite_rows_store_the_version_in_params(tmp_path: Path) -> None:
    """The script form lives in each row's params (no schema change): a v0 payer fixture migrates and reads legacy."""
    db = tmp_path / "payer.db"
    db.write_bytes((FIXTURES / "payer-v0.db").read_bytes())
    with PayerStore(db) as store:
        assert all(ChannelParams.from_json(r.params).script_version == SCRIPT_LEGACY for r in store.list())
    conn = sqlite3.connect(db)
    assert all("script_version" not in json.loads(p) for (p,) in conn.execute("SELECT params FROM channels"))
    conn.close()


def test_descriptor_vectors_check_out_independently(bitcoind: RegtestNode) -> None:
    """docs/vectors.json's descriptor channel: Core agrees on the descriptors and addresses, decodes the
    close and the refund, and each signature verifies over a digest recomputed from its transaction."""
    v: dict[str, Any] = json.loads((FIXTURES.parent.parent / "docs" / "vectors.json").read_text())
    d, keys, params = v["descriptor_channel"], v["keys"], v["params"]
    ws = bytes.fromhex(d["witness_script"])
    assert parse_channel_script(ws) == (
        bytes.fromhex(keys["payer_pubkey"]),
        bytes.fromhex(keys["payee_pubkey"]),
        params["expiry_height"],
        SCRIPT_DESCRIPTOR,
    )
    assert d["funding_script"] == "0020" + hashlib.sha256(ws).hexdigest() != v["funding_script"]
    for desc in (d["descriptor"], d["private_descriptor"]):
        assert bitcoind.rpc("getdescriptorinfo", strip_checksum(desc))["checksum"] == desc[-8:]
        assert bitcoind.rpc("deriveaddresses", desc) == [d["funding_address"]]
    assert bitcoind.rpc("decodescript", d["witness_script"])["segwit"]["desc"] == d["descriptor"]
    p = d["payment"]
    close = CTransaction.deserialize(bytes.fromhex(p["close_tx"]["hex"]))
    witness = [bytes(x) for x in close.wit.vtxinwit[0].scriptWitness.stack]
    assert classify_spend(witness, ws) is SpendKind.CLOSE and witness[0].hex() == p["signature"]
    digest = bip143_sighash(close, 0, ws, params["deposit_sat"], p["sighash_type"])
    assert digest.hex() == p["digest"]
    assert PublicKey(bytes.fromhex(keys["payer_pubkey"])).verify(witness[0][:-1], digest, hasher=None)
    refund = CTransaction.deserialize(bytes.fromhex(d["refund_tx"]["hex"]))
    witness = [bytes(x) for x in refund.wit.vtxinwit[0].scriptWitness.stack]
    assert classify_spend(witness, ws) is SpendKind.REFUND and refund.nLockTime == params["expiry_height"]
    assert PublicKey(bytes.fromhex(keys["payer_pubkey"])).verify(
        witness[0][:-1], bip143_sighash(refund, 0, ws, params["deposit_sat"], 1), hasher=None
    )
    for tx in (p["close_tx"], d["refund_tx"]):
        decoded = bitcoind.rpc("decoderawtransaction", tx["hex"])
        assert decoded["txid"] == tx["txid"] and decoded["vsize"] == tx["vsize"]


async def test_a_payer_asks_an_older_payee_for_nothing_new(
    bitcoind: RegtestNode,
    payee: RunningPayee,
    payer_client: PayerClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A payee whose /v1/info has no script_versions (an older one, which refuses unknown fields) gets a
    proposal without script_version, and the channel uses the legacy script on both sides."""
    svc = payee.svc
    info, propose = svc.info, svc.propose
    bodies: list[dict[str, Any]] = []

    def old_info() -> dict[str, Any]:
        return {k: v for k, v in info().items() if k != "script_versions"}

    def old_propose(body: dict[str, Any], client: str | None = None) -> dict[str, Any]:
        bodies.append(dict(body))
        return {k: v for k, v in propose(body, client).items() if k != "script_version"}

    monkeypatch.setattr(svc, "info", old_info)
    monkeypatch.setattr(svc, "propose", old_propose)
    cid = await open_channel(payer_client, bitcoind, payee.url, 100_000)
    assert len(bodies) == 1 and "script_version" not in bodies[0]
    for params in (payer_client.store.get(cid).params, payee.store.get(cid).params):
        assert ChannelParams.from_json(params).script_version == SCRIPT_LEGACY
    with pytest.raises(BadRequest, match="does not offer script version 1"):
        await payer_client.propose(payee.url, 100_000, 20, script_version=SCRIPT_DESCRIPTOR)
    assert await payer_client.pay(cid, 1_000) == 1_000


def test_descriptor_backup_with_and_without_keys(tmp_path: Path) -> None:
    """Private descriptors for descriptor channels (seed xprv, or WIF for a key not from the seed), legacy
    channels left out; without keys every channel not ended, watch-only; ended channels never."""
    with PayerStore(tmp_path / "payer.db") as store:
        index, seeded_key = store.reserve_key()
        rows = [
            ("seeded", seeded_key, index, SCRIPT_DESCRIPTOR, ChannelState.OPEN),
            ("random", PAYER_KEY, None, SCRIPT_DESCRIPTOR, ChannelState.FUNDING),
            ("legacy", hashlib.sha256(b"legacy").digest(), None, SCRIPT_LEGACY, ChannelState.OPEN),
            ("ended", hashlib.sha256(b"ended").digest(), None, SCRIPT_DESCRIPTOR, ChannelState.CLOSED),
        ]
        for n, (name, key, key_index, version, state) in enumerate(rows):
            params = ChannelParams("regtest", public_key(key), PAYEE, 300 + n, 100_000, CHANGE, script_version=version)
            store.insert(
                PayerRecord(
                    channel_id=name.ljust(32, "0")[:32],
                    server_url="http://payee",
                    state=state,
                    params=params.to_json(),
                    privkey=key,
                    deposit_sat=100_000,
                    expiry_height=300 + n,
                    created_at=1_700_000_000.0 + n,
                    key_index=key_index,
                )
            )
        private = descriptor_backup(store, keys=True)
        public = descriptor_backup(store, keys=False)
        seed = store.seed()
        target = tmp_path / "out" / "descriptors.json"
        write_descriptor_backup(private, target)
        with pytest.raises(BadRequest):
            write_descriptor_backup(private, target)  # never overwritten without being asked
    assert [r["label"] for r in private.requests] == [
        "btcchannel " + "seeded".ljust(32, "0"),
        "btcchannel " + "random".ljust(32, "0"),
    ]
    assert f"pk({seed_key_expression(seed, index, 'regtest')})" in private.requests[0]["desc"]
    assert f"pk({wif(PAYER_KEY, 'regtest')})" in private.requests[1]["desc"]
    assert private.requests[0]["timestamp"] == 1_700_000_000
    assert [d["channel_id"] for d in private.left_out] == ["legacy".ljust(32, "0")]
    assert [r["desc"].split("(")[0] for r in public.requests] == ["wsh", "wsh", "addr"] and not public.left_out
    assert json.loads(target.read_text()) == private.requests and target.stat().st_mode & 0o077 == 0


def test_checksums_agree_with_core_on_many_strings(bitcoind: RegtestNode) -> None:
    """Core checks a given checksum: raw() descriptors of every length up to 64 bytes and addr() ones."""
    for n in range(0, 65):
        desc = f"raw({hashlib.sha256(bytes([n])).hexdigest()[: 2 * (n % 33)] or '6a'})"
        ours = add_checksum(desc)
        assert bitcoind.rpc("getdescriptorinfo", ours)["checksum"] == ours[-8:], desc
    addr = _params(SCRIPT_DESCRIPTOR).funding_address
    assert bitcoind.rpc("getdescriptorinfo", add_checksum(f"addr({addr})"))["checksum"] == descriptor_checksum(
        f"addr({addr})"
    )
