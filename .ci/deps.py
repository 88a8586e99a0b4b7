"""Check with deptry that every package btcchannel imports is declared in setup.cfg
(install_requires for the library, the ``test`` extra for the pytest plugin)."""

import configparser
import subprocess
import sys
import tempfile
from pathlib import Path

cfg = configparser.ConfigParser()
cfg.read("setup.cfg")
with tempfile.TemporaryDirectory() as tmp:
    runtime = Path(tmp, "requirements.txt")
    dev = Path(tmp, "requirements-dev.txt")
    runtime.write_text(cfg["options"]["install_requires"].strip() + "\n")
    dev.write_text(cfg["options.extras_require"]["test"].strip() + "\n")
    sys.exit(subprocess.call([
        "deptry", "btcchannel", "--known-first-party", "btcchannel", "--no-ansi",
        "--requirements-files", str(runtime), "--requirements-files-dev", str(dev),
        # the pytest plugin (btcchannel.testing) runs only inside pytest; the test extra declares them;
        # bdkpython is the optional `light` extra (btcchannel.payer.light only)
        "--per-rule-ignores", "DEP004=pytest|pytest_asyncio|pgserver|bdkpython",
    ]))
