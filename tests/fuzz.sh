#!/usr/bin/env bash
# Exploration, outside the gate: every fuzz target runs for SECONDS (default 60) with fresh
# random inputs. The gate (tests/run.sh) only replays what is committed, so it is
# deterministic; what this finds becomes committed seeds that the gate replays from then on:
#   Python (hypothesis): failing examples are saved in tests/fuzz-corpus/hypothesis/
#   Go (go test -fuzz):  failing inputs are saved in go/shmclient/testdata/fuzz/<Target>/
#   Rust (cargo fuzz, daemon/native/fuzz/run.sh): crashes are saved in
#                        daemon/native/fuzz/artifacts/<target>/; copy them into
#                        daemon/native/fuzz/corpus/<target>/ (cargo test replays it) with the fix
# Commit those files together with the fix (`git status` lists them at the end).
#
#   bash tests/fuzz.sh [SECONDS]
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
secs=${1:-60}
case $secs in '' | *[!0-9]*) echo "usage: bash tests/fuzz.sh [SECONDS]" >&2; exit 2 ;; esac
TENSORD_EXTRAS=${TENSORD_EXTRAS:-test,examples} bash daemon/setup.sh
export PATH="$root/.venv/bin:$PATH"
failed=()

echo "== fuzz, ${secs} s per target: control frames, request descriptors, ring records (Python)"
TENSORD_FUZZ_SECONDS=$secs pytest -q tests/test_fuzz.py || failed+=("python")

# Every Fuzz* function of go/shmclient; decoders only: TENSORD_PYTHON points nowhere, so
# TestMain starts no daemon.
targets=$(cd go && grep -ho '^func Fuzz[A-Za-z0-9_]*' shmclient/*_test.go | cut -d' ' -f2 | sort)
echo "== fuzz, ${secs} s per target: $(echo "$targets" | tr '\n' ' ')(Go)"
for t in $targets; do
  (cd go && TENSORD_PYTHON=/nonexistent go test -run '^$' -fuzz "^$t\$" -fuzztime "${secs}s" \
    ./shmclient) || failed+=("go:$t")
done

native=daemon/native/fuzz
if [ -f "$native/run.sh" ]; then
  command -v cargo >/dev/null || export PATH="$HOME/.cargo/bin:$PATH"
  if cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "== fuzz, ${secs} s per target: the native core (cargo fuzz, $native/run.sh)"
    bash "$native/run.sh" "$secs" || failed+=("rust")
  else
    echo "== skipped the native core's cargo-fuzz targets: cargo fuzz needs a nightly" \
      "toolchain and cargo-fuzz (rustup toolchain install nightly; cargo install cargo-fuzz)"
  fi
fi

echo "== new or changed corpus files (commit them with the fix):"
git status --short --untracked-files=all -- tests/fuzz-corpus go/shmclient/testdata \
  "$native/artifacts" 2>/dev/null
if [ ${#failed[@]} -gt 0 ]; then
  echo "== fuzzing found failures in: ${failed[*]}"
  exit 1
fi
echo "== fuzzing found nothing"
