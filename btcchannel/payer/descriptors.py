"""The payer's channels as output descriptors: what any descriptor wallet needs to watch a channel and
to sweep its deposit back after expiry, without btcchannel.

A descriptor channel's private descriptor carries the channel's key as the extended private key of
its seed path (``[fingerprint/index h]tprv...``, :func:`btcchannel.core.descriptor.seed_key_expression`)
when the datadir's seed derives it, else as WIF. :func:`descriptor_backup` is a list of
``importdescriptors`` requests (Bitcoin Core's RPC takes it as is)::

    bitcoin-cli -named createwallet wallet_name=refund blank=true
    bitcoin-cli -rpcwallet=refund importdescriptors "$(cat descriptors.json)"
    bitcoin-cli -rpcwallet=refund -named sendall recipients='["<address>"]' locktime=<expiry height>

Entry points::

    channel_descriptor(store, rec, private=False) -> str
    descriptor_backup(store, keys=True) -> DescriptorBackup     # .requests, .left_out
    write_descriptor_backup(backup, path, replace_any=False) -> None
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from btcchannel.core.descriptor import funding_descriptor, seed_key_expression, wif
from btcchannel.core.keys import public_key
from btcchannel.core.params import ChannelParams
from btcchannel.core.script import SCRIPT_DESCRIPTOR
from btcchannel.core.seed import derive_channel_key
from btcchannel.core.state import TERMINAL_STATES
from btcchannel.errors import BadRequest
from btcchannel.store import PayerRecord, PayerStore

__all__ = [
    "DescriptorBackup",
    "channel_descriptor",
    "descriptor_backup",
    "payer_key_expression",
    "write_descriptor_backup",
]


def payer_key_expression(store: PayerStore, rec: PayerRecord) -> str:
    """The channel's private key as a descriptor key expression: the seed path's xprv with its origin when
    this datadir's seed derives the key, else WIF. BadRequest when the row has lost its key."""
    params = ChannelParams.from_json(rec.params)
    if not rec.privkey or public_key(rec.privkey) != params.payer_pubkey:
        raise BadRequest(f"channel {rec.channel_id} has no usable key in this datadir (restore its seed)")
    if (
        rec.key_index is not None
        and store.has_seed()
        and derive_channel_key(store.seed(), rec.key_index) == rec.privkey
    ):
        return seed_key_expression(store.seed(), rec.key_index, params.network)
    return wif(rec.privkey, params.network)


def channel_descriptor(store: PayerStore, rec: PayerRecord, private: bool = False) -> str:
    """The funding output's descriptor with its checksum; ``private`` adds the payer's key (keep it secret)."""
    params = ChannelParams.from_json(rec.params)
    return funding_descriptor(params, payer_key=payer_key_expression(store, rec) if private else None)


@dataclass
class DescriptorBackup:
    """``importdescriptors`` requests for the channels that still hold a deposit, and the ones left out."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    #: channels no descriptor with keys expresses (legacy script), with why
    left_out: list[dict[str, str]] = field(default_factory=list)


def descriptor_backup(store: PayerStore, keys: bool = True) -> DescriptorBackup:
    """Every channel not yet ended (proposed, funding, open, closing) as an ``importdescriptors`` request:
    ``{"desc", "timestamp", "label"}``, the timestamp the channel's creation (a rescan from there finds
    the funding). With ``keys`` the descriptors are private (for a blank wallet that can sign); a
    legacy-script channel then has none and is listed in ``left_out``. Without ``keys`` they are
    watch-only (legacy channels as ``addr()``), for a wallet created with private keys disabled."""
    out = DescriptorBackup()
    for rec in store.list():
        if rec.state in TERMINAL_STATES:
            continue
        params = ChannelParams.from_json(rec.params)
        if keys and params.script_version != SCRIPT_DESCRIPTOR:
            out.left_out.append(
                {"channel_id": rec.channel_id, "reason": "legacy script: refund it with btcchannel (backup export)"}
            )
            continue
        out.requests.append(
            {
                "desc": channel_descriptor(store, rec, private=keys),
                "timestamp": int(rec.created_at),
                "label": f"btcchannel {rec.channel_id}",
            }
        )
    return out


def write_descriptor_backup(
    backup: DescriptorBackup, path: str | os.PathLike[str], *, replace_any: bool = False
) -> None:
    """Write the requests as a JSON array to ``path`` (0600, atomically replaced); an existing file is
    replaced only with ``replace_any`` (BadRequest otherwise)."""
    dest = Path(path)
    if dest.exists() and not replace_any:
        raise BadRequest(f"{dest} exists: not overwriting it (--force replaces it)")
    dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(backup.requests, indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, dest)
