#!/usr/bin/env bash
# The benchmark in one command (see bench/README.md):
#
#   bash bench/run.sh            # quick: a few minutes on 2 cores
#   bash bench/run.sh --full     # more sizes and longer points
#   bash bench/run.sh --only floors,tensord,grpc   # a subset
#
# Sets up .venv with the bench extra, builds the Go load generator and tensord-gateway, starts every server in
# turn, runs the matrix, stops everything and writes bench/results/<date>-<host>.{json,md,png}.
set -euo pipefail
bench=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$bench")
cd "$root"
TENSORD_EXTRAS=${TENSORD_EXTRAS:-test,bench} bash daemon/setup.sh
(cd "$bench" && go build -o bin/loadgen ./cmd/loadgen)
# The gateway phase's server: go/cmd/tensord-gateway (its own module), pure Go.
(cd "$root/go/cmd/tensord-gateway" && CGO_ENABLED=0 go build -o "$bench/bin/tensord-gateway" .)
exec .venv/bin/python "$bench/run.py" "$@"
