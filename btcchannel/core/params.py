"""What both sides of a channel agree on: :class:`ChannelParams`, a :class:`Payment`, the amount range.

The parameters are fixed for the channel's life (the funding outpoint is set
once broadcast) and derive the witness script, the funding output and address,
the payment sighash and the range of cumulative amounts a payment may carry
(:func:`check_payment_amount`). Pure values, JSON round-trips for storage.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

from btcchannel.core.keys import check_public_key
from btcchannel.core.script import (
    SCRIPT_LEGACY,
    check_network,
    check_payout_script,
    check_script_version,
    dust_limit,
    funding_witness_script,
    p2wsh_script,
    script_to_address,
)
from btcchannel.core.terms import Capacity
from btcchannel.core.tx import MAX_MONEY, OutPoint, PaymentSighash
from btcchannel.errors import AmountOutOfRange, BadPubkey, BadRequest, DepositOutOfRange, NotOpen

__all__ = ["ChannelParams", "Payment", "check_payment_amount"]


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
    #: which channel script: :data:`~btcchannel.core.script.SCRIPT_LEGACY` (``OP_DROP``) or
    #: :data:`~btcchannel.core.script.SCRIPT_DESCRIPTOR` (``OP_VERIFY``, a miniscript)
    script_version: int = SCRIPT_LEGACY

    def __post_init__(self) -> None:
        check_network(self.network)
        check_script_version(self.script_version)
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
        return funding_witness_script(self.payer_pubkey, self.payee_pubkey, self.expiry_height, self.script_version)

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
        """A JSON-able dict (hex strings) for storage; ``script_version`` only when not the legacy script
        (a legacy channel's row reads as it did before script versions existed)."""
        d: dict[str, Any] = {
            "network": self.network,
            "payer_pubkey": self.payer_pubkey.hex(),
            "payee_pubkey": self.payee_pubkey.hex(),
            "expiry_height": self.expiry_height,
            "deposit_sat": self.deposit_sat,
            "payer_script": self.payer_script.hex(),
            "funding": None if self.funding is None else self.funding.to_json(),
        }
        if self.script_version != SCRIPT_LEGACY:
            d["script_version"] = self.script_version
        return d

    @classmethod
    def from_json(cls, d: Any) -> ChannelParams:
        """Inverse of :meth:`to_json`; BadRequest (or a more specific error) when malformed."""
        keys = {"network", "payer_pubkey", "payee_pubkey", "expiry_height", "deposit_sat", "payer_script"}
        if not isinstance(d, dict) or not keys <= set(d) or not set(d) <= keys | {"funding", "script_version"}:
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
            script_version=d.get("script_version", SCRIPT_LEGACY),
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
