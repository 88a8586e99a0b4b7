"""The payee's HTTP service (aiohttp): the wire protocol of ``docs/PROTOCOL.md``.

Entry points (what the CLI calls)::

    @dataclass
    class ServerConfig:                       # see the field list below; all amounts in sat
        datadir: Path; network: str = "regtest"; host: str = "127.0.0.1"; port: int = 0; ...

    class PayeeService:                       # the payee's logic (store + node + watcher), no HTTP
        def __init__(self, config: ServerConfig, store: PayeeStore, node: Node) -> None
        async def start(self) -> None         # payout address, tip; call before serving
        async def aclose(self) -> None

    def create_app(config: ServerConfig, store: PayeeStore, node: Node,
                   *, run_watcher: bool = True) -> aiohttp.web.Application
        # every endpoint of the protocol; the watcher runs as a background task of the app
        # (run_watcher=False: tests drive ``app[SERVICE].watcher.step()`` themselves)

    async def serve(config: ServerConfig, node: Node, *,
                    ready: Callable[[str], None] | None = None,
                    app_hook: Callable[[web.Application], None] | None = None) -> None
        # opens <datadir>/payee.db, binds host:port (port 0: a free one), writes
        # <datadir>/server.json {"url": ...}, calls ready(url), runs until cancelled
        # (e.g. SIGINT/SIGTERM), then shuts down cleanly. app_hook may add routes
        # (metered.add_file_route, an application's own paid handlers).

    def main(argv: list[str] | None = None) -> None
        # python -m btcchannel.payee.service CONFIG.json : {"config": {ServerConfig fields},
        #   "node": {"url": ..., "cookie_file": ..., "wallet": ...}, "file": optional path to sell}

Operator commands on a datadir (also usable while a server runs on it) live in
``btcchannel.payee.watcher``: ``operator_close`` and ``operator_bump``.

Design: requests are validated strictly (size limit, exact JSON fields and
types, hex, ranges) before anything touches the channel; every rule about
amounts, signatures and states is the core's (``btcchannel.core.channel``: the
proposal limits, the metered service's prepay/postpay amounts, credit and end
conditions included; ``ServerConfig.metering`` / ``.proposal_limits`` hand the
configured terms to it); a payment is answered 200 only after
``PayeeStore.record_payment`` committed it.
Errors leave as ``{"error": {"code", "message"}}`` with the code's HTTP status;
bad input never yields a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Awaitable, Callable

from aiohttp import web

from btcchannel.core import keys, script
from btcchannel.core.channel import (
    Capacity,
    ChannelParams,
    ChannelState,
    Metering,
    PayeeChannel,
    Payment,
    ProposalLimits,
    not_open_error,
)
from btcchannel.errors import (
    BadRequest,
    ChannelClosed,
    ChannelError,
    FundingMismatch,
    FundingNotFound,
    InternalError,
    NotOpen,
    StalePayment,
    TooLarge,
    TooManyChannels,
    UnknownChannel,
    WrongAmount,
)
from btcchannel.bitcoind.rpc import Node
from btcchannel.store import PayeeRecord, PayeeStore
from btcchannel.core.tx import OutPoint

__all__ = ["ServerConfig", "PayeeService", "create_app", "serve", "main", "SERVICE", "channel_object"]

log = logging.getLogger("btcchannel.payee.service")

MAX_BODY = 64 * 1024
_HEX_ID = re.compile(r"^[0-9a-f]{32}$")
_HEX_TXID = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class ServerConfig:
    """Everything the payee's service is configured with (amounts in satoshis)."""

    datadir: Path
    network: str = "regtest"
    host: str = "127.0.0.1"
    port: int = 0
    payee_address: str | None = None        # where closes pay; None: a fresh node-wallet address
    min_deposit_sat: int = 10_000
    max_deposit_sat: int = 100_000_000
    min_lifetime_blocks: int = 12
    max_lifetime_blocks: int = 4320
    close_margin_blocks: int = 6
    min_confirmations: int = 1
    proposal_ttl_s: float = 600.0           # an unfunded proposal lapses after this
    max_proposals: int = 100                # cap on unfunded proposals (too_many_channels)
    close_fee_rate_sat_vb: float | None = None   # None: the node's estimate
    fee_conf_target: int = 6
    fallback_fee_rate_sat_vb: float = 2.0
    bump_after_blocks: int = 3              # RBF-bump a close unconfirmed after this many blocks
    bump_factor: float = 2.0
    max_fee_rate_sat_vb: float = 1000.0
    poll_interval_s: float = 1.0            # watcher period
    price_sat: int = 0                      # metered service: price per unit (0: none)
    mode: str = "prepay"                    # "prepay" or "postpay"
    credit_limit_sat: int = 0               # postpay: unpaid total allowed
    payment_timeout_s: float = 30.0         # postpay: time to pay what is owed
    max_body_bytes: int = MAX_BODY

    def __post_init__(self) -> None:
        self.datadir = Path(self.datadir)
        script.check_network(self.network)
        try:
            self.metering  # noqa: B018 - the core validates the terms
            self.proposal_limits  # noqa: B018
        except ChannelError as err:
            raise ValueError(err.message) from None

    @property
    def metering(self) -> Metering:
        """The metered service's terms, as the core's rules."""
        return Metering(self.price_sat, self.mode, self.credit_limit_sat)

    @property
    def proposal_limits(self) -> ProposalLimits:
        """The accepted deposit range and channel lifetime, as the core's rules."""
        return ProposalLimits(self.min_deposit_sat, self.max_deposit_sat, self.min_lifetime_blocks, self.max_lifetime_blocks)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict of the fields."""
        d = asdict(self)
        d["datadir"] = str(self.datadir)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ServerConfig:
        """Inverse of ``to_json`` (unknown keys are an error)."""
        names = {f.name for f in fields(cls)}
        bad = set(d) - names
        if bad:
            raise ValueError(f"unknown config fields {sorted(bad)}")
        return cls(**d)

    @property
    def db_path(self) -> Path:
        return self.datadir / "payee.db"


def channel_object(rec: PayeeRecord) -> dict[str, Any]:
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
    }


# ----------------------------------------------------------------------------- validation


def _int(d: dict[str, Any], name: str, lo: int = 0, hi: int = 21_000_000 * 100_000_000) -> int:
    v = d[name]
    if isinstance(v, bool) or not isinstance(v, int):
        raise BadRequest(f"{name} must be an integer")
    if not lo <= v <= hi:
        raise BadRequest(f"{name} out of bounds")
    return v


def _hex(d: dict[str, Any], name: str, max_bytes: int = 1000) -> bytes:
    v = d[name]
    if not isinstance(v, str) or len(v) % 2 or len(v) > 2 * max_bytes or v != v.lower():
        raise BadRequest(f"{name} must be lowercase hex")
    try:
        return bytes.fromhex(v)
    except ValueError as exc:
        raise BadRequest(f"{name} must be lowercase hex") from exc


def _reject_constant(name: str) -> Any:
    raise BadRequest(f"invalid JSON constant {name}")


def _no_dupes(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise BadRequest(f"duplicate field {k}")
        out[k] = v
    return out


def parse_body(raw: bytes, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, Any]:
    """Strict JSON object: exactly the ``required`` fields plus any of ``optional``."""
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_dupes, parse_constant=_reject_constant)
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


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body, ``TooLarge`` beyond ``limit`` bytes (read no further than that)."""
    if request.content_length is not None and request.content_length > limit:
        raise TooLarge(f"request body over {limit} bytes")
    data = await request.content.read(limit + 1)
    if len(data) > limit:
        raise TooLarge(f"request body over {limit} bytes")
    return data


def check_channel_id(cid: str) -> str:
    """A well-formed channel id or ``UnknownChannel``."""
    if not _HEX_ID.match(cid):
        raise UnknownChannel("no such channel")
    return cid


# ----------------------------------------------------------------------------- service


class PayeeService:
    """The payee: validation + core + store + node. The HTTP layer is a thin shell over it."""

    def __init__(self, config: ServerConfig, store: PayeeStore, node: Node) -> None:
        from btcchannel.payee.watcher import Watcher  # the watcher needs the service's helpers

        self.config = config
        self.store = store
        self.node = node
        self.payee_script = b""
        self.tip_height = 0
        self._cache: dict[str, PayeeChannel] = {}
        self.watcher = Watcher(self)
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        """Fetch the tip and the payout script."""
        cfg = self.config
        address = cfg.payee_address or await self.node.new_address()
        self.payee_script = script.check_payout_script(script.address_to_script(address, cfg.network))
        self.tip_height = await self.node.tip_height()

    async def aclose(self) -> None:
        """Wait for background close tasks."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def spawn(self, coro: Awaitable[Any]) -> None:
        """Run ``coro`` in the background, keeping a reference."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- channel objects ----------------------------------------------------------
    def params_of(self, rec: PayeeRecord) -> ChannelParams:
        """The channel's parameters (with the funding outpoint once known)."""
        params = ChannelParams.from_json(rec.params)
        if rec.funding_txid is not None and rec.funding_vout is not None and params.funding is None:
            params = params.with_funding(OutPoint(rec.funding_txid, rec.funding_vout))
        return params

    def build_channel(self, rec: PayeeRecord, state: ChannelState | None = None) -> PayeeChannel:
        """A core ``PayeeChannel`` rebuilt from the stored row."""
        best = Payment(rec.amount_sat, rec.signature) if rec.signature is not None else None
        return PayeeChannel(
            self.params_of(rec), rec.privkey, state=state or ChannelState(rec.state), best=best,
            close_margin_blocks=self.config.close_margin_blocks,
        )

    def channel(self, cid: str) -> PayeeChannel:
        """The cached core channel of an open channel (rebuilt from the store on a miss)."""
        ch = self._cache.get(cid)
        if ch is None:
            rec = self.store.get(cid)
            ch = self.build_channel(rec)
            if rec.state == "open":
                self._cache[cid] = ch
        return ch

    def invalidate(self, cid: str) -> None:
        """Forget the cached channel (after any state change)."""
        self._cache.pop(cid, None)

    # -- proposals ---------------------------------------------------------------
    def propose(self, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /v1/channels``: validate and store a proposal."""
        cfg = self.config
        payer_pubkey = keys.check_public_key(_hex(body, "payer_pubkey", 65))
        payer_script = script.check_payout_script(_hex(body, "payer_script", 100))
        deposit = _int(body, "deposit_sat")
        expiry = _int(body, "expiry_height", 0, 500_000_000 - 1)
        max_units = _int(body, "max_units", 1) if body.get("max_units") is not None else None
        max_total = _int(body, "max_total_sat", 1) if body.get("max_total_sat") is not None else None
        tip = self.tip_height
        cfg.proposal_limits.check_proposal(deposit, expiry, tip)
        self.store.lapse_proposals()
        if self.store.count_proposals() >= cfg.max_proposals:
            raise TooManyChannels("too many unfunded proposals, try later")
        payee_priv = keys.generate_private_key()
        params = ChannelParams(
            network=cfg.network, payer_pubkey=payer_pubkey, payee_pubkey=keys.public_key(payee_priv),
            expiry_height=expiry, deposit_sat=deposit, payer_script=payer_script,
        )
        cid = secrets.token_hex(16)
        now = time.time()
        self.store.insert_proposal(
            PayeeRecord(
                channel_id=cid, state="proposed", params=params.to_json(), privkey=payee_priv,
                deposit_sat=deposit, expiry_height=expiry, created_at=now, lapse_at=now + cfg.proposal_ttl_s,
                max_units=max_units, max_total_sat=max_total, created_height=tip,
            )
        )
        return {
            "channel_id": cid,
            "payee_pubkey": params.payee_pubkey.hex(),
            "witness_script": params.witness_script.hex(),
            "funding_address": params.funding_address,
            "funding_script": params.funding_script.hex(),
            "deposit_sat": deposit,
            "expiry_height": expiry,
        }

    async def register_funding(self, cid: str, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /v1/channels/{id}/funding``: check the outpoint on the node and record it."""
        txid = body["txid"]
        if not isinstance(txid, str) or not _HEX_TXID.match(txid):
            raise BadRequest("txid must be 64 lowercase hex characters")
        vout = _int(body, "vout", 0, 100_000)
        rec = self.store.get(cid)
        if rec.state != "proposed":
            if rec.funding_txid == txid and rec.funding_vout == vout:
                return channel_object(rec)  # idempotent retry
            if rec.state == "failed":
                raise ChannelClosed("this proposal has lapsed")
            raise FundingMismatch("this channel already has a funding outpoint")
        params = self.params_of(rec)
        info = await self.node.get_txout(OutPoint(txid, vout), include_mempool=True)
        if info is None:
            raise FundingNotFound("no such unspent output (mempool or chain)")
        if info.value_sat != rec.deposit_sat or info.script != params.funding_script:
            raise FundingMismatch("the output does not pay exactly deposit_sat to funding_script")
        inputs: list[list[Any]] = []
        tx = await self.node.get_transaction(txid)
        if tx is not None:
            inputs = [[i["txid"], i["vout"]] for i in tx.get("vin", []) if "txid" in i]
        if not self.store.set_funding(cid, txid, vout, info.confirmations, inputs):
            return channel_object(self.store.get(cid))
        if info.confirmations >= self.config.min_confirmations:
            self.store.set_confirmations(cid, info.confirmations, open_now=True)
        self.invalidate(cid)
        return channel_object(self.store.get(cid))

    # -- payments ----------------------------------------------------------------
    @staticmethod
    def _state_error(rec: PayeeRecord) -> ChannelError:
        return not_open_error(ChannelState(rec.state))

    def accept(
        self, cid: str, amount_sat: int, signature: bytes, *, units_delta: int = 0, owed_sat: int | None = None
    ) -> PayeeRecord | None:
        """Verify with the core and durably store a payment: the stored row, or None for an exact retry.

        Returns only after the row is committed. Raises the core's errors.
        """
        for _attempt in range(3):
            ch = self.channel(cid)
            if ch.state != ChannelState.OPEN:
                raise self._state_error(self.store.get(cid))
            if not ch.accept_payment(amount_sat, signature, tip_height=self.tip_height):
                return None
            try:
                stored = self.store.record_payment(cid, amount_sat, signature, units_delta=units_delta, owed_sat=owed_sat)
            except BaseException:
                self.invalidate(cid)  # the cached channel already holds the payment the store may not
                raise
            if stored is not None:
                return stored
            # the row changed under us (another process, a close): decide again on fresh data
            self.invalidate(cid)
            rec = self.store.get(cid)
            if rec.state != "open":
                raise self._state_error(rec)
        raise InternalError("payment could not be stored (concurrent updates)")

    def verify_only(self, cid: str, amount_sat: int, signature: bytes) -> None:
        """Check a payment's signature and range without storing it (for wrong-amount handling)."""
        rec = self.store.get(cid)
        probe = self.build_channel(rec, state=ChannelState.OPEN)
        probe.accept_payment(amount_sat, signature)

    def end_condition(self, rec: PayeeRecord) -> str | None:
        """The agreed end condition a channel has reached, if any (checked after each payment)."""
        return self.config.metering.end_condition(
            units=rec.units, max_units=rec.max_units, paid_sat=rec.amount_sat, owed_sat=rec.owed_sat,
            max_total_sat=rec.max_total_sat, deposit_sat=rec.deposit_sat, capacity=lambda: self.capacity_of(rec),
        )

    def capacity_of(self, rec: PayeeRecord) -> Capacity:
        """Which cumulative amounts the channel can carry (the core's dust rule)."""
        return ChannelParams.from_json(rec.params).capacity

    def can_pay(self, rec: PayeeRecord, amount_sat: int) -> bool:
        """Whether the channel can carry a payment of ``amount_sat`` (the core's dust rule)."""
        return self.capacity_of(rec).carries(amount_sat)

    def after_payment(self, rec: PayeeRecord) -> PayeeRecord:
        """Check end conditions on a freshly stored row; start the close if one is met."""
        reason = self.end_condition(rec)
        if reason is not None:
            claimed = self.claim_close(rec.channel_id, reason)
            if claimed is not None:
                return claimed
        return rec

    def _stored(self, cid: str, rec: PayeeRecord | None) -> PayeeRecord:
        """The row after ``accept``: the one it stored, or the current one after an exact retry."""
        return self.after_payment(rec if rec is not None else self.store.get(cid))

    def claim_close(self, cid: str, reason: str) -> PayeeRecord | None:
        """Claim the close now (no more payments) and broadcast it in the background."""
        rec = self.store.claim_close(cid, reason)
        self.invalidate(cid)
        if rec is not None:
            self.watcher.claimed.add(cid)
            self.spawn(self.watcher.broadcast_close_safely(cid))
        return rec

    def pay(self, cid: str, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /v1/channels/{id}/payments`` (plus the postpay rule when metered)."""
        amount = _int(body, "amount_sat", 1)
        sig = _hex(body, "signature", 80)
        if self.config.metering.settles_owed:
            rec = self.pay_owed(cid, amount, sig)
        else:
            rec = self._stored(cid, self.accept(cid, amount, sig))
        return {"channel_id": cid, "amount_sat": rec.amount_sat, "state": rec.state}

    def pay_owed(self, cid: str, amount: int, sig: bytes) -> PayeeRecord:
        """Postpay: the payment must be exactly the owed total; anything else ends the channel."""
        rec = self.store.get(cid)
        if rec.state != "open":
            raise self._state_error(rec)
        try:
            settles = Metering.check_settlement(rec.owed_sat, rec.amount_sat, amount)
        except WrongAmount:
            self.verify_only(cid, amount, sig)  # a forged request must not end the channel
            self.claim_close(cid, "wrong_amount")
            raise
        # not settling: an exact retry (or a stale or forged payment, which accept refuses)
        return self._stored(cid, self.accept(cid, amount, sig, owed_sat=amount if settles else None))

    def charge_prepay(self, cid: str, amount: int, sig: bytes, units: int = 1) -> PayeeRecord:
        """Prepay: store the payment covering ``units`` more units (exactly previous total + price*units)."""
        rec = self.store.get(cid)
        if rec.state != "open":
            raise self._state_error(rec)
        Metering.check_units(rec.units, rec.max_units, units)
        try:
            self.config.metering.check_prepay(rec.amount_sat, amount, units)
        except WrongAmount:
            self.verify_only(cid, amount, sig)  # a forged request must not end the channel
            self.claim_close(cid, "wrong_amount")
            raise
        stored = self.accept(cid, amount, sig, units_delta=units)
        if stored is None:
            raise StalePayment("payment already used")
        return stored

    def charge_postpay(self, cid: str, units: int = 1) -> PayeeRecord | None:
        """Postpay: serve ``units`` on credit if the unpaid total stays within the limit (None if not)."""
        metering = self.config.metering
        for _attempt in range(5):
            rec = self.store.get(cid)
            if rec.state != "open":
                raise self._state_error(rec)
            Metering.check_units(rec.units, rec.max_units, units)
            new_owed = metering.credit(rec.owed_sat, rec.amount_sat, units, self.capacity_of(rec))
            if new_owed is None:
                return None
            if self.store.record_credit(cid, rec.owed_sat, new_owed, units):
                return self.store.get(cid)
        raise InternalError("credit could not be stored (concurrent updates)")

    def close_request(self, cid: str, body: dict[str, Any]) -> PayeeRecord:
        """``POST /v1/channels/{id}/close``: the payer's signed close request."""
        sig = _hex(body, "signature", 80)
        rec = self.store.get(cid)
        ch = self.build_channel(rec)
        ch.verify_close_request(cid, sig)
        if rec.state == "proposed":
            self.store.mark_exception(cid, "failed", None, "cancelled_by_payer")
        elif rec.state in ("open", "funding"):
            self.claim_close(cid, "payer_request")
        return self.store.get(cid)

    def info(self) -> dict[str, Any]:
        """``GET /v1/info``."""
        cfg = self.config
        return {
            "version": 1, "network": cfg.network, "tip_height": self.tip_height,
            "min_deposit_sat": cfg.min_deposit_sat, "max_deposit_sat": cfg.max_deposit_sat,
            "min_lifetime_blocks": cfg.min_lifetime_blocks, "max_lifetime_blocks": cfg.max_lifetime_blocks,
            "close_margin_blocks": cfg.close_margin_blocks, "min_confirmations": cfg.min_confirmations,
            "price_sat": cfg.price_sat, "mode": cfg.mode, "credit_limit_sat": cfg.credit_limit_sat,
        }


# ----------------------------------------------------------------------------- HTTP

SERVICE: web.AppKey[PayeeService] = web.AppKey("btcchannel_service", PayeeService)


def error_response(err: ChannelError) -> web.Response:
    """The protocol's error body with the code's status."""
    return web.json_response(err.to_json(), status=err.http_status)


@web.middleware
async def _errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    try:
        return await handler(request)
    except ChannelError as err:
        if err.code in ("node_error", "protocol_violation", "illegal_transition"):
            log.warning("%s %s: %s", request.method, request.path, err)
            return error_response(InternalError(err.message))
        if err.code in ("not_expired", "close_uneconomic"):
            return error_response(NotOpen(err.message))
        return error_response(err)
    except web.HTTPException as exc:
        if exc.status == 413:
            return error_response(TooLarge("request body too large"))
        if exc.status in (404, 405):
            return web.json_response(
                {"error": {"code": "bad_request", "message": f"no such endpoint: {request.method} {request.path}"}},
                status=exc.status,
            )
        raise
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        return error_response(InternalError("internal error"))


async def _info(request: web.Request) -> web.Response:
    return web.json_response(request.app[SERVICE].info())


async def _propose(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    body = parse_body(
        await read_body(request, svc.config.max_body_bytes),
        ("payer_pubkey", "deposit_sat", "expiry_height", "payer_script"),
        ("max_units", "max_total_sat"),
    )
    return web.json_response(svc.propose(body), status=201)


async def _funding(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    cid = check_channel_id(request.match_info["cid"])
    body = parse_body(await read_body(request, svc.config.max_body_bytes), ("txid", "vout"))
    return web.json_response(await svc.register_funding(cid, body))


async def _payment(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    cid = check_channel_id(request.match_info["cid"])
    body = parse_body(await read_body(request, svc.config.max_body_bytes), ("amount_sat", "signature"))
    return web.json_response(svc.pay(cid, body))


async def _get_channel(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    cid = check_channel_id(request.match_info["cid"])
    return web.json_response(channel_object(svc.store.get(cid)))


async def _close(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    cid = check_channel_id(request.match_info["cid"])
    body = parse_body(await read_body(request, svc.config.max_body_bytes), ("signature",))
    rec = svc.close_request(cid, body)
    # give the broadcast (ours, or another process's that won the claim) up to 10 s so the
    # answer can carry close_txid
    deadline = asyncio.get_running_loop().time() + 10.0
    while (
        rec.state == "closing" and rec.close_txid is None and rec.signature is not None
        and not rec.close_uneconomic
        and asyncio.get_running_loop().time() < deadline
    ):
        try:
            await asyncio.wait_for(svc.watcher.close_done(cid), timeout=0.05)
        except asyncio.TimeoutError:
            rec = svc.store.get(cid)
            continue
        rec = svc.store.get(cid)
        break  # our own broadcast attempt is over (failed ones are retried by the watcher)
    return web.json_response(channel_object(rec))


def create_app(config: ServerConfig, store: PayeeStore, node: Node, *, run_watcher: bool = True) -> web.Application:
    """The payee's aiohttp application (the watcher runs as its background task)."""
    app = web.Application(middlewares=[_errors], client_max_size=config.max_body_bytes)
    svc = PayeeService(config, store, node)
    app[SERVICE] = svc
    app.router.add_get("/v1/info", _info)
    app.router.add_post("/v1/channels", _propose)
    app.router.add_post("/v1/channels/{cid}/funding", _funding)
    app.router.add_post("/v1/channels/{cid}/payments", _payment)
    app.router.add_get("/v1/channels/{cid}", _get_channel)
    app.router.add_post("/v1/channels/{cid}/close", _close)

    async def lifecycle(app: web.Application) -> Any:
        await svc.start()
        task = asyncio.ensure_future(svc.watcher.run()) if run_watcher else None
        yield
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await svc.aclose()

    app.cleanup_ctx.append(lifecycle)
    return app


async def serve(
    config: ServerConfig,
    node: Node,
    *,
    ready: Callable[[str], None] | None = None,
    app_hook: Callable[[web.Application], None] | None = None,
) -> None:
    """Run the payee's service on ``config.host:config.port`` until cancelled."""
    config.datadir.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = PayeeStore(config.db_path)
    app = create_app(config, store, node)
    if app_hook is not None:
        app_hook(app)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port)
        await site.start()
        server = site._server
        assert server is not None and hasattr(server, "sockets")
        port = server.sockets[0].getsockname()[1]
        url = f"http://{config.host}:{port}"
        tmp = config.datadir / "server.json.tmp"
        tmp.write_text(json.dumps({"url": url, "pid": os.getpid()}))
        os.replace(tmp, config.datadir / "server.json")
        log.info("payee service on %s", url)
        if ready is not None:
            ready(url)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        store.close()


def main(argv: list[str] | None = None) -> None:
    """``python -m btcchannel.payee.service CONFIG.json``: run a payee service (SIGTERM/SIGINT stop it cleanly)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m btcchannel.payee.service CONFIG.json")
    spec = json.loads(Path(args[0]).read_text())
    config = ServerConfig.from_json(spec["config"])
    n = spec["node"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    async def run() -> None:
        node = Node(n["url"], cookie_file=Path(n["cookie_file"]) if n.get("cookie_file") else None,
                    auth=tuple(n["auth"]) if n.get("auth") else None, wallet=n.get("wallet"))
        hook = None
        if spec.get("file"):
            from btcchannel.payee.metered import add_file_route

            def hook(app: web.Application) -> None:
                add_file_route(app, Path(spec["file"]), chunk_size=int(spec.get("chunk_size", 1024)))

        task = asyncio.ensure_future(serve(config, node, app_hook=hook))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await node.aclose()

    asyncio.run(run())


if __name__ == "__main__":
    main()
