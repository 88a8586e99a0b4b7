"""Address codecs: bech32 and segwit v0 (BIP173), bech32m for witness v1+ (BIP350), base58check.

Every function takes the human-readable part or the version byte explicitly;
python-bitcoinlib's global chain parameters are never read or selected.
Bech32 and segwit v0 addresses go through ``bitcoin.segwit_addr`` (its
``encode``/``decode`` take the HRP), base58check through
``bitcoin.base58.CBase58Data``. The library predates BIP350, so the bech32m
checksum (witness v1+, e.g. P2TR) is the one codec written here; it reuses the
library's checksum polynomial. Errors are BadScript.
"""

from __future__ import annotations

from typing import Final

from bitcoin import segwit_addr
from bitcoin.base58 import Base58ChecksumError, Base58Error, CBase58Data

from btcchannel.errors import BadScript

__all__ = [
    "BECH32_CONST",
    "BECH32M_CONST",
    "bech32_encode",
    "bech32_decode",
    "encode_segwit_address",
    "decode_segwit_address",
    "base58check_encode",
    "base58check_decode",
]

#: The checksum constants: bech32 (BIP173) and bech32m (BIP350).
BECH32_CONST: Final = 1
BECH32M_CONST: Final = 0x2BC830A3

_CHARSET: Final = segwit_addr.CHARSET
_CHARSET_REV: Final = {c: i for i, c in enumerate(_CHARSET)}


def _convertbits(data: list[int] | bytes, frombits: int, tobits: int, pad: bool) -> list[int]:
    out = segwit_addr.convertbits(data, frombits, tobits, pad)
    if out is None:
        raise BadScript("invalid data value or padding")
    return list(out)


# --- bech32m (BIP350): the codec python-bitcoinlib lacks --------------------------


def _bech32m_checksum(hrp: str, data: list[int]) -> list[int]:
    values = segwit_addr.bech32_hrp_expand(hrp) + data
    poly = segwit_addr.bech32_polymod(values + [0] * 6) ^ BECH32M_CONST
    return [(poly >> 5 * (5 - i)) & 31 for i in range(6)]


def _bech32m_decode(text: str) -> tuple[str, list[int]]:
    """``(hrp, data)`` of a bech32m string; BadScript with the reason when it is not one."""
    if any(ord(c) < 33 or ord(c) > 126 for c in text):
        raise BadScript("invalid character in bech32 string")
    if text.lower() != text and text.upper() != text:
        raise BadScript("mixed case bech32 string")
    text = text.lower()
    pos = text.rfind("1")
    if pos < 1 or pos + 7 > len(text) or len(text) > 90:
        raise BadScript("malformed bech32 string")
    hrp = text[:pos]
    try:
        data = [_CHARSET_REV[c] for c in text[pos + 1 :]]
    except KeyError:
        raise BadScript("invalid bech32 character") from None
    if segwit_addr.bech32_polymod(segwit_addr.bech32_hrp_expand(hrp) + data) != BECH32M_CONST:
        raise BadScript("bad bech32 checksum")
    return hrp, data[:-6]


# --- bech32 / bech32m strings ------------------------------------------------------


def bech32_encode(hrp: str, data: list[int], const: int) -> str:
    """Encode 5-bit ``data`` under ``hrp`` with checksum constant ``const`` (bech32 or bech32m)."""
    if const == BECH32_CONST:
        return str(segwit_addr.bech32_encode(hrp, list(data)))
    if const == BECH32M_CONST:
        return hrp + "1" + "".join(_CHARSET[d] for d in list(data) + _bech32m_checksum(hrp, list(data)))
    raise BadScript("unknown bech32 checksum constant")


def bech32_decode(text: str) -> tuple[str, list[int], int]:
    """Decode a bech32/bech32m string: ``(hrp, data, const)``; BadScript when invalid."""
    hrp, data = segwit_addr.bech32_decode(text)
    if hrp is not None:
        return str(hrp), list(data), BECH32_CONST
    hrp, data = _bech32m_decode(text)
    return hrp, data, BECH32M_CONST


# --- segwit addresses --------------------------------------------------------------


def decode_segwit_address(hrp: str, address: str) -> tuple[int, bytes]:
    """``(witness_version, program)`` of a segwit address under ``hrp``; BadScript when invalid.

    Witness v0 must carry the bech32 checksum and v1+ the bech32m one (BIP350).
    """
    version, program = segwit_addr.decode(hrp, address)
    if version is not None:
        if version != 0:
            raise BadScript("wrong checksum variant: witness v1+ needs bech32m")
        return 0, bytes(program)
    got_hrp, data, const = bech32_decode(address)  # BadScript for a malformed string
    if got_hrp != hrp:
        raise BadScript(f"address is for another network (hrp {got_hrp!r}, expected {hrp!r})")
    if const != BECH32M_CONST:
        raise BadScript("invalid segwit address (witness version or program)")
    if not data:
        raise BadScript("empty segwit address")
    version = data[0]
    if version == 0:
        raise BadScript("wrong checksum variant: witness v0 needs bech32")
    if version > 16:
        raise BadScript("invalid witness version")
    program = bytes(_convertbits(data[1:], 5, 8, False))
    if not 2 <= len(program) <= 40:
        raise BadScript("invalid witness program length")
    return version, program


def encode_segwit_address(hrp: str, version: int, program: bytes) -> str:
    """Encode a segwit address: bech32 for v0, bech32m for v1+."""
    if not 0 <= version <= 16 or not 2 <= len(program) <= 40:
        raise BadScript("invalid witness program")
    if version == 0:
        address = segwit_addr.encode(hrp, 0, program)
        if address is None:
            raise BadScript("invalid v0 witness program length")
        return str(address)
    return bech32_encode(hrp, [version] + _convertbits(program, 8, 5, True), BECH32M_CONST)


# --- base58check -------------------------------------------------------------------


def base58check_encode(payload: bytes) -> str:
    """Base58 of ``payload`` (a version byte and data) + its 4-byte double-SHA256 checksum."""
    if not payload:
        raise BadScript("a base58check payload starts with a version byte")
    return str(CBase58Data.from_bytes(payload[1:], payload[0]))


def base58check_decode(text: str) -> bytes:
    """The payload (version byte and data) of a base58check string; BadScript on a bad character,
    checksum or length."""
    try:
        decoded = CBase58Data(text)
    except Base58ChecksumError:
        raise BadScript("bad base58 checksum") from None
    except (Base58Error, IndexError, ValueError):
        raise BadScript("invalid base58 string") from None
    return bytes([decoded.nVersion]) + bytes(decoded)
