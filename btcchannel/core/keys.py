"""Keys, signing and verification (secp256k1 through libsecp256k1/coincurve).

Everything here is pure: no I/O, no global state. Signatures are ECDSA over a
32-byte digest, strict DER (the BIP66 encoding rules) and low-S only (BIP146's
``LOW_S``), i.e. exactly what the Bitcoin network relays. The sighash byte is
not part of what these functions handle; :mod:`btcchannel.core.tx` adds and checks
it.
"""

from __future__ import annotations

import hashlib
import os

from coincurve import PublicKey
from coincurve._libsecp256k1 import ffi, lib
from coincurve.context import GLOBAL_CONTEXT

from btcchannel.errors import BadPubkey, BadRequest

__all__ = [
    "CURVE_ORDER",
    "HALF_ORDER",
    "generate_private_key",
    "check_private_key",
    "public_key",
    "check_public_key",
    "sign_digest",
    "sign_digest_fixed_length",
    "verify_digest",
    "is_strict_der",
    "is_low_s",
    "is_valid_signature_encoding",
    "close_request_digest",
    "CLOSE_REQUEST_TAG",
    "REQUEST_TAG",
    "REQUEST_TAG_V2",
    "request_digest",
    "request_digest_v2",
    "Verifier",
]

CURVE_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
HALF_ORDER = CURVE_ORDER // 2
CLOSE_REQUEST_TAG = b"btcchannel/v1/close"
#: the domain tag of a metered request's authentication (see :func:`request_digest`)
REQUEST_TAG = b"btcchannel/v1/request"
#: the domain tag of auth v2 (see :func:`request_digest_v2`)
REQUEST_TAG_V2 = b"btcchannel/v2/request"

_CTX = GLOBAL_CONTEXT.ctx


def generate_private_key() -> bytes:
    """A fresh random private key: 32 bytes, a valid scalar in ``[1, n-1]``."""
    while True:
        secret = os.urandom(32)
        value = int.from_bytes(secret, "big")
        if 0 < value < CURVE_ORDER:
            return secret


def check_private_key(privkey: bytes) -> bytes:
    """Return ``privkey`` if it is 32 bytes encoding a scalar in ``[1, n-1]``; else BadRequest."""
    if not isinstance(privkey, bytes) or len(privkey) != 32:
        raise BadRequest("private key must be 32 bytes")
    if not 0 < int.from_bytes(privkey, "big") < CURVE_ORDER:
        raise BadRequest("private key out of range")
    return privkey


def public_key(privkey: bytes) -> bytes:
    """The 33-byte compressed public key of ``privkey``."""
    check_private_key(privkey)
    return bytes(PublicKey.from_valid_secret(privkey).format(compressed=True))


def check_public_key(data: bytes) -> bytes:
    """Return ``data`` if it is a valid compressed secp256k1 point, else raise BadPubkey."""
    if not isinstance(data, bytes) or len(data) != 33 or data[0] not in (2, 3):
        raise BadPubkey("public key must be 33 bytes, compressed (02/03 prefix)")
    try:
        PublicKey(data)
    except ValueError:
        raise BadPubkey("public key is not a point on secp256k1") from None
    return data


def _sign(privkey: bytes, digest: bytes, counter: int) -> bytes:
    """One RFC6979 ECDSA signature (extra entropy = ``counter`` LE when non-zero), DER."""
    sig = ffi.new("secp256k1_ecdsa_signature *")
    extra = ffi.NULL if counter == 0 else ffi.new("unsigned char[32]", counter.to_bytes(32, "little"))
    if not lib.secp256k1_ecdsa_sign(_CTX, sig, digest, privkey, lib.secp256k1_nonce_function_rfc6979, extra):
        raise BadRequest("signing failed")  # pragma: no cover - the key was checked by the caller
    out = ffi.new("unsigned char[72]")
    out_len = ffi.new("size_t *", 72)
    lib.secp256k1_ecdsa_signature_serialize_der(_CTX, out, out_len, sig)
    return bytes(ffi.buffer(out, out_len[0]))


def sign_digest(privkey: bytes, digest: bytes) -> bytes:
    """ECDSA-sign a 32-byte digest (RFC6979 nonce): strict DER, low-S, no sighash byte."""
    if len(digest) != 32:
        raise BadRequest("digest must be 32 bytes")
    return _sign(check_private_key(privkey), digest, 0)


def sign_digest_fixed_length(privkey: bytes, digest: bytes) -> bytes:
    """Like :func:`sign_digest` but ground to a DER length of exactly 70 bytes.

    The RFC6979 nonce is re-derived with an extra-entropy counter (as Bitcoin
    Core does for low-R grinding) until both r and s are 32 bytes without
    padding; about two tries on average. A transaction's size is then known
    before it is signed, which makes fee arithmetic exact.
    """
    if len(digest) != 32:
        raise BadRequest("digest must be 32 bytes")
    check_private_key(privkey)
    counter = 0
    while True:
        der = _sign(privkey, digest, counter)
        if len(der) == 70:
            return der
        counter += 1


def is_valid_signature_encoding(sig: bytes) -> bool:
    """BIP66 ``IsValidSignatureEncoding``: ``sig`` is DER *plus* the sighash byte."""
    n = len(sig)
    if n < 9 or n > 73:
        return False
    if sig[0] != 0x30 or sig[1] != n - 3:
        return False
    len_r = sig[3]
    if 5 + len_r >= n:
        return False
    len_s = sig[5 + len_r]
    if len_r + len_s + 7 != n:
        return False
    if sig[2] != 0x02 or len_r == 0 or sig[4] & 0x80:
        return False
    if len_r > 1 and sig[4] == 0 and not sig[5] & 0x80:
        return False
    if sig[len_r + 4] != 0x02 or len_s == 0 or sig[len_r + 6] & 0x80:
        return False
    if len_s > 1 and sig[len_r + 6] == 0 and not sig[len_r + 7] & 0x80:
        return False
    return True


def is_strict_der(der: bytes) -> bool:
    """BIP66 strict DER for a bare signature (no sighash byte)."""
    return is_valid_signature_encoding(der + b"\x01")


def is_low_s(der: bytes) -> bool:
    """True if the (already strict-DER) signature's s is at most n/2."""
    len_r = der[3]
    s = int.from_bytes(der[6 + len_r :], "big")
    return 0 < s <= HALF_ORDER


def verify_digest(pubkey: bytes, der: bytes, digest: bytes) -> bool:
    """Verify a bare DER signature over a 32-byte digest: strict DER (BIP66) and low-S only.

    Returns False for any malformed or wrong signature; raises BadPubkey only if
    ``pubkey`` itself is not a valid compressed key.
    """
    check_public_key(pubkey)
    return Verifier(pubkey).verify(der, digest)


class Verifier:
    """A parsed public key ready for repeated verification (the payee's hot path)."""

    __slots__ = ("_pub", "pubkey")

    def __init__(self, pubkey: bytes) -> None:
        check_public_key(pubkey)
        self.pubkey = pubkey
        self._pub = PublicKey(pubkey).public_key

    def verify(self, der: bytes, digest: bytes) -> bool:
        """Strict-DER, low-S ECDSA verification of ``der`` over ``digest`` (32 bytes)."""
        if len(digest) != 32 or not is_valid_signature_encoding(der + b"\x01"):
            return False
        len_r = der[3]
        if int.from_bytes(der[6 + len_r :], "big") > HALF_ORDER:
            return False
        return self.verify_prechecked(der, digest)

    def verify_prechecked(self, der: bytes, digest: bytes) -> bool:
        """ECDSA check only: the caller has already checked strict DER, low S and a 32-byte digest."""
        sig = ffi.new("secp256k1_ecdsa_signature *")
        if not lib.secp256k1_ecdsa_signature_parse_der(_CTX, sig, der, len(der)):
            return False
        return bool(lib.secp256k1_ecdsa_verify(_CTX, sig, digest, self._pub))


def close_request_digest(channel_id: str) -> bytes:
    """SHA256(b"btcchannel/v1/close" + bytes.fromhex(channel_id)); BadRequest on a non-hex id."""
    try:
        raw = bytes.fromhex(channel_id)
    except (ValueError, TypeError):
        raise BadRequest("channel_id must be hex") from None
    return hashlib.sha256(CLOSE_REQUEST_TAG + raw).digest()


def request_digest(channel_id: str, counter: int, method: str, target: str) -> bytes:
    """The digest a payer signs to authenticate one metered request:
    ``SHA256(b"btcchannel/v1/request" || channel_id (16 bytes) || counter (8 bytes, big endian)
    || METHOD (ASCII, upper case) || b" " || target (the request target: path and query, UTF-8))``."""
    try:
        raw = bytes.fromhex(channel_id)
    except (ValueError, TypeError):
        raise BadRequest("channel_id must be hex") from None
    if not 0 <= counter < 2**63:
        raise BadRequest("request counter out of range")
    return hashlib.sha256(
        REQUEST_TAG + raw + counter.to_bytes(8, "big") + _utf8(method.upper()) + b" " + _utf8(target)
    ).digest()


def _utf8(text: str) -> bytes:
    """``text`` as UTF-8 (header bytes an HTTP library decoded with ``surrogateescape`` come back as sent)."""
    return text.encode("utf-8", "surrogateescape")


def _field(value: bytes) -> bytes:
    """One variable-length field of :func:`request_digest_v2`: 2-byte big-endian length, then the bytes."""
    if len(value) > 0xFFFF:
        raise BadRequest("request field over 65,535 bytes")
    return len(value).to_bytes(2, "big") + value


def request_digest_v2(
    channel_id: str,
    counter: int,
    method: str,
    authority: str,
    target: str,
    body_sha256: bytes,
    amount: str = "",
    signature: str = "",
) -> bytes:
    """The digest a payer signs to authenticate one metered request (auth v2)::

        SHA256(b"btcchannel/v2/request" || channel_id (16 bytes) || counter (8 bytes, big endian)
               || F(METHOD) || F(authority) || F(target) || SHA256(body) (32 bytes)
               || F(X-Btcchannel-Amount) || F(X-Btcchannel-Signature))

    where ``F(x)`` is the length of ``x`` in bytes (2 bytes, big endian) followed by ``x`` (UTF-8);
    ``METHOD`` upper case; ``authority`` the ``Host`` header as sent, lower case; ``target`` the raw
    request target (path and query exactly as sent, percent-encoding untouched); the payment headers'
    values exactly as sent, empty when the request carries none."""
    try:
        raw = bytes.fromhex(channel_id)
    except (ValueError, TypeError):
        raise BadRequest("channel_id must be hex") from None
    if len(raw) != 16:
        raise BadRequest("channel_id must be 16 bytes")
    if not 0 <= counter < 2**63:
        raise BadRequest("request counter out of range")
    if len(body_sha256) != 32:
        raise BadRequest("body digest must be 32 bytes")
    return hashlib.sha256(
        REQUEST_TAG_V2
        + raw
        + counter.to_bytes(8, "big")
        + _field(_utf8(method.upper()))
        + _field(_utf8(authority.lower()))
        + _field(_utf8(target))
        + body_sha256
        + _field(_utf8(amount))
        + _field(_utf8(signature))
    ).digest()
