"""Test vectors for other implementations: ``docs/vectors.json``, computed here from fixed keys.

``python -m btcchannel.testing.vectors`` prints them (the tests check the file against this
function, byte for byte). Everything is derived from two fixed private keys and fixed channel
parameters: the witness script, funding script and address; the digest and signature of a partial
payment, of a second one and of a full drain; the signed close request and metered-request
authentication (v1 and v2); the fully signed close transaction of each payment, at a fixed fee rate
and payout script; the payer's signed refund; and under ``descriptor_channel`` the same for the
descriptor script (script version 1) with its descriptors and the payer's refund. The signing rules
are stated in the document's ``signing`` object (and in ``docs/PROTOCOL.md``): every signature is
RFC 6979 (deterministic), low-S; the payer's payments and requests without extra entropy, the payee's
close signatures and the payer's refund ground to 70 bytes of DER.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from btcchannel.core.channel import PayeeChannel, PayerChannel
from btcchannel.core.descriptor import funding_descriptor, wif
from btcchannel.core.keys import close_request_digest, public_key, request_digest, request_digest_v2
from btcchannel.core.params import ChannelParams
from btcchannel.core.script import SCRIPT_DESCRIPTOR, dust_limit
from btcchannel.core.state import ChannelState
from btcchannel.core.tx import REFUND_SEQUENCE, OutPoint, payment_sighash_type, tx_hex, tx_id, tx_vsize
from btcchannel.wire import HDR_AMOUNT, HDR_SIGNATURE, auth_header_v2, body_sha256

__all__ = ["vectors"]

NETWORK = "regtest"
PAYER_KEY = hashlib.sha256(b"btcchannel vectors payer").digest()
PAYEE_KEY = hashlib.sha256(b"btcchannel vectors payee").digest()
PAYER_SCRIPT = bytes.fromhex("0014" + hashlib.sha256(b"payer change").digest()[:20].hex())
PAYEE_SCRIPT = bytes.fromhex("0014" + hashlib.sha256(b"payee payout").digest()[:20].hex())
FUNDING = OutPoint(hashlib.sha256(b"funding").hexdigest(), 1)
DEPOSIT_SAT = 100_000
EXPIRY_HEIGHT = 800_000
CHANNEL_ID = hashlib.sha256(b"channel id").hexdigest()[:32]
PARTIAL_AMOUNTS = (1_000, 42_000)
FEE_RATE_SAT_VB = 2.0
REFUND_FEE_RATE_SAT_VB = 3.0

#: the signing rules the vectors follow (an implementation accepts any valid strict-DER low-S signature)
SIGNING = {
    "payer": "ECDSA, RFC 6979 nonce without extra entropy, low-S, strict DER",
    "payee_close": "ECDSA, RFC 6979 nonce with extra entropy i (32 bytes, i little-endian; none for i = 0), "
    "i = 0, 1, ... until the DER encoding is 70 bytes (low R, low S), strict DER, SIGHASH_ALL",
    "payer_refund": "as payee_close (70 bytes of DER, so that the refund's size and fee are known before it is "
    "signed), SIGHASH_ALL",
    "verification": "any strict-DER (BIP66), low-S (BIP146) signature that verifies is accepted",
}


def _close(params: ChannelParams, payer: PayerChannel, amount: int) -> dict[str, Any]:
    payment = payer.sign_payment(amount)
    payer.commit_payment(payment)
    payee = PayeeChannel.restore(params, PAYEE_KEY, ChannelState.OPEN)
    checked = payee.check_payment(payment.amount_sat, payment.signature)
    assert checked is not None  # a new best (nothing to store here: the vectors keep it)
    payee.commit_payment(checked)
    tx = payee.build_close(PAYEE_SCRIPT, FEE_RATE_SAT_VB)
    return {
        "amount_sat": amount,
        "sighash_type": payment_sighash_type(amount, DEPOSIT_SAT),
        "digest": params.sighash().digest(amount).hex(),
        "signature": payment.signature.hex(),
        "close_tx": {
            "payee_script": PAYEE_SCRIPT.hex(),
            "fee_rate_sat_vb": FEE_RATE_SAT_VB,
            "txid": tx_id(tx),
            "vsize": tx_vsize(tx),
            "hex": tx_hex(tx),
        },
    }


def _descriptor_channel() -> dict[str, Any]:
    """The same keys and parameters with the descriptor script (script version 1): the witness script,
    funding script and address, the descriptor (public, and with the payer's key as WIF), a partial
    payment with its close and the payer's refund at the expiry."""
    params = ChannelParams(
        network=NETWORK,
        payer_pubkey=public_key(PAYER_KEY),
        payee_pubkey=public_key(PAYEE_KEY),
        expiry_height=EXPIRY_HEIGHT,
        deposit_sat=DEPOSIT_SAT,
        payer_script=PAYER_SCRIPT,
        funding=FUNDING,
        script_version=SCRIPT_DESCRIPTOR,
    )
    payer = PayerChannel.restore(params, PAYER_KEY, ChannelState.OPEN)
    refund = PayerChannel.restore(params, PAYER_KEY, ChannelState.OPEN).build_refund(
        EXPIRY_HEIGHT, FEE_RATE_SAT_VB, PAYEE_SCRIPT
    )
    return {
        "script_version": SCRIPT_DESCRIPTOR,
        "witness_script": params.witness_script.hex(),
        "funding_script": params.funding_script.hex(),
        "funding_address": params.funding_address,
        "descriptor": funding_descriptor(params),
        "private_descriptor": funding_descriptor(params, payer_key=wif(PAYER_KEY, NETWORK)),
        "payment": _close(params, payer, PARTIAL_AMOUNTS[0]),
        "refund_tx": {
            "dest_script": PAYEE_SCRIPT.hex(),
            "fee_rate_sat_vb": FEE_RATE_SAT_VB,
            "txid": tx_id(refund),
            "vsize": tx_vsize(refund),
            "hex": tx_hex(refund),
        },
    }


def vectors() -> dict[str, Any]:
    """Every vector, as the JSON document ``docs/vectors.json`` holds."""
    params = ChannelParams(
        network=NETWORK,
        payer_pubkey=public_key(PAYER_KEY),
        payee_pubkey=public_key(PAYEE_KEY),
        expiry_height=EXPIRY_HEIGHT,
        deposit_sat=DEPOSIT_SAT,
        payer_script=PAYER_SCRIPT,
        funding=FUNDING,
    )
    payer = PayerChannel.restore(params, PAYER_KEY, ChannelState.OPEN)
    payments = [_close(params, payer, amount) for amount in PARTIAL_AMOUNTS]
    full = _close(params, PayerChannel.restore(params, PAYER_KEY, ChannelState.OPEN), DEPOSIT_SAT)
    counter, method, target = 1_700_000_000_000_000, "GET", "/v1/file/7"
    refund = PayerChannel.restore(params, PAYER_KEY, ChannelState.OPEN).build_refund(
        EXPIRY_HEIGHT, REFUND_FEE_RATE_SAT_VB
    )
    return {
        "description": "btcchannel protocol test vectors, revision 2 (docs/PROTOCOL.md); amounts in satoshis, "
        "hex lowercase, txids in display order. Regenerate: python -m btcchannel.testing.vectors",
        "revision": 2,
        "signing": SIGNING,
        "network": NETWORK,
        "keys": {
            "payer_privkey": PAYER_KEY.hex(),
            "payer_pubkey": params.payer_pubkey.hex(),
            "payee_privkey": PAYEE_KEY.hex(),
            "payee_pubkey": params.payee_pubkey.hex(),
        },
        "params": {
            "deposit_sat": DEPOSIT_SAT,
            "expiry_height": EXPIRY_HEIGHT,
            "payer_script": PAYER_SCRIPT.hex(),
            "funding_txid": FUNDING.txid,
            "funding_vout": FUNDING.vout,
        },
        "witness_script": params.witness_script.hex(),
        "funding_script": params.funding_script.hex(),
        "funding_address": params.funding_address,
        "payments": payments,
        "full_drain": full,
        "close_request": {
            "channel_id": CHANNEL_ID,
            "digest": close_request_digest(CHANNEL_ID).hex(),
            "signature": payer.close_request_signature(CHANNEL_ID).hex(),
        },
        "request_auth": {
            "channel_id": CHANNEL_ID,
            "counter": counter,
            "method": method,
            "target": target,
            "digest": request_digest(CHANNEL_ID, counter, method, target).hex(),
            "header": f"{counter}.{payer.request_signature(CHANNEL_ID, counter, method, target).hex()}",
        },
        "request_auth_v2": _auth_v2(payer.privkey, counter + 1),
        "capacity": {
            "payer_dust_sat": dust_limit(PAYER_SCRIPT),
            "payee_dust_sat": dust_limit(PAYEE_SCRIPT),
            "max_partial_sat": params.capacity.max_partial_sat,
        },
        "refund": {
            "fee_rate_sat_vb": REFUND_FEE_RATE_SAT_VB,
            "dest_script": PAYER_SCRIPT.hex(),
            "locktime": EXPIRY_HEIGHT,
            "sequence": REFUND_SEQUENCE,
            "txid": tx_id(refund),
            "vsize": tx_vsize(refund),
            "hex": tx_hex(refund),
        },
        "descriptor_channel": _descriptor_channel(),
    }


def _auth_v2(channel_key: bytes, counter: int) -> dict[str, Any]:
    """A paid POST with a body and a payment, authenticated by auth v2."""
    method, authority, target, body = "POST", "api.example:8443", "/v1/echo?q=a%20b", b'{"q": 1}'
    payment = {HDR_AMOUNT: "1100", HDR_SIGNATURE: "3044" + "00" * 68 + "83"}
    digest = request_digest_v2(
        CHANNEL_ID, counter, method, authority, target, body_sha256(body), payment[HDR_AMOUNT], payment[HDR_SIGNATURE]
    )
    return {
        "channel_id": CHANNEL_ID,
        "counter": counter,
        "method": method,
        "authority": authority,
        "target": target,
        "body_hex": body.hex(),
        "body_sha256": body_sha256(body).hex(),
        "amount_header": payment[HDR_AMOUNT],
        "signature_header": payment[HDR_SIGNATURE],
        "digest": digest.hex(),
        "header": auth_header_v2(channel_key, CHANNEL_ID, counter, method, authority, target, body, payment),
    }


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(vectors(), indent=2))
