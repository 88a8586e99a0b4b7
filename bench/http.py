"""Benchmark: payments per second over HTTP on loopback (payee service + payer client).

Starts a throw-away regtest bitcoind, a payee service (aiohttp, real port) and
a payer client in one process, opens channels, then measures in the same run:

- ``pay``: sequential ``PayerClient.pay`` on one channel — the payer signs,
  fsyncs its store, POSTs; the payee verifies and fsyncs its row before 200;
- ``pay_parallel``: the same on ``--channels`` channels at once (aggregate);
- ``noop``: sequential ``GET /v1/info`` (an unpaid no-op endpoint) — the HTTP floor;
- ``accept``: the bare ``PayeeChannel.accept_payment`` (no HTTP, no disk) — the CPU floor.

The last line is ``payments_per_s=<x> noop_per_s=<y> ratio_to_noop=<x/y>
parallel_payments_per_s=<z> accept_per_s=<w>``. Payer and payee share one
process and one CPU here, so the figure is a lower bound for a real deployment.
Run: ``python bench/http.py [--payments 2000] [--channels 4]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

# this file is named like the stdlib's ``http``: keep its folder off the import path
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from btcchannel.bitcoind.regtest import RegtestNode  # noqa: E402
from btcchannel.bitcoind.rpc import Node  # noqa: E402
from btcchannel.core.channel import PayeeChannel, PayerChannel  # noqa: E402
from btcchannel.core.params import ChannelParams  # noqa: E402
from btcchannel.core.state import ChannelState  # noqa: E402
from btcchannel.payee.config import ServerConfig  # noqa: E402
from btcchannel.payee.http import SERVICE, create_app  # noqa: E402
from btcchannel.payer.client import PayerClient  # noqa: E402
from btcchannel.store import PayeeStore  # noqa: E402


async def run(payments: int, channels: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="btcchannel-bench-"))
    bitcoind = RegtestNode(datadir=work / "bitcoind")
    bitcoind.start()
    try:
        bitcoind.prepare(201)
        bitcoind.fund_wallet("payer", 10 * 100_000_000)
        payee_node = Node(bitcoind.rpc_url, cookie_file=bitcoind.cookie_file, wallet="miner")
        payer_node = Node(bitcoind.rpc_url, cookie_file=bitcoind.cookie_file, wallet="payer")
        from aiohttp import web

        config = ServerConfig(datadir=work / "payee", close_fee_rate_sat_vb=2.0)
        store = PayeeStore(config.db_path)
        app = create_app(config, store, payee_node)
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

        # HTTP floor: an unpaid no-op endpoint
        t = time.perf_counter()
        for _ in range(payments):
            await client.info(url)
        noop = payments / (time.perf_counter() - t)

        # sequential payments on one channel
        t = time.perf_counter()
        for _ in range(payments):
            await client.pay(ids[0], 1)
        seq = payments / (time.perf_counter() - t)

        # several channels at once
        async def stream(cid: str, n: int) -> None:
            for _ in range(n):
                await client.pay(cid, 1)

        per = max(1, payments // channels)
        t = time.perf_counter()
        await asyncio.gather(*(stream(cid, per) for cid in ids[1:]))
        par = per * channels / (time.perf_counter() - t)

        # CPU floor: bare accept_payment on the same channel parameters
        rec = store.get(ids[0])
        params = app[SERVICE].params_of(rec)
        prec = client.store.get(ids[0])
        payer = PayerChannel(ChannelParams.from_json(prec.params), prec.privkey, state=ChannelState.OPEN)
        sigs = [payer.sign_payment(rec.amount_sat + 1 + i) for i in range(payments)]
        payee = PayeeChannel(params, rec.privkey, state=ChannelState.OPEN)
        t = time.perf_counter()
        for p in sigs:
            payee.accept_payment(p.amount_sat, p.signature)
        accept = payments / (time.perf_counter() - t)

        assert store.get(ids[0]).amount_sat == payments
        print(f"sequential payments over HTTP (one channel): {seq:,.0f}/s")
        print(f"parallel payments over HTTP ({channels} channels): {par:,.0f}/s")
        print(f"unpaid no-op GET /v1/info: {noop:,.0f}/s")
        print(f"bare accept_payment: {accept:,.0f}/s")
        print(
            f"payments_per_s={seq:.0f} noop_per_s={noop:.0f} ratio_to_noop={seq / noop:.2f} "
            f"parallel_payments_per_s={par:.0f} accept_per_s={accept:.0f}"
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
    ap.add_argument("--payments", type=int, default=2000)
    ap.add_argument("--channels", type=int, default=4)
    args = ap.parse_args()
    asyncio.run(run(args.payments, args.channels))


if __name__ == "__main__":
    main()
