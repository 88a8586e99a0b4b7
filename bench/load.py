"""Load benchmark: payers in separate processes against payee service processes (regtest).

Starts a throw-away regtest bitcoind, ``--instances`` payee processes (``python -m
btcchannel.payee``) on one store, and ``--payers`` payer processes, each a real
:class:`~btcchannel.payer.client.PayerClient` with its own store and wallet, sharing
``--channels`` channels (spread over the instances). ``--store postgresql`` runs the
instances on one PostgreSQL database (a real server: on ``PATH``, else ``pgserver``'s). Then, in the same run, with
the same
processes and one concurrent loop per channel, for ``--duration`` seconds each:

- ``noop_per_s``: unpaid ``GET /v1/info`` requests per second (the HTTP floor);
- ``payments_per_s``: acknowledged payments per second (``PayerClient.pay``: sign, fsync the
  payer's store, POST; the payee verifies and commits before it answers), with the latency
  percentiles ``p50_ms`` / ``p99_ms``;
- ``fsync_floor_per_s``: sequential durable commits per second on the store's disk (one row
  updated per commit, the payee's pragmas), i.e. what one-fsync-per-payment would allow.

Afterwards every channel's stored amount is checked against what its payer saw acknowledged.
The last line is ``payments_per_s=<x> p50_ms=<a> p99_ms=<b> noop_per_s=<y>
fsync_floor_per_s=<z> channels=<n> store=<sqlite|postgresql> instances=<k> backup=<none|sync|async>``.
``--backup sync`` runs the payees with a synchronous backup (``serve --backup-db``: every payment
in a second database before it is acknowledged), ``--backup async`` with the background copy only;
compare ``payments_per_s`` with a run without ``--backup``.
``--profile DIR`` writes cProfile files of the payment phase (payee: the whole run).
Run: ``python bench/load.py [--channels 100] [--duration 10] [--payers 4]
[--store postgresql --instances 2] [--backup sync]``.

``--route metered --framework aiohttp|asgi`` measures a seller's route instead: one seller process
(:class:`~btcchannel.payee.seller.PaidService` in an aiohttp app, or a FastAPI app under uvicorn)
serves the same handler free (``/free``) and paid (``/paid``, 1 sat, prepay, one unit a request,
bought with ``MeteredPayer.fetch``), one loop per channel in the payer processes, in one run. The
last line is ``metered_per_s=<x> free_per_s=<y> ratio=<x/y> p50_ms=<a> p99_ms=<b>
payee_cpu_us_per_request=<c> free_cpu_us_per_request=<d> framework=<f> channels=<n>``
(latencies and CPU of the paid requests; ``--profile DIR`` profiles the seller process, ``--py-spy DIR``
samples its stacks in each phase with ``py-spy``, all threads, when it is installed).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# bench/http.py is named like the stdlib's ``http``: keep this folder off the import path
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from btcchannel.bitcoind.regtest import RegtestNode  # noqa: E402
from btcchannel.bitcoind.rpc import Node  # noqa: E402
from btcchannel.payee.config import ServerConfig  # noqa: E402
from btcchannel.payer.client import PayerClient  # noqa: E402
from btcchannel.store import PayeeStore  # noqa: E402
from btcchannel.store._db import connect  # noqa: E402
from btcchannel.wait import wait_until  # noqa: E402

DEPOSIT = 1_000_000
LIFETIME = 500


# ----------------------------------------------------------------------------- payer worker


class Worker:
    """One payer process: a PayerClient with its own store, driven by commands on stdin."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.node = Node(spec["rpc_url"], cookie_file=Path(spec["cookie_file"]), wallet=spec["wallet"])
        self.client = PayerClient(Path(spec["datadir"]), self.node, timeout=30)
        self.ids: list[str] = []
        self.url_of: dict[str, str] = {}

    async def open(self) -> dict[str, Any]:
        urls = self.spec["urls"]
        for i in range(self.spec["channels"]):
            url = urls[(self.spec["first"] + i) % len(urls)]
            cid = await self.client.open_channel(url, DEPOSIT, LIFETIME, wait_open=False)
            self.ids.append(cid)
            self.url_of[cid] = url
        return {"opened": len(self.ids)}

    async def wait_open(self) -> dict[str, Any]:
        for cid in self.ids:
            await self.client.wait_open(cid, timeout=120)
        return {"ready": len(self.ids)}

    async def _loop(self, duration: float, op: Any) -> dict[str, Any]:
        lat: list[float] = []
        deadline = time.perf_counter() + duration

        async def one(cid: str) -> None:
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                await op(cid)
                lat.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(cid) for cid in self.ids))
        return {"count": len(lat), "elapsed": time.perf_counter() - t0, "lat_ms": [round(x * 1000, 3) for x in lat]}

    async def noop(self, duration: float) -> dict[str, Any]:
        async def info(cid: str) -> None:
            await self.client.info(self.url_of[cid])

        return await self._loop(duration, info)

    async def pay(self, duration: float) -> dict[str, Any]:
        async def pay(cid: str) -> None:
            await self.client.pay(cid, 1)

        prof = cProfile.Profile() if self.spec.get("profile") else None
        if prof is not None:
            prof.enable()
        try:
            return await self._loop(duration, pay)
        finally:
            if prof is not None:
                prof.disable()
                prof.dump_stats(self.spec["profile"])

    async def free(self, duration: float) -> dict[str, Any]:
        session = self.client.session

        async def get(cid: str) -> None:
            async with session.get(self.spec["free_url"]) as resp:
                await resp.read()
                assert resp.status == 200, resp.status

        return await self._loop(duration, get)

    async def paid(self, duration: float) -> dict[str, Any]:
        from btcchannel.payer.metered import MeteredPayer

        payers = {cid: MeteredPayer(self.client, cid) for cid in self.ids}
        url = self.spec["paid_url"]

        async def get(cid: str) -> None:
            status, _ = await payers[cid].fetch(url, units=1)
            assert status == 200, status

        prof = cProfile.Profile() if self.spec.get("profile") and duration > 1 else None
        if prof is not None:
            prof.enable()
        try:
            return await self._loop(duration, get)
        finally:
            if prof is not None:
                prof.disable()
                prof.dump_stats(self.spec["profile"])

    async def acked(self) -> dict[str, Any]:
        return {"acked": {cid: self.client.store.get(cid).acked_sat for cid in self.ids}}

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            cmd, *arg = line.split()
            if cmd == "quit":
                break
            fn = getattr(self, cmd)
            ans = await (fn(float(arg[0])) if arg else fn())
            sys.stdout.write(json.dumps(ans) + "\n")
            sys.stdout.flush()
        await self.client.aclose()
        await self.node.aclose()


# ----------------------------------------------------------------------------- the seller


def run_seller(spec: dict[str, Any]) -> None:
    """The seller's program: the same handler at /free and, at 1 sat a request, at /paid."""
    from btcchannel.payee.seller import PaidService

    fields = spec["fields"]
    service = PaidService(
        datadir=spec["datadir"],
        wallet="miner",
        rpc_url=spec["rpc_url"],
        rpc_cookie=spec["cookie_file"],
        price_sat=1,
        **fields,
    )
    payload = {"answer": 42}

    def commits() -> dict[str, int]:  # the group commit's counters (not a paid route: the bench reads them)
        writer = service.store.writer
        return {"batches": writer.batches, "statements": writer.statements}

    if spec["framework"] == "aiohttp":
        from aiohttp import web

        async def answer(request: web.Request) -> web.Response:
            return web.json_response(payload)

        async def stats(request: web.Request) -> web.Response:
            return web.json_response(commits())

        app = web.Application()
        app.router.add_get("/free", answer)
        app.router.add_get("/commits", stats)
        app.router.add_get("/paid", service.paid(price_sat=1)(answer))
        service.mount(app)
        web.run_app(app, host="127.0.0.1", port=spec["port"], access_log=None, print=None)
    else:
        import uvicorn
        from fastapi import FastAPI

        api = FastAPI()

        @api.get("/free")
        async def free() -> dict[str, int]:
            return payload

        @api.get("/paid")
        async def paid() -> dict[str, int]:
            return payload

        @api.get("/commits")
        async def stats() -> dict[str, int]:
            return commits()

        uvicorn.run(
            service.asgi(api, {"/paid": 1}), host="127.0.0.1", port=spec["port"], log_level="warning", access_log=False
        )


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def start_seller(
    work: Path, framework: str, bitcoind: RegtestNode, channels: int, profile: Path | None
) -> tuple[subprocess.Popen[bytes], str]:
    """The seller process (under cProfile with ``profile``); (process, origin)."""
    port = free_port()
    spec = work / "seller.json"
    spec.write_text(
        json.dumps(
            {
                "framework": framework,
                "port": port,
                "datadir": str(work / "seller"),
                "rpc_url": bitcoind.rpc_url,
                "cookie_file": str(bitcoind.cookie_file),
                "fields": {
                    "close_fee_rate_sat_vb": 2.0,
                    "max_proposals": channels + 10,
                    "max_proposals_per_client": channels + 10,
                    "min_lifetime_blocks": 12,
                    "max_lifetime_blocks": LIFETIME + 10,
                },
            }
        )
    )
    prof = ["-m", "cProfile", "-o", str(profile)] if profile is not None else []
    with open(work / "seller.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, *prof, __file__, "--seller", str(spec)], stdout=log, stderr=subprocess.STDOUT
        )
    origin = f"http://127.0.0.1:{port}"

    def up() -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"{origin}/btc/v1/info", timeout=2):
                return True
        except OSError:
            return False

    wait_until(lambda: proc.poll() is not None or up(), timeout=60, what="the seller to listen")
    if proc.poll() is not None:
        raise RuntimeError((work / "seller.log").read_text()[-2000:])
    return proc, origin


def run_metered(args: argparse.Namespace) -> None:
    """The same route free and paid, in one run (see the module)."""
    work = Path(tempfile.mkdtemp(prefix="btcchannel-load-"))
    profile = Path(args.profile).resolve() if args.profile else None
    if profile is not None:
        profile.mkdir(parents=True, exist_ok=True)
    bitcoind = RegtestNode(datadir=work / "bitcoind")
    bitcoind.start()
    seller: subprocess.Popen[bytes] | None = None
    workers: list[Proc] = []
    try:
        bitcoind.prepare(201)
        seller, origin = start_seller(
            work,
            args.framework,
            bitcoind,
            args.channels,
            profile / f"seller-{args.framework}.prof" if profile is not None else None,
        )
        payers = min(args.payers, args.channels)
        shares = [args.channels // payers + (1 if i < args.channels % payers else 0) for i in range(payers)]
        fund_payers(bitcoind, [(f"payer{i}", n) for i, n in enumerate(shares)])
        for i, n in enumerate(shares):
            spec = {
                "rpc_url": bitcoind.rpc_url,
                "cookie_file": str(bitcoind.cookie_file),
                "wallet": f"payer{i}",
                "datadir": str(work / f"payer{i}"),
                "urls": [f"{origin}/btc"],
                "channels": n,
                "first": 0,
                "free_url": f"{origin}/free",
                "paid_url": f"{origin}/paid",
                "profile": str(profile / f"payer{i}-{args.framework}.prof") if profile is not None else None,
            }
            spec_file = work / f"payer{i}.json"
            spec_file.write_text(json.dumps(spec))
            workers.append(Proc(spec_file))
        all_do(workers, "open")
        bitcoind.mine(1)
        all_do(workers, "wait_open")
        all_do(workers, "paid 0.5")  # warm up both paths (connections, first payment)
        all_do(workers, "free 0.5")
        figures = {}
        for phase in ("free", "paid"):
            spy = None
            if args.py_spy:  # sampled stacks of the seller (all threads, native frames excluded) in this phase
                spy = subprocess.Popen(
                    [
                        "py-spy",
                        "record",
                        "--pid",
                        str(seller.pid),
                        "--duration",
                        str(int(args.duration)),
                        "--rate",
                        "250",
                        "--threads",
                        "--nonblocking",
                        "--format",
                        "raw",
                        "--output",
                        str(Path(args.py_spy) / f"seller-{args.framework}-{args.channels}ch-{phase}.txt"),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            before = cpu_s(seller.pid)
            threads_before = thread_cpu_s(seller.pid)
            commits_before = get_json(f"{origin}/commits")
            payers_before = sum(cpu_s(w.p.pid) for w in workers)
            answers = all_do(workers, f"{phase} {args.duration}")
            used = cpu_s(seller.pid) - before
            payers_used = sum(cpu_s(w.p.pid) for w in workers) - payers_before
            count = sum(a["count"] for a in answers)
            threads_after = thread_cpu_s(seller.pid)
            by_thread = {n: (t - threads_before.get(n, 0.0)) / max(count, 1) * 1e6 for n, t in threads_after.items()}
            commits_after = get_json(f"{origin}/commits")
            batches = commits_after["batches"] - commits_before["batches"]
            statements = commits_after["statements"] - commits_before["statements"]
            print(
                f"{phase}: seller CPU per request by thread (us): "
                + ", ".join(f"{n} {us:.0f}" for n, us in sorted(by_thread.items()) if us >= 1)
                + f"; group commit: {batches} commits of {statements} statements"
                + (f" ({statements / batches:.1f} per commit)" if batches else "")
            )
            if spy is not None:
                spy.wait(60)
            figures[phase] = {
                "rate": rate(answers),
                "cpu_us": used / max(count, 1) * 1e6,
                "payer_cpu_us": payers_used / max(count, 1) * 1e6,
                "lat": sorted(x for a in answers for x in a["lat_ms"]),
                "count": count,
            }
        free, paid = figures["free"], figures["paid"]
        print(
            f"free: {free['count']} requests, paid: {paid['count']} requests (1 sat each); CPU per request: "
            f"seller {free['cpu_us']:.0f} us free, {paid['cpu_us']:.0f} us paid; payers {free['payer_cpu_us']:.0f} us "
            f"free, {paid['payer_cpu_us']:.0f} us paid"
        )
        print(
            f"metered_per_s={paid['rate']:.0f} free_per_s={free['rate']:.0f} ratio={paid['rate'] / free['rate']:.2f} "
            f"p50_ms={percentile(paid['lat'], 0.5):.2f} p99_ms={percentile(paid['lat'], 0.99):.2f} "
            f"payee_cpu_us_per_request={paid['cpu_us']:.0f} free_cpu_us_per_request={free['cpu_us']:.0f} "
            f"framework={args.framework} channels={args.channels}"
        )
    finally:
        quit_workers(workers)
        if seller is not None:
            seller.send_signal(signal.SIGINT)
            try:
                seller.wait(30)
            except subprocess.TimeoutExpired:
                seller.kill()
        bitcoind.stop()
        shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------- the driver


class Proc:
    """A worker subprocess spoken to line by line."""

    def __init__(self, spec_file: Path) -> None:
        self.p = subprocess.Popen(
            [sys.executable, __file__, "--worker", str(spec_file)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def send(self, cmd: str) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()

    def answer(self) -> dict[str, Any]:
        assert self.p.stdout is not None
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"payer worker exited ({self.p.wait()})")
        return dict(json.loads(line))


def all_do(procs: list[Proc], cmd: str) -> list[dict[str, Any]]:
    for p in procs:
        p.send(cmd)
    return [p.answer() for p in procs]


def start_payee(
    work: Path, name: str, config: ServerConfig, bitcoind: RegtestNode, profile: Path | None, backup: str = "none"
) -> tuple[subprocess.Popen[bytes], str]:
    """``python -m btcchannel.payee`` (under cProfile with ``profile``; with a backup of payee.db in
    ``<work>/<name>-backup.db`` unless ``backup`` is ``none``); (process, url)."""
    datadir = work / name
    datadir.mkdir(parents=True, exist_ok=True)
    cfg = config.to_json()
    cfg["datadir"] = str(config.datadir)
    spec = work / f"{name}.json"
    extra = (
        {} if backup == "none" else {"backup_db": str(work / f"{name}-backup.db"), "backup_async": backup == "async"}
    )
    spec.write_text(
        json.dumps(
            {
                "config": cfg,
                "node": {"url": bitcoind.rpc_url, "cookie_file": str(bitcoind.cookie_file), "wallet": "miner"},
                **extra,
            }
        )
    )
    info = config.datadir / "server.json"
    info.unlink(missing_ok=True)
    prof = ["-m", "cProfile", "-o", str(profile)] if profile is not None else []
    with open(work / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, *prof, "-m", "btcchannel.payee", str(spec)], stdout=log, stderr=subprocess.STDOUT
        )
    wait_until(lambda: info.exists() or proc.poll() is not None, timeout=30, what="the payee to listen")
    if proc.poll() is not None:
        raise RuntimeError((work / f"{name}.log").read_text()[-2000:])
    return proc, str(json.loads(info.read_text())["url"])


def fsync_floor(folder: Path, duration: float, pg_url: str | None) -> float:
    """Sequential durable commits per second: one UPDATE per commit (SQLite: WAL + synchronous=FULL;
    PostgreSQL: synchronous_commit on, through the store's own connection class)."""
    if pg_url is None:
        db: Any = connect(folder / "floor.db")
    else:
        from btcchannel.store.postgres import PgConnection

        db = PgConnection(pg_url)
    try:
        db.execute("CREATE TABLE IF NOT EXISTS floor (id INTEGER PRIMARY KEY, n INTEGER)")
        db.execute("DELETE FROM floor")
        db.execute("INSERT INTO floor VALUES (1, 0)")
        count = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < duration:
            db.execute("UPDATE floor SET n=n+1 WHERE id=1")
            count += 1
        return count / (time.perf_counter() - t0)
    finally:
        db.close()


def fund_payers(bitcoind: RegtestNode, wallets: list[tuple[str, int]]) -> None:
    """One confirmed output per channel to each payer's wallet (no unconfirmed chains when opening)."""
    outputs: dict[str, float] = {}
    for wallet, n in wallets:
        bitcoind.create_wallet(wallet)
        for _ in range(n):
            outputs[bitcoind.new_address(wallet)] = round((DEPOSIT + 10_000) / 1e8, 8)
    bitcoind.rpc("sendmany", "", outputs, wallet="miner")
    bitcoind.mine(1)


def open_store(config: ServerConfig) -> PayeeStore:
    """The payee's store as its instances see it."""
    if getattr(config, "store_url", None):
        from btcchannel.store import open_payee_store

        return open_payee_store(config.store_url)
    return PayeeStore(config.db_path)


def get_json(url: str) -> Any:
    """GET ``url``'s JSON body (the bench's own side channel to the seller)."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def thread_cpu_s(pid: int) -> dict[str, float]:
    """User + system CPU seconds the threads of a process have used so far (Linux): its main thread
    (the event loop) and the others together (the group commit's writer, executors)."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = "main" if task.name == str(pid) else "other threads"
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def rate(answers: list[dict[str, Any]]) -> float:
    return sum(a["count"] for a in answers) / max(a["elapsed"] for a in answers)


def check_options(args: argparse.Namespace) -> None:
    """Options that do not go together (SystemExit before anything starts)."""
    if args.store == "postgresql" and args.backup != "none":
        raise SystemExit("--backup copies the SQLite payee.db: not with --store postgresql")
    if args.store != "postgresql" and args.instances > 1:
        raise SystemExit("several instances share a PostgreSQL store: add --store postgresql")


def start_payees(
    args: argparse.Namespace,
    work: Path,
    bitcoind: RegtestNode,
    pg_url: str | None,
    profile: Path | None,
    payees: list[subprocess.Popen[bytes]],
) -> tuple[ServerConfig, list[str]]:
    """``args.instances`` payee processes on one store (appended to ``payees`` as they start, so
    that they are stopped whatever fails): the last one's configuration and every one's URL."""
    urls = []
    for k in range(args.instances):
        config = ServerConfig(
            datadir=work / f"payee{k}",
            close_fee_rate_sat_vb=2.0,
            max_proposals=args.channels + 10,
            min_lifetime_blocks=12,
            max_lifetime_blocks=LIFETIME + 10,
            **({"store_url": pg_url} if pg_url else {}),
        )
        proc, url = start_payee(
            work,
            f"payee{k}",
            config,
            bitcoind,
            profile / f"payee{k}.prof" if profile is not None else None,
            args.backup,
        )
        payees.append(proc)
        urls.append(url)
    return config, urls


def start_payers(
    args: argparse.Namespace,
    work: Path,
    bitcoind: RegtestNode,
    urls: list[str],
    profile: Path | None,
    workers: list[Proc],
) -> None:
    """``args.payers`` payer worker processes sharing ``args.channels`` channels, each with a funded
    wallet of its own (appended to ``workers`` as they start)."""
    payers = min(args.payers, args.channels)
    shares = [args.channels // payers + (1 if i < args.channels % payers else 0) for i in range(payers)]
    fund_payers(bitcoind, [(f"payer{i}", n) for i, n in enumerate(shares)])
    first = 0
    for i, n in enumerate(shares):
        spec = {
            "rpc_url": bitcoind.rpc_url,
            "cookie_file": str(bitcoind.cookie_file),
            "wallet": f"payer{i}",
            "datadir": str(work / f"payer{i}"),
            "urls": urls,
            "channels": n,
            "first": first,
            "profile": str(profile / f"payer{i}.prof") if profile is not None else None,
        }
        first += n
        spec_file = work / f"payer{i}.json"
        spec_file.write_text(json.dumps(spec))
        workers.append(Proc(spec_file))


def measured(workers: list[Proc], pids: dict[str, list[int | None]], cmd: str, what: str) -> list[dict[str, Any]]:
    """The workers' answers to ``cmd``, and the CPU each kind of process spent per ``what`` printed."""
    before = {k: sum(cpu_s(p) for p in v if p) for k, v in pids.items()}
    answers = all_do(workers, cmd)
    used = {k: sum(cpu_s(p) for p in v if p) - before[k] for k, v in pids.items()}
    n = sum(a["count"] for a in answers)
    print(f"CPU per {what}: " + ", ".join(f"{k} {v / n * 1e6:.0f} us" for k, v in used.items()))
    return answers


def check_durable(args: argparse.Namespace, work: Path, config: ServerConfig, workers: list[Proc]) -> int:
    """Every amount the payee acknowledged to the payers is in its store (and in the synchronous
    backup, with ``--backup sync``); SystemExit otherwise. Returns the number of channels."""
    acked: dict[str, int] = {}
    for a in all_do(workers, "acked"):
        acked.update(a["acked"])
    with open_store(config) as store:  # durable: every acknowledged amount is stored
        lost = [cid for cid, amount in acked.items() if store.get(cid).amount_sat < amount]
    if lost:
        raise SystemExit(f"acknowledged payments missing from the payee's store: {lost}")
    if args.backup == "sync":
        with PayeeStore(work / "payee0-backup.db") as backup:
            behind = [cid for cid, amount in acked.items() if backup.get(cid).amount_sat < amount]
        if behind:
            raise SystemExit(f"acknowledged payments missing from the synchronous backup: {behind}")
        print("every acknowledged amount also in the synchronous backup")
    return len(acked)


def quit_workers(workers: list[Proc]) -> None:
    """Quit the payer workers (killed when they do not end within 30 s)."""
    for w in workers:
        try:
            w.send("quit")
            w.p.wait(30)
        except (OSError, subprocess.TimeoutExpired):
            w.p.kill()


def stop_payees(payees: list[subprocess.Popen[bytes]]) -> None:
    """Stop the payees (killed when they do not end within 30 s)."""
    for p in payees:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


def run(args: argparse.Namespace) -> None:
    check_options(args)
    work = Path(tempfile.mkdtemp(prefix="btcchannel-load-"))
    profile = Path(args.profile).resolve() if args.profile else None
    if profile is not None:
        profile.mkdir(parents=True, exist_ok=True)
    bitcoind = RegtestNode(datadir=work / "bitcoind")
    bitcoind.start()
    payees: list[subprocess.Popen[bytes]] = []
    workers: list[Proc] = []
    pg = None
    if args.store == "postgresql":
        from btcchannel.testing.postgres import start_postgres

        pg = start_postgres(work / "postgres")
    try:
        bitcoind.prepare(201)
        pg_url = pg.create_database("payee") if pg is not None else None
        config, urls = start_payees(args, work, bitcoind, pg_url, profile, payees)
        start_payers(args, work, bitcoind, urls, profile, workers)
        all_do(workers, "open")
        bitcoind.mine(1)
        all_do(workers, "wait_open")

        floor = fsync_floor(work / "payee0", min(args.duration, 3.0), pg_url)
        pids = {"payee": [p.pid for p in payees], "payers": [w.p.pid for w in workers], "bitcoind": [bitcoind.pid]}
        noop = rate(measured(workers, pids, f"noop {args.duration}", "GET /v1/info"))
        pay = measured(workers, pids, f"pay {args.duration}", "payment")
        payments = rate(pay)
        count = sum(a["count"] for a in pay)
        lat = sorted(x for a in pay for x in a["lat_ms"])
        channels = check_durable(args, work, config, workers)
        print(f"{channels} channels, {count} payments, every acknowledged amount stored")
        print(
            f"payments_per_s={payments:.0f} p50_ms={percentile(lat, 0.5):.2f} p99_ms={percentile(lat, 0.99):.2f} "
            f"noop_per_s={noop:.0f} fsync_floor_per_s={floor:.0f} channels={args.channels} store={args.store} "
            f"instances={args.instances} backup={args.backup}"
        )
    finally:
        quit_workers(workers)
        stop_payees(payees)
        bitcoind.stop()
        if pg is not None:
            pg.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--channels", type=int, default=100)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per measured phase")
    ap.add_argument("--payers", type=int, default=4, help="payer processes")
    ap.add_argument("--instances", type=int, default=1, help="payee processes on one store")
    ap.add_argument(
        "--store",
        choices=["sqlite", "postgresql"],
        default="sqlite",
        help="postgresql: a real server (PATH or pgserver), shared by the instances",
    )
    ap.add_argument(
        "--backup",
        choices=["none", "sync", "async"],
        default="none",
        help="run the payees with a backup of payee.db: sync (every payment before its"
        " acknowledgement) or async (background copies only)",
    )
    ap.add_argument("--profile", help="write cProfile files (payer workers, payees) to this folder")
    ap.add_argument(
        "--route",
        choices=["payments", "metered"],
        default="payments",
        help="metered: a seller's route, free and paid, in one run",
    )
    ap.add_argument(
        "--py-spy", help="--route metered: write py-spy's sampled stacks of the seller, per phase, to this folder"
    )
    ap.add_argument("--framework", choices=["aiohttp", "asgi"], default="aiohttp", help="--route metered: the seller's")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--seller", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        asyncio.run(Worker(json.loads(Path(args.worker).read_text())).serve())
    elif args.seller:
        run_seller(json.loads(Path(args.seller).read_text()))
    elif args.route == "metered":
        run_metered(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
