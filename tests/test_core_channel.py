"""Unit and property tests of the channel state machines (btcchannel.core.channel), pure."""

from __future__ import annotations

import hashlib
import math
from typing import Any

import pytest
from bitcoin.core import CMutableTransaction, CMutableTxIn, CMutableTxOut, CTransaction
from bitcoin.core.script import SIGVERSION_WITNESS_V0, CScript, SignatureHash
from hypothesis import given, settings
from hypothesis import strategies as st

from btcchannel import ChannelParams, ChannelState, OutPoint, PayeeChannel, PayerChannel, Payment, build_multi_close
from btcchannel.core.channel import build_multi_close_at_most
from btcchannel.core.keys import CURVE_ORDER, _sign, public_key, sign_digest
from btcchannel.core.script import address_to_script, dust_limit, p2pkh_script, p2wpkh_script, p2wsh_script
from btcchannel.core.state import TERMINAL_STATES, TRANSITIONS, ChannelEvent, Transition, next_state
from btcchannel.core.terms import (
    MIN_RELAY_FEE_RATE,
    bump_fee_rate,
    close_is_urgent,
    deadline_blocks,
    replacement_min_fee,
)
from btcchannel.core.tx import ITERATIVE_SEQUENCE, PaymentSighash, tx_vsize
from btcchannel.errors import (
    AmountOutOfRange,
    BadPubkey,
    BadRequest,
    BadScript,
    BadSignature,
    ChannelClosed,
    ChannelClosing,
    CloseUneconomic,
    DepositOutOfRange,
    ExpiryOutOfRange,
    IllegalTransition,
    NotExpired,
    NotOpen,
    StalePayment,
)

PAYER_KEY = hashlib.sha256(b"payer-key").digest()
PAYEE_KEY = hashlib.sha256(b"payee-key").digest()
PAYER = public_key(PAYER_KEY)
PAYEE = public_key(PAYEE_KEY)
PAYER_SCRIPT = p2wpkh_script(PAYER)
PAYEE_SCRIPT = p2wpkh_script(PAYEE)
FUNDING = OutPoint("5a" * 32, 1)
DEPOSIT = 1_000_000
EXPIRY = 1_000
DUST = 294  # p2wpkh change


def make_params(**kw: Any) -> ChannelParams:
    base: dict[str, Any] = dict(
        network="regtest",
        payer_pubkey=PAYER,
        payee_pubkey=PAYEE,
        expiry_height=EXPIRY,
        deposit_sat=DEPOSIT,
        payer_script=PAYER_SCRIPT,
        funding=None,
    )
    base.update(kw)
    return ChannelParams(**base)


def open_pair(params: ChannelParams | None = None, margin: int = 6) -> tuple[PayerChannel, PayeeChannel]:
    params = params or make_params()
    payer = PayerChannel(params, PAYER_KEY)
    payee = PayeeChannel(params, PAYEE_KEY, close_margin_blocks=margin)
    payer.funding_broadcast(FUNDING)
    payee.funding_seen(FUNDING)
    payer.funding_confirmed()
    payee.funding_confirmed()
    return payer, payee


def sig_over_template(
    amount: int,
    *,
    version: int = 2,
    locktime: int = 0,
    sequence: int = ITERATIVE_SEQUENCE,
    outpoint: OutPoint = FUNDING,
    deposit: int = DEPOSIT,
    ws: bytes | None = None,
    payer_script: bytes = PAYER_SCRIPT,
    hashtype: int = 0x83,
) -> bytes:
    """The payer's signature over an independently built (possibly tampered) iterative template."""
    ws = ws if ws is not None else make_params().witness_script
    vin = [CMutableTxIn(outpoint.to_coutpoint(), CScript(), sequence)]
    vout = [] if amount == deposit else [CMutableTxOut(deposit - amount, CScript(payer_script))]
    tx = CTransaction.from_tx(CMutableTransaction(vin, vout, locktime, version))
    digest = SignatureHash(CScript(ws), tx, 0, hashtype, amount=deposit, sigversion=SIGVERSION_WITNESS_V0)
    return sign_digest(PAYER_KEY, bytes(digest)) + bytes([hashtype])


# --- params ---------------------------------------------------------------------


def test_params_derived_and_json() -> None:
    p = make_params()
    assert p.funding_script == p2wsh_script(p.witness_script)
    assert address_to_script(p.funding_address, "regtest") == p.funding_script
    assert p.funding_address.startswith("bcrt1q")
    q = p.with_funding(FUNDING)
    assert q.funding == FUNDING and p.funding is None and q.witness_script == p.witness_script
    for x in (p, q):
        assert ChannelParams.from_json(x.to_json()) == x
    with pytest.raises(BadRequest):
        ChannelParams.from_json({**p.to_json(), "extra": 1})
    with pytest.raises(BadRequest):
        ChannelParams.from_json({**p.to_json(), "payer_pubkey": "zz"})
    with pytest.raises(ExpiryOutOfRange):
        ChannelParams.from_json({**p.to_json(), "expiry_height": 0})


@pytest.mark.parametrize(
    "kw,exc",
    [
        ({"network": "bitcoin"}, BadRequest),
        ({"payer_pubkey": b"\x02" + b"\xff" * 32}, BadPubkey),
        ({"payee_pubkey": PAYER}, BadPubkey),
        ({"deposit_sat": 329}, DepositOutOfRange),
        ({"deposit_sat": 21_000_000 * 10**8 + 1}, DepositOutOfRange),
        ({"deposit_sat": 1000.0}, DepositOutOfRange),
        ({"payer_script": b"\x6a"}, BadScript),
    ],
)
def test_params_validation(kw: dict[str, Any], exc: type[Exception]) -> None:
    with pytest.raises(exc):
        make_params(**kw)


def test_payment_json() -> None:
    pm = Payment(5, b"\x30\x01\x83")
    assert Payment.from_json(pm.to_json()) == pm and pm.sighash_type == 0x83
    for bad in ({"amount_sat": "5", "signature": "00"}, {"amount_sat": 5, "signature": "zz"}, {"amount_sat": 5}):
        with pytest.raises(BadRequest):
            Payment.from_json(bad)


# --- transitions ----------------------------------------------------------------

EVENTS = ("funding", "funding_confirmed", "closing", "closed", "refunded", "failed")


@pytest.mark.parametrize("state", list(ChannelState))
@pytest.mark.parametrize("event", EVENTS)
def test_transition_table(state: ChannelState, event: str) -> None:
    if (state, event) in TRANSITIONS:
        assert next_state(state, event) is TRANSITIONS[(state, ChannelEvent(event))]
    else:
        with pytest.raises(IllegalTransition):
            next_state(state, event)
    assert all(s not in TERMINAL_STATES for s, _ in TRANSITIONS)


def test_machine_events_and_illegal() -> None:
    payer, payee = open_pair()
    with pytest.raises(IllegalTransition):
        payer.funding_broadcast(FUNDING)
    with pytest.raises(IllegalTransition):
        payee.funding_confirmed()
    payee.closing()
    payee.closed()
    assert payee.state is ChannelState.CLOSED
    for event in (payee.closing, payee.closed, payee.refunded, payee.failed):
        with pytest.raises(IllegalTransition):
            event()
    payer.refunded()
    assert payer.state is ChannelState.REFUNDED
    fresh = PayerChannel(make_params(), PAYER_KEY)
    fresh.failed()
    assert fresh.state is ChannelState.FAILED


def test_key_mismatch_and_restore_checks() -> None:
    with pytest.raises(BadPubkey):
        PayerChannel(make_params(), PAYEE_KEY)
    with pytest.raises(BadPubkey):
        PayeeChannel(make_params(), PAYER_KEY)
    with pytest.raises(BadRequest):
        PayeeChannel(make_params(), PAYEE_KEY, state=ChannelState.OPEN)  # open without funding
    with pytest.raises(BadRequest):
        PayeeChannel(make_params(), PAYEE_KEY, close_margin_blocks=-1)


# --- payments: the happy path and properties ------------------------------------


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 50_000), min_size=1, max_size=25), st.booleans(), st.sampled_from([1.0, 2.0, 12.5]))
def test_any_valid_sequence_closes_exactly(steps: list[int], drain: bool, rate: float) -> None:
    payer, payee = open_pair()
    amount = 0
    for step in steps:
        amount = min(amount + step, DEPOSIT - DUST)
        if amount <= payer.amount_sat:
            break
        pm = payer.sign_payment(amount)
        payer.commit_payment(pm)
        assert payee.accept_payment(pm.amount_sat, pm.signature, tip_height=EXPIRY - 7) is True
        assert payee.accept_payment(pm.amount_sat, pm.signature) is False  # exact retry
    if drain:
        pm = payer.sign_payment(DEPOSIT)
        payer.commit_payment(pm)
        assert payee.accept_payment(DEPOSIT, pm.signature)
        assert pm.signature[-1] == 0x82
    last = payer.amount_sat
    assert payee.amount_sat == last and payee.best == payer.payment
    try:
        tx = payee.build_close(PAYEE_SCRIPT, rate)
    except CloseUneconomic:
        assert last < DUST + rate * 200  # a single-channel close is well under 200 vB
        return
    to_payer = sum(o.nValue for o in tx.vout if bytes(o.scriptPubKey) == PAYER_SCRIPT)
    assert to_payer == DEPOSIT - last
    fee = math.ceil(rate * tx_vsize(tx))
    assert tx.vout[-1].nValue == last - fee
    assert sum(o.nValue for o in tx.vout) == DEPOSIT - fee


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, DEPOSIT - DUST), min_size=1, max_size=15))
def test_payee_keeps_only_the_best(amounts: list[int]) -> None:
    payer, payee = open_pair()
    best = 0
    for amount in amounts:
        pm = payer.sign_payment(amount)  # the payer has committed nothing, so any amount > 0 signs
        if amount > best:
            assert payee.accept_payment(amount, pm.signature)
            best = amount
        elif amount == best:
            assert payee.accept_payment(amount, pm.signature) is False  # RFC6979: same signature
        else:
            with pytest.raises(StalePayment):
                payee.accept_payment(amount, pm.signature)
        assert payee.amount_sat == best


def test_equal_amount_other_signature_is_stale() -> None:
    payer, payee = open_pair()
    pm = payer.sign_payment(1000)
    assert payee.accept_payment(1000, pm.signature)
    other = _sign(PAYER_KEY, payee.params.sighash().digest(1000), 1) + b"\x83"
    assert other != pm.signature
    with pytest.raises(StalePayment):
        payee.accept_payment(1000, other)
    with pytest.raises(StalePayment):
        payee.accept_payment(999, payer.sign_payment(999).signature)


@pytest.mark.parametrize("amount", [0, -1, DEPOSIT + 1, DEPOSIT - 1, DEPOSIT - DUST + 1, True, 10.0])
def test_amount_out_of_range(amount: Any) -> None:
    payer, payee = open_pair()
    with pytest.raises(AmountOutOfRange):
        payer.sign_payment(amount)
    with pytest.raises(AmountOutOfRange):
        payee.accept_payment(amount, b"\x30" * 71 + b"\x83")


def test_boundary_amounts_accepted() -> None:
    payer, payee = open_pair()
    for amount in (1, DEPOSIT - DUST, DEPOSIT):
        pm = payer.sign_payment(amount)
        assert payee.accept_payment(amount, pm.signature)
    payer.commit_payment(pm)
    with pytest.raises(StalePayment):
        payer.sign_payment(DEPOSIT)


# --- tampering ------------------------------------------------------------------


def test_signature_over_our_own_template_is_accepted() -> None:
    _, payee = open_pair()
    assert payee.accept_payment(1234, sig_over_template(1234))
    assert payee.accept_payment(DEPOSIT, sig_over_template(DEPOSIT, hashtype=0x82))


@pytest.mark.parametrize(
    "tamper",
    [
        {"version": 1},
        {"locktime": 1},
        {"locktime": EXPIRY},
        {"sequence": 0xFFFFFFFF},
        {"sequence": 0xFFFFFFFE},
        {"outpoint": OutPoint("5a" * 32, 0)},
        {"outpoint": OutPoint("5b" + "5a" * 31, 1)},
        {"deposit": DEPOSIT + 1},
        {"ws": make_params(expiry_height=EXPIRY + 1).witness_script},
        {"payer_script": p2pkh_script(b"\x01" * 20)},
        {"hashtype": 0x03},
        {"hashtype": 0x81},
    ],
    ids=lambda t: next(iter(t)),
)
def test_tampered_templates_rejected(tamper: dict[str, Any]) -> None:
    _, payee = open_pair()
    sig = sig_over_template(5000, **tamper)
    # present it with the sighash byte the payee expects, so only the template differs
    with pytest.raises(BadSignature):
        payee.accept_payment(5000, sig[:-1] + b"\x83")
    with pytest.raises(BadSignature):
        payee.accept_payment(5000, sig)


def test_tampered_payment_fields_rejected() -> None:
    payer, payee = open_pair()
    pm = payer.sign_payment(5000)
    der = pm.signature[:-1]
    len_r = der[3]
    r = int.from_bytes(der[4 : 4 + len_r], "big")
    s = int.from_bytes(der[6 + len_r :], "big")
    high_s = CURVE_ORDER - s
    hs = high_s.to_bytes(33, "big") if high_s >> 255 else high_s.to_bytes(32, "big")
    rb = der[4 : 4 + len_r]
    high = b"\x30" + bytes([4 + len(rb) + len(hs)]) + b"\x02" + bytes([len(rb)]) + rb + b"\x02" + bytes([len(hs)]) + hs
    flipped = bytearray(pm.signature)
    flipped[10] ^= 0x01
    other_key = sign_digest(PAYEE_KEY, payee.params.sighash().digest(5000)) + b"\x83"
    cases = [
        (5001, pm.signature),  # amount
        (4999, pm.signature),
        (5000, bytes(flipped)),  # signature bytes
        (5000, high + b"\x83"),  # high S
        (5000, der + b"\x82"),  # sighash byte
        (5000, der + b"\x81"),
        (5000, der + b"\x03"),
        (5000, der),  # missing sighash byte
        (5000, der + b"\x00" + b"\x83"),  # not DER
        (5000, b""),
        (5000, other_key),  # not the payer's key
    ]
    assert r > 0
    for amount, sig in cases:
        with pytest.raises(BadSignature):
            payee.accept_payment(amount, sig)
    assert payee.best is None
    drain = payer.sign_payment(DEPOSIT)
    with pytest.raises(BadSignature):
        payee.accept_payment(DEPOSIT, drain.signature[:-1] + b"\x83")
    assert payee.accept_payment(5000, pm.signature)


# --- states, expiry, margins ----------------------------------------------------


def test_payee_state_errors_and_margin() -> None:
    params = make_params()
    payee = PayeeChannel(params, PAYEE_KEY)
    payer = PayerChannel(params, PAYER_KEY)
    with pytest.raises(NotOpen):
        payee.accept_payment(1, b"\x30\x83")
    with pytest.raises(NotOpen):
        payer.sign_payment(1)
    payer, payee = open_pair(margin=6)
    pm = payer.sign_payment(10_000)
    with pytest.raises(ChannelClosing):
        payee.accept_payment(10_000, pm.signature, tip_height=EXPIRY - 6)
    assert payee.accept_payment(10_000, pm.signature, tip_height=EXPIRY - 7)
    assert not payee.must_close(EXPIRY - 7)
    assert payee.must_close(EXPIRY - 6) and payee.must_close(EXPIRY + 10)
    assert payee.closing_height == EXPIRY - 6
    payee.closing()
    assert not payee.must_close(EXPIRY)
    with pytest.raises(ChannelClosing):
        payee.accept_payment(20_000, payer.sign_payment(20_000).signature)
    payee.build_close(PAYEE_SCRIPT, 1.0)  # still allowed (RBF) while closing
    payee.closed()
    with pytest.raises(ChannelClosed):
        payee.accept_payment(20_000, payer.sign_payment(20_000).signature)
    with pytest.raises(ChannelClosed):
        payee.build_close(PAYEE_SCRIPT, 1.0)
    payer.closing()
    with pytest.raises(NotOpen):
        payer.sign_payment(30_000)


def test_must_close_needs_a_payment() -> None:
    _, payee = open_pair()
    assert not payee.must_close(EXPIRY)
    with pytest.raises(NotOpen):
        payee.build_close(PAYEE_SCRIPT, 1.0)


# --- close, RBF, multi-close, refund, close request ------------------------------


def test_close_rbf_without_payer() -> None:
    payer, payee = open_pair()
    pm = payer.sign_payment(300_000)
    payer.commit_payment(pm)
    payee.accept_payment(300_000, pm.signature)
    first = payee.build_close(PAYEE_SCRIPT, 2.0)
    bumped = payee.build_close(PAYEE_SCRIPT, 9.0)
    assert first.vout[0] == bumped.vout[0]  # the payer's change, exactly deposit - A
    assert first.vout[0].nValue == DEPOSIT - 300_000
    assert first.wit.vtxinwit[0].scriptWitness.stack[0] == bumped.wit.vtxinwit[0].scriptWitness.stack[0] == pm.signature
    assert bumped.vout[1].nValue == 300_000 - 9 * tx_vsize(bumped)
    assert bumped.vout[1].nValue < first.vout[1].nValue
    floor = payee.build_close(PAYEE_SCRIPT, 1.0, min_fee_sat=first.vout[1].nValue - bumped.vout[1].nValue + 500)
    assert floor.vout[1].nValue < bumped.vout[1].nValue


def test_multi_close_two_channels() -> None:
    payer1, payee1 = open_pair()
    p2 = make_params(deposit_sat=50_000)
    payer2 = PayerChannel(p2, PAYER_KEY)
    payee2 = PayeeChannel(p2, PAYEE_KEY)
    other = OutPoint("77" * 32, 0)
    payer2.funding_broadcast(other)
    payee2.funding_seen(other)
    payer2.funding_confirmed()
    payee2.funding_confirmed()
    payee1.accept_payment(400_000, payer1.sign_payment(400_000).signature)
    payee2.accept_payment(50_000, payer2.sign_payment(50_000).signature)  # full drain
    tx = build_multi_close([payee2, payee1], PAYEE_SCRIPT, 2.0)
    assert [txin.prevout for txin in tx.vin] == [FUNDING.to_coutpoint(), other.to_coutpoint()]
    assert tx.vout[0].nValue == DEPOSIT - 400_000
    assert tx.vout[1].nValue == 450_000 - math.ceil(2.0 * tx_vsize(tx))
    assert len(tx.vout) == 2
    # at a rate the payments cannot pay, the most they can: the payee output at its dust limit
    most = build_multi_close_at_most([payee2, payee1], PAYEE_SCRIPT, 1e9)
    assert most.vout[1].nValue == dust_limit(PAYEE_SCRIPT)
    assert build_multi_close_at_most([payee2, payee1], PAYEE_SCRIPT, 2.0).vout[1].nValue == tx.vout[1].nValue


def test_deadline_window() -> None:
    assert [deadline_blocks(m) for m in (2, 3, 6, 7)] == [1, 1, 3, 3]
    assert close_is_urgent(expiry_height=100, tip_height=97, close_margin_blocks=6)
    assert not close_is_urgent(expiry_height=100, tip_height=96, close_margin_blocks=6)


def test_replacement_min_fee_is_bip125() -> None:
    # more than the replaced fee, plus the relay floor for the replacement's own size
    assert replacement_min_fee(1_000, 200) == 1_000 + 200 + 1
    assert replacement_min_fee(0, 141) == math.ceil(MIN_RELAY_FEE_RATE * 141) + 1


def test_refund() -> None:
    payer, _ = open_pair()
    with pytest.raises(NotExpired):
        payer.build_refund(EXPIRY - 1, 1.0)
    tx = payer.build_refund(EXPIRY, 1.0)
    assert tx.nLockTime == EXPIRY and tx.vin[0].nSequence == 0xFFFFFFFD  # BIP125-replaceable
    assert bytes(tx.vout[0].scriptPubKey) == PAYER_SCRIPT
    assert tx.vout[0].nValue == DEPOSIT - tx_vsize(tx)
    dest = p2pkh_script(b"\x09" * 20)
    assert bytes(payer.build_refund(EXPIRY + 5, 3.0, dest).vout[0].scriptPubKey) == dest
    unfunded = PayerChannel(make_params(), PAYER_KEY)
    with pytest.raises(NotOpen):
        unfunded.build_refund(EXPIRY, 1.0)
    payer.refunded()
    with pytest.raises(ChannelClosed):
        payer.build_refund(EXPIRY, 1.0)


def test_close_request() -> None:
    payer, payee = open_pair()
    cid = "0123456789abcdef0123456789abcdef"
    sig = payer.close_request_signature(cid)
    payee.verify_close_request(cid, sig)
    with pytest.raises(BadSignature):
        payee.verify_close_request("f" * 32, sig)
    with pytest.raises(BadSignature):
        payee.verify_close_request(cid, sig + b"\x01")


def test_restore_from_storage() -> None:
    payer, payee = open_pair()
    pm = payer.sign_payment(123_456)
    params = payee.params
    restored = PayeeChannel(params, PAYEE_KEY, state=ChannelState.CLOSING, best=pm)
    assert restored.amount_sat == 123_456 and restored.state is ChannelState.CLOSING
    restored_payer = PayerChannel(params, PAYER_KEY, state=ChannelState.OPEN, payment=pm)
    assert restored_payer.amount_sat == 123_456
    with pytest.raises(BadSignature):
        PayeeChannel(params, PAYEE_KEY, state=ChannelState.OPEN, best=Payment(123_457, pm.signature))
    with pytest.raises(BadSignature):
        PayerChannel(params, PAYER_KEY, state=ChannelState.OPEN, payment=Payment(123_457, pm.signature))
    with pytest.raises(StalePayment):
        restored_payer.commit_payment(pm)
    with pytest.raises(BadSignature):
        restored_payer.commit_payment(Payment(DEPOSIT, pm.signature))  # 0x83 on a full drain


def test_public_api_reexports() -> None:
    import btcchannel

    for name in ("PayerChannel", "PayeeChannel", "ChannelParams", "Payment", "OutPoint", "ChannelState"):
        assert hasattr(btcchannel, name)
    assert PaymentSighash is not None


def test_close_at_most_caps_the_fee_at_what_the_payment_affords() -> None:
    payer, payee = open_pair()
    p = payer.sign_payment(1_000)
    payee.accept_payment(p.amount_sat, p.signature)
    tx, rate = payee.build_close_at_most(PAYEE_SCRIPT, 2.0)  # affordable: the rate as asked
    assert rate == 2.0 and tx.vout[1].nValue == 1_000 - math.ceil(2.0 * tx_vsize(tx))
    tx, rate = payee.build_close_at_most(PAYEE_SCRIPT, 50.0)  # not affordable: the most it can pay
    assert tx.vout[1].nValue == DUST and tx.vout[0].nValue == DEPOSIT - 1_000
    assert rate == (1_000 - DUST) / tx_vsize(tx) < 50.0


@given(
    old=st.one_of(st.none(), st.floats(0.5, 500)),
    requested=st.one_of(st.none(), st.floats(0.1, 1000)),
    factor=st.floats(1.0, 4.0),
    estimate=st.floats(0.0, 1000),
)
def test_bump_rate_always_raises_the_old_rate(
    old: float | None, requested: float | None, factor: float, estimate: float
) -> None:
    rate = bump_fee_rate(old, requested, factor, estimate)
    base = old or MIN_RELAY_FEE_RATE
    assert rate > base
    if requested is not None and requested > base:
        assert rate == requested
    if requested is None:
        assert rate >= max(base * factor, estimate)


# --- restore and verify_payment (no forced states) --------------------------------


def test_restore_mid_life_without_forcing_open() -> None:
    payer, payee = open_pair()
    pm = payer.sign_payment(200_000)
    params = payee.params
    for state in (ChannelState.FUNDING, ChannelState.OPEN, ChannelState.CLOSING, ChannelState.CLOSED):
        restored = PayeeChannel.restore(params, PAYEE_KEY, state, best=pm, close_margin_blocks=3)
        assert restored.state is state and restored.best == pm and restored.close_margin_blocks == 3
        restored_payer = PayerChannel.restore(params, PAYER_KEY, state, payment=pm)
        assert restored_payer.state is state and restored_payer.payment == pm
    closing = PayeeChannel.restore(params, PAYEE_KEY, ChannelState.CLOSING, best=pm)
    tx = closing.build_close(PAYEE_SCRIPT, 2.0)  # a closing channel builds (and re-builds) its close
    assert tx.vout[0].nValue == DEPOSIT - 200_000
    with pytest.raises(ChannelClosing):
        closing.accept_payment(pm.amount_sat, pm.signature)  # restoring is not accepting
    refunding = PayerChannel.restore(params, PAYER_KEY, ChannelState.CLOSING)
    assert refunding.build_refund(EXPIRY, 1.0).nLockTime == EXPIRY
    with pytest.raises(BadSignature):
        PayeeChannel.restore(params, PAYEE_KEY, ChannelState.CLOSING, best=Payment(200_001, pm.signature))
    with pytest.raises(BadSignature):
        PayerChannel.restore(params, PAYER_KEY, ChannelState.CLOSING, payment=Payment(200_001, pm.signature))
    with pytest.raises(BadRequest):
        PayeeChannel.restore(make_params(), PAYEE_KEY, ChannelState.PROPOSED, best=pm)  # no funding
    with pytest.raises(BadRequest):
        PayerChannel.restore(make_params(), PAYER_KEY, ChannelState.CLOSING)  # no funding


def test_verify_payment_checks_everything_but_state_and_stores_nothing() -> None:
    payer, payee = open_pair()
    first, second = payer.sign_payment(5_000), payer.sign_payment(7_000)
    assert payee.accept_payment(second.amount_sat, second.signature)
    payee.verify_payment(first.amount_sat, first.signature)  # below the best: still a valid payment
    payee.verify_payment(DEPOSIT, payer.sign_payment(DEPOSIT).signature)
    assert payee.best == second
    for bad_amount in (0, DEPOSIT - 1, DEPOSIT + 1, True):
        with pytest.raises(AmountOutOfRange):
            payee.verify_payment(bad_amount, first.signature)
    for bad_sig in (b"", first.signature[:-1] + b"\x82", first.signature[:-2] + b"\x83", second.signature):
        with pytest.raises(BadSignature):
            payee.verify_payment(first.amount_sat, bad_sig)
    payee.closing()
    payee.verify_payment(first.amount_sat, first.signature)  # any state
    payee.closed()
    payee.verify_payment(first.amount_sat, first.signature)
    with pytest.raises(BadSignature):
        payee.verify_payment(6_000, first.signature)
    assert payee.best == second
    unfunded = PayeeChannel(make_params(), PAYEE_KEY)
    with pytest.raises(NotOpen):
        unfunded.verify_payment(first.amount_sat, first.signature)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, DEPOSIT - DUST), st.integers(1, DEPOSIT - DUST))
def test_verify_payment_agrees_with_accept_payment(signed: int, claimed: int) -> None:
    payer, payee = open_pair()
    sig = payer.sign_payment(signed).signature
    try:
        payee.verify_payment(claimed, sig)
        verified = True
    except BadSignature:
        verified = False
    assert verified == (claimed == signed)
    if verified:
        assert payee.accept_payment(claimed, sig)
    else:
        with pytest.raises(BadSignature):
            payee.accept_payment(claimed, sig)


# --- check, store, commit ----------------------------------------------------------------


def test_check_payment_changes_nothing_and_says_what_to_store() -> None:
    payer, payee = open_pair()
    first, second = payer.sign_payment(5_000), payer.sign_payment(9_000)
    checked = payee.check_payment(first.amount_sat, first.signature, tip_height=EXPIRY - 7)
    assert checked == first
    assert payee.best is None and payee.state is ChannelState.OPEN  # checked, not kept
    assert payee.check_payment(first.amount_sat, first.signature) == first  # so it checks the same again
    assert payee.commit_payment(checked) and payee.best == first
    assert payee.check_payment(first.amount_sat, first.signature) is None  # exact retry: nothing to store
    with pytest.raises(StalePayment):
        payee.check_payment(first.amount_sat, payer.sign_payment(4_000).signature[:-1] + b"\x83")
    with pytest.raises(StalePayment):
        payee.check_payment(4_000, payer.sign_payment(4_000).signature)
    assert payee.check_payment(second.amount_sat, second.signature) == second and payee.best == first
    with pytest.raises(ChannelClosing):
        payee.check_payment(second.amount_sat, second.signature, tip_height=EXPIRY - 6)
    assert payee.best == first


def test_a_failed_durable_write_leaves_the_best_unchanged() -> None:
    payer, payee = open_pair()
    first, second = payer.sign_payment(5_000), payer.sign_payment(9_000)
    assert payee.accept_payment(first.amount_sat, first.signature)

    def store(payment: Payment) -> None:
        raise OSError("disk full")  # the durable write fails

    checked = payee.check_payment(second.amount_sat, second.signature)
    assert checked is not None
    with pytest.raises(OSError):
        store(checked)
        payee.commit_payment(checked)  # never reached
    assert payee.best == first and payee.amount_sat == 5_000
    # the payment is still new to the machine: its retry is checked (and stored) again, not taken as done
    assert payee.check_payment(second.amount_sat, second.signature) == second
    assert payee.build_close(PAYEE_SCRIPT, 2.0).vout[0].nValue == DEPOSIT - 5_000  # closes with what was stored


def test_commits_in_any_order_keep_the_highest() -> None:
    payer, payee = open_pair()
    low, high = payer.sign_payment(5_000), payer.sign_payment(9_000)
    checked = [payee.check_payment(p.amount_sat, p.signature) for p in (low, high)]  # both in flight
    assert checked == [low, high]
    assert payee.commit_payment(high) and not payee.commit_payment(low)  # stored both, committed late
    assert payee.best == high
    payee.closing()
    third = payer.sign_payment(9_500)
    assert payee.commit_payment(third)  # stored before the close was claimed
    payee.closed()
    with pytest.raises(ChannelClosed):
        payee.commit_payment(payer.sign_payment(9_900))
    assert payee.best == third


def test_the_machines_events_are_records_of_the_table() -> None:
    params = make_params()
    payee = PayeeChannel(params, PAYEE_KEY, channel_id="c1")
    seen = payee.funding_seen(FUNDING, 2, [["ab" * 32, 1]])
    assert (seen.channel_id, seen.old, seen.new) == ("c1", ChannelState.PROPOSED, ChannelState.FUNDING)
    assert payee.params.funding == FUNDING and seen.fields["funding_txid"] == FUNDING.txid
    with pytest.raises(IllegalTransition):
        payee.funding_seen(OutPoint("77" * 32, 0))  # checked before the params move
    assert payee.params.funding == FUNDING
    assert payee.funding_confirmed(3).new is ChannelState.OPEN
    record = payee.closing("operator", 5.0)
    assert record == Transition("c1", ChannelEvent.CLOSING, ChannelState.OPEN, ChannelState.CLOSING, record.fields)
    assert payee.close_uneconomic().new is ChannelState.CLOSING
    payer = PayerChannel(params, PAYER_KEY)
    assert payer.funding_broadcast(FUNDING).new is ChannelState.FUNDING and payer.params.funding == FUNDING
    assert payer.funding_confirmed().new is ChannelState.OPEN
    assert payer.refunded().new is ChannelState.REFUNDED
