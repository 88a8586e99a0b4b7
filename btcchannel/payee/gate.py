"""The payment-gating core every web framework adapter shares (aiohttp: :mod:`btcchannel.payee.sell`,
ASGI: :mod:`btcchannel.payee.asgi`; ``paid()`` of :mod:`btcchannel.payee.metered` is built on it).

A request to a paid route is admitted (:meth:`PaymentGate.admit`) from its method, request target
and headers: the channel named by ``X-Btcchannel-Channel``, the request's authentication, then a
prepay payment, a unit credit, or postpay credit, exactly as ``docs/PROTOCOL.md`` says. The
answer is either a :class:`Charge` (serve the request, then call :meth:`PaymentGate.served`
with its status: a failed request, 5xx or exception, is not charged) or a :class:`GateAnswer`
(send it as it is: the 402 that says how to pay, or a protocol error).

Prices are per route, in satoshis: a route costs ``price_sat // unit price`` units of the
channel's agreed price (the price must be a multiple of it; with a unit price of 1 sat any
price works).

The 402 carries ``WWW-Authenticate: Btcchannel realm=..., network=..., info=..., channels=...,
price_sat=..., units=..., mode=...`` and a JSON body ``{"payment": {...}}``: the fields of
:func:`btcchannel.wire.payment_required_body` plus absolute ``info_url`` and ``channels_url``,
``network``, the payee's ``terms``, the route's ``route_price_sat`` and, for a named channel,
its ``payee_pubkey``.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from btcchannel.core.terms import Metering
from btcchannel.errors import (
    ChannelError,
    CloseUneconomic,
    IllegalTransition,
    InternalError,
    NodeError,
    NotExpired,
    NotOpen,
    ProtocolViolation,
)
from btcchannel.payee.service import PayeeService
from btcchannel.store import PayeeRecord
from btcchannel.wire import (
    HDR_AUTH,
    HDR_CHANNEL,
    HDR_OWED,
    HDR_PAID,
    check_channel_id,
    parse_auth_header,
    parse_payment_headers,
    payment_required_body,
)

__all__ = ["Charge", "GateAnswer", "PaymentGate", "gate_of", "wire_error", "www_authenticate"]

log = logging.getLogger("btcchannel.payee.gate")


def wire_error(err: ChannelError) -> ChannelError:
    """What a payer is told (as the service's error middleware does): the payee's own failures
    are ``internal`` (logged), a channel that takes no payment now ``not_open``."""
    if isinstance(err, (NodeError, ProtocolViolation, IllegalTransition)):
        log.warning("paid request failed: %s", err)
        return InternalError(err.message)
    if isinstance(err, (NotExpired, CloseUneconomic)):
        return NotOpen(err.message)
    return err


@dataclass(frozen=True)
class Charge:
    """An admitted request: ``rec`` is the charged row (None for a free request)."""

    rec: PayeeRecord | None
    units: int
    metering: Metering | None = None


@dataclass(frozen=True)
class GateAnswer:
    """An answer the adapter sends instead of running the handler (402 or an error)."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def www_authenticate(params: Mapping[str, Any]) -> str:
    """``Btcchannel k="v", ...`` (RFC 9110 auth-params; quotes and backslashes escaped)."""
    def q(v: Any) -> str:
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
    return "Btcchannel " + ", ".join(f"{k}={q(v)}" for k, v in params.items() if v is not None)


class PaymentGate:
    """Admits paid requests for one payee service; ``protocol_url``: where its /v1 endpoints are
    reached (absolute, e.g. ``https://api.example/btc``), else the request's own origin."""

    #: a paid request is logged (event ``payment``) once, then every ``log_every`` requests
    log_every = 100

    def __init__(self, svc: PayeeService, protocol_url: str | None = None) -> None:
        self.svc = svc
        protocol_url = protocol_url or svc.config.public_url  # the configured public URL over the Host header
        self.protocol_url = protocol_url.rstrip("/") if protocol_url else None
        self._payments = 0

    def units_for(self, price_sat: int) -> int:
        """The units of the payee's unit price that make ``price_sat`` (ValueError unless a multiple)."""
        unit = self.svc.config.price_sat
        if price_sat < 1:
            raise ValueError("a paid route costs at least 1 sat")
        if unit < 1:
            raise ValueError("the payee's price_sat is 0: nothing is metered")
        if price_sat % unit:
            raise ValueError(f"{price_sat} sat is not a multiple of the unit price ({unit} sat)")
        return price_sat // unit

    def admit(self, method: str, target: str, headers: Mapping[str, str], units: int,
              origin: str) -> Charge | GateAnswer:
        """Admit a request for ``units`` units (``origin``: the request's ``scheme://host``)."""
        svc = self.svc
        try:
            cid_h = headers.get(HDR_CHANNEL)
            if cid_h is None:
                if not svc.config.metering.enabled:
                    return Charge(None, units)
                return self.payment_required(None, units, origin)
            cid = check_channel_id(cid_h)
            metering = svc.terms_of(svc.store.get(cid)).metering  # the channel's agreed terms
            if not metering.enabled:
                return Charge(None, units)
            counter, auth_sig = parse_auth_header(headers.get(HDR_AUTH))
            svc.authenticate(cid, counter, auth_sig, method, target)
            pay = parse_payment_headers(headers)
            if metering.mode == "prepay":
                if pay is None:
                    charged = svc.use_unit_credit(cid, units, counter)
                    if charged is None:
                        return self.payment_required(cid, units, origin)
                else:
                    charged = svc.charge_prepay(cid, pay[0], pay[1], units, counter)
            else:
                if pay is not None:
                    svc.pay_owed(cid, pay[0], pay[1])
                charged = svc.charge_postpay(cid, units, counter)
                if charged is None:
                    return self.payment_required(cid, units, origin)
            return Charge(charged, units, metering)
        except ChannelError as err:
            wire = wire_error(err)
            return GateAnswer(wire.http_status, wire.to_json())

    def served(self, charge: Charge, status: int) -> dict[str, str]:
        """The handler answered ``status``: charge it (headers to add) or, on 5xx, give the units back."""
        if charge.rec is None or charge.metering is None:
            return {}
        if status >= 500:
            self.svc.unserve(charge.rec, charge.units)
            return {}
        rec = self.svc.after_payment(charge.rec)
        self._payments += 1
        if self._payments == 1 or self._payments % self.log_every == 0:
            log.info("payment on %s: total %d sat (%d requests paid through this gate)", rec.channel_id,
                     rec.amount_sat, self._payments, extra={"event": "payment", "channel_id": rec.channel_id,
                                                            "amount_sat": rec.amount_sat, "payments": self._payments})
        return {HDR_PAID: str(rec.amount_sat), HDR_OWED: str(charge.metering.owed_total(rec.owed_sat, rec.amount_sat))}

    def failed(self, charge: Charge) -> None:
        """The handler raised: nothing was served, nothing is charged."""
        if charge.rec is not None and charge.metering is not None:
            self.svc.unserve(charge.rec, charge.units)

    def payment_required(self, cid: str | None, units: int, origin: str) -> GateAnswer:
        """The 402: the terms, absolute URLs to open a channel, the network, what to pay next."""
        svc = self.svc
        rec = svc.store.get(cid) if cid is not None else None
        metering = svc.terms_of(rec).metering if rec is not None else svc.config.metering
        body = payment_required_body(metering, units, rec)
        base = self.protocol_url or origin.rstrip("/")
        info = svc.info()
        payment = body["payment"]
        payment.update({
            "info_url": f"{base}/v1/info", "channels_url": f"{base}/v1/channels", "network": info["network"],
            "terms": info.get("terms"), "route_price_sat": metering.price_sat * units,
            "payee_pubkey": rec.params.get("payee_pubkey") if rec is not None else None,
        })
        header = www_authenticate({
            "realm": base, "network": info["network"], "info": payment["info_url"],
            "channels": payment["channels_url"], "price_sat": payment["route_price_sat"], "units": units,
            "mode": metering.mode, "channel": cid,
        })
        return GateAnswer(402, body, {"WWW-Authenticate": header})


_GATES: weakref.WeakKeyDictionary[PayeeService, PaymentGate] = weakref.WeakKeyDictionary()


def gate_of(svc: PayeeService) -> PaymentGate:
    """The service's own gate (one per service, so its payment log is sampled across requests)."""
    gate = _GATES.get(svc)
    if gate is None:
        gate = _GATES[svc] = PaymentGate(svc)
    return gate
