"""The agreed terms of a channel service, as values: what the payee accepts and how it meters.

:class:`ProposalLimits` (which deposits and expiries a payee accepts),
:class:`Capacity` (which cumulative amounts a channel can carry),
:class:`Metering` (a metered service: the prepay amount, postpay credit and
settlement, the agreed end conditions) and the close-fee rules
(:data:`MIN_RELAY_FEE_RATE`, :func:`bump_fee_rate`, :func:`closing_height`).
:class:`Terms` (the terms both sides agree at open: price, mode, credit limit, timeouts and the
end conditions) and :class:`PayerLimits` (what a payer accepts, and the most it will sign).
:func:`not_open_error` says why a channel in a given state takes no payment.
Pure: the service layers call these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Final

from btcchannel.core.state import TERMINAL_STATES, ChannelState
from btcchannel.errors import (
    AmountNotAgreed,
    BadRequest,
    ChannelClosed,
    ChannelClosing,
    ChannelError,
    DepositOutOfRange,
    ExpiryOutOfRange,
    NotOpen,
    StalePayment,
    TermsMismatch,
    TermsRefused,
    WrongAmount,
)

__all__ = [
    "Capacity",
    "MIN_RELAY_FEE_RATE",
    "bump_fee_rate",
    "closing_height",
    "not_open_error",
    "Metering",
    "METERING_MODES",
    "ProposalLimits",
    "PayerLimits",
    "Terms",
    "MAX_END_TIME",
    "MAX_TIMEOUT_MS",
]


@dataclass(frozen=True)
class Capacity:
    """Which cumulative amounts a channel can carry: up to ``deposit - dust(payer_script)``
    (``max_partial_sat``), or exactly the whole deposit (no payer output)."""

    deposit_sat: int
    max_partial_sat: int

    def carries(self, amount_sat: int) -> bool:
        """Whether a cumulative payment of ``amount_sat`` fits (the upper bounds of
        :func:`btcchannel.core.channel.check_payment_amount`)."""
        if amount_sat == self.deposit_sat:
            return True
        if amount_sat > self.deposit_sat:
            return False
        return amount_sat <= self.max_partial_sat


#: The lowest fee rate (sat/vB) a node relays by default: the floor of every close.
MIN_RELAY_FEE_RATE: Final = 1.0


def bump_fee_rate(old_rate: float | None, requested: float | None, factor: float, estimate: float) -> float:
    """The fee rate of a replacement close (RBF): the requested one, else ``factor`` times the old
    rate or the current estimate, whichever is higher; always at least 1 sat/vB above the old rate."""
    old = old_rate or MIN_RELAY_FEE_RATE
    rate = requested if requested is not None else max(old * factor, old + 1.0, estimate)
    return rate if rate > old else old + 1.0


def deadline_blocks(close_margin_blocks: int) -> int:
    """In this many last blocks before expiry an unconfirmed close is bumped every block, as high
    as the payment affords: half the close margin, at least 1."""
    return max(1, close_margin_blocks // 2)


def close_is_urgent(expiry_height: int, tip_height: int, close_margin_blocks: int) -> bool:
    """Whether a close at ``tip_height`` is in its deadline window (:func:`deadline_blocks`): the
    payer's refund becomes valid at ``expiry_height``, so the fee must rise now."""
    return expiry_height - tip_height <= deadline_blocks(close_margin_blocks)


def replacement_min_fee(replaced_fee_sat: int, vsize: int) -> int:
    """The least fee a transaction of ``vsize`` vbytes must pay to replace one paying
    ``replaced_fee_sat`` (BIP125): more than the replaced fee, plus the incremental relay fee
    (the relay floor) for its own size."""
    return replaced_fee_sat + math.ceil(MIN_RELAY_FEE_RATE * vsize) + 1


def not_open_error(state: ChannelState) -> ChannelError:
    """Why a channel in ``state`` takes no payment: ChannelClosing, ChannelClosed or NotOpen."""
    if state is ChannelState.CLOSING:
        return ChannelClosing("the channel is closing")
    if state in TERMINAL_STATES:
        return ChannelClosed(f"the channel is {state.value}")
    return NotOpen(f"the channel is {state.value}")


def closing_height(expiry_height: int, close_margin_blocks: int) -> int:
    """The height from which the payee refuses payments and must close: ``expiry - margin``."""
    return expiry_height - close_margin_blocks


@dataclass(frozen=True)
class ProposalLimits:
    """What a payee accepts in a channel proposal: the deposit range and the channel's lifetime."""

    min_deposit_sat: int
    max_deposit_sat: int
    min_lifetime_blocks: int
    max_lifetime_blocks: int

    def __post_init__(self) -> None:
        for name in ("min_deposit_sat", "max_deposit_sat"):
            if getattr(self, name) < 0:
                raise BadRequest(f"{name} must not be negative")

    def check_proposal(self, deposit_sat: int, expiry_height: int, tip_height: int) -> None:
        """DepositOutOfRange unless ``deposit_sat`` is within ``[min_deposit_sat, max_deposit_sat]``;
        ExpiryOutOfRange unless ``expiry_height`` is within ``tip + [min_lifetime, max_lifetime]``."""
        if not self.min_deposit_sat <= deposit_sat <= self.max_deposit_sat:
            raise DepositOutOfRange(f"deposit must be within [{self.min_deposit_sat}, {self.max_deposit_sat}] sat")
        lo, hi = tip_height + self.min_lifetime_blocks, tip_height + self.max_lifetime_blocks
        if not lo <= expiry_height <= hi:
            raise ExpiryOutOfRange(f"expiry_height must be within [{lo}, {hi}] (tip {tip_height})")


#: The metered service's modes: pay each unit before it is served, or pay the owed total after.
METERING_MODES: Final = ("prepay", "postpay")


@dataclass(frozen=True)
class Metering:
    """The amount rules of a metered service: ``price_sat`` per unit (0: nothing is metered).

    - prepay: each paid request carries a payment of exactly the previous total plus
      ``price_sat * units`` (:meth:`prepay_amount`, :meth:`check_prepay`);
    - postpay: units are served on credit while the owed total minus the paid total stays
      within ``credit_limit_sat`` and the channel can carry the owed total (:meth:`credit`);
      the payer then pays exactly the owed total (:meth:`check_settlement`).

    A signed payment of the wrong amount is answered with WrongAmount and ends the channel
    (the payee closes with the last correct payment). Amounts are cumulative totals in sat:
    ``paid_sat`` the best stored payment, ``owed_sat`` the owed total recorded so far.
    """

    price_sat: int
    mode: str = "prepay"
    credit_limit_sat: int = 0

    def __post_init__(self) -> None:
        if self.mode not in METERING_MODES:
            raise BadRequest("mode must be 'prepay' or 'postpay'")
        for name in ("price_sat", "credit_limit_sat"):
            if getattr(self, name) < 0:
                raise BadRequest(f"{name} must not be negative")

    @property
    def enabled(self) -> bool:
        """Whether units are sold at all (``price_sat > 0``)."""
        return self.price_sat > 0

    @property
    def settles_owed(self) -> bool:
        """Whether a plain payment must settle the owed total (metered and postpay)."""
        return self.price_sat > 0 and self.mode == "postpay"

    def cost(self, units: int = 1) -> int:
        """The price of ``units`` units."""
        return self.price_sat * units

    def prepay_amount(self, paid_sat: int, units: int = 1) -> int:
        """Prepay: the cumulative amount that pays for ``units`` more units."""
        return paid_sat + self.price_sat * units

    def check_prepay(self, paid_sat: int, amount_sat: int, units: int = 1) -> None:
        """Prepay: StalePayment unless ``amount_sat`` is above ``paid_sat``; WrongAmount unless it is
        exactly :meth:`prepay_amount` (the caller ends the channel once the signature checks out)."""
        expected = self.prepay_amount(paid_sat, units)
        if amount_sat <= paid_sat:
            raise StalePayment(f"a unit costs a payment of exactly {expected} sat (current {paid_sat})")
        if amount_sat != expected:
            raise WrongAmount(f"expected exactly {expected} sat, got {amount_sat}; the channel is closing")

    @staticmethod
    def owed_total(owed_sat: int, paid_sat: int) -> int:
        """The total the payer owes: the recorded owed total, or what it paid if that is more."""
        return max(owed_sat, paid_sat)

    def next_amount(self, paid_sat: int, owed_sat: int, units: int = 1) -> int:
        """The cumulative amount the payer should pay next: prepay, :meth:`prepay_amount`;
        postpay, :meth:`owed_total`."""
        if self.mode == "prepay":
            return self.prepay_amount(paid_sat, units)
        return self.owed_total(owed_sat, paid_sat)

    def exceeds_credit(self, owed_total_sat: int, paid_sat: int, units: int = 1) -> bool:
        """Postpay: whether ``units`` more units on top of ``owed_total_sat`` would leave more than
        ``credit_limit_sat`` unpaid."""
        return owed_total_sat + self.price_sat * units - paid_sat > self.credit_limit_sat

    def credit(self, owed_sat: int, paid_sat: int, units: int, capacity: Capacity) -> int | None:
        """Postpay: the new owed total after serving ``units`` more units on credit, or None if refused
        (past ``credit_limit_sat`` unpaid, or more than the channel can carry)."""
        owed_total = self.owed_total(owed_sat, paid_sat)
        if self.exceeds_credit(owed_total, paid_sat, units):
            return None
        new_owed = owed_total + self.price_sat * units
        if not capacity.carries(new_owed):
            return None
        return new_owed

    @staticmethod
    def check_settlement(owed_sat: int, paid_sat: int, amount_sat: int) -> bool:
        """Postpay: a payment must be exactly the owed total. False for an exact retry of the paid
        total, True for a payment settling ``owed_sat``; StalePayment below the paid total,
        WrongAmount for any other amount (the caller ends the channel once the signature checks out)."""
        if amount_sat == paid_sat:
            return False
        if amount_sat < paid_sat:
            raise StalePayment(f"amount below the current total {paid_sat}")
        if amount_sat != owed_sat:
            raise WrongAmount(f"owed total is {owed_sat} sat, got {amount_sat}; the channel is closing")
        return True

    @staticmethod
    def payment_overdue(
        owed_sat: int, paid_sat: int, owed_since: float | None, now: float, payment_timeout_s: float
    ) -> bool:
        """Postpay: whether an owed total has stayed unpaid for longer than the payment timeout."""
        return owed_since is not None and owed_sat > paid_sat and now - owed_since > payment_timeout_s

    @staticmethod
    def check_units(served_units: int, max_units: int | None, units: int = 1) -> None:
        """ChannelClosing if serving ``units`` more units would pass the agreed ``max_units``."""
        if max_units is not None and served_units + units > max_units:
            raise ChannelClosing("the agreed unit count is reached")

    def end_condition(
        self,
        *,
        units: int,
        max_units: int | None,
        paid_sat: int,
        owed_sat: int,
        max_total_sat: int | None,
        deposit_sat: int,
        capacity: Callable[[], Capacity],
    ) -> str | None:
        """The agreed end condition a channel has reached, if any (checked after each payment):
        ``unit_count_reached`` (all agreed units served and paid), ``agreed_total_reached``,
        ``capacity_exhausted`` (the deposit is paid, or, when metered and nothing is owed, the
        channel cannot carry one more unit). ``capacity`` is called only when needed.

        Prepay: while the paid total still holds a unit's price above what was served (the
        :meth:`surplus`, the credit of the next requests), the channel is not ended by its amounts:
        the agreed total and the exhausted deposit end it once that credit is spent."""
        if max_units is not None and units >= max_units and owed_sat <= paid_sat:
            return "unit_count_reached"
        price = self.price_sat
        if price > 0 and self.mode == "prepay" and self.surplus(paid_sat, units) >= price:
            return None
        if max_total_sat is not None and paid_sat >= max_total_sat:
            return "agreed_total_reached"
        if paid_sat >= deposit_sat:
            return "capacity_exhausted"
        if price > 0 and owed_sat <= paid_sat and not capacity().carries(paid_sat + price):
            return "capacity_exhausted"
        return None

    def surplus(self, paid_sat: int, units: int) -> int:
        """Prepay: the paid total above the price of the ``units`` served (a payment on
        ``/payments``, or units whose handler failed): the credit the next requests are served from."""
        return max(0, paid_sat - self.price_sat * units)


#: the latest agreed end time accepted (unix seconds, UTC; year 2106)
MAX_END_TIME: Final = 2**32 - 1
#: the longest payment or idle timeout accepted, in milliseconds (one year)
MAX_TIMEOUT_MS: Final = 365 * 24 * 3600 * 1000
_MAX_SAT: Final = 21_000_000 * 100_000_000

#: the terms the payee sets (must be exactly the payee's in a proposal)
PAYEE_TERMS: Final = ("price_sat", "mode", "credit_limit_sat", "payment_timeout_ms", "idle_timeout_ms")
#: the end conditions the payer proposes (each optional: null for none)
END_CONDITIONS: Final = ("max_total_sat", "max_units", "max_payments", "end_time")
#: every field of the wire form of :class:`Terms`, in order
TERMS_FIELDS: Final = PAYEE_TERMS + END_CONDITIONS


def _bounded(d: dict[str, object], name: str, lo: int, hi: int, optional: bool) -> int | None:
    """Field ``name`` of a terms object as an int in ``[lo, hi]`` (None allowed if ``optional``)."""
    v = d[name]
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise BadRequest(f"terms.{name} must be an integer in [{lo}, {hi}]" + (" or null" if optional else ""))
    return v


@dataclass(frozen=True)
class Terms:
    """The terms a channel is opened under, agreed by both sides and kept for its whole life.

    Set by the payee (``PAYEE_TERMS``): ``price_sat`` per unit (0: nothing metered), ``mode``,
    ``credit_limit_sat`` (postpay), ``payment_timeout_ms`` (postpay: time to pay what is owed)
    and ``idle_timeout_ms`` (prepay: an open channel without a payment for this long is closed;
    None: never). Proposed by the payer (``END_CONDITIONS``, None: none): the agreed total
    ``max_total_sat``, the unit count ``max_units``, the number of payments ``max_payments``
    and the end time ``end_time`` (unix seconds, UTC). Either side closes at the first one met.
    """

    price_sat: int = 0
    mode: str = "prepay"
    credit_limit_sat: int = 0
    payment_timeout_ms: int = 30_000
    idle_timeout_ms: int | None = None
    max_total_sat: int | None = None
    max_units: int | None = None
    max_payments: int | None = None
    end_time: int | None = None

    def __post_init__(self) -> None:
        self.metering  # noqa: B018 - validates price, mode and credit limit
        if not 1 <= self.payment_timeout_ms <= MAX_TIMEOUT_MS:
            raise BadRequest("payment_timeout_ms out of range")

    @property
    def metering(self) -> Metering:
        """The amount rules of these terms (price, mode, credit limit)."""
        return Metering(self.price_sat, self.mode, self.credit_limit_sat)

    def to_json(self) -> dict[str, int | str | None]:
        """The wire form: every field of ``TERMS_FIELDS`` (null for an absent end condition)."""
        return {name: getattr(self, name) for name in TERMS_FIELDS}

    @classmethod
    def from_json(cls, d: object) -> Terms:
        """Strictly parse the wire form: an object with exactly ``TERMS_FIELDS``, each bounded
        before it is used; BadRequest otherwise."""
        if not isinstance(d, dict) or set(d) != set(TERMS_FIELDS):
            raise BadRequest(f"terms must be an object with exactly the fields {', '.join(TERMS_FIELDS)}")
        mode = d["mode"]
        if mode not in METERING_MODES:
            raise BadRequest("terms.mode must be 'prepay' or 'postpay'")
        return cls(
            price_sat=_bounded(d, "price_sat", 0, _MAX_SAT, False) or 0,
            mode=str(mode),
            credit_limit_sat=_bounded(d, "credit_limit_sat", 0, _MAX_SAT, False) or 0,
            payment_timeout_ms=_bounded(d, "payment_timeout_ms", 1, MAX_TIMEOUT_MS, False) or 1,
            idle_timeout_ms=_bounded(d, "idle_timeout_ms", 1, MAX_TIMEOUT_MS, True),
            max_total_sat=_bounded(d, "max_total_sat", 1, _MAX_SAT, True),
            max_units=_bounded(d, "max_units", 1, 2**53, True),
            max_payments=_bounded(d, "max_payments", 1, 2**53, True),
            end_time=_bounded(d, "end_time", 1, MAX_END_TIME, True),
        )

    def required(self) -> Terms:
        """Only the payee's part (no end conditions): what ``GET /v1/info`` states."""
        return Terms(self.price_sat, self.mode, self.credit_limit_sat, self.payment_timeout_ms, self.idle_timeout_ms)

    def agree(self, proposed: Terms) -> Terms:
        """Payee side: the channel's terms for a proposal. ``TermsMismatch`` unless the proposal
        states exactly the payee's own terms (``self``); its end conditions are taken as proposed."""
        for name in PAYEE_TERMS:
            if getattr(proposed, name) != getattr(self, name):
                raise TermsMismatch(
                    f"terms.{name} must be {getattr(self, name)!r} (see /v1/info), got {getattr(proposed, name)!r}"
                )
        return proposed

    def with_end_conditions(self, **end: int | None) -> Terms:
        """These terms with the given end conditions (``END_CONDITIONS`` names) set."""
        bad = set(end) - set(END_CONDITIONS)
        if bad:
            raise ValueError(f"not end conditions: {sorted(bad)}")
        d = self.to_json()
        d.update(end)
        return Terms.from_json(d)

    def timed_end(
        self, *, owed_sat: int, paid_sat: int, owed_since: float | None, paid_at: float | None, now: float
    ) -> str | None:
        """The end condition that time alone has reached, if any (the payee checks it on every pass):
        ``payment_timeout`` (an owed total unpaid past ``payment_timeout_ms``), ``idle_timeout``
        (prepay: no payment for ``idle_timeout_ms`` since the last one), ``end_time_reached``."""
        if Metering.payment_overdue(owed_sat, paid_sat, owed_since, now, self.payment_timeout_ms / 1000):
            return "payment_timeout"
        if (
            self.mode == "prepay"
            and self.idle_timeout_ms is not None
            and paid_at is not None
            and now - paid_at > self.idle_timeout_ms / 1000
        ):
            return "idle_timeout"
        if self.end_time is not None and now >= self.end_time:
            return "end_time_reached"
        return None

    def max_signable(self, units_received: int, units_ahead: int = 0) -> int | None:
        """The highest cumulative total a payer may sign under these terms, having received
        ``units_received`` units and paying ahead for ``units_ahead`` more (prepay): at most
        ``price_sat`` times the units when metered, never above the agreed total. None: no bound."""
        caps = []
        if self.price_sat > 0:
            caps.append(self.price_sat * (units_received + units_ahead))
        if self.max_total_sat is not None:
            caps.append(self.max_total_sat)
        return min(caps) if caps else None

    def check_signable(
        self, amount_sat: int, *, units_received: int, units_ahead: int = 0, payments: int = 0, now: float | None = None
    ) -> None:
        """Payer side: ``AmountNotAgreed`` unless a payment of cumulative ``amount_sat`` is allowed:
        within :meth:`max_signable`, not past ``max_units`` (units received and paid ahead), ``max_payments``
        (``payments`` signed so far) nor
        past ``end_time`` (``now``, unix seconds)."""
        cap = self.max_signable(units_received, units_ahead)
        if cap is not None and amount_sat > cap:
            raise AmountNotAgreed(
                f"{amount_sat} sat is more than the agreed terms allow ({cap} sat: {units_received}"
                f"+{units_ahead} units at {self.price_sat} sat, agreed total {self.max_total_sat})"
            )
        if self.max_units is not None and units_received + units_ahead > self.max_units:
            raise AmountNotAgreed(f"the agreed unit count ({self.max_units}) is reached")
        if self.max_payments is not None and payments >= self.max_payments:
            raise AmountNotAgreed(f"the agreed number of payments ({self.max_payments}) is reached")
        if self.end_time is not None and now is not None and now >= self.end_time:
            raise AmountNotAgreed("the agreed end time has passed")


@dataclass(frozen=True)
class PayerLimits:
    """What a payer accepts: the highest price, the highest total it will ever pay (proposed as the
    agreed total), a credit limit cap, a mode, and the end conditions it proposes."""

    max_price_sat: int | None = None
    max_total_sat: int | None = None
    max_credit_limit_sat: int | None = None
    mode: str | None = None
    max_units: int | None = None
    max_payments: int | None = None
    end_time: int | None = None

    def accept(self, required: Terms) -> Terms:
        """The terms to propose for the payee's ``required`` ones: ``TermsRefused`` if they are outside
        these limits; the limits' end conditions are added."""
        if self.max_price_sat is not None and required.price_sat > self.max_price_sat:
            raise TermsRefused(f"the payee asks {required.price_sat} sat per unit, over the limit {self.max_price_sat}")
        if self.mode is not None and required.mode != self.mode:
            raise TermsRefused(f"the payee's mode is {required.mode}, not {self.mode}")
        if self.max_credit_limit_sat is not None and required.credit_limit_sat > self.max_credit_limit_sat:
            raise TermsRefused(
                f"the payee's credit limit {required.credit_limit_sat} sat is over {self.max_credit_limit_sat}"
            )
        return required.with_end_conditions(
            max_total_sat=self.max_total_sat,
            max_units=self.max_units,
            max_payments=self.max_payments,
            end_time=self.end_time,
        )
