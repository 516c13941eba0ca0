#!/usr/bin/env bash
# Installs what the test suite needs beyond libtorch, into the same cached
# virtual environment: `cryptography` (an independent ed25519 implementation
# that checks our manifest signatures). Idempotent.
set -euo pipefail
venv="$(bash "$(dirname "$0")/install-libtorch.sh" | tail -n 1)"
stamp="$venv/.tezzeret-test-deps"
if [ ! -f "$stamp" ]; then
    echo "installing Python test dependencies into $venv" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "cryptography==46.*" >&2
    touch "$stamp"
fi
