"""The payee's commands: ``serve``, ``channels``, ``channel``, ``close`` (either role) and ``bump``."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from btcchannel.cli._app import Settings, emit, node_tip, run_async, table, warn_node_unknown, with_client, with_node

if TYPE_CHECKING:
    from btcchannel.bitcoind.rpc import Node
    from btcchannel.payee.config import ServerConfig

__all__ = ["COMMANDS", "bump", "channel", "channels", "close_cmd", "serve"]


def _server_config(settings: Settings, **fields: Any) -> ServerConfig:
    """The payee's configuration from the global options and the given (non-None) fields."""
    from btcchannel.payee.config import ServerConfig

    given = {k: v for k, v in fields.items() if v is not None}
    try:
        return ServerConfig(datadir=settings.datadir, network=settings.network, **given)
    except ValueError as e:
        raise click.UsageError(str(e)) from e


def _tip_or_none(
    settings: Settings, wallet: str, doc: dict[str, Any] | None = None, *, warn: bool = True
) -> int | None:
    """The node's tip height, or None when no node answers (listing works without one: unless
    ``warn`` is False, a warning says so and ``doc`` gets ``node_error``)."""
    tip, e = node_tip(settings, wallet)
    if e is not None and warn:
        warn_node_unknown(settings, e, "blocks_left is unknown; the states are as the payee's service last stored them")
        if doc is not None:
            doc["node_error"] = {"code": e.code, "message": e.message}
    return tip


def _value_text(v: Any) -> str:
    """A field's value for a terminal: nested objects as ``key=value`` pairs, not Python's repr."""
    if v is None:
        return ""
    if isinstance(v, dict):
        return ", ".join(f"{k}={_value_text(x) or '-'}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return ", ".join(_value_text(x) for x in v)
    if isinstance(v, bool):
        return "yes" if v else "no"
    return str(v)


def _channel_text(obj: dict[str, Any]) -> str:
    return "\n".join(f"{k:15} {_value_text(v)}".rstrip() for k, v in obj.items())


def _terms_text(config: ServerConfig) -> str:
    """What ``serve`` agrees new channels under, as ``GET /v1/info`` states it."""
    price = "no price (payments at will)" if config.price_sat == 0 else f"{config.price_sat} sat a unit, {config.mode}"
    if config.price_sat and config.mode == "postpay":
        price += f", credit {config.credit_limit_sat} sat, {config.payment_timeout_s:g} s to pay"
    return (
        f"terms: {price}; deposits {config.min_deposit_sat}-{config.max_deposit_sat} sat, lifetimes "
        f"{config.min_lifetime_blocks}-{config.max_lifetime_blocks} blocks; open at {config.min_confirmations} "
        f"confirmation{'s' if config.min_confirmations != 1 else ''}, closed {config.close_margin_blocks} blocks "
        f"before expiry, a close final at {config.final_confirmations} confirmation"
        f"{'s' if config.final_confirmations != 1 else ''}"
    )


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8402, show_default=True, type=click.IntRange(0, 65535))
@click.option("--price-sat", type=click.IntRange(0), default=None, help="Price of one unit of the metered service.")
@click.option("--mode", type=click.Choice(["prepay", "postpay"]), default=None)
@click.option(
    "--credit-limit-sat",
    type=click.IntRange(0),
    default=None,
    help="postpay: unpaid total allowed per channel (what a payer that never pays takes per channel).",
)
@click.option(
    "--credit-cap-per-payer-sat",
    type=click.IntRange(0),
    default=None,
    help="postpay: unpaid total allowed across one payer key's channels [default: no cap].",
)
@click.option(
    "--credit-cap-per-client-sat",
    type=click.IntRange(0),
    default=None,
    help="postpay: unpaid total allowed across the channels one client address proposed, so that "
    "opening many channels does not multiply --credit-limit-sat [default: no cap].",
)
@click.option(
    "--credit-cap-total-sat",
    type=click.IntRange(0),
    default=None,
    help="postpay: unpaid total allowed across all channels: the most the payee risks on credit [default: no cap].",
)
@click.option(
    "--allow-plain-http",
    is_flag=True,
    default=False,
    help="Serve paid routes over plain HTTP to non-loopback clients (default: TLS or loopback only).",
)
@click.option(
    "--payment-timeout", type=click.FloatRange(0.1), default=None, help="postpay: seconds to pay what is owed."
)
@click.option(
    "--idle-timeout",
    type=click.FloatRange(0.001),
    default=None,
    help="prepay: seconds without a payment before an open channel is closed [default: never].",
)
@click.option(
    "--close-margin-blocks",
    type=int,
    default=None,
    help="Close a channel this many blocks before its expiry (at least 2) [default: 6].",
)
@click.option(
    "--min-confirmations",
    type=click.IntRange(1),
    default=None,
    help="Depth at which a funding opens a channel (at least 1).",
)
@click.option(
    "--final-confirmations",
    type=click.IntRange(1),
    default=None,
    help="Depth at which a close (or a conflicting spend) is final: channels show closing until then [default: 6].",
)
@click.option("--payee-address", default=None, help="Where closes pay [default: a new address of the node wallet].")
@click.option(
    "--serve-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Sell this file's chunks at /v1/file/{index}.",
)
@click.option("--chunk-size", type=click.IntRange(1, 60_000), default=1024, show_default=True)
@click.option(
    "--store",
    "store_url",
    metavar="postgresql://...",
    default=None,
    envvar="BTCCHANNEL_STORE",
    help="A PostgreSQL database shared by several payee instances [default: <datadir>/payee.db] "
    "(also $BTCCHANNEL_STORE; a password is best left to PGPASSWORD or ~/.pgpass).",
)
@click.option(
    "--public-url",
    default=None,
    metavar="URL",
    help="Where payers reach this payee (e.g. https://api.example/btc): the 402's URLs are built from "
    "it [default: the request's Host header, only on regtest or a loopback address].",
)
@click.option(
    "--trusted-proxy",
    "trusted_proxies",
    multiple=True,
    metavar="ADDRESS[/BITS]",
    help="A reverse proxy in front (repeatable): requests from it are counted against the proposal "
    "caps of the client its X-Forwarded-For names.",
)
@click.option(
    "--trust-host-header",
    is_flag=True,
    default=False,
    help="Build the 402's URLs from the Host header even on a public address (a proxy in front sets it).",
)
@click.option(
    "--metrics/--no-metrics",
    default=True,
    show_default=True,
    help="Serve Prometheus metrics at /metrics on a listener of its own (see --metrics-port).",
)
@click.option("--metrics-host", default=None, help="The metrics listener's address [default: 127.0.0.1].")
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="The metrics listener's port [default: a free one, in <datadir>/server.json].",
)
@click.option(
    "--metrics-public",
    is_flag=True,
    default=False,
    help="Serve /metrics on the payee's own port instead (anyone who reaches it reads revenue and deposits).",
)
@click.option(
    "--backup-db",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Keep a copy of payee.db here (put it on another disk): every payment is written to it "
    "before it is acknowledged, every other change copied within a second.",
)
@click.option(
    "--backup-async",
    is_flag=True,
    default=False,
    help="Copy payee.db to --backup-db only in the background (faster; the copy may lack the "
    "payments of the last second, and a restore from it closes those channels for less).",
)
@click.option(
    "--backup-interval",
    type=click.FloatRange(1.0),
    default=60.0,
    show_default=True,
    help="Seconds between copies when nothing changed.",
)
@click.pass_obj
def serve(
    settings: Settings,
    host: str,
    port: int,
    price_sat: int | None,
    mode: str | None,
    credit_limit_sat: int | None,
    credit_cap_per_payer_sat: int | None,
    credit_cap_per_client_sat: int | None,
    credit_cap_total_sat: int | None,
    allow_plain_http: bool,
    payment_timeout: float | None,
    idle_timeout: float | None,
    close_margin_blocks: int | None,
    min_confirmations: int | None,
    final_confirmations: int | None,
    payee_address: str | None,
    serve_file: Path | None,
    chunk_size: int,
    store_url: str | None,
    public_url: str | None,
    trusted_proxies: tuple[str, ...],
    trust_host_header: bool,
    metrics: bool,
    metrics_host: str | None,
    metrics_port: int | None,
    metrics_public: bool,
    backup_db: Path | None,
    backup_interval: float,
    backup_async: bool,
) -> None:
    """Run the payee's service (until Ctrl-C or SIGTERM). New channels are agreed under the price,
    mode, credit limit and timeouts given here (GET /v1/info states them, and serve prints them);
    channels already open keep the terms they were agreed under.

    With --store postgresql://..., any number of instances (each with its own --datadir and port)
    share one database; one of them at a time runs the watcher and the closer.

    \b
    Example:
      btcchannel --wallet payee serve --port 8402 --price-sat 100 --serve-file data.bin
      btcchannel --wallet payee --datadir a serve --port 8402 --store postgresql://pay@db/payee
    """
    from btcchannel.payee import http as server

    config = _server_config(
        settings,
        host=host,
        port=port,
        price_sat=price_sat,
        mode=mode,
        credit_limit_sat=credit_limit_sat,
        credit_cap_per_payer_sat=credit_cap_per_payer_sat,
        credit_cap_per_client_sat=credit_cap_per_client_sat,
        credit_cap_total_sat=credit_cap_total_sat,
        allow_plain_http=allow_plain_http or None,
        payment_timeout_s=payment_timeout,
        idle_timeout_s=idle_timeout,
        close_margin_blocks=close_margin_blocks,
        min_confirmations=min_confirmations,
        final_confirmations=final_confirmations,
        payee_address=payee_address,
        store_url=store_url,
        public_url=public_url,
        trusted_proxies=trusted_proxies or None,
        trust_host_header=trust_host_header or None,
        metrics_host=metrics_host,
        metrics_port=metrics_port,
        metrics_public=metrics_public or None,
    )
    if backup_db is not None and store_url is not None:
        raise click.UsageError("--backup-db copies the SQLite payee.db; back a PostgreSQL store up with its own tools")

    def hook(app: Any) -> None:
        if backup_db is not None:
            from btcchannel.payee.backup import install_backup

            install_backup(app, config.db_path, backup_db, interval_s=backup_interval, synchronous=not backup_async)
        if metrics:
            from btcchannel.payee.metrics import install_metrics

            install_metrics(app)
        if serve_file is not None:
            from btcchannel.payee.metered import add_file_route

            add_file_route(app, serve_file, chunk_size=chunk_size)

    def ready(url: str) -> None:
        emit(
            settings,
            {
                "url": url,
                "datadir": str(settings.datadir),
                "terms": config.terms.required().to_json(),
                "final_confirmations": config.final_confirmations,
            },
            f"payee service on {url}\n{_terms_text(config)}",
        )
        sys.stdout.flush()

    async def run(node: Node) -> None:
        task = asyncio.ensure_future(server.serve(config, node, ready=ready, app_hook=hook))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    run_async(with_node(settings, "payee", run))


@click.command()
@click.pass_obj
def channels(settings: Settings) -> None:
    """List the payee's channels.

    \b
    Example:
      btcchannel channels
    """
    from btcchannel.payee.commands import channel_docs

    objs = channel_docs(settings.datadir)
    doc: dict[str, Any] = {"channels": objs}
    tip = _tip_or_none(settings, "payee", doc, warn=bool(objs))  # nothing is unknown in an empty list
    doc["tip_height"] = tip
    for o in objs:
        o["blocks_left"] = None if tip is None else o["expiry_height"] - tip
    rows = [
        [
            o["channel_id"],
            o["state"],
            o["amount_sat"],
            o["deposit_sat"],
            o["expiry_height"],
            "-" if o["blocks_left"] is None else o["blocks_left"],
        ]
        for o in objs
    ]
    emit(
        settings,
        doc,
        table(rows, ["channel", "state", "paid_sat", "deposit_sat", "expiry", "blocks_left"])
        if rows
        else "no channels",
    )


@click.command()
@click.argument("channel_id")
@click.option(
    "--close-tx",
    is_flag=True,
    help="Print the last payment as a fully signed close transaction (hex) instead; nothing is broadcast.",
)
@click.option(
    "--fee-rate", type=click.FloatRange(1.0), default=None, help="--close-tx: sat/vB [default: the node's estimate]."
)
@click.option(
    "--address", default=None, help="--close-tx: pay the payee here [default: a new address of the node wallet]."
)
@click.option(
    "--descriptor",
    is_flag=True,
    help="Print the funding output's descriptor (with checksum) instead; the payer's or the payee's datadir.",
)
@click.option(
    "--private",
    is_flag=True,
    help="--descriptor with the payer's key (payer's datadir; keep it secret): a descriptor wallet "
    "can then refund after expiry.",
)
@click.pass_obj
def channel(
    settings: Settings,
    channel_id: str,
    close_tx: bool,
    fee_rate: float | None,
    address: str | None,
    descriptor: bool,
    private: bool,
) -> None:
    """Show one of the payee's channels, or (--close-tx) its last state as a close transaction
    that any node accepts (bitcoin-cli sendrawtransaction HEX), without btcchannel, or
    (--descriptor) its funding output's descriptor.

    \b
    Example:
      btcchannel channel 5f0c...e1
      btcchannel channel 5f0c...e1 --close-tx --fee-rate 2
      btcchannel channel 5f0c...e1 --descriptor --private
    """
    from btcchannel.payee.commands import channel_doc
    from btcchannel.payee.commands import close_tx as signed_close

    if descriptor or private:
        doc = _descriptor(settings, channel_id, private)
        emit(settings, doc, str(doc["descriptor"]))
        return
    if close_tx:
        doc = run_async(
            with_node(
                settings,
                "payee",
                lambda node: signed_close(settings.datadir, settings.network, node, channel_id, fee_rate, address),
            )
        )
        emit(settings, doc, str(doc["hex"]))
        return
    obj = channel_doc(settings.datadir, channel_id)
    tip = _tip_or_none(settings, "payee")
    obj["blocks_left"] = None if tip is None else obj["expiry_height"] - tip
    emit(settings, obj, _channel_text(obj))


def _descriptor(settings: Settings, channel_id: str, private: bool) -> dict[str, Any]:
    """The descriptor of ``channel_id`` as this datadir holds it: the payer's row first (``private``
    needs it), else the payee's (public keys only)."""
    from btcchannel.errors import BadRequest
    from btcchannel.payee.commands import descriptor_doc as payee_descriptor
    from btcchannel.payer.commands import descriptor_doc as payer_descriptor

    doc = payer_descriptor(settings.datadir, channel_id, private)
    if doc is not None:
        return doc
    if private:
        raise BadRequest(f"--private needs the payer's datadir, and channel {channel_id} is not a payer's channel here")
    return payee_descriptor(settings.datadir, channel_id)


def _payee_only(settings: Settings, channel_id: str) -> bool:
    """Whether this datadir knows ``channel_id`` as the payee's and not as the payer's."""
    from btcchannel.payee import commands as payee
    from btcchannel.payer import commands as payer

    return payee.knows(settings.datadir, channel_id) and not payer.knows(settings.datadir, channel_id)


@click.command("close")
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
        obj = run_async(with_node(settings, "payee", lambda node: operator_close(config, node, channel_id)))
    else:
        obj = run_async(with_client(settings, lambda client: client.close(channel_id)))
    emit(settings, obj, f"closing: {obj.get('close_txid') or '-'} (state {obj['state']})")


@click.command()
@click.argument("channel_id")
@click.option("--fee-rate", type=click.FloatRange(1.0), required=True, help="New fee rate, sat/vB.")
@click.pass_obj
def bump(settings: Settings, channel_id: str, fee_rate: float) -> None:
    """Replace the payee's unconfirmed close with one paying a higher fee rate (RBF).

    Fails with nothing_to_replace when there is no close in the mempool (the channel
    is open, or its close confirmed); the answer names both transactions and fee rates.

    \b
    Example:
      btcchannel bump 5f0c...e1 --fee-rate 25
    """
    from btcchannel.payee.closer import operator_bump

    config = _server_config(settings)
    obj = run_async(with_node(settings, "payee", lambda node: operator_bump(config, node, channel_id, fee_rate)))
    emit(
        settings,
        obj,
        f"close {obj['replaced_txid']} ({obj['old_fee_rate_sat_vb']:.2f} sat/vB) replaced by "
        f"{obj['close_txid']} ({obj['new_fee_rate_sat_vb']:.2f} sat/vB)",
    )


COMMANDS: tuple[click.Command, ...] = (serve, channels, channel, close_cmd, bump)
