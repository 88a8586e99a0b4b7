"""Which payee instance acts on the chain: the leadership the watcher and the closer ask before acting.

Several payee instances may share one PostgreSQL store; exactly one of them (the holder of the
store's leader lock, :meth:`~btcchannel.store.postgres.PgPayeeStore.try_lead`) runs the watcher
and broadcasts closes. :class:`Leadership` is that instance's view of it:

- :meth:`Leadership.acquire` waits until this instance takes the lock (at once on SQLite);
- :meth:`Leadership.holds` re-checks it (the lock's own database session still alive and holding
  the lock, its leader epoch still the current one): the watcher asks before every step, the
  closer before every broadcast; the first failure is logged and the instance stops acting until
  it takes the lock again, with a new epoch;
- :meth:`Leadership.require` raises :class:`NotLeader` instead of answering False.

The lock check is a guard against acting late; the store's close compare-and-sets carry the epoch
too, so a stale leader cannot record a close intent (and nothing is broadcast without one) even
in the moment between a check and its action. On SQLite every process leads (one file: the
database's own locks arbitrate), so both answers are always yes.
"""

from __future__ import annotations

import asyncio
import logging

from btcchannel.errors import ChannelError
from btcchannel.store import PayeeStore

__all__ = ["Leadership", "NotLeader", "LOST_LINE", "LEAD_LINE"]

log = logging.getLogger("btcchannel.payee.leadership")

#: logged when this instance takes the leader lock
LEAD_LINE = "this instance runs the watcher and the closer"
#: logged when this instance finds it no longer holds the leader lock
LOST_LINE = "this instance lost the leader lock: it stops running the watcher and the closer"


class NotLeader(ChannelError):
    """This instance does not (or no longer) hold the store's leader lock: it must not act on the
    chain. Local code ``not_leader``, HTTP 503."""

    code = "not_leader"
    http_status = 503


class Leadership:
    """This instance's leadership over one store (see the module docstring)."""

    def __init__(self, store: PayeeStore) -> None:
        self.store = store
        self._held = store.still_leads()  # on SQLite, from the start

    @property
    def held(self) -> bool:
        """The last answer of :meth:`holds` or :meth:`acquire` (no database round trip)."""
        return self._held

    def holds(self) -> bool:
        """Whether this instance leads now (a round trip to the lock's session on PostgreSQL)."""
        held = self.store.still_leads()
        if self._held and not held:
            log.warning(LOST_LINE)
        self._held = held
        return held

    def require(self) -> None:
        """:class:`NotLeader` unless :meth:`holds`."""
        if not self.holds():
            raise NotLeader("this instance does not hold the leader lock: it does not act on the chain")

    async def acquire(self, retry_s: float) -> None:
        """Return once this instance holds the leader lock, trying every ``retry_s`` seconds."""
        while not self.store.try_lead():
            await asyncio.sleep(retry_s)
        self._held = True
        epoch = getattr(self.store, "epoch", None)  # (PostgreSQL: the epoch taken with the lock)
        log.info("%s%s", LEAD_LINE, "" if epoch is None else f" (leader epoch {epoch})")


class AlwaysLeads(Leadership):
    """The leadership of a process that acts on its own store without a service (an operator's
    close or bump on SQLite, or a closer built directly): it always leads."""

    def __init__(self, store: PayeeStore) -> None:
        super().__init__(store)
        self._held = True

    def holds(self) -> bool:
        return True
