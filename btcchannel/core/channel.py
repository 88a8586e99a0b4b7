"""The two pure channel state machines, :class:`PayerChannel` and :class:`PayeeChannel`.

Every rule of a payment's life lives here: monotonic payments, signature
checks, expiry margins, the close and the refund. Nothing here does I/O;
callers persist state (``ChannelParams.to_json``, ``Payment.to_json``, the
:class:`~btcchannel.core.state.Transition` each event returns, and the best payment), feed chain
events in, and rebuild a machine mid-life with ``restore``. Both sides write a payment before
they commit it: the payer signs, stores, commits; the payee checks, stores, commits. What the
machines stand on lives beside them:
:mod:`btcchannel.core.params` (the agreed parameters, a payment, the amount
range), :mod:`btcchannel.core.state` (the one table saying which event each
state allows) and :mod:`btcchannel.core.terms` (metering, proposal limits,
capacity, fee rules).
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from btcchannel.core.keys import (
    HALF_ORDER,
    Verifier,
    check_private_key,
    close_request_digest,
    is_valid_signature_encoding,
    public_key,
    request_digest,
    sign_digest,
)
from btcchannel.core.params import ChannelParams, Payment, check_payment_amount
from btcchannel.core.script import dust_limit
from btcchannel.core.state import (
    TERMINAL_STATES,
    ChannelEvent,
    ChannelState,
    PayeeLifecycle,
    StateMachine,
    Transition,
    transition,
)
from btcchannel.core.terms import closing_height, not_open_error
from btcchannel.core.tx import (
    SIGHASH_NONE_ACP,
    SIGHASH_SINGLE_ACP,
    CloseInput,
    OutPoint,
    PaymentSighash,
    build_close_tx,
    build_refund_tx,
    tx_vsize,
)
from btcchannel.errors import (
    AmountOutOfRange,
    BadPubkey,
    BadRequest,
    BadSignature,
    ChannelClosed,
    ChannelClosing,
    CloseUneconomic,
    NotExpired,
    NotOpen,
    StalePayment,
)

__all__ = [
    "PayerChannel",
    "PayeeChannel",
    "build_multi_close",
]


def _check_state_has_funding(machine: PayerChannel | PayeeChannel) -> None:
    if machine.state not in (ChannelState.PROPOSED, ChannelState.FAILED) and machine.params.funding is None:
        raise BadRequest(f"a channel in state {machine.state.value!r} needs its funding outpoint")


class PayerChannel(StateMachine):
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
        _check_state_has_funding(self)
        self._sighash: PaymentSighash | None = None
        self.payment: Payment | None = None
        if payment is not None:
            check_payment_amount(params, payment.amount_sat)
            if not Verifier(params.payer_pubkey).verify(
                payment.signature[:-1], self._hasher().digest(payment.amount_sat)
            ) or payment.signature[-1] != _sighash_byte(params, payment.amount_sat):
                raise BadSignature("the stored payment's signature does not verify")
            self.payment = payment

    @classmethod
    def restore(
        cls, params: ChannelParams, privkey: bytes, state: ChannelState, payment: Payment | None = None
    ) -> PayerChannel:
        """The payer's machine mid-life, rebuilt from storage: ``state`` as stored, ``payment`` the last
        committed one (its amount and signature are checked in any state)."""
        return cls(params, privkey, state=state, payment=payment)

    @property
    def amount_sat(self) -> int:
        """The cumulative amount paid so far (0 before the first payment)."""
        return 0 if self.payment is None else self.payment.amount_sat

    def _hasher(self) -> PaymentSighash:
        if self._sighash is None:
            self._sighash = self.params.sighash()
        return self._sighash

    def funding_broadcast(self, outpoint: OutPoint) -> Transition:
        """The funding transaction is out: proposed -> funding; the params gain the outpoint."""
        record = transition(self.channel_id, self.state, ChannelEvent.FUNDING)
        self.params = self.params.with_funding(outpoint)
        self._sighash = None
        self.state = record.new
        return record

    def funding_confirmed(self) -> Transition:
        """The funding has its confirmations: funding -> open."""
        return self.fire(ChannelEvent.FUNDING_CONFIRMED)

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

    def request_signature(self, channel_id: str, counter: int, method: str, target: str) -> bytes:
        """DER signature (no sighash byte) over :func:`~btcchannel.core.keys.request_digest`:
        authenticates one metered request as this channel's payer's."""
        return sign_digest(self.privkey, request_digest(channel_id, counter, method, target))

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


class PayeeChannel(PayeeLifecycle):
    """The payee's side: accepts payments (keeping only the best), closes before expiry.

    A payment is checked, stored, then committed, as the payer signs, stores, then commits:
    :meth:`check_payment` changes nothing and says what to store; once the store holds it,
    :meth:`commit_payment` makes it the best. Its life's events are :class:`PayeeLifecycle`'s."""

    def __init__(
        self,
        params: ChannelParams,
        privkey: bytes,
        state: ChannelState = ChannelState.PROPOSED,
        best: Payment | None = None,
        close_margin_blocks: int = 6,
        channel_id: str = "",
    ) -> None:
        check_private_key(privkey)
        if public_key(privkey) != params.payee_pubkey:
            raise BadPubkey("the private key does not match payee_pubkey")
        margin_ok = isinstance(close_margin_blocks, int) and not isinstance(close_margin_blocks, bool)
        if not margin_ok or close_margin_blocks < 0:
            raise BadRequest("close_margin_blocks must be a non-negative integer")
        super().__init__(channel_id, state)
        self.privkey = privkey
        self.close_margin_blocks = close_margin_blocks
        self._verifier = Verifier(params.payer_pubkey)
        self._set_params(params)
        _check_state_has_funding(self)
        self.best: Payment | None = None
        if best is not None:
            if params.funding is None:
                raise BadRequest("a payment needs the funding outpoint")
            self.verify_payment(best.amount_sat, best.signature)
            self.best = best

    @classmethod
    def restore(
        cls,
        params: ChannelParams,
        privkey: bytes,
        state: ChannelState,
        best: Payment | None = None,
        close_margin_blocks: int = 6,
        channel_id: str = "",
    ) -> PayeeChannel:
        """The payee's machine mid-life, rebuilt from storage: ``state`` as stored, ``best`` the best
        stored payment (checked by :meth:`verify_payment` in any state, so a closing channel can
        still build its close)."""
        return cls(
            params, privkey, state=state, best=best, close_margin_blocks=close_margin_blocks, channel_id=channel_id
        )

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

    def funding_seen(self, outpoint: OutPoint, confirmations: int = 0, inputs: Iterable[Any] = ()) -> Transition:
        """The payer reported its funding: proposed -> funding; the params gain the outpoint."""
        transition(self.channel_id, self.state, ChannelEvent.FUNDING)  # checked before anything moves
        self._set_params(self.params.with_funding(outpoint))
        return super().funding_seen(outpoint, confirmations, inputs)

    def check_payment(self, amount_sat: int, signature: bytes, tip_height: int | None = None) -> Payment | None:
        """Check a payment against the best one, changing nothing: the payment to store (a new best),
        or None for an exact retry of the current best (nothing to store).

        Raises NotOpen / ChannelClosing / ChannelClosed by state; ChannelClosing
        when ``tip_height >= expiry - close_margin_blocks``; then the checks of
        :meth:`verify_payment` (AmountOutOfRange, BadSignature), with
        StalePayment (lower, or equal with another signature) between the
        range and the signature checks. Store the payment durably, then
        :meth:`commit_payment` it.
        """
        if self.state is not ChannelState.OPEN:
            raise not_open_error(self.state)
        if tip_height is not None and tip_height >= self.closing_height:
            raise ChannelClosing(f"tip {tip_height} is within {self.close_margin_blocks} blocks of the expiry")
        self._check_amount(amount_sat)
        best = self.best
        if best is not None and amount_sat <= best.amount_sat:
            if amount_sat == best.amount_sat and signature == best.signature:
                return None
            raise StalePayment(f"amount {amount_sat} is not above the current {best.amount_sat}")
        assert self._sighash is not None  # OPEN implies a funding outpoint
        self._check_signature(self._sighash, amount_sat, signature)
        return Payment(amount_sat, signature)

    def commit_payment(self, payment: Payment) -> bool:
        """Make ``payment`` (from :meth:`check_payment`, now stored) the best, if it is above the best
        one: True; False when a higher one was committed meanwhile (two payments stored
        concurrently, committed in the other order), and the best stays. NotOpen unless open or
        closing (a payment stored before the close was claimed)."""
        if self.state not in (ChannelState.OPEN, ChannelState.CLOSING):
            raise not_open_error(self.state)
        if self.best is not None and payment.amount_sat <= self.best.amount_sat:
            return False
        self.best = payment
        return True

    def accept_payment(self, amount_sat: int, signature: bytes, tip_height: int | None = None) -> bool:
        """:meth:`check_payment` then :meth:`commit_payment`, for a machine whose payments are not
        stored (tests, test vectors, benchmarks): True for a new best, False for an exact retry of
        the current best. The payee's service stores each payment between the two."""
        payment = self.check_payment(amount_sat, signature, tip_height)
        return payment is not None and self.commit_payment(payment)

    def verify_payment(self, amount_sat: int, signature: bytes) -> None:
        """Every check :meth:`accept_payment` makes of the payment itself, in any state, storing
        nothing: AmountOutOfRange; BadSignature (wrong sighash byte, non-strict DER, high S, or not
        the payer's signature over the iterative transaction this side rebuilds). NotOpen while
        the funding outpoint is unknown."""
        if self._sighash is None:
            raise NotOpen("the funding outpoint is not known yet")
        self._check_amount(amount_sat)
        self._check_signature(self._sighash, amount_sat, signature)

    def _check_amount(self, amount_sat: int) -> None:
        deposit = self._deposit
        if (
            amount_sat.__class__ is not int
            or amount_sat <= 0
            or amount_sat > deposit
            or (self._max_partial < amount_sat < deposit)
        ):
            check_payment_amount(self.params, amount_sat)  # raises with a precise message
            raise AmountOutOfRange("amount out of range")  # pragma: no cover - int subclass corner

    def _check_signature(self, sighash: PaymentSighash, amount_sat: int, signature: bytes) -> None:
        if not isinstance(signature, bytes) or not signature:
            raise BadSignature("missing signature")
        if signature[-1] != (SIGHASH_NONE_ACP if amount_sat == self._deposit else SIGHASH_SINGLE_ACP):
            raise BadSignature("wrong sighash type for the amount")
        if not is_valid_signature_encoding(signature):
            raise BadSignature("signature is not strict DER")
        der = signature[:-1]
        if int.from_bytes(der[6 + der[3] :], "big") > HALF_ORDER:
            raise BadSignature("signature has a high S")
        if not self._verifier.verify_prechecked(der, sighash.digest(amount_sat)):
            raise BadSignature("signature does not verify for this channel and amount")

    def must_close(self, tip_height: int) -> bool:
        """True when the channel is open, holds a payment and ``tip >= expiry - close_margin_blocks``."""
        return self.state is ChannelState.OPEN and self.best is not None and tip_height >= self.closing_height

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

    def verify_request(self, channel_id: str, counter: int, method: str, target: str, signature: bytes) -> bool:
        """Whether ``signature`` authenticates this metered request as the payer's."""
        return self._verifier.verify(signature, request_digest(channel_id, counter, method, target))

    def verify_payer_digest(self, digest: bytes, signature: bytes) -> bool:
        """Whether ``signature`` (DER, low-S) is the payer's channel key's over ``digest`` (a metered
        request's auth v2 digest, :func:`~btcchannel.core.keys.request_digest_v2`)."""
        return self._verifier.verify(signature, digest)

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


def build_multi_close_at_most(channels: Sequence[PayeeChannel], payee_script: bytes, fee_rate_sat_vb: float) -> Any:
    """:func:`build_multi_close` at ``fee_rate_sat_vb``, or, when the payments cannot pay that much,
    paying the most they can (the payee output left at its dust limit), as
    :meth:`PayeeChannel.build_close_at_most` does for one channel."""
    try:
        return build_multi_close(channels, payee_script, fee_rate_sat_vb)
    except CloseUneconomic:
        most = sum(c.amount_sat for c in channels) - dust_limit(payee_script)
        return build_multi_close(channels, payee_script, 0, min_fee_sat=most)
