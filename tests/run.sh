#!/usr/bin/env bash
# Every test, deterministic (the same commit gives the same result): lint and type checks,
# the native core's cargo test and clippy, pytest (real daemons, real Go binaries, real shared memory; property tests with a fixed
# seed and the committed corpus), go vet, gofmt, staticcheck and `go test -race ./...`
# (which starts its own real daemon and replays the committed fuzz corpus,
# go/shmclient/testdata/fuzz), and part of pytest again on Python 3.13 where there is one.
# Exploratory fuzzing is `bash tests/fuzz.sh [seconds]`.
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
command -v cargo >/dev/null || export PATH="$HOME/.cargo/bin:$PATH"  # the native core's tests

echo "== ruff, mypy"
ruff check daemon tests protocol bench
mypy
echo "== native core (daemon/native): cargo test (units, golden vectors, fuzz corpus, proptest), clippy (library)"
(cd daemon/native && cargo test --locked -q && cargo clippy --locked -q -- -D warnings)
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
# The native core is built for the stable ABI (abi3-py311): build and run it on the newest
# CPython this machine has too (issue 15 item 9: the C core did not build on 3.13).
# The first candidate that really runs 3.13 (a pyenv shim for a version not selected exits 127).
py313=${TENSORD_PY313:-}
if [ -z "$py313" ]; then
  for c in $(command -v python3.13) "$HOME"/.pyenv/versions/3.13*/bin/python; do
    if "$c" -c 'import sys; assert sys.version_info[:2] == (3, 13)' 2>/dev/null; then
      py313=$c
      break
    fi
  done
fi
if [ -n "$py313" ] && [ -x "$py313" ]; then
  echo "== Python $("$py313" -c 'import sys; print(sys.version.split()[0])'): native core, ring, daemon and failure tests (.venv313)"
  PYTHON="$py313" TENSORD_VENV=.venv313 TENSORD_EXTRAS=test bash daemon/setup.sh
  .venv313/bin/pytest -q -p no:cacheprovider tests/test_ring.py tests/test_daemon.py tests/test_failures.py
else
  echo "== Python 3.13: SKIPPED, no python3.13 on this machine (set TENSORD_PY313)"
fi
