"""The payee's continuous backup: a whole copy of ``payee.db`` kept at a second path.

**Synchronous (the default)**: every payment is written to the backup before it is acknowledged.
The backup is an SQLite database of its own (WAL, ``synchronous=FULL``) that
:class:`SyncBackup` keeps open; the group-commit writer hands it each batch of payments it
committed (:attr:`~btcchannel.store._group.GroupWriter.after_commit`, and the store's
``payment_mirror`` for a payment stored outside the writer), and it runs the same statements
on the backup in one transaction of its own: one more fsync per group commit, on the writer's
thread. A payment whose channel the backup does not hold in the same state yet (a channel
opened since the last copy) makes it take a whole copy of ``payee.db`` at once, before the
acknowledgement. So ``restore`` closes every channel for at least what was acknowledged. If the
backup cannot be written, the payment is not acknowledged (the payer gets an error and may
retry); ``payee.db`` holds it though, so its exact retry, which writes nothing, is acknowledged
only after a whole copy (:meth:`SyncBackup.catch_up`, the store's ``payment_barrier``).
Everything else (proposals, fundings, closes) reaches the backup through the copies.

**Asynchronous** (``synchronous=False``, ``serve --backup-async``): the backup only gets copies,
so it lags ``payee.db`` by up to ``poll_s`` plus one copy's duration (under load: the
payments acknowledged in that window are missing from it, and a restore closes those channels
below what the payer was acknowledged).

In both modes a background task watches the database with its own connection: ``PRAGMA
data_version`` changes whenever any other connection (this service's store, an operator's
command, another instance) commits, so every state change is copied within ``poll_s`` (with
the synchronous backup, which holds the payments already, at most every
``SYNC_COPY_EVERY_S``); a copy is also taken every ``interval_s`` and once more at shutdown. Each copy uses SQLite's
online
backup API (a consistent snapshot while the service keeps writing): asynchronous copies go to
``path.tmp``, then are renamed over ``path``; synchronous ones go into the open backup
database in one transaction (under the lock its payment writes take). The backup is always a
whole database. The copies run in a worker thread, off the event loop.

:func:`restore_closing` is the other half: a lost ``payee.db`` is replaced by the backup and
every channel that may hold payments is closed with the best payment the backup has.

Entry points::

    install_backup(app, db_path, backup_path, *, poll_s=0.5, interval_s=60.0,
                   synchronous=True) -> BackupStats
    SyncBackup(db_path, backup_path)        # .mirror(statements), .catch_up(), .copy() -> seconds, .close()
    restore_closing(config, node, backup_path) -> list[dict]   # channel objects after the closes
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from btcchannel.bitcoind.rpc import Node
from btcchannel.core.state import ChannelState
from btcchannel.errors import BadRequest
from btcchannel.payee.appkeys import SERVICE
from btcchannel.payee.closer import operator_close
from btcchannel.payee.config import ServerConfig
from btcchannel.store import PayeeStore, open_private_file
from btcchannel.store._db import connect
from btcchannel.store.ops import online_backup

__all__ = ["BackupStats", "SyncBackup", "install_backup", "restore_closing"]

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
    mirrored: int = 0  # payments written to the backup before their acknowledgement
    catch_ups: int = 0  # whole copies a payment needed (its channel not in the backup yet)


class SyncBackup:
    """The backup database, written with every payment before it is acknowledged (see the module's
    docstring). Its methods run in worker threads (the writer's, the copier's), one at a time."""

    def __init__(self, db_path: Path, backup_path: Path, stats: BackupStats | None = None) -> None:
        self.db_path = db_path
        self.backup_path = backup_path
        self.stats = stats if stats is not None else BackupStats()
        self.lock = threading.Lock()
        #: a write to the backup failed since its last whole copy: payee.db may hold payments it lacks
        self.behind = False
        backup_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._conn = connect(backup_path)
        try:
            self.copy()
        except BaseException:
            self._conn.close()
            raise

    def copy(self) -> float:
        """A whole consistent copy of ``payee.db`` into the backup (one transaction); its seconds."""
        with self.lock:
            return self._copy_locked()

    def _copy_locked(self) -> float:
        start = time.perf_counter()
        source = sqlite3.connect(str(self.db_path))
        try:
            source.backup(self._conn)
        finally:
            source.close()
        self.behind = False
        return time.perf_counter() - start

    def catch_up(self) -> None:
        """Before an answer acknowledges a payment ``payee.db`` already holds without writing it again
        (an exact retry, whose first write to the backup may have failed): a whole copy if a write to
        the backup failed since the last one; raises if that copy fails (nothing is acknowledged)."""
        with self.lock:
            if self.behind:
                self._copy_locked()
                self.stats.catch_ups += 1

    def mirror(self, statements: Sequence[tuple[str, Sequence[Any], int]]) -> None:
        """Run the payments just committed to ``payee.db`` (``(sql, args, rows)``, ``rows`` being how
        many rows each changed there) on the backup in one durable transaction; a statement that
        changes fewer rows there (the backup has not got its channel's row or state yet) is
        followed by a whole copy. Returns once the backup holds every one of them."""
        with self.lock:
            try:
                self._mirror_locked(statements)
            except BaseException:
                self.behind = True  # payee.db holds them: the next exact retry copies first
                raise
            self.stats.mirrored += len(statements)

    def _mirror_locked(self, statements: Sequence[tuple[str, Sequence[Any], int]]) -> None:
        stale = False
        db = self._conn
        db.execute("BEGIN IMMEDIATE")
        try:
            for sql, args, rows in statements:
                if len(db.execute(sql, args).fetchall()) != rows:
                    stale = True
            db.execute("COMMIT")  # synchronous=FULL: durable when this returns
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        if stale:
            self._copy_locked()
            self.stats.catch_ups += 1

    def close(self) -> None:
        """Close the backup database (after a last :meth:`copy`, if wanted)."""
        with self.lock:
            self._conn.close()


#: with the synchronous backup, changes other than payments are copied at most this often
SYNC_COPY_EVERY_S = 2.0


def _data_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA data_version").fetchone()[0])


async def _run(
    db_path: Path, backup_path: Path, poll_s: float, interval_s: float, stats: BackupStats, sync: SyncBackup | None
) -> None:
    watch = sqlite3.connect(str(db_path), check_same_thread=False)
    try:
        seen: int | None = None
        # synchronous: payments are in the backup already, a copy only catches up the other changes
        least = SYNC_COPY_EVERY_S if sync is not None else 0.0
        while True:
            version = _data_version(watch)
            since = time.monotonic() - stats.last_at
            if (version != seen and since >= least) or since >= interval_s:
                await _copy(db_path, backup_path, stats, sync)
                seen = version
            await asyncio.sleep(poll_s)
    finally:
        watch.close()


async def _copy(db_path: Path, backup_path: Path, stats: BackupStats, sync: SyncBackup | None) -> None:
    try:
        if sync is not None:
            took = await asyncio.to_thread(sync.copy)
        else:
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


def install_backup(
    app: web.Application,
    db_path: Path,
    backup_path: Path,
    *,
    poll_s: float = 0.5,
    interval_s: float = 60.0,
    synchronous: bool = True,
) -> BackupStats:
    """Keep ``backup_path`` a copy of ``db_path`` while ``app`` runs (see the module's docstring):
    ``synchronous``: every payment in the backup before it is acknowledged (the payee store of the
    app's service writes it there), else copies only."""
    if backup_path.resolve() == db_path.resolve():
        raise BadRequest("the backup must be another file than the database")
    stats = BackupStats()

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        sync: SyncBackup | None = None
        store = app[SERVICE].store
        if synchronous:
            sync = await asyncio.to_thread(SyncBackup, db_path, backup_path, stats)
            store.payment_mirror = sync.mirror
            store.writer.after_commit = sync.mirror
            store.payment_barrier = sync.catch_up
        task = asyncio.ensure_future(_run(db_path, backup_path, poll_s, interval_s, stats, sync))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await _copy(db_path, backup_path, stats, sync)  # the last state, at shutdown
            if sync is not None:
                store.payment_mirror = None
                store.writer.after_commit = None
                store.payment_barrier = None
                sync.close()

    app.cleanup_ctx.append(lifecycle)
    return stats


async def restore_closing(
    config: ServerConfig, node: Node, backup_path: Path, *, force: bool = False
) -> list[dict[str, Any]]:
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
    online_backup(backup_path, db)  # through SQLite: what the backup's WAL holds is copied too
    results = []
    for cid in live:
        results.append(await operator_close(config, node, cid))
    return results
