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

from btcchannel.cli._app import Group, Settings, emit, fail, run_async, table, with_client
from btcchannel.core.state import ChannelState
from btcchannel.errors import BadRequest, ChannelError

if TYPE_CHECKING:
    from btcchannel.payer.metered import MeteredPayer
    from btcchannel.payer.client import PayerClient

__all__ = ["COMMANDS", "backup", "fetch", "list_cmd", "open_cmd", "pay", "refund"]


@click.command("open")
@click.argument("url")
@click.option("--deposit-sat", type=click.IntRange(1), required=True)
@click.option("--lifetime-blocks", type=click.IntRange(1), required=True)
@click.option("--fee-rate", type=click.FloatRange(1.0), default=None,
              help="Funding fee rate, sat/vB [default: the wallet's estimate].")
@click.option("--no-wait", is_flag=True, help="Return once funded, without waiting for the channel to open.")
@click.option("--max-price-sat", type=click.IntRange(0), default=None, help="Refuse a payee asking more per unit.")
@click.option("--max-total-sat", type=click.IntRange(1), default=None,
              help="The most this channel may ever pay (proposed as the agreed total).")
@click.option("--max-credit-sat", type=click.IntRange(0), default=None, help="Refuse a larger postpay credit limit.")
@click.option("--mode", type=click.Choice(["prepay", "postpay"]), default=None, help="Refuse any other mode.")
@click.option("--max-units", type=click.IntRange(1), default=None, help="End condition: the agreed unit count.")
@click.option("--max-payments", type=click.IntRange(1), default=None, help="End condition: the agreed number of payments.")
@click.option("--end-time", type=click.DateTime(["%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%dT%H:%M:%S"]), default=None,
              help="End condition: the channel ends at this UTC time (e.g. 2030-01-01T00:00:00Z).")
@click.option("--timeout", type=click.FloatRange(0.0), default=600.0, show_default=True,
              help="Seconds to wait for the channel to open.")
@click.pass_obj
def open_cmd(settings: Settings, url: str, deposit_sat: int, lifetime_blocks: int, fee_rate: float | None,
             no_wait: bool, max_price_sat: int | None, max_total_sat: int | None, max_credit_sat: int | None,
             mode: str | None, max_units: int | None, max_payments: int | None, end_time: datetime | None,
             timeout: float) -> None:
    """Open a channel to a payee: check its terms against the limits given, propose, fund from the
    node wallet, wait until open.

    Progress (the funding txid, then its confirmations) goes to stderr. A wait that runs
    out leaves the channel funded: it opens once the funding confirms.

    \b
    Example:
      btcchannel --wallet payer open http://127.0.0.1:8402 --deposit-sat 100000 --lifetime-blocks 144 \\
          --max-price-sat 100 --max-total-sat 50000 --end-time 2030-01-01T00:00:00Z
    """
    from btcchannel.core.terms import PayerLimits
    from btcchannel.payer.views import mempool_fee

    limits = PayerLimits(
        max_price_sat=max_price_sat, max_total_sat=max_total_sat, max_credit_limit_sat=max_credit_sat, mode=mode,
        max_units=max_units, max_payments=max_payments,
        end_time=int(end_time.replace(tzinfo=timezone.utc).timestamp()) if end_time is not None else None,
    )

    def progress(event: str, f: dict[str, Any]) -> None:
        if settings.json:
            return
        if event == "proposed":
            line = f"channel {f['channel_id']} proposed: deposit {f['deposit_sat']} sat, expiry height {f['expiry_height']}"
        elif event == "funded":
            fee = "" if f["fee_sat"] is None else f" (fee {f['fee_sat']} sat, {f['fee_rate_sat_vb']} sat/vB)"
            line = f"funding transaction {f['funding_txid']} broadcast{fee}"
        elif event == "confirmations":
            line = f"waiting for confirmations: {f['confirmations']}/{f['needed']}"
        else:
            line = f"channel {f['channel_id']} is open"
        click.echo(line, err=True)

    async def run(client: PayerClient) -> dict[str, Any]:
        cid = await client.open_channel(url, deposit_sat, lifetime_blocks, wait_open=not no_wait,
                                        open_timeout=timeout, progress=progress, limits=limits)
        obj = await client.status(cid)
        rec = client.store.get(cid)
        obj.update(await mempool_fee(client.node, rec.funding_txid or ""))
        return obj

    client_kw: dict[str, Any] = {"fee_rate_sat_vb": fee_rate}
    obj = run_async(with_client(settings, run, **client_kw))
    state = obj["state"]
    after = "" if state == "open" else "; it opens once the funding confirms (`btcchannel list` shows it)"
    emit(settings, obj, f"channel {obj['channel_id']} {state}: deposit {obj['deposit_sat']} sat, "
                        f"expiry height {obj['expiry_height']}, funding {obj.get('funding_txid')}{after}")


@click.command()
@click.argument("channel_id")
@click.option("--amount-sat", type=click.IntRange(1), required=True,
              help="How much MORE to pay (an increment, added to the channel's total).")
@click.pass_obj
def pay(settings: Settings, channel_id: str, amount_sat: int) -> None:
    """Pay AMOUNT more through a channel (signed, stored, then sent).

    The payee holds the channel's running total: paying 1000 twice makes a total of 2000.
    The answer shows the increment, the new total and what remains of the deposit; paying
    the whole remainder ends the channel (the payee closes it).

    \b
    Example:
      btcchannel pay 5f0c...e1 --amount-sat 1000
    """
    async def run(client: PayerClient) -> dict[str, Any]:
        before = client.store.get(channel_id).acked_sat
        total = await client.pay(channel_id, amount_sat)
        rec = client.store.get(channel_id)
        return {"channel_id": channel_id, "increment_sat": total - before, "amount_sat": total,
                "deposit_sat": rec.deposit_sat, "remaining_sat": rec.deposit_sat - total,
                "state": rec.state.value, "closing": rec.state is not ChannelState.OPEN}

    doc = run_async(with_client(settings, run))
    text = (f"paid {doc['increment_sat']} sat more: total {doc['amount_sat']} of the {doc['deposit_sat']} sat "
            f"deposit, {doc['remaining_sat']} sat remaining")
    if doc["closing"]:
        text += f"\nthe channel is now {doc['state']}: the payee closes it with this total; open a new one to pay more"
    emit(settings, doc, text)


@click.command()
@click.argument("url")
@click.option("--channel", "channel_id", default=None, help="Channel to pay with [default: an open one to the route's payee].")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the body here.")
@click.option("--method", default="GET", show_default=True, help="The HTTP method of the request.")
@click.option("--deposit-sat", type=click.IntRange(1), default=None,
              help="Open a channel with this deposit when none to the route's payee can pay.")
@click.option("--lifetime-blocks", type=click.IntRange(1), default=144, show_default=True,
              help="The lifetime of a channel opened by --deposit-sat.")
@click.option("--max-price-sat", type=click.IntRange(0), default=None, help="Refuse a route asking more per unit.")
@click.option("--max-total-sat", type=click.IntRange(1), default=None,
              help="Refuse a route costing more; a channel opened here agrees on this total.")
@click.pass_obj
def fetch(settings: Settings, url: str, channel_id: str | None, out: Path | None, method: str,
          deposit_sat: int | None, lifetime_blocks: int, max_price_sat: int | None, max_total_sat: int | None) -> None:
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
    from btcchannel.payer.metered import MeteredPayer

    budget = Budget(max_price_sat=max_price_sat, max_total_sat=max_total_sat, deposit_sat=deposit_sat,
                    lifetime_blocks=lifetime_blocks)

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
                cid = await channel_for_challenge(client, challenge, budget, channel_id=channel_id,
                                                  progress=None if settings.json else _open_progress)
                payer = MeteredPayer(client, cid)
                before = client.store.get(cid).acked_sat
                units = challenge.units_for(await payer.metering())
                answer = await payer.request(url, method, units=units)
                body = answer.body
                paid = client.store.get(cid).acked_sat - before
        if out is not None:
            out.write_bytes(body)
        elif not settings.json:
            sys.stdout.buffer.write(body)
        doc: dict[str, Any] = {"channel_id": cid, "bytes": len(body), "units": units, "paid_sat": paid,
                               "out": str(out) if out else None}
        if cid is not None:
            rec = client.store.get(cid)
            doc.update({"amount_sat": rec.acked_sat, "remaining_sat": rec.deposit_sat - rec.acked_sat,
                        "state": rec.state.value})
        if out is None and settings.json:
            doc["body_base64"] = base64.b64encode(body).decode()
        return doc

    try:
        doc = run_async(with_client(settings, run))
    except NoChannel as exc:
        fail(exc, settings.json, hint=f"open one at the protocol URL the route names: {exc.open_command}, "
                                      f"or pass --deposit-sat to open it here")
    if settings.json or out is not None:
        emit(settings, doc, f"fetched {doc['bytes']} bytes in {doc['units']} paid units; "
                            f"channel {doc['channel_id']} total {doc.get('amount_sat')} sat")


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
    doc = run_async(with_client(
        settings, lambda client: client.refund_details(channel_id, fee_rate_sat_vb=fee_rate, dest_address=address)))
    emit(settings, doc, f"refund {doc['refund_txid']} broadcast: {doc['amount_sat']} sat back, "
                        f"fee {doc['fee_sat']} sat ({doc['fee_rate_sat_vb']} sat/vB)")


@click.command("list")
@click.pass_obj
def list_cmd(settings: Settings) -> None:
    """List the payer's channels as the chain sees them (with a node: closes confirmed, expiries passed).

    \b
    Example:
      btcchannel list
    """
    from btcchannel.cli._app import make_node
    from btcchannel.payer.views import refresh_from_chain
    from btcchannel.store import PayerStore

    with PayerStore(settings.datadir / "payer.db") as store:
        tip: int | None = None
        if store.list():
            async def refresh() -> int:
                node = make_node(settings, "payer")
                try:
                    return await refresh_from_chain(store, node)
                finally:
                    await node.aclose()
            try:
                tip = run_async(refresh())
            except ChannelError:
                tip = None  # no node: the stored view
        recs = store.list()
    objs: list[dict[str, Any]] = []
    for r in recs:
        left = None if tip is None else r.expiry_height - tip
        expired = left is not None and left <= 0 and r.state in (ChannelState.OPEN, ChannelState.FUNDING,
                                                                   ChannelState.CLOSING)
        objs.append({"channel_id": r.channel_id, "server_url": r.server_url, "state": r.state.value,
                     "deposit_sat": r.deposit_sat, "amount_sat": r.acked_sat, "signed_sat": r.amount_sat,
                     "expiry_height": r.expiry_height, "blocks_left": left, "refundable": expired,
                     "funding_txid": r.funding_txid, "close_txid": r.close_txid, "refund_txid": r.refund_txid})
    rows = [[o["channel_id"], o["state"] + (" (expired: refundable)" if o["refundable"] else ""), o["amount_sat"],
             o["deposit_sat"], o["expiry_height"], "-" if o["blocks_left"] is None else o["blocks_left"],
             o["server_url"]] for o in objs]
    emit(settings, {"channels": objs, "tip_height": tip},
         table(rows, ["channel", "state", "paid_sat", "deposit_sat", "expiry", "blocks_left", "payee"]) if rows
         else "no channels")


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
@click.pass_obj
def backup_export(settings: Settings, file: Path, force: bool, no_keys: bool) -> None:
    """Write the payer's channels (keys included unless --no-keys: keep it secret) to FILE.

    An existing FILE is replaced only if it is a payer backup (or with --force). Every
    `open` also rewrites the automatic backup (--payer-backup) before funding.

    \b
    Example:
      btcchannel backup export channels.json
    """
    from btcchannel.store import PayerStore
    from btcchannel.store.ops import write_payer_backup

    with PayerStore(settings.datadir / "payer.db") as store:
        data = store.export_backup(keys=not no_keys)
    write_payer_backup(data, file, replace_any=force)
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


COMMANDS: tuple[click.Command, ...] = (open_cmd, pay, fetch, refund, list_cmd, backup)
