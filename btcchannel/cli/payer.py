"""The payer's commands: ``open``, ``pay``, ``fetch``, ``refund``, ``list`` and ``backup export|import``."""

from __future__ import annotations

import base64
import io
import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from btcchannel.cli._app import Group, Settings, emit, fail, plural, run_async, table, warn_node_unknown, with_client
from btcchannel.cli._hints import hint_for
from btcchannel.errors import BadRequest, ChannelError, OpenTimeout

if TYPE_CHECKING:
    from btcchannel.payer.client import PayerClient
    from btcchannel.payer.metered import MeteredPayer
    from btcchannel.payer.views import Progress

__all__ = ["COMMANDS", "backup", "fetch", "list_cmd", "open_cmd", "pay", "refreshed_tip", "refund"]

_MINE = "btcchannel regtest mine 1"


@click.command("open")
@click.argument("url")
@click.option("--deposit-sat", type=click.IntRange(1), default=None, help="The deposit (required unless --funding-tx).")
@click.option(
    "--lifetime-blocks",
    type=click.IntRange(1),
    default=None,
    help="Blocks until the expiry (required unless --funding-tx).",
)
@click.option(
    "--fee-rate",
    type=click.FloatRange(1.0),
    default=None,
    help="Funding fee rate, sat/vB [default: the wallet's estimate].",
)
@click.option("--no-wait", is_flag=True, help="Return once funded, without waiting for the channel to open.")
@click.option("--max-price-sat", type=click.IntRange(0), default=None, help="Refuse a payee asking more per unit.")
@click.option(
    "--max-total-sat",
    type=click.IntRange(1),
    default=None,
    help="The most this channel may ever pay (proposed as the agreed total).",
)
@click.option("--max-credit-sat", type=click.IntRange(0), default=None, help="Refuse a larger postpay credit limit.")
@click.option("--mode", type=click.Choice(["prepay", "postpay"]), default=None, help="Refuse any other mode.")
@click.option("--max-units", type=click.IntRange(1), default=None, help="End condition: the agreed unit count.")
@click.option(
    "--max-payments", type=click.IntRange(1), default=None, help="End condition: the agreed number of payments."
)
@click.option(
    "--end-time",
    type=click.DateTime(["%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%dT%H:%M:%S"]),
    default=None,
    help="End condition: the channel ends at this UTC time (e.g. 2030-01-01T00:00:00Z).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(0.0),
    default=600.0,
    show_default=True,
    help="Seconds to wait for the channel to open.",
)
@click.option(
    "--psbt",
    is_flag=True,
    help="Fund from any wallet: print the funding address, exact amount and an unsigned PSBT (from the "
    "--wallet, which may be watch-only) instead of paying from the node wallet, then wait for the "
    "funding in a block (--no-wait: return at once and register it later with --funding-tx).",
)
@click.option(
    "--funding-tx",
    default=None,
    metavar="HEX",
    help="Register this signed transaction (the external wallet's) as the funding of the proposal to URL "
    "made with --psbt; it is checked, broadcast and reported to the payee.",
)
@click.option("--channel", "channel_id", default=None, help="--funding-tx: the proposal [default: the newest to URL].")
@click.option(
    "--refund-address",
    default=None,
    help="Where the payer's change and refund go [default: a new address of the node wallet].",
)
@click.pass_obj
def open_cmd(
    settings: Settings,
    url: str,
    deposit_sat: int | None,
    lifetime_blocks: int | None,
    fee_rate: float | None,
    no_wait: bool,
    max_price_sat: int | None,
    max_total_sat: int | None,
    max_credit_sat: int | None,
    mode: str | None,
    max_units: int | None,
    max_payments: int | None,
    end_time: datetime | None,
    timeout: float,
    psbt: bool,
    funding_tx: str | None,
    channel_id: str | None,
    refund_address: str | None,
) -> None:
    """Open a channel to a payee: check its terms against the limits given, propose, fund from the
    node wallet, wait until open.

    Progress (the funding txid, then its confirmations) goes to stderr. A wait that runs
    out leaves the channel funded: it opens once the funding confirms. On regtest no block
    comes by itself: mine one (btcchannel regtest mine 1) while open waits, or use --no-wait.

    With --psbt the deposit comes from any wallet: sign the printed PSBT (or pay the exact
    amount to the address) within the payee's proposal lifetime (10 minutes by default).
    Under --json that funding request is one JSON line on stdout before the final document.

    \b
    Example:
      btcchannel --wallet payer open http://127.0.0.1:8402 --deposit-sat 100000 --lifetime-blocks 144 \\
          --max-price-sat 100 --max-total-sat 50000 --end-time 2030-01-01T00:00:00Z
      btcchannel --wallet watchonly open http://127.0.0.1:8402 --deposit-sat 100000 --lifetime-blocks 144 \\
          --psbt --no-wait
      btcchannel open http://127.0.0.1:8402 --funding-tx 0200000000010...
    """
    from btcchannel.core.terms import PayerLimits
    from btcchannel.payer.commands import opened_doc

    limits = PayerLimits(
        max_price_sat=max_price_sat,
        max_total_sat=max_total_sat,
        max_credit_limit_sat=max_credit_sat,
        mode=mode,
        max_units=max_units,
        max_payments=max_payments,
        end_time=int(end_time.replace(tzinfo=timezone.utc).timestamp()) if end_time is not None else None,
    )

    on_regtest = settings.network == "regtest"
    progress = _open_progress_printer(settings, wait_s=None if no_wait else timeout)

    async def run(client: PayerClient) -> dict[str, Any]:
        if funding_tx is not None:
            cid = await _fund_externally(client, url, channel_id, funding_tx, progress)
        elif psbt:
            assert deposit_sat is not None and lifetime_blocks is not None
            cid = await _open_with_psbt(
                client,
                settings,
                url,
                deposit_sat,
                lifetime_blocks,
                limits,
                progress,
                fee_rate,
                refund_address,
                no_wait,
                timeout,
            )
            if no_wait:
                return await client.status(cid)
        else:
            assert deposit_sat is not None and lifetime_blocks is not None
            cid = await client.open_channel(
                url,
                deposit_sat,
                lifetime_blocks,
                wait_open=not no_wait,
                open_timeout=timeout,
                progress=progress,
                limits=limits,
                payer_address=refund_address,
            )
        if not no_wait and (psbt or funding_tx is not None):
            await client.wait_open(cid, timeout, progress=progress)
        return await opened_doc(client, cid)

    if funding_tx is None and (deposit_sat is None or lifetime_blocks is None):
        raise click.UsageError("--deposit-sat and --lifetime-blocks are required (except with --funding-tx)")
    client_kw: dict[str, Any] = {"fee_rate_sat_vb": fee_rate}
    try:
        obj = run_async(with_client(settings, run, **client_kw))
    except OpenTimeout as e:
        if not on_regtest:
            raise
        fail(e, settings.json, hint=f"{hint_for(e)}; on regtest mine a block for it: `{_MINE}`")
    if obj["state"] == "proposed":
        emit(
            settings,
            obj,
            f"channel {obj['channel_id']} proposed: fund it, then "
            f"`btcchannel open {url} --funding-tx HEX --channel {obj['channel_id']}`",
        )
        return
    state = obj["state"]
    after = "" if state == "open" else "; it opens once the funding confirms (`btcchannel list` shows it)"
    if state != "open" and on_regtest:
        after += f"; on regtest confirm it with `{_MINE}`"
    emit(
        settings,
        obj,
        f"channel {obj['channel_id']} {state}: deposit {obj['deposit_sat']} sat, "
        f"expiry height {obj['expiry_height']}, funding {obj.get('funding_txid')}{after}",
    )


def _open_progress_printer(settings: Settings, wait_s: float | None) -> Progress:
    """What ``open`` says on stderr at each step (nothing under ``--json``); ``wait_s``: how long it
    waits for the channel to open (None: it does not wait). On regtest it says how to mine."""
    on_regtest = settings.network == "regtest"

    def progress(event: str, f: dict[str, Any]) -> None:
        if settings.json:
            return
        if event == "proposed":
            line = (
                f"channel {f['channel_id']} proposed: deposit {f['deposit_sat']} sat, "
                f"expiry height {f['expiry_height']}"
            )
        elif event == "funded":
            fee = "" if f["fee_sat"] is None else f" (fee {f['fee_sat']} sat, {f['fee_rate_sat_vb']} sat/vB)"
            line = f"funding transaction {f['funding_txid']} broadcast{fee}"
            if on_regtest and wait_s is not None:  # said at once: nothing else will confirm it
                line += (
                    f"\nregtest mines no block by itself: run `{_MINE}` (in another terminal) to confirm "
                    f"the funding; waiting up to {wait_s:g} s"
                )
        elif event == "confirmations":
            line = f"waiting for confirmations: {f['confirmations']}/{f['needed']}"
            if on_regtest and f["confirmations"] < f["needed"]:
                line += f" (regtest: `{_MINE}`)"
        else:
            line = f"channel {f['channel_id']} is open"
        click.echo(line, err=True)

    return progress


async def _fund_externally(
    client: PayerClient, url: str, channel_id: str | None, funding_tx: str, progress: Any
) -> str:
    """Register ``funding_tx`` as the funding of the proposal to ``url`` (``channel_id`` or the newest)."""
    from btcchannel.payer.external import fund_with_tx, pending_proposal

    cid = pending_proposal(client, url, channel_id)
    outpoint = await fund_with_tx(client, cid, funding_tx)
    progress("funded", {"channel_id": cid, "funding_txid": outpoint.txid, "fee_sat": None, "fee_rate_sat_vb": None})
    return cid


async def _open_with_psbt(
    client: PayerClient,
    settings: Settings,
    url: str,
    deposit_sat: int,
    lifetime_blocks: int,
    limits: Any,
    progress: Any,
    fee_rate: float | None,
    refund_address: str | None,
    no_wait: bool,
    timeout: float,
) -> str:
    """Propose, print what funds the channel (stdout, at once), then wait for the funding in a block."""
    from btcchannel.payer.external import funding_request, wait_for_funding

    cid = await client.propose(
        url, deposit_sat, lifetime_blocks, limits=limits, progress=progress, payer_address=refund_address
    )
    req = await funding_request(client, cid, fee_rate_sat_vb=fee_rate)
    if settings.json:
        click.echo(json.dumps(req))
    else:
        click.echo(f"pay exactly {req['amount_btc']} BTC ({req['amount_sat']} sat) to {req['funding_address']}")
        click.echo(f"funding output descriptor: {req['descriptor']}")
        click.echo(f"unsigned PSBT: {req['psbt']}" if req["psbt"] else f"no PSBT ({req['psbt_problem']})")
        click.echo(f"then: btcchannel open {url} --funding-tx SIGNED_TX_HEX --channel {cid}")
    sys.stdout.flush()
    if not no_wait:
        outpoint = await wait_for_funding(client, cid, timeout)
        progress("funded", {"channel_id": cid, "funding_txid": outpoint.txid, "fee_sat": None, "fee_rate_sat_vb": None})
    return cid


@click.command()
@click.argument("channel_id")
@click.option(
    "--amount-sat",
    type=click.IntRange(1),
    required=True,
    help="How much MORE to pay (an increment, added to the channel's total).",
)
@click.pass_obj
def pay(settings: Settings, channel_id: str, amount_sat: int) -> None:
    """Pay AMOUNT more through a channel (signed, stored, then sent), at will: for a payee
    that sets no price per unit (serve without --price-sat).

    The payee holds the channel's running total: paying 1000 twice makes a total of 2000.
    The answer shows the increment, the new total and what remains of the deposit; paying
    the whole remainder ends the channel (the payee closes it). A metered channel (the
    payee sells units at a price) pays for the units it buys with fetch; pay refuses it
    with metered_channel.

    \b
    Example:
      btcchannel pay 5f0c...e1 --amount-sat 1000
    """
    from btcchannel.payer.commands import pay_doc

    doc = run_async(with_client(settings, lambda client: pay_doc(client, channel_id, amount_sat)))
    text = (
        f"paid {doc['increment_sat']} sat more: total {doc['amount_sat']} of the {doc['deposit_sat']} sat "
        f"deposit, {doc['remaining_sat']} sat remaining"
    )
    if doc["closing"]:
        text += f"\nthe channel is now {doc['state']}: the payee closes it with this total; open a new one to pay more"
    emit(settings, doc, text)


@click.command()
@click.argument("url")
@click.option(
    "--channel", "channel_id", default=None, help="Channel to pay with [default: an open one to the route's payee]."
)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the body here.")
@click.option("--method", default="GET", show_default=True, help="The HTTP method of the request.")
@click.option(
    "--deposit-sat",
    type=click.IntRange(1),
    default=None,
    help="Open a channel with this deposit when none to the route's payee can pay.",
)
@click.option(
    "--lifetime-blocks",
    type=click.IntRange(1),
    default=144,
    show_default=True,
    help="The lifetime of a channel opened by --deposit-sat.",
)
@click.option("--max-price-sat", type=click.IntRange(0), default=None, help="Refuse a route asking more per unit.")
@click.option(
    "--max-total-sat",
    type=click.IntRange(1),
    default=None,
    help="Refuse a route costing more; a channel opened here agrees on this total.",
)
@click.pass_obj
def fetch(
    settings: Settings,
    url: str,
    channel_id: str | None,
    out: Path | None,
    method: str,
    deposit_sat: int | None,
    lifetime_blocks: int,
    max_price_sat: int | None,
    max_total_sat: int | None,
) -> None:
    """Request a paid URL and pay exactly what its 402 asks; a /v1/file URL fetches every chunk.

    The route's 402 names its price, its units and its payee's protocol URL: the request is paid
    through an open channel to that URL, else (with --deposit-sat) through one opened there
    under --max-price-sat/--max-total-sat; without one the error names the `open` command.
    The body goes to --out, else to stdout (under --json: base64 in the document's body_base64).

    \b
    Example:
      btcchannel fetch http://127.0.0.1:8080/answer --deposit-sat 20000 --max-price-sat 1
      btcchannel fetch http://127.0.0.1:8402/v1/file --out data.bin
    """
    from btcchannel.payer.buy import Budget, NoChannel, ask_price, channel_for_challenge
    from btcchannel.payer.commands import acked_sat, channel_totals
    from btcchannel.payer.metered import MeteredPayer

    budget = Budget(
        max_price_sat=max_price_sat,
        max_total_sat=max_total_sat,
        deposit_sat=deposit_sat,
        lifetime_blocks=lifetime_blocks,
    )

    async def run(client: PayerClient) -> dict[str, Any]:
        if url.rstrip("/").endswith("/v1/file"):
            cid = channel_id or await client.pick_channel(url)
            await client.wait_open(cid, timeout=600.0)
            body, units = await _fetch_file(MeteredPayer(client, cid), url.rstrip("/"), settings)
            paid = None
        else:
            challenge, status, body = await ask_price(client, url, method)
            if challenge is None:  # a free answer
                cid, units, paid = None, 0, 0
                if status >= 400:
                    raise BadRequest(f"{url}: HTTP {status}")
            else:
                cid = await channel_for_challenge(
                    client, challenge, budget, channel_id=channel_id, progress=None if settings.json else _open_progress
                )
                payer = MeteredPayer(client, cid)
                before = acked_sat(client, cid)
                units = challenge.units_for(await payer.metering())
                answer = await payer.request(url, method, units=units)
                body = answer.body
                paid = acked_sat(client, cid) - before
        if out is not None:
            out.write_bytes(body)
        elif not settings.json:
            sys.stdout.buffer.write(body)
        doc: dict[str, Any] = {
            "channel_id": cid,
            "bytes": len(body),
            "units": units,
            "paid_sat": paid,
            "out": str(out) if out else None,
        }
        if cid is not None:
            doc.update(channel_totals(client, cid))
        if out is None and settings.json:
            doc["body_base64"] = base64.b64encode(body).decode()
        return doc

    try:
        doc = run_async(with_client(settings, run))
    except NoChannel as exc:
        fail(
            exc,
            settings.json,
            hint=f"open one at the protocol URL the route names: {exc.open_command}, "
            f"or pass --deposit-sat to open it here",
        )
    if settings.json or out is not None:
        emit(
            settings,
            doc,
            f"fetched {doc['bytes']} bytes in {doc['units']} paid units; "
            f"channel {doc['channel_id']} total {doc.get('amount_sat')} sat",
        )


def refreshed_tip(settings: Settings) -> tuple[int | None, ChannelError | None]:
    """The payer's channels brought up to the chain's and their payees' view
    (:meth:`~btcchannel.payer.client.PayerClient.refresh`); the tip height, or None and the error
    when no node answers (the stored view then stands)."""
    try:
        return run_async(with_client(settings, lambda client: client.refresh())), None
    except ChannelError as e:
        return None, e


def _open_progress(event: str, f: dict[str, Any]) -> None:
    """What ``fetch`` says on stderr while it opens a channel."""
    if event == "funded":
        click.echo(f"opening channel {f['channel_id']}: funding transaction {f['funding_txid']} broadcast", err=True)
    elif event == "confirmations":
        click.echo(f"waiting for confirmations: {f['confirmations']}/{f['needed']}", err=True)


async def _fetch_file(payer: MeteredPayer, url: str, settings: Settings) -> tuple[bytes, int]:
    """Every chunk of the file at ``url``, paid one by one, with a progress bar on a terminal."""
    meta = await payer.client.get_object(url)
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


@click.command()
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
    doc = run_async(
        with_client(
            settings, lambda client: client.refund_details(channel_id, fee_rate_sat_vb=fee_rate, dest_address=address)
        )
    )
    emit(
        settings,
        doc,
        f"refund {doc['refund_txid']} broadcast: {doc['amount_sat']} sat back, "
        f"fee {doc['fee_sat']} sat ({doc['fee_rate_sat_vb']} sat/vB)",
    )


@click.command("list")
@click.pass_obj
def list_cmd(settings: Settings) -> None:
    """List the payer's channels as the chain sees them (with a node: closes confirmed, expiries passed).

    \b
    Example:
      btcchannel list
    """
    from btcchannel.payer.commands import channel_list, has_channels

    tip: int | None = None
    node_error: ChannelError | None = None
    if has_channels(settings.datadir):  # the chain's view, and the payee's for channels the chain has moved on
        tip, node_error = refreshed_tip(settings)
        if node_error is not None:  # no node: the stored view, said to be one
            warn_node_unknown(
                settings,
                node_error,
                "the states below are as last stored (a funding or close may "
                "have confirmed since) and blocks_left is unknown",
            )
    objs = channel_list(settings.datadir, tip)
    rows = [
        [
            o["channel_id"],
            o["state"] + (" (expired: refundable)" if o["refundable"] else ""),
            o["amount_sat"],
            o["deposit_sat"],
            o["expiry_height"],
            "-" if o["blocks_left"] is None else o["blocks_left"],
            o["server_url"],
        ]
        for o in objs
    ]
    doc: dict[str, Any] = {"channels": objs, "tip_height": tip}
    if node_error is not None:
        doc["node_error"] = {"code": node_error.code, "message": node_error.message}
    emit(
        settings,
        doc,
        table(rows, ["channel", "state", "paid_sat", "deposit_sat", "expiry", "blocks_left", "payee"])
        if rows
        else "no channels",
    )


@click.group(cls=Group)
def backup() -> None:
    """What a payer needs to refund after losing its datadir.

    \b
    Example:
      btcchannel backup export channels.json
    """


@backup.command("export")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Overwrite FILE even if it is not a btcchannel backup.")
@click.option("--no-keys", is_flag=True, help="Leave out the keys that derive from the seed (`seed show`).")
@click.option(
    "--descriptors",
    is_flag=True,
    help="Write the channels not yet ended as output descriptors instead: a JSON array that Bitcoin "
    "Core's `importdescriptors` takes as is (private unless --no-keys).",
)
@click.pass_obj
def backup_export(settings: Settings, file: Path, force: bool, no_keys: bool, descriptors: bool) -> None:
    """Write the payer's channels (keys included unless --no-keys: keep it secret) to FILE.

    An existing FILE is replaced only if it is a payer backup (or with --force). Every
    `open` also rewrites the automatic backup (--payer-backup) before funding. With
    --descriptors, any descriptor wallet can refund the deposits after expiry from FILE
    (legacy-script channels need btcchannel and are listed as left out).

    \b
    Example:
      btcchannel backup export channels.json
      btcchannel backup export --descriptors descriptors.json
    """
    from btcchannel.payer.commands import export_backup, export_descriptors

    if descriptors:
        found = export_descriptors(settings.datadir, file, keys=not no_keys, replace_any=force)
        left = "".join(f"\nleft out {d['channel_id']}: {d['reason']}" for d in found.left_out)
        emit(
            settings,
            {"file": str(file), "descriptors": len(found.requests), "left_out": found.left_out},
            f"{len(found.requests)} channel descriptors written to {file}{left}",
        )
        return
    n = export_backup(settings.datadir, file, keys=not no_keys, replace_any=force)
    emit(settings, {"file": str(file), "channels": n}, f"{plural(n, 'channel')} written to {file}")


@backup.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.pass_obj
def backup_import(settings: Settings, file: Path) -> None:
    """Merge a backup FILE into the payer's channels.

    \b
    Example:
      btcchannel backup import channels.json
    """
    from btcchannel.payer.commands import import_backup

    n = import_backup(settings.datadir, file)
    emit(settings, {"file": str(file), "imported": n}, f"{plural(n, 'channel')} imported from {file}")


COMMANDS: tuple[click.Command, ...] = (open_cmd, pay, fetch, refund, list_cmd, backup)
