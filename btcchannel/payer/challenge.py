"""The payee's 402 as a payer reads it: what a route costs and where its payee's protocol is.

A paid route that is not paid for answers 402 with ``WWW-Authenticate: Btcchannel realm=...,
network=..., info=..., channels=..., price_sat=..., units=..., mode=...`` (RFC 9110
auth-params) and a JSON body ``{"payment": {..., "info_url", "channels_url", "route_price_sat",
"units", ...}}`` (``docs/PROTOCOL.md``). :class:`Challenge` holds the two read together (the
header wins; the body fills in what an older payee's header lacks), and
:meth:`Challenge.units_for` is the one check before paying: the route's price must be its units
times the channel's agreed unit price, or nothing is paid.
"""

from __future__ import annotations

import json
import re
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from btcchannel.core.terms import Metering
from btcchannel.errors import ProtocolViolation

__all__ = ["Challenge", "ChallengePayer", "PayingRequest", "is_challenge", "parse_www_authenticate"]

T = TypeVar("T")

_PARAM = re.compile(r'\s*([A-Za-z0-9_\-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,]*)\s*,?')


def parse_www_authenticate(value: str) -> dict[str, str] | None:
    """The auth-params of a ``Btcchannel`` challenge (None if ``value`` is another scheme)."""
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() != "btcchannel":
        return None
    params: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        m = _PARAM.match(rest, pos)
        if m is None or m.end() == pos:
            break
        raw = m.group(2)
        if raw.startswith('"'):
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        params[m.group(1).lower()] = raw
        pos = m.end()
    return params


def _int(value: Any, what: str) -> int:
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise ProtocolViolation(f"the payee's 402 has no valid {what}: {value!r}") from None
    if out < 0:
        raise ProtocolViolation(f"the payee's 402 has a negative {what}")
    return out


@dataclass(frozen=True)
class Challenge:
    """A route's 402: its ``units``, its ``price_sat`` (the route's, in sat), the payee's ``info_url``
    and ``channels_url``, ``network``, ``mode``, and the channel it names (if any)."""

    units: int
    price_sat: int
    info_url: str
    channels_url: str
    network: str | None = None
    mode: str | None = None
    channel_id: str | None = None

    @property
    def protocol_url(self) -> str:
        """Where the payee's ``/v1`` endpoints are (what ``open`` takes): ``info_url`` without ``/v1/info``."""
        url = self.info_url
        return url[: -len("/v1/info")] if url.endswith("/v1/info") else url.rsplit("/v1/", 1)[0]

    @property
    def unit_price_sat(self) -> int:
        """The payee's price of one unit (the route's price over its units)."""
        return self.price_sat // self.units if self.units else 0

    @classmethod
    def from_answer(cls, headers: Mapping[str, str], body: bytes | None) -> Challenge:
        """The challenge of a 402 (its headers and, when read, its body); ProtocolViolation if it
        names no route price."""
        header = headers.get("WWW-Authenticate") or headers.get("www-authenticate") or ""
        params = parse_www_authenticate(header) or {}
        payment: dict[str, Any] = {}
        if body:
            try:
                doc = json.loads(body)
            except ValueError:
                doc = None
            if isinstance(doc, dict) and isinstance(doc.get("payment"), dict):
                payment = doc["payment"]
        units = params.get("units", payment.get("units"))
        price = params.get("price_sat", payment.get("route_price_sat"))
        info = params.get("info", payment.get("info_url"))
        channels = params.get("channels", payment.get("channels_url"))
        if units is None or price is None or not info:
            raise ProtocolViolation("the payee's 402 names no route price (no Btcchannel challenge)")
        return cls(
            units=_int(units, "units"),
            price_sat=_int(price, "route price"),
            info_url=str(info),
            channels_url=str(channels or ""),
            network=params.get("network", payment.get("network")),
            mode=params.get("mode", payment.get("mode")),
            channel_id=params.get("channel", payment.get("channel_id")),
        )

    def units_for(self, metering: Metering) -> int:
        """The units to pay for under the channel's agreed ``metering``: ProtocolViolation unless
        the route's price is exactly its units at the agreed unit price (nothing is paid then)."""
        if self.units < 1:
            raise ProtocolViolation("the payee's 402 asks for no units")
        if metering.cost(self.units) != self.price_sat:
            raise ProtocolViolation(
                f"the route costs {self.price_sat} sat for {self.units} units, but the channel's agreed price "
                f"is {metering.price_sat} sat a unit: not paid"
            )
        return self.units


def is_challenge(status: int, headers: Mapping[str, str]) -> bool:
    """Whether an answer is a ``Btcchannel`` 402 challenge."""
    if status != 402:
        return False
    value = headers.get("WWW-Authenticate") or headers.get("www-authenticate") or ""
    return parse_www_authenticate(value) is not None


class PayingRequest(Protocol):
    """One request being paid (:class:`btcchannel.payer.buyer.Paying`): the headers of its next
    attempt, what came back (True: done), and the end of it."""

    async def headers(self) -> dict[str, str]: ...

    async def answered(self, status: int, headers: Mapping[str, str], body: bytes | None) -> bool: ...

    async def close(self) -> None: ...


class ChallengePayer(Protocol):
    """What the HTTP-client integrations (:mod:`btcchannel.payer.httpx_auth`,
    :mod:`btcchannel.payer.requests_auth`) need of a buyer (:class:`btcchannel.payer.buyer.Buyer`):
    its own event loop, reached from synchronous and asynchronous callers, and paying a challenge."""

    def call(self, coro: Coroutine[Any, Any, T]) -> T: ...

    async def acall(self, coro: Coroutine[Any, Any, T]) -> T: ...

    async def begin(self, method: str, url: str, challenge: Challenge, body: bytes | None = None) -> PayingRequest: ...
