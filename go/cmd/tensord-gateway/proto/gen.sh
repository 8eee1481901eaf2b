#!/usr/bin/env bash
# Regenerates pb/*.pb.go from proto/*.proto: protoc from grpcio-tools (the bench extra:
# TENSORD_EXTRAS=test,examples,bench bash daemon/setup.sh, or PYTHON= any Python that has it),
# the Go plugins from the Go module proxy (installed into a temporary directory). The
# generated files are committed, so building the gateway needs none of this.
set -euo pipefail
gw=$(cd "$(dirname "$0")/.." && pwd)
root=$(cd "$gw/../../.." && pwd)
py=${PYTHON:-$root/.venv/bin/python}  # any Python with grpcio-tools
gobin=$(mktemp -d)
trap 'rm -rf "$gobin"' EXIT
GOBIN="$gobin" go install google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12
GOBIN="$gobin" go install google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.6.2
cd "$gw/proto"
"$py" -m grpc_tools.protoc -I. \
  --plugin=protoc-gen-go="$gobin/protoc-gen-go" --plugin=protoc-gen-go-grpc="$gobin/protoc-gen-go-grpc" \
  --go_out="$gw/pb" --go_opt=paths=source_relative \
  --go-grpc_out="$gw/pb" --go-grpc_opt=paths=source_relative \
  grpc_predict_v2.proto model_config.proto
