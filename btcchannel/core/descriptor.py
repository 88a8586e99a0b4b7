"""Output descriptors of channels (BIP380/BIP381/BIP382/BIP379): checksums, key expressions, the funding output.

Pure, no I/O. A descriptor channel's funding output (script version
:data:`~btcchannel.core.script.SCRIPT_DESCRIPTOR`) is the miniscript descriptor::

    wsh(and_v(or_i(v:pk(PAYEE),v:after(EXPIRY)),pk(PAYER)))#checksum

which any descriptor wallet (Bitcoin Core, BDK, Sparrow, Liana) can watch and, given the payer's
key, spend through the timelocked branch after ``EXPIRY`` without btcchannel. A legacy channel's
script (``OP_DROP``) is not miniscript: its descriptor is the watch-only ``addr(ADDRESS)``.

Entry points::

    descriptor_checksum(desc) -> str          # the 8-character BIP380 checksum
    add_checksum(desc) -> str                 # desc + "#" + checksum
    strip_checksum(desc) -> str               # the body of a checksummed descriptor (BadRequest if wrong)
    wif(privkey, network) -> str              # a compressed-key WIF
    seed_key_expression(seed, index, network) -> str  # "[fingerprint/index h]xprv..." of channel key index
    funding_descriptor(params, payer_key=None, payee_key=None) -> str
"""

from __future__ import annotations

from typing import Final, Sequence

from bip32 import BIP32

from btcchannel.core.address import base58check_encode
from btcchannel.core.keys import check_private_key
from btcchannel.core.params import ChannelParams
from btcchannel.core.script import SCRIPT_DESCRIPTOR, check_network
from btcchannel.core.seed import HARDENED, check_seed, derivation_path
from btcchannel.errors import BadRequest

__all__ = [
    "descriptor_checksum",
    "add_checksum",
    "strip_checksum",
    "wif",
    "seed_key_expression",
    "funding_descriptor",
    "channel_miniscript",
]

# BIP380: every character a descriptor may hold, in the order its checksum encodes them
_INPUT_CHARSET: Final = (
    "0123456789()[],'/*abcdefgh@:$%{}IJKLMNOPQRSTUVWXYZ&+-.;<=>?!^_|~ijklmnopqrstuvwxyzABCDEFGH`#\"\\ "
)
_CHECKSUM_CHARSET: Final = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_GENERATOR: Final = (0xF5DEE51989, 0xA9FDCA3312, 0x1BAB10E32D, 0x3706B1677A, 0x644D626FFD)
_WIF_VERSION: Final = {"mainnet": 0x80, "testnet": 0xEF, "testnet4": 0xEF, "signet": 0xEF, "regtest": 0xEF}


def _polymod(symbols: Sequence[int]) -> int:
    chk = 1
    for value in symbols:
        top = chk >> 35
        chk = ((chk & 0x7FFFFFFFF) << 5) ^ value
        for i in range(5):
            if (top >> i) & 1:
                chk ^= _GENERATOR[i]
    return chk


def _expand(desc: str) -> list[int]:
    symbols: list[int] = []
    groups: list[int] = []
    for c in desc:
        v = _INPUT_CHARSET.find(c)
        if v < 0:
            raise BadRequest(f"character {c!r} cannot appear in a descriptor")
        symbols.append(v & 31)
        groups.append(v >> 5)
        if len(groups) == 3:
            symbols.append(groups[0] * 9 + groups[1] * 3 + groups[2])
            groups = []
    if len(groups) == 1:
        symbols.append(groups[0])
    elif len(groups) == 2:
        symbols.append(groups[0] * 3 + groups[1])
    return symbols


def descriptor_checksum(desc: str) -> str:
    """The BIP380 checksum of ``desc`` (without any ``#``): 8 characters of ``qpzry9x8gf2tvdw0s3jn54khce6mua7l``."""
    if not isinstance(desc, str):
        raise BadRequest("a descriptor is a string")
    chk = _polymod(_expand(desc) + [0] * 8) ^ 1
    return "".join(_CHECKSUM_CHARSET[(chk >> (5 * (7 - i))) & 31] for i in range(8))


def add_checksum(desc: str) -> str:
    """``desc#checksum``."""
    return f"{desc}#{descriptor_checksum(desc)}"


def strip_checksum(desc: str) -> str:
    """The descriptor of ``desc#checksum`` once its checksum checks out; BadRequest otherwise."""
    if not isinstance(desc, str) or len(desc) < 9 or desc[-9] != "#":
        raise BadRequest("descriptor has no checksum")
    body, given = desc[:-9], desc[-8:]
    if not set(given) <= set(_CHECKSUM_CHARSET):
        raise BadRequest("descriptor checksum has characters outside its alphabet")
    if _polymod(_expand(body) + [_CHECKSUM_CHARSET.index(c) for c in given]) != 1:
        raise BadRequest("descriptor checksum does not match")
    return body


def wif(privkey: bytes, network: str) -> str:
    """``privkey`` in wallet import format for ``network`` (compressed public key)."""
    return base58check_encode(bytes([_WIF_VERSION[check_network(network)]]) + check_private_key(privkey) + b"\x01")


def seed_key_expression(seed: bytes, index: int, network: str) -> str:
    """The descriptor key expression of channel key ``index`` under ``seed`` (path ``m/index'``):
    ``[<master fingerprint>/<index>h]<xprv>``, the extended private key at that path with its origin
    (``tprv`` off mainnet). It carries this one key and no other: the seed's master key is not in it.
    """
    derivation_path(index)
    master = BIP32.from_seed(check_seed(seed), network="main" if check_network(network) == "mainnet" else "test")
    xprv = master.get_xpriv_from_path([HARDENED | index])
    return f"[{master.get_fingerprint().hex()}/{index}h]{xprv}"


def channel_miniscript(payer_key: str, payee_key: str, expiry_height: int) -> str:
    """``and_v(or_i(v:pk(PAYEE),v:after(EXPIRY)),pk(PAYER))`` with the given key expressions."""
    return f"and_v(or_i(v:pk({payee_key}),v:after({int(expiry_height)})),pk({payer_key}))"


def funding_descriptor(params: ChannelParams, payer_key: str | None = None, payee_key: str | None = None) -> str:
    """The descriptor (with checksum) of the channel's funding output.

    A descriptor channel: ``wsh(and_v(or_i(v:pk(PAYEE),v:after(EXPIRY)),pk(PAYER)))``, each key
    the public key unless a key expression is given (``payer_key``: the payer's WIF or
    :func:`seed_key_expression`, which makes the descriptor spendable by the payer's wallet). A
    legacy channel: ``addr(ADDRESS)``, watch-only; asking for a private key of one is BadRequest
    (its script is not miniscript: the refund needs btcchannel or the raw script).
    """
    if params.script_version != SCRIPT_DESCRIPTOR:
        if payer_key is not None or payee_key is not None:
            raise BadRequest(
                "this channel uses the legacy script, which no descriptor expresses with keys: "
                "only its watch-only addr() descriptor exists"
            )
        return add_checksum(f"addr({params.funding_address})")
    payer = payer_key if payer_key is not None else params.payer_pubkey.hex()
    payee = payee_key if payee_key is not None else params.payee_pubkey.hex()
    return add_checksum(f"wsh({channel_miniscript(payer, payee, params.expiry_height)})")
