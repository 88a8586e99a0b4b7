"""The README's commands and Python example are the ones that work."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command() -> None:
    commands = re.findall(r"^(bash regtest/venv\.sh [^\n#]*?)\s+# the tests$", README, re.M)
    assert len(commands) == 1
    assert commands[0] in (ROOT / ".ci" / "run").read_text().splitlines()


def test_library_example_runs() -> None:
    block = README.split("## The library in ten lines", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    code_lines = [line for line in block.splitlines() if line.strip()]
    assert len(code_lines) <= 14
    out = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    tx = out.stdout.strip()
    assert tx.startswith("02000000000101") and len(tx) > 300


def test_run_on_signet_commands_parse_and_name_the_missing_node(tmp_path: Path) -> None:
    import json
    import os
    import shlex

    section = README.split("## Run on signet", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    lines = [line.split("  #", 1)[0].strip() for line in section.replace("\\\n", " ").splitlines()]
    commands = [shlex.split(line)[1:] for line in lines if line.startswith("btcchannel ")]
    assert len(commands) == 2
    env = {**os.environ, "HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path / "xdg")}
    env.pop("BTCCHANNEL_RPC_URL", None)
    results = [
        subprocess.run(
            [sys.executable, "-m", "btcchannel", "--json", *args], env=env, capture_output=True, text=True, timeout=60
        )
        for args in commands
    ]
    opened, listed = results
    assert opened.returncode == 1, opened.stderr  # options accepted (2 would be a usage error)
    err = json.loads(opened.stdout)["error"]
    assert err["code"] == "node_unavailable" and str(tmp_path / ".bitcoin" / "signet" / ".cookie") in err["message"]
    assert listed.returncode == 0 and json.loads(listed.stdout) == {"channels": [], "tip_height": None}


def test_operate_and_backup_commands_parse(tmp_path: Path) -> None:
    import shlex

    from btcchannel.cli import main

    for title in ("## Operate", "## Back up and restore"):
        section = README.split(title, 1)[1].split("\n## ", 1)[0]
        blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
        lines = [line.split("  #", 1)[0].strip() for block in blocks for line in block.splitlines()]
        backup = tmp_path / "payee.db"  # the restore's argument must exist
        backup.write_bytes(b"")
        commands = [
            shlex.split(line.replace("...", "").replace("/mnt/other-disk/payee.db", str(backup)))[1:]
            for line in lines
            if line.startswith("btcchannel ")
        ]
        assert commands, title
        for args in commands:
            ctx = main.make_context("btcchannel", list(args))
            name, cmd, rest = main.resolve_command(ctx, ctx._protected_args + ctx.args)
            assert cmd is not None, args
            cmd.make_context(name or "", rest, parent=ctx)  # raises on an unknown option or a missing argument
