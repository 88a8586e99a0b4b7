"""What the regtest demo's stories share: cross-checks, paid downloads with a progress bar, and the
channel read back from the node with who-owns-what checked.

- :func:`check`: a cross-check that stops the story with ``ChannelError`` unless it holds;
- :func:`download`: buy chunks of a metered file one by one; returns the bytes and the signed payments;
- :func:`read_channel`: the channel's funding and its one confirmed spend, as the node shows them;
- :func:`split`: who got what from that spend, checked against the deposit and the last payment.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

import click

from btcchannel.core.params import ChannelParams
from btcchannel.errors import ChannelError
from btcchannel.payer.client import PayerClient
from btcchannel.payer.metered import MeteredPayer
from btcchannel.testing.chain import Chain, ChannelView, TxView

__all__ = ["check", "download", "progress", "read_channel", "split"]


def check(condition: bool, message: str) -> None:
    """A cross-check: unless it holds the demo stops with ``message`` and a non-zero status."""
    if not condition:
        raise ChannelError(f"cross-check failed: {message}")


@contextlib.contextmanager
def progress(length: int, label: str) -> Iterator[Callable[[int], None]]:
    """A click progress bar when stdout is a terminal, else nothing."""
    if sys.stdout.isatty():
        with click.progressbar(length=length, label=label, file=sys.stdout, show_pos=True) as bar:
            yield bar.update
    else:
        yield lambda n: None


async def download(payer: MeteredPayer, url: str, first: int, count: int) -> tuple[bytes, int]:
    """Fetch chunks ``first .. first+count-1`` paying for each; returns (bytes, signatures sent)."""
    store, signatures, parts = payer.client.store, 0, list[bytes]()
    signed_before = store.get(payer.channel_id).amount_sat
    with progress(count, "paid chunks") as advance:
        for i in range(first, first + count):
            status, body = await payer.fetch(f"{url}/v1/file/{i}")
            check(status == 200, f"chunk {i} answered HTTP {status}")
            parts.append(body)
            signed = store.get(payer.channel_id).amount_sat
            signatures, signed_before = signatures + (signed != signed_before), signed
            advance(1)
    return b"".join(parts), signatures


async def read_channel(chain: Chain, client: PayerClient, cid: str) -> ChannelView:
    """Read the channel back from the node (getrawtransaction, txindex) and check who owns what."""
    rec = client.store.get(cid)
    assert rec.funding_txid is not None and rec.funding_vout is not None
    view = await chain.channel_view(rec.funding_txid, rec.funding_vout, ("payer", "payee"))
    value, spk, _ = view.funding.outputs[rec.funding_vout]
    check(value == rec.deposit_sat, f"the funding output holds {value} sat, not the deposit {rec.deposit_sat}")
    check(
        spk == ChannelParams.from_json(rec.params).funding_script.hex(),
        "the funding output does not pay the channel's script",
    )
    check(view.funding.height is not None, "the funding transaction is not confirmed")
    check(len(view.spenders) == 1, f"{len(view.spenders)} confirmed spends of the funding outpoint")
    assert view.spend is not None
    check(view.spend.fee_sat == rec.deposit_sat - sum(v for v, _, _ in view.spend.outputs), "spend fee arithmetic")
    check(view.paid_to[""] == 0, f"an output of {view.spend.txid} pays neither the payer's nor the payee's wallet")
    return view


def split(report: ChannelView, deposit: int | None = None, paid: int | None = None) -> tuple[int, int, int, TxView]:
    """(payee's sat, payer's sat, fee, the spend) of a read channel; given ``deposit`` and ``paid``,
    checked to be the close of a channel of ``deposit`` with the last correct payment ``paid``."""
    assert report.spend is not None
    r, c, f = report.paid_to["payee"], report.paid_to["payer"], report.spend.fee_sat
    if deposit is not None and paid is not None:
        check(r + c + f == deposit, f"payee {r} + payer {c} + fee {f} != deposit {deposit}")
        check(r + f == paid, f"payee {r} + fee {f} != last correct payment {paid}")
        check(c == deposit - paid, f"payer change {c} != deposit {deposit} - {paid}")
    return r, c, f, report.spend
