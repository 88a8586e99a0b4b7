#!/usr/bin/env bash
# Runs a command inside the project's virtual environment (.venv), creating it
# first and installing btcchannel with its test extra when needed. bitcoind is
# not installed here: btcchannel finds one or fetches it on first use.
#   bash regtest/venv.sh python -m pytest
# What it does on a first run (a minute or two) is said on stderr as it goes.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "venv.sh: $*" >&2; }

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; assert sys.version_info >= (3, 10)' 2>/dev/null; then
  echo "btcchannel needs Python 3.10 or newer as '$python' (set PYTHON=...)" >&2
  exit 1
fi
if ! "$python" -c 'import ensurepip, venv' 2>/dev/null; then
  # Debian ships venv separately.
  say "installing python3-venv with apt-get"
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq && $sudo apt-get install -y -qq python3-venv >/dev/null
fi
if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  "$python" -m venv .venv
fi
stamp=.venv/.btcchannel-installed
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  say "installing btcchannel and its dependencies into .venv (about a minute, once)"
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
  touch "$stamp"
  say "installed; a regtest bitcoind is found on PATH or fetched on first use"
fi
export PATH="$PWD/.venv/bin:$PATH"
exec "$@"
