# Sourced by the project's scripts: installs libtorch when missing and points
# the build at it. Usage: source scripts/env.sh
_tz_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TEZZERET_TORCH_VENV="$(bash "$_tz_root/scripts/install-libtorch.sh" | tail -n 1)"
TEZZERET_PYTHON="$TEZZERET_TORCH_VENV/bin/python"
LIBTORCH="$("$TEZZERET_PYTHON" -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
# The CUDA toolkit root find_package(Torch) needs (see install-libtorch.sh).
TEZZERET_CUDA_ROOT="$("$TEZZERET_PYTHON" -c 'import os, nvidia; print(os.path.join(nvidia.__path__[0], "cu13"))')"
export TEZZERET_TORCH_VENV TEZZERET_PYTHON LIBTORCH TEZZERET_CUDA_ROOT
export LIBTORCH_CXX11_ABI=1
# Cargo's own default, but fixed so every script shares one build.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$_tz_root/target}"
unset _tz_root
