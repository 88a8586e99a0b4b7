"""The payer's commands over its datadir and its client, as the command line runs them: the
documents of ``list``, ``pay``, ``open`` and ``fetch``, ``summary``'s totals, ``forget``, the
backups (JSON and output descriptors), the funding descriptor and the seed.

The functions that take a datadir open the payer's store (``<datadir>/payer.db``) for the call and
close it; the ones that take a :class:`~btcchannel.payer.client.PayerClient` read its store. The
answers are plain documents (what ``--json`` prints) and the errors the library's own
(:mod:`btcchannel.errors`): the command line only renders them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from btcchannel.core.params import ChannelParams
from btcchannel.core.state import ChannelState
from btcchannel.errors import BadBackup, BadRequest, IllegalTransition
from btcchannel.payer.client import PayerClient
from btcchannel.payer.descriptors import (
    DescriptorBackup,
    channel_descriptor,
    descriptor_backup,
    write_descriptor_backup,
)
from btcchannel.payer.views import mempool_fee, payer_summary
from btcchannel.store import PayerRecord, PayerStore
from btcchannel.store.ops import write_payer_backup

__all__ = [
    "acked_sat",
    "channel_list",
    "channel_totals",
    "descriptor_doc",
    "export_backup",
    "export_descriptors",
    "forget",
    "has_channels",
    "has_store",
    "import_backup",
    "knows",
    "list_entry",
    "opened_doc",
    "pay_doc",
    "restore_seed",
    "seed_info",
    "store_path",
    "summary",
]

#: the states whose channel may still hold the deposit on the refund path (``list`` marks them
#: refundable once the chain reaches their expiry)
_REFUNDABLE_STATES = frozenset({ChannelState.OPEN, ChannelState.FUNDING, ChannelState.CLOSING})


def store_path(datadir: str | os.PathLike[str]) -> Path:
    """The payer's SQLite store in ``datadir``."""
    return Path(datadir) / "payer.db"


def has_store(datadir: str | os.PathLike[str]) -> bool:
    """Whether ``datadir`` holds a payer's store (nothing is created)."""
    return store_path(datadir).exists()


def knows(datadir: str | os.PathLike[str], channel_id: str) -> bool:
    """Whether ``datadir``'s payer has ``channel_id`` (False without a store; nothing is created)."""
    if not has_store(datadir):
        return False
    with PayerStore(store_path(datadir)) as store:
        return store.find(channel_id) is not None


def has_channels(datadir: str | os.PathLike[str]) -> bool:
    """Whether the payer has any channel."""
    with PayerStore(store_path(datadir)) as store:
        return bool(store.list())


def list_entry(rec: PayerRecord, tip_height: int | None) -> dict[str, Any]:
    """One channel as ``list`` shows it: blocks to its expiry at ``tip_height`` (None: unknown) and
    whether its deposit can be refunded now (funded, not ended, expiry reached)."""
    left = None if tip_height is None else rec.expiry_height - tip_height
    return {
        "channel_id": rec.channel_id,
        "server_url": rec.server_url,
        "state": rec.state.value,
        "deposit_sat": rec.deposit_sat,
        "amount_sat": rec.acked_sat,
        "signed_sat": rec.amount_sat,
        "expiry_height": rec.expiry_height,
        "blocks_left": left,
        "refundable": left is not None and left <= 0 and rec.state in _REFUNDABLE_STATES,
        "funding_txid": rec.funding_txid,
        "close_txid": rec.close_txid,
        "refund_txid": rec.refund_txid,
    }


def channel_list(datadir: str | os.PathLike[str], tip_height: int | None) -> list[dict[str, Any]]:
    """Every channel of the payer as ``list`` shows it (:func:`list_entry`), oldest first."""
    with PayerStore(store_path(datadir)) as store:
        return [list_entry(r, tip_height) for r in store.list()]


def summary(datadir: str | os.PathLike[str], tip_height: int | None) -> dict[str, Any]:
    """The payer's totals (:func:`btcchannel.payer.views.payer_summary`) at ``tip_height``."""
    with PayerStore(store_path(datadir)) as store:
        return payer_summary(store.list(), tip_height)


def forget(datadir: str | os.PathLike[str], channel_id: str) -> None:
    """Remove a channel that holds nothing: failed, ended, or proposed and never funded
    (``IllegalTransition`` for any other: it may still hold the deposit)."""
    with PayerStore(store_path(datadir)) as store:
        rec = store.get(channel_id)
        dead = rec.state in (ChannelState.FAILED, ChannelState.CLOSED, ChannelState.REFUNDED) or (
            rec.state is ChannelState.PROPOSED and rec.funding_txid is None
        )
        if not dead:
            raise IllegalTransition(
                f"channel {channel_id} is {rec.state.value}: it may still hold the deposit; "
                "only failed, unfunded or ended channels are forgotten"
            )
        store.delete(channel_id)


def descriptor_doc(datadir: str | os.PathLike[str], channel_id: str, private: bool) -> dict[str, Any] | None:
    """``channel_id``'s funding output descriptor as the payer holds it (``private``: with the
    payer's key); None when the payer has no such channel."""
    if not has_store(datadir):
        return None
    with PayerStore(store_path(datadir)) as store:
        rec = store.find(channel_id)
        if rec is None:
            return None
        params = ChannelParams.from_json(rec.params)
        return {
            "channel_id": channel_id,
            "role": "payer",
            "script_version": params.script_version,
            "private": private,
            "descriptor": channel_descriptor(store, rec, private),
        }


def export_backup(
    datadir: str | os.PathLike[str], file: str | os.PathLike[str], *, keys: bool = True, replace_any: bool = False
) -> int:
    """Write the payer's channels (with their keys unless not ``keys``) to ``file``; the number written."""
    with PayerStore(store_path(datadir)) as store:
        data = store.export_backup(keys=keys)
    write_payer_backup(data, file, replace_any=replace_any)
    return len(data["channels"])


def export_descriptors(
    datadir: str | os.PathLike[str], file: str | os.PathLike[str], *, keys: bool = True, replace_any: bool = False
) -> DescriptorBackup:
    """Write the channels not yet ended as ``importdescriptors`` requests to ``file``; what was written
    and what was left out (:func:`btcchannel.payer.descriptors.descriptor_backup`)."""
    with PayerStore(store_path(datadir)) as store:
        found = descriptor_backup(store, keys=keys)
    write_descriptor_backup(found, file, replace_any=replace_any)
    return found


def import_backup(datadir: str | os.PathLike[str], file: str | os.PathLike[str]) -> int:
    """Merge the backup ``file`` into the payer's channels; how many were imported (``BadBackup`` for
    a file that is not one)."""
    try:
        data = json.loads(Path(file).read_text())
    except ValueError as e:
        raise BadBackup(f"{file} is not a backup: not JSON ({e})") from e
    with PayerStore(store_path(datadir)) as store:
        try:
            return store.import_backup(data)
        except BadRequest as e:  # the store's word for a file it cannot take
            raise BadBackup(f"{file}: {e.message}") from e


def seed_info(datadir: str | os.PathLike[str]) -> tuple[bytes, int]:
    """The payer's seed (created if there is none) and its next key index."""
    with PayerStore(store_path(datadir)) as store:
        return store.seed(), store.next_key_index()


def restore_seed(datadir: str | os.PathLike[str], seed: bytes) -> tuple[bool, int]:
    """Install ``seed`` (False when it was there already) and re-derive every missing channel key
    from it (checked against the stored public keys); the number of keys restored."""
    with PayerStore(store_path(datadir)) as store:
        installed = store.restore_seed(seed)
        return installed, store.restore_keys()


def acked_sat(client: PayerClient, channel_id: str) -> int:
    """The total the payee has acknowledged on ``channel_id``."""
    return client.store.get(channel_id).acked_sat


def channel_totals(client: PayerClient, channel_id: str) -> dict[str, Any]:
    """``amount_sat`` (acknowledged), ``remaining_sat`` of the deposit and ``state`` of ``channel_id``."""
    rec = client.store.get(channel_id)
    return {"amount_sat": rec.acked_sat, "remaining_sat": rec.deposit_sat - rec.acked_sat, "state": rec.state.value}


async def pay_doc(client: PayerClient, channel_id: str, increment_sat: int) -> dict[str, Any]:
    """Pay ``increment_sat`` more on ``channel_id``; what ``pay`` answers: the increment actually added
    (a stored payment re-sent first counts in it), the new total, the deposit and what remains of it,
    the state and whether the channel now ends (any state but ``open``)."""
    before = acked_sat(client, channel_id)
    total = await client.pay(channel_id, increment_sat)
    rec = client.store.get(channel_id)
    return {
        "channel_id": channel_id,
        "increment_sat": total - before,
        "amount_sat": total,
        "deposit_sat": rec.deposit_sat,
        "remaining_sat": rec.deposit_sat - total,
        "state": rec.state.value,
        "closing": rec.state is not ChannelState.OPEN,
    }


async def opened_doc(client: PayerClient, channel_id: str) -> dict[str, Any]:
    """What ``open`` answers: the payee's channel object and the funding's fee (``fee_sat`` and
    ``fee_rate_sat_vb``, None once it left the mempool)."""
    obj = await client.status(channel_id)
    obj.update(await mempool_fee(client.node, client.store.get(channel_id).funding_txid or ""))
    return obj
