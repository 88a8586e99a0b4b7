"""``btcchannel`` as a separate process for tests: one datadir, one wallet, one regtest node."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from btcchannel.bitcoind.regtest import RegtestNode

__all__ = ["CliProcess"]


class CliProcess:
    """Runs ``python -m btcchannel`` with the datadir, node and wallet in its environment."""

    def __init__(self, node: RegtestNode, datadir: Path, wallet: str) -> None:
        self.datadir = datadir
        self.env = {
            **os.environ,
            "BTCCHANNEL_DATADIR": str(datadir),
            "BTCCHANNEL_RPC_URL": node.rpc_url,
            "BTCCHANNEL_RPC_USER": node.rpc_user,
            "BTCCHANNEL_RPC_PASSWORD": node.rpc_password,
            "BTCCHANNEL_WALLET": wallet,
        }

    def argv(self, *args: str) -> list[str]:
        """The command line of ``btcchannel args...`` in this interpreter."""
        return [sys.executable, "-m", "btcchannel", *args]

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run ``btcchannel args...`` to its end (its output captured as text)."""
        return subprocess.run(self.argv(*args), env=self.env, capture_output=True, text=True, timeout=timeout)

    def json(self, *args: str) -> Any:
        """The JSON document of a command that must succeed (``--json``)."""
        out = self.run("--json", *args)
        assert out.returncode == 0, (args, out.stdout, out.stderr)
        return json.loads(out.stdout)

    def fails(self, *args: str) -> str:
        """The stderr of a command that must fail with status 1."""
        out = self.run(*args)
        assert out.returncode == 1, (args, out.stdout, out.stderr)
        return out.stderr

    def error(self, *args: str) -> dict[str, str]:
        """The JSON error document of a command that must fail with status 1 (with a hint, no traceback)."""
        out = self.run("--json", *args)
        assert out.returncode == 1, (args, out.stdout, out.stderr)
        assert "Traceback" not in out.stderr
        err: dict[str, str] = json.loads(out.stdout)["error"]
        assert err["hint"]
        return err
