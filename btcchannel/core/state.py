"""The channel state table: states, typed events, the one table of transitions, spend kinds.

Both machines (:mod:`btcchannel.core.channel`) and storage derive every state
change from :data:`TRANSITIONS`; nothing else decides which event a state
allows. States (both sides)::

    proposed --funding--> funding --funding_confirmed--> open --closing--> closing
    open --funding_lost--> funding   (the funding left the active chain or fell below its depth)
    funding --closing--> closing     (a close claimed before the funding has its depth)
    open/closing --closed--> closed        funding/open/closing --refunded--> refunded
    proposed/funding/open/closing --failed--> failed

:func:`next_state` follows an edge or raises IllegalTransition; :func:`sources`
lists the states an event may fire in (a store's ``WHERE state IN (...)``);
:func:`events_between` is the shortest run of events from one state to another
(how the payer steps through a state the payee reports, having missed the ones between).
:func:`classify_spend` tells a close from the payer's refund by the witness
that spent the funding output.
"""

from __future__ import annotations

import enum
from types import MappingProxyType
from typing import Final, Mapping, Sequence

from btcchannel.errors import IllegalTransition

__all__ = [
    "ChannelState",
    "ChannelEvent",
    "TRANSITIONS",
    "TERMINAL_STATES",
    "next_state",
    "sources",
    "events_between",
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
