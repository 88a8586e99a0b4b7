"""``btcchannel config show``: the settings in effect, from flags, environment, config file and defaults."""

from __future__ import annotations

import json
from typing import Any

import click

from btcchannel.cli._app import Settings, emit, node_endpoint
from btcchannel.cli._config import mask
from btcchannel.errors import ChannelError

__all__ = ["COMMANDS", "config", "show"]


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))


def _text(file: str | None, tables: dict[str, dict[str, dict[str, Any]]]) -> str:
    lines = [f"# config file: {file or 'none'}"]
    for name, entries in tables.items():
        lines += ["", f"[{name}]"]
        width = max(len(k) for k in entries)
        for key, e in entries.items():
            if e["value"] is None:
                lines.append(f"# {key:{width}}  (not set; {e['source']})")
            else:
                lines.append(f"{key} = {_toml(e['value'])}  # {e['source']}")
    return "\n".join(lines)


@click.group()
def config() -> None:
    """The configuration file (--config FILE or BTCCHANNEL_CONFIG): [global] for the global
    options, one table per command ([serve], [open], [regtest.mine]...), keys as on the
    command line.

    \b
    Example:
      btcchannel --config btcchannel.toml config show
    """


@config.command()
@click.pass_context
def show(ctx: click.Context) -> None:
    """Print every option in effect and where it comes from (command line, environment, config
    file, default); passwords and secrets are masked. The text is itself a valid config file.

    \b
    Example:
      btcchannel --config btcchannel.toml config show
    """
    from btcchannel.cli._config import effective_settings

    root = ctx.find_root()
    settings: Settings = root.obj
    file = root.meta.get("btcchannel.config_file")
    tables = effective_settings(root)
    node = _node(settings)
    emit(
        settings,
        {"file": None if file is None else str(file), "tables": tables, "node": node},
        _text(None if file is None else str(file), tables) + "\n\n" + _node_text(node),
    )


def _node(settings: Settings) -> dict[str, Any]:
    """The node the commands would use, as derived from the settings (nothing is contacted)."""
    try:
        ep = node_endpoint(settings)
    except ChannelError as e:
        return {"rpc_url": None, "auth": None, "source": None, "problem": e.message}
    auth = f"cookie {ep.cookie}" if ep.user is None else f"user {ep.user!r} with a password"
    return {"rpc_url": mask("rpc-url", ep.url), "auth": auth, "source": ep.source, "problem": None}


def _node_text(node: dict[str, Any]) -> str:
    """The derived node as comments (the text stays a valid config file)."""
    if node["problem"] is not None:
        return f"# node: none found: {node['problem']}"
    return f"# node: {node['rpc_url']} ({node['auth']}; from {node['source']})"


COMMANDS = [config]
