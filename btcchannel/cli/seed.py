"""The payer's seed: ``seed show`` and ``seed restore`` (channel keys derive from it)."""

from __future__ import annotations

import click

from btcchannel.cli._app import Group, Settings, emit
from btcchannel.errors import BadRequest

__all__ = ["COMMANDS", "seed"]

_WARNING = ("WARNING: anyone who has this seed can spend every channel's refund. Write it down, keep it "
            "offline and never share it.")


@click.group(cls=Group)
def seed() -> None:
    """The seed every channel key of this payer datadir derives from (BIP32, m/<index>').

    \b
    Example:
      btcchannel seed show
    """


@seed.command("show")
@click.pass_obj
def seed_show(settings: Settings) -> None:
    """Print the seed (hex) and the next key index, with a warning; creates the seed if there is none.

    \b
    Example:
      btcchannel seed show
    """
    from btcchannel.store import PayerStore

    with PayerStore(settings.datadir / "payer.db") as store:
        value, nxt = store.seed(), store.next_key_index()
    emit(settings, {"seed": value.hex(), "next_key_index": nxt, "warning": _WARNING},
         f"{_WARNING}\nseed: {value.hex()}\nnext key index: {nxt}")


@seed.command("restore")
@click.argument("seed_hex")
@click.pass_obj
def seed_restore(settings: Settings, seed_hex: str) -> None:
    """Install SEED_HEX (from `seed show`) and re-derive every missing channel key from it.

    Each derived key is checked against the channel's stored public key. A datadir that
    already has another seed is refused. Then `backup import` a backup written without keys.

    \b
    Example:
      btcchannel seed restore 5f2c...e1
    """
    from btcchannel.store import PayerStore

    try:
        value = bytes.fromhex(seed_hex)
    except ValueError:
        raise BadRequest("the seed must be hex") from None
    with PayerStore(settings.datadir / "payer.db") as store:
        installed = store.restore_seed(value)
        n = store.restore_keys()
    emit(settings, {"installed": installed, "keys_restored": n},
         f"seed {'installed' if installed else 'already present'}; {n} channel keys restored")


COMMANDS: tuple[click.Command, ...] = (seed,)
