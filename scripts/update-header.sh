#!/usr/bin/env bash
# Regenerates the committed C header include/tezzeret.h from src/ffi (cbindgen).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
TEZZERET_UPDATE_HEADER=1 cargo build --lib
echo "include/tezzeret.h regenerated"
