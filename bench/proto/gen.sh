#!/usr/bin/env bash
# Regenerates the committed gRPC code from proto/infer.proto: Python with grpcio-tools (the
# bench extra), Go with protoc-gen-go and protoc-gen-go-grpc from the Go module proxy.
set -euo pipefail
bench=$(cd "$(dirname "$0")/.." && pwd)
root=$(dirname "$bench")
py="$root/.venv/bin/python"
gobin="$bench/.gobin"
GOBIN="$gobin" go install google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12
GOBIN="$gobin" go install google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.6.2
cd "$bench/proto"
"$py" -m grpc_tools.protoc -I. \
  --python_out="$bench/servers" --grpc_python_out="$bench/servers" \
  --plugin=protoc-gen-go="$gobin/protoc-gen-go" --plugin=protoc-gen-go-grpc="$gobin/protoc-gen-go-grpc" \
  --go_out="$bench/internal/pb" --go_opt=paths=source_relative \
  --go-grpc_out="$bench/internal/pb" --go-grpc_opt=paths=source_relative \
  infer.proto
# grpc_tools writes `import infer_pb2`; the servers import it as a sibling module, which works
# because bench/servers is on sys.path when they run.
