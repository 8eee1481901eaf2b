#!/usr/bin/env bash
# Explores the native core's fuzz targets for SECONDS each (default 60): intake, descriptor,
# ring. Needs nightly Rust and cargo-fuzz (`cargo install cargo-fuzz`). Starts from the
# committed corpus; new inputs go to a temporary directory, so the corpus stays small. A crash
# is left in fuzz/artifacts/<target>/ and the script exits non-zero.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-60}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for t in intake descriptor ring; do
  mkdir -p "$work/$t"
  echo "== fuzz $t, ${seconds} s"
  cargo +nightly fuzz run -O "$t" "$work/$t" "corpus/$t" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1 2>&1 | tail -4
done
