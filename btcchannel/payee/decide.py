"""The watcher's decisions: facts about one channel and the chain in, one action out (no I/O).

:func:`decide` is pure: it reads a :class:`Facts` (the channel as stored, the chain tip, the
policy, and what was learnt of the chain so far) and returns either an action for the watcher to
perform or a :class:`Need` naming the one fact it has to know first. The watcher
(:class:`btcchannel.payee.watcher.Watcher`) is the executor: it answers each ``Need`` from the
node or the store (:meth:`Facts.learn`) and asks again, so a fact is looked up only when a
decision depends on it, in the order the decision asks (a funding output unspent at depth never
costs a search for its spender, a spend the block follower noted never costs a block scan).

An action either ends the look at the channel, or is one whose outcome the decision goes on from
(:attr:`Action.goes_on`): :class:`RecordDepth` (the stored depth is updated), :class:`Resend` and
:class:`SendClose` (their outcome is learnt; what was learnt of the chain before is forgotten,
since a broadcast may change it).

The table, by stored state (``final``: at ``final_confirmations``):

- ``funding``: funding output at ``min_confirmations`` -> :class:`Open`; at another depth than
  stored -> :class:`RecordDepth`; spent or gone -> the spend rules below.
- ``open``: funding output below ``min_confirmations`` or out of the active chain (unspent or
  not) -> :class:`FundingLost`; at another depth than stored -> :class:`RecordDepth`; at the
  closing height (``expiry - close_margin_blocks``) -> ``Close("expiry_margin")``; an agreed timed
  end reached -> ``Close(reason)``; spent -> the spend rules.
- ``closing``: a close recorded but not known to be sent -> :class:`Resend` (failed, no close
  sent yet and the funding spent -> the spend rules); no close sent: no economic payment -> nothing
  (the funding spent -> the spend rules), else :class:`SendClose` (failed and the funding spent ->
  the spend rules); the close mined and final -> :class:`MarkClosed`; mined, not final ->
  :class:`Nothing`; in the mempool -> :class:`Bump` when due; in neither -> who spent the funding:
  nobody -> :class:`Rebroadcast`, else the spend rules.
- spend rules: the funding transaction gone (in neither chain nor mempool) -> a spend of one of its
  inputs final -> ``Conflict(failed, "funding_double_spent")``, not final -> depth 0
  (:class:`RecordDepth`); one of our closes -> :class:`MarkClosed` when final; on the channel as
  read again: a close (payee branch) while closing -> :class:`MarkClosed` when final, while open
  -> ``Close("operator", alone=True)``; a spend not final: in the mempool with an economic
  payment -> ``Close("expiry_margin", alone=True)`` while open, :class:`Outbid` while closing;
  final (or not found) -> ``Conflict(refunded, "payer_refund")`` for the payer's refund,
  ``Conflict(failed, "conflicting_spend")`` for anything else.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Final, Union

from btcchannel.core.state import ChannelState, SpendKind
from btcchannel.core.terms import close_is_urgent, closing_height

__all__ = [
    "UNKNOWN",
    "Unknown",
    "Fact",
    "Need",
    "Policy",
    "ChannelView",
    "SpendSeen",
    "Facts",
    "Action",
    "Nothing",
    "RecordDepth",
    "Open",
    "FundingLost",
    "Close",
    "MarkClosed",
    "Conflict",
    "Bump",
    "Rebroadcast",
    "Outbid",
    "Resend",
    "SendClose",
    "Step",
    "decide",
]


class Unknown(enum.Enum):
    """A fact not looked up yet."""

    UNKNOWN = "unknown"


UNKNOWN: Final = Unknown.UNKNOWN


class Fact(str, enum.Enum):
    """A fact :func:`decide` may need, and where the executor finds it."""

    #: confirmations of the funding output while unspent, in the mempool too (0); None: spent or gone
    FUNDING_OUT = "funding_out"
    #: the confirmed spend of the funding output the node already knows (no block read); None: none
    CONFIRMED_SPENDER = "confirmed_spender"
    #: confirmations of the funding transaction (0: in the mempool); None: in neither
    FUNDING_DEPTH = "funding_depth"
    #: the spend of the funding output (mempool if the funding is, else blocks from its depth); None: none
    SPENDER = "spender"
    #: a spend of one of the funding transaction's inputs (a double spend of the funding); None: none
    DOUBLE_SPENDER = "double_spender"
    #: confirmations of that double spend (``Need.txid``)
    DOUBLE_SPENDER_DEPTH = "double_spender_depth"
    #: confirmations of the spend of the funding output (``Need.txid``)
    SPENDER_DEPTH = "spender_depth"
    #: the spend (``Need.txid``) as a transaction: its kind and depth; None: the node cannot find it
    SPEND = "spend"
    #: confirmations of our last broadcast close (``Need.txid``); None: in neither chain nor mempool
    CLOSE_DEPTH = "close_depth"
    #: the channel as stored now (read again: another process may have acted since)
    FRESH = "fresh"
    #: the close the store records as last broadcast now (a bump in this pass may have replaced it)
    LATEST_CLOSE = "latest_close"


@dataclass(frozen=True)
class Need:
    """The fact :func:`decide` needs before it can decide (``txid``: of which transaction)."""

    fact: Fact
    txid: str | None = None


@dataclass(frozen=True)
class Policy:
    """The payee's configured rules the decisions apply."""

    min_confirmations: int
    final_confirmations: int
    close_margin_blocks: int
    bump_after_blocks: int

    def final(self, depth: int | None) -> bool:
        """Whether a transaction at ``depth`` is final (``final_confirmations``)."""
        return depth is not None and depth >= self.final_confirmations


@dataclass(frozen=True)
class ChannelView:
    """What the decisions read of a stored channel."""

    state: ChannelState
    expiry_height: int
    confirmations: int = 0
    #: our last broadcast close; the last recorded one (sent or not); every close of ours
    close_txid: str | None = None
    close_tx_txid: str | None = None
    close_txids: tuple[str, ...] = ()
    #: the height our last close was broadcast at
    close_height: int | None = None
    #: whether a payment is stored, and whether the payments were found not to pay for a close
    signed: bool = False
    uneconomic: bool = False
    #: the agreed end condition time alone has reached (``payment_timeout``, ``idle_timeout``,
    #: ``end_time_reached``), if any
    timed_end: str | None = None

    @property
    def payable(self) -> bool:
        """Whether a close can be built from the payments (a payment that pays for one)."""
        return self.signed and not self.uneconomic

    @property
    def unsent_close(self) -> bool:
        """Whether a close is recorded whose broadcast is not."""
        return self.close_tx_txid is not None and self.close_tx_txid != self.close_txid


@dataclass(frozen=True)
class SpendSeen:
    """A spend of the funding output as a transaction: the kind its funding input's witness shows
    (None: it has no such input) and its confirmations."""

    kind: SpendKind | None
    depth: int


Known = Union[int, None, Unknown]
KnownTxid = Union[str, None, Unknown]


@dataclass(frozen=True)
class Facts:
    """What a decision reads: the channel, the tip, the policy, and what was learnt of the chain
    (each :data:`UNKNOWN` until looked up), plus the outcomes of actions performed in this look."""

    channel: ChannelView
    tip: int
    policy: Policy
    funding_out: Known = UNKNOWN
    confirmed_spender: KnownTxid = UNKNOWN
    funding_depth: Known = UNKNOWN
    spender: KnownTxid = UNKNOWN
    double_spender: KnownTxid = UNKNOWN
    double_spender_depth: Known = UNKNOWN
    spender_depth: Known = UNKNOWN
    spend: SpendSeen | None | Unknown = UNKNOWN
    close_depth: Known = UNKNOWN
    fresh: ChannelView | Unknown = UNKNOWN
    latest_close: KnownTxid = UNKNOWN
    #: whether the recorded close was sent again (:class:`Resend`): True, False (failed), not yet
    resent: bool | Unknown = UNKNOWN
    #: whether the first close was dealt with (:class:`SendClose`): True, False (failed), not yet
    sent: bool | Unknown = UNKNOWN

    def learn(self, fact: Fact, value: object) -> Facts:
        """These facts with ``fact`` known to be ``value``."""
        changes: dict[str, Any] = {fact.value: value}
        return replace(self, **changes)

    def after_send(self, channel: ChannelView, *, resent: bool | None = None, sent: bool | None = None) -> Facts:
        """These facts after a broadcast (:class:`Resend`: ``resent``; :class:`SendClose`: ``sent``)
        with ``channel`` as read after it: what was learnt of the chain is forgotten (the broadcast
        may have changed it)."""
        return Facts(
            channel,
            self.tip,
            self.policy,
            resent=self.resent if resent is None else resent,
            sent=self.sent if sent is None else sent,
        )

    def with_depth(self, confirmations: int) -> Facts:
        """These facts after :class:`RecordDepth` (the stored depth is ``confirmations``)."""
        return replace(self, channel=replace(self.channel, confirmations=confirmations))


# ----------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class Action:
    """Something the watcher does to a channel."""

    #: whether the decision goes on after it (else the look at the channel is over)
    goes_on: ClassVar[bool] = False


@dataclass(frozen=True)
class Nothing(Action):
    """Nothing to do now."""


@dataclass(frozen=True)
class RecordDepth(Action):
    """Store the funding's depth (the decision goes on from it)."""

    confirmations: int
    goes_on: ClassVar[bool] = True


@dataclass(frozen=True)
class Open(Action):
    """The funding reached ``min_confirmations``: the channel opens at ``confirmations``."""

    confirmations: int


@dataclass(frozen=True)
class FundingLost(Action):
    """An open channel's funding left the active chain or fell below ``min_confirmations``: back
    to ``funding`` (payments refused) at ``confirmations``."""

    confirmations: int


@dataclass(frozen=True)
class Close(Action):
    """Claim the close for ``reason`` (no more payments). ``alone``: claimed and sent at once, not
    batched with the pass's other closes (a spend of the funding is racing it)."""

    reason: str
    alone: bool = False


@dataclass(frozen=True)
class MarkClosed(Action):
    """Our close ``txid`` (or one of its replacements, or a batch of ours) is final."""

    txid: str


@dataclass(frozen=True)
class Conflict(Action):
    """The funding was spent by ``txid``, not by us: the channel ends ``state`` for ``reason``."""

    state: ChannelState
    txid: str
    reason: str


@dataclass(frozen=True)
class Bump(Action):
    """Replace our unconfirmed close at a higher fee (``urgent``: in the deadline window, up to what
    the payment affords); ``waited``: blocks since it was sent."""

    urgent: bool
    waited: int


@dataclass(frozen=True)
class Rebroadcast(Action):
    """Our close is in neither chain nor mempool and nothing spends the funding: send it again."""


@dataclass(frozen=True)
class Outbid(Action):
    """Replace the unconfirmed conflicting spend ``txid`` (the payer's refund) with our close."""

    txid: str


@dataclass(frozen=True)
class Resend(Action):
    """Send the close recorded but not known to be sent (its process died, or the node refused it);
    its outcome is learnt as ``resent``."""

    goes_on: ClassVar[bool] = True


@dataclass(frozen=True)
class SendClose(Action):
    """Send the claimed close none was recorded for, if this process is to (claimed here, or a stale
    claim taken over); its outcome is learnt as ``sent``."""

    goes_on: ClassVar[bool] = True


Step = Union[Action, Need]


# ----------------------------------------------------------------------------- decisions


def decide(facts: Facts) -> Step:
    """The next action for the channel, or the fact needed to choose it."""
    state = facts.channel.state
    if state is ChannelState.FUNDING:
        return _funding(facts)
    if state is ChannelState.OPEN:
        return _open(facts)
    if state is ChannelState.CLOSING:
        return _closing(facts)
    return Nothing()


def _funding(f: Facts) -> Step:
    if f.funding_out is UNKNOWN:
        return Need(Fact.FUNDING_OUT)
    if f.funding_out is None:
        return _spent(f)
    if f.funding_out >= f.policy.min_confirmations:
        return Open(f.funding_out)
    if f.funding_out != f.channel.confirmations:
        return RecordDepth(f.funding_out)
    return Nothing()


def _open(f: Facts) -> Step:
    if f.funding_out is UNKNOWN:
        return Need(Fact.FUNDING_OUT)
    if f.funding_out is None:
        return _open_spent(f)
    if f.funding_out < f.policy.min_confirmations:
        return FundingLost(f.funding_out)
    if f.funding_out != f.channel.confirmations:
        return RecordDepth(f.funding_out)
    if f.tip >= closing_height(f.channel.expiry_height, f.policy.close_margin_blocks):
        return Close("expiry_margin")
    if f.channel.timed_end is not None:  # payment_timeout, idle_timeout, end_time_reached
        return Close(f.channel.timed_end)
    return Nothing()


def _open_spent(f: Facts) -> Step:
    """An open channel's funding output is spent (or gone): is the funding still at depth?"""
    if f.confirmed_spender is UNKNOWN:
        return Need(Fact.CONFIRMED_SPENDER)
    if f.confirmed_spender is None:  # (a confirmed spend says the funding exists)
        if f.funding_depth is UNKNOWN:
            return Need(Fact.FUNDING_DEPTH)
        if f.funding_depth is None or f.funding_depth < f.policy.min_confirmations:
            return FundingLost(f.funding_depth or 0)
    return _spent(f)


def _closing(f: Facts) -> Step:
    ch = f.channel
    if ch.unsent_close:
        if f.resent is UNKNOWN:
            return Resend()
        if f.resent is False and ch.close_txid is None:  # refused: a refund may have got there first
            step = _funding_gone(f)
            if step is not None:
                return step
    if ch.close_txid is None:
        return _first_close(f)
    if f.close_depth is UNKNOWN:
        return Need(Fact.CLOSE_DEPTH, ch.close_txid)
    if f.close_depth is not None and f.close_depth >= 1:  # mined: final, or a reorg may take it out
        return _closed_if_final(f.policy, ch.close_txid, f.close_depth)
    if f.close_depth == 0:
        return _bump(f)
    # our last close is neither mined nor in the mempool: who spent the funding?
    found = _spender(f)
    if not isinstance(found, _Found):
        return found
    if found.txid is None:
        return Rebroadcast()
    return _ours_or_conflict(f, found.txid)


def _first_close(f: Facts) -> Step:
    """Closing, no close sent yet."""
    if not f.channel.payable:
        # ended without any (economic) payment: nothing to send; the payer refunds after expiry
        return _funding_gone(f) or Nothing()
    if f.sent is UNKNOWN:
        return SendClose()
    if f.sent is False:
        return _funding_gone(f) or Nothing()
    return Nothing()


def _funding_gone(f: Facts) -> Step | None:
    """The spend rules if the funding output is spent (or gone), else None."""
    if f.funding_out is UNKNOWN:
        return Need(Fact.FUNDING_OUT)
    if f.funding_out is None:
        return _spent(f)
    return None


def _bump(f: Facts) -> Step:
    """Our close is in the mempool: RBF every ``bump_after_blocks`` blocks, and in each block of the
    deadline window; at most once a block."""
    ch = f.channel
    if ch.close_height is None or ch.close_height >= f.tip:
        return Nothing()
    if f.latest_close is UNKNOWN:
        return Need(Fact.LATEST_CLOSE)
    if f.latest_close != ch.close_txid:
        return Nothing()  # replaced in this pass already (a batch is bumped by its first member looked at)
    urgent = close_is_urgent(ch.expiry_height, f.tip, f.policy.close_margin_blocks)
    waited = f.tip - ch.close_height
    if not urgent and waited < f.policy.bump_after_blocks:
        return Nothing()
    return Bump(urgent, waited)


@dataclass(frozen=True)
class _Found:
    """Whether the funding transaction exists, and the spend of its output (None: none)."""

    txid: str | None


def _spender(f: Facts) -> Step | _Found:
    """The spend of the funding output; the vanished-funding rules when the funding is gone."""
    if f.confirmed_spender is UNKNOWN:
        return Need(Fact.CONFIRMED_SPENDER)
    if f.confirmed_spender is not None:
        return _Found(f.confirmed_spender)
    if f.funding_depth is UNKNOWN:
        return Need(Fact.FUNDING_DEPTH)
    if f.funding_depth is None:
        return _vanished(f)
    if f.spender is UNKNOWN:
        return Need(Fact.SPENDER)
    return _Found(f.spender)


def _spent(f: Facts) -> Step:
    """The funding output is spent or gone: by whom?"""
    found = _spender(f)
    if not isinstance(found, _Found):
        return found
    if found.txid is None:
        return Nothing()
    return _ours_or_conflict(f, found.txid)


def _vanished(f: Facts) -> Step:
    """The funding transaction is gone (double-spent, or evicted): ``failed`` once the spend of one
    of its inputs is final."""
    if f.double_spender is UNKNOWN:
        return Need(Fact.DOUBLE_SPENDER)
    if f.double_spender is None:
        return Nothing()
    if f.double_spender_depth is UNKNOWN:
        return Need(Fact.DOUBLE_SPENDER_DEPTH, f.double_spender)
    if f.policy.final(f.double_spender_depth):
        return Conflict(ChannelState.FAILED, f.double_spender, "funding_double_spent")
    if f.channel.confirmations != 0:
        return RecordDepth(0)
    return Nothing()


def _closed_if_final(policy: Policy, txid: str, depth: int | None) -> Step:
    """Closed by our close ``txid`` once it is final; until then (a reorg may take it out) watched."""
    return MarkClosed(txid) if policy.final(depth) else Nothing()


def _final_close(f: Facts, txid: str) -> Step:
    """One of our closes spends the funding: closed by it once it is final."""
    if f.spender_depth is UNKNOWN:
        return Need(Fact.SPENDER_DEPTH, txid)
    return _closed_if_final(f.policy, txid, f.spender_depth)


def _ours_or_conflict(f: Facts, spender: str) -> Step:
    if spender in f.channel.close_txids:
        return _final_close(f, spender)
    return _conflict(f, spender)


_ENDED: Final = (ChannelState.CLOSED, ChannelState.REFUNDED, ChannelState.FAILED)


def _conflict(f: Facts, spender: str) -> Step:
    """A spend of the funding output that is not one of our closes as first read: decided on the
    channel as stored now (a close may have been claimed and sent since)."""
    if f.fresh is UNKNOWN:
        return Need(Fact.FRESH)
    ch = f.fresh
    if ch.state in _ENDED:
        return Nothing()
    if spender in ch.close_txids:
        return _final_close(f, spender)
    # (our own closes are in close_txids before they are sent: anything else is a conflict, also
    # while our first close is not sent yet, e.g. refused because this conflict came first)
    if f.spend is UNKNOWN:
        return Need(Fact.SPEND, spender)
    if f.spend is None:
        return Conflict(ChannelState.FAILED, spender, "conflicting_spend")
    return _judge_spend(f.policy, ch, spender, f.spend)


def _judge_spend(policy: Policy, ch: ChannelView, spender: str, spend: SpendSeen) -> Step:
    if spend.kind is SpendKind.CLOSE:
        if ch.state is ChannelState.CLOSING:
            # the payee branch: only this payee can sign it, so it is one of our closes (e.g.
            # recorded by another process): adopted once final
            return _closed_if_final(policy, spender, spend.depth)
        # our own close sent outside the service (the operator's --close-tx): no more payments
        return Close("operator", alone=True)
    if not policy.final(spend.depth):
        # not final: a refund in the mempool (or a few blocks deep) can still be replaced or reorged
        if spend.depth == 0 and ch.payable:
            if ch.state is not ChannelState.CLOSING:
                return Close("expiry_margin", alone=True)  # its close then outbids
            return Outbid(spender)
        return Nothing()
    if spend.kind is SpendKind.REFUND:
        return Conflict(ChannelState.REFUNDED, spender, "payer_refund")
    return Conflict(ChannelState.FAILED, spender, "conflicting_spend")
