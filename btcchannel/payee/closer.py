"""The payee's closer: claim -> build -> broadcast -> bump -> rebroadcast a channel's close.

A close is *claimed* in the store first (the core's ``closing`` event, persisted by
``PayeeStore.claim_close``: no payment is accepted after that), then built from the best stored
payment at the close fee rate (configured, or the node's estimate; at most what the payment
affords), recorded with its raw transaction
(``set_close_tx``) *before* it is broadcast in the background; each channel's payout script
is fixed when it is proposed, so a restarted process rebuilds the same close (or a strictly
higher-fee replacement). ``operator_close`` works with the node down (the running service
broadcasts the claimed close). The watcher asks the closer to RBF-bump a close that stays
unconfirmed and to rebroadcast one that vanished from the mempool; a claim whose process
died before broadcasting is taken over after ``STALE_CLAIM_S``. Closes claimed together
(``claim_only`` then ``close_claimed``: the watcher's pass) share one transaction, and a bump
of such a close keeps every channel's payment (:class:`Batches`, below).

Operator entry points (for the CLI; usable while a service runs on the same datadir, the
store arbitrates; neither starts a service)::

    async def operator_close(config: ServerConfig, node: Node, channel_id: str) -> dict[str, Any]
    async def operator_bump(config: ServerConfig, node: Node, channel_id: str,
                            fee_rate_sat_vb: float | None = None) -> dict[str, Any]
    # both return the protocol's channel object (btcchannel.wire.channel_object)

Batched closes (:class:`Batches`, the closer's ``batches``): the channels the watcher claims in one
pass close in ONE transaction.

A batch is formed only from channels this process claimed in the same watcher pass (expiry
margin, agreed timed ends, and claims it adopts), at the end of that pass: no channel's first
broadcast waits longer than the pass that claimed it. The close is the core's
:func:`~btcchannel.core.channel.build_multi_close`: each payer's change at the output paired
with its input (SIGHASH_SINGLE), one payee output paying the sum of the payments minus the fee.

The payee output goes to the stored payout script of the batch's first channel in channel-id
order (deterministic, so a bump rebuilds the same layout): every stored payout script was fixed
by this payee when the channel was proposed (its configured address or a fresh address of its own
wallet, never anything the payer sent), so any of them pays the payee itself.

Every channel of a batch records the same close (raw transaction, txid, rate) before it is
broadcast and the same broadcast after it, so the per-channel machinery keeps working: a
restarted payee re-sends the recorded batch byte for byte (each member's ``resume``), a batch
that confirmed is final per channel at ``final_confirmations``, and a channel whose batch left
the mempool falls back to its own close (``rebroadcast``) or, raced by a refund, outbids it alone.

Not batched (each closes alone, exactly as before): a channel already within ``urgent_blocks``
of its expiry, one whose payment alone does not pay for a close, a pass with one channel due.
A bump of a batch (RBF) rebuilds it with every member's payment; a member that has become urgent
while the others have not is split out: the others' batch replaces the old one (paying more
than it and every descendant a payer hung on it), then the urgent channel's own close goes out
at the deadline rate. When the others' replacement is not made (pinned by a payer's child and
not worth outbidding yet, or refused), the urgent members are split out all the same: each
one's own close outbids the pinned batch with its child, if its payment affords it.

The batching is a component of the closer (:class:`Batches`, the closer's ``batches``), as claims
and bumps are aggregated in one place: it acts through the closer's lock, claims and leadership
(asked before every intent and broadcast) and logs as the closer (``btcchannel.payee.closer``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from typing import Any, Awaitable, Sequence

from btcchannel.bitcoind.chain import MempoolPackage, mempool_package
from btcchannel.bitcoind.errors import RpcAlreadyInChain, RpcVerifyError, RpcVerifyRejected
from btcchannel.bitcoind.rpc import Node
from btcchannel.core import script
from btcchannel.core.channel import PayeeChannel, build_multi_close, build_multi_close_at_most
from btcchannel.core.state import ChannelState
from btcchannel.core.terms import MIN_RELAY_FEE_RATE, bump_fee_rate, close_is_urgent, replacement_min_fee
from btcchannel.core.tx import OutPoint, tx_id, tx_vsize
from btcchannel.errors import ChannelError, CloseUneconomic, InternalError, NodeUnavailable, NothingToReplace
from btcchannel.payee.config import ServerConfig
from btcchannel.payee.leadership import AlwaysLeads, Leadership
from btcchannel.payee.shared import Channels
from btcchannel.store import PayeeRecord, PayeeStore
from btcchannel.wire import channel_object

__all__ = ["Batches", "Closer", "operator_close", "operator_bump", "is_uneconomic", "STALE_CLAIM_S"]

log = logging.getLogger("btcchannel.payee.closer")

#: a closing claim whose process never recorded a close txid is taken over after this
STALE_CLAIM_S = 30.0


def is_uneconomic(rec: PayeeRecord) -> bool:
    """Whether the channel's payments were found not to pay for any close (left to the payer's refund)."""
    return rec.close_uneconomic


class Closer:
    """Closes the channels of one payee (one per process; the store arbitrates between processes)."""

    def __init__(
        self,
        config: ServerConfig,
        store: PayeeStore,
        node: Node,
        channels: Channels | None = None,
        leadership: Leadership | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.node = node
        #: asked before every close intent and broadcast (a closer built alone always leads)
        self.leadership = leadership if leadership is not None else AlwaysLeads(store)
        self.channels = channels if channels is not None else Channels(store, config.close_margin_blocks)
        self.payee_script = b""
        self.claimed: set[str] = set()  # closes claimed by this process, not broadcast yet
        self._events: dict[str, asyncio.Event] = {}
        self.lock = asyncio.Lock()  # one close built, recorded and sent at a time
        self._tasks: set[asyncio.Task[Any]] = set()
        #: what the closer did that the chain alone does not show (exported as metrics):
        #: ``rebroadcast``: a recorded close the node no longer had, sent again by this process;
        #: ``pinned``: a close whose replacement had to outbid descendants the payer hung on it
        self.events: Counter[str] = Counter()
        #: the batching component: closes claimed in one watcher pass share one transaction
        self.batches = Batches(self)

    async def start(self) -> None:
        """Fix the payout script of the channels proposed from now on: the configured address, or a
        fresh node-wallet address (each channel stores its own, so a restart changes no close)."""
        cfg = self.config
        address = cfg.payee_address or await self.node.new_address()
        self.payee_script = script.check_payout_script(script.address_to_script(address, cfg.network))

    def payout_of(self, rec: PayeeRecord) -> bytes:
        """Where ``rec``'s close pays the payee: the script stored with the channel (rows of older
        releases have none: the process's own)."""
        if rec.payout_script is not None:
            return bytes.fromhex(rec.payout_script)
        if not self.payee_script:
            raise NodeUnavailable("no payout address yet (the node's wallet has not answered)")
        return self.payee_script

    async def aclose(self) -> None:
        """Wait for the background broadcasts."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def forget_except(self, live: set[str]) -> None:
        """Drop what this process remembers of channels that are no longer live (bounded memory)."""
        for cid in [c for c in self._events if c not in live and self._events[c].is_set()]:
            del self._events[cid]
        self.claimed &= live
        self.channels.prune(live)

    # -- claim ---------------------------------------------------------------------
    def _event(self, cid: str) -> asyncio.Event:
        ev = self._events.get(cid)
        if ev is None:
            ev = self._events[cid] = asyncio.Event()
        return ev

    async def close_done(self, cid: str) -> None:
        """Wait until this process finished its broadcast attempt for ``cid``."""
        await self._event(cid).wait()

    def claim(self, cid: str, reason: str, last: PayeeRecord | None = None) -> PayeeRecord | None:
        """Claim the close now (no more payments) and broadcast it in the background: the core's
        ``closing`` event, persisted by the store (decided again on the stored row if ``last``, the
        row as the caller last read it, is behind).

        Returns the claimed row, or None when the channel was not open or funding (someone
        else claimed it, or it ended). An instance that does not lead leaves the broadcast to the
        leader (:meth:`_leave_to_leader`)."""
        rec = self.store.claim_close(cid, reason, last)
        self.channels.invalidate(cid)
        if rec is not None:
            if self.leadership.held:
                self.claimed.add(cid)
                self._spawn(self._broadcast_safely(cid))
            else:
                self._leave_to_leader(cid)
        return rec

    async def claim_async(self, cid: str, reason: str, last: PayeeRecord | None = None) -> PayeeRecord | None:
        """:meth:`claim` with the claim committed through the store's group-commit writer (the
        payment path's: the event loop never waits on the disk)."""
        rec = await self.store.claim_close_async(cid, reason, last)
        self.channels.invalidate(cid)
        if rec is not None:
            if self.leadership.held:
                self.claimed.add(cid)
                self._spawn(self._broadcast_safely(cid))
            else:
                self._leave_to_leader(cid)
        return rec

    def _leave_to_leader(self, cid: str) -> None:
        """A close claimed by an instance that does not lead: released at once, so the leader's next
        watcher pass adopts and broadcasts it (no close intent is recorded here)."""
        self.store.release_close_claim(cid)
        log.info("close of %s claimed here; the leading instance sends it", cid)

    def claim_only(self, cid: str, reason: str, last: PayeeRecord | None = None) -> PayeeRecord | None:
        """Claim the close now (no more payments) without broadcasting it: the caller hands it to
        :meth:`close_claimed` (the watcher, at the end of its pass, to batch the closes it claimed)."""
        rec = self.store.claim_close(cid, reason, last)
        self.channels.invalidate(cid)
        if rec is not None:
            self.claimed.add(cid)
        return rec

    async def close_claimed(self, cids: list[str]) -> None:
        """Broadcast the closes claimed with :meth:`claim_only`: one transaction for those that can
        share it (:attr:`batches`), each of the others alone; logs failures."""
        await self.batches.close_claimed(cids)

    def done(self, cid: str) -> None:
        """This process finished its broadcast attempt for ``cid`` (wakes :meth:`close_done`)."""
        self._event(cid).set()

    async def broadcast_claimed(self, cid: str) -> None:
        """Broadcast one claimed close alone, logging (not raising) failures."""
        await self._broadcast_safely(cid)

    async def close(self, cid: str, reason: str, last: PayeeRecord | None = None) -> PayeeRecord:
        """Claim and broadcast the close of ``cid`` (no-op if someone else claimed it); the row after."""
        rec = self.claim(cid, reason, last)
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

    async def broadcast(
        self, cid: str, fee_rate: float | None, previous_txid: str | None, *, deadline: bool = False
    ) -> str | None:
        """Build our close at ``fee_rate`` (default: estimate), record it, broadcast it, record the
        broadcast. Returns the txid.

        ``previous_txid``: the close this one replaces (None for the first); nothing is done
        unless the row still records exactly that close. A replacement outbids the previous close
        with all its descendants (:meth:`replacement_floor`); ``deadline``: the payer's refund is
        near, so it does so up to what the payment affords, else only within
        ``max_fee_rate_sat_vb``."""
        async with self.lock:
            rec, recorded = await self.record_close(cid, fee_rate, previous_txid, deadline=deadline)
            if not recorded or rec.close_tx is None or rec.close_tx_txid is None:
                return rec.close_txid
            await self._send_recorded(rec)
            log.info(
                "close of %s broadcast: %s at %.2f sat/vB (%s sat to payee)",
                cid,
                rec.close_tx_txid,
                rec.close_fee_rate,
                rec.amount_sat,
            )
            return rec.close_tx_txid

    async def record_close(
        self, cid: str, fee_rate: float | None, previous_txid: str | None, *, deadline: bool = False
    ) -> tuple[PayeeRecord, bool]:
        """Build our close at ``fee_rate`` (default: estimate) and record it (raw transaction, txid,
        rate) *without* broadcasting it: the row after, and whether this call recorded a new close.

        A process that dies after this leaves a close that the next one sends byte for byte
        (:meth:`resume`)."""
        rec = self.store.get(cid)
        if rec.state is not ChannelState.CLOSING or rec.signature is None or rec.close_txid != previous_txid:
            return rec, False
        rate = fee_rate if fee_rate is not None else await self.fee_rate()
        rate = min(rate, self.config.max_fee_rate_sat_vb)
        ch = self.channels.build(rec)
        floor = 0
        if previous_txid is not None:
            # (a replacement's rate is at least 1 sat/vB above the old one's: that outbids a lone
            # close; the floor matters when a payer hung descendants on it)
            package = await mempool_package(self.node, previous_txid)
            if package is not None and package.pinned:
                vsize = tx_vsize(ch.build_close(self.payout_of(rec), MIN_RELAY_FEE_RATE))
                floor = self.replacement_floor(previous_txid, package, vsize, deadline=deadline, what=cid)
                if floor < 0:
                    return rec, False
        built = self._build(ch, rec, rate, bump=previous_txid is not None, min_fee_sat=floor)
        if built is None:
            return self.store.get(cid), False
        tx, rate = built
        recorded = self._intend(rec, tx, rate)
        return self.store.get(cid), recorded

    def _intend(self, rec: PayeeRecord, tx: Any, rate: float) -> bool:
        """Record ``tx`` as ``rec``'s close intent, as the leader (the store's compare-and-set is
        fenced by the leader epoch): False means it must not be broadcast."""
        cid = rec.channel_id
        txid = tx_id(tx)
        self.leadership.require()
        recorded = self.store.record_close_intent(cid, txid, tx.serialize().hex(), rate, rec.close_txid)
        if not recorded:
            log.info("close of %s not recorded (recorded by someone else meanwhile, or no longer the leader)", cid)
            return False
        self.claimed.discard(cid)
        return recorded

    async def _send_recorded(self, rec: PayeeRecord) -> None:
        """Broadcast the recorded close of ``rec`` (after :meth:`_intend`), then record the broadcast;
        only while this instance leads (:class:`~btcchannel.payee.leadership.NotLeader` otherwise)."""
        assert rec.close_tx is not None and rec.close_tx_txid is not None
        txid = rec.close_tx_txid
        self.leadership.require()
        try:
            sent = await self.node.broadcast(rec.close_tx)
        except RpcAlreadyInChain:
            sent = txid
        if sent != txid:
            raise InternalError(f"the node reports txid {sent} for our close {txid}")
        tip = await self.node.tip_height()
        if not self.store.set_close_tx(rec.channel_id, txid, rec.close_fee_rate or 0.0, tip, rec.close_txid):
            log.info("close of %s recorded by someone else meanwhile", rec.channel_id)

    async def resume(self, rec: PayeeRecord) -> bool:
        """A close recorded but not known to be broadcast (its process died in between, or the
        broadcast failed): send it byte for byte and record the broadcast. False if there is none."""
        if rec.close_tx_txid is None or rec.close_tx_txid == rec.close_txid:
            return False
        async with self.lock:
            fresh = self.store.get(rec.channel_id)
            if fresh.state is not ChannelState.CLOSING or fresh.close_tx_txid in (None, fresh.close_txid):
                return True
            await self._send_recorded(fresh)
            log.info("recorded close %s of %s sent", fresh.close_tx_txid, fresh.channel_id)
            return True

    def replacement_floor(
        self, previous_txid: str, package: MempoolPackage | None, vsize: int, *, deadline: bool, what: str
    ) -> int:
        """The least fee a replacement of ``vsize`` vbytes must pay to evict ``previous_txid`` (whose
        mempool entry is ``package``) and every descendant hanging on it (BIP125: ``fees.descendant``,
        not the close's own fee, plus the incremental relay fee); 0 when it is not in the mempool
        any more. When descendants (a payer's pinning child) are what it must outbid: -1 (no
        replacement now) if that costs more than ``max_fee_rate_sat_vb`` and the deadline is not
        near; near it, up to what the payment affords."""
        if package is None:
            return 0
        floor = replacement_min_fee(package.descendant_fee, vsize)
        if not package.pinned:
            return floor
        self.events["pinned"] += 1
        wait = not deadline and floor > math.floor(self.config.max_fee_rate_sat_vb * vsize)
        log.warning(
            "close %s of %s carries %d descendant(s) (%d vB, %d sat in all): a replacement must pay %d sat%s",
            previous_txid,
            what,
            package.descendant_count - 1,
            package.descendant_vsize - package.vsize,
            package.descendant_fee,
            floor,
            "; waiting for the deadline" if wait else "",
            extra={"event": "close_pinned", "txid": previous_txid},
        )
        return -1 if wait else floor

    def _build(
        self, ch: PayeeChannel, rec: PayeeRecord, rate: float, bump: bool, min_fee_sat: int = 0
    ) -> tuple[Any, float] | None:
        """Our close at ``rate`` (paying at least ``min_fee_sat``), or what the payment can afford;
        None if it affords no close at all."""
        payout = self.payout_of(rec)
        if min_fee_sat:
            try:
                tx = ch.build_close(payout, rate, min_fee_sat=min_fee_sat)
                return tx, (rec.deposit_sat - sum(o.nValue for o in tx.vout)) / tx_vsize(tx)
            except CloseUneconomic as err:
                raise CloseUneconomic(
                    f"a close of {rec.amount_sat} sat cannot pay the {min_fee_sat} sat its replacement needs: {err}"
                ) from err
        try:
            return ch.build_close(payout, rate), rate
        except CloseUneconomic:
            if not bump:
                try:
                    return ch.build_close(payout, MIN_RELAY_FEE_RATE), MIN_RELAY_FEE_RATE
                except CloseUneconomic:
                    # the payments don't cover a close: nothing to broadcast, the payer refunds after expiry
                    self.store.mark_uneconomic(rec.channel_id, rec)
                    log.warning(
                        "channel %s: %d sat do not pay for a close; left to the payer's refund",
                        rec.channel_id,
                        rec.amount_sat,
                    )
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
    async def bump(self, cid: str, fee_rate: float | None = None, *, deadline: bool = False) -> str | None:
        """RBF: replace our unconfirmed close with one at a higher fee rate. A close shared by several
        channels is replaced by one keeping every payment (:meth:`Batches.bump`; ``deadline``: the
        watcher's deadline bump, whose rate the batch decides per member)."""
        rec = self.store.get(cid)
        if rec.state is not ChannelState.CLOSING or rec.close_txid is None:
            return rec.close_txid
        group = self.batches.of(rec)
        if len(group) > 1:
            return await self.batches.bump(group, None if deadline else fee_rate)
        estimate = await self.fee_rate() if fee_rate is None else 0.0
        rate = bump_fee_rate(rec.close_fee_rate, fee_rate, self.config.bump_factor, estimate)
        return await self.broadcast(cid, rate, rec.close_txid, deadline=deadline)

    async def rebroadcast(self, rec: PayeeRecord) -> None:
        """Broadcast ``rec``'s close again (it left the mempool, or its process died before sending it):
        the recorded transaction byte for byte, or, if the node refuses it now, one at today's rate."""
        cid = rec.channel_id
        if rec.close_tx is not None and rec.close_tx_txid == rec.close_txid:
            self.leadership.require()
            try:
                await self.node.broadcast(rec.close_tx)
            except RpcAlreadyInChain:
                return
            except (RpcVerifyRejected, RpcVerifyError) as err:
                log.info("recorded close of %s refused again (%s): rebuilding it", cid, err)
            else:
                self._resent(cid, str(rec.close_tx_txid))
                return
        rate = max(rec.close_fee_rate or MIN_RELAY_FEE_RATE, await self.fee_rate())
        async with self.lock:
            fresh = self.store.get(cid)
            if fresh.close_txid != rec.close_txid or fresh.state is not ChannelState.CLOSING:
                return
            tx = self.channels.build(fresh).build_close(self.payout_of(fresh), rate)
            if self._intend(fresh, tx, rate):
                await self._send_recorded(self.store.get(cid))
                self._resent(cid, tx_id(tx))

    def _resent(self, cid: str, txid: str) -> None:
        """Count and log a close this process sent again because the node no longer had it (a
        restart without its mempool, an eviction, the close's block left the chain)."""
        self.events["rebroadcast"] += 1
        log.warning(
            "close %s of %s was in neither the node's mempool nor its chain: sent again",
            txid,
            cid,
            extra={"event": "close_rebroadcast", "channel_id": cid, "txid": txid},
        )

    async def outbid(self, rec: PayeeRecord, conflict_txid: str) -> str | None:
        """Replace an unconfirmed conflicting spend of the funding (the payer's refund, valid from
        expiry) with our close paying more than it: a refund in the mempool is not final. The
        close pays up to what the payment affords (``max_fee_rate_sat_vb`` does not cap this)."""
        cid = rec.channel_id
        package = await mempool_package(self.node, conflict_txid)
        if package is None:
            return None
        fee, vsize = package.descendant_fee, package.vsize  # its descendants are evicted with it too
        async with self.lock:
            fresh = self.store.get(cid)
            if fresh.state is not ChannelState.CLOSING or fresh.signature is None:
                return None
            ch = self.channels.build(fresh)
            payout = self.payout_of(fresh)
            need = replacement_min_fee(fee, tx_vsize(ch.build_close(payout, MIN_RELAY_FEE_RATE)))
            rate = max(package.fee / vsize, fresh.close_fee_rate or 0.0) * self.config.bump_factor
            try:
                tx = ch.build_close(payout, rate, min_fee_sat=need)
            except CloseUneconomic:
                tx, _ = ch.build_close_at_most(payout, 1e9)
            paid = fresh.deposit_sat - sum(o.nValue for o in tx.vout)
            if paid < need:
                raise CloseUneconomic(f"the payment cannot pay more than the conflict's {fee} sat fee")
            txid = tx_id(tx)
            if not self._intend(fresh, tx, paid / tx_vsize(tx)):
                return None
            await self._send_recorded(self.store.get(cid))
            log.warning("channel %s: %s replaced by our close %s (%d sat fee)", cid, conflict_txid, txid, paid)
            return txid


# ----------------------------------------------------------------------------- operator


async def _operator_closer(config: ServerConfig, node: Node, *, need_node: bool = True) -> Closer:
    closer = Closer(config, PayeeStore(config.db_path), node)
    try:
        await closer.start()
        await node.tip_height()
    except NodeUnavailable:
        if need_node:
            closer.store.close()
            raise
    except BaseException:
        closer.store.close()
        raise
    return closer


async def operator_close(config: ServerConfig, node: Node, channel_id: str) -> dict[str, Any]:
    """Close ``channel_id`` now with its best payment (the operator's end condition).

    Works with the node down: the close is claimed (no more payments) and, if it cannot be
    broadcast now, the claim is left to the running service, which broadcasts it at once."""
    closer = await _operator_closer(config, node, need_node=False)
    try:
        rec = closer.store.get(channel_id)
        # a proposal is cancelled; one funded meanwhile is closed instead
        cancelled = rec.state is ChannelState.PROPOSED and closer.store.end_proposal(
            channel_id, "cancelled_by_operator"
        )
        if not cancelled and closer.claim(channel_id, "operator") is not None:
            await closer.close_done(channel_id)
            after = closer.store.get(channel_id)
            if after.close_txid is None and not after.close_uneconomic:
                closer.store.release_close_claim(channel_id)
        await closer.aclose()
        return channel_object(closer.store.get(channel_id))
    finally:
        closer.store.close()


async def operator_bump(
    config: ServerConfig, node: Node, channel_id: str, fee_rate_sat_vb: float | None = None
) -> dict[str, Any]:
    """RBF-bump ``channel_id``'s unconfirmed close (default: ``bump_factor`` times its rate): its channel
    object with ``replaced_txid`` and both fee rates (``old_fee_rate_sat_vb``, ``new_fee_rate_sat_vb``).
    ``NothingToReplace`` when there is no close in the mempool (none, or confirmed) or it was not replaced."""
    closer = await _operator_closer(config, node)
    try:
        before = closer.store.get(channel_id)
        old = before.close_txid
        if before.state is not ChannelState.CLOSING or old is None:
            raise NothingToReplace(f"channel {channel_id} is {before.state.value}: it has no close to replace")
        confs = await node.tx_confirmations(old)
        if confs:
            raise NothingToReplace(
                f"the close {old} of channel {channel_id} is confirmed ({confs} confirmations): nothing to replace"
            )
        await closer.bump(channel_id, fee_rate_sat_vb)
        after = closer.store.get(channel_id)
        if after.close_txid in (None, old):
            raise NothingToReplace(f"the close {old} of channel {channel_id} was not replaced")
        return {
            **channel_object(after),
            "replaced_txid": old,
            "old_fee_rate_sat_vb": before.close_fee_rate,
            "new_fee_rate_sat_vb": after.close_fee_rate,
        }
    finally:
        closer.store.close()


class Batches:
    """The closer's batching component (:attr:`Closer.batches`): forms the batch of the closes a watcher
    pass claimed, records and sends it, and bumps a batch as a whole (splitting out urgent members).
    It works through its closer: the closer's lock, claims, leadership, store and node."""

    def __init__(self, closer: Closer) -> None:
        self.closer = closer

    def of(self, rec: PayeeRecord) -> list[PayeeRecord]:
        """The closing channels whose last broadcast close is ``rec``'s (``rec``'s batch; one row for
        a channel closing alone), in channel-id order."""
        if rec.close_txid is None:
            return [rec]
        rows = [r for r in self.closer.store.list([ChannelState.CLOSING]) if r.close_txid == rec.close_txid]
        return sorted(rows, key=lambda r: r.channel_id) or [rec]

    @staticmethod
    def _fee(members: list[PayeeRecord], tx: Any) -> int:
        return int(sum(m.deposit_sat for m in members) - sum(o.nValue for o in tx.vout))

    def _urgent(self, rec: PayeeRecord, tip: int) -> bool:
        return close_is_urgent(rec.expiry_height, tip, self.closer.config.close_margin_blocks)

    async def close_claimed(self, cids: Sequence[str]) -> None:
        """Broadcast the closes of ``cids`` (claimed by this process in this pass, not broadcast yet):
        one batch for those that can share it, each of the others alone. Never raises ChannelError
        (logged: the watcher retries a claimed close on its next pass)."""
        try:
            alone = await self._close_batch(list(cids))
        except ChannelError as err:
            log.warning("batched close of %d channels not broadcast yet (%s); the watcher retries", len(cids), err)
            alone = []
        for cid in alone:
            await self.closer.broadcast_claimed(cid)
        for cid in cids:
            self.closer.done(cid)

    async def _close_batch(self, cids: list[str]) -> list[str]:
        """Build, record and send the batch; returns the channels to close alone."""
        if len(cids) < 2:
            return cids
        tip = await self.closer.node.tip_height()
        rate = min(await self.closer.fee_rate(), self.closer.config.max_fee_rate_sat_vb)
        members: list[PayeeRecord] = []
        alone: list[str] = []
        for cid in sorted(cids):
            rec = self.closer.store.get(cid)
            if (
                rec.state is not ChannelState.CLOSING
                or rec.signature is None
                or rec.close_txid is not None
                or rec.close_tx_txid is not None
                or self._urgent(rec, tip)
            ):
                alone.append(cid)  # nothing to send, recorded already, or racing its deadline: alone
                continue
            try:  # a payment that does not pay for its own close is left to the single path's rules
                self.closer.channels.build(rec).build_close(self.closer.payout_of(rec), rate)
            except CloseUneconomic:
                alone.append(cid)
                continue
            members.append(rec)
        while len(members) >= 2:
            spent = await self._send_new(members, rate)
            if not spent:
                return alone
            # a funding spent meanwhile (a refund in the mempool): that channel is split out (its
            # recorded batch is refused, the watcher then outbids the spend); the others go on
            members = [m for m in members if m.channel_id not in spent]
        return alone + [m.channel_id for m in members]

    async def _send_new(self, members: list[PayeeRecord], rate: float) -> set[str]:
        """Record and send a first close for ``members``; the members whose funding turned out spent
        (the node refused the batch for them), else an empty set."""
        payout = self.closer.payout_of(members[0])
        tx = build_multi_close([self.closer.channels.build(m) for m in members], payout, rate)
        raw, txid = tx.serialize().hex(), tx_id(tx)
        async with self.closer.lock:
            if not self._record_intents(members, txid, raw, rate, None):
                return set()  # (the claims stay this process's: the next pass looks at them again)
            try:
                await self._send(raw, txid)
            except (RpcVerifyRejected, RpcVerifyError) as err:
                spent = {m.channel_id for m in members if await self._funding_spent(m)}
                if not spent:
                    raise
                log.warning("batched close %s refused (%s): %d channel(s) split out", txid, err, len(spent))
                return spent
            tip = await self.closer.node.tip_height()
            for m in members:
                self.closer.store.set_close_tx(m.channel_id, txid, rate, tip, None)
        log.info("batched close of %d channels broadcast: %s at %.2f sat/vB", len(members), txid, rate)
        return set()

    async def _funding_spent(self, rec: PayeeRecord) -> bool:
        assert rec.funding_txid is not None and rec.funding_vout is not None
        outpoint = OutPoint(rec.funding_txid, rec.funding_vout)
        return await self.closer.node.get_txout(outpoint, include_mempool=True) is None

    def _record_intents(
        self, members: list[PayeeRecord], txid: str, raw: str, rate: float, previous: str | None
    ) -> bool:
        """Record the shared close as every member's intent, all or none, as the leader (the store's
        compare-and-sets are fenced by the leader epoch). False: recorded for none, so it must not be
        broadcast (a member's close was recorded by someone else meanwhile, or this instance no
        longer leads)."""
        self.closer.leadership.require()
        if not self.closer.store.record_close_intents([m.channel_id for m in members], txid, raw, rate, previous):
            log.warning(
                "close %s of %d channels not recorded for all of them (recorded by someone else meanwhile,"
                " or no longer the leader): not broadcast",
                txid,
                len(members),
            )
            return False
        for m in members:
            self.closer.claimed.discard(m.channel_id)
        return True

    async def _send(self, raw: str, txid: str) -> None:
        self.closer.leadership.require()
        try:
            sent = await self.closer.node.broadcast(raw)
        except RpcAlreadyInChain:
            sent = txid
        if sent != txid:
            raise ChannelError(f"the node reports txid {sent} for our close {txid}")

    async def bump(self, group: list[PayeeRecord], fee_rate: float | None) -> str | None:
        """RBF: replace the unconfirmed batch close shared by ``group`` with one paying more that keeps
        every member's payment, outbidding the batch with every descendant hung on it (a payer's
        pinning child); members now within ``urgent_blocks`` of expiry (while others are not) are split
        out into their own close at ``max_fee_rate_sat_vb``. When the replacement of the others is
        refused or unaffordable (pinned), the urgent members are split out all the same, each of
        their own closes outbidding the pinned batch if its payment affords it. Returns the new txid."""
        cfg = self.closer.config
        old = group[0]
        assert old.close_txid is not None
        if await mempool_package(self.closer.node, old.close_txid) is None:
            return old.close_txid  # not in the mempool: the watcher rebroadcasts or adopts instead
        tip = await self.closer.node.tip_height()
        urgent = [m for m in group if self._urgent(m, tip)]
        rest = [m for m in group if not self._urgent(m, tip)]
        all_urgent = not rest
        if not rest or not urgent:
            rest, urgent = group, []
            if all_urgent:
                fee_rate = cfg.max_fee_rate_sat_vb if fee_rate is None else fee_rate
        estimate = await self.closer.fee_rate() if fee_rate is None else 0.0
        rate = min(bump_fee_rate(old.close_fee_rate, fee_rate, cfg.bump_factor, estimate), cfg.max_fee_rate_sat_vb)
        if not urgent and rate <= (old.close_fee_rate or 0.0):
            return old.close_txid  # at its cap already: nothing higher to replace it with
        try:
            txid = await self._replace(rest, old.close_txid, rate, deadline=all_urgent)
        except (CloseUneconomic, RpcVerifyRejected, RpcVerifyError) as err:
            split = urgent or (sorted(group, key=lambda m: -m.amount_sat) if all_urgent else [])
            if not split:
                raise
            log.warning(
                "replacement of batch %s not made (%s): its %d urgent channel(s) split out all the same",
                old.close_txid,
                err,
                len(split),
                extra={"event": "batch_pinned", "txid": old.close_txid},
            )
            return await self._split_out(split, old.close_txid, tip, pinned=True) or old.close_txid
        await self._split_out(urgent, old.close_txid, tip, pinned=False)
        return txid

    async def _split_out(self, urgent: list[PayeeRecord], previous: str, tip: int, *, pinned: bool) -> str | None:
        """Each urgent member's own close at the deadline rate, not delayed (outbidding ``previous``
        with its descendants while it is still in the mempool); the last txid sent, if any."""
        sent = None
        for m in urgent:
            log.warning(
                "channel %s is %d blocks from expiry: split out of batch %s%s",
                m.channel_id,
                m.expiry_height - tip,
                previous,
                " (pinned)" if pinned else "",
            )
            try:
                sent = (
                    await self.closer.broadcast(
                        m.channel_id, self.closer.config.max_fee_rate_sat_vb, previous, deadline=True
                    )
                    or sent
                )
            except ChannelError as err:
                if not pinned:
                    raise
                log.warning(
                    "channel %s: its own close cannot outbid the pinned batch %s either: %s",
                    m.channel_id,
                    previous,
                    err,
                )
        return sent

    async def _replace(self, members: list[PayeeRecord], previous: str, rate: float, *, deadline: bool) -> str:
        """Record and send a replacement of ``previous`` closing ``members`` at ``rate``, paying at least
        the fees of ``previous`` and of its descendants plus the incremental relay fee for its own size
        (BIP125; :meth:`Closer.replacement_floor`: CloseUneconomic when that is not worth it yet)."""
        payout = self.closer.payout_of(members[0])
        chs = [self.closer.channels.build(m) for m in members]
        tx = build_multi_close_at_most(chs, payout, rate)  # a deadline rate they cannot pay: the most they can
        package = await mempool_package(self.closer.node, previous)
        need = self.closer.replacement_floor(
            previous, package, tx_vsize(tx), deadline=deadline, what=f"{len(members)} channels"
        )
        if need < 0:
            raise CloseUneconomic(f"batch {previous} is pinned by its descendants: replaced at the deadline")
        if self._fee(members, tx) < need:
            tx = build_multi_close(chs, payout, rate, min_fee_sat=need)  # CloseUneconomic if they cannot
        rate = self._fee(members, tx) / tx_vsize(tx)
        raw, txid = tx.serialize().hex(), tx_id(tx)
        async with self.closer.lock:
            if not self._record_intents(members, txid, raw, rate, previous):
                return previous
            await self._send(raw, txid)
            tip = await self.closer.node.tip_height()
            for m in members:
                self.closer.store.set_close_tx(m.channel_id, txid, rate, tip, previous)
        log.info("batched close %s of %d channels replaced by %s at %.2f sat/vB", previous, len(members), txid, rate)
        return txid
