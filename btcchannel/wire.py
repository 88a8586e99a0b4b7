"""The JSON protocol's shapes (``docs/PROTOCOL.md``), with no I/O and no HTTP library.

- request bodies: :func:`parse_body` (a strict JSON object with exactly the named fields) and
  the field checks :func:`int_field`, :func:`hex_field`, :func:`txid_field`;
- :func:`check_channel_id`: a well-formed channel id or ``UnknownChannel``;
- :func:`channel_object`: the protocol's channel object built from a stored row;
- the metered service's headers (``HDR_*``), :func:`parse_payment_headers`, the request
  authentication (:func:`parse_auth`, :func:`auth_header_v2`, the one function every payer
  signs a paid request with) and the 402 body (:func:`payment_required_body`).

Every malformed input raises a :class:`~btcchannel.errors.BadRequest` (or the error the
protocol names), never anything else.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Mapping, Protocol

from btcchannel.core.keys import request_digest, request_digest_v2, sign_digest
from btcchannel.core.terms import Metering
from btcchannel.errors import BadRequest, PaymentRequired, Unauthorized, UnknownChannel

__all__ = [
    "MAX_BODY",
    "MAX_SAT",
    "MAX_INT_DIGITS",
    "HDR_CHANNEL",
    "HDR_AMOUNT",
    "HDR_SIGNATURE",
    "HDR_PAID",
    "HDR_OWED",
    "HDR_AUTH",
    "HDR_STATE",
    "HDR_END_REASON",
    "parse_auth_header",
    "parse_auth",
    "RequestAuth",
    "auth_header_v2",
    "body_sha256",
    "PaidRequest",
    "EMPTY_BODY_SHA256",
    "ChannelRow",
    "parse_body",
    "int_field",
    "hex_field",
    "txid_field",
    "check_channel_id",
    "channel_object",
    "parse_payment_headers",
    "check_decimal",
    "payment_required_body",
]

#: the default limit on a request body, in bytes
MAX_BODY = 64 * 1024
#: every bitcoin there will ever be, in satoshis: the upper bound of an amount field
MAX_SAT = 21_000_000 * 100_000_000

HDR_CHANNEL = "X-Btcchannel-Channel"
HDR_AMOUNT = "X-Btcchannel-Amount"
HDR_SIGNATURE = "X-Btcchannel-Signature"
HDR_PAID = "X-Btcchannel-Paid"
HDR_OWED = "X-Btcchannel-Owed"
HDR_AUTH = "X-Btcchannel-Auth"
HDR_STATE = "X-Btcchannel-State"
HDR_END_REASON = "X-Btcchannel-End-Reason"

_HEX_ID = re.compile(r"^[0-9a-f]{32}$")
_HEX_TXID = re.compile(r"^[0-9a-f]{64}$")
_DIGITS = re.compile(r"^[0-9]{1,16}$")
_HEX_SIG = re.compile(r"^(?:[0-9a-f]{2}){1,80}$")
_AUTH = re.compile(r"^(v2\.)?([0-9]{1,19})\.((?:[0-9a-f]{2}){8,72})$")


class ChannelRow(Protocol):
    """What :func:`channel_object` and :func:`payment_required_body` read from a stored channel."""

    @property
    def channel_id(self) -> str: ...
    @property
    def state(self) -> str: ...
    @property
    def deposit_sat(self) -> int: ...
    @property
    def amount_sat(self) -> int: ...
    @property
    def expiry_height(self) -> int: ...
    @property
    def funding_txid(self) -> str | None: ...
    @property
    def funding_vout(self) -> int | None: ...
    @property
    def confirmations(self) -> int: ...
    @property
    def close_txid(self) -> str | None: ...
    @property
    def units(self) -> int: ...
    @property
    def owed_sat(self) -> int: ...
    @property
    def wire_end_reason(self) -> str | None: ...
    @property
    def exception_txid(self) -> str | None: ...
    @property
    def terms(self) -> dict[str, Any] | None: ...


# ----------------------------------------------------------------------------- request bodies


def _reject_constant(name: str) -> Any:
    raise BadRequest(f"invalid JSON constant {name}")


def _no_dupes(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise BadRequest(f"duplicate field {k}")
        out[k] = v
    return out


#: the longest integer literal a body may hold (every protocol integer fits in 20 digits)
MAX_INT_DIGITS = 20


def _bounded_int(literal: str) -> int:
    """A JSON integer literal, bounded before it is converted (no 4,300-digit conversions)."""
    if len(literal.lstrip("-")) > MAX_INT_DIGITS:
        raise BadRequest(f"integer literal over {MAX_INT_DIGITS} digits")
    return int(literal)


def _bounded_float(literal: str) -> float:
    """A JSON number with a fraction or exponent: never a protocol value, refused by the field
    checks; bounded here so that no literal costs more than its length."""
    if len(literal) > 64:
        raise BadRequest("number literal too long")
    return float(literal)


def parse_body(raw: bytes, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, Any]:
    """Strict JSON object: exactly the ``required`` fields plus any of ``optional``; every integer
    literal at most :data:`MAX_INT_DIGITS` digits."""
    try:
        obj = json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=_no_dupes,
            parse_constant=_reject_constant,
            parse_int=_bounded_int,
            parse_float=_bounded_float,
        )
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BadRequest("body is not valid JSON") from exc
    if not isinstance(obj, dict):
        raise BadRequest("body must be a JSON object")
    unknown = set(obj) - set(required) - set(optional)
    if unknown:
        raise BadRequest(f"unknown fields: {', '.join(sorted(unknown))}")
    missing = [k for k in required if k not in obj]
    if missing:
        raise BadRequest(f"missing fields: {', '.join(missing)}")
    return obj


def int_field(d: Mapping[str, Any], name: str, lo: int = 0, hi: int = MAX_SAT) -> int:
    """Field ``name`` as an integer in ``[lo, hi]`` (a JSON boolean is not an integer)."""
    v = d[name]
    if isinstance(v, bool) or not isinstance(v, int):
        raise BadRequest(f"{name} must be an integer")
    if not lo <= v <= hi:
        raise BadRequest(f"{name} out of bounds")
    return v


def hex_field(d: Mapping[str, Any], name: str, max_bytes: int = 1000) -> bytes:
    """Field ``name`` as the bytes of a lowercase hex string of at most ``max_bytes`` bytes."""
    v = d[name]
    if not isinstance(v, str) or len(v) % 2 or len(v) > 2 * max_bytes or v != v.lower():
        raise BadRequest(f"{name} must be lowercase hex")
    try:
        return bytes.fromhex(v)
    except ValueError as exc:
        raise BadRequest(f"{name} must be lowercase hex") from exc


def txid_field(d: Mapping[str, Any], name: str = "txid") -> str:
    """Field ``name`` as a transaction id: exactly 64 lowercase hex characters."""
    v = d[name]
    if not isinstance(v, str) or not _HEX_TXID.match(v):
        raise BadRequest(f"{name} must be 64 lowercase hex characters")
    return v


def check_channel_id(cid: str) -> str:
    """A well-formed channel id or ``UnknownChannel``."""
    if not _HEX_ID.match(cid):
        raise UnknownChannel("no such channel")
    return cid


# ----------------------------------------------------------------------------- answers


def channel_object(rec: ChannelRow) -> dict[str, Any]:
    """The protocol's channel object (plus a few documented extra fields)."""
    return {
        "channel_id": rec.channel_id,
        "state": rec.state,
        "deposit_sat": rec.deposit_sat,
        "amount_sat": rec.amount_sat,
        "expiry_height": rec.expiry_height,
        "funding_txid": rec.funding_txid,
        "funding_vout": rec.funding_vout,
        "confirmations": rec.confirmations,
        "close_txid": rec.close_txid,
        # extensions (documented in docs/PROTOCOL.md)
        "units": rec.units,
        "owed_sat": rec.owed_sat,
        "end_reason": rec.wire_end_reason,
        "exception_txid": rec.exception_txid,
        "terms": rec.terms,
    }


# ----------------------------------------------------------------------------- metered service


def parse_payment_headers(headers: Mapping[str, str]) -> tuple[int, bytes] | None:
    """The payment a paid request carries in ``HDR_AMOUNT``/``HDR_SIGNATURE`` (None: none)."""
    amount = headers.get(HDR_AMOUNT)
    sig = headers.get(HDR_SIGNATURE)
    if amount is None and sig is None:
        return None
    if amount is None or sig is None or not _DIGITS.match(amount) or not _HEX_SIG.match(sig):
        raise BadRequest(f"{HDR_AMOUNT} must be decimal satoshis and {HDR_SIGNATURE} lowercase hex")
    return int(amount), bytes.fromhex(sig)


@dataclass(frozen=True)
class RequestAuth:
    """A parsed ``X-Btcchannel-Auth``: ``version`` 1 (``<counter>.<sig>``, over channel, counter,
    method and target) or 2 (``v2.<counter>.<sig>``, :func:`btcchannel.core.keys.request_digest_v2`)."""

    version: int
    counter: int
    signature: bytes


def parse_auth(value: str | None) -> RequestAuth:
    """``X-Btcchannel-Auth`` as a :class:`RequestAuth`; ``Unauthorized`` if missing or malformed
    (counter: decimal, below 2^63; signature: lowercase hex DER)."""
    m = _AUTH.match(value) if value is not None else None
    if m is None or int(m.group(2)) >= 2**63:
        raise Unauthorized(f"a metered request needs {HDR_AUTH}: v2.<counter>.<signature by the channel key>")
    return RequestAuth(2 if m.group(1) else 1, int(m.group(2)), bytes.fromhex(m.group(3)))


def parse_auth_header(value: str | None) -> tuple[int, bytes]:
    """:func:`parse_auth` as (counter, DER signature), whatever the version."""
    auth = parse_auth(value)
    return auth.counter, auth.signature


def body_sha256(body: bytes | None) -> bytes:
    """SHA-256 of a request body (of the empty string when there is none)."""
    return hashlib.sha256(body or b"").digest()


#: SHA-256 of the empty body
EMPTY_BODY_SHA256 = hashlib.sha256(b"").digest()


@dataclass(frozen=True)
class PaidRequest:
    """What a paid request's authentication covers, as the payee received it."""

    method: str
    authority: str  #: the ``Host`` header
    target: str  #: the raw request target (path and query exactly as sent)
    body_sha256: bytes = EMPTY_BODY_SHA256
    amount: str = ""  #: the ``X-Btcchannel-Amount`` value ("" without one)
    signature: str = ""  #: the ``X-Btcchannel-Signature`` value

    @classmethod
    def of(cls, method: str, target: str, headers: Mapping[str, str], body: bytes | None) -> PaidRequest:
        """The request of ``method``/``target`` with ``headers`` (``Host`` and the payment headers)."""
        return cls(
            method,
            _header(headers, "Host"),
            target,
            body_sha256(body),
            _header(headers, HDR_AMOUNT),
            _header(headers, HDR_SIGNATURE),
        )

    def digest(self, channel_id: str, auth: RequestAuth) -> bytes:
        """The digest ``auth`` must sign: v2's over everything, v1's over channel, counter, method, target."""
        if auth.version == 1:
            return request_digest(channel_id, auth.counter, self.method, self.target)
        return request_digest_v2(
            channel_id,
            auth.counter,
            self.method,
            self.authority,
            self.target,
            self.body_sha256,
            self.amount,
            self.signature,
        )

    def key(self, digest: bytes) -> bytes:
        """The idempotency key of the request signed as ``digest``: its digest and payment headers
        (a v1 digest does not cover the payment), hashed."""
        return hashlib.sha256(
            digest
            + b"\n"
            + self.amount.encode("utf-8", "surrogateescape")
            + b"\n"
            + self.signature.encode("utf-8", "surrogateescape")
        ).digest()


def _header(headers: Mapping[str, str] | None, name: str) -> str:
    if not headers:
        return ""
    value = headers.get(name)
    if value is None:  # a plain dict: look the name up case-insensitively
        lower = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == lower), None)
    return value or ""


def auth_header_v2(
    channel_key: bytes,
    channel_id: str,
    counter: int,
    method: str,
    authority: str,
    target: str,
    body: bytes | None,
    payment_headers: Mapping[str, str] | None = None,
) -> str:
    """The ``X-Btcchannel-Auth`` value (``v2.<counter>.<signature>``) of one paid request: the payer's
    channel key signs :func:`btcchannel.core.keys.request_digest_v2` over the channel, ``counter``,
    ``method``, ``authority`` (the ``Host`` header the request carries), the raw ``target`` (path and
    query exactly as sent), the SHA-256 of ``body`` and the ``X-Btcchannel-Amount`` and
    ``X-Btcchannel-Signature`` values in ``payment_headers`` (none: empty)."""
    digest = request_digest_v2(
        channel_id,
        counter,
        method,
        authority,
        target,
        body_sha256(body),
        _header(payment_headers, HDR_AMOUNT),
        _header(payment_headers, HDR_SIGNATURE),
    )
    return f"v2.{counter}.{sign_digest(channel_key, digest).hex()}"


def check_decimal(raw: str, what: str) -> int:
    """A short decimal integer taken from a URL or header; ``BadRequest`` naming ``what`` otherwise."""
    if not _DIGITS.match(raw):
        raise BadRequest(f"{what} must be a decimal integer")
    return int(raw)


def payment_required_body(metering: Metering, units: int, rec: ChannelRow | None = None) -> dict[str, Any]:
    """The body of the 402 answer: the terms, where to open a channel and, for ``rec``, what to pay next."""
    body: dict[str, Any] = {
        "price_sat": metering.price_sat,
        "mode": metering.mode,
        "credit_limit_sat": metering.credit_limit_sat,
        "units": units,
        "info_endpoint": "/v1/info",
        "channel_endpoint": "/v1/channels",
        "channel_id": None,
        "amount_sat": None,
        "owed_sat": None,
        "next_amount_sat": None,
    }
    if rec is not None:
        body["channel_id"] = rec.channel_id
        body["amount_sat"] = rec.amount_sat
        body["owed_sat"] = metering.owed_total(rec.owed_sat, rec.amount_sat)
        body["next_amount_sat"] = metering.next_amount(rec.amount_sat, rec.owed_sat, units)
        body["state"] = rec.state
    # inside the error envelope too (revision 2): {"error": {"code": "payment_required", ...}, "payment": {...}}
    return {"payment": body, **PaymentRequired("this request needs a payment or credit").to_json()}
