"""The agreed terms as pure values: strict wire form, the payee's agreement, the payer's limits and
the most a payer may sign."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from btcchannel.core.terms import TERMS_FIELDS, PayerLimits, Terms
from btcchannel.errors import AmountNotAgreed, BadRequest, TermsMismatch, TermsRefused


def test_wire_form_round_trips_and_is_strict() -> None:
    t = Terms(100, "postpay", 500, 7_000, None, 10_000, 50, 20, 2_000_000_000)
    assert list(t.to_json()) == list(TERMS_FIELDS) and Terms.from_json(t.to_json()) == t
    for bad in (
        {**t.to_json(), "price_sat": -1},
        {**t.to_json(), "mode": "free"},
        {**t.to_json(), "x": 1},
        {**t.to_json(), "max_units": 0},
        {**t.to_json(), "end_time": 2**32},
        {**t.to_json(), "price_sat": 1.0},
        {**t.to_json(), "payment_timeout_ms": None},
        {**t.to_json(), "credit_limit_sat": False},
        [],
        None,
    ):
        with pytest.raises(BadRequest):
            Terms.from_json(bad)


def test_payee_agrees_only_to_its_own_terms_and_payer_refuses_outside_its_limits() -> None:
    mine = Terms(100, "prepay", 0, 30_000, 60_000)
    proposed = PayerLimits(max_price_sat=100, max_total_sat=5_000, end_time=2_000_000_000).accept(mine)
    assert mine.agree(proposed) == proposed and proposed.required() == mine
    with pytest.raises(TermsMismatch):
        mine.agree(Terms(99, "prepay", 0, 30_000, 60_000))
    for limits in (PayerLimits(max_price_sat=99), PayerLimits(mode="postpay"), PayerLimits(max_credit_limit_sat=-1)):
        with pytest.raises(TermsRefused):
            limits.accept(mine)


@given(
    price=st.integers(1, 10_000),
    units=st.integers(0, 1_000),
    ahead=st.integers(0, 3),
    total=st.none() | st.integers(1, 10**7),
    amount=st.integers(1, 2 * 10**7),
)
def test_payer_never_signs_above_units_times_price_nor_the_agreed_total(
    price: int,
    units: int,
    ahead: int,
    total: int | None,
    amount: int,
) -> None:
    t = Terms(price, max_total_sat=total)
    allowed = amount <= price * (units + ahead) and (total is None or amount <= total)
    if allowed:
        t.check_signable(amount, units_received=units, units_ahead=ahead)
    else:
        with pytest.raises(AmountNotAgreed):
            t.check_signable(amount, units_received=units, units_ahead=ahead)


def test_counts_and_time_end_what_a_payer_signs_and_what_the_payee_waits_for() -> None:
    t = Terms(0, max_payments=2, max_units=None, end_time=1_000, idle_timeout_ms=500)
    t.check_signable(10, units_received=0, payments=1, now=999)
    with pytest.raises(AmountNotAgreed):
        t.check_signable(10, units_received=0, payments=2, now=999)
    with pytest.raises(AmountNotAgreed):
        t.check_signable(10, units_received=0, payments=0, now=1_000)
    with pytest.raises(AmountNotAgreed):
        Terms(5, max_units=2).check_signable(10, units_received=2, units_ahead=1)
    assert t.timed_end(owed_sat=0, paid_sat=0, owed_since=None, paid_at=100.0, now=100.4) is None
    assert t.timed_end(owed_sat=0, paid_sat=0, owed_since=None, paid_at=100.0, now=100.6) == "idle_timeout"
    assert t.timed_end(owed_sat=0, paid_sat=0, owed_since=None, paid_at=None, now=1_000) == "end_time_reached"
    post = Terms(5, "postpay", 50, payment_timeout_ms=1_000)
    assert post.timed_end(owed_sat=10, paid_sat=5, owed_since=10.0, paid_at=None, now=11.5) == "payment_timeout"
    assert post.timed_end(owed_sat=10, paid_sat=10, owed_since=10.0, paid_at=None, now=99.0) is None
