"""docs/vectors.json: byte for byte what the code computes, and checked independently of it: every
digest is recomputed from the transactions with python-bitcoinlib's BIP143 ``SignatureHash``, every
signature is re-made by the RFC 6979 rules the document states (an HMAC-DRBG written here, the
payee's close signature ground to 70 bytes of DER), the auth digests are rebuilt from their
definition in docs/PROTOCOL.md, the funding address is the script's P2WSH, and a real node decodes
each transaction."""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import struct
from pathlib import Path
from typing import Any

from bitcoin.core import CTransaction
from bitcoin.core.script import SIGVERSION_WITNESS_V0, CScript, SignatureHash
from coincurve import PublicKey

from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.core.script import address_to_script
from btcchannel.testing.vectors import vectors
from btcchannel.wire import parse_auth_header

DOC = Path(__file__).resolve().parent.parent / "docs" / "vectors.json"


N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


def _rfc6979_sign(key: bytes, digest: bytes, extra: bytes = b"") -> bytes:
    """ECDSA with the RFC 6979 nonce (HMAC-SHA256 DRBG over key || digest || extra), low-S, DER."""
    k_, v = b"\x00" * 32, b"\x01" * 32
    seed = key + digest + extra
    k_ = hmac.new(k_, v + b"\x00" + seed, "sha256").digest()
    v = hmac.new(k_, v, "sha256").digest()
    k_ = hmac.new(k_, v + b"\x01" + seed, "sha256").digest()
    v = hmac.new(k_, v, "sha256").digest()
    while True:
        v = hmac.new(k_, v, "sha256").digest()
        k = int.from_bytes(v, "big")
        if 0 < k < N:
            break
        k_ = hmac.new(k_, v + b"\x00", "sha256").digest()
        v = hmac.new(k_, v, "sha256").digest()
    r = int.from_bytes(PublicKey.from_valid_secret(k.to_bytes(32, "big")).format(compressed=False)[1:33], "big") % N
    s = pow(k, -1, N) * (int.from_bytes(digest, "big") + r * int.from_bytes(key, "big")) % N
    s = min(s, N - s)

    def der_int(x: int) -> bytes:
        raw = x.to_bytes((x.bit_length() + 7) // 8 or 1, "big")
        raw = b"\x00" + raw if raw[0] & 0x80 else raw
        return b"\x02" + bytes([len(raw)]) + raw

    body = der_int(r) + der_int(s)
    return b"\x30" + bytes([len(body)]) + body


def _low_r_sign(key: bytes, digest: bytes) -> bytes:
    """The payee's close signature as the vectors state it: extra entropy i = 0, 1, ... (32 bytes
    little-endian, none for 0) until the DER encoding is 70 bytes."""
    i = 0
    while True:
        der = _rfc6979_sign(key, digest, b"" if i == 0 else i.to_bytes(32, "little"))
        if len(der) == 70:
            return der
        i += 1


def _bip143(tx: CTransaction, script: bytes, amount: int, hashtype: int) -> str:
    return bytes(SignatureHash(CScript(script), tx, 0, hashtype, amount, SIGVERSION_WITNESS_V0)).hex()


def _f(x: str) -> bytes:
    raw = x.encode()
    return struct.pack(">H", len(raw)) + raw


def _verify(pubkey_hex: str, der_hex: str, digest_hex: str) -> bool:
    return PublicKey(bytes.fromhex(pubkey_hex)).verify(bytes.fromhex(der_hex), bytes.fromhex(digest_hex), hasher=None)


def test_vectors_file_is_what_the_code_computes() -> None:
    assert DOC.read_text() == json.dumps(vectors(), indent=2) + "\n"


def test_vectors_check_out_independently(bitcoind: RegtestNode) -> None:
    v: dict[str, Any] = json.loads(DOC.read_text())
    keys, params = v["keys"], v["params"]
    payer_key, payee_key = bytes.fromhex(keys["payer_privkey"]), bytes.fromhex(keys["payee_privkey"])
    assert PublicKey.from_valid_secret(payer_key).format().hex() == keys["payer_pubkey"]
    assert v["revision"] == 2 and set(v["signing"]) == {"payer", "payee_close", "payer_refund", "verification"}
    ws = bytes.fromhex(v["witness_script"])
    assert v["funding_script"] == "0020" + hashlib.sha256(ws).hexdigest()
    assert address_to_script(v["funding_address"], v["network"]).hex() == v["funding_script"]
    assert keys["payer_pubkey"] in v["witness_script"] and keys["payee_pubkey"] in v["witness_script"]
    assert len(v["payments"]) == 2 and v["full_drain"]["amount_sat"] == params["deposit_sat"]
    cap = v["capacity"]
    assert cap["max_partial_sat"] == params["deposit_sat"] - cap["payer_dust_sat"] and cap["payer_dust_sat"] == 294
    for p in [*v["payments"], v["full_drain"]]:
        sig = bytes.fromhex(p["signature"])
        assert sig[-1] == p["sighash_type"] == (0x83 if p["amount_sat"] < params["deposit_sat"] else 0x82)
        tx = CTransaction.deserialize(bytes.fromhex(p["close_tx"]["hex"]))
        assert tx.GetTxid()[::-1].hex() == p["close_tx"]["txid"]
        assert tx.vin[0].prevout.hash[::-1].hex() == params["funding_txid"] and tx.vin[0].prevout.n == 1
        assert tx.vin[0].nSequence == 0xFFFFFFFD and tx.nLockTime == 0 and tx.nVersion == 2
        witness = [bytes(x) for x in tx.wit.vtxinwit[0].scriptWitness.stack]
        assert witness[0] == sig and witness[2] == b"\x01" and witness[3] == ws
        # the payer's digest from the close itself; its signature re-made by the stated rule
        assert _bip143(tx, ws, params["deposit_sat"], p["sighash_type"]) == p["digest"]
        assert _rfc6979_sign(payer_key, bytes.fromhex(p["digest"])) + bytes([p["sighash_type"]]) == sig
        payee_sig = witness[1]
        assert payee_sig[-1] == 0x01 and len(payee_sig) == 71
        assert _low_r_sign(payee_key, bytes.fromhex(_bip143(tx, ws, params["deposit_sat"], 1))) == payee_sig[:-1]
        outs = [(o.nValue, bytes(o.scriptPubKey).hex()) for o in tx.vout]
        change = params["deposit_sat"] - p["amount_sat"]
        fee = params["deposit_sat"] - sum(value for value, _ in outs)
        expected = [(change, params["payer_script"])] if change else []
        # the payee's output is last: index 1 after the payer's change, index 0 for a full drain
        assert outs == [*expected, (p["amount_sat"] - fee, p["close_tx"]["payee_script"])]
        assert fee == math.ceil(p["close_tx"]["fee_rate_sat_vb"] * p["close_tx"]["vsize"])
        assert p["amount_sat"] - fee >= cap["payee_dust_sat"]
        decoded = bitcoind.rpc("decoderawtransaction", p["close_tx"]["hex"])
        assert decoded["txid"] == p["close_tx"]["txid"] and decoded["vsize"] == p["close_tx"]["vsize"]
    rf = v["refund"]
    tx = CTransaction.deserialize(bytes.fromhex(rf["hex"]))
    assert (
        tx.vin[0].nSequence == rf["sequence"] == 0xFFFFFFFD
        and tx.nLockTime == rf["locktime"] == params["expiry_height"]
    )
    witness = [bytes(x) for x in tx.wit.vtxinwit[0].scriptWitness.stack]
    assert witness[1:] == [b"", ws] and witness[0][-1] == 0x01
    assert _low_r_sign(payer_key, bytes.fromhex(_bip143(tx, ws, params["deposit_sat"], 1))) == witness[0][:-1]
    assert [(o.nValue, bytes(o.scriptPubKey).hex()) for o in tx.vout] == [
        (params["deposit_sat"] - math.ceil(rf["fee_rate_sat_vb"] * rf["vsize"]), rf["dest_script"])
    ]
    decoded = bitcoind.rpc("decoderawtransaction", rf["hex"])
    assert decoded["txid"] == rf["txid"] and decoded["vsize"] == rf["vsize"]
    cr = v["close_request"]
    assert cr["digest"] == hashlib.sha256(b"btcchannel/v1/close" + bytes.fromhex(cr["channel_id"])).hexdigest()
    assert _rfc6979_sign(payer_key, bytes.fromhex(cr["digest"])).hex() == cr["signature"]
    ra = v["request_auth"]
    counter, sig = parse_auth_header(ra["header"])
    assert counter == ra["counter"]
    digest = hashlib.sha256(
        b"btcchannel/v1/request"
        + bytes.fromhex(ra["channel_id"])
        + counter.to_bytes(8, "big")
        + ra["method"].encode()
        + b" "
        + ra["target"].encode()
    ).hexdigest()
    assert digest == ra["digest"] and _rfc6979_sign(payer_key, bytes.fromhex(digest)) == sig
    a2 = v["request_auth_v2"]
    body = bytes.fromhex(a2["body_hex"])
    assert a2["body_sha256"] == hashlib.sha256(body).hexdigest()
    digest2 = hashlib.sha256(
        b"btcchannel/v2/request"
        + bytes.fromhex(a2["channel_id"])
        + a2["counter"].to_bytes(8, "big")
        + _f(a2["method"])
        + _f(a2["authority"])
        + _f(a2["target"])
        + hashlib.sha256(body).digest()
        + _f(a2["amount_header"])
        + _f(a2["signature_header"])
    ).hexdigest()
    assert digest2 == a2["digest"]
    assert a2["header"] == f"v2.{a2['counter']}.{_rfc6979_sign(payer_key, bytes.fromhex(digest2)).hex()}"
