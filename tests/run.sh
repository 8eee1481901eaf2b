#!/usr/bin/env bash
# Every test, deterministic (the same commit gives the same result): lint and type checks,
# pytest (real daemons, real Go binaries, real shared memory; property tests with a fixed
# seed and the committed corpus), go vet, gofmt, staticcheck and `go test -race ./...`
# (which starts its own real daemon and replays the committed fuzz corpus,
# go/shmclient/testdata/fuzz). Exploratory fuzzing is `bash tests/fuzz.sh [seconds]`.
# Sets everything up first. Ends by checking that the machine's users, groups and /dev/shm
# are as they were before it started (tests must leave the machine as they found it).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

# -- what the tests must leave as they found it: checked at the end, also after a failure
snap=$(mktemp -d)
machine_state() {
  cut -d: -f1,3 /etc/passwd | sort > "$1/passwd"
  cut -d: -f1,3,4 /etc/group | sort > "$1/group"
  (cd /dev/shm && find . -mindepth 1 -printf '%p %u\n' 2>/dev/null | sort) > "$1/shm"
}
check_machine() {
  local rc=$? changed=0
  echo "== the machine as it was: users, groups, /dev/shm"
  mkdir -p "$snap/after"
  machine_state "$snap/after"
  for f in passwd group shm; do
    if ! diff -u "$snap/before/$f" "$snap/after/$f" > "$snap/$f.diff"; then
      echo "the tests changed ${f/shm//dev/shm} (- before, + after):"
      tail -n +3 "$snap/$f.diff"
      changed=1
    fi
  done
  rm -rf "$snap"
  if [ "$changed" = 1 ]; then
    echo "== tests left the machine changed"
    [ "$rc" = 0 ] && rc=1
  elif [ "$rc" = 0 ]; then
    echo "== all tests passed"
  fi
  exit "$rc"
}
mkdir "$snap/before"
machine_state "$snap/before"
trap check_machine EXIT

TENSORD_EXTRAS=${TENSORD_EXTRAS:-test,examples} bash daemon/setup.sh
export PATH="$root/.venv/bin:$PATH"
staticcheck="honnef.co/go/tools/cmd/staticcheck@v0.8.2"

echo "== ruff, mypy"
ruff check daemon tests protocol bench
mypy
echo "== pytest"
pytest -q tests
echo "== go vet, gofmt, staticcheck"
for m in go bench go/cmd/tensord-gateway; do
  (cd "$m" && go vet ./... && test -z "$(gofmt -l .)" && go run "$staticcheck" ./...) ||
    { echo "go vet / gofmt / staticcheck failed in $m/"; exit 1; }
done
echo "== go build, CGO_ENABLED=0 (the client is pure Go)"
for m in go go/cmd/tensord-gateway; do (cd "$m" && CGO_ENABLED=0 go build ./... && CGO_ENABLED=0 go vet ./...); done
echo "== go test -race"
(cd go && TENSORD_PYTHON="$root/.venv/bin/python" go test -race -count=1 ./...)
(cd go/cmd/tensord-gateway && go test -race -count=1 ./...)  # its own module (gRPC stays out of the client's go.mod)
echo "== go test, CGO_ENABLED=0"
(cd go && CGO_ENABLED=0 TENSORD_PYTHON="$root/.venv/bin/python" go test -count=1 ./...)

