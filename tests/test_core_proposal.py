"""Stateless proposal tokens and keys (pure): a token decodes to exactly what was encoded, and
only with the payee's own MAC key and network; any change to it is refused; the stateless keys
live in a branch of their own, one per channel id."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from btcchannel.core import keys, script
from btcchannel.core.proposal import MAX_TOKEN_CHARS, ProposalToken
from btcchannel.core.seed import (
    HARDENED,
    STATELESS_BRANCH,
    derivation_path,
    derive_channel_key,
    derive_stateless_key,
    proposal_mac_key,
    stateless_key_path,
)
from btcchannel.core.terms import Terms
from btcchannel.errors import BadProposalToken, BadRequest

SEED = bytes(range(32))
MAC_KEY = proposal_mac_key(SEED)
PUB = keys.public_key(bytes([7]) * 32)


def _token(**kw: object) -> ProposalToken:
    base: dict[str, object] = dict(
        channel_id="ab" * 16,
        issued_at=1_700_000_000,
        created_height=250,
        payer_pubkey=PUB,
        payer_script=script.p2wpkh_script(PUB),
        deposit_sat=100_000,
        expiry_height=400,
        script_version=1,
        terms=Terms(price_sat=10, max_units=5),
    )
    base.update(kw)
    return ProposalToken(**base)  # type: ignore[arg-type]


def _raw(token: str) -> bytes:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))


def _text(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_a_token_round_trips_and_is_base64url_without_padding() -> None:
    tok = _token()
    text = tok.encode(MAC_KEY, "regtest")
    assert set(text) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert len(text) <= MAX_TOKEN_CHARS
    assert ProposalToken.decode(text, MAC_KEY, "regtest") == tok
    assert _raw(text)[0] == 1  # the version byte
    assert _raw(text)[1:17] == bytes.fromhex("ab" * 16)  # the channel id, in the clear but MACed


@pytest.mark.parametrize(
    "mac_key, network",
    [(proposal_mac_key(bytes(range(1, 33))), "regtest"), (MAC_KEY, "signet"), (b"", "regtest")],
    ids=["another payee's seed", "another network", "no key"],
)
def test_a_token_checks_only_with_its_payees_key_and_network(mac_key: bytes, network: str) -> None:
    text = _token().encode(MAC_KEY, "regtest")
    with pytest.raises(BadProposalToken, match="not issued by this payee"):
        ProposalToken.decode(text, mac_key, network)


@pytest.mark.parametrize(
    "text",
    ["", "a", "!!!!", "ab=", 12, None, "A" * (MAX_TOKEN_CHARS + 1), _text(b"\x01" * 32), _text(b"\x01" * 40)],
)
def test_garbage_is_refused(text: object) -> None:
    with pytest.raises(BadProposalToken):
        ProposalToken.decode(text, MAC_KEY, "regtest")


def test_a_token_with_a_valid_mac_but_a_malformed_body_is_refused() -> None:
    """Only the payee can MAC; still, a body it cannot parse (another version) is refused, not a crash."""
    body = bytearray(_token().body())
    body[0] = 2  # an unknown version
    mac = hmac.new(MAC_KEY, b"btcchannel/proposal-token/regtest" + bytes(body), hashlib.sha256).digest()
    with pytest.raises(BadProposalToken, match="malformed"):
        ProposalToken.decode(_text(bytes(body) + mac), MAC_KEY, "regtest")


_terms = st.builds(
    Terms,
    price_sat=st.integers(0, 10**6),
    mode=st.sampled_from(["prepay", "postpay"]),
    credit_limit_sat=st.integers(0, 10**6),
    payment_timeout_ms=st.integers(1, 10**9),
    idle_timeout_ms=st.none() | st.integers(1, 10**9),
    max_total_sat=st.none() | st.integers(1, 2_100_000_000_000_000),
    max_units=st.none() | st.integers(1, 2**53),
    max_payments=st.none() | st.integers(1, 2**53),
    end_time=st.none() | st.integers(1, 2**32 - 1),
)
_tokens = st.builds(
    ProposalToken,
    channel_id=st.binary(min_size=16, max_size=16).map(bytes.hex),
    issued_at=st.integers(0, 2**40),
    created_height=st.integers(0, 2**32 - 1),
    payer_pubkey=st.just(PUB),
    payer_script=st.binary(min_size=0, max_size=100),
    deposit_sat=st.integers(0, 2_100_000_000_000_000),
    expiry_height=st.integers(0, 2**32 - 1),
    script_version=st.sampled_from([0, 1]),
    terms=_terms,
)


@settings(max_examples=200, deadline=None)
@given(tok=_tokens, where=st.integers(0, 10**6), bit=st.integers(0, 7))
def test_every_token_round_trips_and_any_flipped_bit_is_refused(tok: ProposalToken, where: int, bit: int) -> None:
    text = tok.encode(MAC_KEY, "testnet")
    assert ProposalToken.decode(text, MAC_KEY, "testnet") == tok
    raw = bytearray(_raw(text))
    raw[where % len(raw)] ^= 1 << bit
    with pytest.raises(BadProposalToken):
        ProposalToken.decode(_text(bytes(raw)), MAC_KEY, "testnet")
    with pytest.raises(BadProposalToken):  # cut short
        ProposalToken.decode(_text(bytes(raw[: where % len(raw)])), MAC_KEY, "testnet")


def test_stateless_keys_are_one_per_channel_in_their_own_branch() -> None:
    path = stateless_key_path(SEED, "ab" * 16)
    assert len(path) == 3 and all(i & HARDENED for i in path)
    assert path[0] == HARDENED | STATELESS_BRANCH
    key = derive_stateless_key(SEED, "ab" * 16)
    assert key == derive_stateless_key(SEED, "ab" * 16)  # deterministic: any instance on the seed
    assert key != derive_stateless_key(SEED, "ab" * 15 + "ac")
    assert key != derive_stateless_key(bytes(range(1, 33)), "ab" * 16)
    assert key not in {derive_channel_key(SEED, i) for i in range(4)}
    with pytest.raises(BadRequest):  # the counter keys never reach the stateless branch
        derivation_path(STATELESS_BRANCH)
    assert derivation_path(STATELESS_BRANCH - 1) == f"m/{STATELESS_BRANCH - 1}'"
    for bad in ("AB" * 16, "ab" * 15, "zz" * 16):
        with pytest.raises(BadRequest):
            derive_stateless_key(SEED, bad)
