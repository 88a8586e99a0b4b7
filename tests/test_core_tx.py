"""Unit and property tests of btcchannel.core.tx: BIP143 sighash, close/refund templates, vsize and fees.

The fast per-channel sighash and the general BIP143 code are cross-checked
against python-bitcoinlib's ``SignatureHash(..., sigversion=SIGVERSION_WITNESS_V0)``;
vsizes against python-bitcoinlib's serialisation (``calc_weight``).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import pytest
from bitcoin.core import CMutableTransaction, CMutableTxIn, CMutableTxOut, COutPoint, CTransaction, lx
from bitcoin.core.script import SIGVERSION_WITNESS_V0, CScript, SignatureHash
from hypothesis import given, settings
from hypothesis import strategies as st

from btcchannel.core.keys import public_key, sign_digest, verify_digest
from btcchannel.core.script import funding_witness_script, p2pkh_script, p2sh_script, p2wpkh_script
from btcchannel.core.tx import (
    ITERATIVE_SEQUENCE,
    REFUND_SEQUENCE,
    SIGHASH_ALL,
    SIGHASH_NONE_ACP,
    SIGHASH_SINGLE_ACP,
    CloseInput,
    OutPoint,
    PaymentSighash,
    bip143_sighash,
    build_close_tx,
    build_refund_tx,
    fee_for_vsize,
    iterative_tx,
    payment_sighash_type,
    tx_hex,
    tx_id,
    tx_vsize,
)
from btcchannel.errors import BadRequest, BadSignature, CloseUneconomic

PAYER_KEY = hashlib.sha256(b"payer").digest()
PAYEE_KEY = hashlib.sha256(b"payee").digest()
PAYER = public_key(PAYER_KEY)
PAYEE = public_key(PAYEE_KEY)
WS = funding_witness_script(PAYER, PAYEE, 1000)
PAYER_SCRIPT = p2wpkh_script(PAYER)
PAYEE_SCRIPT = p2wpkh_script(PAYEE)

scripts = st.one_of(
    st.binary(min_size=20, max_size=20).map(lambda h: b"\x00\x14" + h),
    st.binary(min_size=32, max_size=32).map(lambda h: b"\x00\x20" + h),
    st.binary(min_size=32, max_size=32).map(lambda h: b"\x51\x20" + h),
    st.binary(min_size=20, max_size=20).map(p2pkh_script),
    st.binary(min_size=20, max_size=20).map(p2sh_script),
)
outpoints = st.builds(OutPoint, st.binary(min_size=32, max_size=32).map(bytes.hex), st.integers(0, 2**32 - 1))


def _ref_sighash(tx: Any, index: int, script: bytes, amount: int, hashtype: int) -> bytes:
    return bytes(SignatureHash(CScript(script), tx, index, hashtype, amount=amount, sigversion=SIGVERSION_WITNESS_V0))


def _weight_vsize(tx: Any) -> int:
    return (int(tx.calc_weight()) + 3) // 4


def _payment(outpoint: OutPoint, deposit: int, amount: int, payer_script: bytes = PAYER_SCRIPT) -> bytes:
    digest = PaymentSighash(outpoint, WS, deposit, payer_script).digest(amount)
    return sign_digest(PAYER_KEY, digest) + bytes([payment_sighash_type(amount, deposit)])


# --- outpoints ------------------------------------------------------------------


def test_outpoint() -> None:
    txid = "ab" * 31 + "cd"
    op = OutPoint(txid, 7)
    assert op.serialize() == bytes.fromhex(txid)[::-1] + b"\x07\x00\x00\x00"
    assert op.to_coutpoint() == COutPoint(lx(txid), 7)
    assert OutPoint.from_json(op.to_json()) == op
    assert str(op) == f"{txid}:7"
    for bad_txid, bad_vout in (
        (txid.upper(), 0),
        (txid[:-2], 0),
        ("zz" * 32, 0),
        (txid, -1),
        (txid, 2**32),
        (txid, True),
    ):
        with pytest.raises(BadRequest):
            OutPoint(bad_txid, bad_vout)
    with pytest.raises(BadRequest):
        OutPoint.from_json({"txid": txid})


# --- sighash --------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(outpoints, st.integers(330, 21_000_000 * 10**8), st.data(), scripts)
def test_payment_sighash_matches_bitcoinlib(outpoint: OutPoint, deposit: int, data: Any, payer_script: bytes) -> None:
    amount = data.draw(st.one_of(st.integers(1, deposit), st.just(deposit)))
    fast = PaymentSighash(outpoint, WS, deposit, payer_script).digest(amount)
    template = iterative_tx(outpoint, deposit, amount, payer_script)
    hashtype = payment_sighash_type(amount, deposit)
    assert hashtype == (SIGHASH_NONE_ACP if amount == deposit else SIGHASH_SINGLE_ACP)
    assert fast == _ref_sighash(template, 0, WS, deposit, hashtype)
    assert fast == bip143_sighash(template, 0, WS, deposit, hashtype)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(outpoints, min_size=1, max_size=4),
    st.lists(st.tuples(st.integers(0, 10**9), scripts), min_size=0, max_size=4),
    st.sampled_from([0x01, 0x02, 0x03, 0x81, 0x82, 0x83]),
    st.data(),
)
def test_general_bip143_matches_bitcoinlib(
    ops: list[OutPoint], outs: list[tuple[int, bytes]], hashtype: int, data: Any
) -> None:
    seqs = data.draw(st.lists(st.integers(0, 2**32 - 1), min_size=len(ops), max_size=len(ops)))
    vin = [CMutableTxIn(o.to_coutpoint(), CScript(), s) for o, s in zip(ops, seqs)]
    vout = [CMutableTxOut(v, CScript(s)) for v, s in outs]
    tx = CTransaction.from_tx(
        CMutableTransaction(vin, vout, data.draw(st.integers(0, 2**31 - 1)), data.draw(st.sampled_from([1, 2])))
    )
    index = data.draw(st.integers(0, len(ops) - 1))
    amount = data.draw(st.integers(0, 10**15))
    assert bip143_sighash(tx, index, WS, amount, hashtype) == _ref_sighash(tx, index, WS, amount, hashtype)


def test_iterative_template_shape() -> None:
    op = OutPoint("11" * 32, 1)
    tx = iterative_tx(op, 100_000, 1_000, PAYER_SCRIPT)
    assert tx.nVersion == 2 and tx.nLockTime == 0
    assert len(tx.vin) == 1 and tx.vin[0].nSequence == ITERATIVE_SEQUENCE == 0xFFFFFFFD
    assert tx.vin[0].prevout == op.to_coutpoint()
    assert [(o.nValue, bytes(o.scriptPubKey)) for o in tx.vout] == [(99_000, PAYER_SCRIPT)]
    assert iterative_tx(op, 100_000, 100_000, PAYER_SCRIPT).vout == ()


# --- close ----------------------------------------------------------------------


def _check_close(tx: Any, inputs: list[CloseInput], payee_script: bytes, rate: float, min_fee: int = 0) -> None:
    assert tx.nVersion == 2 and tx.nLockTime == 0
    partial = [i for i in inputs if not i.full_drain]
    ordered = partial + [i for i in inputs if i.full_drain]
    assert [txin.prevout for txin in tx.vin] == [i.outpoint.to_coutpoint() for i in ordered]
    assert all(txin.nSequence == ITERATIVE_SEQUENCE for txin in tx.vin)
    # vsize exact, fee exact
    vsize = tx_vsize(tx)
    assert vsize == _weight_vsize(tx)
    fee = max(min_fee, math.ceil(rate * vsize - 1e-9))
    assert len(tx.vout) == len(partial) + 1
    for k, inp in enumerate(partial):
        assert (tx.vout[k].nValue, bytes(tx.vout[k].scriptPubKey)) == (inp.change_sat, inp.payer_script)
    assert bytes(tx.vout[-1].scriptPubKey) == payee_script
    assert tx.vout[-1].nValue == sum(i.amount_sat for i in inputs) - fee
    assert sum(i.deposit_sat for i in inputs) - sum(o.nValue for o in tx.vout) == fee
    # every signature verifies against python-bitcoinlib's sighash of the final transaction
    for index, inp in enumerate(ordered):
        stack = list(tx.wit.vtxinwit[index].scriptWitness.stack)
        assert stack[2:] == [b"\x01", inp.witness_script]
        payer_sig, payee_sig = stack[0], stack[1]
        assert payer_sig == inp.payer_signature
        assert payee_sig[-1] == SIGHASH_ALL and len(payee_sig) == 71
        ws = inp.witness_script
        pay_digest = _ref_sighash(tx, index, ws, inp.deposit_sat, payer_sig[-1])
        assert verify_digest(PAYER, payer_sig[:-1], pay_digest)
        all_digest = _ref_sighash(tx, index, ws, inp.deposit_sat, SIGHASH_ALL)
        assert verify_digest(PAYEE, payee_sig[:-1], all_digest)


def _close_input(outpoint: OutPoint, deposit: int, amount: int, payer_script: bytes = PAYER_SCRIPT) -> CloseInput:
    return CloseInput(
        outpoint, deposit, WS, payer_script, amount, _payment(outpoint, deposit, amount, payer_script), PAYEE_KEY
    )


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(outpoints, st.integers(10_000, 10**8), st.floats(0.01, 1.0), st.booleans(), scripts),
        min_size=1,
        max_size=3,
        unique_by=lambda t: t[0],
    ),
    st.sampled_from([1.0, 1.1, 2.5, 7.77, 25.0]),
    scripts,
)
def test_close_property(
    specs: list[tuple[OutPoint, int, float, bool, bytes]], rate: float, payee_script: bytes
) -> None:
    inputs = []
    for outpoint, deposit, fraction, drain, payer_script in specs:
        amount = deposit if drain else max(1, min(deposit - 546, int(deposit * fraction)))
        inputs.append(_close_input(outpoint, deposit, amount, payer_script))
    try:
        tx = build_close_tx(inputs, payee_script, rate)
    except CloseUneconomic:
        assert sum(i.amount_sat for i in inputs) < 10_000
        return
    _check_close(tx, inputs, payee_script, rate)


def test_two_channel_close_mixed_order() -> None:
    a = _close_input(OutPoint("aa" * 32, 0), 200_000, 200_000)  # full drain first in the argument list
    b = _close_input(OutPoint("bb" * 32, 3), 100_000, 40_000)
    c = _close_input(OutPoint("cc" * 32, 1), 50_000, 10_000, p2pkh_script(b"\x05" * 20))
    tx = build_close_tx([a, b, c], PAYEE_SCRIPT, 3.0)
    _check_close(tx, [a, b, c], PAYEE_SCRIPT, 3.0)
    assert [txin.prevout.n for txin in tx.vin] == [3, 1, 0]


def test_close_rbf_and_min_fee() -> None:
    inp = _close_input(OutPoint("dd" * 32, 0), 100_000, 60_000)
    low = build_close_tx([inp], PAYEE_SCRIPT, 1.0)
    high = build_close_tx([inp], PAYEE_SCRIPT, 20.0)
    assert tx_vsize(low) == tx_vsize(high)
    assert high.vout[-1].nValue == 60_000 - 20 * tx_vsize(high)
    assert low.vout[0] == high.vout[0]  # the payer's change is untouched
    floor = build_close_tx([inp], PAYEE_SCRIPT, 1.0, min_fee_sat=5_000)
    assert floor.vout[-1].nValue == 55_000
    _check_close(floor, [inp], PAYEE_SCRIPT, 1.0, 5_000)
    assert tx_id(low) != tx_id(high) and tx_hex(low).startswith("02000000000101")


def test_close_uneconomic_and_errors() -> None:
    op = OutPoint("ee" * 32, 0)
    small = _close_input(op, 100_000, 400)
    with pytest.raises(CloseUneconomic):
        build_close_tx([small], PAYEE_SCRIPT, 1.0)  # 400 - ~170 fee < 294
    with pytest.raises(CloseUneconomic):
        build_close_tx([_close_input(op, 100_000, 5_000)], PAYEE_SCRIPT, 100.0)
    with pytest.raises(BadRequest):
        build_close_tx([], PAYEE_SCRIPT, 1.0)
    good = _close_input(op, 100_000, 50_000)
    with pytest.raises(BadRequest):
        build_close_tx([good, good], PAYEE_SCRIPT, 1.0)
    with pytest.raises(BadRequest):
        build_close_tx([good], PAYEE_SCRIPT, -1.0)
    wrong_type = CloseInput(op, 100_000, WS, PAYER_SCRIPT, 50_000, good.payer_signature[:-1] + b"\x82", PAYEE_KEY)
    with pytest.raises(BadSignature):
        build_close_tx([wrong_type], PAYEE_SCRIPT, 1.0)


# --- refund ---------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(outpoints, st.integers(10_000, 10**9), st.sampled_from([1.0, 1.5, 3.3, 50.0]), scripts)
def test_refund(outpoint: OutPoint, deposit: int, rate: float, dest: bytes) -> None:
    tx = build_refund_tx(outpoint, deposit, WS, 1000, PAYER_KEY, dest, rate)
    assert tx.nVersion == 2 and tx.nLockTime == 1000
    assert len(tx.vin) == 1 and tx.vin[0].nSequence == REFUND_SEQUENCE == 0xFFFFFFFD
    vsize = tx_vsize(tx)
    assert vsize == _weight_vsize(tx)
    assert len(tx.vout) == 1 and bytes(tx.vout[0].scriptPubKey) == dest
    assert tx.vout[0].nValue == deposit - math.ceil(rate * vsize - 1e-9)
    sig, empty, script = tx.wit.vtxinwit[0].scriptWitness.stack
    assert empty == b"" and script == WS and sig[-1] == SIGHASH_ALL
    assert verify_digest(PAYER, sig[:-1], _ref_sighash(tx, 0, WS, deposit, SIGHASH_ALL))


def test_refund_uneconomic() -> None:
    with pytest.raises(CloseUneconomic):
        build_refund_tx(OutPoint("ff" * 32, 0), 600, WS, 1000, PAYER_KEY, PAYER_SCRIPT, 5.0)


# --- fees -----------------------------------------------------------------------


def test_fee_for_vsize() -> None:
    assert fee_for_vsize(1.1, 100) == 110
    assert fee_for_vsize(1, 141) == 141
    assert fee_for_vsize(0.5, 3) == 2
    assert fee_for_vsize(0, 500) == 0
    assert fee_for_vsize(2.25, 4) == 9
    for bad in (-0.1, float("nan"), float("inf"), True, "1"):
        with pytest.raises(BadRequest):
            fee_for_vsize(bad, 100)  # type: ignore[arg-type]


def _varint_len(n: int) -> int:
    return 1 if n < 0xFD else 3


def test_vsize_from_first_principles() -> None:
    """The close's vsize recomputed by hand from its parts equals tx_vsize and bitcoinlib's weight."""
    a = _close_input(OutPoint("a1" * 32, 0), 100_000, 30_000)
    b = _close_input(OutPoint("b2" * 32, 0), 80_000, 80_000)
    tx = build_close_tx([a, b], PAYEE_SCRIPT, 1.0)
    outs = [a.payer_script, PAYEE_SCRIPT]
    base = 4 + 1 + 2 * (36 + 1 + 4) + 1 + sum(8 + _varint_len(len(s)) + len(s) for s in outs) + 4
    witness = 2 + sum(
        1 + (1 + len(i.payer_signature)) + (1 + 71) + (1 + 1) + (_varint_len(len(WS)) + len(WS)) for i in (a, b)
    )
    weight = 4 * base + witness
    assert tx.calc_weight() == weight
    assert tx_vsize(tx) == (weight + 3) // 4
    refund = build_refund_tx(OutPoint("c3" * 32, 0), 50_000, WS, 1000, PAYER_KEY, PAYER_SCRIPT, 1.0)
    base = 4 + 1 + 41 + 1 + (8 + 1 + len(PAYER_SCRIPT)) + 4
    witness = 2 + 1 + (1 + 71) + 1 + (1 + len(WS))
    assert tx_vsize(refund) == (4 * base + witness + 3) // 4
