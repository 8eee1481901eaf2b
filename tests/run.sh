#!/usr/bin/env bash
# Every test: lint, pytest (real daemons, real Go binaries, real /dev/shm), go vet, gofmt and
# `go test -race ./...` (which starts its own real daemon), then bounded fuzzing of the decoders
# (TENSORD_FUZZ_SECONDS per target, default 25; 6 targets). Sets everything up first.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
TENSORD_EXTRAS=${TENSORD_EXTRAS:-test,examples} bash daemon/setup.sh
export PATH="$root/.venv/bin:$PATH"
command -v cargo >/dev/null || export PATH="$HOME/.cargo/bin:$PATH"  # the native core's tests

echo "== ruff"
ruff check daemon tests protocol bench
echo "== native core (daemon/native): cargo test (units, golden vectors, fuzz corpus, proptest), clippy (library)"
(cd daemon/native && cargo test --locked -q && cargo clippy --locked -q -- -D warnings)
echo "== pytest"
pytest -q tests
echo "== go vet, gofmt"
for m in go bench go/cmd/tensord-gateway; do (cd "$m" && go vet ./... && test -z "$(gofmt -l .)") || { echo "go vet / gofmt failed in $m/"; exit 1; }; done
echo "== go build, CGO_ENABLED=0 (the client is pure Go)"
for m in go go/cmd/tensord-gateway; do (cd "$m" && CGO_ENABLED=0 go build ./... && CGO_ENABLED=0 go vet ./...); done
echo "== go test -race"
(cd go && TENSORD_PYTHON="$root/.venv/bin/python" go test -race -count=1 ./...)
(cd go/cmd/tensord-gateway && go test -race -count=1 ./...)  # its own module (gRPC stays out of the client's go.mod)
echo "== go test, CGO_ENABLED=0"
(cd go && CGO_ENABLED=0 TENSORD_PYTHON="$root/.venv/bin/python" go test -count=1 ./...)
fuzz=${TENSORD_FUZZ_SECONDS:-25}
echo "== fuzz, ${fuzz} s per target: control frames, request descriptors, ring records (Python)"
TENSORD_FUZZ_SECONDS=$fuzz pytest -q tests/test_fuzz.py
echo "== fuzz, ${fuzz} s per target: frames, welcome, response descriptors (Go)"
for t in FuzzReadFrame FuzzWelcome FuzzResponseDescriptor; do
  # decoders only: TENSORD_PYTHON points nowhere, so TestMain starts no daemon
  (cd go && TENSORD_PYTHON=/nonexistent go test -run '^$' -fuzz "^$t\$" -fuzztime "${fuzz}s" ./shmclient)
done
# The native core is built for the stable ABI (abi3-py311): build and run it on the newest
# CPython this machine has too (issue 15 item 9: the C core did not build on 3.13).
py313=${TENSORD_PY313:-$(command -v python3.13 || ls /root/.pyenv/versions/3.13*/bin/python 2>/dev/null | tail -1 || true)}
if [ -n "$py313" ] && [ -x "$py313" ]; then
  echo "== Python $("$py313" -c 'import sys; print(sys.version.split()[0])'): native core, ring, daemon and failure tests (.venv313)"
  PYTHON="$py313" TENSORD_VENV=.venv313 TENSORD_EXTRAS=test bash daemon/setup.sh
  .venv313/bin/pytest -q -p no:cacheprovider tests/test_ring.py tests/test_daemon.py tests/test_failures.py
else
  echo "== Python 3.13: SKIPPED, no python3.13 on this machine (set TENSORD_PY313)"
fi
echo "== all tests passed"
