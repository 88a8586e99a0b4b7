"""Channel keys derived from one seed (BIP32, hardened), so keys restore from the seed alone.

Pure: no I/O. A datadir keeps one 32-byte seed per role and network; channel key
number ``i`` is the BIP32 private key at path ``m/i'`` (one hardened step from
the master key of ``seed``), as computed by the ``bip32`` library. The index is
reserved durably by the store before the key is used, so no index is ever used
twice. Hardened derivation means a leaked channel key and the public data reveal
neither the seed nor any other channel key.
"""

from __future__ import annotations

from bip32 import BIP32

from btcchannel.core.keys import check_private_key, public_key
from btcchannel.errors import BadRequest

__all__ = ["SEED_BYTES", "HARDENED", "check_seed", "derivation_path", "derive_channel_key", "find_key_index"]

#: the length of a seed this project creates (BIP32 accepts 16 to 64 bytes)
SEED_BYTES = 32
HARDENED = 0x80000000


def check_seed(seed: bytes) -> bytes:
    """Return ``seed`` if it is 16 to 64 bytes (BIP32's range); else BadRequest."""
    if not isinstance(seed, bytes) or not 16 <= len(seed) <= 64:
        raise BadRequest("seed must be 16 to 64 bytes")
    return seed


def derivation_path(index: int) -> str:
    """The BIP32 path of channel key ``index``: ``m/<index>'``."""
    if not isinstance(index, int) or not 0 <= index < HARDENED:
        raise BadRequest("key index out of range [0, 2^31)")
    return f"m/{index}'"


def derive_channel_key(seed: bytes, index: int) -> bytes:
    """The 32-byte private key at ``m/<index>'`` of ``seed``."""
    derivation_path(index)
    master = BIP32.from_seed(check_seed(seed))
    return check_private_key(bytes(master.get_privkey_from_path([HARDENED | index])))


def find_key_index(seed: bytes, pubkey: bytes, start: int, stop: int) -> int | None:
    """The first index in ``[start, stop)`` whose derived key has ``pubkey``, or None."""
    for index in range(start, stop):
        if public_key(derive_channel_key(seed, index)) == pubkey:
            return index
    return None
