"""The root of the ``btcchannel`` command line and what every command shares.

:class:`Settings` (the global options, also settable as ``BTCCHANNEL_<NAME>``),
the root group :func:`main`, :func:`emit` for output, :func:`make_node` and the
``with_node``/``with_client`` runners. :class:`Group` is the one place where a
library error (:class:`ChannelError`) becomes ``error: <code>: <message>`` and
``hint: <what to do>`` on stderr, or under ``--json`` one document
``{"error": {"code", "message", "hint"}}`` on stdout, and exit status 1 (usage
errors exit with 2, as click does). An unexpected exception is reported the
same way with code ``internal`` (its traceback only with ``-v``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO, TypeVar

import click

from btcchannel import __version__
from btcchannel.cli._hints import hint_for
from btcchannel.cli._logging import setup_logging
from btcchannel.errors import ChannelError, WrongNetwork

if TYPE_CHECKING:
    from btcchannel.bitcoind.locate import NodeEndpoint
    from btcchannel.bitcoind.rpc import Node
    from btcchannel.payer.client import PayerClient

__all__ = [
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_USAGE",
    "UsageProblem",
    "error_document",
    "Group",
    "RootGroup",
    "Settings",
    "default_datadir",
    "emit",
    "fail",
    "main",
    "make_node",
    "node_endpoint",
    "node_tip",
    "NodeEndpoint",
    "plural",
    "run_async",
    "table",
    "warn_node_unknown",
    "with_client",
    "with_node",
]

T = TypeVar("T")

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class Settings:
    """The global options, as every command sees them."""

    network: str
    root: Path
    rpc_url: str | None
    rpc_cookie: Path | None
    rpc_user: str | None
    rpc_password: str | None
    wallet: str | None
    json: bool
    verbose: int
    bitcoin_datadir: Path | None = None
    bitcoin_conf: Path | None = None
    payer_backup: Path | None = None

    @property
    def payer_backup_file(self) -> Path:
        """The payer's backup, rewritten on every open [default: <datadir>/payer-backup.json]."""
        return self.payer_backup or self.datadir / "payer-backup.json"

    @property
    def datadir(self) -> Path:
        """This network's state: ``<root>/<network>`` (one folder per network, never shared)."""
        return self.root / self.network

    @property
    def regtest_dir(self) -> Path:
        """Where ``btcchannel regtest start`` keeps its node."""
        return self.root / "regtest-node"


def default_datadir() -> Path:
    """``$XDG_DATA_HOME/btcchannel`` (``~/.local/share/btcchannel`` without it)."""
    from btcchannel.bitcoind.locate import default_datadir as library_default

    return library_default()


def error_document(error: ChannelError, hint: str | None = None) -> dict[str, Any]:
    """``{"error": {"code", "message", "hint"}}``: what ``--json`` prints for an error."""
    return {"error": {"code": error.code, "message": error.message, "hint": hint or hint_for(error)}}


def fail(error: ChannelError, as_json: bool = False, *, hint: str | None = None, status: int = EXIT_ERROR) -> NoReturn:
    """``error: <code>: <message>`` and ``hint: ...`` on stderr (one JSON document on stdout
    with ``as_json``), then exit with ``status``."""
    if as_json:
        click.echo(json.dumps(error_document(error, hint), sort_keys=True))
    else:
        click.echo(f"error: {error.code}: {error.message}", err=True)
        click.echo(f"hint: {hint or hint_for(error)}", err=True)
    sys.exit(status)


class UsageProblem(ChannelError):
    """A command line click refused (code ``usage``, exit status 2); only the CLI raises it."""

    code = "usage"
    http_status = 400


def _json_wanted(ctx: click.Context) -> bool:
    obj = ctx.find_root().obj
    return bool(obj.json) if isinstance(obj, Settings) else "--json" in sys.argv[1:]


def emit(settings: Settings, document: dict[str, Any], text: str) -> None:
    """One JSON document with ``--json``, else the human text."""
    if settings.json:
        click.echo(json.dumps(document, sort_keys=True))
    else:
        click.echo(text)


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 block``, ``2 blocks`` (``many``: the plural when it is not ``word + "s"``)."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


def warn_node_unknown(settings: Settings, error: ChannelError, unknown: str) -> None:
    """Say on stderr (not under ``--json``, whose document carries ``node_error``) that the node did
    not answer and what is therefore unknown."""
    if not settings.json:
        click.echo(f"warning: {error.code}: {error.message}", err=True)
        click.echo(f"warning: {unknown}", err=True)


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
        except WrongNetwork as e:  # the user's --network, not the other side, is wrong
            fail(e, _json_wanted(ctx), status=EXIT_USAGE)
        except ChannelError as e:
            fail(e, _json_wanted(ctx))
        except click.UsageError as e:
            if not _json_wanted(ctx):
                raise
            fail(UsageProblem(e.format_message()), True, status=EXIT_USAGE)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as e:  # noqa: BLE001 - the edge: no traceback for a user, one with -v
            obj = ctx.find_root().obj
            if isinstance(obj, Settings) and obj.verbose:
                logging.getLogger("btcchannel.cli").exception("unexpected error")
            fail(ChannelError(f"{type(e).__name__}: {e}"), _json_wanted(ctx))


class RootGroup(Group):
    """The root group: its options are also taken after the subcommand's name, as a subcommand's
    own are (``btcchannel list --json``, ``btcchannel open URL ... --wallet payer``), unless the
    subcommand has an option of the same name."""

    _NOT_MOVED = frozenset({"-h", "--help", "-V", "--version"})

    def _root_options(self) -> dict[str, click.Option]:
        return {
            name: p
            for p in self.params
            if isinstance(p, click.Option)
            for name in (*p.opts, *p.secondary_opts)
            if name not in self._NOT_MOVED
        }

    @staticmethod
    def _taken(cmd: click.Command) -> set[str]:
        """Every option name of ``cmd`` and, for a group, of its subcommands."""
        names = {n for p in cmd.params if isinstance(p, click.Option) for n in (*p.opts, *p.secondary_opts)}
        if isinstance(cmd, click.Group):
            for sub in cmd.commands.values():
                names |= RootGroup._taken(sub)
        return names

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        end = args.index("--") if "--" in args else len(args)
        root = self._root_options()

        def takes_value(p: click.Option) -> bool:
            return not p.is_flag and not p.count

        sub = 0
        while sub < end and args[sub] not in self.commands:
            p = root.get(args[sub])
            sub += 2 if p is not None and takes_value(p) else 1
        if sub >= end:
            return super().parse_args(ctx, args)
        taken = self._taken(self.commands[args[sub]])
        moved: list[str] = []
        rest: list[str] = []
        i = sub + 1
        while i < end:
            token = args[i]
            name = token.split("=", 1)[0] if token.startswith("--") else token
            if re.fullmatch(r"-v+", token) and "-v" not in taken:
                moved.append(token)
                i += 1
                continue
            p = root.get(name)
            if p is None or name in taken:
                rest.append(token)
                i += 1
                continue
            width = 2 if takes_value(p) and "=" not in token else 1
            moved += args[i : i + width]
            i += width
        return super().parse_args(ctx, [*args[:sub], *moved, args[sub], *rest, *args[end:]])


_CONFIG_PROBLEM = "btcchannel.config_problem"


def _load_config(ctx: click.Context, param: click.Parameter, value: Path | None) -> None:
    """``--config FILE``: the file becomes the default map (below flags and environment); a bad
    file is kept to be reported once ``--json`` is known."""
    if value is None or ctx.resilient_parsing:
        return
    from btcchannel.cli._config import ConfigProblem, build_default_map

    assert isinstance(ctx.command, click.Group)
    try:
        ctx.default_map = {**(ctx.default_map or {}), **build_default_map(value, ctx.command, ctx)}
    except ConfigProblem as e:
        ctx.meta[_CONFIG_PROBLEM] = e
    ctx.meta["btcchannel.config_file"] = value


@click.group(
    cls=RootGroup, context_settings={"auto_envvar_prefix": "BTCCHANNEL", "help_option_names": ["-h", "--help"]}
)
@click.option(
    "--config",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="BTCCHANNEL_CONFIG",
    is_eager=True,
    expose_value=False,
    callback=_load_config,
    help="A TOML file of options: [global] for these, [serve], [open]... for each command "
    "(flags and BTCCHANNEL_* variables win over it).",
)
@click.option(
    "--network",
    default="regtest",
    show_default=True,
    type=click.Choice(["mainnet", "testnet", "testnet4", "signet", "regtest"]),
)
@click.option(
    "--datadir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where btcchannel keeps its state, one subfolder per network [default: $XDG_DATA_HOME/btcchannel].",
)
@click.option(
    "--rpc-url",
    default=None,
    help="bitcoind RPC URL [default: as bitcoin-cli: rpcconnect/rpcport of bitcoin.conf, "
    "else the network's port, e.g. http://127.0.0.1:38332 on signet].",
)
@click.option(
    "--rpc-cookie",
    type=click.Path(path_type=Path),
    default=None,
    help="bitcoind's .cookie file [default: <bitcoin datadir>/<network>/.cookie].",
)
@click.option(
    "--bitcoin-datadir",
    type=click.Path(path_type=Path),
    default=None,
    help="bitcoind's -datadir, to find its cookie and bitcoin.conf [default: ~/.bitcoin].",
)
@click.option(
    "--bitcoin-conf",
    type=click.Path(path_type=Path),
    default=None,
    help="bitcoind's -conf [default: <bitcoin datadir>/bitcoin.conf].",
)
@click.option(
    "--payer-backup",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The payer's backup, rewritten before every funding (put it on another disk) "
    "[default: <datadir>/<network>/payer-backup.json].",
)
@click.option("--rpc-user", default=None)
@click.option("--rpc-password", default=None, help="Also $BTCCHANNEL_RPC_PASSWORD, or --rpc-password-file.")
@click.option(
    "--rpc-password-file",
    type=click.File("r"),
    default=None,
    help="Read the RPC password from this file's first line ('-': standard input).",
)
@click.option("--wallet", default=None, help="bitcoind wallet name.")
@click.option(
    "--json", "as_json", is_flag=True, envvar="BTCCHANNEL_JSON", help="Machine-readable output: one JSON document."
)
@click.option("-v", "--verbose", count=True, help="Log to stderr (-v info: payments, closes; -vv debug).")
@click.option("--log-json", is_flag=True, help="Log one JSON object per line.")
@click.version_option(__version__, "-V", "--version", prog_name="btcchannel", message="%(prog)s %(version)s")
@click.pass_context
def main(
    ctx: click.Context,
    network: str,
    datadir: Path | None,
    rpc_url: str | None,
    rpc_cookie: Path | None,
    bitcoin_datadir: Path | None,
    bitcoin_conf: Path | None,
    payer_backup: Path | None,
    rpc_user: str | None,
    rpc_password: str | None,
    rpc_password_file: TextIO | None,
    wallet: str | None,
    as_json: bool,
    verbose: int,
    log_json: bool,
) -> None:
    """Unidirectional Bitcoin payment channels.

    The options below may also follow the command's name (btcchannel list --json).

    \b
    Example:
      btcchannel regtest start && btcchannel regtest mine 10
    """
    problem = ctx.meta.get(_CONFIG_PROBLEM)
    if problem is not None:
        fail(problem, as_json, status=EXIT_USAGE)
    setup_logging(verbose, log_json)
    if rpc_password_file is not None:
        if rpc_password is not None:
            raise click.UsageError("give --rpc-password or --rpc-password-file, not both")
        rpc_password = read_secret(rpc_password_file, "--rpc-password-file")
    ctx.obj = Settings(
        network=network,
        root=datadir or default_datadir(),
        rpc_url=rpc_url,
        rpc_cookie=rpc_cookie,
        rpc_user=rpc_user,
        rpc_password=rpc_password,
        wallet=wallet,
        json=as_json,
        verbose=verbose,
        bitcoin_datadir=bitcoin_datadir,
        bitcoin_conf=bitcoin_conf,
        payer_backup=payer_backup,
    )


def read_secret(source: TextIO, what: str) -> str:
    """A secret given in a file (or on standard input): its first line, without the line end, so it
    never has to appear on a command line (the process list, the shell's history)."""
    value = source.readline().rstrip("\r\n")
    if not value:
        raise click.UsageError(f"{what}: the first line is empty")
    return value


def node_endpoint(settings: Settings) -> NodeEndpoint:
    """The node of the global options; else, on regtest, the background node of ``regtest start``
    (in this datadir, else in the default one); else the network's node found as bitcoin-cli
    finds it (port and cookie from the network, ``--bitcoin-datadir`` and ``--bitcoin-conf``):
    :func:`btcchannel.bitcoind.locate.locate_node`. ``NodeUnavailable`` when none is found."""
    from btcchannel.bitcoind.locate import locate_node

    return locate_node(
        settings.network,
        rpc_url=settings.rpc_url,
        rpc_cookie=settings.rpc_cookie,
        rpc_user=settings.rpc_user,
        rpc_password=settings.rpc_password,
        bitcoin_datadir=settings.bitcoin_datadir,
        bitcoin_conf=settings.bitcoin_conf,
        regtest_dirs=(settings.regtest_dir, default_datadir() / "regtest-node"),
    )


def make_node(settings: Settings, default_wallet: str) -> Node:
    """A client of :func:`node_endpoint`'s node (``default_wallet`` unless ``--wallet``); a node
    that does not answer at all is reported as such, not as a missing cookie."""
    from btcchannel.bitcoind.locate import node_client

    return node_client(node_endpoint(settings), settings.wallet or default_wallet)


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run one command's coroutine to completion."""
    return asyncio.run(coro)


def node_tip(settings: Settings, wallet: str) -> tuple[int | None, ChannelError | None]:
    """The node's tip height, or None and the error when no node answers (a listing needs none)."""

    async def tip(node: Node) -> int:
        return await node.tip_height()

    try:
        return run_async(with_node(settings, wallet, tip)), None
    except ChannelError as e:
        return None, e


async def with_node(settings: Settings, wallet: str, body: Callable[[Node], Awaitable[T]]) -> T:
    """``body(node)`` with the settings' node (``wallet`` unless ``--wallet``), closed afterwards."""
    node = make_node(settings, wallet)
    try:
        return await body(node)
    finally:
        await node.aclose()


async def with_client(settings: Settings, body: Callable[[PayerClient], Awaitable[T]], **client_kw: Any) -> T:
    """``body(client)`` with a payer client on the settings' datadir and the ``payer`` wallet
    (``client_kw``: more arguments of :class:`PayerClient`, e.g. ``fee_rate_sat_vb``)."""
    from btcchannel.payer.client import PayerClient

    async def inner(node: Node) -> T:
        client_kw.setdefault("backup_file", settings.payer_backup_file)
        async with PayerClient(settings.datadir, node, network=settings.network, **client_kw) as client:
            return await body(client)

    return await with_node(settings, "payer", inner)
