"""The root of the ``btcchannel`` command line and what every command shares.

:class:`Settings` (the global options, also settable as ``BTCCHANNEL_<NAME>``),
the root group :func:`main`, :func:`emit` for output, :func:`make_node` and the
``with_node``/``with_client`` runners. :class:`Group` is the one place where a
library error (:class:`ChannelError`) becomes ``error: <code>: <message>`` on
stderr and exit status 1 (usage errors exit with 2, as click does).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from btcchannel.errors import ChannelError, NodeUnavailable

if TYPE_CHECKING:
    from btcchannel.bitcoind.rpc import Node
    from btcchannel.payer.client import PayerClient

__all__ = [
    "EXIT_ERROR", "EXIT_INTERRUPTED", "Group", "Settings", "default_datadir", "emit", "fail", "main",
    "make_node", "run_async", "table", "with_client", "with_node",
]

T = TypeVar("T")

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


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
        """Where ``btcchannel regtest start`` keeps its node."""
        return self.datadir / "regtest-node"


def default_datadir() -> Path:
    """``$XDG_DATA_HOME/btcchannel`` (``~/.local/share/btcchannel`` without it)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "btcchannel"


def fail(error: ChannelError) -> NoReturn:
    """One line ``error: <code>: <message>`` on stderr, then exit status 1."""
    click.echo(f"error: {error.code}: {error.message}", err=True)
    sys.exit(EXIT_ERROR)


def emit(settings: Settings, document: dict[str, Any], text: str) -> None:
    """One JSON document with ``--json``, else the human text."""
    if settings.json:
        click.echo(json.dumps(document, sort_keys=True))
    else:
        click.echo(text)


def table(rows: list[list[Any]], header: list[str]) -> str:
    """Left-aligned columns under ``header``."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


class Group(click.Group):
    """A click group that turns library errors into one clear line."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ChannelError as e:
            fail(e)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)


@click.group(cls=Group, context_settings={"auto_envvar_prefix": "BTCCHANNEL", "help_option_names": ["-h", "--help"]})
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


def make_node(settings: Settings, default_wallet: str) -> Node:
    """The node of the global options, else the background regtest node of ``regtest start``."""
    from btcchannel.bitcoind.regtest import recorded_rpc
    from btcchannel.bitcoind.rpc import Node

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
    """Run one command's coroutine to completion."""
    return asyncio.run(coro)


async def with_node(settings: Settings, wallet: str, body: Callable[[Node], Awaitable[T]]) -> T:
    """``body(node)`` with the settings' node (``wallet`` unless ``--wallet``), closed afterwards."""
    node = make_node(settings, wallet)
    try:
        return await body(node)
    finally:
        await node.aclose()


async def with_client(settings: Settings, body: Callable[[PayerClient], Awaitable[T]]) -> T:
    """``body(client)`` with a payer client on the settings' datadir and the ``payer`` wallet."""
    from btcchannel.payer.client import PayerClient

    async def inner(node: Node) -> T:
        async with PayerClient(settings.datadir, node, network=settings.network) as client:
            return await body(client)

    return await with_node(settings, "payer", inner)
