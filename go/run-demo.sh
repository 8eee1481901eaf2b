#!/usr/bin/env bash
# The main job: set up, start the daemon with its built-in models, run the Go example against
# it, stop the daemon. Output: the models the daemon serves and real results computed by them.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash daemon/setup.sh
sock=$(mktemp -u /tmp/tensord-demo-XXXXXX.sock)
export TENSORD_SOCKET=$sock
.venv/bin/tensord serve --log-level WARNING &
daemon=$!
trap 'kill $daemon 2>/dev/null; wait $daemon 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do [ -S "$sock" ] && break; sleep 0.1; done
[ -S "$sock" ] || { echo "the daemon did not start" >&2; exit 1; }
(cd go && go run ./examples/hello "$@")
