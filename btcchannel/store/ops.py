"""What an operator reads from a store and how it is copied: totals by state, online backups.

Entry points::

    state_totals(store) -> dict[str, StateTotal]     # channels, paid and deposited sats per state
    online_backup(source, path) -> float             # a consistent copy of a live database (seconds)
    write_payer_backup(data, path)                   # never over a file that is not a payer backup

:func:`online_backup` uses SQLite's online backup API: the copy is a consistent snapshot
taken while the service keeps writing, written to ``path.tmp`` and renamed over ``path``
(so ``path`` is always a whole database), 0600.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from btcchannel.errors import BadRequest
from btcchannel.store._db import TABLE, Database, open_private_file

__all__ = ["BACKUP_KIND", "StateTotal", "online_backup", "state_totals", "write_payer_backup"]


@dataclass(frozen=True)
class StateTotal:
    """The channels in one state: how many, the sum of their best payments and of their deposits."""

    channels: int
    amount_sat: int
    deposit_sat: int


def state_totals(store: Database) -> dict[str, StateTotal]:
    """Channels, paid and deposited satoshis for each state present in ``store`` (one aggregate query).

    ``amount_sat`` is the payee's best payment (payee store) or the payer's acknowledged total (payer store).
    """
    column = "acked_sat" if "acked_sat" in _columns(store) else "amount_sat"
    rows = store._db.execute(  # noqa: SLF001 - same package
        f"SELECT state, COUNT(*), COALESCE(SUM({column}), 0), COALESCE(SUM(deposit_sat), 0) FROM {TABLE} GROUP BY state"
    ).fetchall()
    return {str(r[0]): StateTotal(int(r[1]), int(r[2]), int(r[3])) for r in rows}


def _columns(store: Database) -> set[str]:
    return {str(r[1]) for r in store._db.execute(f"PRAGMA table_info({TABLE})").fetchall()}  # noqa: SLF001


def online_backup(source: Database | str | os.PathLike[str], path: str | os.PathLike[str]) -> float:
    """Copy ``source`` (a store, or a database file) to ``path``, atomically replaced and 0600;
    returns the seconds it took. Readers and writers of ``source`` go on meanwhile (WAL)."""
    start = time.perf_counter()
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.unlink(missing_ok=True)
    open_private_file(tmp)
    conn = source._db if isinstance(source, Database) else sqlite3.connect(str(source))  # noqa: SLF001
    target = sqlite3.connect(str(tmp))
    try:
        conn.backup(target)
    finally:
        target.close()
        if not isinstance(source, Database):
            conn.close()
    os.replace(tmp, dest)
    return time.perf_counter() - start


BACKUP_KIND = "btcchannel-payer-backup"


def write_payer_backup(data: dict[str, Any], path: str | os.PathLike[str], *, replace_any: bool = False) -> None:
    """Write a payer backup document to ``path`` (0600, atomically replaced).

    An existing file is replaced only if it is itself a payer backup (or ``replace_any``):
    a user's other file is never overwritten silently (``BadRequest``).
    """
    dest = Path(path)
    if dest.exists() and not replace_any:
        try:
            kind = json.loads(dest.read_text()).get("kind")
        except (OSError, ValueError, AttributeError):
            kind = None
        if kind != BACKUP_KIND:
            raise BadRequest(f"{dest} exists and is not a btcchannel payer backup: not overwriting it")
    dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.unlink(missing_ok=True)
    open_private_file(tmp)
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, dest)
