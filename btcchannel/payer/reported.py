"""What the payer makes of the state its payee reports for a channel.

The payee decides when a channel opens, when its funding is lost (a reorg, or the funding fell
below its depth), closes and ends; the payer hears of it in the channel objects the payee answers
with, and may have missed states in between. :func:`state_after_report` steps the payer's state
to the reported one along the core's transition table (:func:`btcchannel.core.state.events_between`):
``open`` back to ``funding`` (``funding_lost``), ``funding`` to ``closed`` through the states
between. A report the table does not lead to from the payer's state (a state behind it, one out of
a state that ended, or no state at all) is logged and ignored: the payer's state never moves
against the table, whatever a payee says.
"""

from __future__ import annotations

import logging

from btcchannel.core.state import ChannelState, events_between, next_state
from btcchannel.errors import IllegalTransition

__all__ = ["state_after_report"]

log = logging.getLogger("btcchannel.payer.reported")


def state_after_report(current: ChannelState, reported: object, channel_id: str = "") -> ChannelState | None:
    """The state to record for a channel the payer holds in ``current`` when its payee reports
    ``reported`` (the ``state`` of a channel object, unchecked): the reported state when the table
    leads there from ``current``; None when nothing changes (the same state, or an illegal or
    unknown report, logged with ``channel_id``)."""
    try:
        target = ChannelState(reported)  # any JSON value: checked here
    except (ValueError, TypeError):
        log.warning("channel %s: the payee reports the unknown state %r: ignored", channel_id, reported)
        return None
    try:
        events = events_between(current, target)
    except IllegalTransition as e:
        log.info(
            "channel %s: the payee reports %s while this payer holds it %s: ignored (%s)",
            channel_id,
            target.value,
            current.value,
            e.message,
        )
        return None
    if not events:
        return None
    state = current
    for event in events:
        state = next_state(state, event)
    log.debug("channel %s: %s -> %s (%s)", channel_id, current.value, state.value, ", ".join(e.value for e in events))
    return state
