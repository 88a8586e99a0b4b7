"""The regtest demo: many paid downloads, two on-chain transactions, all read back from the node.

Run it from the project's virtual environment::

    python regtest/demo.py                       # 1,000 paid chunks over one channel
    python regtest/demo.py --payments 50 --mode postpay
    python regtest/demo.py --scenario all --payments 20

It starts its own regtest ``bitcoind`` (or uses ``--rpc-url``), mines past
height 200, creates the wallets ``payer`` and ``payee`` (and ``miner``),
funds the payer, runs the payee's service in-process on a free loopback port
selling a generated file chunk by chunk, opens a channel with
:class:`~btcchannel.payer.client.PayerClient`, downloads the file in paid chunks
with :class:`~btcchannel.payer.metered.MeteredPayer`, checks the bytes, asks the
payee to close, mines, and prints what the node shows: the channel's on-chain
transactions with their sizes and fees, what the payee received and the
payer's change. Its last line (default scenario) is::

    payments=<N> onchain_transactions=<M> channel_vbytes=<V> paid_sat=<S> payee_received_sat=<R> payer_change_sat=<C> close_fee_sat=<F>

and the figures are cross-checked (``R + C + F == deposit``, ``S == R + F``,
``M == 2``) before it is printed.

``--scenario`` tells the other stories, each ending with what the node shows
(and a ``scenario=<name> ...`` line):

- ``payer-timeout``: postpay; the payer takes chunks on credit and stops
  paying; the payee closes with the last correct payment;
- ``wrong-amount``: the payer pays the wrong amount for a chunk; the payee
  refuses it and closes with the last correct payment;
- ``payee-vanishes``: the payee's service stops; the payer cannot take the
  deposit back before expiry, then mines to expiry and refunds;
- ``fee-spike``: the close goes out at 1 sat/vB and miners ignore it; the
  payee's operator bumps it by RBF and the replacement confirms;
- ``all``: every scenario, then the default one.

The node and the payee's service are stopped whatever happens (errors,
Ctrl-C, SIGTERM). Nothing here sleeps to synchronise: every wait polls a
condition with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from aiohttp import web

from btcchannel.amounts import btc_to_sat, sat_to_btc
from btcchannel.core.channel import ChannelParams
from btcchannel.payer.client import PayerClient
from btcchannel.errors import ChannelError, NodeError, NotExpired
from btcchannel.payee.metered import add_file_route
from btcchannel.bitcoind.rpc import Node
from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.payee.closer import operator_bump
from btcchannel.payee.config import ServerConfig
from btcchannel.payee.http import SERVICE, serve
from btcchannel.payee.service import PayeeService
from btcchannel.payer.metered import MeteredPayer
from btcchannel.wire import HDR_AMOUNT, HDR_CHANNEL, HDR_SIGNATURE

PRICE_SAT = 100                 # per chunk (default scenario)
SCENARIO_PRICE_SAT = 1_000      # per chunk in the side stories: worth closing even at a spiked fee rate
CHUNK_SIZE = 1024               # bytes per chunk
CREDIT_UNITS = 10               # postpay: chunks served on credit before the payer must pay
SCENARIO_CREDIT_UNITS = 3       # payer-timeout: a smaller credit line
FEE_RATE_SAT_VB = 2.0           # funding, refund and close (default scenario)
LOW_FEE_RATE_SAT_VB = 1.0       # fee-spike: the close that gets stuck
SPIKE_FEE_RATE_SAT_VB = 10.0    # fee-spike: the operator's bump
DEFAULT_LIFETIME_BLOCKS = 144
SHORT_LIFETIME_BLOCKS = 8       # payee-vanishes: the payer waits this long for its refund
WAIT_S = 30.0                   # deadline of every condition the demo waits for
SCENARIOS = ("payer-timeout", "wrong-amount", "payee-vanishes", "fee-spike")

log = logging.getLogger("btcchannel.demo")


def fail(message: str) -> ChannelError:
    """A failed cross-check: the demo stops with this message and a non-zero status."""
    return ChannelError(f"cross-check failed: {message}")


def check(condition: bool, message: str) -> None:
    """Raise unless ``condition`` holds."""
    if not condition:
        raise fail(message)


async def until(
    predicate: Callable[[], Awaitable[Any]], what: str, timeout: float = WAIT_S, interval: float = 0.05
) -> Any:
    """Await ``predicate()`` until it is truthy; ``TimeoutError`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(interval)


# ----------------------------------------------------------------------------- the chain


@dataclass(frozen=True)
class TxView:
    """One transaction as the node shows it (amounts in satoshis)."""

    txid: str
    vsize: int
    fee_sat: int
    confirmations: int
    height: int | None
    outputs: list[tuple[int, str, str]]   # (value_sat, scriptPubKey hex, address or "")

    @property
    def fee_rate(self) -> float:
        return self.fee_sat / self.vsize


class Chain:
    """The node as the demo reads it: RPC through :class:`btcchannel.bitcoind.rpc.Node`."""

    def __init__(self, url: str, auth: tuple[str, str]) -> None:
        self.url = url
        self.auth = auth
        self.node = Node(url, auth=auth)
        self._wallet_nodes: list[Node] = []
        self._mining_address: str | None = None

    def wallet_node(self, wallet: str) -> Node:
        """A :class:`Node` bound to ``wallet`` (closed with the chain)."""
        node = Node(self.url, auth=self.auth, wallet=wallet)
        self._wallet_nodes.append(node)
        return node

    async def aclose(self) -> None:
        for node in [*self._wallet_nodes, self.node]:
            await node.aclose()

    async def rpc(self, method: str, *params: Any, wallet: str | None = None) -> Any:
        return await self.node.call(method, *params, wallet=wallet)

    async def tip(self) -> int:
        return await self.node.tip_height()

    async def ensure_wallet(self, name: str) -> None:
        """Create (or load) a descriptor wallet."""
        try:
            await self.rpc("createwallet", name)
        except NodeError as e:
            if e.rpc_code != -4:      # already exists
                raise
            try:
                await self.rpc("loadwallet", name)
            except NodeError as e2:
                if e2.rpc_code != -35:  # already loaded
                    raise

    async def new_address(self, wallet: str) -> str:
        return str(await self.rpc("getnewaddress", "", "bech32", wallet=wallet))

    async def mine(self, n: int) -> None:
        if self._mining_address is None:
            self._mining_address = await self.new_address("miner")
        await self.rpc("generatetoaddress", n, self._mining_address)

    async def balance_sat(self, wallet: str) -> int:
        return btc_to_sat(await self.rpc("getbalance", wallet=wallet))

    async def in_mempool(self, txid: str) -> bool:
        try:
            await self.rpc("getmempoolentry", txid)
        except NodeError:
            return False
        return True

    async def raw(self, txid: str) -> dict[str, Any] | None:
        return await self.node.get_transaction(txid)

    async def confirmations(self, txid: str) -> int:
        tx = await self.raw(txid)
        return int(tx.get("confirmations", 0)) if tx else -1

    async def view(self, txid: str) -> TxView:
        """Size, fee (inputs looked up through the txindex), outputs and confirmations of ``txid``."""
        tx = await self.raw(txid)
        if tx is None:
            raise fail(f"the node does not know transaction {txid}")
        inputs = 0
        for vin in tx["vin"]:
            prev = await self.raw(vin["txid"])
            if prev is None:
                raise fail(f"the node does not know {vin['txid']} (is -txindex on?)")
            inputs += btc_to_sat(prev["vout"][vin["vout"]]["value"])
        outputs = [
            (btc_to_sat(o["value"]), str(o["scriptPubKey"]["hex"]), str(o["scriptPubKey"].get("address", "")))
            for o in tx["vout"]
        ]
        height = None
        if tx.get("blockhash"):
            height = int((await self.rpc("getblockheader", tx["blockhash"]))["height"])
        return TxView(
            txid=txid, vsize=int(tx["vsize"]), fee_sat=inputs - sum(v for v, _, _ in outputs),
            confirmations=int(tx.get("confirmations", 0)), height=height, outputs=outputs,
        )

    async def spenders(self, txid: str, vout: int, from_height: int) -> list[str]:
        """Every confirmed transaction spending ``txid:vout`` (blocks ``from_height`` .. tip)."""
        found = []
        for height in range(from_height, await self.tip() + 1):
            block = await self.rpc("getblock", await self.rpc("getblockhash", height), 2)
            for tx in block["tx"]:
                if any(i.get("txid") == txid and i.get("vout") == vout for i in tx["vin"]):
                    found.append(str(tx["txid"]))
        return found

    async def is_mine(self, address: str, wallet: str) -> bool:
        return bool(address) and bool((await self.rpc("getaddressinfo", address, wallet=wallet))["ismine"])


# ----------------------------------------------------------------------------- the payee's service


@dataclass
class Payee:
    """The payee's service running in this process (``serve`` as a task)."""

    url: str
    app: web.Application
    config: ServerConfig
    task: asyncio.Task[None]

    @property
    def svc(self) -> PayeeService:
        return self.app[SERVICE]

    async def stop(self) -> None:
        if not self.task.done():
            self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def start_payee(config: ServerConfig, node: Node, file: Path) -> Payee:
    """Start ``serve`` selling ``file`` chunk by chunk; returns once it listens."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[str] = loop.create_future()
    apps: list[web.Application] = []

    def hook(app: web.Application) -> None:
        add_file_route(app, file, chunk_size=CHUNK_SIZE)
        apps.append(app)

    def on_ready(url: str) -> None:
        if not ready.done():
            ready.set_result(url)

    task = asyncio.ensure_future(serve(config, node, ready=on_ready, app_hook=hook))
    waiters: set[asyncio.Future[Any]] = {ready, task}
    done, _ = await asyncio.wait(waiters, timeout=WAIT_S, return_when=asyncio.FIRST_COMPLETED)
    if ready not in done:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task          # re-raises the reason it failed, if it did
        ready.cancel()
        raise TimeoutError("the payee's service did not start")
    return Payee(ready.result(), apps[0], config, task)


@contextlib.asynccontextmanager
async def running_payee(config: ServerConfig, node: Node, file: Path) -> AsyncIterator[Payee]:
    payee = await start_payee(config, node, file)
    try:
        yield payee
    finally:
        await payee.stop()


def payee_config(
    datadir: Path, payee_address: str, deposit_sat: int, price_sat: int = SCENARIO_PRICE_SAT, **kw: Any
) -> ServerConfig:
    """The payee's terms for the demo: short lifetimes, fast polling, fixed fee rates."""
    base: dict[str, Any] = dict(
        datadir=datadir, payee_address=payee_address, price_sat=price_sat, mode="prepay",
        credit_limit_sat=CREDIT_UNITS * price_sat, payment_timeout_s=60.0, poll_interval_s=0.05,
        min_lifetime_blocks=6, close_margin_blocks=2, min_deposit_sat=10_000,
        max_deposit_sat=max(100_000_000, deposit_sat), close_fee_rate_sat_vb=FEE_RATE_SAT_VB,
    )
    base.update(kw)
    return ServerConfig(**base)


def make_file(path: Path, chunks: int, seed: int) -> Path:
    """A file of ``chunks`` full chunks of reproducible random bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(random.Random(seed).randbytes(chunks * CHUNK_SIZE))
    return path


# ----------------------------------------------------------------------------- the payer


@contextlib.contextmanager
def progress(length: int, label: str) -> Iterator[Callable[[int], None]]:
    """A click progress bar when stdout is a terminal, else nothing."""
    if sys.stdout.isatty():
        with click.progressbar(length=length, label=label, file=sys.stdout, show_pos=True) as bar:
            yield bar.update
    else:
        yield lambda n: None


async def open_channel(client: PayerClient, chain: Chain, url: str, deposit_sat: int, lifetime: int) -> str:
    """Propose, fund from the payer's wallet, mine one block, wait until the payee says open."""
    cid = await client.open_channel(url, deposit_sat, lifetime, wait_open=False)
    await chain.mine(1)
    await client.wait_open(cid, timeout=WAIT_S)
    rec = client.store.get(cid)
    click.echo(
        f"channel {cid}: deposit {deposit_sat} sat, expiry height {rec.expiry_height}; "
        f"funding {rec.funding_txid}:{rec.funding_vout} confirmed"
    )
    return cid


async def download(payer: MeteredPayer, url: str, first: int, count: int) -> tuple[bytes, int]:
    """Fetch chunks ``first .. first+count-1`` paying for each; returns (bytes, signatures sent)."""
    store = payer.client.store
    signed_before = store.get(payer.channel_id).amount_sat
    signatures = 0
    parts = []
    with progress(count, "paid chunks") as advance:
        for i in range(first, first + count):
            status, body = await payer.fetch(f"{url}/v1/file/{i}")
            check(status == 200, f"chunk {i} answered HTTP {status}")
            parts.append(body)
            signed = store.get(payer.channel_id).amount_sat
            if signed != signed_before:
                signatures += 1
                signed_before = signed
            advance(1)
    return b"".join(parts), signatures


async def channel_state(client: PayerClient, cid: str) -> dict[str, Any]:
    return await client.status(cid)


async def wait_close_broadcast(client: PayerClient, chain: Chain, cid: str) -> dict[str, Any]:
    """Wait until the payee reports a close txid and the node has it in its mempool (or a block)."""

    async def broadcast() -> dict[str, Any] | None:
        obj = await client.status(cid)
        return obj if obj.get("close_txid") and obj["state"] in ("closing", "closed") else None

    obj: dict[str, Any] = await until(broadcast, "the payee to broadcast its close")
    txid = str(obj["close_txid"])
    await until(lambda: _known(chain, txid), f"close {txid} to reach the node")
    return obj


async def _known(chain: Chain, txid: str) -> bool:
    return await chain.in_mempool(txid) or await chain.confirmations(txid) >= 1


async def confirm_close(client: PayerClient, chain: Chain, cid: str, close_txid: str) -> dict[str, Any]:
    """Mine a block, wait for the close to confirm and for the payee to call the channel closed."""
    await chain.mine(1)
    await until(lambda: _confirmed(chain, close_txid), f"close {close_txid} to confirm")

    async def closed() -> dict[str, Any] | None:
        obj = await client.status(cid)
        return obj if obj["state"] == "closed" else None

    obj: dict[str, Any] = await until(closed, "the payee to mark the channel closed")
    return obj


async def _confirmed(chain: Chain, txid: str) -> bool:
    return await chain.confirmations(txid) >= 1


# ----------------------------------------------------------------------------- what the node shows


@dataclass(frozen=True)
class ChannelReport:
    """The channel as the node shows it: funding, the confirmed spend of the deposit, the split."""

    deposit_sat: int
    funding: TxView
    spend: TxView
    onchain_transactions: int
    payer_sat: int       # outputs of the spend paying the payer's wallet
    payee_sat: int       # outputs of the spend paying the payee's wallet

    @property
    def channel_vbytes(self) -> int:
        return self.funding.vsize + self.spend.vsize


async def read_channel(chain: Chain, client: PayerClient, cid: str, payee_wallet: str = "payee") -> ChannelReport:
    """Read the channel back from the node (getrawtransaction, txindex) and check who owns what."""
    rec = client.store.get(cid)
    assert rec.funding_txid is not None and rec.funding_vout is not None
    funding = await chain.view(rec.funding_txid)
    value, spk, _ = funding.outputs[rec.funding_vout]
    check(value == rec.deposit_sat, f"the funding output holds {value} sat, not the deposit {rec.deposit_sat}")
    check(spk == ChannelParams.from_json(rec.params).funding_script.hex(),
          "the funding output does not pay the channel's script")
    check(funding.height is not None, "the funding transaction is not confirmed")
    assert funding.height is not None
    spenders = await chain.spenders(rec.funding_txid, rec.funding_vout, funding.height)
    check(len(spenders) == 1, f"{len(spenders)} confirmed spends of the funding outpoint")
    spend = await chain.view(spenders[0])
    check(spend.fee_sat == rec.deposit_sat - sum(v for v, _, _ in spend.outputs), "spend fee arithmetic")
    payer_sat = payee_sat = 0
    for v, _, address in spend.outputs:
        if await chain.is_mine(address, "payer"):
            payer_sat += v
        elif await chain.is_mine(address, payee_wallet):
            payee_sat += v
        else:
            raise fail(f"an output of {spend.txid} pays {address}, neither the payer's nor the payee's wallet")
    return ChannelReport(rec.deposit_sat, funding, spend, 1 + len(spenders), payer_sat, payee_sat)


def show_tx(label: str, tx: TxView, what: str, where: str | None = None) -> None:
    if where is None:
        where = f"block {tx.height}" if tx.height is not None else "mempool"
    click.echo(
        f"  {label:<8} {tx.txid}  {tx.vsize:>4} vB  fee {tx.fee_sat:>6} sat "
        f"({tx.fee_rate:.2f} sat/vB)  {where}  {what}"
    )


# ----------------------------------------------------------------------------- the stories


@dataclass
class World:
    """What every story shares: the chain, the work folder, the payment count, the mode."""

    chain: Chain
    workdir: Path
    payments: int
    mode: str
    payee_node: Node
    payer_node: Node

    def scenario_units(self) -> int:
        """How many chunks a side story pays for before its twist."""
        return max(3, min(self.payments // 2, 10))


async def default_story(w: World) -> str:
    """N paid chunks over one channel, one close; returns the summary line."""
    n, chain = w.payments, w.chain
    deposit = n * PRICE_SAT + 100_000
    folder = w.workdir / "default"
    data = make_file(folder / "data.bin", n, seed=n)
    cfg = payee_config(folder / "payee", await chain.new_address("payee"), deposit, PRICE_SAT, mode=w.mode)
    click.echo(f"\n== default: {n} paid chunks over one channel ({w.mode}) ==")
    async with running_payee(cfg, w.payee_node, data) as payee, \
            PayerClient(folder / "payer", w.payer_node, fee_rate_sat_vb=FEE_RATE_SAT_VB) as client:
        terms = f"{PRICE_SAT} sat a chunk, {w.mode}"
        if w.mode == "postpay":
            terms += f", credit {cfg.credit_limit_sat} sat"
        click.echo(f"payee service {payee.url} sells {data.name} ({n} chunks of {CHUNK_SIZE} B), {terms}")
        cid = await open_channel(client, chain, payee.url, deposit, DEFAULT_LIFETIME_BLOCKS)
        payer = MeteredPayer(client, cid)
        started = time.monotonic()
        got, signatures = await download(payer, payee.url, 0, n)
        if w.mode == "postpay":
            before = client.store.get(cid).amount_sat
            await payer.settle()
            signatures += client.store.get(cid).amount_sat != before
        elapsed = time.monotonic() - started
        check(got == data.read_bytes(), "the downloaded bytes differ from the payee's file")
        click.echo(
            f"downloaded {len(got)} bytes in {n} paid chunks with {signatures} signed payments "
            f"in {elapsed:.2f} s ({n / elapsed:.0f} chunks/s); sha256 {hashlib.sha256(got).hexdigest()[:16]}... "
            f"matches the payee's file"
        )
        rec = client.store.get(cid)
        paid = rec.acked_sat
        check(paid == n * PRICE_SAT, f"paid {paid} sat, expected {n} x {PRICE_SAT}")
        obj = await client.close(cid)
        click.echo(f"close requested: the payee broadcast {obj.get('close_txid')}")
        obj = await wait_close_broadcast(client, chain, cid)
        check(obj["amount_sat"] == paid, f"the payee closes with {obj['amount_sat']} sat, not {paid}")
        obj = await confirm_close(client, chain, cid, obj["close_txid"])
        report = await read_channel(chain, client, cid)
    r, c, f = report.payee_sat, report.payer_sat, report.spend.fee_sat
    check(report.spend.txid == obj["close_txid"], "the confirmed spend is not the payee's close")
    check(report.onchain_transactions == 2, f"{report.onchain_transactions} on-chain transactions, not 2")
    check_close_split(report, deposit, paid)
    click.echo("\nWhat the node shows (getrawtransaction with the txindex):")
    show_tx("funding", report.funding, f"{deposit} sat into the channel")
    show_tx("close", report.spend, f"{r} sat to the payee's wallet, {c} sat back to the payer's wallet")
    click.echo(
        f"  {n} payments settled by {report.onchain_transactions} transactions of {report.channel_vbytes} vB "
        f"(one transaction per payment would be {n} transactions)"
    )
    click.echo(f"  paid {paid} sat = payee received {r} + close fee {f}")
    click.echo(f"  deposit {deposit} sat = payee {r} + payer change {c} + close fee {f}")
    click.echo(f"deposit_sat={deposit} price_sat={PRICE_SAT} funding_fee_sat={report.funding.fee_sat} mode={w.mode}")
    return (
        f"payments={n} onchain_transactions={report.onchain_transactions} channel_vbytes={report.channel_vbytes} "
        f"paid_sat={paid} payee_received_sat={r} payer_change_sat={c} close_fee_sat={f}"
    )


def scenario_line(name: str, outcome: str, deposit: int, paid: int, report: ChannelReport) -> str:
    return (
        f"scenario={name} outcome={outcome} deposit_sat={deposit} paid_sat={paid} "
        f"payee_received_sat={report.payee_sat} payer_change_sat={report.payer_sat} fee_sat={report.spend.fee_sat} "
        f"onchain_transactions={report.onchain_transactions}"
    )


def closed_story_end(name: str, report: ChannelReport, deposit: int, paid: int, note: str,
                     first: TxView | None = None) -> str:
    """Check a story's close against the node, show it, and return its ``scenario=`` line.

    ``first``: a close that the confirmed one replaced (shown instead of the funding).
    """
    check_close_split(report, deposit, paid)
    click.echo("What the node shows:")
    if first is None:
        show_tx("funding", report.funding, f"{deposit} sat into the channel")
    else:
        show_tx("close#1", first, "replaced: never confirmed", where="dropped")
    show_tx("close" if first is None else "close#2", report.spend,
            f"{report.payee_sat} sat to the payee, {report.payer_sat} sat back to the payer")
    click.echo(f"  {note}")
    return scenario_line(name, "closed", deposit, paid, report)


def check_close_split(report: ChannelReport, deposit: int, paid: int) -> None:
    r, c, f = report.payee_sat, report.payer_sat, report.spend.fee_sat
    check(r + c + f == deposit, f"payee {r} + payer {c} + fee {f} != deposit {deposit}")
    check(r + f == paid, f"payee {r} + fee {f} != last correct payment {paid}")
    check(c == deposit - paid, f"payer change {c} != deposit {deposit} - {paid}")


async def payer_timeout_story(w: World) -> str:
    """Postpay: chunks on credit, then the payer goes silent; the payee closes with the last payment."""
    k, chain = w.scenario_units(), w.chain
    deposit = 50_000
    folder = w.workdir / "payer-timeout"
    data = make_file(folder / "data.bin", k + SCENARIO_CREDIT_UNITS, seed=1)
    timeout_s = 1.0
    cfg = payee_config(
        folder / "payee", await chain.new_address("payee"), deposit, mode="postpay",
        credit_limit_sat=SCENARIO_CREDIT_UNITS * SCENARIO_PRICE_SAT, payment_timeout_s=timeout_s,
    )
    click.echo(f"\n== payer-timeout: postpay, the payer stops paying ==")
    async with running_payee(cfg, w.payee_node, data) as payee, \
            PayerClient(folder / "payer", w.payer_node, fee_rate_sat_vb=FEE_RATE_SAT_VB) as client:
        click.echo(f"payee sells chunks at {SCENARIO_PRICE_SAT} sat, postpay, credit {cfg.credit_limit_sat} sat, "
                   f"payment timeout {timeout_s:.0f} s")
        cid = await open_channel(client, chain, payee.url, deposit, DEFAULT_LIFETIME_BLOCKS)
        payer = MeteredPayer(client, cid)
        await download(payer, payee.url, 0, k)
        paid = await payer.settle()
        check(paid == k * SCENARIO_PRICE_SAT, f"settled {paid}, expected {k * SCENARIO_PRICE_SAT}")
        click.echo(f"{k} chunks served and paid: {paid} sat")
        unpaid = SCENARIO_CREDIT_UNITS - 1
        await download(payer, payee.url, k, unpaid)   # within the credit line: served, not paid
        obj = await client.status(cid)
        click.echo(f"{unpaid} more chunks served on credit (owed {obj['owed_sat']} sat, paid {obj['amount_sat']} sat); "
                   f"the payer stops paying")
        obj = await wait_close_broadcast(client, chain, cid)
        check(obj["end_reason"] == "payment_timeout", f"end reason {obj['end_reason']}")
        check(obj["amount_sat"] == paid, f"closing with {obj['amount_sat']}, not the last correct {paid}")
        click.echo(f"after {timeout_s:.0f} s unpaid the payee closes (end_reason={obj['end_reason']}) "
                   f"with the last correct payment, {paid} sat: {obj['close_txid']}")
        await confirm_close(client, chain, cid, obj["close_txid"])
        report = await read_channel(chain, client, cid)
    return closed_story_end(
        "payer-timeout", report, deposit, paid,
        f"the {unpaid * SCENARIO_PRICE_SAT} sat served on credit were never paid: the payee's risk is its credit line")


async def wrong_amount_story(w: World) -> str:
    """Prepay: the payer pays half price for a chunk; refused, and the channel closes."""
    k, chain = w.scenario_units(), w.chain
    deposit = 50_000
    folder = w.workdir / "wrong-amount"
    data = make_file(folder / "data.bin", k + 1, seed=2)
    cfg = payee_config(folder / "payee", await chain.new_address("payee"), deposit)
    click.echo("\n== wrong-amount: the payer pays the wrong amount for a chunk ==")
    async with running_payee(cfg, w.payee_node, data) as payee, \
            PayerClient(folder / "payer", w.payer_node, fee_rate_sat_vb=FEE_RATE_SAT_VB) as client:
        cid = await open_channel(client, chain, payee.url, deposit, DEFAULT_LIFETIME_BLOCKS)
        await download(MeteredPayer(client, cid), payee.url, 0, k)
        paid = client.store.get(cid).acked_sat
        check(paid == k * SCENARIO_PRICE_SAT, f"paid {paid}, expected {k * SCENARIO_PRICE_SAT}")
        wrong = paid + SCENARIO_PRICE_SAT // 2
        payment = await client.sign_next(cid, wrong)
        headers = {HDR_CHANNEL: cid, HDR_AMOUNT: str(wrong), HDR_SIGNATURE: payment.signature.hex()}
        async with client.session.get(f"{payee.url}/v1/file/{k}", headers=headers) as resp:
            status, body = resp.status, await resp.json(content_type=None)
        code = body.get("error", {}).get("code") if isinstance(body, dict) else None
        check(status == 400 and code == "wrong_amount", f"the wrong payment was answered {status} {body}")
        click.echo(f"{k} chunks paid ({paid} sat); chunk {k} paid with a signed total of {wrong} sat "
                   f"instead of {paid + SCENARIO_PRICE_SAT}: HTTP {status} {code}")
        obj = await wait_close_broadcast(client, chain, cid)
        check(obj["end_reason"] == "wrong_amount", f"end reason {obj['end_reason']}")
        check(obj["amount_sat"] == paid, f"closing with {obj['amount_sat']}, not the last correct {paid}")
        click.echo(f"the payee closes with the last correct payment, {paid} sat: {obj['close_txid']}")
        await confirm_close(client, chain, cid, obj["close_txid"])
        report = await read_channel(chain, client, cid)
    return closed_story_end("wrong-amount", report, deposit, paid, f"the {wrong} sat payment was never used")


async def payee_vanishes_story(w: World) -> str:
    """The payee's service disappears; the payer mines to expiry and takes the deposit back."""
    k, chain = w.scenario_units(), w.chain
    deposit = 50_000
    folder = w.workdir / "payee-vanishes"
    data = make_file(folder / "data.bin", k, seed=3)
    cfg = payee_config(folder / "payee", await chain.new_address("payee"), deposit)
    click.echo("\n== payee-vanishes: the payee's service stops; the payer refunds after expiry ==")
    async with PayerClient(folder / "payer", w.payer_node, fee_rate_sat_vb=FEE_RATE_SAT_VB) as client:
        async with running_payee(cfg, w.payee_node, data) as payee:
            cid = await open_channel(client, chain, payee.url, deposit, SHORT_LIFETIME_BLOCKS)
            await download(MeteredPayer(client, cid), payee.url, 0, k)
            paid = client.store.get(cid).acked_sat
            click.echo(f"{k} chunks paid ({paid} sat); now the payee's service stops and never closes")
        expiry = client.store.get(cid).expiry_height
        try:
            await client.refund(cid)
        except NotExpired as e:
            click.echo(f"refund before expiry refused: {e.code} ({e})")
        else:
            raise fail("a refund before expiry was accepted")
        tip = await chain.tip()
        await chain.mine(expiry - tip)
        click.echo(f"mined {expiry - tip} blocks to the expiry height {expiry}")
        refund_txid = await client.refund(cid)
        await until(lambda: _known(chain, refund_txid), f"refund {refund_txid} to reach the node")
        await chain.mine(1)
        await until(lambda: _confirmed(chain, refund_txid), f"refund {refund_txid} to confirm")
        click.echo(f"the payer's refund {refund_txid} confirmed")
        report = await read_channel(chain, client, cid)
    r, c, f = report.payee_sat, report.payer_sat, report.spend.fee_sat
    check(report.spend.txid == refund_txid, "the confirmed spend is not the payer's refund")
    check(r == 0 and c + f == deposit, f"the refund pays payee {r}, payer {c}, fee {f} of {deposit}")
    click.echo("What the node shows:")
    show_tx("funding", report.funding, f"{deposit} sat into the channel")
    show_tx("refund", report.spend, f"{c} sat back to the payer's wallet: the deposit less the fee")
    click.echo(f"  the payee never closed, so its {paid} sat of payments are worthless now")
    return scenario_line("payee-vanishes", "refunded", deposit, paid, report)


async def fee_spike_story(w: World) -> str:
    """The close goes out at 1 sat/vB and gets stuck; the operator replaces it by RBF."""
    k, chain = w.scenario_units(), w.chain
    deposit = 50_000
    folder = w.workdir / "fee-spike"
    data = make_file(folder / "data.bin", k, seed=4)
    cfg = payee_config(
        folder / "payee", await chain.new_address("payee"), deposit,
        close_fee_rate_sat_vb=LOW_FEE_RATE_SAT_VB, bump_after_blocks=1000,  # the operator bumps, not the watcher
    )
    click.echo("\n== fee-spike: the close is stuck at a low fee and replaced by RBF ==")
    async with running_payee(cfg, w.payee_node, data) as payee, \
            PayerClient(folder / "payer", w.payer_node, fee_rate_sat_vb=FEE_RATE_SAT_VB) as client:
        cid = await open_channel(client, chain, payee.url, deposit, DEFAULT_LIFETIME_BLOCKS)
        await download(MeteredPayer(client, cid), payee.url, 0, k)
        paid = client.store.get(cid).acked_sat
        await client.close(cid)
        obj = await wait_close_broadcast(client, chain, cid)
        first = str(obj["close_txid"])
        low = await chain.view(first)
        click.echo(f"{k} chunks paid ({paid} sat); close {first} broadcast at {low.fee_rate:.2f} sat/vB")
        # the spike: miners ignore the low-fee close (simulated by lowering its priority in this node's mempool)
        await chain.rpc("prioritisetransaction", first, 0, -1_000_000)
        await chain.mine(1)
        check(await chain.in_mempool(first) and await chain.confirmations(first) == 0,
              "the low-fee close was mined despite the spike")
        click.echo("a block was mined without it: the close is stuck in the mempool")
        obj = await operator_bump(cfg, w.payee_node, cid, SPIKE_FEE_RATE_SAT_VB)
        second = str(obj["close_txid"])
        check(second != first, "the bump did not replace the close")
        await until(lambda: chain.in_mempool(second), f"replacement {second} in the mempool")
        check(not await chain.in_mempool(first), "the replaced close is still in the mempool")
        click.echo(f"operator_bump at {SPIKE_FEE_RATE_SAT_VB:.0f} sat/vB: {second} replaced it (RBF)")
        await confirm_close(client, chain, cid, second)
        check(await chain.confirmations(first) <= 0, "the replaced close confirmed")
        report = await read_channel(chain, client, cid)
    check(report.spend.txid == second, "the confirmed spend is not the replacement")
    return closed_story_end(
        "fee-spike", report, deposit, paid,
        f"the payee paid the higher fee ({report.spend.fee_sat - low.fee_sat} sat more); "
        f"the payer's change is unchanged: its signature never committed to the fee", first=low)


STORIES: tuple[tuple[str, Callable[[World], Awaitable[str]]], ...] = (
    ("payer-timeout", payer_timeout_story),
    ("wrong-amount", wrong_amount_story),
    ("payee-vanishes", payee_vanishes_story),
    ("fee-spike", fee_spike_story),
)


# ----------------------------------------------------------------------------- setup and main


async def prepare_chain(chain: Chain, payer_sat: int) -> None:
    """Check the node, mine past 200, create the wallets and fund the payer."""
    info = await chain.rpc("getblockchaininfo")
    if info["chain"] != "regtest":
        raise ChannelError(f"the demo mines blocks: it needs a regtest node, not {info['chain']}")
    indexes = await chain.rpc("getindexinfo")
    if "txindex" not in indexes:
        raise ChannelError("the demo reads transactions back from the node: run it with -txindex=1")
    await until(lambda: _txindex_synced(chain), "the txindex to sync")
    for wallet in ("miner", "payer", "payee"):
        await chain.ensure_wallet(wallet)
    tip = await chain.tip()
    if tip < 201:
        await chain.mine(201 - tip)
    if await chain.balance_sat("miner") < payer_sat + 100_000_000:
        await chain.mine(101)
    txid = str(await chain.rpc("sendtoaddress", await chain.new_address("payer"), sat_to_btc(payer_sat),
                               wallet="miner"))
    await until(lambda: chain.in_mempool(txid), "the payer's funding to reach the mempool")
    await chain.mine(1)
    click.echo(f"height {await chain.tip()}; wallets miner, payer, payee; the payer holds "
               f"{await chain.balance_sat('payer')} sat")


async def _txindex_synced(chain: Chain) -> bool:
    return bool((await chain.rpc("getindexinfo"))["txindex"]["synced"])


async def run(url: str, auth: tuple[str, str], workdir: Path, payments: int, mode: str, scenario: str) -> None:
    """Everything after the node is up."""
    loop = asyncio.get_running_loop()
    me = asyncio.current_task()
    if me is not None:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGTERM, me.cancel)
    chain = Chain(url, auth)
    try:
        stories = list(SCENARIOS) if scenario == "all" else [] if scenario == "default" else [scenario]
        deposits = (payments * PRICE_SAT + 100_000 if scenario in ("all", "default") else 0) + 50_000 * len(stories)
        await prepare_chain(chain, deposits + 1_000_000)
        world = World(chain, workdir, payments, mode, chain.wallet_node("payee"), chain.wallet_node("payer"))
        for name, story in STORIES:
            if name in stories:
                click.echo(await story(world))
        if scenario in ("all", "default"):
            click.echo(await default_story(world))
    finally:
        await chain.aclose()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGTERM)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--payments", type=click.IntRange(5, 1_000_000), default=1000, show_default=True,
              help="Chunks of the file to buy at 100 sat each, one payment each in prepay mode "
                   "(at least 5: fewer would not pay for their own close).")
@click.option("--mode", type=click.Choice(["prepay", "postpay"]), default="prepay", show_default=True,
              help="Metered mode of the default scenario.")
@click.option("--scenario", type=click.Choice(["default", *SCENARIOS, "all"]), default="default",
              show_default=True, help="Which story to tell.")
@click.option("--rpc-url", help="Use this regtest node (with -txindex=1) instead of starting one.")
@click.option("--rpc-user", help="RPC user of --rpc-url.")
@click.option("--rpc-password", help="RPC password of --rpc-url.")
@click.option("-v", "--verbose", is_flag=True, help="Log what the payee's service and watcher do.")
def main(payments: int, mode: str, scenario: str, rpc_url: str | None, rpc_user: str | None,
         rpc_password: str | None, verbose: bool) -> None:
    """Pay for a file chunk by chunk over one payment channel on regtest; show what the node shows.

    Example: python regtest/demo.py --payments 1000 --scenario all
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.ERROR,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if rpc_url and (rpc_user is None or rpc_password is None):
        raise click.UsageError("--rpc-url needs --rpc-user and --rpc-password")
    workdir = Path(tempfile.mkdtemp(prefix="btcchannel-demo-"))
    node: RegtestNode | None = None
    started = time.monotonic()
    try:
        if rpc_url:
            assert rpc_user is not None and rpc_password is not None
            url, auth = rpc_url.rstrip("/"), (rpc_user, rpc_password)
        else:
            node = RegtestNode(datadir=workdir / "bitcoind")
            node.start()
            click.echo(f"started regtest bitcoind ({node.binary.version}) on {node.rpc_url}")
            url, auth = node.rpc_url, (node.rpc_user, node.rpc_password)
        asyncio.run(run(url, auth, workdir, payments, mode, scenario))
    except (KeyboardInterrupt, asyncio.CancelledError):
        click.echo("interrupted: stopping the payee's service and the node", err=True)
        sys.exit(130)
    except (ChannelError, TimeoutError) as e:
        code = getattr(e, "code", "timeout")
        click.echo(f"demo failed: {code}: {e}", err=True)
        sys.exit(1)
    finally:
        if node is not None:
            node.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    click.echo(f"(demo took {time.monotonic() - started:.1f} s)", err=True)


if __name__ == "__main__":
    main()
