"""The payment-gating core every web framework adapter shares (aiohttp: :mod:`btcchannel.payee.sell`,
ASGI: :mod:`btcchannel.payee.asgi`; ``paid()`` of :mod:`btcchannel.payee.metered` is built on it).

A request to a paid route is admitted (``await`` :meth:`PaymentGate.admit`) from its method, raw
request target, headers, body and peer address: the transport (TLS or loopback), the channel named
by ``X-Btcchannel-Channel``, the request's authentication (auth v2 covers the body), then a prepay
payment, the prepaid surplus, or postpay credit within the channel's limit and the payee's
cross-channel caps, exactly as ``docs/PROTOCOL.md`` says; the exact retry of the last charged
request is admitted as a replay (served, not charged). The answer is either a :class:`Charge`
(serve the request, then ``await`` :meth:`PaymentGate.served` with its status, or ``await``
:meth:`PaymentGate.failed` if the handler raised before answering: a 5xx or an exception is not
charged) or a :class:`GateAnswer` (send it as it is: the 402 that says how to pay, or a protocol
error). Every answer naming a known channel carries its ``X-Btcchannel-State`` (and
``X-Btcchannel-End-Reason`` once it takes no payments). All writes go through the store's group
commit: nothing here waits on the disk on the event loop.

Prices are per route, in satoshis: a route costs ``price_sat // unit price`` units of the
channel's agreed price (the price must be a multiple of it; with a unit price of 1 sat any
price works).

The 402 carries ``WWW-Authenticate: Btcchannel realm=..., network=..., info=..., channels=...,
price_sat=..., units=..., mode=...`` and a JSON body ``{"payment": {...}, "error": {...}}``: the fields of
:func:`btcchannel.wire.payment_required_body` plus absolute ``info_url`` and ``channels_url``,
``network``, the payee's ``terms``, the route's ``route_price_sat`` and, for a named channel,
its ``payee_pubkey``.
"""

from __future__ import annotations

import ipaddress
import logging
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from btcchannel.core.state import ChannelState
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
    StalePayment,
    TlsRequired,
    Unauthorized,
)
from btcchannel.payee.service import PayeeService
from btcchannel.store import PayeeRecord
from btcchannel.wire import (
    HDR_AUTH,
    HDR_CHANNEL,
    HDR_END_REASON,
    HDR_OWED,
    HDR_PAID,
    HDR_STATE,
    PaidRequest,
    RequestAuth,
    check_channel_id,
    parse_auth,
    parse_payment_headers,
    payment_required_body,
)

__all__ = ["Charge", "GateAnswer", "PaymentGate", "gate_of", "state_headers", "wire_error", "www_authenticate"]

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
    """An admitted request: ``rec`` is the charged row (None for a free request); ``key`` the
    request's idempotency key; ``replay`` an exact retry of the last charged request (served again,
    charged nothing)."""

    rec: PayeeRecord | None
    units: int
    metering: Metering | None = None
    key: bytes | None = None
    replay: bool = False


@dataclass(frozen=True)
class GateAnswer:
    """An answer the adapter sends instead of running the handler (402 or an error)."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


#: the states in which a channel may still take payments (no end reason yet)
_TAKING_PAYMENTS = frozenset({ChannelState.PROPOSED, ChannelState.FUNDING, ChannelState.OPEN})


def state_headers(rec: PayeeRecord) -> dict[str, str]:
    """``X-Btcchannel-State`` (the channel's state) and, once it takes no more payments,
    ``X-Btcchannel-End-Reason``: on every metered answer that names a channel."""
    out = {HDR_STATE: rec.state.value}
    reason = rec.wire_end_reason
    if rec.state not in _TAKING_PAYMENTS and reason:
        out[HDR_END_REASON] = reason
    return out


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
        #: charged requests whose handler runs now, by idempotency key, and how many exact retries of
        #: each were served meanwhile: a served retry delivered the unit, so the original's failure
        #: gives nothing back (the key is dropped when the original ends)
        self._running: dict[bytes, int] = {}

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

    def secure(self, origin: str, peer: str | None) -> bool:
        """Whether a paid request may be served over this transport: TLS (``origin`` is https), a
        loopback peer, or an operator who opted out (``allow_plain_http``)."""
        if self.svc.config.allow_plain_http or origin.lower().startswith("https://"):
            return True
        try:
            return peer is not None and ipaddress.ip_address(peer.split("%")[0]).is_loopback
        except ValueError:
            return False

    async def admit(
        self,
        method: str,
        target: str,
        headers: Mapping[str, str],
        units: int,
        origin: str,
        *,
        body: bytes | None = None,
        peer: str | None = None,
    ) -> Charge | GateAnswer:
        """Admit a request for ``units`` units (``origin``: the request's ``scheme://host``; ``body``:
        the request's body, which auth v2 covers; ``peer``: the client's address).

        Checks, in order: a channel named (402 otherwise), the transport (``tls_required``), the
        channel (``unknown_channel``), the authentication (``unauthorized``), then the payment or
        credit. The channel's row is the one kept in memory (read once when it is not; every write
        is a compare-and-set, re-decided on the stored row when it loses); every write (the prepay
        payment, the surplus used, postpay credit) goes through the store's group commit, so the
        event loop never waits on the disk."""
        svc = self.svc
        rec: PayeeRecord | None = None
        try:
            cid_h = headers.get(HDR_CHANNEL)
            if cid_h is None:
                return self._unnamed(units, origin)
            if not self.secure(origin, peer):
                raise TlsRequired("paid requests need TLS (or a loopback client)")
            cid = check_channel_id(cid_h)
            rec = svc.row(cid)  # an open channel's row is kept in memory: no read per request
            metering = svc.terms_of(rec).metering  # the channel's agreed terms
            if not metering.enabled:
                return Charge(None, units)
            auth = parse_auth(headers.get(HDR_AUTH))
            rec, key, replay = self._authenticate(rec, auth, PaidRequest.of(method, target, headers, body))
            if replay:
                await svc.backup_holds_it()  # serving it again acknowledges its payment: the backup holds it
                return Charge(rec, units, metering, key, replay=True)
            pay = parse_payment_headers(headers)
            svc.require_fresh_chain()  # once: no payment, surplus or credit is used on a stale chain view
            charged: PayeeRecord | None
            try:
                if metering.mode == "prepay":
                    if pay is None:
                        charged = await svc.use_surplus(rec, units, auth.counter, key)
                    else:
                        charged = await svc.charge_prepay(rec, pay[0], pay[1], units, auth.counter, key)
                else:
                    if pay is not None:
                        rec = await svc.pay_owed(rec, pay[0], pay[1])
                    charged = await svc.charge_postpay(rec, units, auth.counter, key)
            except (StalePayment, Unauthorized) as err:
                replayed = self._retried_meanwhile(err, cid, auth.counter, key, units, metering)
                await svc.backup_holds_it()
                return replayed
            return self._charged(charged, cid, units, metering, key, origin)
        except ChannelError as err:
            return self._refused(err, rec)

    def _unnamed(self, units: int, origin: str) -> Charge | GateAnswer:
        """A request that names no channel: served free when the payee meters nothing, else the 402
        that says how to open one and pay."""
        if not self.svc.config.metering.enabled:
            return Charge(None, units)
        return self.payment_required(None, units, origin)

    def _authenticate(
        self, rec: PayeeRecord, auth: RequestAuth, request: PaidRequest
    ) -> tuple[PayeeRecord, bytes, bool]:
        """(the row the request is decided on, its idempotency key, whether it is an exact retry of the
        last charged request). Such a retry is served free only if the stored row (not just the kept
        one) says it is the last charged: it is then decided again on that row."""
        key, replay = self.svc.authenticate(rec, auth, request)
        if replay:
            self.svc.invalidate(rec.channel_id)
            rec = self.svc.row(rec.channel_id)
            key, replay = self.svc.authenticate(rec, auth, request)
        return rec, key, replay

    def _retried_meanwhile(
        self, err: ChannelError, cid: str, counter: int, key: bytes, units: int, metering: Metering
    ) -> Charge:
        """A charge refused as stale (or for its counter): a replay when the stored row shows that this
        same request, retried while its original was being charged, was charged meanwhile; else
        ``err`` stands."""
        now = self.svc.store.get(cid)
        if now.request_counter == counter and now.last_request == key:
            return Charge(now, units, metering, key, replay=True)
        raise err

    def _charged(
        self, charged: PayeeRecord | None, cid: str, units: int, metering: Metering, key: bytes, origin: str
    ) -> Charge | GateAnswer:
        """What the payment step gave: the 402 when nothing paid for the units (no payment, surplus
        or credit left), else the charge, whose handler now runs."""
        if charged is None:
            return self.payment_required(cid, units, origin, self.svc.store.get(cid))
        self._running[key] = 0
        return Charge(charged, units, metering, key)

    def _refused(self, err: ChannelError, rec: PayeeRecord | None) -> GateAnswer:
        """``err`` as the payer is told it (:func:`wire_error`), with the channel's state headers when
        the request named a known channel."""
        wire = wire_error(err)
        current = self.svc.store.find(rec.channel_id) if rec is not None else None
        return GateAnswer(wire.http_status, wire.to_json(), state_headers(current) if current is not None else {})

    async def served(self, charge: Charge, status: int) -> dict[str, str]:
        """The handler answered ``status``: charge it (headers to add) or, on 5xx, give the units back.
        Any status below 500 is served and charged (a 4xx of the handler included)."""
        if charge.rec is None or charge.metering is None:
            return {}
        if charge.replay:  # the last charged request again: served, charged once already
            if status < 500 and charge.key is not None and charge.key in self._running:
                self._running[charge.key] += 1  # its original still runs: this one delivered the unit
            return self._charged_headers(charge.metering, self.svc.store.get(charge.rec.channel_id))
        if status >= 500:
            await self._give_back(charge)
            return state_headers(self.svc.store.get(charge.rec.channel_id))
        self._ended(charge)
        rec = await self.svc.after_payment(charge.rec)
        self._payments += 1
        if self._payments == 1 or self._payments % self.log_every == 0:
            log.info(
                "payment on %s: total %d sat (%d requests paid through this gate)",
                rec.channel_id,
                rec.amount_sat,
                self._payments,
                extra={
                    "event": "payment",
                    "channel_id": rec.channel_id,
                    "amount_sat": rec.amount_sat,
                    "payments": self._payments,
                },
            )
        return self._charged_headers(charge.metering, rec)

    @staticmethod
    def _charged_headers(metering: Metering, rec: PayeeRecord) -> dict[str, str]:
        return {
            HDR_PAID: str(rec.amount_sat),
            HDR_OWED: str(metering.owed_total(rec.owed_sat, rec.amount_sat)),
            **state_headers(rec),
        }

    async def failed(self, charge: Charge) -> None:
        """The handler raised: nothing was served, nothing is charged (a replay was never charged)."""
        if charge.rec is not None and charge.metering is not None and not charge.replay:
            await self._give_back(charge)

    def _ended(self, charge: Charge) -> int:
        """The original of ``charge`` ended: the exact retries of it served meanwhile."""
        return self._running.pop(charge.key, 0) if charge.key is not None else 0

    async def _give_back(self, charge: Charge) -> None:
        """A charged request not served: its units back, unless a retry of it was served meanwhile."""
        assert charge.rec is not None
        if self._ended(charge):
            log.info("a retry of a failed request on %s was served: its units stay charged", charge.rec.channel_id)
            return
        await self.svc.unserve(charge.rec, charge.units, charge.key)

    def payment_required(self, cid: str | None, units: int, origin: str, rec: PayeeRecord | None = None) -> GateAnswer:
        """The 402: the terms, absolute URLs to open a channel, the network, what to pay next
        (``rec``: the channel's row when the caller has it)."""
        svc = self.svc
        if rec is None and cid is not None:
            rec = svc.store.get(cid)
        metering = svc.terms_of(rec).metering if rec is not None else svc.config.metering
        body = payment_required_body(metering, units, rec)
        base = self.protocol_url or origin.rstrip("/")
        info = svc.info()
        payment = body["payment"]
        payment.update(
            {
                "info_url": f"{base}/v1/info",
                "channels_url": f"{base}/v1/channels",
                "network": info["network"],
                "terms": info.get("terms"),
                "route_price_sat": metering.price_sat * units,
                "payee_pubkey": rec.params.get("payee_pubkey") if rec is not None else None,
            }
        )
        header = www_authenticate(
            {
                "realm": base,
                "network": info["network"],
                "info": payment["info_url"],
                "channels": payment["channels_url"],
                "price_sat": payment["route_price_sat"],
                "units": units,
                "mode": metering.mode,
                "channel": cid,
            }
        )
        return GateAnswer(402, body, {"WWW-Authenticate": header, **(state_headers(rec) if rec is not None else {})})


_GATES: weakref.WeakKeyDictionary[PayeeService, PaymentGate] = weakref.WeakKeyDictionary()


def gate_of(svc: PayeeService) -> PaymentGate:
    """The service's own gate (one per service, so its payment log is sampled across requests)."""
    gate = _GATES.get(svc)
    if gate is None:
        gate = _GATES[svc] = PaymentGate(svc)
    return gate
