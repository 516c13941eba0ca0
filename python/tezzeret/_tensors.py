"""torch.Tensor ↔ the C ABI's tensor descriptions, without copies."""
from __future__ import annotations

import ctypes
import struct
from typing import Sequence, Tuple

import torch

from . import _native as n
from .errors import InvalidArgumentError

# torch dtype → (guard dtype, DLPack code, bits).
_DTYPES = {
    torch.float32: (0, 2, 32),
    torch.float64: (1, 2, 64),
    torch.float16: (2, 2, 16),
    torch.bfloat16: (3, 4, 16),
    torch.int64: (4, 0, 64),
    torch.int32: (5, 0, 32),
    torch.int16: (6, 0, 16),
    torch.int8: (7, 0, 8),
    torch.uint8: (8, 1, 8),
    torch.bool: (9, 6, 8),
}


def _dtype_of(tensor: torch.Tensor, index: int) -> Tuple[int, int, int]:
    if not isinstance(tensor, torch.Tensor):
        raise InvalidArgumentError(f"input {index} is a {type(tensor).__name__}, not a torch.Tensor")
    kind = _DTYPES.get(tensor.dtype)
    if kind is None:
        raise InvalidArgumentError(f"input {index} has dtype {tensor.dtype}, which the forge does not take")
    return kind


class GuardScratch:
    """Reusable guard-check arguments for one thread: the arrays are made
    once and refilled per call (the hot path allocates nothing of its own)."""

    __slots__ = ("metas", "dims", "dtypes", "packers", "metas_address", "pointers")

    def __init__(self) -> None:
        self.metas = (n.TensorMeta * n.MAX_INPUTS)()
        self.dims = (ctypes.c_int64 * (2 * n.MAX_RANK * n.MAX_INPUTS))()
        base = ctypes.addressof(self.dims)
        size = ctypes.sizeof(ctypes.c_int64)
        self.pointers = [(base + size * 2 * i * n.MAX_RANK, base + size * (2 * i + 1) * n.MAX_RANK) for i in range(n.MAX_INPUTS)]
        self.dtypes = {dtype: kind[0] for dtype, kind in _DTYPES.items()}
        # Shape then, MAX_RANK slots on, strides: one pack per input.
        self.metas_address = ctypes.addressof(self.metas)
        self.packers = [struct.Struct(f"<{r}q{(n.MAX_RANK - r) * 8}x{r}q") for r in range(n.MAX_RANK + 1)]

    def fill(self, tensors: Sequence[torch.Tensor]) -> bool:
        """Describes the tensors; False if they do not fit (too many, too
        high a rank, not tensors, an unknown dtype): the caller then takes
        the general path, which names the problem."""
        if len(tensors) > n.MAX_INPUTS:
            return False
        i = 0
        for tensor in tensors:
            try:
                guard_dtype = self.dtypes[tensor.dtype]
                shape = tensor.shape
                rank = len(shape)
                # Input i's shape starts at int64 2 * i * MAX_RANK (8 bytes each).
                self.packers[rank].pack_into(self.dims, 16 * i * n.MAX_RANK, *shape, *tensor.stride())
            except (AttributeError, KeyError, TypeError, IndexError):
                return False
            shape_at, stride_at = self.pointers[i]
            _META.pack_into(self.metas, _META.size * i, guard_dtype, rank, shape_at, stride_at)
            i += 1
        return True


class Metas:
    """Guard-check descriptions of tensors (their arrays kept alive)."""

    __slots__ = ("array", "_keep")

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self.array = (n.TensorMeta * max(len(tensors), 1))()
        self._keep = []
        for i, tensor in enumerate(tensors):
            guard_dtype = _dtype_of(tensor, i)[0]
            rank = tensor.dim()
            shape = (ctypes.c_int64 * max(rank, 1))(*tensor.shape)
            stride = (ctypes.c_int64 * max(rank, 1))(*tensor.stride())
            self._keep.append((shape, stride))
            meta = self.array[i]
            meta.dtype, meta.rank, meta.shape, meta.stride = guard_dtype, rank, shape, stride


# One DLTensor as packed bytes: data, device (type, id), ndim, dtype (code,
# bits, lanes), shape and strides pointers, byte offset.
#: DLPack (code, bits) of each dtype the forge takes.
DTYPE_CODES = {dtype: (code, bits) for dtype, (_, code, bits) in _DTYPES.items()}

_DLTENSOR = struct.Struct("<QiiiBBHQQQ")
# One TensorMeta: dtype, rank, shape and stride pointers.
_META = struct.Struct("<IIQQ")


class DLViews:
    """DLPack views of tensors for a kernel run, reused per thread: the
    tensors' data is borrowed for the call, not copied."""

    __slots__ = ("array", "dims", "packers", "kinds", "pointers")

    def __init__(self) -> None:
        assert ctypes.sizeof(n.DLTensor) == _DLTENSOR.size
        self.array = (n.DLTensor * n.MAX_INPUTS)()
        self.dims = (ctypes.c_int64 * (2 * n.MAX_RANK * n.MAX_INPUTS))()
        base = ctypes.addressof(self.dims)
        size = ctypes.sizeof(ctypes.c_int64)
        self.pointers = [(base + size * 2 * i * n.MAX_RANK, base + size * (2 * i + 1) * n.MAX_RANK) for i in range(n.MAX_INPUTS)]
        self.packers = [struct.Struct(f"<{r}q{(n.MAX_RANK - r) * 8}x{r}q") for r in range(n.MAX_RANK + 1)]
        self.kinds = {dtype: (code, bits) for dtype, (_, code, bits) in _DTYPES.items()}

    def fill(self, tensors: Sequence[torch.Tensor]) -> None:
        """Describes the tensors, refusing what the forge does not take."""
        if len(tensors) > n.MAX_INPUTS:
            raise InvalidArgumentError(f"{len(tensors)} inputs given, at most {n.MAX_INPUTS} are taken")
        i = 0
        for tensor in tensors:
            # Only real, dense tensors: data_ptr() is trusted as memory to read.
            if not isinstance(tensor, torch.Tensor):
                _dtype_of(tensor, i)  # raises naming the problem
            if tensor.layout is not torch.strided:
                raise InvalidArgumentError(f"input {i} has layout {tensor.layout}; the forge takes dense (strided) tensors")
            try:
                code, bits = self.kinds[tensor.dtype]
                cpu = tensor.is_cpu
            except (AttributeError, KeyError, TypeError):
                _dtype_of(tensor, i)  # raises naming the problem
                raise
            if cpu:
                device_type, device_id = 1, 0
            elif tensor.is_cuda:
                device_type, device_id = 2, tensor.get_device()
            else:
                raise InvalidArgumentError(f"input {i} is on device {tensor.device}, which the forge does not take")
            shape = tensor.shape
            rank = len(shape)
            if rank > n.MAX_RANK:
                raise InvalidArgumentError(f"input {i} has rank {rank}, above the most a guard holds ({n.MAX_RANK})")
            shape_at, strides_at = self.pointers[i]
            self.packers[rank].pack_into(self.dims, 16 * i * n.MAX_RANK, *shape, *tensor.stride())
            _DLTENSOR.pack_into(self.array, _DLTENSOR.size * i, tensor.data_ptr(), device_type, device_id, rank, code, bits, 1, shape_at, strides_at, 0)
            i += 1


try:
    from . import _fastpath
except ImportError:  # a wheel built without the extension: ctypes only
    _fastpath = None

if _fastpath is not None:
    _fastpath.setup(
        ctypes.cast(n.lib.tezzeret_kernel_run_dlpack, ctypes.c_void_p).value,
        torch.utils.dlpack.from_dlpack,
        dict(DTYPE_CODES),
        torch.Tensor,
    )
    #: The compiled kernel-run hot path, when the wheel carries it.
    FAST_RUN = _fastpath.run
    _adopt = _fastpath.adopt
else:
    FAST_RUN = None
    _capsule_new = ctypes.pythonapi.PyCapsule_New
    _capsule_new.restype = ctypes.py_object
    _capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    _from_dlpack = torch.utils.dlpack.from_dlpack

    def _adopt(address: int) -> torch.Tensor:
        # Without the extension the capsule has no destructor: were torch to
        # refuse it, the tensor would leak (it does not refuse a valid one).
        return _from_dlpack(_capsule_new(address, b"dltensor", None))


def from_managed(address: int) -> torch.Tensor:
    """A DLManagedTensor the library handed over, as a torch.Tensor sharing
    its memory: a "dltensor" capsule consumed at once by torch, which calls
    the library's deleter when the tensor's storage goes (an unconsumed
    capsule gives the tensor back to the library)."""
    return _adopt(address)
