"""The configuration file (``--config FILE`` or ``BTCCHANNEL_CONFIG``): TOML, one table per command.

``[global]`` holds the global options (``network``, ``datadir``, ``rpc-url``, ``wallet``...),
``[serve]``, ``[open]``... the options of each command, ``[regtest.start]`` those of a
subcommand; keys are the option names as on the command line, without the dashes. The file
becomes click's ``default_map``, so the order is: command-line flag > environment variable >
config file > default. Every key is checked against the command's options and its type (and
range or choices) before any command runs: an unknown key, a value of the wrong type, a file
that is missing or not TOML is a :class:`ConfigProblem` naming the file and the key.

:func:`effective_settings` is what ``btcchannel config show`` prints: every option's value
and where it came from, secrets masked.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import click
from click.core import ParameterSource

from btcchannel.errors import ChannelError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["GLOBAL", "ConfigProblem", "build_default_map", "effective_settings", "load_file", "mask"]

GLOBAL = "global"
# options that make no sense in a file: the file itself
_NOT_IN_FILE = frozenset({"config"})
SOURCES = {
    ParameterSource.COMMANDLINE: "command line",
    ParameterSource.ENVIRONMENT: "environment",
    ParameterSource.DEFAULT_MAP: "config file",
    ParameterSource.DEFAULT: "default",
    ParameterSource.PROMPT: "prompt",
}


class ConfigProblem(ChannelError):
    """The configuration file is missing, not TOML, or has an unknown key or a value of the wrong
    type (code ``bad_config``, exit status 2); only the CLI raises it."""

    code = "bad_config"
    http_status = 400


def options_by_key(cmd: click.Command) -> dict[str, click.Option]:
    """The command's options a file may set, by their command-line name without the dashes."""
    out: dict[str, click.Option] = {}
    for p in cmd.params:
        if not isinstance(p, click.Option) or not p.expose_value or p.name is None:
            continue
        for opt in p.opts:
            if opt.startswith("--") and opt[2:] not in _NOT_IN_FILE:
                out[opt[2:]] = p
    return out


def _expected(p: click.Option) -> tuple[tuple[type, ...], str]:
    """The TOML value types the option takes, and their name for the message."""
    if p.multiple or p.nargs != 1:
        return (list,), "an array"
    if p.count:
        return (int,), "an integer"
    if p.is_flag and p.is_bool_flag:
        return (bool,), "true or false"
    if isinstance(p.type, (click.types.IntParamType, click.IntRange)):
        return (int,), "an integer"
    if isinstance(p.type, (click.types.FloatParamType, click.FloatRange)):
        return (int, float), "a number"
    if isinstance(p.type, click.types.BoolParamType):
        return (bool,), "true or false"
    return (str,), "a string"


def _check_value(where: str, p: click.Option, value: Any, ctx: click.Context) -> None:
    types, name = _expected(p)
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        raise ConfigProblem(f"{where}: expected {name}, got {type(value).__name__} {value!r}")
    if isinstance(value, bool) or p.count or p.multiple or p.nargs != 1:
        return
    try:
        p.type.convert(value, p, ctx)
    except click.BadParameter as e:
        raise ConfigProblem(f"{where}: {e.message}") from e


def _unknown(where: str, key: str, known: list[str]) -> ConfigProblem:
    close = difflib.get_close_matches(key, known, n=1)
    also = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigProblem(f"{where}: unknown key {key!r}{also}; known: {', '.join(sorted(known)) or 'none'}")


def _table(
    path: Path, name: str, cmd: click.Command, table: dict[str, Any], ctx: click.Context, *, with_subcommands: bool
) -> dict[str, Any]:
    """``table`` checked against ``cmd``'s options (and, for a group, its subcommands' tables)."""
    options = options_by_key(cmd)
    subs = cmd.commands if with_subcommands and isinstance(cmd, click.Group) else {}
    out: dict[str, Any] = {}
    for key, value in table.items():
        where = f"{path}: [{name}] {key}"
        if key in options:
            _check_value(where, options[key], value, ctx)
            out[str(options[key].name)] = value
        elif key in subs:
            if not isinstance(value, dict):
                raise ConfigProblem(f"{where}: expected a table [{name}.{key}] of the command's options")
            out[key] = _table(path, f"{name}.{key}", subs[key], value, ctx, with_subcommands=True)
        else:
            raise _unknown(f"{path}: [{name}]", key, [*options, *subs])
    return out


def load_file(path: Path) -> dict[str, Any]:
    """The file's TOML document (a missing, unreadable or malformed file is a ConfigProblem)."""
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as e:
        raise ConfigProblem(f"{path}: no such config file") from e
    except OSError as e:
        raise ConfigProblem(f"{path}: cannot read the config file: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigProblem(f"{path}: not valid TOML: {e}") from e


def build_default_map(path: Path, root: click.Group, ctx: click.Context) -> dict[str, Any]:
    """The file as click's ``default_map`` for ``root``: ``[global]`` to the root's options,
    every other table to the command of that name."""
    doc = load_file(path)
    out: dict[str, Any] = {}
    commands = root.commands
    for key, value in doc.items():
        if key == GLOBAL:
            if not isinstance(value, dict):
                raise ConfigProblem(f"{path}: {key}: expected a table [global] of the global options")
            out.update(_table(path, GLOBAL, root, value, ctx, with_subcommands=False))
        elif key in commands:
            if not isinstance(value, dict):
                raise ConfigProblem(f"{path}: {key}: expected a table [{key}] of the command's options")
            out[key] = _table(path, key, commands[key], value, ctx, with_subcommands=True)
        elif key in options_by_key(root):
            raise ConfigProblem(f"{path}: {key}: a global option belongs in the [global] table")
        else:
            raise _unknown(f"{path}: top level", key, [GLOBAL, *commands])
    return out


def mask(key: str, value: Any) -> Any:
    """``value`` fit to print: a password or secret as ``***``, a URL's password likewise."""
    if value is None:
        return None
    if any(word in key for word in ("password", "secret", "seed", "token")):
        return "***"
    if isinstance(value, str) and "://" in value and "@" in value:
        parts = urlsplit(value)
        if parts.password is not None:
            host = parts.netloc.rsplit("@", 1)[1]
            return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def _entries(ctx: click.Context) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, p in options_by_key(ctx.command).items():
        assert p.name is not None
        source = ctx.get_parameter_source(p.name)
        out[key] = {
            "value": mask(key, ctx.params.get(p.name)),
            "source": SOURCES.get(source, "default") if source is not None else "default",
        }
    return out


def _walk(parent: click.Context, group: click.Group, prefix: str) -> Iterator[tuple[str, dict[str, dict[str, Any]]]]:
    for name in sorted(group.commands):
        cmd = group.commands[name]
        with cmd.make_context(name, [], parent=parent, resilient_parsing=True) as sub:
            entries = _entries(sub)
            if entries:
                yield f"{prefix}{name}", entries
            if isinstance(cmd, click.Group):
                yield from _walk(sub, cmd, f"{prefix}{name}.")


def effective_settings(root: click.Context) -> dict[str, dict[str, dict[str, Any]]]:
    """Every table's options (``global`` first) with ``value`` (masked) and ``source``
    (command line, environment, config file or default), as the commands would see them."""
    assert isinstance(root.command, click.Group)
    return {GLOBAL: _entries(root), **dict(_walk(root, root.command, ""))}
