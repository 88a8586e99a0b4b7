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
