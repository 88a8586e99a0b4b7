"""Batched closes: the channels the watcher claims in one pass close in ONE transaction.

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

import logging
from typing import TYPE_CHECKING, Any, Sequence

from btcchannel.bitcoind.chain import mempool_package
from btcchannel.core.channel import build_multi_close, build_multi_close_at_most
from btcchannel.core.state import ChannelState
from btcchannel.core.terms import bump_fee_rate, close_is_urgent
from btcchannel.core.tx import OutPoint, tx_id, tx_vsize
from btcchannel.errors import ChannelError, CloseUneconomic, RpcAlreadyInChain, RpcVerifyError, RpcVerifyRejected
from btcchannel.store import PayeeRecord

if TYPE_CHECKING:
    from btcchannel.payee.closer import Closer

__all__ = ["Batches"]

#: the closer's component: it logs as the closer
log = logging.getLogger("btcchannel.payee.closer")


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
