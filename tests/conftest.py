"""Shared set-up of the service tests.

The fixtures come from btcchannel's pytest plugin (:mod:`btcchannel.testing.plugin`):
``bitcoind``, ``funded_wallet``, ``payee_factory``, ``payer_factory``, ``payer_client``, ...;
helpers from :mod:`btcchannel.testing`. Here: ``payee``, a payee service with the default
fast test configuration in ``<tmp_path>/payee``; ``payee_process``, ``btcchannel serve`` as a
separate process selling a 10-chunk file at 2,000 sat a chunk.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.testing import RunningPayee
from btcchannel.testing.cli import CliProcess
from btcchannel.testing.fixtures import PayeeFactory


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
        cli.argv("--json", "serve", "--port", "0", "--price-sat", "2000", "--serve-file", str(data),
                 "--chunk-size", "1000"),
        env=cli.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
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
