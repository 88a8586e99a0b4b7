"""The payee's closer: claim -> build -> broadcast -> bump -> rebroadcast a channel's close.

A close is *claimed* in the store first (``PayeeStore.claim_close``: no payment is accepted
after that), then built from the best stored payment at the close fee rate (configured, or
the node's estimate; at most what the payment affords), broadcast in the background, and
recorded (``set_close_tx``). The watcher asks the closer to RBF-bump a close that stays
unconfirmed and to rebroadcast one that vanished from the mempool; a claim whose process
died before broadcasting is taken over after ``STALE_CLAIM_S``.

Operator entry points (for the CLI; usable while a service runs on the same datadir, the
store arbitrates; neither starts a service)::

    async def operator_close(config: ServerConfig, node: Node, channel_id: str) -> dict[str, Any]
    async def operator_bump(config: ServerConfig, node: Node, channel_id: str,
                            fee_rate_sat_vb: float | None = None) -> dict[str, Any]
    # both return the protocol's channel object (btcchannel.wire.channel_object)
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable

from btcchannel.bitcoind.rpc import Node
from btcchannel.core import script
from btcchannel.core.channel import PayeeChannel
from btcchannel.core.state import ChannelState
from btcchannel.core.terms import MIN_RELAY_FEE_RATE, bump_fee_rate
from btcchannel.errors import ChannelError, CloseUneconomic
from btcchannel.payee.config import ServerConfig
from btcchannel.payee.shared import Channels
from btcchannel.store import PayeeRecord, PayeeStore
from btcchannel.wire import channel_object

__all__ = ["Closer", "operator_close", "operator_bump", "is_uneconomic", "STALE_CLAIM_S"]

log = logging.getLogger("btcchannel.payee.closer")

#: a closing claim whose process never recorded a close txid is taken over after this
STALE_CLAIM_S = 30.0


def is_uneconomic(rec: PayeeRecord) -> bool:
    """Whether the channel's payments were found not to pay for any close (left to the payer's refund)."""
    return rec.close_uneconomic


class Closer:
    """Closes the channels of one payee (one per process; the store arbitrates between processes)."""

    def __init__(self, config: ServerConfig, store: PayeeStore, node: Node, channels: Channels | None = None) -> None:
        self.config = config
        self.store = store
        self.node = node
        self.channels = channels if channels is not None else Channels(store, config.close_margin_blocks)
        self.payee_script = b""
        self.claimed: set[str] = set()   # closes claimed by this process, not broadcast yet
        self._events: dict[str, asyncio.Event] = {}
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        """Fix the payout script: the configured address, or a fresh node-wallet address."""
        cfg = self.config
        address = cfg.payee_address or await self.node.new_address()
        self.payee_script = script.check_payout_script(script.address_to_script(address, cfg.network))

    async def aclose(self) -> None:
        """Wait for the background broadcasts."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- claim ---------------------------------------------------------------------
    def _event(self, cid: str) -> asyncio.Event:
        ev = self._events.get(cid)
        if ev is None:
            ev = self._events[cid] = asyncio.Event()
        return ev

    async def close_done(self, cid: str) -> None:
        """Wait until this process finished its broadcast attempt for ``cid``."""
        await self._event(cid).wait()

    def claim(self, cid: str, reason: str) -> PayeeRecord | None:
        """Claim the close now (no more payments) and broadcast it in the background.

        Returns the claimed row, or None when the channel was not open or funding (someone
        else claimed it, or it ended)."""
        rec = self.store.claim_close(cid, reason)
        self.channels.invalidate(cid)
        if rec is not None:
            self.claimed.add(cid)
            self._spawn(self._broadcast_safely(cid))
        return rec

    async def close(self, cid: str, reason: str) -> PayeeRecord:
        """Claim and broadcast the close of ``cid`` (no-op if someone else claimed it); the row after."""
        rec = self.claim(cid, reason)
        if rec is not None:
            await self.close_done(cid)
        return self.store.get(cid)

    def adopt(self, cid: str) -> bool:
        """Whether this process is to broadcast ``cid``'s claimed close: claimed here, or a stale
        claim of a process that died before broadcasting (taken over now)."""
        if cid in self.claimed or self.store.reclaim_stale_close(cid, time.time() - STALE_CLAIM_S):
            self.claimed.add(cid)
            return True
        return False

    # -- build and broadcast ----------------------------------------------------------
    async def fee_rate(self) -> float:
        """The close fee rate: configured, or the node's estimate (with fallback)."""
        cfg = self.config
        if cfg.close_fee_rate_sat_vb is not None:
            return cfg.close_fee_rate_sat_vb
        return await self.node.estimate_fee_rate(cfg.fee_conf_target, cfg.fallback_fee_rate_sat_vb)

    async def _broadcast_safely(self, cid: str) -> None:
        """Background task: broadcast a claimed close, logging (not raising) failures."""
        try:
            await self.broadcast(cid, None, None)
        except ChannelError as err:
            log.warning("close of %s not broadcast yet (%s); the watcher retries", cid, err)
        finally:
            self._event(cid).set()

    async def broadcast(self, cid: str, fee_rate: float | None, previous_txid: str | None) -> str | None:
        """Build our close at ``fee_rate`` (default: estimate), broadcast, record. Returns the txid.

        ``previous_txid``: the close this one replaces (None for the first); nothing is done
        unless the row still records exactly that close."""
        async with self._lock:
            rec = self.store.get(cid)
            if rec.state is not ChannelState.CLOSING or rec.signature is None or rec.close_txid != previous_txid:
                return rec.close_txid
            rate = fee_rate if fee_rate is not None else await self.fee_rate()
            rate = min(rate, self.config.max_fee_rate_sat_vb)
            ch = self.channels.build(rec)
            built = self._build(ch, rec, rate, bump=previous_txid is not None)
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

    def _build(self, ch: PayeeChannel, rec: PayeeRecord, rate: float, bump: bool) -> tuple[Any, float] | None:
        """Our close at ``rate``, or what the payment can afford; None if it affords no close at all."""
        payout = self.payee_script
        try:
            return ch.build_close(payout, rate), rate
        except CloseUneconomic:
            if not bump:
                try:
                    return ch.build_close(payout, MIN_RELAY_FEE_RATE), MIN_RELAY_FEE_RATE
                except CloseUneconomic:
                    # the payments don't cover a close: nothing to broadcast, the payer refunds after expiry
                    self.store.mark_uneconomic(rec.channel_id)
                    log.warning("channel %s: %d sat do not pay for a close; left to the payer's refund",
                                rec.channel_id, rec.amount_sat)
                    return None
        # a bump the payment cannot afford: the most it can pay, if that still raises the rate
        tx, affordable = ch.build_close_at_most(payout, rate)
        if affordable <= (rec.close_fee_rate or 0.0):
            raise CloseUneconomic(
                f"a close of {rec.amount_sat} sat cannot pay more than {affordable:.2f} sat/vB "
                f"and already pays {rec.close_fee_rate or 0.0:.2f}"
            )
        return tx, affordable

    # -- bump and rebroadcast -----------------------------------------------------------
    async def bump(self, cid: str, fee_rate: float | None = None) -> str | None:
        """RBF: replace our unconfirmed close with one at a higher fee rate."""
        rec = self.store.get(cid)
        if rec.state is not ChannelState.CLOSING or rec.close_txid is None:
            return rec.close_txid
        estimate = await self.fee_rate() if fee_rate is None else 0.0
        rate = bump_fee_rate(rec.close_fee_rate, fee_rate, self.config.bump_factor, estimate)
        return await self.broadcast(cid, rate, rec.close_txid)

    async def rebroadcast(self, rec: PayeeRecord) -> None:
        """Broadcast ``rec``'s close again (it left the mempool), at no less than today's rate."""
        cid = rec.channel_id
        rate = max(rec.close_fee_rate or MIN_RELAY_FEE_RATE, await self.fee_rate())
        async with self._lock:
            fresh = self.store.get(cid)
            if fresh.close_txid != rec.close_txid:
                return
            ch = self.channels.build(fresh)
            tx = ch.build_close(self.payee_script, rate)
            txid = await self.node.broadcast(tx.serialize().hex())
            self.store.set_close_tx(cid, txid, rate, await self.node.tip_height(), rec.close_txid)


# ----------------------------------------------------------------------------- operator


async def _operator_closer(config: ServerConfig, node: Node) -> Closer:
    closer = Closer(config, PayeeStore(config.db_path), node)
    try:
        await closer.start()
        await node.tip_height()  # the node must answer before anything is claimed
    except BaseException:
        closer.store.close()
        raise
    return closer


async def operator_close(config: ServerConfig, node: Node, channel_id: str) -> dict[str, Any]:
    """Close ``channel_id`` now with its best payment (the operator's end condition)."""
    closer = await _operator_closer(config, node)
    try:
        rec = closer.store.get(channel_id)
        if rec.state is ChannelState.PROPOSED:
            closer.store.mark_exception(channel_id, ChannelState.FAILED, None, "cancelled_by_operator")
        else:
            await closer.close(channel_id, "operator")
        await closer.aclose()
        return channel_object(closer.store.get(channel_id))
    finally:
        closer.store.close()


async def operator_bump(
    config: ServerConfig, node: Node, channel_id: str, fee_rate_sat_vb: float | None = None
) -> dict[str, Any]:
    """RBF-bump ``channel_id``'s unconfirmed close (default: ``bump_factor`` times its rate)."""
    closer = await _operator_closer(config, node)
    try:
        await closer.bump(channel_id, fee_rate_sat_vb)
        return channel_object(closer.store.get(channel_id))
    finally:
        closer.store.close()
