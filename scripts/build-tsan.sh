#!/usr/bin/env bash
# Builds libtezzeret instrumented for ThreadSanitizer, for the TSan run of
# the C++ runtime host (tests/suite/consumers.rs). The Rust code and Rust's
# own std (rebuilt with -Zbuild-std, so TSan sees std's mutexes, condvars
# and channels) are instrumented with -Zsanitizer=thread; the stable
# toolchain is allowed these with RUSTC_BOOTSTRAP=1, as for cargo-fuzz.
# libtorch is not instrumented: cpp-examples/tsan.supp names what that
# leaves TSan blind to. The host executable brings the TSan runtime
# (g++ -fsanitize=thread). Memory intrinsics stay plain calls (GCC's
# runtime intercepts memcpy and friends but has no __tsan_memcpy).
#
# Prints the directory holding libtezzeret.so and libtezzeret.a.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
rustup component list --installed 2>/dev/null | grep -q '^rust-src' || rustup component add rust-src >&2
triple="$(rustc -vV | sed -n 's/^host: //p')"
target_dir="$CARGO_TARGET_DIR/tsan"
RUSTC_BOOTSTRAP=1 \
RUSTFLAGS="-Zsanitizer=thread -Cllvm-args=-tsan-instrument-memintrinsics=0" \
CARGO_TARGET_DIR="$target_dir" \
    cargo build -Zbuild-std --lib --no-default-features --target "$triple" >&2
echo "$target_dir/$triple/debug"
