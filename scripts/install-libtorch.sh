#!/usr/bin/env bash
# Installs PyTorch 2.11.0 (the libtorch Tezzeret links against) from PyPI into a
# reusable cache directory outside the repository, unless it is already there.
# Prints the venv's root on its last line of stdout.
#
# Environment:
#   TEZZERET_TORCH_HOME  install location (default ~/.cache/tezzeret/torch-2.11.0)
#   PYTHON               interpreter used to create the venv (default python3)
set -euo pipefail

TORCH_VERSION=2.11.0
TORCH_HOME="${TEZZERET_TORCH_HOME:-$HOME/.cache/tezzeret/torch-$TORCH_VERSION}"
PYTHON="${PYTHON:-python3}"
STAMP="$TORCH_HOME/.tezzeret-installed"

if [ -f "$STAMP" ] && [ -x "$TORCH_HOME/bin/python" ]; then
    echo "$TORCH_HOME"
    exit 0
fi

echo "installing torch==$TORCH_VERSION into $TORCH_HOME (about 4.7 GB, one time)" >&2
mkdir -p "$(dirname "$TORCH_HOME")"
rm -rf "$TORCH_HOME"
"$PYTHON" -m venv "$TORCH_HOME"
"$TORCH_HOME/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
"$TORCH_HOME/bin/python" -m pip install --quiet --disable-pip-version-check \
    "torch==$TORCH_VERSION" numpy >&2
"$TORCH_HOME/bin/python" - >&2 <<'PY'
import torch
assert torch.__version__.startswith("2.11.0"), torch.__version__
print("torch", torch.__version__, "ok")
PY
touch "$STAMP"
echo "$TORCH_HOME"
