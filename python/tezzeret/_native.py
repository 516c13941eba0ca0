"""The C library and its declarations (ctypes), loaded once.

torch is imported first, so that libtezzeret's libtorch dependencies resolve
to the libraries the installed torch package has already loaded: the forge
and the host's tensors share one libtorch in the process.
"""
from __future__ import annotations

import ctypes
import os
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    c_bool,
    c_char,
    c_char_p,
    c_double,
    c_int32,
    c_int64,
    c_size_t,
    c_uint8,
    c_uint16,
    c_uint32,
    c_uint64,
    c_void_p,
)

import torch  # noqa: F401  (loads libtorch before libtezzeret)

ABI_MAJOR = 0
ABI_MINOR = 11

c_uint8_p = POINTER(c_uint8)
c_int64_p = POINTER(c_int64)


class Status(Structure):
    """Opaque `tezzeret_status`."""


class Buffer(Structure):
    """Opaque `tezzeret_buffer`."""


class ForgeHandle(Structure):
    """Opaque `tezzeret_forge`."""


class GuardTableHandle(Structure):
    """Opaque `tezzeret_guard_table`."""


class KernelHandle(Structure):
    """Opaque `tezzeret_kernel`."""


class TensorHandle(Structure):
    """Opaque `tezzeret_tensor`."""


class DescriptorSink(Structure):
    """Opaque `tezzeret_descriptor_sink`."""


class BusConfig(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("redis_url", c_char_p),
        ("requests_stream", c_char_p),
        ("ready_stream", c_char_p),
        ("errors_stream", c_char_p),
        ("telemetry_stream", c_char_p),
        ("emergency_stream", c_char_p),
        ("dead_letter_stream", c_char_p),
        ("group", c_char_p),
        ("consumer", c_char_p),
        ("secret", c_uint8_p),
        ("secret_len", c_size_t),
        ("freshness_ms", c_uint64),
        ("message_ttl_ms", c_uint64),
        ("claim_idle_ms", c_uint64),
        ("flags", c_uint32),
    ]


class FleetConfig(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("bucket", c_char_p),
        ("endpoint", c_char_p),
        ("prefix", c_char_p),
        ("region", c_char_p),
        ("access_key_id", c_char_p),
        ("secret_access_key", c_char_p),
        ("lease_ttl_ms", c_uint64),
        ("lease_wait_ms", c_uint64),
        ("request_timeout_ms", c_uint64),
        ("retry_interval_ms", c_uint64),
        ("flags", c_uint32),
        ("member_index", c_int64),
        ("lease_redis_url", c_char_p),
    ]


class Config(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("state_dir", c_char_p),
        ("strategy", c_uint32),
        ("device", c_uint32),
        ("flags", c_uint32),
        ("max_concurrency", c_uint32),
        ("refresh_interval_ms", c_uint64),
        ("telemetry_interval_ms", c_uint64),
        ("batch_size", c_uint32),
        ("signing_key", c_uint8_p),
        ("trusted_keys", c_uint8_p),
        ("trusted_key_count", c_size_t),
        ("budget_ms", c_uint64),
        ("bus", POINTER(BusConfig)),
        ("fleet", POINTER(FleetConfig)),
    ]


ENUMERATE_FN = CFUNCTYPE(c_int32, c_void_p, POINTER(DescriptorSink))
BYTES_FN = CFUNCTYPE(None, c_void_p, POINTER(c_uint8), c_size_t)
LOG_FN = CFUNCTYPE(None, c_void_p, c_uint32, c_char_p)
RELEASE_FN = CFUNCTYPE(None, c_void_p)


class HostCallbacks(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("user_data", c_void_p),
        ("enumerate", ENUMERATE_FN),
        ("catalog_update", BYTES_FN),
        ("telemetry", BYTES_FN),
        ("log", LOG_FN),
        ("release", RELEASE_FN),
    ]


class RunSummary(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("total", c_uint32),
        ("ok", c_uint32),
        ("cached", c_uint32),
        ("failed", c_uint32),
        ("refused", c_uint32),
    ]


MAX_INPUTS = 4
MAX_RANK = 8


class GuardInput(Structure):
    _fields_ = [
        ("dtype", c_uint32),
        ("rank", c_uint32),
        ("shape", c_int64 * MAX_RANK),
        ("stride", c_int64 * MAX_RANK),
        ("requires_grad", c_bool),
    ]


class GuardEntry(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("blueprint_id", c_char * 128),
        ("checksum", c_char * 65),
        ("guard_digest", c_char * 65),
        ("device", c_char * 16),
        ("dynamic_batch", c_bool),
        ("input_count", c_uint32),
        ("inputs", GuardInput * MAX_INPUTS),
    ]


class TensorMeta(Structure):
    _fields_ = [("dtype", c_uint32), ("rank", c_uint32), ("shape", c_int64_p), ("stride", c_int64_p)]


class GuardVerdict(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("result", c_uint32),
        ("input", c_uint32),
        ("dimension", c_uint32),
        ("expected", c_int64),
        ("actual", c_int64),
        ("checksum", c_uint8 * 32),
    ]


class DLDevice(Structure):
    _fields_ = [("device_type", c_int32), ("device_id", c_int32)]


class DLDataType(Structure):
    _fields_ = [("code", c_uint8), ("bits", c_uint8), ("lanes", c_uint16)]


class DLTensor(Structure):
    _fields_ = [
        ("data", c_void_p),
        ("device", DLDevice),
        ("ndim", c_int32),
        ("dtype", DLDataType),
        ("shape", c_int64_p),
        ("strides", c_int64_p),
        ("byte_offset", c_uint64),
    ]


class DLManagedTensor(Structure):
    pass


DLManagedTensor._fields_ = [
    ("dl_tensor", DLTensor),
    ("manager_ctx", c_void_p),
    ("deleter", CFUNCTYPE(None, POINTER(DLManagedTensor))),
]


class ResourceReading(Structure):
    _fields_ = [("struct_size", c_size_t), ("gpu_utilisation_percent", c_double), ("rss_bytes", c_uint64)]


def _library_path() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    override = os.environ.get("TEZZERET_LIBRARY")
    if override:
        return override
    for name in ("libtezzeret.so.0", "libtezzeret.so"):
        candidate = os.path.join(here, name)
        if os.path.exists(candidate):
            return candidate
    raise ImportError(f"libtezzeret is missing from {here}: install the package with pip (see the README)")


lib = ctypes.CDLL(_library_path())

_S = POINTER(Status)
_PROTOTYPES = {
    "tezzeret_status_code": (c_uint32, [_S]),
    "tezzeret_status_message": (c_char_p, [_S]),
    "tezzeret_status_free": (None, [_S]),
    "tezzeret_buffer_data": (c_void_p, [POINTER(Buffer)]),
    "tezzeret_buffer_len": (c_size_t, [POINTER(Buffer)]),
    "tezzeret_buffer_free": (None, [POINTER(Buffer)]),
    "tezzeret_version": (c_char_p, []),
    "tezzeret_abi_major": (c_uint32, []),
    "tezzeret_abi_minor": (c_uint32, []),
    "tezzeret_check_abi": (_S, [c_uint32, c_uint32]),
    "tezzeret_config_init": (_S, [POINTER(Config), c_size_t]),
    "tezzeret_bus_config_init": (_S, [POINTER(BusConfig), c_size_t]),
    "tezzeret_fleet_config_init": (_S, [POINTER(FleetConfig), c_size_t]),
    "tezzeret_fleet_fetch_artifact": (_S, [POINTER(FleetConfig), c_char_p, c_char_p, c_char_p]),
    "tezzeret_host_callbacks_init": (_S, [POINTER(HostCallbacks), c_size_t]),
    "tezzeret_descriptor_sink_push": (_S, [POINTER(DescriptorSink), c_void_p, c_size_t]),
    "tezzeret_descriptor_validate": (_S, [c_void_p, c_size_t]),
    "tezzeret_forge_open": (_S, [POINTER(Config), POINTER(HostCallbacks), POINTER(POINTER(ForgeHandle))]),
    "tezzeret_forge_close": (None, [POINTER(ForgeHandle)]),
    "tezzeret_forge_run": (_S, [POINTER(ForgeHandle), POINTER(RunSummary)]),
    "tezzeret_forge_submit": (_S, [POINTER(ForgeHandle), c_char_p, c_uint32, POINTER(c_uint64)]),
    "tezzeret_forge_drain": (_S, [POINTER(ForgeHandle), POINTER(c_uint32), POINTER(c_uint32)]),
    "tezzeret_forge_compile_now": (_S, [POINTER(ForgeHandle), c_char_p]),
    "tezzeret_forge_compile_now_within": (_S, [POINTER(ForgeHandle), c_char_p, c_uint64]),
    "tezzeret_forge_refresh": (_S, [POINTER(ForgeHandle), POINTER(c_uint32), POINTER(c_uint32)]),
    "tezzeret_forge_catalog_json": (_S, [POINTER(ForgeHandle), POINTER(POINTER(Buffer))]),
    "tezzeret_forge_prefetch": (_S, [POINTER(ForgeHandle), c_void_p, c_size_t, POINTER(c_uint32), POINTER(POINTER(Buffer))]),
    "tezzeret_forge_health": (_S, [POINTER(ForgeHandle), POINTER(POINTER(Buffer))]),
    "tezzeret_forge_metrics": (_S, [POINTER(ForgeHandle), POINTER(POINTER(Buffer))]),
    "tezzeret_forge_metrics_prometheus": (_S, [POINTER(ForgeHandle), POINTER(POINTER(Buffer))]),
    "tezzeret_forge_report_resources": (_S, [POINTER(ForgeHandle), POINTER(ResourceReading)]),
    "tezzeret_forge_guard_table": (_S, [POINTER(ForgeHandle), POINTER(POINTER(GuardTableHandle))]),
    "tezzeret_forge_load_kernel": (_S, [POINTER(ForgeHandle), c_char_p, POINTER(POINTER(KernelHandle))]),
    "tezzeret_guard_table_open": (_S, [c_char_p, POINTER(POINTER(GuardTableHandle))]),
    "tezzeret_guard_table_lookup": (_S, [POINTER(GuardTableHandle), c_char_p, POINTER(GuardEntry)]),
    "tezzeret_guard_table_close": (None, [POINTER(GuardTableHandle)]),
    "tezzeret_guard_check": (c_uint32, [POINTER(GuardTableHandle), c_char_p, POINTER(TensorMeta), c_size_t, POINTER(GuardVerdict)]),
    "tezzeret_kernel_run": (_S, [POINTER(KernelHandle), POINTER(DLTensor), c_size_t, POINTER(POINTER(TensorHandle))]),
    "tezzeret_kernel_free": (None, [POINTER(KernelHandle)]),
    # The result's address comes back as a plain integer (the hot path).
    "tezzeret_kernel_run_dlpack": (_S, [POINTER(KernelHandle), POINTER(DLTensor), c_size_t, POINTER(c_void_p)]),
    "tezzeret_tensor_into_dlpack": (_S, [POINTER(TensorHandle), POINTER(POINTER(DLManagedTensor))]),
    "tezzeret_tensor_free": (None, [POINTER(TensorHandle)]),
    "tezzeret_keygen": (_S, [POINTER(c_uint8), POINTER(c_uint8)]),
}

for _name, (_restype, _argtypes) in _PROTOTYPES.items():
    _function = getattr(lib, _name)
    _function.restype = _restype
    _function.argtypes = _argtypes


# The guard check's hot path: every argument a plain address (or bytes),
# so that ctypes converts nothing but integers.
guard_check_raw = lib["tezzeret_guard_check"]
guard_check_raw.restype = c_uint32
guard_check_raw.argtypes = [c_void_p, c_char_p, c_void_p, c_size_t, c_void_p]


def take_buffer(buffer: "POINTER(Buffer)") -> bytes:
    """Copies a library buffer's bytes and frees it."""
    try:
        return ctypes.string_at(lib.tezzeret_buffer_data(buffer), lib.tezzeret_buffer_len(buffer))
    finally:
        lib.tezzeret_buffer_free(buffer)
