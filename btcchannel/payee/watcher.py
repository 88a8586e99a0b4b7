"""The payee's chain watcher (runs as a background task of the payee's HTTP app).

Every ``poll_interval_s``, at once when the node announces a new block over ZMQ
(``-zmqpubhashblock``, found with ``getzmqnotifications``; polling alone otherwise), and on
demand through ``step()``, it recomputes
everything from the store and the node, so it is restart-safe by
construction: there are no in-memory timers. A separate task (``follow_tip``) keeps the
shared :class:`~btcchannel.payee.shared.ChainTip` fresh whatever a pass costs (the service
refuses payments on a stale tip); every close is left to the
:class:`~btcchannel.payee.closer.Closer`.

The node needs no transaction index: the follower notes the block of every watched transaction
and spend it reads (:meth:`Node.note_block`, :meth:`Node.note_spend`), and a pruned node is
refused at start only when it deleted a block after the last one processed (``node_pruned``).

- ``proposed``: lapses after ``proposal_ttl_s``.
- ``funding``: counts confirmations, opens at ``min_confirmations`` (at least
  1); a funding transaction that vanished (double-spent) becomes ``failed``
  with the conflicting txid once that conflict has ``final_confirmations``.
- ``open`` whose funding left the active chain (a reorg) or fell below
  ``min_confirmations``: back to ``funding`` at once, so payments are refused
  (``not_open``) until the funding is back at depth.
- ``open``: closes at ``expiry_height - close_margin_blocks``; closes a
  postpay channel whose owed total was not paid within its agreed payment timeout (and a prepay
  channel idle past its agreed idle timeout, or any channel past its agreed end time);
  a funding outpoint spent by anything but our close is an on-chain exception
  (``refunded`` for the payer's refund, ``failed`` otherwise, with
  ``exception_txid``); a close of ours sent outside the service (``--close-tx``) claims the
  close at once (no more payments) and is adopted at final depth. The closes a pass claims
  are sent at the end of that pass, in one transaction for those that can share it
  (:mod:`btcchannel.payee.batch`).
- ``closing``: broadcasts the close if the claim's process died before doing
  so, marks ``closed`` once our close (or one of its RBF replacements)
  confirmed, bumps the fee by RBF when it stayed unconfirmed for
  ``bump_after_blocks`` blocks, rebroadcasts a dropped close, and records a
  conflicting spend.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from btcchannel.bitcoind.chain import BlockFollower, chain_state, mempool_spender, require_blocks_after
from btcchannel.bitcoind.notify import BlockNotifier
from btcchannel.bitcoind.rpc import Node
from btcchannel.core.state import ChannelState, SpendKind, classify_spend
from btcchannel.core.terms import close_is_urgent, closing_height
from btcchannel.core.tx import OutPoint
from btcchannel.errors import ChannelError, NodeError
from btcchannel.payee.closer import Closer, is_uneconomic
from btcchannel.payee.config import ServerConfig
from btcchannel.payee.shared import ChainTip, agreed_terms
from btcchannel.store import PayeeRecord, PayeeStore

__all__ = ["Watcher"]

log = logging.getLogger("btcchannel.payee.watcher")


def _touched(live: list[PayeeRecord], blocks: list[dict[str, Any]], node: Node | None = None) -> set[str]:
    """The channels a block touches: its funding or close transaction, or a spend of the funding
    output or of the funding's inputs (a double-spend).

    With ``node``, each watched transaction and spend found is noted there with its block (the
    follower's own index: later lookups by txid need no ``-txindex``)."""
    if not blocks:
        return set()
    txids: dict[str, str] = {}
    outpoints: dict[tuple[str, int], str] = {}
    for rec in live:
        cid = rec.channel_id
        if rec.funding_txid is not None and rec.funding_vout is not None:
            txids[rec.funding_txid] = cid
            outpoints[(rec.funding_txid, rec.funding_vout)] = cid
        for txid in rec.close_txids:
            txids[txid] = cid
        for txid, vout in rec.funding_inputs:
            outpoints[(str(txid), int(vout))] = cid
    touched: set[str] = set()
    for block in blocks:
        block_hash, height = str(block.get("hash")), int(block.get("height", -1))
        for tx in block.get("tx", []):
            txid = str(tx.get("txid"))
            hit = txids.get(txid)
            if hit is not None:
                touched.add(hit)
                if node is not None:
                    node.note_block(txid, block_hash)
            for vin in tx.get("vin", []):
                spent = (str(vin.get("txid")), int(vin.get("vout", -1)))
                hit = outpoints.get(spent)
                if hit is not None:
                    touched.add(hit)
                    if node is not None:
                        node.note_spend(OutPoint(*spent), txid, height, block_hash)
    return touched


def _outpoint(rec: PayeeRecord) -> OutPoint:
    assert rec.funding_txid is not None and rec.funding_vout is not None
    return OutPoint(rec.funding_txid, rec.funding_vout)


class Watcher:
    """Chain watcher of one payee: follows every live channel and hands closes to the closer."""

    def __init__(self, config: ServerConfig, store: PayeeStore, node: Node, closer: Closer, tip: ChainTip) -> None:
        self.config = config
        self.store = store
        self.node = node
        self.closer = closer
        self.tip = tip
        self.follower = BlockFollower(node, store.chain_cursor())
        self._full_pass = True  # the first pass looks at every channel
        self.notifier: BlockNotifier | None = None  # the node's block announcements, while run() runs
        self._retry: set[str] = set()  # channels the last pass failed to look at
        self._claims: list[str] | None = None  # closes claimed by this pass, sent (batched) at its end

    async def start(self) -> None:
        """Check the node still has the blocks this payee has to read, then fetch the tip (before the
        service answers anything).

        No transaction index is needed (the follower notes where it sees each watched transaction
        and spend), and a pruned node will do as long as it keeps every block after the last one
        processed: :class:`~btcchannel.errors.NodePruned` otherwise (a restart after an outage
        longer than the node's prune window), since a funding or spend in a deleted block would
        go unseen."""
        await self.check_blocks_kept()
        await self.refresh_tip()

    async def check_blocks_kept(self) -> None:
        """:class:`~btcchannel.errors.NodePruned` if the node pruned a block after the last one
        this payee processed (nothing to check on a first start)."""
        cursor = self.store.chain_cursor()
        if cursor is not None:
            await require_blocks_after(self.node, cursor[0])

    async def refresh_tip(self) -> int:
        """Ask the node for its tip and update the shared :class:`ChainTip` (its height)."""
        self.tip.update(await chain_state(self.node), self.config.network, self.config.block_age_bound_s)
        return self.tip.height

    async def _pause(self, seen: int) -> None:
        """Wait out the poll interval, or less: until a block is announced after ``seen`` announcements."""
        if self.notifier is None:
            await asyncio.sleep(self.config.poll_interval_s)
        else:
            await self.notifier.wait(seen, self.config.poll_interval_s)

    def _seen(self) -> int:
        return 0 if self.notifier is None else self.notifier.count

    async def follow_tip(self) -> None:
        """Forever: refresh the tip every poll interval (and on a new block's announcement),
        independently of the (maybe slow) passes.

        The service refuses payments once the last successful refresh is older than
        ``max_tip_age_s``; an outage is logged once, and its end."""
        down = False
        while True:
            seen = self._seen()
            try:
                await self.refresh_tip()
                if down:
                    log.warning("the node answers again (tip %d)", self.tip.height)
                down = False
            except ChannelError as err:
                if not down:
                    log.warning("the node's tip cannot be fetched: %s", err)
                down = True
            except Exception:  # a bug must not stop the tip for good
                log.exception("tip refresh crashed")
            await self._pause(seen)

    # -- the loop ------------------------------------------------------------------
    async def run(self) -> None:
        """``step()`` every poll interval, and at once when the node announces a block
        (errors are logged, never fatal), for as long as this instance leads: the leadership is
        checked before every step (:meth:`_leads`), and ``run`` returns once it is lost. The
        announcements are the node's ``pubhashblock`` endpoint, if ``getzmqnotifications`` lists
        one; a lost announcement costs at most one poll interval."""
        self._resume_as_leader()
        try:
            self.notifier = await BlockNotifier.discover(self.node)
        except Exception:  # the notifications are an optimisation: never a reason not to watch
            log.exception("block notifications unavailable: polling only")
        try:
            while self._leads():
                seen = self._seen()
                try:
                    await self.step()
                except ChannelError as err:
                    log.warning("watcher step failed: %s", err)
                except Exception:  # a bug must not stop the watcher for good: log it, try again
                    log.exception("watcher step crashed")
                await self._pause(seen)
        finally:
            notifier, self.notifier = self.notifier, None
            if notifier is not None:
                await notifier.aclose()

    def _resume_as_leader(self) -> None:
        """Start leading from what the store says (another instance may have led meanwhile)."""
        self.follower = BlockFollower(self.node, self.store.chain_cursor())
        self._full_pass = True

    def _leads(self) -> bool:
        """Whether this instance (still) leads: checked before every step (see ``Leadership``)."""
        return self.closer.leadership.holds()

    async def step(self) -> None:
        """One pass: the new blocks (each fetched once), then every channel that needs a look.

        An ``open`` channel is looked at only when a new block touches it (its funding, a spend
        of it), when it reached its closing height or one of its agreed timed ends; ``funding`` and
        ``closing`` channels every pass; all of them on the first pass and after a reorganisation.
        A channel a pass could not look at (the node failed) is looked at again by the next one.
        """
        tip = await self.refresh_tip()
        self.store.lapse_proposals()
        self.store.prune(time.time() - self.config.retention_s)
        if self.tip.problem is not None or self.tip.best_hash is None:
            log.warning("watcher pass skipped: %s", self.tip.problem)
            return
        live = self.store.list([ChannelState.FUNDING, ChannelState.OPEN, ChannelState.CLOSING])
        before = self.follower.height
        advance = await self.follower.advance(self.tip.best_hash)
        self._note_followed(before, advance.restart)
        full = self._full_pass or advance.reorg or advance.restart
        if advance.reorg:
            log.warning("chain reorganised: back to block %d, now at %d", self.follower.height, tip)
        seen = _touched(live, advance.blocks, self.node)  # (also notes where each was seen)
        touched = set() if full else seen | self._retry
        if not full and advance.blocks:
            # an open channel is looked at only when a block touches it: keep its depth current
            self.store.add_confirmations(len(advance.blocks))
        retry: set[str] = set()  # channels this pass could not look at: looked at again next pass
        claims: list[str] = []
        self._claims = claims  # (a concurrent pass may replace it: each pass sends the list it made)
        try:
            for rec in live:
                if not self.closer.leadership.held:
                    break  # lost meanwhile (the closer found out): stop acting at once
                if not (full or rec.channel_id in touched or self._due(rec, tip)):
                    continue
                try:
                    await self.check(rec, tip)
                except ChannelError as err:
                    retry.add(rec.channel_id)
                    log.warning("watcher: channel %s: %s", rec.channel_id, err)
            if self._claims is claims:
                self._claims = None
            self.closer.leadership.require()  # (no-op while it leads) lost meanwhile: act no further
            await self.closer.close_claimed(claims)  # one transaction for those that can share it
        except BaseException:
            self._full_pass = True  # the blocks are consumed: the next pass looks at every channel
            raise  # (closes claimed and not sent are in closer.claimed: the next pass sends them)
        finally:
            if self._claims is claims:
                self._claims = None
        self._retry = retry
        self._full_pass = False
        self.store.set_chain_cursor(self.follower.height, self.follower.hash)
        self.closer.forget_except({rec.channel_id for rec in live})

    def _note_followed(self, before: int, restart: bool) -> None:
        """Tell the node from which height on this follower reads (and notes) every block: a
        search for a watched transaction then reads no block above it (a restart skipped blocks)."""
        if restart:
            self.node.followed_after = self.follower.height
        elif self.node.followed_after is None:
            self.node.followed_after = before

    def _due(self, rec: PayeeRecord, tip: int) -> bool:
        """Whether a channel no new block touched needs a look anyway."""
        if rec.state is not ChannelState.OPEN:
            return True  # funding, closing: pending until their transactions are deep enough
        if tip >= closing_height(rec.expiry_height, self.config.close_margin_blocks):
            return True
        return (
            agreed_terms(rec, self.config.terms).timed_end(  # payment/idle timeout, end time
                owed_sat=rec.owed_sat,
                paid_sat=rec.amount_sat,
                owed_since=rec.owed_since,
                paid_at=rec.paid_at,
                now=time.time(),
            )
            is not None
        )

    async def check(self, rec: PayeeRecord, tip: int) -> None:
        """Look at one channel (as read in ``rec``) at chain height ``tip`` and act on what changed."""
        if rec.state is ChannelState.FUNDING:
            await self._check_funding(rec)
        elif rec.state is ChannelState.OPEN:
            await self._check_open(rec, tip)
        elif rec.state is ChannelState.CLOSING:
            await self._check_closing(rec, tip)

    # -- per state -------------------------------------------------------------------
    async def _check_funding(self, rec: PayeeRecord) -> None:
        cid = rec.channel_id
        info = await self.node.get_txout(_outpoint(rec), include_mempool=True)
        if info is not None:
            if info.confirmations >= self.config.min_confirmations:
                self.store.set_confirmations(cid, info.confirmations, open_now=True)
                self.closer.channels.invalidate(cid)
            elif info.confirmations != rec.confirmations:
                self.store.set_confirmations(cid, info.confirmations, open_now=False)
            return
        await self._spent_elsewhere(rec)

    async def _funding_vanished(self, rec: PayeeRecord) -> None:
        """The funding transaction is gone (double-spent, or evicted): ``failed`` once the
        transaction that spends one of its inputs has ``final_confirmations``."""
        cid = rec.channel_id
        conflict = None
        for txid, vout in rec.funding_inputs:
            conflict = await self.node.find_spender(OutPoint(txid, int(vout)), rec.created_height)
            if conflict is not None:
                break
        if conflict is None:
            return
        if self._final(await self.node.tx_confirmations(conflict)):
            self.store.mark_exception(cid, ChannelState.FAILED, conflict, "funding_double_spent")
            self.closer.channels.invalidate(cid)
            log.warning("funding of %s double-spent by %s", cid, conflict)
        elif rec.confirmations != 0:
            self.store.set_confirmations(cid, 0, open_now=False)

    async def _find_spender(self, rec: PayeeRecord) -> tuple[bool, str | None]:
        """(whether the funding still exists, the txid spending its output or None). Blocks are
        scanned only for a confirmed funding whose output is spent in the chain; a funding that
        vanished is handed to :meth:`_funding_vanished`."""
        spender = await self.node.confirmed_spender(_outpoint(rec))  # the follower saw it: no lookup
        if spender is not None:
            return True, spender
        depth = await self._funding_depth(rec)
        if depth is None:
            await self._funding_vanished(rec)
            return False, None
        if depth == 0:
            return True, await mempool_spender(self.node, _outpoint(rec))
        tip = await self.node.tip_height()
        return True, await self.node.find_spender(_outpoint(rec), max(rec.created_height, tip - depth + 1))

    async def _funding_depth(self, rec: PayeeRecord) -> int | None:
        """Confirmations of the funding transaction (0: in the mempool; None: in neither). Found
        without a transaction index: the depth of its output while unspent in the chain (also when a
        mempool transaction spends it), the block the follower saw it in or the depth its output had
        when last unspent, else by reading the blocks since the channel's creation (newest first)."""
        info = await self.node.get_txout(_outpoint(rec), include_mempool=False)
        if info is not None:
            return info.confirmations
        return await self.node.tx_confirmations(_outpoint(rec).txid, search_from=rec.created_height)

    async def _check_open(self, rec: PayeeRecord, tip: int) -> None:
        cid = rec.channel_id
        cfg = self.config
        info = await self.node.get_txout(_outpoint(rec), include_mempool=True)
        if info is None:
            if await self.node.confirmed_spender(_outpoint(rec)) is None:  # (a confirmed spend: it exists)
                depth = await self._funding_depth(rec)
                if depth is None or depth < cfg.min_confirmations:
                    self._funding_lost(rec, depth or 0)
                    return
            await self._spent_elsewhere(rec)
            return
        if info.confirmations < cfg.min_confirmations:
            self._funding_lost(rec, info.confirmations)
            return
        if info.confirmations != rec.confirmations:
            self.store.set_confirmations(cid, info.confirmations, open_now=False)
        if tip >= closing_height(rec.expiry_height, cfg.close_margin_blocks):
            await self._close(cid, "expiry_margin")
            return
        reason = agreed_terms(rec, cfg.terms).timed_end(
            owed_sat=rec.owed_sat,
            paid_sat=rec.amount_sat,
            owed_since=rec.owed_since,
            paid_at=rec.paid_at,
            now=time.time(),
        )
        if reason is not None:  # payment_timeout, idle_timeout, end_time_reached
            await self._close(cid, reason)

    async def _close(self, cid: str, reason: str) -> None:
        """Claim ``cid``'s close; within a pass its broadcast waits for the pass's end, to share one
        transaction with the other closes the pass claims (never longer than this pass)."""
        if self._claims is None:
            await self.closer.close(cid, reason)
        elif self.closer.claim_only(cid, reason) is not None:
            self._claims.append(cid)

    async def _check_closing(self, rec: PayeeRecord, tip: int) -> None:
        cid = rec.channel_id
        if rec.close_tx_txid is not None and rec.close_tx_txid != rec.close_txid:
            try:  # a close recorded, its broadcast not (the process died, or the node refused it)
                if await self.closer.resume(rec):
                    rec = self.store.get(cid)
            except ChannelError as err:
                log.warning("recorded close %s of %s not sent: %s", rec.close_tx_txid, cid, err)
                if rec.close_txid is None and await self.node.get_txout(_outpoint(rec), include_mempool=True) is None:
                    await self._spent_elsewhere(rec)  # refused because a refund got there first: outbid it
                    return
        if rec.close_txid is None:
            if rec.signature is None or is_uneconomic(rec):
                # ended without any (economic) payment: nothing to broadcast; the payer refunds after expiry
                if await self.node.get_txout(_outpoint(rec), include_mempool=True) is None:
                    await self._spent_elsewhere(rec)
                return
            if self.closer.adopt(cid):
                try:
                    await self.closer.broadcast(cid, None, None)
                except ChannelError as err:
                    log.warning("close of %s failed: %s", cid, err)
                    if await self.node.get_txout(_outpoint(rec), include_mempool=True) is None:
                        await self._spent_elsewhere(rec)
            return
        conf = await self.node.tx_confirmations(rec.close_txid)
        if conf is not None and conf >= 1:
            if self._final(conf):
                self.store.mark_closed(cid, rec.close_txid)
                log.info("channel %s closed by %s", cid, rec.close_txid)
            return  # mined, not final yet: keep watching (a reorg may take it out again)
        if conf == 0:
            await self._bump_if_due(rec, tip)
            return
        # our last close is neither mined nor in the mempool: who spent the funding?
        exists, spender = await self._find_spender(rec)
        if not exists:
            return
        if spender is None:
            try:
                await self.closer.rebroadcast(rec)
            except NodeError as err:
                log.warning("rebroadcast of %s's close refused: %s", cid, err)
            return
        if spender in rec.close_txids:
            if self._final(await self.node.tx_confirmations(spender)):
                self.store.mark_closed(cid, spender)
            return
        await self._record_conflict(rec, spender)

    def _final(self, depth: int | None) -> bool:
        """Whether a transaction at ``depth`` is final (``final_confirmations``)."""
        return depth is not None and depth >= self.config.final_confirmations

    async def _bump_if_due(self, rec: PayeeRecord, tip: int) -> None:
        """RBF-bump an unconfirmed close: every ``bump_after_blocks`` blocks, and in each of the last
        ``urgent_blocks`` blocks before the payer's refund is valid to ``max_fee_rate_sat_vb`` or the
        most the payment affords (deadline-aware: the fee rises as the deadline nears)."""
        cfg, cid = self.config, rec.channel_id
        if rec.close_height is None or rec.close_height >= tip:
            return  # at most one replacement per block
        if self.store.get(cid).close_txid != rec.close_txid:
            return  # replaced in this pass already (a batch is bumped by its first member looked at)
        urgent = close_is_urgent(rec.expiry_height, tip, cfg.close_margin_blocks)
        if not urgent and tip - rec.close_height < cfg.bump_after_blocks:
            return
        log.info(
            "close of %s unconfirmed after %d blocks, %d before expiry: RBF bump",
            cid,
            tip - rec.close_height,
            rec.expiry_height - tip,
        )
        try:
            await self.closer.bump(cid, cfg.max_fee_rate_sat_vb if urgent else None, deadline=urgent)
        except ChannelError as err:
            log.info("bump of %s not done: %s", cid, err)

    def _funding_lost(self, rec: PayeeRecord, depth: int) -> None:
        """An open channel whose funding left the active chain (a reorg) or fell below its depth:
        back to ``funding`` at once (payments refused) until the funding is back at depth."""
        if self.store.funding_lost(rec.channel_id, depth):
            log.warning(
                "channel %s: its funding %s left the chain (depth %d): no payments until it is back",
                rec.channel_id,
                rec.funding_txid,
                depth,
            )
        self.closer.channels.invalidate(rec.channel_id)

    # -- spends of the funding output ----------------------------------------------------
    async def _spent_elsewhere(self, rec: PayeeRecord) -> None:
        _, spender = await self._find_spender(rec)
        if spender is None:
            return
        if spender in rec.close_txids:
            if self._final(await self.node.tx_confirmations(spender)):
                self.store.mark_closed(rec.channel_id, spender)
            return
        await self._record_conflict(rec, spender)

    async def _record_conflict(self, rec: PayeeRecord, spender: str) -> None:
        # decide on fresh data: a close may have been claimed and broadcast since ``rec`` was read
        rec = self.store.get(rec.channel_id)
        if rec.state in (ChannelState.CLOSED, ChannelState.REFUNDED, ChannelState.FAILED):
            return
        if spender in rec.close_txids:
            if self._final(await self.node.tx_confirmations(spender)):
                self.store.mark_closed(rec.channel_id, spender)
            return
        # (our own closes are in close_txids before they are broadcast: anything else is a conflict,
        # also while our first close is not sent yet, e.g. refused because this conflict came first)
        state, reason = ChannelState.FAILED, "conflicting_spend"
        tx = await self.node.get_transaction(spender)
        if tx is not None:
            for vin in tx.get("vin", []):
                if vin.get("txid") == rec.funding_txid and vin.get("vout") == rec.funding_vout:
                    witness = [bytes.fromhex(item) for item in vin.get("txinwitness", [])]
                    kind = classify_spend(witness, self.closer.channels.params_of(rec).witness_script)
                    if kind is SpendKind.REFUND:
                        state, reason = ChannelState.REFUNDED, "payer_refund"
                    elif kind is SpendKind.CLOSE and rec.state is ChannelState.CLOSING:
                        # the payee branch: only this payee can sign it, so it is one of our closes
                        # (e.g. recorded by another process); adopt it
                        if self._final(int(tx.get("confirmations", 0))):
                            self.store.mark_closed(rec.channel_id, spender)
                        return
                    elif kind is SpendKind.CLOSE:
                        # our own close, sent outside the service (the operator's --close-tx): no
                        # more payments on this funding; closed by it once it is final
                        self.closer.claim(rec.channel_id, "operator")
                        return
            depth = int(tx.get("confirmations", 0))
            if not self._final(depth):
                # not final: a refund in the mempool (or a few blocks deep) can still be replaced or reorged
                if depth == 0 and rec.signature is not None and not is_uneconomic(rec):
                    if rec.state is not ChannelState.CLOSING:
                        self.closer.claim(rec.channel_id, "expiry_margin")  # its close then outbids
                        return
                    try:
                        await self.closer.outbid(rec, spender)
                    except ChannelError as err:
                        log.warning("channel %s: cannot outbid %s: %s", rec.channel_id, spender, err)
                return
        self.store.mark_exception(rec.channel_id, state, spender, reason)
        self.closer.channels.invalidate(rec.channel_id)
        log.warning("channel %s: funding spent by %s (%s)", rec.channel_id, spender, reason)
