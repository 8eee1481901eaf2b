#!/usr/bin/env bash
# Creates a virtual environment at the repository root (.venv, or TENSORD_VENV) and installs
# tensord into it, editable, with the extras named in TENSORD_EXTRAS (default: test). The
# install compiles the native core (daemon/native, Rust) with cargo. PYTHON picks the
# interpreter (default python3, >= 3.11). Re-running is cheap: it reinstalls only when
# pyproject.toml, setup.py, the crate's sources or the extras changed; pip's cache makes
# reinstalls fast.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
extras=${TENSORD_EXTRAS:-test}
py=${PYTHON:-python3}
venv=${TENSORD_VENV:-.venv}
if ! command -v cargo >/dev/null; then
  [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
fi
command -v cargo >/dev/null || {
  echo "setup: cargo not found: the native core is Rust; install it with rustup (https://rustup.rs)" >&2
  exit 1
}
if [ ! -x "$venv/bin/python" ]; then
  "$py" -c 'import sys; assert sys.version_info >= (3, 11), "tensord needs Python 3.11+"'
  "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
fi
stamp="$venv/.tensord-installed"
# The native core is built by the install: rebuild when its sources or the build change.
want="$( (cat pyproject.toml setup.py daemon/native/Cargo.toml daemon/native/Cargo.lock;
          find daemon/native/src -type f -name '*.rs' | LC_ALL=C sort | xargs cat) \
        | sha256sum | cut -d' ' -f1) $extras"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing tensord[$extras] into $venv (torch is large; the first time takes a few minutes)" >&2
  "$venv/bin/python" -m pip install --quiet -e ".[$extras]"
  echo "$want" > "$stamp"
fi
