"""The two pure channel state machines, :class:`PayerChannel` and :class:`PayeeChannel`.

Every rule of a channel lives here: amount ranges, monotonic payments,
signature checks, expiry margins, which events each state allows. Nothing
here does I/O; callers persist state (``ChannelParams.to_json``,
``Payment.to_json``, the ``state`` and the best payment) and feed chain events
in.

States (both sides)::

    proposed --funding--> funding --funding_confirmed--> open --closing--> closing
    open/closing --closed--> closed        open/closing --refunded--> refunded
    proposed/funding/open/closing --failed--> failed

The table is :data:`TRANSITIONS`; any other event raises IllegalTransition.

The payee's service terms are rules too, and live here as values:
:class:`ProposalLimits` (which deposits and expiries a payee accepts),
:class:`Capacity` (which cumulative amounts a channel can carry) and
:class:`Metering` (a metered service: the prepay amount, postpay credit and
settlement, the agreed end conditions). The service layers call them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from functools import cached_property
from types import MappingProxyType
from typing import Any, Callable, Final, Mapping, Sequence

from btcchannel.errors import (
    AmountOutOfRange,
    BadPubkey,
    BadRequest,
    BadSignature,
    ChannelClosed,
    ChannelClosing,
    ChannelError,
    CloseUneconomic,
    DepositOutOfRange,
    ExpiryOutOfRange,
    IllegalTransition,
    NotExpired,
    NotOpen,
    StalePayment,
    WrongAmount,
)
from btcchannel.core.keys import (
    HALF_ORDER,
    Verifier,
    check_private_key,
    check_public_key,
    close_request_digest,
    is_valid_signature_encoding,
    public_key,
    sign_digest,
)
from btcchannel.core.script import (
    check_network,
    check_payout_script,
    dust_limit,
    funding_witness_script,
    p2wsh_script,
    script_to_address,
)
from btcchannel.core.tx import (
    MAX_MONEY,
    SIGHASH_NONE_ACP,
    SIGHASH_SINGLE_ACP,
    CloseInput,
    OutPoint,
    PaymentSighash,
    build_close_tx,
    build_refund_tx,
    tx_vsize,
)

__all__ = [
    "ChannelState",
    "TRANSITIONS",
    "TERMINAL_STATES",
    "next_state",
    "ChannelParams",
    "Payment",
    "PayerChannel",
    "PayeeChannel",
    "check_payment_amount",
    "build_multi_close",
    "Capacity",
    "MIN_RELAY_FEE_RATE",
    "bump_fee_rate",
    "closing_height",
    "not_open_error",
    "Metering",
    "METERING_MODES",
    "ProposalLimits",
]


class ChannelState(str, enum.Enum):
    """Where a channel is in its life."""

    PROPOSED = "proposed"
    FUNDING = "funding"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"
    REFUNDED = "refunded"
    FAILED = "failed"


_S = ChannelState
TERMINAL_STATES: Final = frozenset({_S.CLOSED, _S.REFUNDED, _S.FAILED})

#: (state, event) -> next state. Events: funding, funding_confirmed, closing, closed, refunded, failed.
TRANSITIONS: Final[Mapping[tuple[ChannelState, str], ChannelState]] = MappingProxyType(
    {
        (_S.PROPOSED, "funding"): _S.FUNDING,
        (_S.FUNDING, "funding_confirmed"): _S.OPEN,
        (_S.OPEN, "closing"): _S.CLOSING,
        (_S.OPEN, "closed"): _S.CLOSED,
        (_S.CLOSING, "closed"): _S.CLOSED,
        (_S.OPEN, "refunded"): _S.REFUNDED,
        (_S.CLOSING, "refunded"): _S.REFUNDED,
        (_S.PROPOSED, "failed"): _S.FAILED,
        (_S.FUNDING, "failed"): _S.FAILED,
        (_S.OPEN, "failed"): _S.FAILED,
        (_S.CLOSING, "failed"): _S.FAILED,
    }
)


def next_state(state: ChannelState, event: str) -> ChannelState:
    """The state after ``event`` in ``state``; IllegalTransition if the table has no such edge."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(f"event {event!r} is not allowed in state {state.value!r}") from None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class ChannelParams:
    """What both sides agree on; fixed for the channel's life (``funding`` is set once broadcast)."""

    network: str
    payer_pubkey: bytes
    payee_pubkey: bytes
    expiry_height: int
    deposit_sat: int
    payer_script: bytes
    funding: OutPoint | None = None

    def __post_init__(self) -> None:
        check_network(self.network)
        check_public_key(self.payer_pubkey)
        check_public_key(self.payee_pubkey)
        if self.payer_pubkey == self.payee_pubkey:
            raise BadPubkey("payer and payee keys must differ")
        check_payout_script(self.payer_script)
        self.witness_script  # noqa: B018 - validates the expiry (ExpiryOutOfRange)
        if not _is_int(self.deposit_sat) or not dust_limit(self.funding_script) <= self.deposit_sat <= MAX_MONEY:
            raise DepositOutOfRange(f"deposit must be an integer in [330, {MAX_MONEY}] sat")
        if self.funding is not None and not isinstance(self.funding, OutPoint):
            raise BadRequest("funding must be an OutPoint")

    @cached_property
    def witness_script(self) -> bytes:
        """The channel's witness script (ExpiryOutOfRange for a non-height expiry)."""
        return funding_witness_script(self.payer_pubkey, self.payee_pubkey, self.expiry_height)

    @cached_property
    def funding_script(self) -> bytes:
        """The P2WSH scriptPubKey the deposit is paid to."""
        return p2wsh_script(self.witness_script)

    @cached_property
    def funding_address(self) -> str:
        """The bech32 address of :attr:`funding_script` on :attr:`network`."""
        return script_to_address(self.funding_script, self.network)

    @cached_property
    def max_partial_amount(self) -> int:
        """The largest amount short of the whole deposit (change exactly the payer's dust limit)."""
        return self.deposit_sat - dust_limit(self.payer_script)

    @cached_property
    def capacity(self) -> Capacity:
        """The cumulative amounts this channel can carry."""
        return Capacity(self.deposit_sat, self.max_partial_amount)

    def with_funding(self, outpoint: OutPoint) -> ChannelParams:
        """A copy with the funding outpoint set."""
        if not isinstance(outpoint, OutPoint):
            raise BadRequest("funding must be an OutPoint")
        return replace(self, funding=outpoint)

    def sighash(self) -> PaymentSighash:
        """The precomputed payment sighash; NotOpen while the funding outpoint is unknown."""
        if self.funding is None:
            raise NotOpen("the funding outpoint is not known yet")
        return PaymentSighash(self.funding, self.witness_script, self.deposit_sat, self.payer_script)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (hex strings) for storage."""
        return {
            "network": self.network,
            "payer_pubkey": self.payer_pubkey.hex(),
            "payee_pubkey": self.payee_pubkey.hex(),
            "expiry_height": self.expiry_height,
            "deposit_sat": self.deposit_sat,
            "payer_script": self.payer_script.hex(),
            "funding": None if self.funding is None else self.funding.to_json(),
        }

    @classmethod
    def from_json(cls, d: Any) -> ChannelParams:
        """Inverse of :meth:`to_json`; BadRequest (or a more specific error) when malformed."""
        keys = {"network", "payer_pubkey", "payee_pubkey", "expiry_height", "deposit_sat", "payer_script"}
        if not isinstance(d, dict) or not keys <= set(d) or not set(d) <= keys | {"funding"}:
            raise BadRequest("malformed channel parameters")
        try:
            payer = bytes.fromhex(d["payer_pubkey"])
            payee = bytes.fromhex(d["payee_pubkey"])
            payer_script = bytes.fromhex(d["payer_script"])
        except (TypeError, ValueError):
            raise BadRequest("malformed hex in channel parameters") from None
        funding = d.get("funding")
        return cls(
            network=d["network"],
            payer_pubkey=payer,
            payee_pubkey=payee,
            expiry_height=d["expiry_height"],
            deposit_sat=d["deposit_sat"],
            payer_script=payer_script,
            funding=None if funding is None else OutPoint.from_json(funding),
        )


@dataclass(frozen=True)
class Payment:
    """One payment: the cumulative amount and the payer's signature (DER + sighash byte)."""

    amount_sat: int
    signature: bytes

    @property
    def sighash_type(self) -> int:
        """The signature's trailing sighash byte."""
        return self.signature[-1]

    def to_json(self) -> dict[str, Any]:
        """``{"amount_sat": int, "signature": hex}`` (the wire form of a payment)."""
        return {"amount_sat": self.amount_sat, "signature": self.signature.hex()}

    @classmethod
    def from_json(cls, d: Any) -> Payment:
        """Inverse of :meth:`to_json`; BadRequest when malformed."""
        if not isinstance(d, dict) or set(d) != {"amount_sat", "signature"} or not _is_int(d["amount_sat"]):
            raise BadRequest("payment must be {amount_sat: int, signature: hex}")
        try:
            return cls(d["amount_sat"], bytes.fromhex(d["signature"]))
        except (TypeError, ValueError):
            raise BadRequest("payment signature must be hex") from None


def check_payment_amount(params: ChannelParams, amount_sat: int) -> None:
    """AmountOutOfRange unless ``amount_sat`` is in ``[1, deposit - dust(payer_script)]`` or the deposit."""
    if not _is_int(amount_sat) or amount_sat <= 0 or amount_sat > params.deposit_sat:
        raise AmountOutOfRange(f"amount must be an integer in [1, {params.deposit_sat}]")
    if params.max_partial_amount < amount_sat < params.deposit_sat:
        raise AmountOutOfRange(
            f"the payer's change would be below its dust limit: pay at most {params.max_partial_amount} "
            f"or the whole deposit {params.deposit_sat}"
        )


@dataclass(frozen=True)
class Capacity:
    """Which cumulative amounts a channel can carry: up to ``deposit - dust(payer_script)``
    (``max_partial_sat``), or exactly the whole deposit (no payer output)."""

    deposit_sat: int
    max_partial_sat: int

    def carries(self, amount_sat: int) -> bool:
        """Whether a cumulative payment of ``amount_sat`` fits (the upper bounds of :func:`check_payment_amount`)."""
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


def not_open_error(state: ChannelState) -> ChannelError:
    """Why a channel in ``state`` takes no payment: ChannelClosing, ChannelClosed or NotOpen."""
    if state is ChannelState.CLOSING:
        return ChannelClosing("the channel is closing")
    if state in TERMINAL_STATES:
        return ChannelClosed(f"the channel is {state.value}")
    return NotOpen(f"the channel is {state.value}")


def _require_open(state: ChannelState) -> None:
    if state is not ChannelState.OPEN:
        raise not_open_error(state)


class _Machine:
    """State bookkeeping shared by both sides."""

    params: ChannelParams
    state: ChannelState

    def _fire(self, event: str) -> None:
        self.state = next_state(self.state, event)

    def _check_state_has_funding(self) -> None:
        if self.state not in (ChannelState.PROPOSED, ChannelState.FAILED) and self.params.funding is None:
            raise BadRequest(f"a channel in state {self.state.value!r} needs its funding outpoint")

    def closing(self) -> None:
        """A close (or refund) has been broadcast: open -> closing."""
        self._fire("closing")

    def closed(self) -> None:
        """A close confirmed: open/closing -> closed."""
        self._fire("closed")

    def refunded(self) -> None:
        """The payer's refund confirmed: open/closing -> refunded."""
        self._fire("refunded")

    def failed(self) -> None:
        """Give up on the channel (lapsed proposal, funding mismatch, conflicting spend...)."""
        self._fire("failed")


class PayerChannel(_Machine):
    """The payer's side: signs cumulative payments, asks for the close, builds the refund."""

    def __init__(
        self,
        params: ChannelParams,
        privkey: bytes,
        state: ChannelState = ChannelState.PROPOSED,
        payment: Payment | None = None,
    ) -> None:
        check_private_key(privkey)
        if public_key(privkey) != params.payer_pubkey:
            raise BadPubkey("the private key does not match payer_pubkey")
        self.params = params
        self.privkey = privkey
        self.state = ChannelState(state)
        self._check_state_has_funding()
        self._sighash: PaymentSighash | None = None
        self.payment: Payment | None = None
        if payment is not None:
            check_payment_amount(params, payment.amount_sat)
            if not Verifier(params.payer_pubkey).verify(
                payment.signature[:-1], self._hasher().digest(payment.amount_sat)
            ) or payment.signature[-1] != _sighash_byte(params, payment.amount_sat):
                raise BadSignature("the stored payment's signature does not verify")
            self.payment = payment

    @property
    def amount_sat(self) -> int:
        """The cumulative amount paid so far (0 before the first payment)."""
        return 0 if self.payment is None else self.payment.amount_sat

    def _hasher(self) -> PaymentSighash:
        if self._sighash is None:
            self._sighash = self.params.sighash()
        return self._sighash

    def funding_broadcast(self, outpoint: OutPoint) -> None:
        """The funding transaction is out: proposed -> funding; the params gain the outpoint."""
        new_state = next_state(self.state, "funding")
        self.params = self.params.with_funding(outpoint)
        self._sighash = None
        self.state = new_state

    def funding_confirmed(self) -> None:
        """The funding has its confirmations: funding -> open."""
        self._fire("funding_confirmed")

    def sign_payment(self, amount_sat: int) -> Payment:
        """Sign cumulative ``amount_sat`` (strictly more than the current amount).

        Does not advance the payer's state: store the payment durably, then
        :meth:`commit_payment` it, then send it. NotOpen unless open;
        AmountOutOfRange; StalePayment for an amount not above the current one.
        """
        if self.state is not ChannelState.OPEN:
            raise NotOpen(f"the channel is {self.state.value}")
        check_payment_amount(self.params, amount_sat)
        if amount_sat <= self.amount_sat:
            raise StalePayment(f"amount {amount_sat} is not above the current {self.amount_sat}")
        der = sign_digest(self.privkey, self._hasher().digest(amount_sat))
        return Payment(amount_sat, der + bytes([_sighash_byte(self.params, amount_sat)]))

    def commit_payment(self, payment: Payment) -> None:
        """Record ``payment`` (from :meth:`sign_payment`) as the current one, once stored."""
        if self.state not in (ChannelState.OPEN, ChannelState.CLOSING):
            raise NotOpen(f"the channel is {self.state.value}")
        check_payment_amount(self.params, payment.amount_sat)
        if payment.amount_sat <= self.amount_sat:
            raise StalePayment(f"amount {payment.amount_sat} is not above the current {self.amount_sat}")
        if not payment.signature or payment.signature[-1] != _sighash_byte(self.params, payment.amount_sat):
            raise BadSignature("wrong sighash type for the amount")
        self.payment = payment

    def close_request_signature(self, channel_id: str) -> bytes:
        """DER signature (no sighash byte) over :func:`close_request_digest` of ``channel_id``."""
        return sign_digest(self.privkey, close_request_digest(channel_id))

    def build_refund(
        self,
        tip_height: int,
        fee_rate_sat_vb: float,
        dest_script: bytes | None = None,
        *,
        min_fee_sat: int = 0,
    ) -> Any:
        """The signed refund (a ``CTransaction``) of the whole deposit minus the fee.

        NotExpired while ``tip_height < expiry_height`` (the refund is final
        from the block after the tip that reached the expiry on). Pays
        ``dest_script`` (default: the payer's change script).
        """
        if self.state in TERMINAL_STATES:
            raise ChannelClosed(f"the channel is {self.state.value}")
        if self.params.funding is None:
            raise NotOpen("the funding outpoint is not known")
        if tip_height < self.params.expiry_height:
            raise NotExpired(f"tip {tip_height} has not reached the expiry {self.params.expiry_height}")
        return build_refund_tx(
            self.params.funding,
            self.params.deposit_sat,
            self.params.witness_script,
            self.params.expiry_height,
            self.privkey,
            self.params.payer_script if dest_script is None else dest_script,
            fee_rate_sat_vb,
            min_fee_sat=min_fee_sat,
        )


def _sighash_byte(params: ChannelParams, amount_sat: int) -> int:
    return SIGHASH_NONE_ACP if amount_sat == params.deposit_sat else SIGHASH_SINGLE_ACP


def closing_height(expiry_height: int, close_margin_blocks: int) -> int:
    """The height from which the payee refuses payments and must close: ``expiry - margin``."""
    return expiry_height - close_margin_blocks


class PayeeChannel(_Machine):
    """The payee's side: accepts payments (keeping only the best), closes before expiry."""

    def __init__(
        self,
        params: ChannelParams,
        privkey: bytes,
        state: ChannelState = ChannelState.PROPOSED,
        best: Payment | None = None,
        close_margin_blocks: int = 6,
    ) -> None:
        check_private_key(privkey)
        if public_key(privkey) != params.payee_pubkey:
            raise BadPubkey("the private key does not match payee_pubkey")
        if not _is_int(close_margin_blocks) or close_margin_blocks < 0:
            raise BadRequest("close_margin_blocks must be a non-negative integer")
        self.privkey = privkey
        self.state = ChannelState(state)
        self.close_margin_blocks = close_margin_blocks
        self._verifier = Verifier(params.payer_pubkey)
        self._set_params(params)
        self._check_state_has_funding()
        self.best: Payment | None = None
        if best is not None:
            if params.funding is None:
                raise BadRequest("a payment needs the funding outpoint")
            saved_state, self.state = self.state, ChannelState.OPEN
            try:
                self.accept_payment(best.amount_sat, best.signature)
            finally:
                self.state = saved_state

    def _set_params(self, params: ChannelParams) -> None:
        self.params = params
        self._deposit = params.deposit_sat
        self._max_partial = params.max_partial_amount
        self._sighash = None if params.funding is None else params.sighash()

    @property
    def amount_sat(self) -> int:
        """The best (highest) amount received so far (0 before the first payment)."""
        return 0 if self.best is None else self.best.amount_sat

    @property
    def closing_height(self) -> int:
        """From this tip height on the payee refuses payments and must close."""
        return closing_height(self.params.expiry_height, self.close_margin_blocks)

    def funding_seen(self, outpoint: OutPoint) -> None:
        """The payer reported its funding: proposed -> funding; the params gain the outpoint."""
        new_state = next_state(self.state, "funding")
        self._set_params(self.params.with_funding(outpoint))
        self.state = new_state

    def funding_confirmed(self) -> None:
        """The funding has its confirmations: funding -> open."""
        self._fire("funding_confirmed")

    def accept_payment(self, amount_sat: int, signature: bytes, tip_height: int | None = None) -> bool:
        """Check and keep a payment if it beats the best one.

        True for a new best, False for an exact retry of the current best.
        Raises NotOpen / ChannelClosing / ChannelClosed by state; ChannelClosing
        when ``tip_height >= expiry - close_margin_blocks``; AmountOutOfRange;
        StalePayment (lower, or equal with another signature); BadSignature
        (wrong sighash byte, non-strict DER, high S, or not the payer's
        signature over the iterative transaction this side rebuilds).
        """
        if self.state is not ChannelState.OPEN:
            _require_open(self.state)
        if tip_height is not None and tip_height >= self.closing_height:
            raise ChannelClosing(f"tip {tip_height} is within {self.close_margin_blocks} blocks of the expiry")
        deposit = self._deposit
        if (
            amount_sat.__class__ is not int
            or amount_sat <= 0
            or amount_sat > deposit
            or (self._max_partial < amount_sat < deposit)
        ):
            check_payment_amount(self.params, amount_sat)  # raises with a precise message
            raise AmountOutOfRange("amount out of range")  # pragma: no cover - int subclass corner
        best = self.best
        if best is not None and amount_sat <= best.amount_sat:
            if amount_sat == best.amount_sat and signature == best.signature:
                return False
            raise StalePayment(f"amount {amount_sat} is not above the current {best.amount_sat}")
        if not isinstance(signature, bytes) or not signature:
            raise BadSignature("missing signature")
        if signature[-1] != (SIGHASH_NONE_ACP if amount_sat == deposit else SIGHASH_SINGLE_ACP):
            raise BadSignature("wrong sighash type for the amount")
        if not is_valid_signature_encoding(signature):
            raise BadSignature("signature is not strict DER")
        der = signature[:-1]
        if int.from_bytes(der[6 + der[3] :], "big") > HALF_ORDER:
            raise BadSignature("signature has a high S")
        assert self._sighash is not None  # OPEN implies a funding outpoint
        if not self._verifier.verify_prechecked(der, self._sighash.digest(amount_sat)):
            raise BadSignature("signature does not verify for this channel and amount")
        self.best = Payment(amount_sat, signature)
        return True

    def must_close(self, tip_height: int) -> bool:
        """True when the channel is open, holds a payment and ``tip >= expiry - close_margin_blocks``."""
        return (
            self.state is ChannelState.OPEN
            and self.best is not None
            and tip_height >= self.closing_height
        )

    def close_input(self) -> CloseInput:
        """This channel as an input of a (possibly multi-channel) close."""
        if self.state in TERMINAL_STATES:
            raise ChannelClosed(f"the channel is {self.state.value}")
        if self.state not in (ChannelState.OPEN, ChannelState.CLOSING):
            raise NotOpen(f"the channel is {self.state.value}")
        if self.best is None or self.params.funding is None:
            raise NotOpen("no payment to close with")
        return CloseInput(
            outpoint=self.params.funding,
            deposit_sat=self.params.deposit_sat,
            witness_script=self.params.witness_script,
            payer_script=self.params.payer_script,
            amount_sat=self.best.amount_sat,
            payer_signature=self.best.signature,
            payee_privkey=self.privkey,
        )

    def build_close(self, payee_script: bytes, fee_rate_sat_vb: float, *, min_fee_sat: int = 0) -> Any:
        """The fully signed close (a ``CTransaction``) of the best payment.

        Payee output ``best.amount - fee`` with ``fee = max(min_fee_sat,
        ceil(rate * vsize))``; call again with a higher rate to replace it
        (RBF): the payer's signature does not commit to the fee. Allowed while
        open or closing. CloseUneconomic if the payee output would be dust;
        NotOpen without a payment.
        """
        return build_close_tx([self.close_input()], payee_script, fee_rate_sat_vb, min_fee_sat=min_fee_sat)

    def max_close_fee_sat(self, payee_script: bytes) -> int:
        """The largest close fee that still leaves the payee output at its dust limit (0: none)."""
        if self.best is None:
            raise NotOpen("no payment to close with")
        return max(0, self.best.amount_sat - dust_limit(payee_script))

    def build_close_at_most(self, payee_script: bytes, fee_rate_sat_vb: float) -> tuple[Any, float]:
        """The close at ``fee_rate_sat_vb``, or, when the payment cannot pay that much, at the highest
        rate it can (the payee output left at its dust limit). Returns the transaction and its rate."""
        try:
            return self.build_close(payee_script, fee_rate_sat_vb), fee_rate_sat_vb
        except CloseUneconomic:
            most = self.max_close_fee_sat(payee_script)
            tx = self.build_close(payee_script, 0, min_fee_sat=most)
            return tx, most / tx_vsize(tx)

    def verify_close_request(self, channel_id: str, signature: bytes) -> None:
        """BadSignature unless ``signature`` is the payer's close request for ``channel_id``."""
        if not isinstance(signature, bytes) or not self._verifier.verify(signature, close_request_digest(channel_id)):
            raise BadSignature("close request signature does not verify")


def build_multi_close(
    channels: Sequence[PayeeChannel],
    payee_script: bytes,
    fee_rate_sat_vb: float,
    *,
    min_fee_sat: int = 0,
) -> Any:
    """One signed close transaction settling several channels (see :func:`btcchannel.core.tx.build_close_tx`).

    Partial payments' inputs come first, input ``i`` paired with its payer's
    change at output ``i``; full drains follow; one payee output receives the
    sum of the payments minus the fee.
    """
    return build_close_tx([c.close_input() for c in channels], payee_script, fee_rate_sat_vb, min_fee_sat=min_fee_sat)


# ----------------------------------------------------------------------------- service terms


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
            raise DepositOutOfRange(
                f"deposit must be within [{self.min_deposit_sat}, {self.max_deposit_sat}] sat"
            )
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
    def payment_overdue(owed_sat: int, paid_sat: int, owed_since: float | None, now: float,
                        payment_timeout_s: float) -> bool:
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
        channel cannot carry one more unit). ``capacity`` is called only when needed."""
        if max_units is not None and units >= max_units and owed_sat <= paid_sat:
            return "unit_count_reached"
        if max_total_sat is not None and paid_sat >= max_total_sat:
            return "agreed_total_reached"
        if paid_sat >= deposit_sat:
            return "capacity_exhausted"
        price = self.price_sat
        if price > 0 and owed_sat <= paid_sat and not capacity().carries(paid_sat + price):
            return "capacity_exhausted"
        return None
