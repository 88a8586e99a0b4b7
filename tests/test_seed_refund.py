"""A payer whose payer.db lost its keys re-derives them from the seed and refunds after expiry."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
from pathlib import Path

from btcchannel.amounts import btc_to_sat
from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.core.keys import public_key
from btcchannel.core.seed import derive_channel_key
from btcchannel.store import PayerStore
from btcchannel.testing.cli import CliProcess


def test_payer_restores_wiped_keys_from_the_seed_and_refunds_after_expiry(
    bitcoind: RegtestNode,
    funded_wallet: str,
    tmp_path: Path,
    payee_process: tuple[CliProcess, subprocess.Popen[str], str],  # noqa: F811
) -> None:
    _, server, url = payee_process
    payer = CliProcess(bitcoind, tmp_path / "payer", funded_wallet)
    first = payer.json("open", url, "--deposit-sat", "100000", "--lifetime-blocks", "12", "--no-wait")
    second = payer.json("open", url, "--deposit-sat", "50000", "--lifetime-blocks", "12", "--no-wait")
    bitcoind.mine(1)
    assert payer.json("fetch", f"{url}/v1/file/0", "--channel", first["channel_id"])["amount_sat"] == 2000
    server.send_signal(signal.SIGKILL)  # the payee vanishes: only the refund gets the deposits back
    server.wait(30)
    shown = payer.json("seed", "show")
    seed = bytes.fromhex(shown["seed"])
    assert "WARNING" in shown["warning"] and shown["next_key_index"] == 2
    db = tmp_path / "payer" / "regtest" / "payer.db"
    with PayerStore(db) as store:
        rows = {r.channel_id: r for r in store.list()}
    for index, opened in enumerate((first, second)):
        row = rows[opened["channel_id"]]
        assert row.key_index == index and row.privkey == derive_channel_key(seed, index)
        assert row.params["payer_pubkey"] == public_key(row.privkey).hex()
    payer.json("backup", "export", "--no-keys", str(tmp_path / "nokeys.json"))

    conn = sqlite3.connect(db)  # the keys are lost; the seed was written down
    conn.execute("UPDATE channels SET privkey=x''")
    conn.execute("DELETE FROM seed")
    conn.commit()
    conn.close()
    assert "seed" in payer.fails("seed", "restore", "11" * 32)  # wrong seed: the keys do not derive
    with PayerStore(db) as store:
        assert all(r.privkey == b"" for r in store.list()) and not store.has_seed()
    restored = payer.json("seed", "restore", seed.hex())
    assert restored == {"installed": True, "keys_restored": 2}
    with PayerStore(db) as store:
        assert {r.channel_id: r.privkey for r in store.list()} == {c: r.privkey for c, r in rows.items()}

    # a fresh datadir: the seed, then the backup written without keys
    fresh = CliProcess(bitcoind, tmp_path / "fresh", funded_wallet)
    assert "seed" in fresh.fails("backup", "import", str(tmp_path / "nokeys.json"))
    assert fresh.json("seed", "restore", seed.hex())["keys_restored"] == 0
    assert fresh.json("backup", "import", str(tmp_path / "nokeys.json"))["imported"] == 2

    conn = sqlite3.connect(db)  # lost again, the seed kept: the payer re-derives them when it starts
    conn.execute("UPDATE channels SET privkey=x''")
    conn.commit()
    conn.close()
    assert "not_expired" in payer.fails("refund", first["channel_id"])
    with PayerStore(db) as store:
        assert {r.channel_id: r.privkey for r in store.list()} == {c: r.privkey for c, r in rows.items()}
    bitcoind.mine(first["expiry_height"] - bitcoind.tip_height())
    refund_txid = payer.json("refund", first["channel_id"])["refund_txid"]
    second_refund = fresh.json("refund", second["channel_id"])["refund_txid"]
    bitcoind.mine(1)
    for txid, opened, deposit in ((refund_txid, first, 100000), (second_refund, second, 50000)):
        tx = bitcoind.rpc("getrawtransaction", txid, 2)
        assert tx["confirmations"] == 1 and tx["vin"][0]["txid"] == opened["funding_txid"]
        assert btc_to_sat(tx["vout"][0]["value"]) == deposit - btc_to_sat(tx["fee"])
