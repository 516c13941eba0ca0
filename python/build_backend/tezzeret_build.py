"""PEP 517 build backend of the `tezzeret` wheel.

Builds libtezzeret with cargo (through the repository's scripts/env.sh, so
against the same libtorch 2.11 the project builds with) and packs it with
the Python sources into a wheel. The library finds libtorch through its
rpath `$ORIGIN/../torch/lib` — the installed torch package beside it —
and the package imports torch before loading it, so one libtorch serves
the process.

It also compiles `tezzeret/_fastpath.c` (the kernel-run hot path, a
CPython extension that links against nothing but the interpreter) with the
C compiler the interpreter was built with, which makes the wheel specific
to this interpreter (`cp311-cp311-…`).

TEZZERET_WHEEL_PROFILE=dev packs the dev-profile build the test command
already made instead of a release build.
"""
from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import sysconfig
import tempfile
import zipfile

NAME = "tezzeret"
VERSION = "0.1.0"
ABI = f"cp{sys.version_info.major}{sys.version_info.minor}"
TAG = f"{ABI}-{ABI}-linux_x86_64"
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(HERE)


def _metadata() -> str:
    return (
        "Metadata-Version: 2.1\n"
        f"Name: {NAME}\n"
        f"Version: {VERSION}\n"
        "Summary: Tezzeret, the compilation forge of Esper, for Python hosts\n"
        "Requires-Python: >=3.9\n"
        "Requires-Dist: torch==2.11.*\n"
    )


def _library() -> str:
    profile = os.environ.get("TEZZERET_WHEEL_PROFILE", "release")
    if profile not in ("release", "dev"):
        raise RuntimeError(f"TEZZERET_WHEEL_PROFILE must be release or dev, not {profile!r}")
    flag = "--release" if profile == "release" else ""
    script = f'source scripts/env.sh >&2 && cargo build --lib {flag} >&2 && echo "$CARGO_TARGET_DIR"'
    # pip's isolated build environment reaches child interpreters through
    # PYTHONPATH (and hides their site-packages): the build's own Python,
    # the one with torch, must run as itself.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k not in ("PIP_BUILD_TRACKER",)}
    done = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, check=True, stdout=subprocess.PIPE, text=True)
    target = done.stdout.strip().splitlines()[-1]
    path = os.path.join(target, "release" if profile == "release" else "debug", "libtezzeret.so")
    if not os.path.exists(path):
        raise RuntimeError(f"cargo built no {path}")
    return path


def _extension():
    """Compiles the hot path; returns its file name in the package and its
    bytes, or None (with a warning: the package then runs kernels through
    ctypes only) when this interpreter's C compiler cannot build it."""
    source = os.path.join(HERE, NAME, "_fastpath.c")
    name = "_fastpath" + sysconfig.get_config_var("EXT_SUFFIX")
    compiler = (sysconfig.get_config_var("CC") or "cc").split()
    include = sysconfig.get_paths()["include"]
    with tempfile.TemporaryDirectory() as work:
        out = os.path.join(work, name)
        # The interpreter's headers are system headers: their warnings are not ours.
        flags = ["-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", "-isystem", include, source, "-o", out]
        try:
            subprocess.run(compiler + flags, check=True, stdout=sys.stderr)
        except (OSError, subprocess.CalledProcessError) as error:
            print(f"tezzeret_build: WARNING: the compiled hot path was not built ({error}); kernels run through ctypes", file=sys.stderr)
            return None
        with open(out, "rb") as f:
            return name, f.read()


def _record_line(arcname: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{arcname},sha256={digest},{len(data)}"


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):  # noqa: ANN001, D103
    files = {}
    package = os.path.join(HERE, NAME)
    for name in sorted(os.listdir(package)):
        if name.endswith(".py") or name == "py.typed":
            with open(os.path.join(package, name), "rb") as f:
                files[f"{NAME}/{name}"] = f.read()
    with open(_library(), "rb") as f:
        files[f"{NAME}/libtezzeret.so.0"] = f.read()
    extension = _extension()
    if extension is not None:
        files[f"{NAME}/{extension[0]}"] = extension[1]
    tag = TAG if extension is not None else "py3-none-linux_x86_64"
    dist = f"{NAME}-{VERSION}.dist-info"
    files[f"{dist}/METADATA"] = _metadata().encode()
    files[f"{dist}/WHEEL"] = f"Wheel-Version: 1.0\nGenerator: tezzeret_build\nRoot-Is-Purelib: false\nTag: {tag}\n".encode()
    files[f"{dist}/top_level.txt"] = f"{NAME}\n".encode()
    record = [_record_line(name, data) for name, data in files.items()] + [f"{dist}/RECORD,,"]
    files[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = f"{NAME}-{VERSION}-{tag}.whl"
    with zipfile.ZipFile(os.path.join(wheel_directory, wheel), "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            info = zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0))
            info.external_attr = (0o755 if name.endswith((".so.0", ".so")) else 0o644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
    return wheel


def get_requires_for_build_wheel(config_settings=None):  # noqa: ANN001, D103
    return []


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):  # noqa: ANN001, D103
    dist = os.path.join(metadata_directory, f"{NAME}-{VERSION}.dist-info")
    os.makedirs(dist, exist_ok=True)
    with open(os.path.join(dist, "METADATA"), "w") as f:
        f.write(_metadata())
    return os.path.basename(dist)
