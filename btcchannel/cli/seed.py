"""The datadir's seeds: ``seed show`` and ``seed restore`` (each role's channel keys derive from its seed)."""

from __future__ import annotations

from typing import TextIO

import click

from btcchannel.cli._app import Group, Settings, emit, read_secret
from btcchannel.errors import BadRequest

__all__ = ["COMMANDS", "seed"]

_WARNING = (
    "WARNING: anyone who has this seed has every channel key of this datadir (the payer's refunds, "
    "the payee's closes). Write it down, keep it offline and never share it."
)
_ROLE = click.option(
    "--role",
    type=click.Choice(["payer", "payee"]),
    default="payer",
    show_default=True,
    help="Whose seed: the payer's (payer.db) or the payee's (payee.db).",
)


def _seed_info(settings: Settings, role: str) -> tuple[bytes, int]:
    """``role``'s seed (created if there is none) and next key index."""
    if role == "payee":
        from btcchannel.payee.commands import seed_info as payee_seed

        return payee_seed(settings.datadir)
    from btcchannel.payer.commands import seed_info as payer_seed

    return payer_seed(settings.datadir)


def _restore_seed(settings: Settings, role: str, value: bytes) -> tuple[bool, int]:
    """Install ``value`` as ``role``'s seed; whether it was new and how many keys were restored."""
    if role == "payee":
        from btcchannel.payee.commands import restore_seed as payee_restore

        return payee_restore(settings.datadir, value)
    from btcchannel.payer.commands import restore_seed as payer_restore

    return payer_restore(settings.datadir, value)


@click.group(cls=Group)
def seed() -> None:
    """The seed every channel key of this datadir derives from (BIP32, m/<index>'), one per role.

    \b
    Example:
      btcchannel seed show
    """


@seed.command("show")
@_ROLE
@click.pass_obj
def seed_show(settings: Settings, role: str) -> None:
    """Print the seed (hex) and the next key index, with a warning; creates the seed if there is none.

    \b
    Example:
      btcchannel seed show --role payee
    """
    value, nxt = _seed_info(settings, role)
    emit(
        settings,
        {"seed": value.hex(), "next_key_index": nxt, "warning": _WARNING},
        f"{_WARNING}\nseed: {value.hex()}\nnext key index: {nxt}",
    )


@seed.command("restore")
@click.argument("seed_hex", required=False)
@click.option(
    "--from-file",
    "from_file",
    type=click.File("r"),
    default=None,
    help="Read the seed from this file's first line ('-': standard input) instead of SEED_HEX, "
    "so it appears in no process list or shell history.",
)
@_ROLE
@click.pass_obj
def seed_restore(settings: Settings, seed_hex: str | None, from_file: TextIO | None, role: str) -> None:
    """Install SEED_HEX (from `seed show`) and re-derive every missing channel key from it.

    Each derived key is checked against the channel's stored public key. A datadir that
    already has another seed is refused. Then `backup import` a backup written without keys,
    before opening any channel (new indexes start past the imported ones only).

    \b
    Example:
      btcchannel seed restore --from-file - < seed.txt
    """
    if (seed_hex is None) == (from_file is None):
        raise click.UsageError("give SEED_HEX or --from-file (not both)")
    if from_file is not None:
        seed_hex = read_secret(from_file, "--from-file")
    assert seed_hex is not None
    try:
        value = bytes.fromhex(seed_hex)
    except ValueError:
        raise BadRequest("the seed must be hex") from None
    installed, n = _restore_seed(settings, role, value)
    emit(
        settings,
        {"installed": installed, "keys_restored": n},
        f"seed {'installed' if installed else 'already present'}; {n} channel keys restored",
    )


COMMANDS: tuple[click.Command, ...] = (seed,)
