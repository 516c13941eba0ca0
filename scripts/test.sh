#!/usr/bin/env bash
# Runs every test: the Rust suite (unit, C ABI, Leyline, pipeline, CLI,
# header drift) and the C/C++ consumers (installed into a temporary prefix,
# built by CMake with -Wall -Wextra -Werror and with ASan+UBSan, then run;
# the threaded C++ hosts also under ThreadSanitizer against a TSan build).
# Installs what is missing first (libtorch into ~/.cache, cmake).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-build-deps.sh
bash scripts/install-test-deps.sh
source scripts/env.sh
# `cargo test` builds the library only as an rlib; the C/C++ consumer tests
# install the cdylib and staticlib of this same (dev) profile.
cargo build --lib --bins
# The library instrumented for ThreadSanitizer (its own target directory).
bash scripts/build-tsan.sh >/dev/null
cargo test --no-fail-fast "$@"
