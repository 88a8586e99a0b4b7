"""The payer's commands: ``open``, ``pay``, ``fetch``, ``refund``, ``list`` and ``backup export|import``."""

from __future__ import annotations

import io
import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from btcchannel.cli._app import Group, Settings, emit, run_async, table, with_client
from btcchannel.errors import BadRequest

if TYPE_CHECKING:
    from btcchannel.payer.metered import MeteredPayer
    from btcchannel.payer.client import PayerClient

__all__ = ["COMMANDS", "backup", "fetch", "list_cmd", "open_cmd", "pay", "refund"]


@click.command("open")
@click.argument("url")
@click.option("--deposit-sat", type=click.IntRange(1), required=True)
@click.option("--lifetime-blocks", type=click.IntRange(1), required=True)
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
@click.pass_obj
def open_cmd(settings: Settings, url: str, deposit_sat: int, lifetime_blocks: int, no_wait: bool,
             max_price_sat: int | None, max_total_sat: int | None, max_credit_sat: int | None, mode: str | None,
             max_units: int | None, max_payments: int | None, end_time: datetime | None) -> None:
    """Open a channel to a payee: check its terms against the limits given, propose, fund from the
    node wallet, wait until open.

    \b
    Example:
      btcchannel --wallet payer open http://127.0.0.1:8402 --deposit-sat 100000 --lifetime-blocks 144 \\
          --max-price-sat 100 --max-total-sat 50000 --end-time 2030-01-01T00:00:00Z
    """
    from btcchannel.core.terms import PayerLimits

    limits = PayerLimits(
        max_price_sat=max_price_sat, max_total_sat=max_total_sat, max_credit_limit_sat=max_credit_sat, mode=mode,
        max_units=max_units, max_payments=max_payments,
        end_time=int(end_time.replace(tzinfo=timezone.utc).timestamp()) if end_time is not None else None,
    )
    if not settings.json:
        click.echo("funding the channel; waiting for its confirmation...", err=True)

    async def run(client: PayerClient) -> dict[str, Any]:
        cid = await client.open_channel(url, deposit_sat, lifetime_blocks, wait_open=not no_wait, limits=limits)
        return await client.status(cid)

    obj = run_async(with_client(settings, run))
    emit(settings, obj, f"channel {obj['channel_id']} {obj['state']}: deposit {obj['deposit_sat']} sat, "
                        f"expiry height {obj['expiry_height']}")


@click.command()
@click.argument("channel_id")
@click.option("--amount-sat", type=click.IntRange(1), required=True, help="How much more to pay.")
@click.pass_obj
def pay(settings: Settings, channel_id: str, amount_sat: int) -> None:
    """Pay AMOUNT more through a channel (signed, stored, then sent).

    \b
    Example:
      btcchannel pay 5f0c...e1 --amount-sat 1000
    """
    total = run_async(with_client(settings, lambda client: client.pay(channel_id, amount_sat)))
    emit(settings, {"channel_id": channel_id, "amount_sat": total}, f"paid: total {total} sat")


@click.command()
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
        cid = channel_id or client.channel_for(url)
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

    doc = run_async(with_client(settings, run))
    if settings.json or out is not None:
        emit(settings, doc, f"fetched {doc['bytes']} bytes in {doc['units']} paid units; "
                            f"channel {doc['channel_id']} total {doc['amount_sat']} sat")


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
    txid = run_async(with_client(
        settings, lambda client: client.refund(channel_id, fee_rate_sat_vb=fee_rate, dest_address=address)))
    emit(settings, {"channel_id": channel_id, "refund_txid": txid}, f"refund broadcast: {txid}")


@click.command("list")
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
         table(rows, ["channel", "state", "paid_sat", "deposit_sat", "expiry", "payee"]) if rows else "no channels")


@click.group(cls=Group)
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


COMMANDS: tuple[click.Command, ...] = (open_cmd, pay, fetch, refund, list_cmd, backup)
