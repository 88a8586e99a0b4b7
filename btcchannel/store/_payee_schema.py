"""The payee store's schema versions (``payee.db``), oldest first: see :mod:`btcchannel.store.payee`."""

from __future__ import annotations

from btcchannel.store._db import Migration
from btcchannel.store._seed import SEED_MIGRATION

__all__ = ["MIGRATIONS"]

_V1: Migration = (
    """CREATE TABLE IF NOT EXISTS channels (
    channel_id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    params TEXT NOT NULL,
    privkey BLOB NOT NULL,
    deposit_sat INTEGER NOT NULL,
    expiry_height INTEGER NOT NULL,
    amount_sat INTEGER NOT NULL DEFAULT 0,
    signature BLOB,
    created_at REAL NOT NULL,
    lapse_at REAL,
    funding_txid TEXT,
    funding_vout INTEGER,
    confirmations INTEGER NOT NULL DEFAULT 0,
    close_txid TEXT,
    close_txids TEXT NOT NULL DEFAULT '[]',
    close_fee_rate REAL,
    close_height INTEGER,
    close_claimed_at REAL,
    end_reason TEXT,
    exception_txid TEXT,
    max_units INTEGER,
    max_total_sat INTEGER,
    units INTEGER NOT NULL DEFAULT 0,
    owed_sat INTEGER NOT NULL DEFAULT 0,
    owed_since REAL,
    created_height INTEGER NOT NULL DEFAULT 0,
    funding_inputs TEXT NOT NULL DEFAULT '[]',
    updated_at REAL NOT NULL
)""",
    "CREATE INDEX IF NOT EXISTS channels_state ON channels(state)",
    """CREATE UNIQUE INDEX IF NOT EXISTS channels_funding ON channels(funding_txid, funding_vout)
    WHERE funding_txid IS NOT NULL""",
)

_V2_CLOSE_UNECONOMIC: Migration = (
    "ALTER TABLE channels ADD COLUMN close_uneconomic INTEGER NOT NULL DEFAULT 0 CHECK (close_uneconomic IN (0, 1))",
    "UPDATE channels SET close_uneconomic=1,"
    " end_reason=NULLIF(substr(end_reason, 1, length(end_reason) - length('+close_uneconomic')), '')"
    " WHERE substr(end_reason, -length('+close_uneconomic')) = '+close_uneconomic'",
)

_V3_TERMS: Migration = (
    "ALTER TABLE channels ADD COLUMN terms TEXT",
    "ALTER TABLE channels ADD COLUMN payments INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE channels ADD COLUMN paid_at REAL",
    "ALTER TABLE channels ADD COLUMN request_counter INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE channels ADD COLUMN unit_credit INTEGER NOT NULL DEFAULT 0",
)

_V4_CLOSE_INTENT: Migration = (
    "ALTER TABLE channels ADD COLUMN payout_script TEXT",
    "ALTER TABLE channels ADD COLUMN close_tx TEXT",
    "ALTER TABLE channels ADD COLUMN close_tx_txid TEXT",
)

_V5_CHAIN_CURSOR: Migration = (
    "CREATE TABLE IF NOT EXISTS chain_cursor (id INTEGER PRIMARY KEY CHECK (id = 1),"
    " height INTEGER NOT NULL, hash TEXT NOT NULL)",
)

_V6_PROPOSAL_CLIENT: Migration = (
    "ALTER TABLE channels ADD COLUMN client TEXT",
    "CREATE INDEX IF NOT EXISTS channels_unfunded ON channels(updated_at) WHERE funding_txid IS NULL",
)

_V8_METERED_V2: Migration = (
    "ALTER TABLE channels ADD COLUMN last_request BLOB",
    "ALTER TABLE channels ADD COLUMN payer_pubkey TEXT",
    "UPDATE channels SET payer_pubkey=json_extract(params, '$.payer_pubkey')",
    "CREATE INDEX IF NOT EXISTS channels_owing ON channels(state) WHERE owed_sat > amount_sat",
)


#: every migration, in order (the schema version is the number applied)
MIGRATIONS: tuple[Migration, ...] = (
    _V1,
    _V2_CLOSE_UNECONOMIC,
    _V3_TERMS,
    _V4_CLOSE_INTENT,
    _V5_CHAIN_CURSOR,
    _V6_PROPOSAL_CLIENT,
    SEED_MIGRATION,  # 7: the seed, its next key index, each channel's key_index
    _V8_METERED_V2,  # 8: the last charged request's key, the payer key as a column (credit caps)
)
