"""Channel keys derived from one seed (BIP32, hardened), so keys restore from the seed alone.

Pure: no I/O. A datadir keeps one 32-byte seed per role and network; channel key
number ``i`` is the BIP32 private key at path ``m/i'`` (one hardened step from
the master key of ``seed``), as computed by the ``bip32`` library. The index is
reserved durably by the store before the key is used, so no index is ever used
twice. Hardened derivation means a leaked channel key and the public data reveal
neither the seed nor any other channel key.

**Stateless proposals** (the payee's, see ``docs/PROTOCOL.md``) reserve no index: their channel
key is derived from the seed and the channel id alone, in a branch of its own,
``m/2147483647'/a'/b'`` (:data:`STATELESS_BRANCH`, the last hardened index, which counter keys
never use), where ``a`` and ``b`` are the first two big-endian 32-bit words of
``HMAC-SHA256(HMAC-SHA256(seed, "btcchannel/stateless-key"), channel_id)`` with their top bit
cleared (62 bits: two channel ids meet on one key with probability 2^-62). So the same seed and
channel id give the same key on every payee instance sharing the seed, and a lost key is derived
again from the seed and the channel id. :func:`proposal_mac_key` is the seed's other secret, the
key of the proposal tokens' MAC (:mod:`btcchannel.core.proposal`).
"""

from __future__ import annotations

import functools
import hashlib
import hmac

from bip32 import BIP32

from btcchannel.core.keys import check_private_key, public_key
from btcchannel.errors import BadRequest

__all__ = [
    "SEED_BYTES",
    "HARDENED",
    "STATELESS_BRANCH",
    "check_seed",
    "derivation_path",
    "derive_channel_key",
    "derive_stateless_key",
    "find_key_index",
    "proposal_mac_key",
    "stateless_key_path",
]

#: the length of a seed this project creates (BIP32 accepts 16 to 64 bytes)
SEED_BYTES = 32
HARDENED = 0x80000000
#: the first-level index of the stateless proposals' keys (never a counter key's index)
STATELESS_BRANCH = HARDENED - 1


def check_seed(seed: bytes) -> bytes:
    """Return ``seed`` if it is 16 to 64 bytes (BIP32's range); else BadRequest."""
    if not isinstance(seed, bytes) or not 16 <= len(seed) <= 64:
        raise BadRequest("seed must be 16 to 64 bytes")
    return seed


def derivation_path(index: int) -> str:
    """The BIP32 path of channel key ``index``: ``m/<index>'`` (``index`` below
    :data:`STATELESS_BRANCH`, the stateless keys' branch)."""
    if not isinstance(index, int) or not 0 <= index < STATELESS_BRANCH:
        raise BadRequest("key index out of range [0, 2^31 - 1)")
    return f"m/{index}'"


@functools.lru_cache(maxsize=8)
def _master(seed: bytes) -> BIP32:
    """The BIP32 master of ``seed`` (kept: a payee derives a key per stateless proposal)."""
    return BIP32.from_seed(check_seed(seed))


def derive_channel_key(seed: bytes, index: int) -> bytes:
    """The 32-byte private key at ``m/<index>'`` of ``seed``."""
    derivation_path(index)
    return check_private_key(bytes(_master(seed).get_privkey_from_path([HARDENED | index])))


def _channel_id_bytes(channel_id: str) -> bytes:
    try:
        raw = bytes.fromhex(channel_id)
    except (TypeError, ValueError):
        raw = b""
    if len(raw) != 16 or raw.hex() != channel_id:
        raise BadRequest("channel_id must be 32 lowercase hex characters")
    return raw


def stateless_key_path(seed: bytes, channel_id: str) -> list[int]:
    """The BIP32 path (hardened indexes, as integers) of channel ``channel_id``'s stateless key."""
    secret = hmac.new(check_seed(seed), b"btcchannel/stateless-key", hashlib.sha256).digest()
    digest = hmac.new(secret, _channel_id_bytes(channel_id), hashlib.sha256).digest()
    a = int.from_bytes(digest[0:4], "big") & (HARDENED - 1)
    b = int.from_bytes(digest[4:8], "big") & (HARDENED - 1)
    return [HARDENED | STATELESS_BRANCH, HARDENED | a, HARDENED | b]


def derive_stateless_key(seed: bytes, channel_id: str) -> bytes:
    """The 32-byte private key of stateless channel ``channel_id`` under ``seed`` (no index used)."""
    path = stateless_key_path(seed, channel_id)
    return check_private_key(bytes(_master(seed).get_privkey_from_path(path)))


def proposal_mac_key(seed: bytes) -> bytes:
    """The key of the proposal tokens' MAC: ``HMAC-SHA256(seed, "btcchannel/proposal-mac")``."""
    return hmac.new(check_seed(seed), b"btcchannel/proposal-mac", hashlib.sha256).digest()


def find_key_index(seed: bytes, pubkey: bytes, start: int, stop: int) -> int | None:
    """The first index in ``[start, stop)`` whose derived key has ``pubkey``, or None."""
    for index in range(start, stop):
        if public_key(derive_channel_key(seed, index)) == pubkey:
            return index
    return None
