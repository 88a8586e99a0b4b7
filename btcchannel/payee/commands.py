"""The payee's commands over its datadir, as the command line runs them without the service:
its channels as protocol objects, one channel's last state as a fully signed close, its funding
descriptor, the totals and the seed.

Each function opens the payee's store (``<datadir>/payee.db``) for the call and closes it; the
answers are plain documents (what ``--json`` prints) and the errors the library's own
(:mod:`btcchannel.errors`): the command line only renders them. Closing and bumping a close are
the closer's (:func:`btcchannel.payee.closer.operator_close`, :func:`~btcchannel.payee.closer.operator_bump`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from btcchannel.bitcoind.rpc import Node
from btcchannel.core import script
from btcchannel.core.descriptor import funding_descriptor
from btcchannel.core.params import ChannelParams
from btcchannel.core.terms import MIN_RELAY_FEE_RATE
from btcchannel.core.tx import tx_hex, tx_id, tx_vsize
from btcchannel.errors import UnknownChannel
from btcchannel.payee.shared import Channels
from btcchannel.payee.summary import payee_summary
from btcchannel.store import PayeeStore
from btcchannel.wire import channel_object

__all__ = [
    "channel_doc",
    "channel_docs",
    "close_tx",
    "descriptor_doc",
    "has_store",
    "knows",
    "restore_seed",
    "seed_info",
    "store_path",
    "summary",
]


def store_path(datadir: str | os.PathLike[str]) -> Path:
    """The payee's SQLite store in ``datadir``."""
    return Path(datadir) / "payee.db"


def has_store(datadir: str | os.PathLike[str]) -> bool:
    """Whether ``datadir`` holds a payee's store (nothing is created)."""
    return store_path(datadir).exists()


def knows(datadir: str | os.PathLike[str], channel_id: str) -> bool:
    """Whether ``datadir``'s payee has ``channel_id`` (False without a store; nothing is created)."""
    if not has_store(datadir):
        return False
    with PayeeStore(store_path(datadir)) as store:
        return store.find(channel_id) is not None


def channel_docs(datadir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every channel of the payee, as protocol channel objects (oldest first)."""
    with PayeeStore(store_path(datadir)) as store:
        return [channel_object(r) for r in store.list()]


def channel_doc(datadir: str | os.PathLike[str], channel_id: str) -> dict[str, Any]:
    """One channel as its protocol object; ``UnknownChannel`` if there is none."""
    with PayeeStore(store_path(datadir)) as store:
        return channel_object(store.get(channel_id))


def descriptor_doc(datadir: str | os.PathLike[str], channel_id: str) -> dict[str, Any]:
    """``channel_id``'s funding output descriptor as the payee holds it (public keys only)."""
    if not has_store(datadir):
        raise UnknownChannel(f"no channel {channel_id}")
    with PayeeStore(store_path(datadir)) as store:
        params = ChannelParams.from_json(store.get(channel_id).params)
    return {
        "channel_id": channel_id,
        "role": "payee",
        "script_version": params.script_version,
        "private": False,
        "descriptor": funding_descriptor(params),
    }


async def close_tx(
    datadir: str | os.PathLike[str],
    network: str,
    node: Node,
    channel_id: str,
    fee_rate: float | None = None,
    address: str | None = None,
) -> dict[str, Any]:
    """The payee's last state of ``channel_id`` as a fully signed close, broadcast by no one: the best
    payment, the payee's signature, a fee at ``fee_rate`` (default: the node's estimate; never below
    the relay minimum) or the most the payment affords below it, paid to ``address`` (default: a new
    address of the node wallet)."""
    with PayeeStore(store_path(datadir)) as store:
        rec = store.get(channel_id)
        ch = Channels(store, 0).build(rec)
    payout = script.check_payout_script(script.address_to_script(address or await node.new_address(), network))
    rate = max(fee_rate or await node.estimate_fee_rate(), MIN_RELAY_FEE_RATE)
    tx, rate = ch.build_close_at_most(payout, rate)
    return {
        "channel_id": channel_id,
        "amount_sat": rec.amount_sat,
        "txid": tx_id(tx),
        "hex": tx_hex(tx),
        "vsize": tx_vsize(tx),
        "fee_rate_sat_vb": round(rate, 3),
    }


def summary(datadir: str | os.PathLike[str], tip_height: int | None) -> dict[str, Any]:
    """The payee's totals (:func:`btcchannel.payee.summary.payee_summary`) at ``tip_height``."""
    with PayeeStore(store_path(datadir)) as store:
        return payee_summary(store, tip_height)


def seed_info(datadir: str | os.PathLike[str]) -> tuple[bytes, int]:
    """The payee's seed (created if there is none) and its next key index."""
    with PayeeStore(store_path(datadir)) as store:
        return store.seed(), store.next_key_index()


def restore_seed(datadir: str | os.PathLike[str], seed: bytes) -> tuple[bool, int]:
    """Install ``seed`` (False when it was there already) and re-derive every missing channel key
    from it (checked against the stored public keys); the number of keys restored."""
    with PayeeStore(store_path(datadir)) as store:
        installed = store.restore_seed(seed)
        return installed, store.restore_keys()
