#!/usr/bin/env bash
# The main job: installs libtorch if missing, builds the CLI (release) and
# compiles the embedded default catalog into ./state (or $1), printing
# progress and the final table. Extra arguments go to `tezzeret forge`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-build-deps.sh
source scripts/env.sh
cargo build --release --bin tezzeret
state="${1:-state}"
shift || true
exec "$CARGO_TARGET_DIR/release/tezzeret" forge --state "$state" --catalog default "$@"
