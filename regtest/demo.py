"""The regtest demo: many paid downloads, two on-chain transactions, all read back from the node.

    python regtest/demo.py [--payments 1000] [--mode prepay|postpay] [--scenario default|all|...]

A payee sells a generated file chunk by chunk; the payer opens a channel (``PayerClient``), buys
every chunk (``MeteredPayer``), closes, and the demo prints what the node shows, cross-checked
(``R + C + F == deposit``, ``S == R + F``, ``M == 2``). Its last line::

    payments=<signed> units=<chunks> onchain_transactions=<M> channel_vbytes=<V> paid_sat=<S> payee_received_sat=<R>
    payer_change_sat=<C> close_fee_sat=<F>

``--scenario`` tells other stories (``payer-timeout``, ``wrong-amount``, ``payee-vanishes``,
``fee-spike``, ``conflict``; ``all``: each, then the default), each ending with a ``scenario=<name> ...`` line.
The node view, the payee's service and every wait come from :mod:`btcchannel.testing`.
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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.bitcoind.rpc import Node
from btcchannel.core.params import ChannelParams
from btcchannel.core.tx import build_refund_tx, tx_hex
from btcchannel.errors import ChannelError, NodeError, NotExpired
from btcchannel.payee.closer import operator_bump, operator_close
from btcchannel.payee.config import ServerConfig
from btcchannel.payee.metered import add_file_route
from btcchannel.payer.client import PayerClient
from btcchannel.payer.metered import MeteredPayer
from btcchannel.testing import (
    Chain,
    ChannelView,
    RunningPayee,
    TxView,
    confirm_close,
    running_payee,
    wait_close_broadcast,
    wait_until_async,
)
from btcchannel.testing import open_channel as open_funded_channel
from btcchannel.testing.story import check, download, read_channel, split
from btcchannel.wire import HDR_AMOUNT, HDR_AUTH, HDR_CHANNEL, HDR_SIGNATURE

PRICE_SAT = 100  # per chunk (default scenario)
SCENARIO_PRICE_SAT = 1_000  # per chunk in the side stories: worth closing even at a spiked fee rate
CHUNK_SIZE = 1024  # bytes per chunk
CREDIT_UNITS = 10  # postpay: chunks served on credit before the payer must pay
SCENARIO_CREDIT_UNITS = 3  # payer-timeout: a smaller credit line
FEE_RATE_SAT_VB = 2.0  # funding, refund and close (default scenario)
LOW_FEE_RATE_SAT_VB = 1.0  # fee-spike: the close that gets stuck
SPIKE_FEE_RATE_SAT_VB = 10.0  # fee-spike: the operator's bump
DEFAULT_LIFETIME_BLOCKS = 144
SHORT_LIFETIME_BLOCKS = 8  # payee-vanishes: the payer waits this long for its refund
WAIT_S = 30.0  # deadline of every condition the demo waits for


async def open_channel(client: PayerClient, chain: Chain, url: str, deposit_sat: int, lifetime: int) -> str:
    """Propose, fund from the payer's wallet, mine one block, wait until the payee says open."""
    cid = await open_funded_channel(client, chain, url, deposit_sat, lifetime, timeout=WAIT_S)
    rec = client.store.get(cid)
    click.echo(
        f"channel {cid}: deposit {deposit_sat} sat, expiry height {rec.expiry_height}; "
        f"funding {rec.funding_txid}:{rec.funding_vout} confirmed"
    )
    return cid


def show_tx(label: str, tx: TxView, what: str, where: str | None = None) -> None:
    where = where or (f"block {tx.height}" if tx.height is not None else "mempool")
    click.echo(
        f"  {label:<8} {tx.txid}  {tx.vsize:>4} vB  fee {tx.fee_sat:>6} sat ({tx.fee_rate:.2f} sat/vB)  {where}  {what}"
    )


@dataclass
class World:
    """What every story shares: the chain, the work folder, the payment count, the mode."""

    chain: Chain
    workdir: Path
    payments: int
    mode: str
    payee_node: Node
    payer_node: Node
    units: int  # how many chunks a side story pays for before its twist

    async def setup(
        self,
        name: str,
        header: str,
        chunks: int,
        seed: int,
        deposit: int,
        price_sat: int = SCENARIO_PRICE_SAT,
        **kw: Any,
    ) -> tuple[Path, ServerConfig]:
        """Story ``name``'s file (``chunks`` chunks of random bytes) and the payee's terms (short
        lifetimes, fast polling, fixed fee rates, closes final at 1 confirmation, closes to a fresh
        ``payee`` address); shows ``header``."""
        data = self.workdir / name / "data.bin"
        data.parent.mkdir(parents=True, exist_ok=True)
        data.write_bytes(random.Random(seed).randbytes(chunks * CHUNK_SIZE))
        terms: dict[str, Any] = dict(
            payee_address=await self.chain.new_address("payee"),
            price_sat=price_sat,
            mode="prepay",
            credit_limit_sat=CREDIT_UNITS * price_sat,
            payment_timeout_s=60.0,
            poll_interval_s=0.05,
            min_lifetime_blocks=6,
            close_margin_blocks=2,
            min_deposit_sat=10_000,
            max_deposit_sat=max(100_000_000, deposit),
            close_fee_rate_sat_vb=FEE_RATE_SAT_VB,
            final_confirmations=1,
        )
        click.echo(header)
        return data, ServerConfig(datadir=self.workdir / name / "payee", **{**terms, **kw})

    def payee(self, cfg: ServerConfig, data: Path) -> contextlib.AbstractAsyncContextManager[RunningPayee]:
        """The payee's service selling ``data`` chunk by chunk (stopped when the block ends)."""
        return running_payee(cfg, self.payee_node, lambda app: add_file_route(app, data, chunk_size=CHUNK_SIZE))

    def payer(self, name: str) -> PayerClient:
        return PayerClient(self.workdir / name / "payer", self.payer_node, fee_rate_sat_vb=FEE_RATE_SAT_VB)


async def default_story(w: World) -> str:
    """N paid chunks over one channel, one close; returns the summary line."""
    n, chain, deposit = w.payments, w.chain, w.payments * PRICE_SAT + 100_000
    data, cfg = await w.setup(
        "default",
        f"\n== default: {n} paid chunks over one channel ({w.mode}) ==",
        n,
        n,
        deposit,
        PRICE_SAT,
        mode=w.mode,
    )
    async with w.payee(cfg, data) as payee, w.payer("default") as client:
        terms = f"{PRICE_SAT} sat a chunk, {w.mode}" + (f", credit {cfg.credit_limit_sat} sat" * (w.mode == "postpay"))
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
        paid = client.store.get(cid).acked_sat
        check(paid == n * PRICE_SAT, f"paid {paid} sat, expected {n} x {PRICE_SAT}")
        obj = await client.close(cid)
        click.echo(f"close requested: the payee broadcast {obj.get('close_txid')}")
        obj = await wait_close_broadcast(client, chain, cid, timeout=WAIT_S)
        check(obj["amount_sat"] == paid, f"the payee closes with {obj['amount_sat']} sat, not {paid}")
        obj = await confirm_close(client, chain, cid, obj["close_txid"], timeout=WAIT_S)
        report = await read_channel(chain, client, cid)
    r, c, f, spend = split(report, deposit, paid)
    check(spend.txid == obj["close_txid"], "the confirmed spend is not the payee's close")
    check(report.onchain_transactions == 2, f"{report.onchain_transactions} on-chain transactions, not 2")
    click.echo("\nWhat the node shows (getrawtransaction with the txindex):")
    show_tx("funding", report.funding, f"{deposit} sat into the channel")
    show_tx("close", spend, f"{r} sat to the payee's wallet, {c} sat back to the payer's wallet")
    click.echo(
        f"  {n} payments settled by {report.onchain_transactions} transactions of {report.channel_vbytes} vB "
        f"(one transaction per payment would be {n} transactions)"
    )
    click.echo(f"  paid {paid} sat = payee received {r} + close fee {f}")
    click.echo(f"  deposit {deposit} sat = payee {r} + payer change {c} + close fee {f}")
    click.echo(f"deposit_sat={deposit} price_sat={PRICE_SAT} funding_fee_sat={report.funding.fee_sat} mode={w.mode}")
    return (
        f"payments={signatures} units={n} onchain_transactions={report.onchain_transactions} "
        f"channel_vbytes={report.channel_vbytes} paid_sat={paid} payee_received_sat={r} payer_change_sat={c} "
        f"close_fee_sat={f}"
    )


def scenario_line(name: str, outcome: str, deposit: int, paid: int, report: ChannelView) -> str:
    r, c, f, _ = split(report)
    return (
        f"scenario={name} outcome={outcome} deposit_sat={deposit} paid_sat={paid} "
        f"payee_received_sat={r} payer_change_sat={c} fee_sat={f} "
        f"onchain_transactions={report.onchain_transactions}"
    )


def closed_story_end(
    name: str, report: ChannelView, deposit: int, paid: int, note: str, first: TxView | None = None
) -> str:
    """Check a story's close against the node, show it (``first``: a close the confirmed one
    replaced, shown instead of the funding) and return its ``scenario=`` line."""
    r, c, _, spend = split(report, deposit, paid)
    click.echo("What the node shows:")
    if first is None:
        show_tx("funding", report.funding, f"{deposit} sat into the channel")
    else:
        show_tx("close#1", first, "replaced: never confirmed", where="dropped")
    show_tx("close" if first is None else "close#2", spend, f"{r} sat to the payee, {c} sat back to the payer")
    click.echo(f"  {note}")
    return scenario_line(name, "closed", deposit, paid, report)


async def payer_timeout_story(w: World) -> str:
    """Postpay: chunks on credit, then the payer goes silent; the payee closes with the last payment."""
    k, chain, deposit, timeout_s = w.units, w.chain, 50_000, 1.0
    data, cfg = await w.setup(
        "payer-timeout",
        "\n== payer-timeout: postpay, the payer stops paying ==",
        k + SCENARIO_CREDIT_UNITS,
        1,
        deposit,
        mode="postpay",
        payment_timeout_s=timeout_s,
        credit_limit_sat=SCENARIO_CREDIT_UNITS * SCENARIO_PRICE_SAT,
    )
    async with w.payee(cfg, data) as payee, w.payer("payer-timeout") as client:
        click.echo(
            f"payee sells chunks at {SCENARIO_PRICE_SAT} sat, postpay, credit {cfg.credit_limit_sat} sat, "
            f"payment timeout {timeout_s:.0f} s"
        )
        cid = await open_channel(client, chain, payee.url, deposit, DEFAULT_LIFETIME_BLOCKS)
        payer = MeteredPayer(client, cid)
        await download(payer, payee.url, 0, k)
        paid = await payer.settle()
        check(paid == k * SCENARIO_PRICE_SAT, f"settled {paid}, expected {k * SCENARIO_PRICE_SAT}")
        click.echo(f"{k} chunks served and paid: {paid} sat")
        unpaid = SCENARIO_CREDIT_UNITS - 1
        await download(payer, payee.url, k, unpaid)  # within the credit line: served, not paid
        await payer.aclose()  # the payer goes silent: no more timed settlement either
        obj = await client.status(cid)
        click.echo(
            f"{unpaid} more chunks served on credit (owed {obj['owed_sat']} sat, paid {obj['amount_sat']} sat); "
            f"the payer stops paying"
        )
        obj = await wait_close_broadcast(client, chain, cid, timeout=WAIT_S)
        check(obj["end_reason"] == "payment_timeout", f"end reason {obj['end_reason']}")
        check(obj["amount_sat"] == paid, f"closing with {obj['amount_sat']}, not the last correct {paid}")
        click.echo(
            f"after {timeout_s:.0f} s unpaid the payee closes (end_reason={obj['end_reason']}) "
            f"with the last correct payment, {paid} sat: {obj['close_txid']}"
        )
        await confirm_close(client, chain, cid, obj["close_txid"], timeout=WAIT_S)
        report = await read_channel(chain, client, cid)
    return closed_story_end(
        "payer-timeout",
        report,
        deposit,
        paid,
        f"the {unpaid * SCENARIO_PRICE_SAT} sat served on credit were never paid: the payee's risk is its credit line",
    )


async def wrong_amount_story(w: World) -> str:
    """Prepay: the payer pays half price for a chunk; refused, and the channel closes."""
    k, chain, deposit = w.units, w.chain, 50_000
    data, cfg = await w.setup(
        "wrong-amount", "\n== wrong-amount: the payer pays the wrong amount for a chunk ==", k + 1, 2, deposit
    )
    async with w.payee(cfg, data) as payee, w.payer("wrong-amount") as client:
        cid = await open_channel(client, chain, payee.url, deposit, DEFAULT_LIFETIME_BLOCKS)
        await download(MeteredPayer(client, cid), payee.url, 0, k)
        paid = client.store.get(cid).acked_sat
        check(paid == k * SCENARIO_PRICE_SAT, f"paid {paid}, expected {k * SCENARIO_PRICE_SAT}")
        wrong = paid + SCENARIO_PRICE_SAT // 2
        payment = await client.sign_next(cid, wrong, units_ahead=1)
        headers = {HDR_CHANNEL: cid, HDR_AMOUNT: str(wrong), HDR_SIGNATURE: payment.signature.hex()}
        headers[HDR_AUTH] = client.request_auth(cid, "GET", f"{payee.url}/v1/file/{k}", None, headers)
        async with client.session.get(f"{payee.url}/v1/file/{k}", headers=headers) as resp:
            status, body = resp.status, await resp.json(content_type=None)
        code = body.get("error", {}).get("code") if isinstance(body, dict) else None
        check(status == 400 and code == "wrong_amount", f"the wrong payment was answered {status} {body}")
        click.echo(
            f"{k} chunks paid ({paid} sat); chunk {k} paid with a signed total of {wrong} sat "
            f"instead of {paid + SCENARIO_PRICE_SAT}: HTTP {status} {code}"
        )
        obj = await wait_close_broadcast(client, chain, cid, timeout=WAIT_S)
        check(obj["end_reason"] == "wrong_amount", f"end reason {obj['end_reason']}")
        check(obj["amount_sat"] == paid, f"closing with {obj['amount_sat']}, not the last correct {paid}")
        click.echo(f"the payee closes with the last correct payment, {paid} sat: {obj['close_txid']}")
        await confirm_close(client, chain, cid, obj["close_txid"], timeout=WAIT_S)
        report = await read_channel(chain, client, cid)
    return closed_story_end("wrong-amount", report, deposit, paid, f"the {wrong} sat payment was never used")


async def payee_vanishes_story(w: World) -> str:
    """The payee's service disappears; the payer mines to expiry and takes the deposit back."""
    k, chain, deposit = w.units, w.chain, 50_000
    data, cfg = await w.setup(
        "payee-vanishes",
        "\n== payee-vanishes: the payee's service stops; the payer refunds after expiry ==",
        k,
        3,
        deposit,
    )
    async with w.payer("payee-vanishes") as client:
        async with w.payee(cfg, data) as payee:
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
            check(False, "a refund before expiry was accepted")
        tip = await chain.tip()
        await chain.mine(expiry - tip)
        click.echo(f"mined {expiry - tip} blocks to the expiry height {expiry}")
        refund_txid = await client.refund(cid)
        await chain.wait_known(refund_txid, "refund")
        await chain.mine(1)
        await chain.wait_confirmed(refund_txid, "refund")
        click.echo(f"the payer's refund {refund_txid} confirmed")
        report = await read_channel(chain, client, cid)
    r, c, f, spend = split(report)
    check(spend.txid == refund_txid, "the confirmed spend is not the payer's refund")
    check(r == 0 and c + f == deposit, f"the refund pays payee {r}, payer {c}, fee {f} of {deposit}")
    click.echo("What the node shows:")
    show_tx("funding", report.funding, f"{deposit} sat into the channel")
    show_tx("refund", spend, f"{c} sat back to the payer's wallet: the deposit less the fee")
    click.echo(f"  the payee never closed, so its {paid} sat of payments are worthless now")
    return scenario_line("payee-vanishes", "refunded", deposit, paid, report)


async def fee_spike_story(w: World) -> str:
    """The close goes out at 1 sat/vB and gets stuck; the operator replaces it by RBF."""
    k, chain, deposit = w.units, w.chain, 50_000
    data, cfg = await w.setup(
        "fee-spike",
        "\n== fee-spike: the close is stuck at a low fee and replaced by RBF ==",
        k,
        4,
        deposit,
        close_fee_rate_sat_vb=LOW_FEE_RATE_SAT_VB,
        bump_after_blocks=1000,
    )  # the operator bumps, not the watcher
    async with w.payee(cfg, data) as payee, w.payer("fee-spike") as client:
        cid = await open_channel(client, chain, payee.url, deposit, DEFAULT_LIFETIME_BLOCKS)
        await download(MeteredPayer(client, cid), payee.url, 0, k)
        paid = client.store.get(cid).acked_sat
        await client.close(cid)
        obj = await wait_close_broadcast(client, chain, cid, timeout=WAIT_S)
        first = str(obj["close_txid"])
        low = await chain.view(first)
        click.echo(f"{k} chunks paid ({paid} sat); close {first} broadcast at {low.fee_rate:.2f} sat/vB")
        # the spike: miners ignore the low-fee close (simulated by lowering its priority in this node's mempool)
        await chain.rpc("prioritisetransaction", first, 0, -1_000_000)
        await chain.mine(1)
        check(
            await chain.in_mempool(first) and await chain.confirmations(first) == 0,
            "the low-fee close was mined despite the spike",
        )
        click.echo("a block was mined without it: the close is stuck in the mempool")
        obj = await operator_bump(cfg, w.payee_node, cid, SPIKE_FEE_RATE_SAT_VB)
        second = str(obj["close_txid"])
        check(second != first, "the bump did not replace the close")
        await wait_until_async(
            lambda: chain.in_mempool(second), timeout=WAIT_S, what=f"replacement {second} in the mempool"
        )
        check(not await chain.in_mempool(first), "the replaced close is still in the mempool")
        click.echo(f"operator_bump at {SPIKE_FEE_RATE_SAT_VB:.0f} sat/vB: {second} replaced it (RBF)")
        await confirm_close(client, chain, cid, second, timeout=WAIT_S)
        check(await chain.confirmations(first) <= 0, "the replaced close confirmed")
        report = await read_channel(chain, client, cid)
    _, _, fee, spend = split(report)
    check(spend.txid == second, "the confirmed spend is not the replacement")
    return closed_story_end(
        "fee-spike",
        report,
        deposit,
        paid,
        f"the payee paid the higher fee ({fee - low.fee_sat} "
        "sat more); the payer's change is unchanged: its signature never committed to the fee",
        low,
    )


async def conflict_story(w: World) -> str:
    """The payer tries to take its deposit back early: the node refuses its refund (non-final before the
    expiry: the deposit is collateral); the payee's close of the last payment confirms instead."""
    k, chain, deposit = w.units, w.chain, 50_000
    data, cfg = await w.setup(
        "conflict", "\n== conflict: the payer tries to take its deposit back before expiry ==", k, 5, deposit
    )
    async with w.payee(cfg, data) as payee, w.payer("conflict") as client:
        cid = await open_channel(client, chain, payee.url, deposit, DEFAULT_LIFETIME_BLOCKS)
        await download(MeteredPayer(client, cid), payee.url, 0, k)
        rec = client.store.get(cid)
        paid, params = rec.acked_sat, ChannelParams.from_json(rec.params)
        assert params.funding is not None
        refund = build_refund_tx(
            params.funding,
            deposit,
            params.witness_script,
            params.expiry_height,
            rec.privkey,
            params.payer_script,
            FEE_RATE_SAT_VB,
        )  # signed by the payer alone, early
        try:
            await chain.rpc("sendrawtransaction", tx_hex(refund))
            check(False, "the node accepted a refund before the expiry")
        except NodeError as e:
            check("non-final" in str(e), f"the early refund was refused for another reason: {e}")
            click.echo(
                f"{k} chunks paid ({paid} sat); the payer's own refund at height {await chain.tip()}, before "
                f"the expiry {params.expiry_height}, is refused by the node: {e}"
            )
        obj = await operator_close(cfg, w.payee_node, cid)
        obj = await wait_close_broadcast(client, chain, cid, timeout=WAIT_S)
        check(obj["amount_sat"] == paid, f"closing with {obj['amount_sat']}, not the last payment {paid}")
        await confirm_close(client, chain, cid, obj["close_txid"], timeout=WAIT_S)
        report = await read_channel(chain, client, cid)
    return closed_story_end(
        "conflict",
        report,
        deposit,
        paid,
        "the payee's close of the last payment confirmed: "
        "the one spend of the funding outpoint; the early refund can never confirm now",
    )


STORIES: dict[str, Callable[[World], Awaitable[str]]] = {
    "payer-timeout": payer_timeout_story,
    "wrong-amount": wrong_amount_story,
    "payee-vanishes": payee_vanishes_story,
    "fee-spike": fee_spike_story,
    "conflict": conflict_story,
}


async def run(url: str, auth: tuple[str, str], workdir: Path, payments: int, mode: str, scenario: str) -> None:
    """Everything after the node is up."""
    loop, me = asyncio.get_running_loop(), asyncio.current_task()
    assert me is not None
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGTERM, me.cancel)
    chain = Chain(url, auth)
    try:
        stories = list(STORIES) if scenario == "all" else [] if scenario == "default" else [scenario]
        deposits = (payments * PRICE_SAT + 100_000 if scenario in ("all", "default") else 0) + 50_000 * len(stories)
        await chain.prepare(("payer", "payee"), fund={"payer": deposits + 1_000_000})
        click.echo(
            f"height {await chain.tip()}; wallets miner, payer, payee; the payer holds "
            f"{await chain.balance_sat('payer')} sat"
        )
        world = World(
            chain,
            workdir,
            payments,
            mode,
            chain.wallet_node("payee"),
            chain.wallet_node("payer"),
            max(3, min(payments // 2, 10)),
        )
        for name, story in STORIES.items():
            if name in stories:
                click.echo(await story(world))
        if scenario in ("all", "default"):
            click.echo(await default_story(world))
    finally:
        await chain.aclose()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGTERM)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--payments",
    type=click.IntRange(5, 1_000_000),
    default=1000,
    show_default=True,
    help="Chunks of the file to buy at 100 sat each, one payment each in prepay mode "
    "(at least 5: fewer would not pay for their own close).",
)
@click.option(
    "--mode",
    type=click.Choice(["prepay", "postpay"]),
    default="prepay",
    show_default=True,
    help="Metered mode of the default scenario.",
)
@click.option(
    "--scenario",
    type=click.Choice(["default", *STORIES, "all"]),
    default="default",
    show_default=True,
    help="Which story to tell.",
)
@click.option("--rpc-url", help="Use this regtest node (with -txindex=1) instead of starting one.")
@click.option("--rpc-user", help="RPC user of --rpc-url.")
@click.option("--rpc-password", help="RPC password of --rpc-url.")
@click.option("-v", "--verbose", is_flag=True, help="Log what the payee's service and watcher do.")
def main(
    payments: int,
    mode: str,
    scenario: str,
    rpc_url: str | None,
    rpc_user: str | None,
    rpc_password: str | None,
    verbose: bool,
) -> None:
    """Pay for a file chunk by chunk over one payment channel on regtest; show what the node shows.

    Example: python regtest/demo.py --payments 1000 --scenario all
    """
    logging.basicConfig(
        level=logging.INFO if verbose else logging.ERROR, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    if rpc_url and (rpc_user is None or rpc_password is None):
        raise click.UsageError("--rpc-url needs --rpc-user and --rpc-password")
    workdir, started = Path(tempfile.mkdtemp(prefix="btcchannel-demo-")), time.monotonic()
    try:
        with contextlib.ExitStack() as stack:  # stops the node we start, whatever happens
            url, auth = (rpc_url or "").rstrip("/"), (rpc_user or "", rpc_password or "")
            if not rpc_url:
                node = stack.enter_context(RegtestNode(datadir=workdir / "bitcoind"))
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
        shutil.rmtree(workdir, ignore_errors=True)
    click.echo(f"(demo took {time.monotonic() - started:.1f} s)", err=True)


if __name__ == "__main__":
    main()
