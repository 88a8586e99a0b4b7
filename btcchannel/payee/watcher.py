"""The payee's chain watcher (runs inside the payee service).

Every ``poll_interval_s`` (and on demand through ``step()``) it recomputes
everything from the store and the node, so it is restart-safe by
construction: there are no in-memory timers.

- ``proposed``: lapses after ``proposal_ttl_s``.
- ``funding``: counts confirmations, opens at ``min_confirmations``; a funding
  transaction that vanished (double-spent) becomes ``failed`` with the
  conflicting txid.
- ``open``: closes at ``expiry_height - close_margin_blocks``; closes a
  postpay channel whose owed total was not paid within ``payment_timeout_s``;
  a funding outpoint spent by anything but our close is an on-chain exception
  (``refunded`` for the payer's refund, ``failed`` otherwise, with
  ``exception_txid``).
- ``closing``: broadcasts the close if the claim's process died before doing
  so, marks ``closed`` once our close (or one of its RBF replacements)
  confirmed, bumps the fee by RBF (``build_close`` at a higher rate) when it
  stayed unconfirmed for ``bump_after_blocks`` blocks, rebroadcasts a dropped
  close, and records a conflicting spend.

Operator entry points (for the CLI; usable while a server runs on the same
datadir, the store arbitrates)::

    async def operator_close(config: ServerConfig, node: Node, channel_id: str) -> dict[str, Any]
    async def operator_bump(config: ServerConfig, node: Node, channel_id: str,
                            fee_rate_sat_vb: float | None = None) -> dict[str, Any]
    # both return the channel object of server.channel_object
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from btcchannel.core.channel import (
    MIN_RELAY_FEE_RATE,
    ChannelState,
    Metering,
    PayeeChannel,
    bump_fee_rate,
    closing_height,
)
from btcchannel.errors import ChannelError, CloseUneconomic, NodeError
from btcchannel.store import PayeeRecord, PayeeStore
from btcchannel.core.tx import OutPoint

if TYPE_CHECKING:
    from btcchannel.bitcoind.rpc import Node
    from btcchannel.payee.service import PayeeService, ServerConfig

__all__ = ["Watcher", "operator_close", "operator_bump"]

log = logging.getLogger("btcchannel.payee.watcher")

#: a closing claim whose process never recorded a close txid is taken over after this
STALE_CLAIM_S = 30.0


class Watcher:
    """Chain watcher of one payee service."""

    def __init__(self, service: PayeeService) -> None:
        self.svc = service
        self.claimed: set[str] = set()   # closes claimed by this process
        self._events: dict[str, asyncio.Event] = {}
        self._lock = asyncio.Lock()

    @property
    def store(self) -> PayeeStore:
        return self.svc.store

    @property
    def node(self) -> Node:
        return self.svc.node

    # -- closing -----------------------------------------------------------------
    def _event(self, cid: str) -> asyncio.Event:
        ev = self._events.get(cid)
        if ev is None:
            ev = self._events[cid] = asyncio.Event()
        return ev

    async def close_done(self, cid: str) -> None:
        """Wait until this process finished its broadcast attempt for ``cid``."""
        await self._event(cid).wait()

    async def fee_rate(self) -> float:
        """The close fee rate: configured, or the node's estimate (with fallback)."""
        cfg = self.svc.config
        if cfg.close_fee_rate_sat_vb is not None:
            return cfg.close_fee_rate_sat_vb
        return await self.node.estimate_fee_rate(cfg.fee_conf_target, cfg.fallback_fee_rate_sat_vb)

    async def close(self, cid: str, reason: str) -> PayeeRecord:
        """Claim and broadcast the close of ``cid`` (no-op if someone else claimed it)."""
        rec = self.svc.claim_close(cid, reason)
        if rec is not None:
            await self.close_done(cid)
        return self.store.get(cid)

    async def broadcast_close_safely(self, cid: str) -> None:
        """Background task: broadcast a claimed close, logging (not raising) failures."""
        try:
            await self.broadcast_close(cid, None, None)
        except ChannelError as err:
            log.warning("close of %s not broadcast yet (%s); the watcher retries", cid, err)
        finally:
            self._event(cid).set()

    async def broadcast_close(self, cid: str, fee_rate: float | None, previous_txid: str | None) -> str | None:
        """Build our close at ``fee_rate`` (default: estimate), broadcast, record. Returns the txid."""
        async with self._lock:
            rec = self.store.get(cid)
            if rec.state != "closing" or rec.signature is None or rec.close_txid != previous_txid:
                return rec.close_txid
            rate = fee_rate if fee_rate is not None else await self.fee_rate()
            rate = min(rate, self.svc.config.max_fee_rate_sat_vb)
            ch = self.svc.build_channel(rec, state=ChannelState.OPEN)
            built = self._build_close(ch, rec, rate, bump=previous_txid is not None)
            if built is None:
                return None
            tx, rate = built
            txid = await self.node.broadcast(tx.serialize().hex())
            tip = await self.node.tip_height()
            if not self.store.set_close_tx(cid, txid, rate, tip, previous_txid):
                log.info("close of %s recorded by someone else meanwhile", cid)
            log.info("close of %s broadcast: %s at %.2f sat/vB (%s sat to payee)", cid, txid, rate, rec.amount_sat)
            self.claimed.discard(cid)
            return txid

    def _build_close(self, ch: PayeeChannel, rec: PayeeRecord, rate: float, bump: bool) -> tuple[Any, float] | None:
        """Our close at ``rate``, or what the payment can afford; None if it affords no close at all."""
        script = self.svc.payee_script
        try:
            return ch.build_close(script, rate), rate
        except CloseUneconomic:
            if not bump:
                try:
                    return ch.build_close(script, MIN_RELAY_FEE_RATE), MIN_RELAY_FEE_RATE
                except CloseUneconomic:
                    # the payments don't cover a close: nothing to broadcast, the payer refunds after expiry
                    self.store.mark_uneconomic(rec.channel_id)
                    log.warning("channel %s: %d sat do not pay for a close; left to the payer's refund",
                                rec.channel_id, rec.amount_sat)
                    return None
        # a bump the payment cannot afford: the most it can pay, if that still raises the rate
        tx, affordable = ch.build_close_at_most(script, rate)
        if affordable <= (rec.close_fee_rate or 0.0):
            raise CloseUneconomic(
                f"a close of {rec.amount_sat} sat cannot pay more than {affordable:.2f} sat/vB "
                f"and already pays {rec.close_fee_rate or 0.0:.2f}"
            )
        return tx, affordable

    async def bump(self, cid: str, fee_rate: float | None = None) -> str | None:
        """RBF: replace our unconfirmed close with one at a higher fee rate."""
        rec = self.store.get(cid)
        if rec.state != "closing" or rec.close_txid is None:
            return rec.close_txid
        estimate = await self.fee_rate() if fee_rate is None else 0.0
        rate = bump_fee_rate(rec.close_fee_rate, fee_rate, self.svc.config.bump_factor, estimate)
        return await self.broadcast_close(cid, rate, rec.close_txid)

    # -- the loop ------------------------------------------------------------------
    async def run(self) -> None:
        """Forever: ``step()`` every poll interval (errors are logged, never fatal)."""
        while True:
            try:
                await self.step()
            except ChannelError as err:
                log.warning("watcher step failed: %s", err)
            except Exception:  # a bug must not stop the watcher for good: log it, try again
                log.exception("watcher step crashed")
            await asyncio.sleep(self.svc.config.poll_interval_s)

    async def step(self) -> None:
        """One pass over every live channel."""
        tip = await self.node.tip_height()
        self.svc.tip_height = tip
        self.store.lapse_proposals()
        for rec in self.store.list(["funding", "open", "closing"]):
            try:
                await self._check(rec, tip)
            except ChannelError as err:
                log.warning("watcher: channel %s: %s", rec.channel_id, err)

    async def _check(self, rec: PayeeRecord, tip: int) -> None:
        if rec.state == "funding":
            await self._check_funding(rec)
        elif rec.state == "open":
            await self._check_open(rec, tip)
        elif rec.state == "closing":
            await self._check_closing(rec, tip)

    def _outpoint(self, rec: PayeeRecord) -> OutPoint:
        assert rec.funding_txid is not None and rec.funding_vout is not None
        return OutPoint(rec.funding_txid, rec.funding_vout)

    async def _check_funding(self, rec: PayeeRecord) -> None:
        cid = rec.channel_id
        info = await self.node.get_txout(self._outpoint(rec), include_mempool=True)
        if info is not None:
            if info.confirmations >= self.svc.config.min_confirmations:
                self.store.set_confirmations(cid, info.confirmations, open_now=True)
                self.svc.invalidate(cid)
            elif info.confirmations != rec.confirmations:
                self.store.set_confirmations(cid, info.confirmations, open_now=False)
            return
        if await self.node.tx_confirmations(self._outpoint(rec).txid) is None:
            # the funding transaction is gone: double-spent (or evicted)
            conflict = None
            for txid, vout in rec.funding_inputs:
                conflict = await self.node.find_spender(OutPoint(txid, int(vout)), rec.created_height)
                if conflict is not None:
                    break
            if conflict is not None:
                self.store.mark_exception(cid, "failed", conflict, "funding_double_spent")
                log.warning("funding of %s double-spent by %s", cid, conflict)
            return
        await self._spent_elsewhere(rec)

    async def _check_open(self, rec: PayeeRecord, tip: int) -> None:
        cid = rec.channel_id
        cfg = self.svc.config
        info = await self.node.get_txout(self._outpoint(rec), include_mempool=True)
        if info is None:
            await self._spent_elsewhere(rec)
            return
        if info.confirmations != rec.confirmations:
            self.store.set_confirmations(cid, info.confirmations, open_now=False)
        if tip >= closing_height(rec.expiry_height, cfg.close_margin_blocks):
            await self.close(cid, "expiry_margin")
            return
        if Metering.payment_overdue(rec.owed_sat, rec.amount_sat, rec.owed_since, time.time(), cfg.payment_timeout_s):
            await self.close(cid, "payment_timeout")

    async def _check_closing(self, rec: PayeeRecord, tip: int) -> None:
        cid = rec.channel_id
        cfg = self.svc.config
        if rec.close_txid is None:
            if rec.signature is None or rec.close_uneconomic:
                # ended without any (economic) payment: nothing to broadcast; the payer refunds after expiry
                if await self.node.get_txout(self._outpoint(rec), include_mempool=True) is None:
                    await self._spent_elsewhere(rec)
                return
            if cid in self.claimed or self.store.reclaim_stale_close(cid, time.time() - STALE_CLAIM_S):
                self.claimed.add(cid)
                try:
                    await self.broadcast_close(cid, None, None)
                except ChannelError as err:
                    log.warning("close of %s failed: %s", cid, err)
                    if await self.node.get_txout(self._outpoint(rec), include_mempool=True) is None:
                        await self._spent_elsewhere(rec)
            return
        conf = await self.node.tx_confirmations(rec.close_txid)
        if conf is not None and conf >= 1:
            self.store.mark_closed(cid, rec.close_txid)
            log.info("channel %s closed by %s", cid, rec.close_txid)
            return
        if conf == 0:
            if rec.close_height is not None and tip - rec.close_height >= cfg.bump_after_blocks:
                log.info("close of %s unconfirmed after %d blocks: RBF bump", cid, tip - rec.close_height)
                try:
                    await self.bump(cid)
                except NodeError as err:
                    log.warning("bump of %s refused: %s", cid, err)
            return
        # our last close is neither mined nor in the mempool: who spent the funding?
        spender = await self.node.find_spender(self._outpoint(rec), rec.created_height)
        if spender is None:
            try:
                await self._rebroadcast(rec)
            except NodeError as err:
                log.warning("rebroadcast of %s's close refused: %s", cid, err)
            return
        if spender in rec.close_txids:
            sconf = await self.node.tx_confirmations(spender)
            if sconf is not None and sconf >= 1:
                self.store.mark_closed(cid, spender)
            return
        await self._record_conflict(rec, spender)

    async def _rebroadcast(self, rec: PayeeRecord) -> None:
        cid = rec.channel_id
        rate = max(rec.close_fee_rate or MIN_RELAY_FEE_RATE, await self.fee_rate())
        async with self._lock:
            fresh = self.store.get(cid)
            if fresh.close_txid != rec.close_txid:
                return
            ch = self.svc.build_channel(fresh, state=ChannelState.OPEN)
            tx = ch.build_close(self.svc.payee_script, rate)
            txid = await self.node.broadcast(tx.serialize().hex())
            self.store.set_close_tx(cid, txid, rate, await self.node.tip_height(), rec.close_txid)

    async def _spent_elsewhere(self, rec: PayeeRecord) -> None:
        spender = await self.node.find_spender(self._outpoint(rec), rec.created_height)
        if spender is None:
            return
        if spender in rec.close_txids:
            conf = await self.node.tx_confirmations(spender)
            if conf is not None and conf >= 1:
                self.store.mark_closed(rec.channel_id, spender)
            return
        await self._record_conflict(rec, spender)

    async def _record_conflict(self, rec: PayeeRecord, spender: str) -> None:
        # decide on fresh data: a close may have been claimed and broadcast since ``rec`` was read
        rec = self.store.get(rec.channel_id)
        if rec.state in ("closed", "refunded", "failed"):
            return
        if spender in rec.close_txids:
            conf = await self.node.tx_confirmations(spender)
            if conf is not None and conf >= 1:
                self.store.mark_closed(rec.channel_id, spender)
            return
        if rec.state == "closing" and rec.close_txid is None and rec.signature is not None:
            return  # our close is being broadcast right now: look again next pass
        state, reason = "failed", "conflicting_spend"
        tx = await self.node.get_transaction(spender)
        if tx is not None:
            for vin in tx.get("vin", []):
                if vin.get("txid") == rec.funding_txid and vin.get("vout") == rec.funding_vout:
                    wit = vin.get("txinwitness", [])
                    if len(wit) == 3 and wit[1] == "":
                        state, reason = "refunded", "payer_refund"
                    elif len(wit) == 4 and rec.state == "closing":
                        # the payee branch: only this payee can sign it, so it is one of our closes
                        # (e.g. recorded by another process); adopt it
                        conf = int(tx.get("confirmations", 0))
                        if conf >= 1:
                            self.store.mark_closed(rec.channel_id, spender)
                        return
        self.store.mark_exception(rec.channel_id, state, spender, reason)
        self.svc.invalidate(rec.channel_id)
        log.warning("channel %s: funding spent by %s (%s)", rec.channel_id, spender, reason)


# ----------------------------------------------------------------------------- operator


async def _with_service(config: ServerConfig, node: Node) -> PayeeService:
    from btcchannel.payee.service import PayeeService

    svc = PayeeService(config, PayeeStore(config.db_path), node)
    await svc.start()
    return svc


async def operator_close(config: ServerConfig, node: Node, channel_id: str) -> dict[str, Any]:
    """Close ``channel_id`` now with its best payment (the operator's end condition)."""
    from btcchannel.payee.service import channel_object

    svc = await _with_service(config, node)
    try:
        rec = svc.store.get(channel_id)
        if rec.state == "proposed":
            svc.store.mark_exception(channel_id, "failed", None, "cancelled_by_operator")
        else:
            await svc.watcher.close(channel_id, "operator")
        await svc.aclose()
        return channel_object(svc.store.get(channel_id))
    finally:
        svc.store.close()


async def operator_bump(
    config: ServerConfig, node: Node, channel_id: str, fee_rate_sat_vb: float | None = None
) -> dict[str, Any]:
    """RBF-bump ``channel_id``'s unconfirmed close (default: ``bump_factor`` times its rate)."""
    from btcchannel.payee.service import channel_object

    svc = await _with_service(config, node)
    try:
        await svc.watcher.bump(channel_id, fee_rate_sat_vb)
        return channel_object(svc.store.get(channel_id))
    finally:
        svc.store.close()
