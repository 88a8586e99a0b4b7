"""Benchmark: paid (metered) requests per second through the async payment gate, on loopback.

Starts a throw-away regtest bitcoind, a payee selling a file's chunks (prepay, 1 sat a unit) and a
payer client in one process, then measures in the same run:

- ``metered``: sequential ``MeteredPayer.fetch`` on one channel: each request carries a payment
  (auth v2 signed, counter stored), the gate verifies it and commits it through the group commit;
- ``metered_parallel``: the same on ``--channels`` channels at once (aggregate; their commits share
  transactions);
- ``noop``: sequential ``GET /v1/info`` (an unpaid endpoint): the HTTP floor of the baseline;
- ``loop_lag_ms``: the largest delay of a 1 ms ticker on the event loop during the parallel run (a
  write waiting on the disk on the loop would show here as the fsync's latency).

The last line is ``metered_per_s=<x> noop_per_s=<y> ratio_to_noop=<x/y> metered_parallel_per_s=<z>
loop_lag_ms=<w>``. Payer and payee share one process and one CPU, so the figures are lower bounds.
Run: ``python bench/metered.py [--requests 500] [--channels 4]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/http.py is named like the stdlib's ``http``: keep this folder off the import path
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from aiohttp import web  # noqa: E402

from btcchannel.bitcoind.regtest import RegtestNode  # noqa: E402
from btcchannel.bitcoind.rpc import Node  # noqa: E402
from btcchannel.payee.config import ServerConfig  # noqa: E402
from btcchannel.payee.http import create_app  # noqa: E402
from btcchannel.payee.metered import add_file_route  # noqa: E402
from btcchannel.payer.client import PayerClient  # noqa: E402
from btcchannel.payer.metered import MeteredPayer  # noqa: E402
from btcchannel.store import PayeeStore  # noqa: E402


async def _ticker(stop: asyncio.Event, worst: list[float]) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        t = loop.time()
        await asyncio.sleep(0.001)
        worst[0] = max(worst[0], loop.time() - t - 0.001)


async def run(requests: int, channels: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="btcchannel-bench-"))
    bitcoind = RegtestNode(datadir=work / "bitcoind")
    bitcoind.start()
    try:
        bitcoind.prepare(201)
        bitcoind.fund_wallet("payer", 10 * 100_000_000)
        payee_node = Node(bitcoind.rpc_url, cookie_file=bitcoind.cookie_file, wallet="miner")
        payer_node = Node(bitcoind.rpc_url, cookie_file=bitcoind.cookie_file, wallet="payer")
        data = work / "data.bin"
        data.write_bytes(os.urandom(64 * 1024))
        config = ServerConfig(datadir=work / "payee", close_fee_rate_sat_vb=2.0, price_sat=1, mode="prepay")
        store = PayeeStore(config.db_path)
        app = create_app(config, store, payee_node)
        add_file_route(app, data, chunk_size=64)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        client = PayerClient(work / "payer", payer_node)
        ids = [await client.open_channel(url, 10_000_000, 1000, wait_open=False) for _ in range(channels + 1)]
        bitcoind.mine(1)
        for cid in ids:
            await client.wait_open(cid)

        t = time.perf_counter()
        for _ in range(requests):
            await client.info(url)
        noop = requests / (time.perf_counter() - t)

        payer = MeteredPayer(client, ids[0])
        t = time.perf_counter()
        for i in range(requests):
            await payer.fetch(f"{url}/v1/file/{i % 1000}")
        seq = requests / (time.perf_counter() - t)

        async def stream(cid: str, n: int) -> None:
            p = MeteredPayer(client, cid)
            for i in range(n):
                await p.fetch(f"{url}/v1/file/{i % 1000}")

        per = max(1, requests // channels)
        stop, worst = asyncio.Event(), [0.0]
        ticker = asyncio.ensure_future(_ticker(stop, worst))
        t = time.perf_counter()
        await asyncio.gather(*(stream(cid, per) for cid in ids[1:]))
        par = per * channels / (time.perf_counter() - t)
        stop.set()
        await ticker

        assert store.get(ids[0]).units == requests and store.get(ids[0]).amount_sat == requests
        print(f"sequential metered requests (one channel, a payment each): {seq:,.0f}/s")
        print(f"parallel metered requests ({channels} channels): {par:,.0f}/s")
        print(f"unpaid no-op GET /v1/info: {noop:,.0f}/s")
        print(
            f"metered_per_s={seq:.0f} noop_per_s={noop:.0f} ratio_to_noop={seq / noop:.2f} "
            f"metered_parallel_per_s={par:.0f} loop_lag_ms={worst[0] * 1000:.1f}"
        )
        await client.aclose()
        await runner.cleanup()
        store.close()
        await payee_node.aclose()
        await payer_node.aclose()
    finally:
        bitcoind.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--channels", type=int, default=4)
    args = ap.parse_args()
    asyncio.run(run(args.requests, args.channels))


if __name__ == "__main__":
    main()
