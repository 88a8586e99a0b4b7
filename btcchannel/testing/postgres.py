"""A real PostgreSQL server for tests and benchmarks, started the way bitcoind is: never a mock.

:func:`start_postgres` uses ``initdb`` and ``pg_ctl`` found on ``PATH`` when it can run them
(PostgreSQL refuses to run as root), else the ``pgserver`` package's bundled PostgreSQL 16
(which, as root, runs it as a user of its own). The server listens on a Unix socket only,
with its durability settings left on (``fsync``, ``synchronous_commit``).

::

    server = start_postgres(folder)        # -> PostgresServer
    url = server.create_database()         # a fresh database: postgresql://...
    terminate_leader(url)                  # end the session holding the payee's leader lock
    server.stop()
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
from psycopg import sql

from btcchannel.store.postgres import LEADER_KEY

__all__ = ["PostgresServer", "start_postgres", "terminate_leader"]

_numbers = itertools.count(1)


class PostgresServer:
    """A running PostgreSQL server: ``url`` (its ``postgres`` database) and fresh databases on demand."""

    def __init__(self, url: str, stop: Any) -> None:
        self.url = url
        self._stop = stop

    def database_url(self, name: str) -> str:
        """The URL of database ``name`` on this server."""
        head, _, query = self.url.partition("?")
        return f"{head.rsplit('/', 1)[0]}/{name}" + (f"?{query}" if query else "")

    def create_database(self, name: str | None = None) -> str:
        """Create an empty database (a fresh name unless given); its URL."""
        name = name or f"btcchannel_{os.getpid()}_{next(_numbers)}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.database_url(name)

    def stop(self) -> None:
        """Stop the server (and remove its files)."""
        self._stop()


def _on_path() -> tuple[str, str] | None:
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl and os.geteuid() != 0:
        return initdb, pg_ctl
    return None


def start_postgres(folder: Path) -> PostgresServer:
    """Start a PostgreSQL server (see the module docstring); its data under ``folder`` when run from
    ``PATH``, else in a fresh temporary folder that :meth:`PostgresServer.stop` removes."""
    folder.mkdir(parents=True, exist_ok=True)
    found = _on_path()
    if found is None:
        from pgserver.postgres_server import get_server  # the test extra's bundled PostgreSQL

        # as root, pgserver runs PostgreSQL as a user of its own, which must reach the data folder:
        # a fresh folder in the system's temporary directory, not one inside a private tree
        top = Path(tempfile.mkdtemp(prefix="btcpg-"))
        server = get_server(top / "pgdata", cleanup_mode="delete")

        def cleanup() -> None:
            server.cleanup()
            shutil.rmtree(top, ignore_errors=True)

        return PostgresServer(server.get_uri(), cleanup)
    initdb, pg_ctl = found
    data = folder / "pgdata"
    sock = Path(tempfile.mkdtemp(prefix="btcpg-"))  # a short path: Unix socket names are limited
    subprocess.run(
        [initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "utf8"], check=True, stdout=subprocess.DEVNULL
    )
    subprocess.run(
        [pg_ctl, "-D", str(data), "-w", "-l", str(folder / "postgres.log"), "-o", f"-h '' -k {sock}", "start"],
        check=True,
        stdout=subprocess.DEVNULL,
    )

    def stop() -> None:
        subprocess.run([pg_ctl, "-D", str(data), "-w", "-m", "fast", "stop"], check=False, stdout=subprocess.DEVNULL)
        shutil.rmtree(sock, ignore_errors=True)
        shutil.rmtree(data, ignore_errors=True)

    return PostgresServer(f"postgresql://postgres@/postgres?host={quote(str(sock))}", stop)


def terminate_leader(url: str) -> int | None:
    """End the database session that holds the payee's leader lock in database ``url`` with
    ``pg_terminate_backend`` (what a network blip, a pooler or an operator does to it); the
    session's pid, or None when no session holds the lock."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " AND classid::bigint = %s AND objid::bigint = %s",
            ((LEADER_KEY >> 32) & 0xFFFF_FFFF, LEADER_KEY & 0xFFFF_FFFF),
        ).fetchone()
        if row is None:
            return None
        conn.execute("SELECT pg_terminate_backend(%s)", (row[0],))
        return int(row[0])
