"""``btcchannel config show``: the settings in effect, from flags, environment, config file and defaults."""

from __future__ import annotations

import json
from typing import Any

import click

from btcchannel.cli._app import Settings, emit

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
    emit(settings, {"file": None if file is None else str(file), "tables": tables},
         _text(None if file is None else str(file), tables))


COMMANDS = [config]
