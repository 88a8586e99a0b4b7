"""One error hierarchy for the whole library.

Every error carries a stable ``code`` (the wire codes of ``docs/PROTOCOL.md``
plus a few local ones) and the HTTP status the payee's service answers with.
Errors are translated into messages and exit codes only at the edges (the HTTP
server and the CLI); library code raises these and nothing else on purpose.
"""

from __future__ import annotations

from typing import ClassVar


class ChannelError(Exception):
    """Root of every error this library raises on purpose."""

    code: ClassVar[str] = "internal"
    http_status: ClassVar[int] = 500

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.code.replace("_", " "))
        self.message = message or self.code.replace("_", " ")

    def to_json(self) -> dict[str, dict[str, str]]:
        """The wire form: ``{"error": {"code": ..., "message": ...}}``."""
        return {"error": {"code": self.code, "message": self.message}}


# --- wire codes (PROTOCOL.md) -------------------------------------------------


class BadRequest(ChannelError):
    code = "bad_request"
    http_status = 400


class TooLarge(ChannelError):
    code = "too_large"
    http_status = 413


class UnknownChannel(ChannelError):
    code = "unknown_channel"
    http_status = 404


class BadPubkey(ChannelError):
    code = "bad_pubkey"
    http_status = 400


class BadScript(ChannelError):
    code = "bad_script"
    http_status = 400


class DepositOutOfRange(ChannelError):
    code = "deposit_out_of_range"
    http_status = 400


class ExpiryOutOfRange(ChannelError):
    code = "expiry_out_of_range"
    http_status = 400


class FundingNotFound(ChannelError):
    code = "funding_not_found"
    http_status = 404


class FundingMismatch(ChannelError):
    code = "funding_mismatch"
    http_status = 400


class NotOpen(ChannelError):
    code = "not_open"
    http_status = 409


class BadSignature(ChannelError):
    code = "bad_signature"
    http_status = 400


class StalePayment(ChannelError):
    code = "stale_payment"
    http_status = 409


class AmountOutOfRange(ChannelError):
    code = "amount_out_of_range"
    http_status = 400


class WrongAmount(ChannelError):
    code = "wrong_amount"
    http_status = 400


class ChannelClosing(ChannelError):
    code = "channel_closing"
    http_status = 409


class ChannelClosed(ChannelError):
    code = "channel_closed"
    http_status = 409


class TooManyChannels(ChannelError):
    code = "too_many_channels"
    http_status = 503


class NodeUnavailable(ChannelError):
    code = "node_unavailable"
    http_status = 503


class InternalError(ChannelError):
    code = "internal"
    http_status = 500


# --- local codes (never sent by a payee, used by the library and the CLI) -----


class IllegalTransition(ChannelError):
    """An event that the channel's current state does not allow."""

    code = "illegal_transition"
    http_status = 409


class NotExpired(ChannelError):
    """A refund was asked for before the chain reached the channel's expiry."""

    code = "not_expired"
    http_status = 409


class CloseUneconomic(ChannelError):
    """The close fee would eat the payee's whole output (or leave it dust)."""

    code = "close_uneconomic"
    http_status = 409


class NodeError(ChannelError):
    """The node answered an RPC call with an error (``rpc_code`` holds its code)."""

    code = "node_error"
    http_status = 502

    def __init__(self, message: str = "", rpc_code: int = 0) -> None:
        super().__init__(message)
        self.rpc_code = rpc_code


class BitcoindNotFound(ChannelError):
    """No usable bitcoind was found and none could be fetched."""

    code = "bitcoind_not_found"
    http_status = 500


class ProtocolViolation(ChannelError):
    """The other party answered something the protocol does not allow."""

    code = "protocol_violation"
    http_status = 502


WIRE_CODES: frozenset[str] = frozenset(
    cls.code
    for cls in (
        BadRequest, TooLarge, UnknownChannel, BadPubkey, BadScript,
        DepositOutOfRange, ExpiryOutOfRange, FundingNotFound, FundingMismatch,
        NotOpen, BadSignature, StalePayment, AmountOutOfRange, WrongAmount,
        ChannelClosing, ChannelClosed, TooManyChannels, NodeUnavailable,
        InternalError,
    )
)


def error_for_code(code: str, message: str = "") -> ChannelError:
    """Rebuild a typed error from a wire code (used by the payer's client)."""

    def walk(cls: type[ChannelError]) -> list[type[ChannelError]]:
        out = [cls]
        for sub in cls.__subclasses__():
            out.extend(walk(sub))
        return out

    for cls in walk(ChannelError):
        if cls.code == code and cls is not ChannelError:
            return cls(message)
    return ChannelError(message or code)


class PayeeUnreachable(ChannelError):
    """The payer could not reach the payee over HTTP: connection refused, timed out or broken.

    Code ``payee_unreachable`` (local, never sent by a payee), HTTP status 502.
    Distinct from :class:`NodeUnavailable`, which is about the bitcoind.
    """

    code = "payee_unreachable"
    http_status = 502
    wire = False
