"""Shared set-up of the service tests.

The fixtures come from btcchannel's pytest plugin (:mod:`btcchannel.testing.plugin`):
``bitcoind``, ``funded_wallet``, ``payee_factory``, ``payer_factory``, ``payer_client``, ...;
helpers from :mod:`btcchannel.testing`. Here: ``payee``, a payee service with the default
fast test configuration in ``<tmp_path>/payee``; ``payee_process``, ``btcchannel serve`` as a
separate process selling a 10-chunk file at 2,000 sat a chunk.

The suite runs apart from anything the user runs: :func:`pytest_configure` points ``HOME`` and
``XDG_DATA_HOME`` at a folder of its own and drops every ``BTCCHANNEL_*`` variable, so no test
finds the user's own node (``btcchannel regtest start``, ``~/.bitcoin``), datadir or settings;
only the cache of the fetched bitcoind (``XDG_CACHE_HOME``) stays shared.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from btcchannel.bitcoind.binary import cache_dir
from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.testing import RunningPayee
from btcchannel.testing.cli import CliProcess
from btcchannel.testing.fixtures import PayeeFactory

_PINNED = ("HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME")
_STASH = pytest.StashKey[tuple[Path, dict[str, "str | None"]]]()


def pytest_configure(config: pytest.Config) -> None:
    """Isolate the whole session (and the commands it runs) from the user's environment."""
    saved = {name: os.environ.get(name) for name in _PINNED}
    saved.update({name: value for name, value in os.environ.items() if name.startswith("BTCCHANNEL_")})
    home = Path(tempfile.mkdtemp(prefix="btcchannel-tests-home-"))
    os.environ["XDG_CACHE_HOME"] = str(cache_dir().parent)  # the fetched bitcoind stays shared
    os.environ["HOME"] = str(home)
    os.environ["XDG_DATA_HOME"] = str(home / ".local" / "share")
    os.environ["XDG_CONFIG_HOME"] = str(home / ".config")
    for name in [n for n in os.environ if n.startswith("BTCCHANNEL_")]:
        del os.environ[name]
    config.stash[_STASH] = (home, saved)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Give the environment back and remove the session's home."""
    if _STASH not in config.stash:
        return
    home, saved = config.stash[_STASH]
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    shutil.rmtree(home, ignore_errors=True)


@pytest_asyncio.fixture
async def payee(payee_factory: PayeeFactory) -> RunningPayee:
    """A running payee service (``fast_config(tmp_path / "payee")``), stopped at teardown."""
    return await payee_factory.start()


@pytest.fixture
def payee_process(bitcoind: RegtestNode, tmp_path: Path) -> Iterator[tuple[CliProcess, subprocess.Popen[str], str]]:
    bitcoind.create_wallet("cli-payee")
    cli = CliProcess(bitcoind, tmp_path / "payee", "cli-payee")
    data = tmp_path / "data.bin"
    data.write_bytes(os.urandom(10 * 1000))
    proc = subprocess.Popen(
        cli.argv(
            "--json", "serve", "--port", "0", "--price-sat", "2000", "--serve-file", str(data), "--chunk-size", "1000"
        ),
        env=cli.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        url = json.loads(line)["url"]
        yield cli, proc, url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
