#!/usr/bin/env bash
# The long crash soak: the kill -9 loop with 2000 kills (the normal suite
# runs 200) and the failpoint sweep. Usage: scripts/soak.sh [KILLS]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-build-deps.sh
source scripts/env.sh
cargo build --lib --bins
TEZZERET_CRASH_KILLS="${1:-2000}" cargo test --test suite crash:: -- --nocapture
