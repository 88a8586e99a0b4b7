"""Unit and property tests of the service terms in btcchannel.core.channel: Capacity, Metering,
ProposalLimits (pure)."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from btcchannel.core.keys import public_key
from btcchannel.core.params import ChannelParams
from btcchannel.core.script import p2pkh_script, p2wpkh_script
from btcchannel.core.terms import Capacity, Metering, ProposalLimits, closing_height
from btcchannel.errors import (
    BadRequest,
    ChannelClosing,
    DepositOutOfRange,
    ExpiryOutOfRange,
    StalePayment,
    WrongAmount,
)

PAYER = public_key(hashlib.sha256(b"payer-key").digest())
PAYEE = public_key(hashlib.sha256(b"payee-key").digest())

sats = st.integers(min_value=0, max_value=2_100_000_000_000_000)
small = st.integers(min_value=0, max_value=1_000_000)
units_st = st.integers(min_value=1, max_value=1000)


def cap(deposit: int = 100_000, dust: int = 294) -> Capacity:
    return Capacity(deposit, deposit - dust)


# ----------------------------------------------------------------------------- Capacity


def test_capacity_of_params_follows_the_payer_dust_limit() -> None:
    for script, dust in ((p2wpkh_script(PAYER), 294), (p2pkh_script(bytes(20)), 546)):
        params = ChannelParams("regtest", PAYER, PAYEE, 1000, 50_000, script)
        assert params.capacity == Capacity(50_000, 50_000 - dust)
        assert params.capacity.carries(50_000 - dust) and params.capacity.carries(50_000)
        assert not params.capacity.carries(50_000 - dust + 1)
        assert not params.capacity.carries(50_001)


@given(
    deposit=st.integers(min_value=330, max_value=10**9),
    dust=st.integers(min_value=1, max_value=600),
    amount=st.integers(min_value=0, max_value=2 * 10**9),
)
def test_capacity_carries_the_whole_deposit_or_leaves_dust(deposit: int, dust: int, amount: int) -> None:
    c = Capacity(deposit, deposit - dust)
    assert c.carries(amount) == (amount == deposit or amount <= deposit - dust)


# ----------------------------------------------------------------------------- Metering: terms


def test_metering_validates_its_terms() -> None:
    with pytest.raises(BadRequest, match="mode must be 'prepay' or 'postpay'"):
        Metering(100, "later")
    with pytest.raises(BadRequest, match="price_sat must not be negative"):
        Metering(-1)
    with pytest.raises(BadRequest, match="credit_limit_sat must not be negative"):
        Metering(1, "postpay", -1)
    assert not Metering(0).enabled and Metering(1).enabled
    assert Metering(1, "postpay").settles_owed
    assert not Metering(0, "postpay").settles_owed and not Metering(1, "prepay").settles_owed
    assert Metering(7).cost(3) == 21


# ----------------------------------------------------------------------------- prepay


def test_prepay_amount_and_check() -> None:
    m = Metering(100)
    assert m.prepay_amount(1000) == 1100 and m.prepay_amount(1000, 3) == 1300
    m.check_prepay(1000, 1100)
    m.check_prepay(1000, 1300, 3)
    with pytest.raises(StalePayment, match=r"exactly 1100 sat \(current 1000\)") as stale:
        m.check_prepay(1000, 1000)
    assert stale.value.code == "stale_payment"
    with pytest.raises(StalePayment):
        m.check_prepay(1000, 5)
    with pytest.raises(WrongAmount) as wrong:
        m.check_prepay(1000, 1350)
    assert wrong.value.code == "wrong_amount"
    assert wrong.value.message == "expected exactly 1100 sat, got 1350; the channel is closing"


@given(price=st.integers(min_value=1, max_value=10**6), paid=small, amount=sats, units=units_st)
def test_check_prepay_accepts_exactly_the_prepay_amount(price: int, paid: int, amount: int, units: int) -> None:
    m = Metering(price)
    expected = m.prepay_amount(paid, units)
    try:
        m.check_prepay(paid, amount, units)
    except StalePayment:
        assert amount <= paid
    except WrongAmount:
        assert amount > paid and amount != expected
    else:
        assert amount == expected == paid + price * units


# ----------------------------------------------------------------------------- postpay


def test_owed_total_and_next_amount() -> None:
    assert Metering.owed_total(3000, 1000) == 3000
    assert Metering.owed_total(0, 1000) == 1000
    assert Metering(100, "prepay").next_amount(1000, 3000, 2) == 1200
    assert Metering(100, "postpay").next_amount(1000, 3000, 2) == 3000
    assert Metering(100, "postpay").next_amount(1000, 0) == 1000


def test_credit_within_limit_and_capacity() -> None:
    m = Metering(1000, "postpay", 3000)
    c = cap(100_000)
    assert m.credit(0, 0, 1, c) == 1000
    assert m.credit(2000, 0, 1, c) == 3000
    assert m.credit(3000, 0, 1, c) is None  # 4000 unpaid > 3000
    assert m.credit(12_000, 12_000, 3, c) == 15_000  # settled: credit again
    assert m.credit(0, 5000, 1, c) == 6000  # owed below paid counts from paid
    # the channel must carry the owed total: 99_706 fits, 99_707..99_999 would leave dust, 100_000 fits
    assert m.credit(98_706, 98_706, 1, c) == 99_706
    assert m.credit(98_707, 98_707, 1, c) is None
    assert m.credit(99_000, 99_000, 1, c) == 100_000
    assert m.credit(99_001, 99_001, 1, c) is None


def test_exceeds_credit() -> None:
    m = Metering(1000, "postpay", 3000)
    assert not m.exceeds_credit(2000, 0)
    assert m.exceeds_credit(3000, 0)
    assert m.exceeds_credit(2000, 0, 2)
    assert not m.exceeds_credit(12_000, 12_000, 3)


@given(
    price=st.integers(min_value=1, max_value=10**5),
    limit=small,
    owed=small,
    paid=small,
    units=units_st,
    deposit=st.integers(min_value=330, max_value=10**7),
    dust=st.integers(min_value=1, max_value=546),
)
def test_credit_matches_the_postpay_rule(
    price: int, limit: int, owed: int, paid: int, units: int, deposit: int, dust: int
) -> None:
    """new owed = max(owed, paid) + price*units; refused past the credit limit or past what the channel carries."""
    m = Metering(price, "postpay", limit)
    c = Capacity(deposit, deposit - dust)
    new_owed = max(owed, paid) + price * units
    refused = new_owed - paid > limit or not (new_owed == deposit or new_owed <= deposit - dust)
    assert m.credit(owed, paid, units, c) == (None if refused else new_owed)
    got = m.credit(owed, paid, units, c)
    if got is not None:
        assert got - paid <= limit and c.carries(got) and got > max(owed, paid)


def test_check_settlement() -> None:
    assert Metering.check_settlement(3000, 1000, 1000) is False  # exact retry of the paid total
    assert Metering.check_settlement(3000, 1000, 3000) is True
    with pytest.raises(StalePayment, match="amount below the current total 1000"):
        Metering.check_settlement(3000, 1000, 999)
    with pytest.raises(WrongAmount) as wrong:
        Metering.check_settlement(3000, 0, 2000)
    assert wrong.value.message == "owed total is 3000 sat, got 2000; the channel is closing"


@given(owed=small, paid=small, amount=small)
def test_check_settlement_accepts_only_the_owed_total(owed: int, paid: int, amount: int) -> None:
    try:
        new = Metering.check_settlement(owed, paid, amount)
    except StalePayment:
        assert amount < paid
    except WrongAmount:
        assert amount > paid and amount != owed
    else:
        assert (not new and amount == paid) or (new and amount == owed > paid)


# ----------------------------------------------------------------------------- units and end conditions


def test_check_units() -> None:
    Metering.check_units(2, 3)
    Metering.check_units(5, None, 100)
    with pytest.raises(ChannelClosing, match="the agreed unit count is reached"):
        Metering.check_units(3, 3)
    with pytest.raises(ChannelClosing):
        Metering.check_units(2, 3, 2)


def _end(
    m: Metering,
    *,
    units: int = 0,
    max_units: int | None = None,
    paid: int = 0,
    owed: int = 0,
    max_total: int | None = None,
    deposit: int = 100_000,
    c: Capacity | None = None,
) -> str | None:
    capacity = c or cap(deposit)
    return m.end_condition(
        units=units,
        max_units=max_units,
        paid_sat=paid,
        owed_sat=owed,
        max_total_sat=max_total,
        deposit_sat=deposit,
        capacity=lambda: capacity,
    )


def test_end_conditions() -> None:
    plain, pre, post = Metering(0), Metering(5000), Metering(1000, "postpay", 3000)
    assert _end(plain, paid=50_000) is None
    assert _end(pre, units=3, max_units=3, paid=15_000, owed=0) == "unit_count_reached"
    assert _end(post, units=3, max_units=3, paid=2000, owed=3000) is None  # served but not yet paid
    assert _end(post, units=3, max_units=3, paid=3000, owed=3000) == "unit_count_reached"
    assert _end(plain, paid=700, max_total=700) == "agreed_total_reached"
    assert _end(plain, paid=100_000) == "capacity_exhausted"
    # 20,000 deposit at 5,000 a unit: after 15,000 the 4th unit takes the whole deposit (fits)
    assert _end(pre, paid=15_000, deposit=20_000) is None
    # 98,000 + 5,000 > deposit: one more unit does not fit
    assert _end(pre, paid=98_000, units=19) == "capacity_exhausted"
    # ... unless a unit's price is still paid and not served: the surplus is the next request's credit
    assert _end(pre, paid=98_000, units=18) is None
    assert _end(pre, paid=100_000, units=19) is None and _end(pre, paid=100_000, units=20) == "capacity_exhausted"
    assert _end(pre, paid=10_000, units=0, max_total=10_000) is None  # paid ahead on /payments: served first
    assert _end(pre, paid=10_000, units=2, max_total=10_000) == "agreed_total_reached"
    # 94,707 + 5,000 = 99,707 would leave dust to the payer
    assert _end(pre, paid=94_707, units=18) == "capacity_exhausted"
    assert _end(pre, paid=94_706, units=18) is None
    assert _end(post, paid=94_707, owed=95_000) is None  # something is owed: let the payer settle first


def test_end_condition_asks_for_capacity_only_when_metered() -> None:
    def boom() -> Capacity:
        raise AssertionError("capacity needed")

    assert (
        Metering(0).end_condition(
            units=5, max_units=None, paid_sat=10, owed_sat=0, max_total_sat=None, deposit_sat=100, capacity=boom
        )
        is None
    )


@given(
    price=st.integers(min_value=0, max_value=10**4),
    units=st.integers(min_value=0, max_value=50),
    max_units=st.none() | st.integers(min_value=1, max_value=50),
    paid=small,
    owed=small,
    max_total=st.none() | st.integers(min_value=1, max_value=10**6),
    deposit=st.integers(min_value=330, max_value=10**6),
    dust=st.integers(min_value=1, max_value=329),
)
def test_end_condition_matches_the_agreed_rules(
    price: int, units: int, max_units: int | None, paid: int, owed: int, max_total: int | None, deposit: int, dust: int
) -> None:
    c = Capacity(deposit, deposit - dust)
    got = _end(
        Metering(price),
        units=units,
        max_units=max_units,
        paid=paid,
        owed=owed,
        max_total=max_total,
        deposit=deposit,
        c=c,
    )
    if max_units is not None and units >= max_units and owed <= paid:
        assert got == "unit_count_reached"
    elif price > 0 and paid - price * units >= price:  # prepay: a unit's price paid and not served yet
        assert got is None
    elif max_total is not None and paid >= max_total:
        assert got == "agreed_total_reached"
    elif paid >= deposit or (price > 0 and owed <= paid and not c.carries(paid + price)):
        assert got == "capacity_exhausted"
    else:
        assert got is None


# ----------------------------------------------------------------------------- proposals


def test_proposal_limits() -> None:
    limits = ProposalLimits(10_000, 100_000, 12, 4320)
    limits.check_proposal(10_000, 1012, 1000)
    limits.check_proposal(100_000, 5320, 1000)
    with pytest.raises(DepositOutOfRange) as dep:
        limits.check_proposal(9_999, 1012, 1000)
    assert dep.value.code == "deposit_out_of_range"
    assert dep.value.message == "deposit must be within [10000, 100000] sat"
    with pytest.raises(DepositOutOfRange):
        limits.check_proposal(100_001, 1012, 1000)
    with pytest.raises(ExpiryOutOfRange) as exp:
        limits.check_proposal(10_000, 1011, 1000)
    assert exp.value.code == "expiry_out_of_range"
    assert exp.value.message == "expiry_height must be within [1012, 5320] (tip 1000)"
    with pytest.raises(ExpiryOutOfRange):
        limits.check_proposal(10_000, 5321, 1000)
    # the deposit is checked first
    with pytest.raises(DepositOutOfRange):
        limits.check_proposal(1, 1, 1000)
    with pytest.raises(BadRequest, match="min_deposit_sat must not be negative"):
        ProposalLimits(-1, 0, 0, 0)
    with pytest.raises(BadRequest, match="max_deposit_sat must not be negative"):
        ProposalLimits(0, -1, 0, 0)


@given(
    deposit=st.integers(min_value=0, max_value=10**9),
    tip=st.integers(min_value=0, max_value=10**6),
    lifetime=st.integers(min_value=-10, max_value=10_000),
)
def test_proposal_limits_accept_exactly_the_ranges(deposit: int, tip: int, lifetime: int) -> None:
    limits = ProposalLimits(10_000, 100_000_000, 12, 4320)
    ok_deposit = 10_000 <= deposit <= 100_000_000
    ok_expiry = 12 <= lifetime <= 4320
    try:
        limits.check_proposal(deposit, tip + lifetime, tip)
    except DepositOutOfRange:
        assert not ok_deposit
    except ExpiryOutOfRange:
        assert ok_deposit and not ok_expiry
    else:
        assert ok_deposit and ok_expiry


def test_payment_overdue_only_when_owed_past_the_timeout() -> None:
    assert not Metering.payment_overdue(500, 500, 100.0, 1000.0, 30.0)  # nothing owed
    assert not Metering.payment_overdue(600, 500, None, 1000.0, 30.0)  # never owed
    assert not Metering.payment_overdue(600, 500, 990.0, 1000.0, 30.0)  # within the timeout
    assert Metering.payment_overdue(600, 500, 960.0, 1000.0, 30.0)


def test_closing_height_is_expiry_minus_margin() -> None:
    assert closing_height(500, 6) == 494
    assert closing_height(500, 0) == 500
