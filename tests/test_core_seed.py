"""Channel keys derived from a seed: BIP32 test vector 1, determinism, hardened-only indexes."""

from __future__ import annotations

import pytest

from btcchannel.core.keys import public_key
from btcchannel.core.seed import derivation_path, derive_channel_key, find_key_index
from btcchannel.errors import BadRequest

# BIP32 test vector 1: seed 000102...0f, chain m/0H (the derivation channel key 0 uses)
VECTOR1_SEED = bytes.fromhex("000102030405060708090a0b0c0d0e0f")
VECTOR1_M0H_PRIV = "edb2e14f9ee77d26dd93b4ecede8d16ed408ce149b6cd80b0715a2d911a0afea"
VECTOR1_M0H_PUB = "035a784662a4a20a65bf6aab9ae98a6c068a81c52e4b032c0fb5400c706cfccc56"


def test_channel_key_0_is_bip32_test_vector_1_m_0h() -> None:
    key = derive_channel_key(VECTOR1_SEED, 0)
    assert key.hex() == VECTOR1_M0H_PRIV
    assert public_key(key).hex() == VECTOR1_M0H_PUB
    assert derivation_path(0) == "m/0'"


def test_keys_are_deterministic_and_distinct_per_index_and_seed() -> None:
    seed = bytes(range(32))
    first = [derive_channel_key(seed, i) for i in range(5)]
    assert first == [derive_channel_key(seed, i) for i in range(5)]
    assert len(set(first)) == 5
    assert derive_channel_key(bytes(range(1, 33)), 0) != first[0]
    assert find_key_index(seed, public_key(first[3]), 0, 5) == 3
    assert find_key_index(seed, public_key(first[3]), 0, 3) is None


@pytest.mark.parametrize("index", [-1, 2**31, 2**32])
def test_only_hardened_indexes_in_range(index: int) -> None:
    with pytest.raises(BadRequest):
        derive_channel_key(VECTOR1_SEED, index)


@pytest.mark.parametrize("seed", [b"", b"\x00" * 15, b"\x00" * 65])
def test_seed_length_is_checked(seed: bytes) -> None:
    with pytest.raises(BadRequest):
        derive_channel_key(seed, 0)
