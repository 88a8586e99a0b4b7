"""The operator's commands: ``summary`` (both roles), ``forget`` (a payer's dead channel) and
``restore`` (the payee's database from its continuous backup, closing every open channel)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from btcchannel.cli._app import Settings, emit, node_tip, plural, run_async, warn_node_unknown, with_node

__all__ = ["COMMANDS", "forget", "restore", "summary"]


@click.command()
@click.pass_obj
def summary(settings: Settings) -> None:
    """Totals for each role this datadir holds: earned or spent, pending closes, refundable, fee rates.

    \b
    Example:
      btcchannel summary
    """
    from btcchannel.cli.payer import refreshed_tip
    from btcchannel.payee import commands as payee
    from btcchannel.payee.summary import summary_text
    from btcchannel.payer import commands as payer

    has_payee, has_payer = payee.has_store(settings.datadir), payer.has_store(settings.datadir)
    tip, node_error = (
        (None, None) if not (has_payee or has_payer) else node_tip(settings, "payee" if has_payee else "payer")
    )
    doc: dict[str, Any] = {"payee": None, "payer": None, "tip_height": tip}
    if node_error is not None:
        doc["node_error"] = {"code": node_error.code, "message": node_error.message}
        warn_node_unknown(
            settings,
            node_error,
            "blocks to expiry and refundable channels are unknown; the payer's states are as last stored",
        )
    parts: list[str] = []
    if has_payee:
        doc["payee"] = payee.summary(settings.datadir, tip)
        parts.append("payee\n" + _indent(summary_text(doc["payee"])))
    if has_payer:
        payer_tip = refreshed_tip(settings)[0] if node_error is None else None  # as `list`: chain and payee
        doc["payer"] = payer.summary(settings.datadir, payer_tip if payer_tip is not None else tip)
        parts.append("payer\n" + _indent(_payer_text(doc["payer"])))
    emit(settings, doc, "\n".join(parts) if parts else f"no channels in {settings.datadir}")


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def _payer_text(doc: dict[str, Any]) -> str:
    o = doc["open"]
    unknown = doc["tip_height"] is None
    lines = [
        f"spent          {doc['spent_sat']} sat (channels closed or closing)",
        f"open           {plural(o['channels'], 'channel')}, {o['amount_sat']} sat paid, {o['remaining_sat']} sat "
        f"left of {o['deposit_sat']} sat deposits",
        "refundable now "
        + (
            "unknown (no node)"
            if unknown
            else ", ".join(f"{x['channel_id']} ({x['deposit_sat']} sat)" for x in doc["refundable"]) or "none"
        ),
        "refundable in  "
        + (
            "unknown (no node)"
            if unknown
            else ", ".join(
                f"{x['channel_id']} {plural(x['blocks_left'], 'block')}"
                for x in doc["refundable_later"]
                if x["blocks_left"] is not None
            )
            or "-"
        ),
        "channels       " + (", ".join(f"{k} {v}" for k, v in doc["channels"].items()) or "none"),
    ]
    return "\n".join(lines)


@click.command()
@click.argument("channel_id")
@click.pass_obj
def forget(settings: Settings, channel_id: str) -> None:
    """Remove a payer's channel that holds nothing: a failed or never-funded open, or one that ended.

    \b
    Example:
      btcchannel forget 5f0c...e1
    """
    from btcchannel.payer.commands import forget as forget_channel

    forget_channel(settings.datadir, channel_id)
    emit(settings, {"channel_id": channel_id, "forgotten": True}, f"channel {channel_id} forgotten")


@click.command()
@click.argument("backup_db", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Replace an existing payee.db (move it away first).")
@click.pass_obj
def restore(settings: Settings, backup_db: Path, force: bool) -> None:
    """Restore the payee's database from BACKUP_DB (serve --backup-db) and close every open channel.

    Each open or funding channel is closed at once with the best payment the backup holds;
    run `serve` afterwards to follow the closes to their confirmation.

    \b
    Example:
      btcchannel --wallet payee restore /mnt/backup/payee.db
    """
    from btcchannel.cli.payee import _server_config
    from btcchannel.payee.backup import restore_closing

    config = _server_config(settings)
    objs = run_async(with_node(settings, "payee", lambda node: restore_closing(config, node, backup_db, force=force)))
    lines = [f"{o['channel_id']} {o['state']} {o.get('close_txid') or '-'} ({o['amount_sat']} sat)" for o in objs]
    emit(
        settings,
        {"restored": str(config.db_path), "closed": objs},
        f"restored {config.db_path} from {backup_db}; "
        + (f"{plural(len(objs), 'channel')} closing:\n" + "\n".join(lines) if objs else "no open channel to close"),
    )


COMMANDS: tuple[click.Command, ...] = (summary, forget, restore)
