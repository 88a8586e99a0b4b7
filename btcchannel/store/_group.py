"""Group commit: one writer thread that commits every waiting write in one transaction.

A payment is acknowledged only once its row is durable, and with SQLite's
``synchronous=FULL`` that costs one fsync per commit. Committed one by one on
the event loop, each fsync stalls every other request and concurrent payments
cannot share a flush. :class:`GroupWriter` owns a second connection to the
same file and a thread: :meth:`GroupWriter.submit` queues one statement and
returns an asyncio future; the thread takes **everything queued at that
moment**, runs it inside one ``BEGIN IMMEDIATE`` ... ``COMMIT`` (one fsync)
and only then resolves each future with the statement's rows. The event loop
never waits on the disk, and under load one flush acknowledges many payments.

A statement that fails (a constraint) fails alone: SQLite rolls back that
statement only and the rest of the batch commits. If the commit itself fails,
every future of the batch gets the error: nothing is acknowledged that is not
on disk.

Entry points::

    GroupWriter(conn)                                  # owns this connection, starts the thread
    await GroupWriter.submit(sql, args) -> list[dict]  # rows (RETURNING) once committed
    GroupWriter.close()                                # drains the queue, stops the thread
    GroupWriter.batches, .statements                   # counters (commits, statements committed)
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
from typing import Any, Sequence

__all__ = ["GroupWriter"]

#: one queued statement: sql, args, the loop and the future to resolve there
_Item = tuple[str, Sequence[Any], asyncio.AbstractEventLoop, "asyncio.Future[list[dict[str, Any]]]"]

#: at most this many statements in one transaction (keeps one commit's latency bounded)
MAX_BATCH = 1000


def _resolve(fut: asyncio.Future[list[dict[str, Any]]], rows: list[dict[str, Any]] | None,
             exc: BaseException | None) -> None:
    if fut.done():  # the caller gave up (cancelled); the write is committed regardless
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        assert rows is not None
        fut.set_result(rows)


class GroupWriter:
    """A writer thread with its own SQLite connection that batches statements into one commit each."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        """Take ``conn`` (autocommit, ``check_same_thread=False``: see ``_db.connect``) for the thread."""
        self._db = conn
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._closed = False
        self.batches = 0
        self.statements = 0
        self._thread = threading.Thread(target=self._run, name="btcchannel-group-commit", daemon=True)
        self._thread.start()

    def submit(self, sql: str, args: Sequence[Any]) -> asyncio.Future[list[dict[str, Any]]]:
        """Queue ``sql``; the future resolves with its rows (as dicts) once they are committed."""
        if self._closed:
            raise RuntimeError("the group writer is closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[dict[str, Any]]] = loop.create_future()
        self._queue.put((sql, args, loop, fut))
        return fut

    def close(self) -> None:
        """Commit what is queued, stop the thread, close the connection (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join()
        self._db.close()

    # -- the writer thread ---------------------------------------------------------
    def _take(self) -> tuple[list[_Item], bool]:
        """Block for one item, then take all others already waiting; (items, stop)."""
        first = self._queue.get()
        if first is None:
            return [], True
        items = [first]
        stop = False
        while len(items) < MAX_BATCH:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is None:
                stop = True
                break
            items.append(nxt)
        return items, stop

    def _run(self) -> None:
        stop = False
        while not stop:
            items, stop = self._take()
            if items:
                self._commit(items)

    def _commit(self, items: list[_Item]) -> None:
        results: list[tuple[list[dict[str, Any]] | None, BaseException | None]] = []
        try:
            self._db.execute("BEGIN IMMEDIATE")
            for sql, args, _loop, _fut in items:
                try:
                    rows = [dict(r) for r in self._db.execute(sql, args).fetchall()]
                    results.append((rows, None))
                except Exception as exc:  # this statement alone is rolled back
                    results.append((None, exc))
            self._db.execute("COMMIT")  # synchronous=FULL: durable when this returns
        except BaseException as exc:
            if self._db.in_transaction:
                try:
                    self._db.execute("ROLLBACK")
                except Exception:  # noqa: S110 - the batch fails with the original error below
                    pass
            results = [(None, exc)] * len(items)
        self.batches += 1
        self.statements += sum(1 for rows, _ in results if rows is not None)
        for (_sql, _args, loop, fut), (rows, err) in zip(items, results):
            try:
                loop.call_soon_threadsafe(_resolve, fut, rows, err)
            except RuntimeError:  # that loop is closed: nobody waits for this answer any more
                pass
