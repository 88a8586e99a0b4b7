"""The ``btcchannel`` command line: a thin layer over the library.

Every command calls into the library; library errors (:class:`ChannelError`)
are turned into one line on stderr with their stable code and exit status 1
here and nowhere else (usage errors exit with 2, as click does). Every global
option can also be set through ``BTCCHANNEL_<NAME>`` (e.g. ``BTCCHANNEL_RPC_URL``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import click

from btcchannel.errors import ChannelError

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
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output: one JSON document.")
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
    from btcchannel.regtest import find_bitcoind

    binary = find_bitcoind()
    emit(settings, {"version": binary.version, "source": binary.source, "command": list(binary.bitcoind)},
         f"{binary.version} ({binary.source}): {' '.join(binary.bitcoind)}")


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
    from btcchannel.regtest import RegtestNode

    try:
        node = RegtestNode.attach(settings.regtest_dir)
        already = True
    except NodeUnavailable:
        node = RegtestNode(datadir=settings.regtest_dir, die_with_parent=False)
        node.start()
        already = False
    try:
        node.prepare(201)
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
    from btcchannel.regtest import RegtestNode

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
    from btcchannel.regtest import RegtestNode

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
    from btcchannel.regtest import RegtestNode

    node = RegtestNode.attach(settings.regtest_dir)
    hashes = node.mine(blocks, address)
    height = node.tip_height()
    node.detach()
    emit(settings, {"blocks": hashes, "height": height}, f"mined {len(hashes)} blocks, height {height}")
