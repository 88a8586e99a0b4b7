"""``btcchannel regtest install|start|stop|status|mine``: a local regtest bitcoind to try btcchannel on."""

from __future__ import annotations

from typing import Any

import click

from btcchannel.cli._app import Group, Settings, emit, plural
from btcchannel.errors import ChannelError, NodeUnavailable

__all__ = ["COMMANDS", "regtest"]


@click.group(cls=Group)
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
    emit(
        settings,
        {"version": binary.version, "source": binary.source, "command": list(binary.bitcoind)},
        f"{binary.version} ({binary.source}): {' '.join(binary.bitcoind)}",
    )


def _prepare_wallets(node: Any) -> None:
    """The ``payee`` wallet and a ``payer`` wallet holding coins, as the walk-through uses them."""
    node.create_wallet("payee")
    node.create_wallet("payer")
    if node.balance_sat("payer") < 100_000_000:
        node.fund_wallet("payer", 10 * 100_000_000)


def _node_env(node: Any) -> dict[str, str]:
    """The ``BTCCHANNEL_*`` variables that point the other commands at ``node``."""
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
    from btcchannel.bitcoind.regtest import RegtestNode

    try:
        node = RegtestNode.attach(settings.regtest_dir)
        already = True
    except NodeUnavailable:  # none running yet: start one
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
    # the other commands find this node by themselves (make_node): no variables to export
    emit(
        settings,
        {**status, "already_running": already, "env": env},
        f"regtest node {'already running' if already else 'started'}: pid {status['pid']}, "
        f"height {status['blocks']}\n  RPC {status['rpc_url']}\n  datadir {status['datadir']}\n"
        "wallets payee and payer (10 BTC); the other btcchannel commands find this node by themselves",
    )


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
    node.stop()  # returns once the process has exited (its datadir free for the next start)
    emit(settings, {"stopped": True, "pid": pid}, f"regtest node stopped (pid {pid} has exited)")


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
    emit(
        settings,
        status,
        f"regtest node running: pid {status['pid']}, height {status['blocks']}, "
        f"tip {status['bestblockhash']}\n  RPC {status['rpc_url']}\n  datadir {status['datadir']}",
    )


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
    emit(settings, {"blocks": hashes, "height": height}, f"mined {plural(len(hashes), 'block')}, height {height}")


COMMANDS: tuple[click.Command, ...] = (regtest,)
