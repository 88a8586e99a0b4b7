"""What the payer reads and says: which of its channels serves a URL (and why none does), a
transaction's fee, an unreachable payee in words."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from btcchannel.bitcoind.rpc import Node
from btcchannel.core.state import ChannelState
from btcchannel.core.tx import OutPoint
from btcchannel.errors import BadUrl, ChannelError, NotOpen, PayeeUnreachable
from btcchannel.store import PayerRecord, PayerStore

__all__ = [
    "CLOSE_FINAL_CONFIRMATIONS",
    "Progress",
    "check_payee_url",
    "no_progress",
    "mempool_fee",
    "none_usable",
    "payee_unreachable",
    "payer_summary",
    "refresh_from_chain",
    "to_payee",
]


Progress = Callable[[str, dict[str, Any]], None]
"""A progress callback: ``(event, fields)``; events ``proposed`` (channel_id), ``funded``
(channel_id, funding_txid, fee_sat, fee_rate_sat_vb), ``confirmations`` (confirmations, needed)
and ``open``."""


def no_progress(event: str, fields: dict[str, Any]) -> None:
    """The default progress callback: nothing."""


CLOSE_FINAL_CONFIRMATIONS = 6
"""Depth at which the payer counts a close seen on chain as final (``closed``): the payee's
default ``final_confirmations``, so that both sides say ``closing`` until then. A payee that
reports its channel closed earlier (a smaller ``serve --final-confirmations``) is believed."""


def check_payee_url(url: str) -> None:
    """``BadUrl`` unless ``url`` is an absolute http(s) URL with a host (``127.0.0.1:8402`` is not)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        bare = url.split("://", 1)[-1]
        raise BadUrl(
            f"{url!r} is not a payee URL: it needs http:// or https:// and a host, "
            f"e.g. http://{bare or '127.0.0.1:8402'}"
        )


def payee_unreachable(method: str, url: str, exc: BaseException, timeout: float) -> PayeeUnreachable:
    """A :class:`PayeeUnreachable` for ``exc`` (an aiohttp or timeout error) that reads as a sentence."""
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        why = f"no answer in {timeout:g} s"
    elif isinstance(exc, aiohttp.ClientConnectorError):
        err = exc.os_error
        reason = os.strerror(err.errno) if isinstance(err, ConnectionError) and err.errno else err.strerror
        why = f"cannot connect to {exc.host}:{exc.port}: {reason or type(err).__name__}"
    else:
        why = str(exc) or type(exc).__name__
    return PayeeUnreachable(f"payee unreachable: {method} {url}: {why}")


def to_payee(recs: list[PayerRecord], url: str) -> list[PayerRecord]:
    """The channels to ``url``'s payee (same scheme, host and port), newest first (``recs`` oldest first)."""
    want = urlsplit(url)
    return [
        rec
        for rec in reversed(recs)
        if (urlsplit(rec.server_url).scheme, urlsplit(rec.server_url).netloc) == (want.scheme, want.netloc)
    ]


def none_usable(url: str, recs: list[PayerRecord]) -> NotOpen:
    """The error saying why none of ``recs`` (the channels to ``url``'s payee) can pay, and what to run."""
    want = urlsplit(url)
    base = f"{want.scheme}://{want.netloc}"
    if not recs:
        return NotOpen(
            f"no channel to {base}: open one with `btcchannel open {base} --deposit-sat N --lifetime-blocks N`"
        )
    why = "; ".join(
        f"{r.channel_id} is {r.state.value}"
        + (" with nothing left of its deposit" if r.state is ChannelState.OPEN else "")
        for r in recs[:5]
    )
    return NotOpen(f"no usable channel to {base} ({why}): open a new one with `btcchannel open {base} ...`")


async def mempool_fee(node: Node, txid: str) -> dict[str, Any]:
    """``fee_sat`` and ``fee_rate_sat_vb`` of an unconfirmed transaction (None when not in the mempool)."""
    try:
        entry = await node.call("getmempoolentry", txid)
    except ChannelError:
        return {"fee_sat": None, "fee_rate_sat_vb": None}
    fee = round(float(entry["fees"]["base"]) * 100_000_000)
    return {"fee_sat": fee, "fee_rate_sat_vb": round(fee / int(entry["vsize"]), 2)}


def payer_summary(recs: list[PayerRecord], tip_height: int | None) -> dict[str, Any]:
    """The payer's totals: spent (acknowledged in channels that closed or are closing), what open
    channels hold, and the refundable channels (funded, not ended, at or past expiry) with blocks left;
    ``refundable_later`` leaves out the channels whose close is under way."""
    spent = sum(r.acked_sat for r in recs if r.state in (ChannelState.CLOSING, ChannelState.CLOSED))
    live = [r for r in recs if r.state in (ChannelState.OPEN, ChannelState.FUNDING)]
    funded = [
        (r, None if tip_height is None else r.expiry_height - tip_height)
        for r in recs
        if r.funding_txid is not None and r.state not in (ChannelState.CLOSED, ChannelState.REFUNDED)
    ]

    def item(r: PayerRecord, left: int | None) -> dict[str, Any]:
        return {
            "channel_id": r.channel_id,
            "deposit_sat": r.deposit_sat,
            "expiry_height": r.expiry_height,
            "blocks_left": left,
        }

    by_state: dict[str, int] = {}
    for r in recs:
        by_state[r.state.value] = by_state.get(r.state.value, 0) + 1
    return {
        "channels": dict(sorted(by_state.items())),
        "spent_sat": spent,
        "open": {
            "channels": len(live),
            "deposit_sat": sum(r.deposit_sat for r in live),
            "amount_sat": sum(r.acked_sat for r in live),
            "remaining_sat": sum(r.deposit_sat - r.acked_sat for r in live),
        },
        "refundable": [item(r, left) for r, left in funded if left is not None and left <= 0],
        "refundable_later": [
            item(r, left) for r, left in funded if (left is None or left > 0) and r.state is not ChannelState.CLOSING
        ],
        "tip_height": tip_height,
    }


async def refresh_from_chain(store: PayerStore, node: Node) -> int:
    """Bring the payer's records up to the chain's view; the tip height.

    A channel whose deposit was spent by a confirmed transaction other than the payer's own
    refund becomes ``closing`` (its close txid recorded, found on chain when the payee did not
    report it), then ``closed`` once that close has :data:`CLOSE_FINAL_CONFIRMATIONS`; a channel the payee reported
    ended whose deposit is still unspent stays as it is
    (``refund`` decides).
    """
    tip = await node.tip_height()
    for rec in store.list():
        if rec.state not in (ChannelState.FUNDING, ChannelState.OPEN, ChannelState.CLOSING) or not rec.funding_txid:
            continue
        spender = rec.close_txid
        if spender is None:
            outpoint = OutPoint(rec.funding_txid, rec.funding_vout or 0)
            funded = await node.tx_confirmations(rec.funding_txid)
            if not funded or await node.get_txout(outpoint) is not None:
                continue
            spender = await node.find_spender(outpoint, tip - funded + 1)
        if not spender or spender == rec.refund_txid:
            continue
        depth = await node.tx_confirmations(spender) or 0
        if depth >= CLOSE_FINAL_CONFIRMATIONS:
            store.set_state(rec.channel_id, ChannelState.CLOSED, close_txid=spender)
        elif depth > 0 and (rec.state is not ChannelState.CLOSING or rec.close_txid != spender):
            store.set_state(rec.channel_id, ChannelState.CLOSING, close_txid=spender)
    return tip
