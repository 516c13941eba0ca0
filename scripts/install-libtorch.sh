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
CUDA_STAMP="$TORCH_HOME/.tezzeret-cuda-toolkit"

# libtorch's CMake package (find_package(Torch), used by the C++ artifact
# loader) insists on a CUDA toolkit because the wheel is built with CUDA.
# NVIDIA's PyPI wheels of the matching 13.0 compiler provide one; they are
# laid out as a toolkit root (lib64, unversioned .so links) in the venv.
install_cuda_toolkit() {
    [ -f "$CUDA_STAMP" ] && return 0
    echo "installing the CUDA 13.0 compiler wheels for find_package(Torch)" >&2
    "$TORCH_HOME/bin/python" -m pip install --quiet --disable-pip-version-check \
        "nvidia-cuda-nvcc==13.0.88.*" "nvidia-cuda-cccl==13.0.85.*" \
        "nvidia-cuda-crt==13.0.88.*" "nvidia-nvvm==13.0.88.*" >&2
    local root
    root="$("$TORCH_HOME/bin/python" -c 'import os, nvidia; print(os.path.join(nvidia.__path__[0], "cu13"))')"
    ln -sfn lib "$root/lib64"
    for lib in "$root"/lib/*.so.*; do
        local base unversioned
        base="$(basename "$lib")"
        unversioned="${base%%.so.*}.so"
        [ -e "$root/lib/$unversioned" ] || ln -s "$base" "$root/lib/$unversioned"
    done
    touch "$CUDA_STAMP"
}

if [ -f "$STAMP" ] && [ -x "$TORCH_HOME/bin/python" ]; then
    install_cuda_toolkit
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
install_cuda_toolkit
echo "$TORCH_HOME"
