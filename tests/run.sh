#!/usr/bin/env bash
# Every test: lint, pytest (real daemons, real Go binaries, real /dev/shm), go vet, gofmt and
# `go test -race ./...` (which starts its own real daemon). Sets everything up first.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
TENSORD_EXTRAS=${TENSORD_EXTRAS:-test,examples} bash daemon/setup.sh
export PATH="$root/.venv/bin:$PATH"

echo "== ruff"
ruff check daemon tests protocol bench
echo "== pytest"
pytest -q tests
echo "== go vet, gofmt"
for m in go bench; do (cd "$m" && go vet ./... && test -z "$(gofmt -l .)") || { echo "go vet / gofmt failed in $m/"; exit 1; }; done
echo "== go build, CGO_ENABLED=0 (the client is pure Go)"
for m in go; do (cd "$m" && CGO_ENABLED=0 go build ./... && CGO_ENABLED=0 go vet ./...); done
echo "== go test -race"
(cd go && TENSORD_PYTHON="$root/.venv/bin/python" go test -race -count=1 ./...)
echo "== go test, CGO_ENABLED=0"
(cd go && CGO_ENABLED=0 TENSORD_PYTHON="$root/.venv/bin/python" go test -count=1 ./...)
echo "== all tests passed"
