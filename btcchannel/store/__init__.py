"""Durable state of both parties (SQLite, WAL, ``synchronous=FULL``), schema-versioned.

Modules:

``_db``
    Private files (0600 in a 0700 directory), connection pragmas, and the
    :class:`~btcchannel.store._db.Database` base that applies ordered
    migrations tracked in ``PRAGMA user_version``.
``payee``
    :class:`PayeeStore` (``payee.db``): one row per channel with the best
    payment only; every state change is a record of the core's machine
    (:class:`~btcchannel.core.state.Transition`), persisted with a compare-and-set
    on its old state (:meth:`PayeeStore.apply`, :meth:`PayeeStore.fire`).
``postgres``
    :class:`~btcchannel.store.postgres.PgPayeeStore`: the payee's store in
    PostgreSQL for several payee instances (the same queries; a leader lock).
``_group``
    The group-commit writer: payments waiting together share one commit.
``payer``
    :class:`PayerStore` (``payer.db``): the payer's key and the latest signed
    payment, written before it is sent; JSON backup export/import.

Entry points::

    PayeeStore(path: str | os.PathLike[str])
    open_payee_store(target) -> PayeeStore    # a postgresql:// URL (PgPayeeStore) or an SQLite path
    PayerStore(path: str | os.PathLike[str])
    open_private_file(path) -> None           # create a 0600 file if missing

Amounts are integer satoshis; binary values (keys, signatures) are bytes.
"""

from __future__ import annotations

import os

from btcchannel.core.state import TERMINAL_STATES, ChannelState
from btcchannel.store._db import StoreSchemaError, open_private_file
from btcchannel.store.payee import PayeeRecord, PayeeStore
from btcchannel.store.payer import PayerRecord, PayerStore

__all__ = [
    "PayeeRecord",
    "PayeeStore",
    "PayerRecord",
    "PayerStore",
    "StoreSchemaError",
    "open_private_file",
    "open_payee_store",
    "is_postgres_url",
    "FINAL_STATES",
]

#: channel states after which nothing more happens to a channel (values, in ChannelState order)
FINAL_STATES = tuple(s.value for s in ChannelState if s in TERMINAL_STATES)


def is_postgres_url(target: str | os.PathLike[str]) -> bool:
    """Whether ``target`` names a PostgreSQL database (``postgresql://`` or ``postgres://``)."""
    return isinstance(target, str) and target.startswith(("postgresql://", "postgres://"))


def open_payee_store(target: str | os.PathLike[str]) -> PayeeStore:
    """The payee's store at ``target``: a ``postgresql://`` URL, or an SQLite file path."""
    if is_postgres_url(target):
        from btcchannel.store.postgres import PgPayeeStore  # psycopg only when asked for

        return PgPayeeStore(str(target))
    return PayeeStore(target)
