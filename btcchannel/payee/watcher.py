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
  (:class:`btcchannel.payee.closer.Batches`).
- ``closing``: broadcasts the close if the claim's process died before doing
  so, marks ``closed`` once our close (or one of its RBF replacements)
  confirmed, bumps the fee by RBF when it stayed unconfirmed for
  ``bump_after_blocks`` blocks, rebroadcasts a dropped close, and records a
  conflicting spend.

Each look at a channel is decided by :func:`btcchannel.payee.decide.decide` (pure: facts in, one
action out, tested without a node): the watcher only answers the facts it asks for, from the node
and the store, and performs the action it chooses through the closer and the store.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from btcchannel.bitcoind.chain import BlockFollower, chain_state, mempool_spender, require_blocks_after
from btcchannel.bitcoind.notify import BlockNotifier
from btcchannel.bitcoind.rpc import Node
from btcchannel.core.state import ChannelState, classify_spend
from btcchannel.core.terms import closing_height
from btcchannel.core.tx import OutPoint
from btcchannel.errors import ChannelError, InternalError, NodeError
from btcchannel.payee.closer import Closer, is_uneconomic
from btcchannel.payee.config import ServerConfig
from btcchannel.payee.decide import (
    Action,
    Bump,
    ChannelView,
    Close,
    Conflict,
    Fact,
    Facts,
    FundingLost,
    MarkClosed,
    Need,
    Nothing,
    Open,
    Outbid,
    Policy,
    Rebroadcast,
    RecordDepth,
    Resend,
    SendClose,
    SpendSeen,
    decide,
)
from btcchannel.payee.shared import ChainTip, agreed_terms
from btcchannel.store import PayeeRecord, PayeeStore

__all__ = ["Watcher"]

log = logging.getLogger("btcchannel.payee.watcher")


def _watched(live: list[PayeeRecord]) -> tuple[dict[str, str], dict[tuple[str, int], str]]:
    """(the watched transactions, the watched outpoints), each to its channel: a channel's funding
    and closes, its funding output and the funding's inputs."""
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
    return txids, outpoints


def _touched(live: list[PayeeRecord], blocks: list[dict[str, Any]], node: Node | None = None) -> set[str]:
    """The channels a block touches: its funding or close transaction, or a spend of the funding
    output or of the funding's inputs (a double-spend).

    With ``node``, each watched transaction and spend found is noted there with its block (the
    follower's own index: later lookups by txid need no ``-txindex``)."""
    if not blocks:
        return set()
    txids, outpoints = _watched(live)
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
        return self._timed_end(rec) is not None

    def _timed_end(self, rec: PayeeRecord) -> str | None:
        """The agreed end condition time alone has reached (payment or idle timeout, end time), if any."""
        return agreed_terms(rec, self.config.terms).timed_end(
            owed_sat=rec.owed_sat,
            paid_sat=rec.amount_sat,
            owed_since=rec.owed_since,
            paid_at=rec.paid_at,
            now=time.time(),
        )

    # -- one look at one channel: the facts the decision asks for, the action it chooses ---------
    def _policy(self) -> Policy:
        cfg = self.config
        return Policy(
            min_confirmations=cfg.min_confirmations,
            final_confirmations=cfg.final_confirmations,
            close_margin_blocks=cfg.close_margin_blocks,
            bump_after_blocks=cfg.bump_after_blocks,
        )

    def _view(self, rec: PayeeRecord) -> ChannelView:
        """What the decisions read of ``rec``."""
        return ChannelView(
            state=rec.state,
            expiry_height=rec.expiry_height,
            confirmations=rec.confirmations,
            close_txid=rec.close_txid,
            close_tx_txid=rec.close_tx_txid,
            close_txids=tuple(rec.close_txids),
            close_height=rec.close_height,
            signed=rec.signature is not None,
            uneconomic=is_uneconomic(rec),
            timed_end=self._timed_end(rec) if rec.state is ChannelState.OPEN else None,
        )

    async def check(self, rec: PayeeRecord, tip: int) -> None:
        """Look at one channel (as read in ``rec``) at chain height ``tip`` and act on what changed:
        answer each fact :func:`~btcchannel.payee.decide.decide` needs (from the node or the store),
        then perform the action it chooses (and go on deciding after one that goes on)."""
        look = _Look(rec, Facts(self._view(rec), tip, self._policy()))
        for _ in range(_MAX_STEPS):
            step = decide(look.facts)
            if isinstance(step, Need):
                look.facts = look.facts.learn(step.fact, await self._gatherers[step.fact](look, step))
                continue
            await self._actions[type(step)](look, step)
            if not step.goes_on:
                return
        raise InternalError(f"channel {rec.channel_id}: no decision after {_MAX_STEPS} steps")

    @property
    def _gatherers(self) -> dict[Fact, Callable[[_Look, Need], Awaitable[object]]]:
        return {
            Fact.FUNDING_OUT: self._funding_out,
            Fact.CONFIRMED_SPENDER: self._confirmed_spender,
            Fact.FUNDING_DEPTH: lambda look, _: self._funding_depth(look.rec),
            Fact.SPENDER: self._spender,
            Fact.DOUBLE_SPENDER: lambda look, _: self._double_spender(look.rec),
            Fact.DOUBLE_SPENDER_DEPTH: self._depth,
            Fact.SPENDER_DEPTH: self._depth,
            Fact.CLOSE_DEPTH: self._depth,
            Fact.SPEND: self._spend_seen,
            Fact.FRESH: self._fresh,
            Fact.LATEST_CLOSE: self._latest_close,
        }

    @property
    def _actions(self) -> dict[type[Action], Callable[[_Look, Any], Awaitable[None]]]:
        return {
            Nothing: _nothing,
            RecordDepth: self._record_depth,
            Open: self._open,
            FundingLost: self._funding_lost,
            Close: self._claim,
            MarkClosed: self._mark_closed,
            Conflict: self._conflict,
            Bump: self._bump,
            Rebroadcast: self._rebroadcast,
            Outbid: self._outbid,
            Resend: self._resend,
            SendClose: self._send_close,
        }

    # -- facts ---------------------------------------------------------------------------
    async def _funding_out(self, look: _Look, need: Need) -> int | None:
        info = await self.node.get_txout(_outpoint(look.rec), include_mempool=True)
        return None if info is None else info.confirmations

    async def _confirmed_spender(self, look: _Look, need: Need) -> str | None:
        return await self.node.confirmed_spender(_outpoint(look.rec))  # the follower saw it: no lookup

    async def _funding_depth(self, rec: PayeeRecord) -> int | None:
        """Confirmations of the funding transaction (0: in the mempool; None: in neither). Found
        without a transaction index: the depth of its output while unspent in the chain (also when a
        mempool transaction spends it), the block the follower saw it in or the depth its output had
        when last unspent, else by reading the blocks since the channel's creation (newest first)."""
        info = await self.node.get_txout(_outpoint(rec), include_mempool=False)
        if info is not None:
            return info.confirmations
        return await self.node.tx_confirmations(_outpoint(rec).txid, search_from=rec.created_height)

    async def _spender(self, look: _Look, need: Need) -> str | None:
        """The spend of an existing funding's output: in the mempool for a funding there, else in the
        blocks from the funding's own (scanned only for a confirmed funding whose output is spent)."""
        depth = look.facts.funding_depth
        if depth == 0:
            return await mempool_spender(self.node, _outpoint(look.rec))
        assert isinstance(depth, int)
        tip = await self.node.tip_height()
        return await self.node.find_spender(_outpoint(look.rec), max(look.rec.created_height, tip - depth + 1))

    async def _double_spender(self, rec: PayeeRecord) -> str | None:
        """A spend of one of the funding transaction's inputs (it double-spent the funding)."""
        for txid, vout in rec.funding_inputs:
            conflict = await self.node.find_spender(OutPoint(txid, int(vout)), rec.created_height)
            if conflict is not None:
                return conflict
        return None

    async def _depth(self, look: _Look, need: Need) -> int | None:
        assert need.txid is not None
        return await self.node.tx_confirmations(need.txid)

    async def _spend_seen(self, look: _Look, need: Need) -> SpendSeen | None:
        """The spend ``need.txid`` of the funding output: the kind its witness shows, its depth."""
        assert need.txid is not None
        rec = look.fresh or look.rec
        tx = await self.node.get_transaction(need.txid)
        if tx is None:
            return None
        kind = None
        for vin in tx.get("vin", []):
            if vin.get("txid") == rec.funding_txid and vin.get("vout") == rec.funding_vout:
                witness = [bytes.fromhex(item) for item in vin.get("txinwitness", [])]
                kind = classify_spend(witness, self.closer.channels.params_of(rec).witness_script)
        return SpendSeen(kind, int(tx.get("confirmations", 0)))

    async def _fresh(self, look: _Look, need: Need) -> ChannelView:
        look.fresh = self.store.get(look.rec.channel_id)
        return self._view(look.fresh)

    async def _latest_close(self, look: _Look, need: Need) -> str | None:
        return self.store.get(look.rec.channel_id).close_txid

    # -- actions -------------------------------------------------------------------------
    async def _record_depth(self, look: _Look, act: RecordDepth) -> None:
        self.store.set_confirmations(look.rec.channel_id, act.confirmations, open_now=False)
        look.facts = look.facts.with_depth(act.confirmations)

    async def _open(self, look: _Look, act: Open) -> None:
        self.store.set_confirmations(look.rec.channel_id, act.confirmations, open_now=True)
        self.closer.channels.invalidate(look.rec.channel_id)

    async def _funding_lost(self, look: _Look, act: FundingLost) -> None:
        """An open channel whose funding left the active chain (a reorg) or fell below its depth:
        back to ``funding`` at once (payments refused) until the funding is back at depth."""
        rec = look.rec
        if self.store.funding_lost(rec.channel_id, act.confirmations):
            log.warning(
                "channel %s: its funding %s left the chain (depth %d): no payments until it is back",
                rec.channel_id,
                rec.funding_txid,
                act.confirmations,
            )
        self.closer.channels.invalidate(rec.channel_id)

    async def _claim(self, look: _Look, act: Close) -> None:
        rec = look.fresh or look.rec  # (the core decides again on the stored row if this one is behind)
        if act.alone:
            self.closer.claim(rec.channel_id, act.reason, rec)
        else:
            await self._close(rec, act.reason)

    async def _close(self, rec: PayeeRecord, reason: str) -> None:
        """Claim ``rec``'s close; within a pass its broadcast waits for the pass's end, to share one
        transaction with the other closes the pass claims (never longer than this pass)."""
        cid = rec.channel_id
        if self._claims is None:
            await self.closer.close(cid, reason, rec)
        elif self.closer.claim_only(cid, reason, rec) is not None:
            self._claims.append(cid)

    async def _mark_closed(self, look: _Look, act: MarkClosed) -> None:
        """The one place a channel is marked closed: by a close of ours at final depth."""
        self.store.mark_closed(look.rec.channel_id, act.txid)
        log.info("channel %s closed by %s", look.rec.channel_id, act.txid)

    async def _conflict(self, look: _Look, act: Conflict) -> None:
        cid = look.rec.channel_id
        self.store.mark_exception(cid, act.state, act.txid, act.reason)
        self.closer.channels.invalidate(cid)
        if act.reason == "funding_double_spent":
            log.warning("funding of %s double-spent by %s", cid, act.txid)
        else:
            log.warning("channel %s: funding spent by %s (%s)", cid, act.txid, act.reason)

    async def _bump(self, look: _Look, act: Bump) -> None:
        """RBF-bump an unconfirmed close: every ``bump_after_blocks`` blocks, and in each of the last
        ``urgent_blocks`` blocks before the payer's refund is valid to ``max_fee_rate_sat_vb`` or the
        most the payment affords (deadline-aware: the fee rises as the deadline nears)."""
        rec, cfg = look.rec, self.config
        log.info(
            "close of %s unconfirmed after %d blocks, %d before expiry: RBF bump",
            rec.channel_id,
            act.waited,
            rec.expiry_height - look.facts.tip,
        )
        try:
            await self.closer.bump(rec.channel_id, cfg.max_fee_rate_sat_vb if act.urgent else None, deadline=act.urgent)
        except ChannelError as err:
            log.info("bump of %s not done: %s", rec.channel_id, err)

    async def _rebroadcast(self, look: _Look, act: Rebroadcast) -> None:
        try:
            await self.closer.rebroadcast(look.rec)
        except NodeError as err:
            log.warning("rebroadcast of %s's close refused: %s", look.rec.channel_id, err)

    async def _outbid(self, look: _Look, act: Outbid) -> None:
        rec = look.fresh or look.rec
        try:
            await self.closer.outbid(rec, act.txid)
        except ChannelError as err:
            log.warning("channel %s: cannot outbid %s: %s", rec.channel_id, act.txid, err)

    async def _resend(self, look: _Look, act: Resend) -> None:
        """Send a close recorded, its broadcast not (the process died, or the node refused it)."""
        rec = look.rec
        try:
            if await self.closer.resume(rec):
                look.rec = self.store.get(rec.channel_id)
            resent = True
        except ChannelError as err:
            log.warning("recorded close %s of %s not sent: %s", rec.close_tx_txid, rec.channel_id, err)
            resent = False
        look.facts = look.facts.after_send(self._view(look.rec), resent=resent)

    async def _send_close(self, look: _Look, act: SendClose) -> None:
        """Send the claimed close if this process is to (claimed here, or a stale claim taken over)."""
        cid = look.rec.channel_id
        sent = True
        if self.closer.adopt(cid):
            try:
                await self.closer.broadcast(cid, None, None)
            except ChannelError as err:
                log.warning("close of %s failed: %s", cid, err)
                sent = False
        look.facts = look.facts.after_send(look.facts.channel, sent=sent)


#: a look at one channel never takes more decisions than this (each fact is asked once; a few actions go on)
_MAX_STEPS = 32


@dataclass
class _Look:
    """One look at one channel: the row as last read (``fresh``: read again for a spend), the facts."""

    rec: PayeeRecord
    facts: Facts
    fresh: PayeeRecord | None = None


async def _nothing(look: _Look, act: Nothing) -> None:
    return None
