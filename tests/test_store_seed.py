"""The payer's seed in its store: created once, indexes reserved durably, keys restored and checked."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from btcchannel.core.keys import generate_private_key, public_key
from btcchannel.core.seed import derive_channel_key
from btcchannel.core.state import ChannelState
from btcchannel.errors import BadRequest
from btcchannel.store import PayerRecord, PayerStore


def _record(cid: str, privkey: bytes, key_index: int | None) -> PayerRecord:
    return PayerRecord(
        channel_id=cid,
        server_url="http://payee",
        state=ChannelState.OPEN,
        params={"payer_pubkey": public_key(privkey).hex()},
        privkey=privkey,
        deposit_sat=100_000,
        expiry_height=500,
        key_index=key_index,
    )


def _wipe_keys(db: Path) -> None:
    conn = sqlite3.connect(db)
    conn.execute("UPDATE channels SET privkey=x''")
    conn.commit()
    conn.close()


def test_seed_is_created_once_and_kept_private(tmp_path: Path) -> None:
    db = tmp_path / "payer.db"
    with PayerStore(db) as s:
        assert not s.has_seed()
        seed = s.seed()
        assert len(seed) == 32 and s.seed() == seed and s.next_key_index() == 0
    with PayerStore(db) as s:
        assert s.seed() == seed
    assert db.stat().st_mode & 0o077 == 0


def test_an_index_reserved_before_a_crash_is_never_handed_out_again(tmp_path: Path) -> None:
    db = tmp_path / "payer.db"
    # a process reserves an index and dies (SIGKILL) before it stores any channel with it
    crash = (
        "import os, signal, sys; from btcchannel.store import PayerStore; s = PayerStore(sys.argv[1]);"
        " print(s.reserve_key()[0], flush=True); os.kill(os.getpid(), signal.SIGKILL)"
    )
    out = subprocess.run([sys.executable, "-c", crash, str(db)], capture_output=True, text=True, timeout=60)
    assert out.returncode == -9 and out.stdout.strip() == "0"
    with PayerStore(db) as s:
        assert s.list() == []
        index, key = s.reserve_key()
        assert index == 1 and key == derive_channel_key(s.seed(), 1)
        s.insert(_record("aa" * 16, key, index))
        with pytest.raises(sqlite3.IntegrityError):  # one index, one channel
            s.insert(_record("bb" * 16, key, index))
        assert s.reserve_key()[0] == 2


def test_lost_keys_are_re_derived_and_checked_random_keys_stay(tmp_path: Path) -> None:
    db = tmp_path / "payer.db"
    with PayerStore(db) as s:
        index, key = s.reserve_key()
        s.insert(_record("aa" * 16, key, index))
        random_key = generate_private_key()
        s.insert(_record("cc" * 16, random_key, None))  # a channel from before seeds
    _wipe_keys(db)
    conn = sqlite3.connect(db)
    conn.execute("UPDATE channels SET privkey=? WHERE key_index IS NULL", (random_key,))
    conn.commit()
    conn.close()
    with PayerStore(db) as s:
        assert s.restore_keys() == 1
        assert s.get("aa" * 16).privkey == key and s.get("cc" * 16).privkey == random_key
        assert s.restore_keys() == 0
        # a stored public key the seed does not derive: refused, the row is left as it was
        s._db.execute(
            "UPDATE channels SET privkey=x'', params=? WHERE channel_id=?",
            ('{"payer_pubkey": "%s"}' % public_key(random_key).hex(), "aa" * 16),
        )
        with pytest.raises(BadRequest, match="does not derive"):
            s.restore_keys()
        assert s.get("aa" * 16).privkey == b""


def test_a_backup_without_keys_restores_only_with_its_seed(tmp_path: Path) -> None:
    with PayerStore(tmp_path / "a.db") as a:
        seed = a.seed()
        for cid in ("aa" * 16, "bb" * 16):
            index, key = a.reserve_key()
            a.insert(_record(cid, key, index))
        a.reserve_key()  # reserved, never stored
        backup = a.export_backup(keys=False)
        keys = {r.channel_id: r.privkey for r in a.list()}
    assert all(c["privkey"] is None for c in backup["channels"])
    with PayerStore(tmp_path / "no-seed.db") as s:
        with pytest.raises(BadRequest, match="seed"):
            s.import_backup(backup)
        assert s.list() == []
    with PayerStore(tmp_path / "other-seed.db") as s:
        s.seed()
        with pytest.raises(BadRequest, match="seed"):
            s.import_backup(backup)
        assert s.list() == []
        with pytest.raises(BadRequest, match="another seed"):
            s.restore_seed(seed)
    with PayerStore(tmp_path / "restored.db") as s:
        assert s.restore_seed(seed) and not s.restore_seed(seed)
        assert s.import_backup(backup) == 2
        assert {r.channel_id: r.privkey for r in s.list()} == keys
        assert s.next_key_index() == 2  # past every stored index
        # a keyed backup from another datadir keeps its keys, but not its (foreign) indexes
    with PayerStore(tmp_path / "other.db") as o:
        o.seed()
        assert (
            o.import_backup(
                {**backup, "channels": [{**c, "privkey": keys[c["channel_id"]].hex()} for c in backup["channels"]]}
            )
            == 2
        )
        assert [r.key_index for r in o.list()] == [None, None]
        assert o.reserve_key()[0] == 0


def test_a_new_seed_starts_past_the_indexes_of_a_lost_one(tmp_path: Path) -> None:
    db = tmp_path / "payer.db"
    with PayerStore(db) as s:
        for cid in ("aa" * 16, "bb" * 16):
            index, key = s.reserve_key()
            s.insert(_record(cid, key, index))
        s._db.execute("DELETE FROM seed")  # the seed is lost (and never written down)
    with PayerStore(db) as s:
        assert s.restore_keys() == 0  # every key is still in its row
        assert s.reserve_key()[0] == 2
