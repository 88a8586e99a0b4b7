"""Benchmark: what one new block costs the payee's watcher, for 10, 100 and 1,000 open channels.

Starts a throw-away regtest bitcoind, opens ``n`` channels in a payee store (one real funding
transaction with ``n`` outputs), runs the watcher's first (full) pass, then mines blocks one at
a time and measures each following pass: RPC calls (counted by wrapping the Node) and wall time.
A line per size: ``channels=<n> rpc_calls_per_block=<x> ms_per_block=<y>``; ``rpc_calls_per_block``
does not grow with ``n`` (the tip and one ``getblock``), the first full pass does (shown as
``first_pass_rpc_calls``, the baseline of a watcher that looks at every channel every pass).
Run: ``python bench/watcher.py [--blocks 5] [--sizes 10,100,1000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

# this folder holds a file named like the stdlib's ``http``: keep it off the import path
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from btcchannel.bitcoind.regtest import RegtestNode  # noqa: E402
from btcchannel.payee.closer import Closer  # noqa: E402
from btcchannel.payee.config import ServerConfig  # noqa: E402
from btcchannel.payee.shared import ChainTip  # noqa: E402
from btcchannel.payee.watcher import Watcher  # noqa: E402
from btcchannel.store import PayeeStore  # noqa: E402
from btcchannel.testing.watched import CountingNode, open_watched_channels  # noqa: E402


async def measure(bitcoind: RegtestNode, work: Path, n: int, blocks: int) -> str:
    config = ServerConfig(datadir=work / f"payee-{n}", close_fee_rate_sat_vb=2.0)
    config.datadir.mkdir(parents=True)
    store = PayeeStore(config.db_path)
    try:
        open_watched_channels(store, bitcoind, "payer", n)
        async with CountingNode(bitcoind.rpc_url, cookie_file=bitcoind.cookie_file, wallet="miner") as node:
            closer = Closer(config, store, node)
            watcher = Watcher(config, store, node, closer, ChainTip())
            await closer.start()
            await watcher.start()
            node.calls.clear()
            await watcher.step()
            first = sum(node.calls.values())
            calls, seconds = 0, 0.0
            for _ in range(blocks):
                bitcoind.mine(1)
                node.calls.clear()
                t0 = time.perf_counter()
                await watcher.step()
                seconds += time.perf_counter() - t0
                calls += sum(node.calls.values())
        return (
            f"channels={n} rpc_calls_per_block={calls / blocks:g} ms_per_block={1000 * seconds / blocks:.1f}"
            f" first_pass_rpc_calls={first}"
        )
    finally:
        store.close()


async def run(sizes: list[int], blocks: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="btcchannel-bench-"))
    bitcoind = RegtestNode(datadir=work / "bitcoind")
    bitcoind.start()
    try:
        bitcoind.prepare(201)
        bitcoind.fund_wallet("payer", 10 * 100_000_000)
        for n in sizes:
            print(await measure(bitcoind, work, n, blocks), flush=True)
    finally:
        bitcoind.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--blocks", type=int, default=5)
    ap.add_argument("--sizes", default="10,100,1000")
    args = ap.parse_args()
    asyncio.run(run([int(s) for s in args.sizes.split(",")], args.blocks))


if __name__ == "__main__":
    main()
