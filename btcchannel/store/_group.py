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

A statement that fails (a constraint) fails alone: the batch is rolled back
and each of its statements is then committed in a transaction of its own, so
the others still succeed and only the bad one gets its error. Nothing is
acknowledged that is not committed.

The connection is anything with sqlite3's small interface (``execute`` returning
a cursor with ``description`` and ``fetchall``, ``in_transaction``, ``close``):
an SQLite connection, or the PostgreSQL adapter of :mod:`btcchannel.store.postgres`.

A second durable copy can share each commit: :attr:`GroupWriter.after_commit`, if set, is called
in the writer thread with every statement the batch committed (``(sql, args, rows)``) after the
commit and before any of them is acknowledged; if it raises, none of them is acknowledged (each
gets its error). The payee's synchronous backup (:mod:`btcchannel.payee.backup`) is one.

Entry points::

    GroupWriter(conn)                                  # owns this connection, starts the thread
    GroupWriter.after_commit = fn                      # fn(list[(sql, args, rows)]) before acknowledging
    await GroupWriter.submit(sql, args) -> list[dict]  # rows (RETURNING) once committed
    GroupWriter.close()                                # drains the queue, stops the thread
    GroupWriter.batches, .statements                   # counters (commits, statements committed)
"""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any, Callable, Protocol, Sequence

__all__ = ["AfterCommit", "Connection", "Cursor", "GroupWriter"]


class Cursor(Protocol):
    """What the stores read from a statement's result (sqlite3 and psycopg cursors)."""

    @property
    def description(self) -> Any: ...
    @property
    def rowcount(self) -> int: ...
    def fetchall(self) -> list[Any]: ...
    def fetchone(self) -> Any: ...


class Connection(Protocol):
    """The part of ``sqlite3.Connection`` the stores use (autocommit mode)."""

    @property
    def in_transaction(self) -> bool: ...
    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Any: ...
    def close(self) -> None: ...


#: one queued statement: sql, args, the loop and the future to resolve there
_Item = tuple[str, Sequence[Any], asyncio.AbstractEventLoop, "asyncio.Future[list[dict[str, Any]]]"]

#: called with the committed statements (sql, args, number of rows returned) before they are acknowledged
AfterCommit = Callable[[list[tuple[str, Sequence[Any], int]]], None]

#: at most this many statements in one transaction (keeps one commit's latency bounded)
MAX_BATCH = 1000


def _resolve(
    fut: asyncio.Future[list[dict[str, Any]]], rows: list[dict[str, Any]] | None, exc: BaseException | None
) -> None:
    if fut.done():  # the caller gave up (cancelled); the write is committed regardless
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        assert rows is not None
        fut.set_result(rows)


#: one statement's answer: its future, and its rows or its error
_Answer = tuple["asyncio.Future[list[dict[str, Any]]]", "list[dict[str, Any]] | None", "BaseException | None"]


def _resolve_all(answers: list[_Answer]) -> None:
    for fut, rows, exc in answers:
        _resolve(fut, rows, exc)


class GroupWriter:
    """A writer thread with its own SQLite connection that batches statements into one commit each."""

    def __init__(self, conn: Connection) -> None:
        """Take ``conn`` (autocommit; SQLite's with ``check_same_thread=False``) for the thread."""
        self._db = conn
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._closed = False
        self.batches = 0
        self.statements = 0
        self.after_commit: AfterCommit | None = None
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

    def _rows(self, sql: str, args: Sequence[Any]) -> list[dict[str, Any]]:
        cur = self._db.execute(sql, args)
        return [dict(r) for r in cur.fetchall()] if cur.description is not None else []

    def _rollback(self) -> None:
        if self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except Exception:  # noqa: S110 - the caller reports the original error
                pass

    def _commit(self, items: list[_Item]) -> None:
        results: list[tuple[list[dict[str, Any]] | None, BaseException | None]] = []
        try:
            self._db.execute("BEGIN IMMEDIATE")
            for sql, args, _loop, _fut in items:
                results.append((self._rows(sql, args), None))
            self._db.execute("COMMIT")  # durable when this returns (synchronous=FULL / synchronous_commit)
        except Exception:
            self._rollback()
            results = [self._alone(sql, args) for sql, args, _loop, _fut in items]
        except BaseException as exc:
            self._rollback()
            results = [(None, exc)] * len(items)
        self.batches += 1
        self.statements += sum(1 for rows, _ in results if rows is not None)
        results = self._after_commit(items, results)
        by_loop: dict[asyncio.AbstractEventLoop, list[_Answer]] = {}
        for (_sql, _args, loop, fut), (rows, err) in zip(items, results):
            by_loop.setdefault(loop, []).append((fut, rows, err))
        for loop, answers in by_loop.items():  # one wake-up of each loop per commit, not one per statement
            try:
                loop.call_soon_threadsafe(_resolve_all, answers)
            except RuntimeError:  # that loop is closed: nobody waits for these answers any more
                pass

    def _after_commit(
        self,
        items: list[_Item],
        results: list[tuple[list[dict[str, Any]] | None, BaseException | None]],
    ) -> list[tuple[list[dict[str, Any]] | None, BaseException | None]]:
        """Hand the committed statements to :attr:`after_commit`; if it fails, none is acknowledged."""
        hook = self.after_commit
        done = [(sql, args, len(rows)) for (sql, args, _l, _f), (rows, _e) in zip(items, results) if rows]
        if hook is None or not done:
            return results
        try:
            hook(done)
        except Exception as exc:
            return [(None, exc) if rows is not None else (rows, err) for rows, err in results]
        return results

    def _alone(self, sql: str, args: Sequence[Any]) -> tuple[list[dict[str, Any]] | None, BaseException | None]:
        """After a failed batch: one statement in its own transaction, so a bad one fails alone."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            rows = self._rows(sql, args)
            self._db.execute("COMMIT")
            return rows, None
        except Exception as exc:
            self._rollback()
            return None, exc
