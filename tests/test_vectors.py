"""docs/vectors.json: byte for byte what the code computes, and checked independently: every signature
verifies (coincurve) over a digest recomputed with the general BIP143 routine from the close
transaction itself, the funding address is the script's P2WSH, and a real node decodes each close."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from bitcoin.core import CTransaction
from coincurve import PublicKey

from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.core.script import address_to_script
from btcchannel.core.tx import bip143_sighash
from btcchannel.testing.vectors import vectors
from btcchannel.wire import parse_auth_header

DOC = Path(__file__).resolve().parent.parent / "docs" / "vectors.json"


def _verify(pubkey_hex: str, der_hex: str, digest_hex: str) -> bool:
    return PublicKey(bytes.fromhex(pubkey_hex)).verify(bytes.fromhex(der_hex), bytes.fromhex(digest_hex), hasher=None)


def test_vectors_file_is_what_the_code_computes() -> None:
    assert DOC.read_text() == json.dumps(vectors(), indent=2) + "\n"


def test_vectors_check_out_independently(bitcoind: RegtestNode) -> None:
    v: dict[str, Any] = json.loads(DOC.read_text())
    keys, params = v["keys"], v["params"]
    ws = bytes.fromhex(v["witness_script"])
    assert v["funding_script"] == "0020" + hashlib.sha256(ws).hexdigest()
    assert address_to_script(v["funding_address"], v["network"]).hex() == v["funding_script"]
    assert keys["payer_pubkey"] in v["witness_script"] and keys["payee_pubkey"] in v["witness_script"]
    assert len(v["payments"]) == 2 and v["full_drain"]["amount_sat"] == params["deposit_sat"]
    for p in [*v["payments"], v["full_drain"]]:
        sig = bytes.fromhex(p["signature"])
        assert sig[-1] == p["sighash_type"] == (0x83 if p["amount_sat"] < params["deposit_sat"] else 0x82)
        assert _verify(keys["payer_pubkey"], sig[:-1].hex(), p["digest"])
        tx = CTransaction.deserialize(bytes.fromhex(p["close_tx"]["hex"]))
        assert tx.GetTxid()[::-1].hex() == p["close_tx"]["txid"]
        assert tx.vin[0].prevout.hash[::-1].hex() == params["funding_txid"] and tx.vin[0].prevout.n == 1
        witness = [bytes(x) for x in tx.wit.vtxinwit[0].scriptWitness.stack]
        assert witness[0] == sig and witness[2] == b"\x01" and witness[3] == ws
        # the payer's digest and the payee's, recomputed from the transaction by the general routine
        assert bip143_sighash(tx, 0, ws, params["deposit_sat"], p["sighash_type"]).hex() == p["digest"]
        payee_sig = witness[1]
        assert payee_sig[-1] == 0x01 and len(payee_sig) == 71
        assert _verify(keys["payee_pubkey"], payee_sig[:-1].hex(), bip143_sighash(tx, 0, ws, params["deposit_sat"], 1).hex())
        outs = [(o.nValue, bytes(o.scriptPubKey).hex()) for o in tx.vout]
        change = params["deposit_sat"] - p["amount_sat"]
        fee = params["deposit_sat"] - sum(value for value, _ in outs)
        expected = [(change, params["payer_script"])] if change else []
        assert outs == [*expected, (p["amount_sat"] - fee, p["close_tx"]["payee_script"])]
        assert fee >= p["close_tx"]["fee_rate_sat_vb"] * p["close_tx"]["vsize"]
        decoded = bitcoind.rpc("decoderawtransaction", p["close_tx"]["hex"])
        assert decoded["txid"] == p["close_tx"]["txid"] and decoded["vsize"] == p["close_tx"]["vsize"]
    cr = v["close_request"]
    assert cr["digest"] == hashlib.sha256(b"btcchannel/v1/close" + bytes.fromhex(cr["channel_id"])).hexdigest()
    assert _verify(keys["payer_pubkey"], cr["signature"], cr["digest"])
    ra = v["request_auth"]
    counter, sig = parse_auth_header(ra["header"])
    assert counter == ra["counter"]
    digest = hashlib.sha256(b"btcchannel/v1/request" + bytes.fromhex(ra["channel_id"]) + counter.to_bytes(8, "big")
                            + ra["method"].encode() + b" " + ra["target"].encode()).hexdigest()
    assert digest == ra["digest"] and _verify(keys["payer_pubkey"], sig.hex(), digest)
