"""The ``btcchannel`` command line: a thin layer over the library.

Every command calls into the library; library errors (:class:`ChannelError`)
are turned into one line on stderr with their stable code and exit status 1
here and nowhere else (usage errors exit with 2, as click does). Every global
option can also be set through ``BTCCHANNEL_<NAME>`` (e.g. ``BTCCHANNEL_RPC_URL``).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from btcchannel.errors import BadRequest, ChannelError, NodeUnavailable, NotOpen

if TYPE_CHECKING:
    from btcchannel.payer.client import PayerClient
    from btcchannel.payer.metered import MeteredPayer
    from btcchannel.bitcoind.rpc import Node
    from btcchannel.payee.config import ServerConfig

T = TypeVar("T")

EXIT_ERROR = 1


@dataclass(frozen=True)
class Settings:
    """The global options, as every command sees them."""

    network: str
    datadir: Path
    rpc_url: str | None
    rpc_cookie: Path | None
    rpc_user: str | None
    rpc_password: str | None
    wallet: str | None
    json: bool
    verbose: int

    @property
    def regtest_dir(self) -> Path:
        return self.datadir / "regtest-node"


def default_datadir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "btcchannel"


def fail(error: ChannelError) -> NoReturn:
    click.echo(f"error: {error.code}: {error.message}", err=True)
    sys.exit(EXIT_ERROR)


def emit(settings: Settings, document: dict[str, Any], text: str) -> None:
    """One JSON document with ``--json``, else the human text."""
    if settings.json:
        click.echo(json.dumps(document, sort_keys=True))
    else:
        click.echo(text)


class _Group(click.Group):
    """A click group that turns library errors into one clear line."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ChannelError as e:
            fail(e)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"auto_envvar_prefix": "BTCCHANNEL", "help_option_names": ["-h", "--help"]})
@click.option("--network", default="regtest", show_default=True,
              type=click.Choice(["mainnet", "testnet", "testnet4", "signet", "regtest"]))
@click.option("--datadir", type=click.Path(path_type=Path), default=None,
              help="Where btcchannel keeps its state [default: $XDG_DATA_HOME/btcchannel].")
@click.option("--rpc-url", default=None, help="bitcoind RPC URL, e.g. http://127.0.0.1:18443.")
@click.option("--rpc-cookie", type=click.Path(path_type=Path), default=None, help="bitcoind's .cookie file.")
@click.option("--rpc-user", default=None)
@click.option("--rpc-password", default=None)
@click.option("--wallet", default=None, help="bitcoind wallet name.")
@click.option("--json", "as_json", is_flag=True, envvar="BTCCHANNEL_JSON", help="Machine-readable output: one JSON document.")
@click.option("-v", "--verbose", count=True, help="Log to stderr (-vv for debug).")
@click.pass_context
def main(ctx: click.Context, network: str, datadir: Path | None, rpc_url: str | None,
         rpc_cookie: Path | None, rpc_user: str | None, rpc_password: str | None,
         wallet: str | None, as_json: bool, verbose: int) -> None:
    """Unidirectional Bitcoin payment channels.

    \b
    Example:
      btcchannel regtest start && btcchannel regtest mine 10
    """
    logging.basicConfig(
        level=logging.WARNING - 10 * min(verbose, 2), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    ctx.obj = Settings(
        network=network, datadir=datadir or default_datadir(), rpc_url=rpc_url,
        rpc_cookie=rpc_cookie, rpc_user=rpc_user, rpc_password=rpc_password,
        wallet=wallet, json=as_json, verbose=verbose,
    )


# --------------------------------------------------------------------------- regtest


@main.group(cls=_Group)
def regtest() -> None:
    """A local regtest bitcoind for trying btcchannel.

    \b
    Example:
      btcchannel regtest start
      btcchannel regtest mine 10
      btcchannel regtest status
      btcchannel regtest stop
    """


@regtest.command("install")
@click.pass_obj
def regtest_install(settings: Settings) -> None:
    """Find bitcoind, or fetch Debian's bitcoin-knots into the cache.

    \b
    Example:
      btcchannel regtest install
    """
    from btcchannel.bitcoind.binary import find_bitcoind

    binary = find_bitcoind()
    emit(settings, {"version": binary.version, "source": binary.source, "command": list(binary.bitcoind)},
         f"{binary.version} ({binary.source}): {' '.join(binary.bitcoind)}")


def _prepare_wallets(node: Any) -> None:
    """The ``payee`` wallet and a ``payer`` wallet holding coins, as the walk-through uses them."""
    node.create_wallet("payee")
    node.create_wallet("payer")
    if node.balance_sat("payer") < 100_000_000:
        node.fund_wallet("payer", 10 * 100_000_000)


def _node_env(node: Any) -> dict[str, str]:
    return {
        "BTCCHANNEL_RPC_URL": node.rpc_url,
        "BTCCHANNEL_RPC_USER": node.rpc_user,
        "BTCCHANNEL_RPC_PASSWORD": node.rpc_password,
    }


@regtest.command("start")
@click.pass_obj
def regtest_start(settings: Settings) -> None:
    """Start a regtest node in the background (mined past height 200).

    \b
    Example:
      btcchannel regtest start
    """
    from btcchannel.errors import NodeUnavailable
    from btcchannel.bitcoind.regtest import RegtestNode

    try:
        node = RegtestNode.attach(settings.regtest_dir)
        already = True
    except NodeUnavailable:
        node = RegtestNode(datadir=settings.regtest_dir, die_with_parent=False)
        node.start()
        already = False
    try:
        node.prepare(201)
        _prepare_wallets(node)
        status = node.status()
    except ChannelError:
        if not already:
            node.stop()
        raise
    env = _node_env(node)
    node.detach()
    exports = "\n".join(f"  export {k}={v}" for k, v in env.items())
    emit(settings, {**status, "already_running": already, "env": env},
         f"regtest node {'already running' if already else 'started'}: pid {status['pid']}, "
         f"height {status['blocks']}\n  RPC {status['rpc_url']}\n  datadir {status['datadir']}\n"
         f"reach it with:\n{exports}")


@regtest.command("stop")
@click.pass_obj
def regtest_stop(settings: Settings) -> None:
    """Stop the background regtest node.

    \b
    Example:
      btcchannel regtest stop
    """
    from btcchannel.bitcoind.regtest import RegtestNode

    node = RegtestNode.attach(settings.regtest_dir)
    pid = node.pid
    node.stop()
    emit(settings, {"stopped": True, "pid": pid}, f"regtest node stopped (pid {pid})")


@regtest.command("status")
@click.pass_obj
def regtest_status(settings: Settings) -> None:
    """Show the background regtest node.

    \b
    Example:
      btcchannel regtest status
    """
    from btcchannel.bitcoind.regtest import RegtestNode

    node = RegtestNode.attach(settings.regtest_dir)
    status = node.status()
    status["env"] = _node_env(node)
    node.detach()
    emit(settings, status,
         f"regtest node running: pid {status['pid']}, height {status['blocks']}, "
         f"tip {status['bestblockhash']}\n  RPC {status['rpc_url']}\n  datadir {status['datadir']}")


@regtest.command("mine")
@click.argument("blocks", type=click.IntRange(1, 10_000))
@click.option("--address", default=None, help="Mine to this address [default: the node's miner wallet].")
@click.pass_obj
def regtest_mine(settings: Settings, blocks: int, address: str | None) -> None:
    """Mine BLOCKS blocks on the background regtest node.

    \b
    Example:
      btcchannel regtest mine 10
    """
    from btcchannel.bitcoind.regtest import RegtestNode

    node = RegtestNode.attach(settings.regtest_dir)
    hashes = node.mine(blocks, address)
    height = node.tip_height()
    node.detach()
    emit(settings, {"blocks": hashes, "height": height}, f"mined {len(hashes)} blocks, height {height}")


# --------------------------------------------------------------------------- shared plumbing


def make_node(settings: Settings, default_wallet: str) -> Node:
    """The node of the global options, else the background regtest node of ``regtest start``."""
    from btcchannel.bitcoind.rpc import Node
    from btcchannel.bitcoind.regtest import recorded_rpc

    wallet = settings.wallet or default_wallet
    if settings.rpc_url:
        auth = None
        if settings.rpc_user is not None:
            auth = (settings.rpc_user, settings.rpc_password or "")
        cookie = None if auth else settings.rpc_cookie
        return Node(settings.rpc_url, auth=auth, cookie_file=cookie, wallet=wallet)
    if settings.network == "regtest":
        rec = recorded_rpc(settings.regtest_dir)
        if rec is not None:
            url, user, password = rec
            return Node(url, auth=(user, password), wallet=wallet)
    raise NodeUnavailable("no node: pass --rpc-url (and --rpc-cookie or --rpc-user/--rpc-password), "
                          "or run `btcchannel regtest start`")


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


async def _with_node(settings: Settings, wallet: str, body: Callable[[Node], Awaitable[T]]) -> T:
    node = make_node(settings, wallet)
    try:
        return await body(node)
    finally:
        await node.aclose()


async def _with_client(settings: Settings, body: Callable[[PayerClient], Awaitable[T]]) -> T:
    from btcchannel.payer.client import PayerClient

    async def inner(node: Node) -> T:
        async with PayerClient(settings.datadir, node, network=settings.network) as client:
            return await body(client)

    return await _with_node(settings, "payer", inner)


def _server_config(settings: Settings, **fields: Any) -> ServerConfig:
    from btcchannel.payee.config import ServerConfig

    given = {k: v for k, v in fields.items() if v is not None}
    try:
        return ServerConfig(datadir=settings.datadir, network=settings.network, **given)
    except ValueError as e:
        raise click.UsageError(str(e)) from e


def _table(rows: list[list[Any]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def _channel_text(obj: dict[str, Any]) -> str:
    return "\n".join(f"{k:15} {'' if v is None else v}" for k, v in obj.items())


# --------------------------------------------------------------------------- payee


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8402, show_default=True, type=click.IntRange(0, 65535))
@click.option("--price-sat", type=click.IntRange(0), default=None, help="Price of one unit of the metered service.")
@click.option("--mode", type=click.Choice(["prepay", "postpay"]), default=None)
@click.option("--credit-limit-sat", type=click.IntRange(0), default=None, help="postpay: unpaid total allowed.")
@click.option("--payment-timeout", type=click.FloatRange(0.1), default=None, help="postpay: seconds to pay what is owed.")
@click.option("--close-margin-blocks", type=click.IntRange(1), default=None)
@click.option("--min-confirmations", type=click.IntRange(0), default=None)
@click.option("--payee-address", default=None, help="Where closes pay [default: a new address of the node wallet].")
@click.option("--serve-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Sell this file's chunks at /v1/file/{index}.")
@click.option("--chunk-size", type=click.IntRange(1, 60_000), default=1024, show_default=True)
@click.pass_obj
def serve(settings: Settings, host: str, port: int, price_sat: int | None, mode: str | None,
          credit_limit_sat: int | None, payment_timeout: float | None, close_margin_blocks: int | None,
          min_confirmations: int | None, payee_address: str | None, serve_file: Path | None,
          chunk_size: int) -> None:
    """Run the payee's service (until Ctrl-C or SIGTERM).

    \b
    Example:
      btcchannel --wallet payee serve --port 8402 --price-sat 100 --serve-file data.bin
    """
    from btcchannel.payee import http as server

    config = _server_config(
        settings, host=host, port=port, price_sat=price_sat, mode=mode, credit_limit_sat=credit_limit_sat,
        payment_timeout_s=payment_timeout, close_margin_blocks=close_margin_blocks,
        min_confirmations=min_confirmations, payee_address=payee_address,
    )

    def hook(app: Any) -> None:
        if serve_file is not None:
            from btcchannel.payee.metered import add_file_route

            add_file_route(app, serve_file, chunk_size=chunk_size)

    def ready(url: str) -> None:
        emit(settings, {"url": url, "datadir": str(settings.datadir)}, f"payee service on {url}")
        sys.stdout.flush()

    async def run(node: Node) -> None:
        task = asyncio.ensure_future(server.serve(config, node, ready=ready, app_hook=hook))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    run_async(_with_node(settings, "payee", run))


@main.command()
@click.pass_obj
def channels(settings: Settings) -> None:
    """List the payee's channels.

    \b
    Example:
      btcchannel channels
    """
    from btcchannel.wire import channel_object
    from btcchannel.store import PayeeStore

    tip = _tip_or_none(settings, "payee")
    with PayeeStore(settings.datadir / "payee.db") as store:
        objs = [channel_object(r) for r in store.list()]
    for o in objs:
        o["blocks_left"] = None if tip is None else o["expiry_height"] - tip
    rows = [[o["channel_id"], o["state"], o["amount_sat"], o["deposit_sat"], o["expiry_height"],
             "-" if o["blocks_left"] is None else o["blocks_left"]] for o in objs]
    emit(settings, {"channels": objs, "tip_height": tip},
         _table(rows, ["channel", "state", "paid_sat", "deposit_sat", "expiry", "blocks_left"]) if rows
         else "no channels")


def _tip_or_none(settings: Settings, wallet: str) -> int | None:
    async def tip(node: Node) -> int:
        return await node.tip_height()

    try:
        return run_async(_with_node(settings, wallet, tip))
    except ChannelError:
        return None


@main.command()
@click.argument("channel_id")
@click.pass_obj
def channel(settings: Settings, channel_id: str) -> None:
    """Show one of the payee's channels.

    \b
    Example:
      btcchannel channel 5f0c...e1
    """
    from btcchannel.wire import channel_object
    from btcchannel.store import PayeeStore

    with PayeeStore(settings.datadir / "payee.db") as store:
        obj = channel_object(store.get(channel_id))
    tip = _tip_or_none(settings, "payee")
    obj["blocks_left"] = None if tip is None else obj["expiry_height"] - tip
    emit(settings, obj, _channel_text(obj))


@main.command("close")
@click.argument("channel_id")
@click.option("--fee-rate", type=click.FloatRange(1.0), default=None, help="sat/vB [default: the node's estimate].")
@click.option("--payee", "as_payee", is_flag=True, help="Close as the payee (operator), not as the payer.")
@click.pass_obj
def close_cmd(settings: Settings, channel_id: str, fee_rate: float | None, as_payee: bool) -> None:
    """Close a channel: the payer asks the payee to close; the payee closes now with its best payment.

    The role is the one this datadir holds the channel in (--payee when it holds both).

    \b
    Examples:
      btcchannel close 5f0c...e1                  # payer: signed close request
      btcchannel close 5f0c...e1 --fee-rate 12    # payee: broadcast the close now
    """
    if as_payee or _payee_only(settings, channel_id):
        from btcchannel.payee.closer import operator_close

        config = _server_config(settings, close_fee_rate_sat_vb=fee_rate)
        obj = run_async(_with_node(settings, "payee", lambda node: operator_close(config, node, channel_id)))
    else:
        obj = run_async(_with_client(settings, lambda client: client.close(channel_id)))
    emit(settings, obj, f"closing: {obj.get('close_txid') or '-'} (state {obj['state']})")


def _payee_only(settings: Settings, channel_id: str) -> bool:
    """Whether this datadir knows ``channel_id`` as the payee's and not as the payer's."""
    from btcchannel.store import PayeeStore, PayerStore

    def known(store: PayeeStore | PayerStore) -> bool:
        with store:
            return store.find(channel_id) is not None

    payee_db, payer_db = settings.datadir / "payee.db", settings.datadir / "payer.db"
    return payee_db.exists() and known(PayeeStore(payee_db)) and not (payer_db.exists() and known(PayerStore(payer_db)))


@main.command()
@click.argument("channel_id")
@click.option("--fee-rate", type=click.FloatRange(1.0), required=True, help="New fee rate, sat/vB.")
@click.pass_obj
def bump(settings: Settings, channel_id: str, fee_rate: float) -> None:
    """Replace the payee's unconfirmed close with one paying a higher fee rate (RBF).

    \b
    Example:
      btcchannel bump 5f0c...e1 --fee-rate 25
    """
    from btcchannel.payee.closer import operator_bump

    config = _server_config(settings)
    obj = run_async(_with_node(settings, "payee", lambda node: operator_bump(config, node, channel_id, fee_rate)))
    emit(settings, obj, f"close replaced: {obj.get('close_txid')}")


# --------------------------------------------------------------------------- payer


@main.command("open")
@click.argument("url")
@click.option("--deposit-sat", type=click.IntRange(1), required=True)
@click.option("--lifetime-blocks", type=click.IntRange(1), required=True)
@click.option("--no-wait", is_flag=True, help="Return once funded, without waiting for the channel to open.")
@click.pass_obj
def open_cmd(settings: Settings, url: str, deposit_sat: int, lifetime_blocks: int, no_wait: bool) -> None:
    """Open a channel to a payee: propose, fund from the node wallet, wait until open.

    \b
    Example:
      btcchannel --wallet payer open http://127.0.0.1:8402 --deposit-sat 100000 --lifetime-blocks 144
    """
    if not settings.json:
        click.echo("funding the channel; waiting for its confirmation...", err=True)

    async def run(client: PayerClient) -> dict[str, Any]:
        cid = await client.open_channel(url, deposit_sat, lifetime_blocks, wait_open=not no_wait)
        return await client.status(cid)

    obj = run_async(_with_client(settings, run))
    emit(settings, obj, f"channel {obj['channel_id']} {obj['state']}: deposit {obj['deposit_sat']} sat, "
                        f"expiry height {obj['expiry_height']}")


@main.command()
@click.argument("channel_id")
@click.option("--amount-sat", type=click.IntRange(1), required=True, help="How much more to pay.")
@click.pass_obj
def pay(settings: Settings, channel_id: str, amount_sat: int) -> None:
    """Pay AMOUNT more through a channel (signed, stored, then sent).

    \b
    Example:
      btcchannel pay 5f0c...e1 --amount-sat 1000
    """
    total = run_async(_with_client(settings, lambda client: client.pay(channel_id, amount_sat)))
    emit(settings, {"channel_id": channel_id, "amount_sat": total}, f"paid: total {total} sat")


@main.command()
@click.argument("url")
@click.option("--channel", "channel_id", default=None, help="Channel to pay with [default: the open one to this payee].")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the body here.")
@click.pass_obj
def fetch(settings: Settings, url: str, channel_id: str | None, out: Path | None) -> None:
    """Request a paid URL, paying as the payee's 402 answer asks; a /v1/file URL fetches every chunk.

    \b
    Example:
      btcchannel fetch http://127.0.0.1:8402/v1/file --out data.bin
    """
    from btcchannel.payer.metered import MeteredPayer

    async def run(client: PayerClient) -> dict[str, Any]:
        cid = channel_id or _channel_for(client, url)
        await client.wait_open(cid, timeout=600.0)
        payer = MeteredPayer(client, cid)
        if url.rstrip("/").endswith("/v1/file"):
            body, units = await _fetch_file(payer, url.rstrip("/"), settings)
        else:
            _status, body = await payer.fetch(url)
            units = 1
        if out is not None:
            out.write_bytes(body)
        elif not settings.json:
            sys.stdout.buffer.write(body)
        rec = client.store.get(cid)
        return {"channel_id": cid, "bytes": len(body), "units": units, "amount_sat": rec.acked_sat,
                "out": str(out) if out else None}

    doc = run_async(_with_client(settings, run))
    if settings.json or out is not None:
        emit(settings, doc, f"fetched {doc['bytes']} bytes in {doc['units']} paid units; "
                            f"channel {doc['channel_id']} total {doc['amount_sat']} sat")


def _channel_for(client: PayerClient, url: str) -> str:
    """The newest funded channel of this payer to the payee serving ``url``."""
    from urllib.parse import urlsplit

    want = urlsplit(url)
    for rec in reversed(client.list()):
        have = urlsplit(rec.server_url)
        if rec.state in ("funding", "open") and (have.scheme, have.netloc) == (want.scheme, want.netloc):
            return rec.channel_id
    raise NotOpen(f"no open channel to {want.netloc}: run `btcchannel open {want.scheme}://{want.netloc} ...` first")


async def _fetch_file(payer: MeteredPayer, url: str, settings: Settings) -> tuple[bytes, int]:
    import aiohttp

    try:
        async with payer.client.session.get(url) as resp:
            if resp.status != 200:
                raise BadRequest(f"{url}: HTTP {resp.status}")
            meta = await resp.json()
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        raise NodeUnavailable(f"payee unreachable: {url}: {e!r}") from e
    count = int(meta["chunks"])
    parts: list[bytes] = []
    show = sys.stderr.isatty() and not settings.json
    with click.progressbar(length=count, label="paid chunks", file=sys.stderr if show else io.StringIO()) as bar:
        for i in range(count):
            _status, body = await payer.fetch(f"{url}/{i}")
            parts.append(body)
            bar.update(1)
    await payer.settle()
    return b"".join(parts), count


@main.command()
@click.argument("channel_id")
@click.option("--fee-rate", type=click.FloatRange(1.0), default=None, help="sat/vB [default: the node's estimate].")
@click.option("--address", default=None, help="Refund to this address [default: the channel's change script].")
@click.pass_obj
def refund(settings: Settings, channel_id: str, fee_rate: float | None, address: str | None) -> None:
    """Take the whole deposit back once the chain has reached the channel's expiry.

    \b
    Example:
      btcchannel refund 5f0c...e1
    """
    txid = run_async(_with_client(
        settings, lambda client: client.refund(channel_id, fee_rate_sat_vb=fee_rate, dest_address=address)))
    emit(settings, {"channel_id": channel_id, "refund_txid": txid}, f"refund broadcast: {txid}")


@main.command("list")
@click.pass_obj
def list_cmd(settings: Settings) -> None:
    """List the payer's channels.

    \b
    Example:
      btcchannel list
    """
    from btcchannel.store import PayerStore

    with PayerStore(settings.datadir / "payer.db") as store:
        recs = store.list()
    objs = [{"channel_id": r.channel_id, "server_url": r.server_url, "state": r.state,
             "deposit_sat": r.deposit_sat, "amount_sat": r.acked_sat, "signed_sat": r.amount_sat,
             "expiry_height": r.expiry_height} for r in recs]
    rows = [[o["channel_id"], o["state"], o["amount_sat"], o["deposit_sat"], o["expiry_height"], o["server_url"]]
            for o in objs]
    emit(settings, {"channels": objs},
         _table(rows, ["channel", "state", "paid_sat", "deposit_sat", "expiry", "payee"]) if rows else "no channels")


@main.group(cls=_Group)
def backup() -> None:
    """What a payer needs to refund after losing its datadir.

    \b
    Example:
      btcchannel backup export channels.json
    """


@backup.command("export")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.pass_obj
def backup_export(settings: Settings, file: Path) -> None:
    """Write the payer's channels (keys included: keep it secret) to FILE.

    \b
    Example:
      btcchannel backup export channels.json
    """
    from btcchannel.store import PayerStore, open_private_file

    with PayerStore(settings.datadir / "payer.db") as store:
        data = store.export_backup()
    open_private_file(file)
    file.write_text(json.dumps(data, indent=1))
    emit(settings, {"file": str(file), "channels": len(data["channels"])},
         f"{len(data['channels'])} channels written to {file}")


@backup.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.pass_obj
def backup_import(settings: Settings, file: Path) -> None:
    """Merge a backup FILE into the payer's channels.

    \b
    Example:
      btcchannel backup import channels.json
    """
    from btcchannel.store import PayerStore

    try:
        data = json.loads(file.read_text())
    except ValueError as e:
        raise BadRequest(f"{file} is not JSON: {e}") from e
    with PayerStore(settings.datadir / "payer.db") as store:
        n = store.import_backup(data)
    emit(settings, {"file": str(file), "imported": n}, f"{n} channels imported from {file}")
