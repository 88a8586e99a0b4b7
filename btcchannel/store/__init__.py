"""Durable state of both parties (SQLite, WAL, ``synchronous=FULL``), schema-versioned.

Modules:

``_db``
    Private files (0600 in a 0700 directory), connection pragmas, and the
    :class:`~btcchannel.store._db.Database` base that applies ordered
    migrations tracked in ``PRAGMA user_version``.
``payee``
    :class:`PayeeStore` (``payee.db``): one row per channel with the best
    payment only; every state change is a compare-and-set whose states come
    from the core's transition table (:meth:`PayeeStore.transition`).
``payer``
    :class:`PayerStore` (``payer.db``): the payer's key and the latest signed
    payment, written before it is sent; JSON backup export/import.

Entry points::

    PayeeStore(path: str | os.PathLike[str])
    PayerStore(path: str | os.PathLike[str])
    open_private_file(path) -> None           # create a 0600 file if missing

Amounts are integer satoshis; binary values (keys, signatures) are bytes.
"""

from __future__ import annotations

from btcchannel.core.state import ChannelState, TERMINAL_STATES
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
    "FINAL_STATES",
]

#: channel states after which nothing more happens to a channel (values, in ChannelState order)
FINAL_STATES = tuple(s.value for s in ChannelState if s in TERMINAL_STATES)
