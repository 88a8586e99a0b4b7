"""Unit and property tests of btcchannel.core.keys (pure, no node)."""

from __future__ import annotations

import hashlib

import pytest
from coincurve import PrivateKey, PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from btcchannel.core.keys import (
    CURVE_ORDER,
    HALF_ORDER,
    Verifier,
    check_public_key,
    close_request_digest,
    generate_private_key,
    is_low_s,
    is_strict_der,
    is_valid_signature_encoding,
    public_key,
    sign_digest,
    sign_digest_fixed_length,
    verify_digest,
)
from btcchannel.errors import BadPubkey, BadRequest

KEY = bytes.fromhex("11" * 32)
DIGEST = hashlib.sha256(b"btcchannel").digest()


def _der(r: int, s: int) -> bytes:
    def enc(v: int) -> bytes:
        b = v.to_bytes((v.bit_length() + 7) // 8 or 1, "big")
        if b[0] & 0x80:
            b = b"\x00" + b
        return b"\x02" + bytes([len(b)]) + b

    body = enc(r) + enc(s)
    return b"\x30" + bytes([len(body)]) + body


def _rs(der: bytes) -> tuple[int, int]:
    len_r = der[3]
    return int.from_bytes(der[4 : 4 + len_r], "big"), int.from_bytes(der[6 + len_r :], "big")


def test_generate_and_public_key() -> None:
    k = generate_private_key()
    assert len(k) == 32 and 0 < int.from_bytes(k, "big") < CURVE_ORDER
    pub = public_key(k)
    assert pub == PrivateKey(k).public_key.format(compressed=True)
    assert check_public_key(pub) == pub


@pytest.mark.parametrize("bad", [b"", b"\x00" * 32, CURVE_ORDER.to_bytes(32, "big"), b"\x01" * 31])
def test_bad_private_keys(bad: bytes) -> None:
    with pytest.raises(BadRequest):
        public_key(bad)
    with pytest.raises(BadRequest):
        sign_digest(bad, DIGEST)


def test_check_public_key_rejects() -> None:
    pub = public_key(KEY)
    uncompressed = PublicKey(pub).format(compressed=False)
    with pytest.raises(BadPubkey):
        check_public_key(uncompressed)
    with pytest.raises(BadPubkey):
        check_public_key(b"\x04" + pub[1:])
    with pytest.raises(BadPubkey):
        check_public_key(pub[:-1])
    # an x with no point on the curve
    for x in range(1, 100):
        candidate = b"\x02" + x.to_bytes(32, "big")
        try:
            PublicKey(candidate)
        except ValueError:
            with pytest.raises(BadPubkey):
                check_public_key(candidate)
            break
    else:  # pragma: no cover
        pytest.fail("no off-curve x found")


def test_sign_verify_roundtrip() -> None:
    pub = public_key(KEY)
    der = sign_digest(KEY, DIGEST)
    assert is_strict_der(der) and is_low_s(der)
    assert verify_digest(pub, der, DIGEST)
    assert not verify_digest(pub, der, hashlib.sha256(b"other").digest())
    assert not verify_digest(public_key(generate_private_key()), der, DIGEST)
    # deterministic (RFC6979), same as coincurve's own signer
    assert der == PrivateKey(KEY).sign(DIGEST, hasher=None)


def test_high_s_rejected() -> None:
    pub = public_key(KEY)
    der = sign_digest(KEY, DIGEST)
    r, s = _rs(der)
    assert s <= HALF_ORDER
    high = _der(r, CURVE_ORDER - s)
    assert is_strict_der(high) and not is_low_s(high)
    assert not verify_digest(pub, high, DIGEST)
    assert not Verifier(pub).verify(high, DIGEST)


def test_non_strict_der_rejected() -> None:
    pub = public_key(KEY)
    der = sign_digest(KEY, DIGEST)
    r, s = _rs(der)
    rb = r.to_bytes(32, "big")
    sb = s.to_bytes(32, "big")
    padded_r = b"\x02" + bytes([len(rb) + 1]) + b"\x00" + rb
    body = padded_r + b"\x02" + bytes([len(sb)]) + sb
    if not rb[0] & 0x80:  # superfluous zero padding is not strict DER
        bad = b"\x30" + bytes([len(body)]) + body
        assert not is_strict_der(bad)
        assert not verify_digest(pub, bad, DIGEST)
    variants = [
        der + b"\x00",  # trailing garbage
        b"\x31" + der[1:],  # wrong sequence tag
        der[:1] + bytes([der[1] + 1]) + der[2:],  # wrong total length
        der[:2] + b"\x03" + der[3:],  # wrong integer tag
        der[:-1],  # truncated
        b"",
    ]
    for bad in variants:
        assert not is_strict_der(bad)
        assert not verify_digest(pub, bad, DIGEST)


def test_bip66_encoding_examples() -> None:
    good = _der(1, 1) + b"\x01"
    assert is_valid_signature_encoding(good)
    assert not is_valid_signature_encoding(_der(1, 1))  # no hashtype: s length wrong
    neg_r = b"\x30\x06\x02\x01\x80\x02\x01\x01\x01"
    assert not is_valid_signature_encoding(neg_r)
    zero_len_r = b"\x30\x05\x02\x00\x02\x01\x01\x01"
    assert not is_valid_signature_encoding(zero_len_r)
    assert not is_valid_signature_encoding(b"\x30" * 74)


@settings(max_examples=40, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32))
def test_fixed_length_signatures(seed: bytes, digest: bytes) -> None:
    k = hashlib.sha256(seed).digest()
    der = sign_digest_fixed_length(k, digest)
    assert len(der) == 70 and is_strict_der(der) and is_low_s(der)
    assert verify_digest(public_key(k), der, digest)


@settings(max_examples=40, deadline=None)
@given(st.binary(min_size=32, max_size=32))
def test_verifier_matches_coincurve(digest: bytes) -> None:
    pub = public_key(KEY)
    der = sign_digest(KEY, digest)
    assert Verifier(pub).verify(der, digest) == PublicKey(pub).verify(der, digest, hasher=None) is True


def test_close_request_digest() -> None:
    cid = "00112233445566778899aabbccddeeff"
    assert close_request_digest(cid) == hashlib.sha256(b"btcchannel/v1/close" + bytes.fromhex(cid)).digest()
    with pytest.raises(BadRequest):
        close_request_digest("zz")
