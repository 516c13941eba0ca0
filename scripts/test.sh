#!/usr/bin/env bash
# Runs every test: the Rust suite (unit, C ABI, Leyline, pipeline, CLI,
# header drift, the bus against a real redis-server, the fleet against a
# real SeaweedFS, the C/C++ consumers installed into a temporary prefix,
# built by CMake with -Wall -Wextra -Werror and with ASan+UBSan, then run;
# the threaded C++ hosts also under ThreadSanitizer against a TSan build),
# the API docs (no broken or private link), then the Python package: built
# into a wheel by pip, installed into the torch environment, tested with
# pytest. Installs what is missing first (libtorch into ~/.cache, cmake,
# redis-server, pytest).
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
# The API docs build without a broken or private link.
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --lib --quiet
# The wheel packs the dev build made above (no second, release build here).
TEZZERET_WHEEL_PROFILE=dev "$TEZZERET_PYTHON" -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps ./python
"$TEZZERET_PYTHON" -m pytest -q -p no:cacheprovider python/tests
