"""Unit and property tests of btcchannel.core.script: channel script, bech32/bech32m, base58, dust."""

from __future__ import annotations

import hashlib

import pytest
from bitcoin import segwit_addr
from bitcoin.base58 import CBase58Data
from bitcoin.core.script import (
    OP_CHECKLOCKTIMEVERIFY,
    OP_CHECKSIG,
    OP_CHECKSIGVERIFY,
    OP_DROP,
    OP_ELSE,
    OP_ENDIF,
    OP_IF,
    CScript,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from btcchannel.core.address import (
    BECH32_CONST,
    BECH32M_CONST,
    base58check_decode,
    base58check_encode,
    bech32_decode,
    bech32_encode,
    decode_segwit_address,
    encode_segwit_address,
)
from btcchannel.core.keys import public_key
from btcchannel.core.script import (
    NETWORKS,
    address_to_script,
    check_payout_script,
    dust_limit,
    funding_witness_script,
    p2pkh_script,
    p2sh_script,
    p2wpkh_script,
    p2wsh_script,
    parse_funding_witness_script,
    script_num,
    script_to_address,
    script_type,
)
from btcchannel.errors import BadRequest, BadScript, ExpiryOutOfRange

PAYER = public_key(b"\x01" * 32)
PAYEE = public_key(b"\x02" * 32)

VALID_BECH32 = [
    "A12UEL5L",
    "a12uel5l",
    "an83characterlonghumanreadablepartthatcontainsthenumber1andtheexcludedcharactersbio1tt5tgs",
    "abcdef1qpzry9x8gf2tvdw0s3jn54khce6mua7lmqqqxw",
    "split1checkupstagehandshakeupstreamerranterredcaperred2y9e3w",
    "?1ezyfcl",
]
VALID_BECH32M = [
    "A1LQFN3A",
    "a1lqfn3a",
    "an83characterlonghumanreadablepartthatcontainsthetheexcludedcharactersbioandnumber11sg7hg6",
    "abcdef1l7aum6echk45nj3s0wdvt2fg8x9yrzpqzd3ryx",
    "11llllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllludsr8",
    "split1checkupstagehandshakeupstreamerranterredcaperredlc445v",
    "?1v759aa",
]
INVALID_BECH32 = [
    "\x201nwldj5",
    "\x7f1axkwrx",
    "an84characterslonghumanreadablepartthatcontainsthenumber1andtheexcludedcharactersbio1569pvx",
    "pzry9x0s0muk",
    "1pzry9x0s0muk",
    "x1b4n0q5v",
    "li1dgmt3",
    "A1G7SGD8",
    "10a06t8",
    "1qzzfhee",
    "qyrz8wqd2c9m",
    "y1b0jsk6g",
    "lt1igcx5c0",
    "in1muywd",
    "mm1crxm3i",
    "au1s5cgom",
    "16plkw9",
    "1p2gdwpf",
]
SEGWIT_VECTORS = [
    ("mainnet", "BC1QW508D6QEJXTDG4Y5R3ZARVARY0C5XW7KV8F3T4", "0014751e76e8199196d454941c45d1b3a323f1433bd6"),
    (
        "testnet",
        "tb1qrp33g0q5c5txsp9arysrx4k6zdkfs4nce4xj0gdcccefvpysxf3q0sl5k7",
        "00201863143c14c5166804bd19203356da136c985678cd4d27a1b8c6329604903262",
    ),
    (
        "mainnet",
        "bc1p0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vqzk5jj0",
        "512079be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798",
    ),
    (
        "testnet",
        "tb1pqqqqp399et2xygdj5xreqhjjvcmzhxw4aywxecjdzew6hylgvsesf3hn0c",
        "5120000000c4a5cad46221b2a187905e5266362b99d5e91c6ce24d165dab93e86433",
    ),
]


def test_funding_script_matches_cscript() -> None:
    for expiry in (1, 16, 17, 127, 128, 255, 256, 32767, 32768, 8388608, 499_999_999, 850_000):
        expected = CScript(
            [
                OP_IF,
                PAYEE,
                OP_CHECKSIGVERIFY,
                OP_ELSE,
                expiry,
                OP_CHECKLOCKTIMEVERIFY,
                OP_DROP,
                OP_ENDIF,
                PAYER,
                OP_CHECKSIG,
            ]
        )
        ws = funding_witness_script(PAYER, PAYEE, expiry)
        assert ws == bytes(expected)
        assert parse_funding_witness_script(ws) == (PAYER, PAYEE, expiry)
        assert p2wsh_script(ws) == b"\x00\x20" + hashlib.sha256(ws).digest()


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=-(2**39), max_value=2**39))
def test_script_num_matches_cscript(n: int) -> None:
    assert script_num(n) == bytes(CScript([n]))


@pytest.mark.parametrize("expiry", [0, -1, 500_000_000, True])
def test_bad_expiry(expiry: int) -> None:
    with pytest.raises(ExpiryOutOfRange):
        funding_witness_script(PAYER, PAYEE, expiry)


def test_parse_rejects_foreign_scripts() -> None:
    ws = funding_witness_script(PAYER, PAYEE, 1000)
    for bad in (b"", ws[:-1], ws + b"\x00", b"\x00" + ws[1:], p2wsh_script(ws)):
        with pytest.raises(BadScript):
            parse_funding_witness_script(bad)


@pytest.mark.parametrize("text", VALID_BECH32)
def test_bech32_valid(text: str) -> None:
    hrp, data, const = bech32_decode(text)
    assert const == BECH32_CONST
    assert bech32_encode(hrp, data, const) == text.lower()


@pytest.mark.parametrize("text", VALID_BECH32M)
def test_bech32m_valid(text: str) -> None:
    hrp, data, const = bech32_decode(text)
    assert const == BECH32M_CONST
    assert bech32_encode(hrp, data, const) == text.lower()


@pytest.mark.parametrize("text", INVALID_BECH32)
def test_bech32_invalid(text: str) -> None:
    with pytest.raises(BadScript):
        hrp, _, _ = bech32_decode(text)
        if not hrp:  # an empty hrp is invalid too
            raise BadScript("empty hrp")


@pytest.mark.parametrize("network,address,script_hex", SEGWIT_VECTORS)
def test_segwit_vectors(network: str, address: str, script_hex: str) -> None:
    script = bytes.fromhex(script_hex)
    assert address_to_script(address, network) == script
    assert script_to_address(script, network) == address.lower()


def test_segwit_checksum_variant_enforced() -> None:
    program = bytes(range(32))
    # v1 with the bech32 constant and v0 with bech32m are invalid (BIP350)
    from btcchannel.core.address import _convertbits  # noqa: PLC0415 - test of a private helper

    v1_bech32 = bech32_encode("bc", [1] + _convertbits(program, 8, 5, True), BECH32_CONST)
    v0_bech32m = bech32_encode("bc", [0] + _convertbits(program, 8, 5, True), BECH32M_CONST)
    for bad in (v1_bech32, v0_bech32m):
        with pytest.raises(BadScript):
            address_to_script(bad, "mainnet")
    good = encode_segwit_address("bc", 1, program)
    assert address_to_script(good, "mainnet") == b"\x51\x20" + program


def test_address_errors() -> None:
    addr = SEGWIT_VECTORS[0][1]
    with pytest.raises(BadScript):
        address_to_script(addr, "testnet")  # another network
    with pytest.raises(BadScript):
        address_to_script(addr, "regtest")
    with pytest.raises(BadScript):
        address_to_script(addr[:-1] + "5", "mainnet")  # checksum
    with pytest.raises(BadScript):
        address_to_script("bc1qW508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4", "mainnet")  # mixed case
    with pytest.raises(BadScript):
        address_to_script("", "mainnet")
    with pytest.raises(BadScript):
        address_to_script("1A1zP1eP5QGefi2DMPTfTL5SLmv7DivfNb", "mainnet")  # base58 checksum
    with pytest.raises(BadScript):
        address_to_script("1A1zP1eP5QGefi2DMPTfTL5SLmv7DivfNa", "regtest")
    with pytest.raises(BadScript):
        address_to_script("0OIl", "mainnet")
    with pytest.raises(BadRequest):
        address_to_script(addr, "litecoin")
    # v2 witness (valid address, but not a payout type we accept)
    with pytest.raises(BadScript):
        address_to_script(encode_segwit_address("bc", 2, b"\x00" * 16), "mainnet")


def test_base58_known_address() -> None:
    script = address_to_script("1A1zP1eP5QGefi2DMPTfTL5SLmv7DivfNa", "mainnet")
    assert script == p2pkh_script(bytes.fromhex("62e907b15cbf27d5425399ebf6f0fb50ebb88f18"))


@settings(max_examples=50, deadline=None)
@given(st.binary(min_size=20, max_size=20), st.binary(min_size=32, max_size=32), st.sampled_from(NETWORKS))
def test_address_roundtrips(h20: bytes, h32: bytes, network: str) -> None:
    versions = {"mainnet": (0, 5)}.get(network, (0x6F, 0xC4))
    for script, b58_version in ((p2pkh_script(h20), versions[0]), (p2sh_script(h20), versions[1])):
        addr = script_to_address(script, network)
        assert addr == str(CBase58Data.from_bytes(h20, b58_version))
        assert address_to_script(addr, network) == script
    for script in (b"\x00\x14" + h20, b"\x00\x20" + h32, b"\x51\x20" + h32):
        addr = script_to_address(script, network)
        assert addr.startswith({"mainnet": "bc1", "regtest": "bcrt1"}.get(network, "tb1"))
        assert address_to_script(addr, network) == script
        assert address_to_script(addr.upper(), network) == script


def test_dust_limits_and_payout_scripts() -> None:
    h20, h32 = b"\x11" * 20, b"\x22" * 32
    assert dust_limit(p2wpkh_script(PAYER)) == 294
    assert dust_limit(b"\x00\x20" + h32) == 330
    assert dust_limit(b"\x51\x20" + h32) == 330
    assert dust_limit(p2pkh_script(h20)) == 546
    assert dust_limit(p2sh_script(h20)) == 540
    for bad in (b"", b"\x6a\x04abcd", b"\x21" + PAYER + b"\xac", b"\x52\x20" + h32, b"\x00\x15" + h20 + b"\x00"):
        with pytest.raises(BadScript):
            dust_limit(bad)
        with pytest.raises(BadScript):
            check_payout_script(bad)
    assert check_payout_script(b"\x00\x20" + h32) == b"\x00\x20" + h32


# --- BIP173 / BIP350 segwit address vectors ------------------------------------------

#: BIP350's valid segwit addresses (which include BIP173's v0 ones): address -> scriptPubKey.
BIP350_VALID = [
    ("BC1QW508D6QEJXTDG4Y5R3ZARVARY0C5XW7KV8F3T4", "0014751e76e8199196d454941c45d1b3a323f1433bd6"),
    (
        "tb1qrp33g0q5c5txsp9arysrx4k6zdkfs4nce4xj0gdcccefvpysxf3q0sl5k7",
        "00201863143c14c5166804bd19203356da136c985678cd4d27a1b8c6329604903262",
    ),
    (
        "bc1pw508d6qejxtdg4y5r3zarvary0c5xw7kw508d6qejxtdg4y5r3zarvary0c5xw7kt5nd6y",
        "5128751e76e8199196d454941c45d1b3a323f1433bd6751e76e8199196d454941c45d1b3a323f1433bd6",
    ),
    ("BC1SW50QGDZ25J", "6002751e"),
    ("bc1zw508d6qejxtdg4y5r3zarvaryvaxxpcs", "5210751e76e8199196d454941c45d1b3a323"),
    (
        "tb1qqqqqp399et2xygdj5xreqhjjvcmzhxw4aywxecjdzew6hylgvsesrxh6hy",
        "0020000000c4a5cad46221b2a187905e5266362b99d5e91c6ce24d165dab93e86433",
    ),
    (
        "tb1pqqqqp399et2xygdj5xreqhjjvcmzhxw4aywxecjdzew6hylgvsesf3hn0c",
        "5120000000c4a5cad46221b2a187905e5266362b99d5e91c6ce24d165dab93e86433",
    ),
    (
        "bc1p0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vqzk5jj0",
        "512079be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798",
    ),
]

#: BIP350's invalid segwit addresses.
BIP350_INVALID = [
    "tc1p0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vq5zuyut",  # invalid hrp
    "bc1p0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vqh2y7hd",  # bech32 instead of bech32m
    "tb1z0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vqglt7rf",  # bech32 instead of bech32m
    "BC1S0XLXVLHEMJA6C4DQV22UAPCTQUPFHLXM9H8Z3K2E72Q4K9HCZ7VQ54WELL",  # bech32 instead of bech32m
    "bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kemeawh",  # bech32m instead of bech32
    "tb1q0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vq24jc47",  # bech32m instead of bech32
    "bc1p38j9r5y49hruaue7wxjce0updqjuyyx0kh56v8s25huc6995vvpql3jow4",  # invalid character in checksum
    "BC130XLXVLHEMJA6C4DQV22UAPCTQUPFHLXM9H8Z3K2E72Q4K9HCZ7VQ7ZWS8R",  # invalid witness version
    "bc1pw5dgrnzv",  # program of 1 byte
    "bc1p0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7v8n0nx0muaewav253zgeav",  # program of 41 bytes
    "BC1QR508D6QEJXTDG4Y5R3ZARVARYV98GJ9P",  # invalid program length for witness v0
    "tb1p0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vq47Zagq",  # mixed case
    "bc1p0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7v07qwwzcrf",  # zero padding of more than 4 bits
    "tb1p0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vpggkg4j",  # non-zero padding in 8-to-5
    "bc1gmk9yu",  # empty data section
]

#: BIP173's invalid segwit addresses.
BIP173_INVALID = [
    "tc1qw508d6qejxtdg4y5r3zarvary0c5xw7kg3g4ty",  # invalid hrp
    "bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t5",  # invalid checksum
    "BC13W508D6QEJXTDG4Y5R3ZARVARY0C5XW7KN40WF2",  # invalid witness version
    "bc1rw5uspcuh",  # invalid program length
    "bc10w508d6qejxtdg4y5r3zarvary0c5xw7kw508d6qejxtdg4y5r3zarvary0c5xw7kw5rljs90",  # invalid program length
    "BC1QR508D6QEJXTDG4Y5R3ZARVARYV98GJ9P",  # invalid program length for witness v0
    "tb1qrp33g0q5c5txsp9arysrx4k6zdkfs4nce4xj0gdcccefvpysxf3q0sL5k7",  # mixed case
    "bc1zw508d6qejxtdg4y5r3zarvaryvqyzf3du",  # zero padding of more than 4 bits
    "tb1qrp33g0q5c5txsp9arysrx4k6zdkfs4nce4xj0gdcccefvpysxf3pjxtptv",  # non-zero padding in 8-to-5
    "bc1gmk9yu",  # empty data section
]

#: BIP173's valid v1+ addresses carry a bech32 checksum: BIP350 makes them invalid.
BIP173_V1_PLUS = [
    "bc1pw508d6qejxtdg4y5r3zarvary0c5xw7kw508d6qejxtdg4y5r3zarvary0c5xw7k7grplx",
    "BC1SW50QA3JX3S",
    "bc1zw508d6qejxtdg4y5r3zarvaryvg6kdaj",
]


def _hrp_of(address: str) -> str:
    return address[: address.rfind("1")].lower()


@pytest.mark.parametrize("address,script_hex", BIP350_VALID)
def test_bip350_valid_addresses(address: str, script_hex: str) -> None:
    script = bytes.fromhex(script_hex)
    version = script[0] - 0x50 if script[0] else 0
    program = script[2:]
    assert script[1] == len(program)
    hrp = _hrp_of(address)
    assert decode_segwit_address(hrp, address) == (version, program)
    assert encode_segwit_address(hrp, version, program) == address.lower()
    if script_type(script) is not None:  # a payout type: the network-level functions agree
        network = "mainnet" if hrp == "bc" else "testnet"
        assert address_to_script(address, network) == script
        assert script_to_address(script, network) == address.lower()


@pytest.mark.parametrize("address", sorted(set(BIP350_INVALID + BIP173_INVALID)))
def test_bip173_and_bip350_invalid_addresses(address: str) -> None:
    for hrp in ("bc", "tb"):  # the networks' HRPs; "tc" is the vectors' unknown one
        with pytest.raises(BadScript):
            decode_segwit_address(hrp, address)
    for network in ("mainnet", "testnet"):
        with pytest.raises(BadScript):
            address_to_script(address, network)


@pytest.mark.parametrize("address", BIP173_V1_PLUS)
def test_bip173_v1_plus_addresses_need_bech32m(address: str) -> None:
    version, program = segwit_addr.decode("bc", address)  # valid under BIP173 alone
    assert version is not None and version >= 1
    with pytest.raises(BadScript):
        decode_segwit_address("bc", address)
    assert decode_segwit_address("bc", encode_segwit_address("bc", version, bytes(program))) == (
        version,
        bytes(program),
    )


def test_base58check_through_the_library() -> None:
    payload = bytes([0x00]) + bytes.fromhex("62e907b15cbf27d5425399ebf6f0fb50ebb88f18")
    assert base58check_encode(payload) == "1A1zP1eP5QGefi2DMPTfTL5SLmv7DivfNa"
    assert base58check_decode("1A1zP1eP5QGefi2DMPTfTL5SLmv7DivfNa") == payload
    for bad in ("1A1zP1eP5QGefi2DMPTfTL5SLmv7DivfNb", "1A1zP1eP5QGefi2DMPTfTL5SLmv7DivfN0", "", "1", "z"):
        with pytest.raises(BadScript):
            base58check_decode(bad)
    with pytest.raises(BadScript):
        base58check_encode(b"")


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=1, max_size=60))
def test_base58check_roundtrip(payload: bytes) -> None:
    assert base58check_decode(base58check_encode(payload)) == payload


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 16), st.binary(min_size=2, max_size=40), st.sampled_from(["bc", "tb", "bcrt"]))
def test_segwit_roundtrip_every_version(version: int, program: bytes, hrp: str) -> None:
    if version == 0 and len(program) not in (20, 32):
        with pytest.raises(BadScript):
            encode_segwit_address(hrp, version, program)
        return
    address = encode_segwit_address(hrp, version, program)
    assert decode_segwit_address(hrp, address) == (version, program)
    assert decode_segwit_address(hrp, address.upper()) == (version, program)
    _, _, const = bech32_decode(address)
    assert const == (BECH32_CONST if version == 0 else BECH32M_CONST)
    other = "tb" if hrp != "tb" else "bc"
    with pytest.raises(BadScript):
        decode_segwit_address(other, address)
