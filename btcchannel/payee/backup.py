"""The payee's continuous backup: a whole copy of ``payee.db`` kept at a second path.

A background task watches the database with its own connection: ``PRAGMA data_version``
changes whenever any other connection (this service's store, an operator's command, another
instance) commits, so every state change and every payment is copied within ``poll_s``; a
copy is also taken every ``interval_s`` and once more at shutdown. Each copy uses SQLite's
online backup API (a consistent snapshot while the service keeps writing) into
``path.tmp``, then renames it over ``path``: the backup is always a whole database. The copy
runs in a worker thread, off the event loop.

:func:`restore_closing` is the other half: a lost ``payee.db`` is replaced by the backup and
every channel that may hold payments is closed with the best payment the backup has.

Entry points::

    install_backup(app, db_path, backup_path, *, poll_s=0.5, interval_s=60.0) -> BackupStats
    restore_closing(config, node, backup_path) -> list[dict]   # channel objects after the closes
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from btcchannel.bitcoind.rpc import Node
from btcchannel.core.state import ChannelState
from btcchannel.errors import BadRequest
from btcchannel.payee.closer import operator_close
from btcchannel.payee.config import ServerConfig
from btcchannel.store import PayeeStore, open_private_file
from btcchannel.store.ops import online_backup

__all__ = ["BackupStats", "install_backup", "restore_closing"]

log = logging.getLogger("btcchannel.payee.backup")


@dataclass
class BackupStats:
    """What the backup task did: copies taken, their total and last duration (seconds)."""

    copies: int = 0
    total_s: float = 0.0
    last_s: float = 0.0
    last_at: float = 0.0
    errors: int = 0
    durations: list[float] = field(default_factory=list)


def _data_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA data_version").fetchone()[0])


async def _run(db_path: Path, backup_path: Path, poll_s: float, interval_s: float, stats: BackupStats) -> None:
    watch = sqlite3.connect(str(db_path), check_same_thread=False)
    try:
        seen: int | None = None
        while True:
            version = _data_version(watch)
            if version != seen or time.monotonic() - stats.last_at >= interval_s:
                await _copy(db_path, backup_path, stats)
                seen = version
            await asyncio.sleep(poll_s)
    finally:
        watch.close()


async def _copy(db_path: Path, backup_path: Path, stats: BackupStats) -> None:
    try:
        took = await asyncio.to_thread(online_backup, db_path, backup_path)
    except (OSError, sqlite3.Error) as exc:
        stats.errors += 1
        log.warning("backup of %s to %s failed: %s", db_path, backup_path, exc)
        return
    stats.copies += 1
    stats.total_s += took
    stats.last_s = took
    stats.last_at = time.monotonic()
    if len(stats.durations) < 10_000:
        stats.durations.append(took)


def install_backup(app: web.Application, db_path: Path, backup_path: Path, *, poll_s: float = 0.5,
                   interval_s: float = 60.0) -> BackupStats:
    """Keep ``backup_path`` a copy of ``db_path`` while ``app`` runs (see the module's docstring)."""
    if backup_path.resolve() == db_path.resolve():
        raise BadRequest("the backup must be another file than the database")
    stats = BackupStats()

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.ensure_future(_run(db_path, backup_path, poll_s, interval_s, stats))
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await _copy(db_path, backup_path, stats)  # the last state, at shutdown

    app.cleanup_ctx.append(lifecycle)
    return stats


async def restore_closing(config: ServerConfig, node: Node, backup_path: Path, *,
                          force: bool = False) -> list[dict[str, Any]]:
    """Put ``backup_path`` in place of ``config.db_path`` and close every channel that is open or
    funding (or whose close was claimed) with its best payment; the channel objects afterwards.

    Refuses (``BadRequest``) to replace an existing database unless ``force``.
    """
    with PayeeStore(backup_path) as check:  # a payee store (migrated if older), or StoreSchemaError
        live = [r.channel_id for r in check.list([ChannelState.OPEN, ChannelState.FUNDING, ChannelState.CLOSING])]
    db = config.db_path
    if db.exists() and not force:
        raise BadRequest(f"{db} exists: restoring would replace it (pass --force after moving it away)")
    db.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    for leftover in (db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        leftover.unlink(missing_ok=True)
    open_private_file(db)
    shutil.copyfile(backup_path, db)
    results = []
    for cid in live:
        results.append(await operator_close(config, node, cid))
    return results
