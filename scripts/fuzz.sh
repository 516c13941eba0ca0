#!/usr/bin/env bash
# Runs a fuzz target with cargo-fuzz (libFuzzer + AddressSanitizer).
#   scripts/fuzz.sh wal_recovery [SECONDS]        (default 60 s)
#   scripts/fuzz.sh guard_table_reader [SECONDS]
# cargo-fuzz needs nightly features; the stable toolchain is allowed them
# with RUSTC_BOOTSTRAP=1. Installs cargo-fuzz if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${1:?usage: scripts/fuzz.sh wal_recovery|guard_table_reader [SECONDS]}"
seconds="${2:-60}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
source scripts/env.sh
export RUSTC_BOOTSTRAP=1
# The fuzz binaries link libtorch through the library but carry no rpath of their own.
export LD_LIBRARY_PATH="$LIBTORCH/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# Builds in fuzz/target, apart from the library's own build.
unset CARGO_TARGET_DIR
if [ ! -d fuzz/seeds/"$target" ]; then
    cargo test --test suite write_fuzz_seeds -- --ignored
fi
mkdir -p fuzz/corpus/"$target"
cp -n fuzz/seeds/"$target"/* fuzz/corpus/"$target"/ 2>/dev/null || true
cargo fuzz run --fuzz-dir fuzz "$target" fuzz/corpus/"$target" -- -max_total_time="$seconds" -rss_limit_mb=4096
