"""The payee operator's totals: earned, pending closes, what open channels hold, fee rates used.

Entry point::

    payee_summary(store: PayeeStore, tip_height: int | None) -> dict[str, Any]
"""

from __future__ import annotations

from typing import Any

from btcchannel.core.state import ChannelState
from btcchannel.store import PayeeStore
from btcchannel.store.ops import state_totals

__all__ = ["payee_summary", "summary_text"]


def payee_summary(store: PayeeStore, tip_height: int | None) -> dict[str, Any]:
    """Totals by state, what was earned (closed channels' best payments, before close fees), what
    waits in closes, what open channels hold (with the nearest expiry), and the close fee rates used."""
    totals = state_totals(store)

    def t(state: ChannelState) -> tuple[int, int, int]:
        x = totals.get(state.value)
        return (x.channels, x.amount_sat, x.deposit_sat) if x else (0, 0, 0)

    closed, closing, opened = t(ChannelState.CLOSED), t(ChannelState.CLOSING), t(ChannelState.OPEN)
    rates = [
        r.close_fee_rate
        for r in store.list([ChannelState.CLOSING, ChannelState.CLOSED])
        if r.close_fee_rate is not None
    ]
    open_recs = store.list([ChannelState.OPEN])
    nearest = min((r.expiry_height for r in open_recs), default=None)
    return {
        "channels": {state: x.channels for state, x in sorted(totals.items())},
        "earned_sat": closed[1],
        "pending_close": {"channels": closing[0], "amount_sat": closing[1]},
        "open": {
            "channels": opened[0],
            "amount_sat": opened[1],
            "deposit_sat": opened[2],
            "nearest_expiry_height": nearest,
            "blocks_to_nearest_expiry": None if nearest is None or tip_height is None else nearest - tip_height,
        },
        "close_fee_rate_sat_vb": {"min": min(rates), "max": max(rates), "last": rates[-1]} if rates else None,
        "tip_height": tip_height,
    }


def _count(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _nearest(o: dict[str, Any]) -> str:
    """The nearest expiry of the open channels in words; one already reached says so (the stored
    view is stale: the service was not running to close it)."""
    left = o["blocks_to_nearest_expiry"]
    if left is None:
        return ""
    if left > 0:
        return f", nearest expiry in {_count(left, 'block')}"
    ago = "" if left == 0 else f", {_count(-left, 'block')} ago"
    return (
        f", expired at height {o['nearest_expiry_height']}{ago}: not closed in time (was `serve` "
        "running?); the payer can refund it"
    )


def summary_text(doc: dict[str, Any]) -> str:
    """``payee_summary``'s document as a few lines for a terminal."""
    o, p = doc["open"], doc["pending_close"]
    rates = doc["close_fee_rate_sat_vb"]
    lines = [
        f"earned         {doc['earned_sat']} sat (closed channels, before close fees)",
        f"pending closes {_count(p['channels'], 'channel')}, {p['amount_sat']} sat",
        f"open           {_count(o['channels'], 'channel')}, {o['amount_sat']} sat paid of {o['deposit_sat']} sat "
        "deposits" + _nearest(o),
        "close fees     "
        + (f"{rates['min']:.2f}-{rates['max']:.2f} sat/vB (last {rates['last']:.2f})" if rates else "none yet"),
        "channels       " + (", ".join(f"{k} {v}" for k, v in doc["channels"].items()) or "none"),
    ]
    return "\n".join(lines)
