"""The channel state table: states, typed events, the one table of transitions, the transition
records the machines emit, the payee's lifecycle, spend kinds.

Both machines (:mod:`btcchannel.core.channel`) and storage derive every state
change from :data:`TRANSITIONS`; nothing else decides which event a state
allows. States (both sides)::

    proposed --funding--> funding --funding_confirmed--> open --closing--> closing
    open --funding_lost--> funding   (the funding left the active chain or fell below its depth)
    funding --closing--> closing     (a close claimed before the funding has its depth)
    open/closing --closed--> closed        funding/open/closing --refunded--> refunded
    proposed/funding/open/closing --failed--> failed
    closing --close_uneconomic--> closing  (the payments do not pay for a close: left to the refund)

:func:`next_state` follows an edge or raises IllegalTransition; :func:`sources`
lists the states an event may fire in; :func:`events_between` is the shortest run of events
from one state to another (how the payer steps through a state the payee reports, having missed
the ones between).

Every state change is a :class:`Transition` record (h11's events: a frozen dataclass), emitted by
a machine (:class:`StateMachine`, :class:`PayeeLifecycle` for the payee's events and what each one
sets, and the channel machines built on them) only along an edge of the table: a store persists
exactly that record, a compare-and-set on its ``old`` state, and on a lost compare-and-set the
caller reads the row again and asks the machine again.

:func:`classify_spend` tells a close from the payer's refund by the witness
that spent the funding output.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, Iterable, Mapping, Sequence

from btcchannel.errors import IllegalTransition

if TYPE_CHECKING:
    from btcchannel.core.tx import OutPoint

__all__ = [
    "ChannelState",
    "ChannelEvent",
    "TRANSITIONS",
    "TERMINAL_STATES",
    "next_state",
    "sources",
    "events_between",
    "Transition",
    "transition",
    "StateMachine",
    "PayeeLifecycle",
    "SpendKind",
    "classify_spend",
]


class ChannelState(str, enum.Enum):
    """Where a channel is in its life (the value is what storage and the wire carry)."""

    PROPOSED = "proposed"
    FUNDING = "funding"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"
    REFUNDED = "refunded"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


class ChannelEvent(str, enum.Enum):
    """What happens to a channel; each one moves it along an edge of :data:`TRANSITIONS`."""

    FUNDING = "funding"
    FUNDING_CONFIRMED = "funding_confirmed"
    FUNDING_LOST = "funding_lost"
    CLOSING = "closing"
    CLOSED = "closed"
    REFUNDED = "refunded"
    FAILED = "failed"
    #: a claimed close whose payments do not pay for its fee (the state stays ``closing``)
    CLOSE_UNECONOMIC = "close_uneconomic"

    def __str__(self) -> str:
        return self.value


_S = ChannelState
_E = ChannelEvent

#: States no event leaves.
TERMINAL_STATES: Final[frozenset[ChannelState]] = frozenset({_S.CLOSED, _S.REFUNDED, _S.FAILED})

#: (state, event) -> next state: every edge there is.
TRANSITIONS: Final[Mapping[tuple[ChannelState, ChannelEvent], ChannelState]] = MappingProxyType(
    {
        (_S.PROPOSED, _E.FUNDING): _S.FUNDING,
        (_S.FUNDING, _E.FUNDING_CONFIRMED): _S.OPEN,
        (_S.OPEN, _E.FUNDING_LOST): _S.FUNDING,
        (_S.OPEN, _E.CLOSING): _S.CLOSING,
        (_S.FUNDING, _E.CLOSING): _S.CLOSING,
        (_S.OPEN, _E.CLOSED): _S.CLOSED,
        (_S.CLOSING, _E.CLOSED): _S.CLOSED,
        (_S.FUNDING, _E.REFUNDED): _S.REFUNDED,
        (_S.OPEN, _E.REFUNDED): _S.REFUNDED,
        (_S.CLOSING, _E.REFUNDED): _S.REFUNDED,
        (_S.PROPOSED, _E.FAILED): _S.FAILED,
        (_S.FUNDING, _E.FAILED): _S.FAILED,
        (_S.OPEN, _E.FAILED): _S.FAILED,
        (_S.CLOSING, _E.FAILED): _S.FAILED,
        (_S.CLOSING, _E.CLOSE_UNECONOMIC): _S.CLOSING,
    }
)

_SOURCES: Final[Mapping[ChannelEvent, frozenset[ChannelState]]] = MappingProxyType(
    {event: frozenset(s for (s, e) in TRANSITIONS if e is event) for event in ChannelEvent}
)


def _event(event: ChannelEvent | str) -> ChannelEvent:
    try:
        return ChannelEvent(event)
    except ValueError:
        raise IllegalTransition(f"unknown event {event!r}") from None


def next_state(state: ChannelState, event: ChannelEvent | str) -> ChannelState:
    """The state after ``event`` in ``state``; IllegalTransition if the table has no such edge."""
    try:
        return TRANSITIONS[(state, event)]  # type: ignore[index]  # a str event hashes as its enum
    except KeyError:
        raise IllegalTransition(
            f"event {_event(event).value!r} is not allowed in state {getattr(state, 'value', state)!r}"
        ) from None


def sources(event: ChannelEvent | str) -> frozenset[ChannelState]:
    """The states ``event`` may fire in; IllegalTransition for an unknown event."""
    return _SOURCES[_event(event)]


def events_between(state: ChannelState, target: ChannelState) -> tuple[ChannelEvent, ...]:
    """The shortest run of events that takes ``state`` to ``target`` along :data:`TRANSITIONS` (empty
    when they are the same; among runs of one length, the first in the table's order);
    IllegalTransition when the table leads nowhere near (``target`` is behind ``state``, or
    ``state`` is terminal)."""
    if state is target:
        return ()
    paths: dict[ChannelState, tuple[ChannelEvent, ...]] = {state: ()}
    frontier = [state]
    while frontier:
        reached: list[ChannelState] = []
        for here in frontier:
            for (src, event), dst in TRANSITIONS.items():
                if src is here and dst not in paths:
                    paths[dst] = (*paths[here], event)
                    if dst is target:
                        return paths[dst]
                    reached.append(dst)
        frontier = reached
    raise IllegalTransition(f"no run of events leads from state {state.value!r} to {target.value!r}")


@dataclass(frozen=True)
class Transition:
    """One state change of one channel, as a machine decided it: ``event`` took channel
    ``channel_id`` from ``old`` to ``new`` and sets ``fields`` (what the event carries: the funding
    outpoint, depths, the end reason...) with it.

    Only an edge of :data:`TRANSITIONS` makes a record (IllegalTransition otherwise), so a store
    that persists it with a compare-and-set on ``old`` can only ever follow the table."""

    channel_id: str
    event: ChannelEvent
    old: ChannelState
    new: ChannelState
    fields: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), hash=False)

    def __post_init__(self) -> None:
        if TRANSITIONS.get((self.old, self.event)) is not self.new:
            raise IllegalTransition(
                f"{getattr(self.event, 'value', self.event)!r} does not take a channel from "
                f"{getattr(self.old, 'value', self.old)!r} to {getattr(self.new, 'value', self.new)!r}"
            )
        if not isinstance(self.fields, MappingProxyType):
            object.__setattr__(self, "fields", MappingProxyType(dict(self.fields)))


def transition(channel_id: str, state: ChannelState, event: ChannelEvent | str, **fields: Any) -> Transition:
    """The record of ``event`` fired on channel ``channel_id`` in ``state`` (setting ``fields``):
    IllegalTransition if the table has no such edge, or the event is unknown."""
    event = _event(event)
    state = ChannelState(state)
    return Transition(channel_id, event, state, next_state(state, event), MappingProxyType(fields))


class StateMachine:
    """A channel's state and the events that move it: each event is checked against
    :data:`TRANSITIONS` and returns its :class:`Transition` record (the state moves with it)."""

    channel_id: str = ""
    state: ChannelState

    def fire(self, event: ChannelEvent | str, **fields: Any) -> Transition:
        """Fire ``event`` (setting ``fields``): its record, the state moved; IllegalTransition (and
        nothing moved) if the current state does not allow it."""
        record = transition(self.channel_id, self.state, event, **fields)
        self.state = record.new
        return record

    def closing(self) -> Transition:
        """A close (or refund) has been broadcast, or claimed: funding/open -> closing."""
        return self.fire(_E.CLOSING)

    def closed(self) -> Transition:
        """A close confirmed: open/closing -> closed."""
        return self.fire(_E.CLOSED)

    def refunded(self) -> Transition:
        """The payer's refund confirmed: funding/open/closing -> refunded."""
        return self.fire(_E.REFUNDED)

    def failed(self) -> Transition:
        """Give up on the channel (lapsed proposal, funding mismatch, conflicting spend...)."""
        return self.fire(_E.FAILED)


class PayeeLifecycle(StateMachine):
    """The payee's view of a channel's life: its state, and each event with what it records.

    Cheap (no keys, no signatures): built from a stored row's id and state wherever only the
    state matters; :class:`~btcchannel.core.channel.PayeeChannel` is one too. Every method
    returns the :class:`Transition` a store persists; the field names are the stored channel's."""

    def __init__(self, channel_id: str, state: ChannelState = _S.PROPOSED) -> None:
        self.channel_id = channel_id
        self.state = ChannelState(state)

    def funding_seen(self, outpoint: OutPoint, confirmations: int = 0, inputs: Iterable[Any] = ()) -> Transition:
        """The payer reported its funding ``outpoint`` (``confirmations`` deep; ``inputs``: the
        [txid, vout] the funding transaction spends): proposed -> funding. A funded proposal no
        longer lapses."""
        return self.fire(
            _E.FUNDING,
            funding_txid=outpoint.txid,
            funding_vout=outpoint.vout,
            confirmations=confirmations,
            funding_inputs=tuple((str(txid), int(vout)) for txid, vout in inputs),
            lapse_at=None,
        )

    def funding_confirmed(self, confirmations: int | None = None) -> Transition:
        """The funding has its confirmations (``confirmations`` deep): funding -> open."""
        return self.fire(_E.FUNDING_CONFIRMED, **({} if confirmations is None else {"confirmations": confirmations}))

    def funding_lost(self, confirmations: int = 0) -> Transition:
        """The funding left the active chain or fell below its depth (now ``confirmations``):
        open -> funding."""
        return self.fire(_E.FUNDING_LOST, confirmations=confirmations)

    def closing(self, reason: str | None = None, claimed_at: float | None = None) -> Transition:
        """The close is claimed (no payment is accepted after it) for ``reason`` at ``claimed_at``:
        funding/open -> closing."""
        return self.fire(_E.CLOSING, end_reason=reason, close_claimed_at=claimed_at)

    def closed(self, txid: str | None = None, close_txids: Sequence[str] = ()) -> Transition:
        """Our close ``txid`` confirmed (``close_txids``: every close of ours so far): open/closing ->
        closed; ``txid`` joins the closes if missing."""
        if txid is None:
            return self.fire(_E.CLOSED)
        txids = (*close_txids, txid) if txid not in close_txids else tuple(close_txids)
        return self.fire(_E.CLOSED, close_txid=txid, close_txids=txids)

    def refunded(self, txid: str | None = None, reason: str | None = None) -> Transition:
        """The payer's refund ``txid`` spent the funding: funding/open/closing -> refunded. ``reason``
        replaces the end reason whole (an uneconomic close's flag is cleared with it)."""
        return self.fire(_E.REFUNDED, exception_txid=txid, end_reason=reason, close_uneconomic=False)

    def failed(self, reason: str | None = None, txid: str | None = None) -> Transition:
        """The channel ends without our close or the refund (a conflicting spend ``txid``, a
        double-spent funding...): any live state -> failed. ``reason`` replaces the end reason whole."""
        return self.fire(_E.FAILED, exception_txid=txid, end_reason=reason, close_uneconomic=False)

    def proposal_ended(self, reason: str) -> Transition:
        """A proposal ends unfunded (``lapsed``, ``cancelled_by_payer``...): proposed -> failed.
        IllegalTransition in any other state (a funded channel is not cancelled)."""
        if self.state is not _S.PROPOSED:
            raise IllegalTransition(f"only a proposal ends unfunded, not a channel in state {self.state.value!r}")
        return self.fire(_E.FAILED, end_reason=reason)

    def close_uneconomic(self) -> Transition:
        """The claimed close's payments do not pay for its fee: nothing is broadcast, the payer
        refunds after the expiry (closing, flagged)."""
        return self.fire(_E.CLOSE_UNECONOMIC, close_uneconomic=True)


class SpendKind(str, enum.Enum):
    """Who spent a channel's funding output, judged by the input's witness."""

    CLOSE = "close"
    REFUND = "refund"
    OTHER = "other"


def classify_spend(witness: Sequence[bytes], witness_script: bytes) -> SpendKind:
    """The kind of spend of the funding output whose witness script is ``witness_script``.

    ``[payer_sig, payee_sig, 0x01, script]`` (the payee branch: a close) is
    CLOSE; ``[payer_sig, <empty>, script]`` (the timelocked branch: the payer's
    refund) is REFUND; any other stack, an empty signature, or another script
    is OTHER. Signatures are not verified: only the two keys of the script can
    produce a spend the chain accepts. Both channel scripts (``OP_DROP`` and the
    descriptor form's ``OP_VERIFY``) take the same witnesses; ``witness_script`` is
    the channel's own, so a spend under the other form of the script is OTHER.
    """
    n = len(witness)
    if n < 3 or witness[-1] != witness_script or not witness[0]:
        return SpendKind.OTHER
    if n == 4 and witness[2] == b"\x01" and witness[1]:
        return SpendKind.CLOSE
    if n == 3 and witness[1] == b"":
        return SpendKind.REFUND
    return SpendKind.OTHER
