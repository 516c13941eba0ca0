#!/usr/bin/env bash
# Installs the built library into a prefix: lib/libtezzeret.so.X.Y.Z (+ SONAME
# and dev symlinks), lib/libtezzeret.a, include/tezzeret.h,
# lib/cmake/Tezzeret/*.cmake and lib/pkgconfig/tezzeret.pc.
#
# usage: scripts/install.sh --prefix DIR [--profile release|debug] [--no-build]
#                           [--lib-dir DIR]   (install a library built elsewhere,
#                                              e.g. by scripts/build-tsan.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

prefix=""
profile="release"
build=1
lib_dir=""
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) prefix="$2"; shift 2 ;;
        --profile) profile="$2"; shift 2 ;;
        --no-build) build=0; shift ;;
        --lib-dir) lib_dir="$2"; build=0; shift 2 ;;
        *) echo "install.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
[ -n "$prefix" ] || { echo "install.sh: --prefix DIR is required" >&2; exit 2; }

source scripts/env.sh
if [ "$build" = 1 ]; then
    if [ "$profile" = release ]; then cargo build --release --lib; else cargo build --lib; fi
fi
out_dir="${lib_dir:-$CARGO_TARGET_DIR/$([ "$profile" = release ] && echo release || echo debug)}"

version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)"
abi_major="$(sed -n 's/^pub const ABI_MAJOR: u32 = \([0-9]*\);/\1/p' src/base/abi_version.rs)"
torch_lib="$LIBTORCH/lib"

mkdir -p "$prefix/lib/cmake/Tezzeret" "$prefix/lib/pkgconfig" "$prefix/include"
prefix="$(cd "$prefix" && pwd)"
install -m 0755 "$out_dir/libtezzeret.so" "$prefix/lib/libtezzeret.so.$version"
ln -sf "libtezzeret.so.$version" "$prefix/lib/libtezzeret.so.$abi_major"
ln -sf "libtezzeret.so.$abi_major" "$prefix/lib/libtezzeret.so"
install -m 0644 "$out_dir/libtezzeret.a" "$prefix/lib/libtezzeret.a"
install -m 0644 include/tezzeret.h "$prefix/include/tezzeret.h"

substitute() {
    sed -e "s|@VERSION@|$version|g" -e "s|@ABI_MAJOR@|$abi_major|g" \
        -e "s|@PREFIX@|$prefix|g" -e "s|@TORCH_LIB@|$torch_lib|g" "$1" > "$2"
}
substitute cmake/TezzeretConfig.cmake.in "$prefix/lib/cmake/Tezzeret/TezzeretConfig.cmake"
substitute cmake/TezzeretConfigVersion.cmake.in "$prefix/lib/cmake/Tezzeret/TezzeretConfigVersion.cmake"
substitute cmake/tezzeret.pc.in "$prefix/lib/pkgconfig/tezzeret.pc"
echo "installed tezzeret $version into $prefix"
