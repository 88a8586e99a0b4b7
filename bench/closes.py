"""Benchmark: on-chain cost per channel of a close settling k channels at once (regtest).

Starts a throw-away regtest bitcoind; for k = 1, 10, 100 funds k channels in one
transaction, pays each a different partial amount, closes all k with the core's
``build_multi_close`` (one payee output) at 2 sat/vB, mines it, and reads the close
back from the node: its vsize and fee, divided by k. Each k prints one line
``channels=<k> vbytes_per_channel=<v> fee_per_channel_sat=<f>``; the last line compares
k = 100 with a single close. Every payer's change and the payee output are checked
against the amounts.

Then the same through the payee's closer: k channels stored open with their payments, claimed
by the closer in one pass (``claim_only``) and sent with ``close_claimed``, which forms the batch;
each k prints ``closer channels=<k> close_transactions=<n> vbytes_per_channel=<v>
fee_per_channel_sat=<f>`` (n: distinct closes the k channels recorded). Run:
``python bench/closes.py``.
"""

from __future__ import annotations

import asyncio
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
from btcchannel.payee.closer import Closer  # noqa: E402
from btcchannel.payee.config import ServerConfig  # noqa: E402
from btcchannel.store import PayeeStore  # noqa: E402
from btcchannel.testing.chain import node_for  # noqa: E402
from btcchannel.testing.closes import close_summary, fund_channels, store_open_channels  # noqa: E402

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
        print(
            f"k=100 costs {per[100] / per[1]:.0%} of a single close per channel "
            "(each channel keeps its input and its payer's change output)"
        )
        for k in (1, 10, 100):
            asyncio.run(_through_the_closer(node, work / f"payee-{k}", k, payee_script))
    finally:
        node.stop()
        shutil.rmtree(work, ignore_errors=True)


async def _through_the_closer(node: RegtestNode, datadir: Path, k: int, payee_script: bytes) -> None:
    """k channels claimed by the payee's closer in one pass: the closes it sends, read from the node."""
    amounts = [5_000 + 101 * i for i in range(k)]
    pairs = fund_channels(node, amounts, DEPOSIT)
    config = ServerConfig(datadir=datadir, close_fee_rate_sat_vb=FEE_RATE)
    datadir.mkdir(parents=True)
    store = PayeeStore(config.db_path)
    rpc = node_for(node, "miner")
    try:
        cids = store_open_channels(store, pairs, payee_script)
        closer = Closer(config, store, rpc)
        await closer.start()
        for cid in cids:
            assert closer.claim_only(cid, "operator") is not None
        await closer.close_claimed(cids)
        txids = {store.get(cid).close_txid for cid in cids}
        assert None not in txids
        node.mine(1)
        summaries = [close_summary(node, txid or "") for txid in txids]
        vsize, fee = sum(c["vsize"] for c in summaries), sum(c["fee_sat"] for c in summaries)
        paid = sum(c["outputs"][-1] + c["fee_sat"] for c in summaries)
        assert paid == sum(amounts)  # every payment in a close, the payee output gets the rest
        print(
            f"closer channels={k} close_transactions={len(txids)} vbytes_per_channel={vsize / k:.1f} "
            f"fee_per_channel_sat={fee / k:.1f}"
        )
    finally:
        await rpc.aclose()
        store.close()


if __name__ == "__main__":
    main()
