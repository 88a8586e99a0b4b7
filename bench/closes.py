"""Benchmark: on-chain cost per channel of a close settling k channels at once (regtest).

Starts a throw-away regtest bitcoind; for k = 1, 10, 100 funds k channels in one
transaction, pays each a different partial amount, closes all k with the core's
``build_multi_close`` (one payee output) at 2 sat/vB, mines it, and reads the close
back from the node: its vsize and fee, divided by k. Each k prints one line
``channels=<k> vbytes_per_channel=<v> fee_per_channel_sat=<f>``; the last line compares
k = 100 with a single close. Every payer's change and the payee output are checked
against the amounts. Run: ``python bench/closes.py``.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

# bench/http.py is named like the stdlib's ``http``: keep this folder off the import path
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from btcchannel.bitcoind.regtest import RegtestNode  # noqa: E402
from btcchannel.core.channel import build_multi_close  # noqa: E402
from btcchannel.core.script import address_to_script  # noqa: E402
from btcchannel.testing.closes import close_summary, fund_channels  # noqa: E402

DEPOSIT = 100_000
FEE_RATE = 2.0


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="btcchannel-closes-"))
    node = RegtestNode(datadir=work / "bitcoind")
    node.start()
    try:
        node.prepare(201)
        payee_script = address_to_script(node.new_address("miner"), "regtest")
        per: dict[int, float] = {}
        for k in (1, 10, 100):
            amounts = [5_000 + 101 * i for i in range(k)]
            pairs = fund_channels(node, amounts, DEPOSIT)
            tx = build_multi_close([p.payee for p in pairs], payee_script, FEE_RATE)
            txid = node.rpc("sendrawtransaction", tx.serialize().hex())
            node.mine(1)
            close = close_summary(node, txid)
            assert close["outputs"][:k] == [DEPOSIT - a for a in amounts]
            assert close["outputs"][k] == sum(amounts) - close["fee_sat"]
            per[k] = close["vsize"] / k
            print(f"channels={k} vbytes_per_channel={per[k]:.1f} fee_per_channel_sat={close['fee_sat'] / k:.1f}")
        print(f"k=100 costs {per[100] / per[1]:.0%} of a single close per channel "
              "(each channel keeps its input and its payer's change output)")
    finally:
        node.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
