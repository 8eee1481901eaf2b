#!/usr/bin/env bash
# Creates .venv at the repository root and installs tensord into it (editable, which compiles
# the native ring core with gcc), with the extras named in TENSORD_EXTRAS (default: test). Re-running is cheap: it reinstalls only when
# pyproject.toml or the extras changed. Needs python3 >= 3.11; pip's cache makes reinstalls fast.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
extras=${TENSORD_EXTRAS:-test}
py=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$py" -c 'import sys; assert sys.version_info >= (3, 11), "tensord needs Python 3.11+"'
  "$py" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
stamp=".venv/.tensord-installed"
# The native ring core is built by the install: rebuild when its source or the build changes.
want="$(cat pyproject.toml setup.py daemon/tensord/transport/_ring.c | sha256sum | cut -d' ' -f1) $extras"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing tensord[$extras] into .venv (torch is large; the first time takes a few minutes)" >&2
  .venv/bin/python -m pip install --quiet -e ".[$extras]"
  echo "$want" > "$stamp"
fi
