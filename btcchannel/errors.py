"""One error hierarchy for the whole library.

Every error carries a stable ``code`` and the HTTP status the payee's service
answers with. ``wire`` says whether the code is one of the wire protocol's
(``docs/PROTOCOL.md``, "Error codes"; a payee sends it to payers) or a local one
(raised and handled inside one process, never sent by a payee); the protocol's
set, :data:`WIRE_CODES`, is derived from the classes. Errors are translated into
messages and exit codes only at the edges (the HTTP server and the CLI); library
code raises these and nothing else on purpose.

The classes come in three sections: the wire codes (``wire = True``, exactly the
table of PROTOCOL.md), the local codes, and the root of the node's RPC errors
(:class:`NodeError`, local code ``node_error``). As h11 tells a protocol error of
the peer from its own, every error says where it arose: ``remote`` is True on an
error the other party reported (the payer's client rebuilds the payee's error body
with :func:`error_for_code`) and False on one raised in this process, so a caller
can tell "the payee refused" from "this payer refused" under one code (e.g.
``bad_request``).

The subclasses of :class:`NodeError`, one per bitcoind RPC error code that callers
test for, belong to the node: they live in :mod:`btcchannel.bitcoind.errors`,
registered by RPC code as python-bitcoinlib's ``rpc.py`` registers its own.
"""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

_E = TypeVar("_E", bound="ChannelError")


class ChannelError(Exception):
    """Root of every error this library raises on purpose (code ``internal``, HTTP 500).

    Subclasses set ``code`` (stable, snake_case), ``http_status`` and ``wire``
    (True only for the codes of the wire protocol; new codes are local until
    the protocol names them).
    """

    code: ClassVar[str] = "internal"
    http_status: ClassVar[int] = 500
    wire: ClassVar[bool] = False
    #: True when the other party reported this error (the payer rebuilt it from the payee's error
    #: body, :func:`error_for_code`); False when it was raised in this process
    remote: bool = False

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.code.replace("_", " "))
        self.message = message or self.code.replace("_", " ")

    def to_json(self) -> dict[str, dict[str, Any]]:
        """The wire form: ``{"error": {"code": ..., "message": ...}}``."""
        return {"error": {"code": self.code, "message": self.message}}


# --- wire codes (PROTOCOL.md) -------------------------------------------------


class BadRequest(ChannelError):
    """A malformed request: not strict JSON, unknown/missing/duplicate fields,
    non-integer amounts, uppercase hex. Wire code ``bad_request``, HTTP 400."""

    code = "bad_request"
    http_status = 400
    wire = True


class TooLarge(ChannelError):
    """A request body over 64 KiB. Wire code ``too_large``, HTTP 413."""

    code = "too_large"
    http_status = 413
    wire = True


class UnknownChannel(ChannelError):
    """No such channel (or a malformed channel id in a path).
    Wire code ``unknown_channel``, HTTP 404."""

    code = "unknown_channel"
    http_status = 404
    wire = True


class BadPubkey(ChannelError):
    """Not a valid compressed public key. Wire code ``bad_pubkey``, HTTP 400."""

    code = "bad_pubkey"
    http_status = 400
    wire = True


class BadScript(ChannelError):
    """Not a standard payout script. Wire code ``bad_script``, HTTP 400."""

    code = "bad_script"
    http_status = 400
    wire = True


class DepositOutOfRange(ChannelError):
    """A proposed deposit outside the payee's range.
    Wire code ``deposit_out_of_range``, HTTP 400."""

    code = "deposit_out_of_range"
    http_status = 400
    wire = True


class ExpiryOutOfRange(ChannelError):
    """A proposed expiry outside the payee's lifetime range.
    Wire code ``expiry_out_of_range``, HTTP 400."""

    code = "expiry_out_of_range"
    http_status = 400
    wire = True


class FundingNotFound(ChannelError):
    """The announced funding outpoint is not an unspent output the node knows.
    Wire code ``funding_not_found``, HTTP 404."""

    code = "funding_not_found"
    http_status = 404
    wire = True


class FundingMismatch(ChannelError):
    """The announced output does not fund this channel (script or amount).
    Wire code ``funding_mismatch``, HTTP 400."""

    code = "funding_mismatch"
    http_status = 400
    wire = True


class NotOpen(ChannelError):
    """A payment for a channel that is not open (yet). Wire code ``not_open``, HTTP 409."""

    code = "not_open"
    http_status = 409
    wire = True


class BadSignature(ChannelError):
    """A payment signature that does not verify for this channel and amount.
    Wire code ``bad_signature``, HTTP 400."""

    code = "bad_signature"
    http_status = 400
    wire = True


class StalePayment(ChannelError):
    """A payment not above the channel's current total. Wire code ``stale_payment``, HTTP 409."""

    code = "stale_payment"
    http_status = 409
    wire = True


class AmountOutOfRange(ChannelError):
    """A payment over the deposit, or one leaving the payer dust.
    Wire code ``amount_out_of_range``, HTTP 400."""

    code = "amount_out_of_range"
    http_status = 400
    wire = True


class WrongAmount(ChannelError):
    """Metered service: a payment that is not exactly the amount due (the channel
    then closes). Wire code ``wrong_amount``, HTTP 400."""

    code = "wrong_amount"
    http_status = 400
    wire = True


class Unauthorized(ChannelError):
    """A metered request without a valid ``X-Btcchannel-Auth`` of the channel's payer (missing,
    malformed, not signed by the payer's channel key, or a counter not above the last one).
    Wire code ``unauthorized``, HTTP 401."""

    code = "unauthorized"
    http_status = 401
    wire = True

    def __init__(self, message: str = "", last_counter: int | None = None) -> None:
        super().__init__(message)
        #: a counter not above the stored one: the last counter the payee accepted (the payer resyncs)
        self.last_counter = last_counter

    def to_json(self) -> dict[str, dict[str, Any]]:
        """The wire form, with ``last_counter`` when the request was refused for its counter."""
        out: dict[str, dict[str, Any]] = {"error": {"code": self.code, "message": self.message}}
        if self.last_counter is not None:
            out["error"]["last_counter"] = self.last_counter
        return out


class PaymentRequired(ChannelError):
    """A paid request that carries no payment and has no credit: the 402 answer, whose body also
    holds the ``payment`` object saying what to pay. Wire code ``payment_required``, HTTP 402."""

    code = "payment_required"
    http_status = 402
    wire = True


class TlsRequired(ChannelError):
    """A paid request over plain HTTP from a non-loopback address, on a payee that requires TLS for
    paid routes (its operator did not opt out). Wire code ``tls_required``, HTTP 403."""

    code = "tls_required"
    http_status = 403
    wire = True


class CreditCapReached(ChannelError):
    """Postpay: serving the unit on credit would pass the payee's cap on outstanding credit across
    channels (of the payer's key, of the client's address, or in total): settle an owed total or
    wait. Wire code ``credit_cap_reached``, HTTP 402."""

    code = "credit_cap_reached"
    http_status = 402
    wire = True


class TermsMismatch(ChannelError):
    """A proposal states terms other than the ones the payee requires (price, mode, credit
    limit, timeouts; see ``GET /v1/info``). Wire code ``terms_mismatch``, HTTP 409."""

    code = "terms_mismatch"
    http_status = 409
    wire = True


class BadProposalToken(ChannelError):
    """A funding report whose ``proposal_token`` this payee did not issue for this channel: not
    its MAC (altered, forged, another payee's), malformed, or for another channel id.
    Wire code ``bad_proposal_token``, HTTP 400."""

    code = "bad_proposal_token"
    http_status = 400
    wire = True


class ChannelClosing(ChannelError):
    """A payment or request after the channel's close was decided.
    Wire code ``channel_closing``, HTTP 409."""

    code = "channel_closing"
    http_status = 409
    wire = True


class ChannelClosed(ChannelError):
    """A payment or request for a channel that has ended.
    Wire code ``channel_closed``, HTTP 409."""

    code = "channel_closed"
    http_status = 409
    wire = True


class TooManyChannels(ChannelError):
    """A proposal while the payee holds too many unfunded proposals.
    Wire code ``too_many_channels``, HTTP 503."""

    code = "too_many_channels"
    http_status = 503
    wire = True


class NodeUnavailable(ChannelError):
    """The bitcoind does not answer: unreachable, timed out, still starting, or
    refusing the RPC credentials. Wire code ``node_unavailable``, HTTP 503
    (a payee sends it when its own node is down)."""

    code = "node_unavailable"
    http_status = 503
    wire = True


class InternalError(ChannelError):
    """A bug, or a node failure on the payee's side. Wire code ``internal``, HTTP 500."""

    code = "internal"
    http_status = 500
    wire = True


# --- local codes (never sent by a payee, used by the library and the CLI) -----


class IllegalTransition(ChannelError):
    """An event that the channel's current state does not allow.
    Local code ``illegal_transition`` (HTTP 409 if it ever reaches the service's edge)."""

    code = "illegal_transition"
    http_status = 409


class NotExpired(ChannelError):
    """A refund was asked for before the chain reached the channel's expiry.
    Local code ``not_expired``."""

    code = "not_expired"
    http_status = 409


class CloseUneconomic(ChannelError):
    """The close fee would eat the payee's whole output (or leave it dust).
    Local code ``close_uneconomic``."""

    code = "close_uneconomic"
    http_status = 409


class BitcoindNotFound(ChannelError):
    """No usable bitcoind was found and none could be fetched.
    Local code ``bitcoind_not_found``."""

    code = "bitcoind_not_found"
    http_status = 500


class NodePruned(ChannelError):
    """The node has pruned blocks the payee still has to read: blocks after the last one the
    payee processed (a restart after a long outage on a pruned node), or the block of a
    transaction it must find. Local code ``node_pruned``, HTTP 503: resync the node (or raise
    its ``-prune`` target) so it keeps the blocks from the payee's last processed block on."""

    code = "node_pruned"
    http_status = 503


class ProtocolViolation(ChannelError):
    """The other party answered something the protocol does not allow.
    Local code ``protocol_violation``, HTTP 502."""

    code = "protocol_violation"
    http_status = 502


class StoreSchemaError(ChannelError):
    """A database file's schema is not one this code can use (written by a newer release, or of
    an unknown layout); nothing is changed in it. Local code ``store_schema``, HTTP 500."""

    code = "store_schema"
    http_status = 500


class PayeeUnreachable(ChannelError):
    """The payer could not reach the payee over HTTP: connection refused, timed out or broken.

    Code ``payee_unreachable`` (local, never sent by a payee), HTTP status 502.
    Distinct from :class:`NodeUnavailable`, which is about the bitcoind.
    """

    code = "payee_unreachable"
    http_status = 502
    wire = False


class TermsRefused(ChannelError):
    """The payer refuses the payee's terms: outside the limits it was given (price over
    ``max_price_sat``, ...). Code ``terms_refused`` (local, raised by the payer before any funding)."""

    code = "terms_refused"
    http_status = 409
    wire = False


class TermsChanged(ChannelError):
    """The payee's answer states other terms than the ones agreed at open (or none). Code
    ``terms_changed`` (local): the payer keeps the agreed terms and signs nothing else."""

    code = "terms_changed"
    http_status = 502
    wire = False


class AmountNotAgreed(ChannelError):
    """The payer was asked to sign a total the agreed terms do not allow: above its own count of
    units received times the agreed price, above the agreed total, past the agreed number of
    payments or the agreed end time. Code ``amount_not_agreed`` (local; nothing is signed)."""

    code = "amount_not_agreed"
    http_status = 409
    wire = False


class OpenTimeout(ChannelError):
    """A funded channel that the payee did not report open within the wait the caller gave
    (its funding is not confirmed enough yet). Nothing is lost: the channel opens once the
    funding confirms. Local code ``open_timeout``, HTTP 504."""

    code = "open_timeout"
    http_status = 504


class NothingToReplace(ChannelError):
    """A fee bump that would replace nothing: the channel has no close in the mempool (it is
    open, or its close already confirmed). Local code ``nothing_to_replace``, HTTP 409."""

    code = "nothing_to_replace"
    http_status = 409


class AlreadyRefunded(ChannelError):
    """A refund of a channel whose deposit was already taken back (or spent by a close).
    Local code ``already_refunded``, HTTP 409."""

    code = "already_refunded"
    http_status = 409


class WrongNetwork(ChannelError):
    """The payee runs on another network than the one the payer was started for (``--network``,
    or ``network=`` of :class:`~btcchannel.payer.client.PayerClient`): a configuration mistake
    on the caller's side, not a protocol breach. Local code ``wrong_network``, HTTP 409."""

    code = "wrong_network"
    http_status = 409


class BadBackup(ChannelError):
    """A payer backup that cannot be imported: not JSON, not a btcchannel payer backup, a
    malformed entry, or a keyless entry this datadir's seed does not derive.
    Local code ``bad_backup``, HTTP 400."""

    code = "bad_backup"
    http_status = 400


class InsufficientFunds(ChannelError):
    """The node wallet cannot pay for a funding (RPC_WALLET_INSUFFICIENT_FUNDS, or the wallet's
    "Insufficient funds" answer); nothing was sent. Local code ``insufficient_funds``, HTTP 409."""

    code = "insufficient_funds"
    http_status = 409


class BadUrl(ChannelError):
    """A payee URL that is not an absolute ``http://`` or ``https://`` URL with a host.
    Local code ``bad_url``, HTTP 400."""

    code = "bad_url"
    http_status = 400


class MeteredChannel(AmountNotAgreed):
    """A direct payment (``pay``) on a metered channel (the agreed price per unit is above 0)
    beyond what the units received allow: such a channel pays for units as they are bought
    (``MeteredPayer``, the ``fetch`` command), never an amount on its own. Nothing is signed.
    Local code ``metered_channel``, HTTP 409."""

    code = "metered_channel"
    http_status = 409


# --- the node's RPC errors (local code ``node_error``; one class a code: bitcoind.errors) ---


class NodeError(ChannelError):
    """The node answered an RPC call with an error, or with something unusable.

    Local code ``node_error``, HTTP 502. ``rpc_code`` holds bitcoind's RPC error
    code (``src/rpc/protocol.h``; 0 when the failure is not an RPC error, e.g. a
    malformed reply). The node client raises the subclass registered for the code
    (:mod:`btcchannel.bitcoind.errors`, which sets ``RPC_ERROR_CODE``), a plain
    ``NodeError`` for codes without one; every subclass keeps the code ``node_error``.
    """

    code = "node_error"
    http_status = 502
    RPC_ERROR_CODE: ClassVar[int] = 0

    def __init__(self, message: str = "", rpc_code: int | None = None) -> None:
        super().__init__(message)
        self.rpc_code: int = type(self).RPC_ERROR_CODE if rpc_code is None else rpc_code


# --- codes --------------------------------------------------------------------


def _subclasses(root: type[_E]) -> list[type[_E]]:
    """Every subclass of ``root`` (not ``root`` itself), each before its own subclasses."""
    out: list[type[_E]] = []
    for sub in root.__subclasses__():
        out.append(sub)
        out.extend(_subclasses(sub))
    return out


WIRE_CODES: frozenset[str] = frozenset(cls.code for cls in _subclasses(ChannelError) if cls.wire)
"""The error codes of the wire protocol (the classes with ``wire = True``)."""


def error_for_code(code: str, message: str = "", *, remote: bool = True) -> ChannelError:
    """Rebuild a typed error from a code the other party sent (the payer's client does, from the
    payee's error body); it is marked ``remote`` (pass ``remote=False`` for one raised here).

    A code shared by a family (``node_error``: :class:`NodeError` and its
    per-RPC-code subclasses) gives the family's root; an unknown code a plain
    :class:`ChannelError` whose message defaults to the code.
    """
    err = ChannelError(message or code)
    for cls in _subclasses(ChannelError):  # a class comes before its subclasses
        if cls.code == code:
            err = cls(message)
            break
    err.remote = remote
    return err
