"""Scripts and addresses: the channel's funding script, output types, dust, script <-> address.

Pure functions, no global network state: every address function takes the
network name explicitly. The codecs (bech32, bech32m, base58check) are in
:mod:`btcchannel.core.address`.
"""

from __future__ import annotations

import hashlib
from typing import Final

from btcchannel.core.address import (
    base58check_decode,
    base58check_encode,
    decode_segwit_address,
    encode_segwit_address,
)
from btcchannel.core.keys import check_public_key
from btcchannel.errors import BadRequest, BadScript, ChannelError, ExpiryOutOfRange

__all__ = [
    "NETWORKS",
    "HRP",
    "LOCKTIME_THRESHOLD",
    "SCRIPT_LEGACY",
    "SCRIPT_DESCRIPTOR",
    "SCRIPT_VERSIONS",
    "check_script_version",
    "funding_witness_script",
    "parse_channel_script",
    "parse_funding_witness_script",
    "p2wsh_script",
    "p2wpkh_script",
    "p2pkh_script",
    "p2sh_script",
    "script_type",
    "script_to_address",
    "address_to_script",
    "dust_limit",
    "check_payout_script",
    "check_network",
    "script_num",
    "push_data",
]

NETWORKS: Final = ("mainnet", "testnet", "testnet4", "signet", "regtest")
HRP: Final = {"mainnet": "bc", "testnet": "tb", "testnet4": "tb", "signet": "tb", "regtest": "bcrt"}
_P2PKH_VERSION: Final = {"mainnet": 0x00, "testnet": 0x6F, "testnet4": 0x6F, "signet": 0x6F, "regtest": 0x6F}
_P2SH_VERSION: Final = {"mainnet": 0x05, "testnet": 0xC4, "testnet4": 0xC4, "signet": 0xC4, "regtest": 0xC4}

#: nLockTime values below this are block heights.
LOCKTIME_THRESHOLD: Final = 500_000_000

OP_0: Final = 0x00
OP_PUSHDATA1: Final = 0x4C
OP_PUSHDATA2: Final = 0x4D
OP_1NEGATE: Final = 0x4F
OP_1: Final = 0x51
OP_IF: Final = 0x63
OP_ELSE: Final = 0x67
OP_ENDIF: Final = 0x68
OP_VERIFY: Final = 0x69
OP_DROP: Final = 0x75
OP_DUP: Final = 0x76
OP_EQUAL: Final = 0x87
OP_EQUALVERIFY: Final = 0x88
OP_HASH160: Final = 0xA9
OP_CHECKSIG: Final = 0xAC
OP_CHECKSIGVERIFY: Final = 0xAD
OP_CHECKLOCKTIMEVERIFY: Final = 0xB1

#: The channel script of protocol version 1's first revision: ``... OP_CHECKLOCKTIMEVERIFY OP_DROP ...``.
SCRIPT_LEGACY: Final = 0
#: The descriptor form: ``... OP_CHECKLOCKTIMEVERIFY OP_VERIFY ...``, the miniscript
#: ``and_v(or_i(v:pk(PAYEE),v:after(EXPIRY)),pk(PAYER))``.
SCRIPT_DESCRIPTOR: Final = 1
#: Every script version this library builds, oldest first.
SCRIPT_VERSIONS: Final = (SCRIPT_LEGACY, SCRIPT_DESCRIPTOR)
_AFTER_CLTV: Final = {SCRIPT_LEGACY: OP_DROP, SCRIPT_DESCRIPTOR: OP_VERIFY}


def check_network(network: str) -> str:
    """Return ``network`` if it is one of :data:`NETWORKS`, else BadRequest."""
    if network not in HRP:
        raise BadRequest(f"unknown network {network!r}; expected one of {', '.join(NETWORKS)}")
    return network


# --- script building ------------------------------------------------------------


def push_data(data: bytes) -> bytes:
    """A minimal push of ``data`` (as ``CScript([data])`` encodes it, for data longer than 1 byte)."""
    n = len(data)
    if n < OP_PUSHDATA1:
        return bytes([n]) + data
    if n <= 0xFF:
        return bytes([OP_PUSHDATA1, n]) + data
    if n <= 0xFFFF:
        return bytes([OP_PUSHDATA2]) + n.to_bytes(2, "little") + data
    raise BadScript("push too large")


def script_num(value: int) -> bytes:
    """Minimal script encoding of an integer, as ``CScript([value])`` pushes it."""
    if value == 0:
        return bytes([OP_0])
    if value == -1 or 1 <= value <= 16:
        return bytes([OP_1NEGATE if value == -1 else OP_1 + value - 1])
    neg = value < 0
    mag = -value if neg else value
    out = bytearray()
    while mag:
        out.append(mag & 0xFF)
        mag >>= 8
    if out[-1] & 0x80:
        out.append(0x80 if neg else 0x00)
    elif neg:
        out[-1] |= 0x80
    return push_data(bytes(out))


def check_script_version(version: object) -> int:
    """Return ``version`` if it is one of :data:`SCRIPT_VERSIONS`, else BadRequest."""
    if isinstance(version, bool) or not isinstance(version, int) or version not in SCRIPT_VERSIONS:
        raise BadRequest(f"unknown script version {version!r}; expected one of {list(SCRIPT_VERSIONS)}")
    return version


def funding_witness_script(
    payer_pubkey: bytes, payee_pubkey: bytes, expiry_height: int, script_version: int = SCRIPT_LEGACY
) -> bytes:
    """The channel's witness script::

        OP_IF <payee_pubkey> OP_CHECKSIGVERIFY
        OP_ELSE <expiry_height> OP_CHECKLOCKTIMEVERIFY (OP_DROP | OP_VERIFY)
        OP_ENDIF <payer_pubkey> OP_CHECKSIG

    ``OP_DROP`` for :data:`SCRIPT_LEGACY`, ``OP_VERIFY`` for :data:`SCRIPT_DESCRIPTOR` (the
    miniscript ``and_v(or_i(v:pk(PAYEE),v:after(EXPIRY)),pk(PAYER))``; the expiry is never 0, so
    both leave the same stack and take the same witnesses). ``expiry_height`` must be a block
    height (1 .. 499999999), else ExpiryOutOfRange.
    """
    check_public_key(payer_pubkey)
    check_public_key(payee_pubkey)
    after_cltv = _AFTER_CLTV[check_script_version(script_version)]
    if isinstance(expiry_height, bool) or not isinstance(expiry_height, int):
        raise ExpiryOutOfRange("expiry height must be an integer")
    if not 0 < expiry_height < LOCKTIME_THRESHOLD:
        raise ExpiryOutOfRange(f"expiry height {expiry_height} is not a block height")
    return (
        bytes([OP_IF])
        + push_data(payee_pubkey)
        + bytes([OP_CHECKSIGVERIFY, OP_ELSE])
        + script_num(expiry_height)
        + bytes([OP_CHECKLOCKTIMEVERIFY, after_cltv, OP_ENDIF])
        + push_data(payer_pubkey)
        + bytes([OP_CHECKSIG])
    )


def parse_channel_script(script: bytes) -> tuple[bytes, bytes, int, int]:
    """Inverse of :func:`funding_witness_script`: ``(payer_pubkey, payee_pubkey, expiry_height, script_version)``.

    BadScript unless ``script`` is exactly a channel script (either version) as this library builds it.
    """
    try:
        if script[0] != OP_IF or script[1] != 33:
            raise BadScript("not a channel script")
        payee = script[2:35]
        if script[35:37] != bytes([OP_CHECKSIGVERIFY, OP_ELSE]):
            raise BadScript("not a channel script")
        first = script[37]
        if OP_1 <= first < OP_1 + 16:
            expiry, rest = first - OP_1 + 1, 38
        elif 1 <= first <= 5:
            expiry = int.from_bytes(script[38 : 38 + first], "little")
            rest = 38 + first
        else:
            raise BadScript("not a channel script")
        versions = [v for v, op in _AFTER_CLTV.items() if op == script[rest + 1]]
        payer = script[rest + 4 : rest + 37]
    except IndexError:
        raise BadScript("not a channel script") from None
    if not versions:
        raise BadScript("not a channel script")
    try:
        rebuilt = funding_witness_script(payer, payee, expiry, versions[0])
    except ChannelError as exc:
        raise BadScript("not a channel script") from exc
    if rebuilt != script:
        raise BadScript("not a channel script")
    return payer, payee, expiry, versions[0]


def parse_funding_witness_script(script: bytes) -> tuple[bytes, bytes, int]:
    """:func:`parse_channel_script` without the version: ``(payer_pubkey, payee_pubkey, expiry_height)``."""
    payer, payee, expiry, _version = parse_channel_script(script)
    return payer, payee, expiry


def _hash160(data: bytes) -> bytes:
    return hashlib.new("ripemd160", hashlib.sha256(data).digest()).digest()


def p2wsh_script(witness_script: bytes) -> bytes:
    """``OP_0 <sha256(witness_script)>``."""
    return b"\x00\x20" + hashlib.sha256(witness_script).digest()


def p2wpkh_script(pubkey: bytes) -> bytes:
    """``OP_0 <hash160(pubkey)>`` for a compressed public key."""
    return b"\x00\x14" + _hash160(check_public_key(pubkey))


def p2pkh_script(pubkey_hash: bytes) -> bytes:
    """``OP_DUP OP_HASH160 <20 bytes> OP_EQUALVERIFY OP_CHECKSIG``."""
    if len(pubkey_hash) != 20:
        raise BadScript("p2pkh needs a 20-byte hash")
    return bytes([OP_DUP, OP_HASH160, 20]) + pubkey_hash + bytes([OP_EQUALVERIFY, OP_CHECKSIG])


def p2sh_script(script_hash: bytes) -> bytes:
    """``OP_HASH160 <20 bytes> OP_EQUAL``."""
    if len(script_hash) != 20:
        raise BadScript("p2sh needs a 20-byte hash")
    return bytes([OP_HASH160, 20]) + script_hash + bytes([OP_EQUAL])


def script_type(script: bytes) -> str | None:
    """One of ``"p2pkh" "p2sh" "p2wpkh" "p2wsh" "p2tr"`` or None for anything else."""
    n = len(script)
    if n == 25 and script[:3] == b"\x76\xa9\x14" and script[23:] == b"\x88\xac":
        return "p2pkh"
    if n == 23 and script[:2] == b"\xa9\x14" and script[22] == OP_EQUAL:
        return "p2sh"
    if n == 22 and script[:2] == b"\x00\x14":
        return "p2wpkh"
    if n == 34 and script[:2] == b"\x00\x20":
        return "p2wsh"
    if n == 34 and script[:2] == b"\x51\x20":
        return "p2tr"
    return None


_DUST: Final = {"p2pkh": 546, "p2sh": 540, "p2wpkh": 294, "p2wsh": 330, "p2tr": 330}


def dust_limit(script: bytes) -> int:
    """Bitcoin Core's dust threshold at the default 3 sat/vB dust relay fee.

    P2WPKH 294, P2WSH/P2TR 330, P2PKH 546, P2SH 540; BadScript for anything else.
    """
    kind = script_type(script)
    if kind is None:
        raise BadScript("not a standard payout script (p2pkh, p2sh, p2wpkh, p2wsh, p2tr)")
    return _DUST[kind]


def check_payout_script(script: bytes) -> bytes:
    """Return ``script`` if it is p2pkh/p2sh/p2wpkh/p2wsh/p2tr, else BadScript."""
    if not isinstance(script, bytes) or script_type(script) is None:
        raise BadScript("not a standard payout script (p2pkh, p2sh, p2wpkh, p2wsh, p2tr)")
    return script


# --- script <-> address ----------------------------------------------------------


def script_to_address(script: bytes, network: str) -> str:
    """The address of a p2pkh/p2sh/p2wpkh/p2wsh/p2tr script on ``network``; BadScript otherwise."""
    check_network(network)
    kind = script_type(script)
    if kind == "p2pkh":
        return base58check_encode(bytes([_P2PKH_VERSION[network]]) + script[3:23])
    if kind == "p2sh":
        return base58check_encode(bytes([_P2SH_VERSION[network]]) + script[2:22])
    if kind in ("p2wpkh", "p2wsh"):
        return encode_segwit_address(HRP[network], 0, script[2:])
    if kind == "p2tr":
        return encode_segwit_address(HRP[network], 1, script[2:])
    raise BadScript("no address form for this script")


def address_to_script(address: str, network: str) -> bytes:
    """The output script of a p2pkh/p2sh/p2wpkh/p2wsh/p2tr ``address`` on ``network``.

    BadScript for anything else, including a valid address of another network.
    """
    check_network(network)
    if not isinstance(address, str) or not address:
        raise BadScript("empty address")
    hrp = HRP[network]
    lowered = address.lower()
    for known in sorted(set(HRP.values()), key=len, reverse=True):
        if lowered.startswith(known + "1"):
            version, program = decode_segwit_address(hrp, address)
            script = bytes([OP_1 + version - 1 if version else 0, len(program)]) + program
            return check_payout_script(script)
    payload = base58check_decode(address)
    if len(payload) != 21:
        raise BadScript("base58 address of the wrong length")
    if payload[0] == _P2PKH_VERSION[network]:
        return p2pkh_script(payload[1:])
    if payload[0] == _P2SH_VERSION[network]:
        return p2sh_script(payload[1:])
    raise BadScript(f"address is not for {network}")
