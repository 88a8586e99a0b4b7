"""The datadir's seed and its key-index counter, kept in the store (a private 0600 file).

A store that mixes in :class:`SeedKeys` holds one seed (created on first use) and
the next unused BIP32 index. :meth:`SeedKeys.reserve_key` commits the counter
increment *before* it returns the derived key, so a crash between reserving an
index and storing the channel only skips that index; it is never used twice.
Migration :data:`SEED_MIGRATION` adds the table and the channels' ``key_index`` (``PG_SEED_MIGRATION``
in PostgreSQL's dialect); the queries are written to run unchanged on both.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time

from btcchannel.core.keys import public_key
from btcchannel.core.seed import SEED_BYTES, check_seed, derive_channel_key
from btcchannel.errors import BadRequest
from btcchannel.store._db import Migration

__all__ = ["PG_SEED_MIGRATION", "SEED_MIGRATION", "SeedKeys"]

SEED_MIGRATION: Migration = (
    "CREATE TABLE IF NOT EXISTS seed (id INTEGER PRIMARY KEY CHECK (id = 1), seed BLOB NOT NULL,"
    " next_index INTEGER NOT NULL DEFAULT 0)",
    "ALTER TABLE channels ADD COLUMN key_index INTEGER",
    "CREATE UNIQUE INDEX IF NOT EXISTS channels_key_index ON channels (key_index) WHERE key_index IS NOT NULL",
)
PG_SEED_MIGRATION: Migration = (
    SEED_MIGRATION[0].replace("BLOB", "BYTEA").replace("next_index INTEGER", "next_index BIGINT"),
    "ALTER TABLE channels ADD COLUMN key_index BIGINT",
    SEED_MIGRATION[2],
)


#: a new seed starts past every index stored channels hold (their keys came from a seed now lost)
_INSERT_SEED = (
    "INSERT INTO seed (id, seed, next_index)"
    " VALUES (1, ?, (SELECT COALESCE(max(key_index) + 1, 0) FROM channels)) ON CONFLICT DO NOTHING"
)


class SeedKeys:
    """The seed and the reserved indexes; mixed into a store with a ``channels.key_index`` column."""

    _db: sqlite3.Connection
    #: the field of a channel's ``params`` that holds this role's public key
    PUBKEY_FIELD: str

    def has_seed(self) -> bool:
        """Whether a seed was created or restored in this store."""
        return self._db.execute("SELECT 1 FROM seed WHERE id=1").fetchone() is not None

    def seed(self) -> bytes:
        """The store's seed, created (random, 32 bytes) on first use."""
        self._db.execute(_INSERT_SEED, (os.urandom(SEED_BYTES),))
        return bytes(self._db.execute("SELECT seed FROM seed WHERE id=1").fetchone()[0])

    def restore_seed(self, seed: bytes) -> bool:
        """Install ``seed`` (a restore); True if it was installed, False if the store already has it.

        A store that has another seed is never changed (``BadRequest``): its channels' keys derive from it.
        """
        check_seed(seed)
        if not self.has_seed():
            self._check_derives(seed, missing_only=False)  # a wrong seed is refused before it is installed
        cur = self._db.execute(_INSERT_SEED, (seed,))
        if cur.rowcount == 1:
            return True
        if self.seed() != seed:
            raise BadRequest("this datadir already has another seed; restore into a fresh datadir")
        return False

    def next_key_index(self) -> int:
        """The next index :meth:`reserve_key` hands out."""
        self.seed()
        return int(self._db.execute("SELECT next_index FROM seed WHERE id=1").fetchone()[0])

    def reserve_key(self) -> tuple[int, bytes]:
        """Durably reserve the next index (committed before this returns) and derive its key."""
        seed = self.seed()
        index = int(
            self._db.execute("UPDATE seed SET next_index=next_index+1 WHERE id=1 RETURNING next_index-1").fetchone()[0]
        )
        return index, derive_channel_key(seed, index)

    def raise_next_index(self, index: int) -> None:
        """Make sure ``index`` is never handed out again (after a restore stored channels up to it)."""
        self.seed()
        self._db.execute("UPDATE seed SET next_index=MAX(next_index, ?) WHERE id=1", (index + 1,))

    def _keyed_rows(self, missing_only: bool) -> list[sqlite3.Row]:
        return self._db.execute(
            "SELECT channel_id, params, key_index, privkey FROM channels WHERE key_index IS NOT NULL"
            + (" AND length(privkey)=0" if missing_only else "")
            + " ORDER BY key_index"
        ).fetchall()

    def _check_derives(self, seed: bytes, missing_only: bool) -> dict[str, bytes]:
        """The keys ``seed`` derives for the seeded channels, each checked against its stored public key."""
        out = {}
        for row in self._keyed_rows(missing_only):
            privkey = derive_channel_key(seed, int(row["key_index"]))
            if public_key(privkey).hex() != json.loads(row["params"]).get(self.PUBKEY_FIELD):
                raise BadRequest(f"the seed does not derive channel {row['channel_id']}'s key")
            out[str(row["channel_id"])] = privkey
        return out

    def restore_keys(self) -> int:
        """Re-derive from the seed every key that is missing (an empty ``privkey``); returns how many.

        Each derived key is checked against the channel's stored public key first (``BadRequest``,
        nothing written, if one differs). Every stored index is marked used.
        """
        rows = self._keyed_rows(missing_only=False)
        if not rows:
            return 0
        if self.has_seed():
            self.raise_next_index(max(int(r["key_index"]) for r in rows))
        if not any(len(r["privkey"]) == 0 for r in rows):
            return 0
        if not self.has_seed():
            raise BadRequest("channels have lost their keys: restore the seed first (`seed restore`)")
        derived = self._check_derives(self.seed(), missing_only=True)
        for cid, privkey in derived.items():
            self._db.execute(
                "UPDATE channels SET privkey=?, updated_at=? WHERE channel_id=? AND length(privkey)=0",
                (privkey, time.time(), cid),
            )
        return len(derived)
