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

    __slots__ = ("metas", "dims", "dtypes", "packers", "metas_address")

    def __init__(self) -> None:
        self.metas = (n.TensorMeta * n.MAX_INPUTS)()
        self.dims = (ctypes.c_int64 * (2 * n.MAX_RANK * n.MAX_INPUTS))()
        base = ctypes.addressof(self.dims)
        size = ctypes.sizeof(ctypes.c_int64)
        for i in range(n.MAX_INPUTS):
            self.metas[i].shape = ctypes.cast(base + size * (2 * i * n.MAX_RANK), n.c_int64_p)
            self.metas[i].stride = ctypes.cast(base + size * ((2 * i + 1) * n.MAX_RANK), n.c_int64_p)
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
            meta = self.metas[i]
            meta.dtype = guard_dtype
            meta.rank = rank
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


class DLViews:
    """DLPack views of tensors for a kernel run, reused per thread: the
    tensors' data is borrowed for the call, not copied."""

    __slots__ = ("array", "dims", "packers", "address")

    def __init__(self) -> None:
        self.array = (n.DLTensor * n.MAX_INPUTS)()
        self.dims = (ctypes.c_int64 * (2 * n.MAX_RANK * n.MAX_INPUTS))()
        base = ctypes.addressof(self.dims)
        size = ctypes.sizeof(ctypes.c_int64)
        for i in range(n.MAX_INPUTS):
            self.array[i].shape = ctypes.cast(base + size * (2 * i * n.MAX_RANK), n.c_int64_p)
            self.array[i].strides = ctypes.cast(base + size * ((2 * i + 1) * n.MAX_RANK), n.c_int64_p)
            self.array[i].dtype.lanes = 1
        self.packers = [struct.Struct(f"<{r}q{(n.MAX_RANK - r) * 8}x{r}q") for r in range(n.MAX_RANK + 1)]
        self.address = ctypes.addressof(self.array)

    def fill(self, tensors: Sequence[torch.Tensor]) -> None:
        """Describes the tensors, refusing what the forge does not take."""
        if len(tensors) > n.MAX_INPUTS:
            raise InvalidArgumentError(f"{len(tensors)} inputs given, at most {n.MAX_INPUTS} are taken")
        for i, tensor in enumerate(tensors):
            _, code, bits = _dtype_of(tensor, i)
            kind = tensor.device.type
            view = self.array[i]
            if kind == "cpu":
                view.device.device_type, view.device.device_id = 1, 0
            elif kind == "cuda":
                view.device.device_type, view.device.device_id = 2, tensor.device.index or 0
            else:
                raise InvalidArgumentError(f"input {i} is on device {tensor.device}, which the forge does not take")
            shape = tensor.shape
            rank = len(shape)
            if rank > n.MAX_RANK:
                raise InvalidArgumentError(f"input {i} has rank {rank}, above the most a guard holds ({n.MAX_RANK})")
            self.packers[rank].pack_into(self.dims, 16 * i * n.MAX_RANK, *shape, *tensor.stride())
            view.data = tensor.data_ptr() or None
            view.ndim = rank
            view.dtype.code, view.dtype.bits = code, bits
            view.byte_offset = 0


_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


def into_torch(handle: "ctypes.POINTER(n.TensorHandle)") -> torch.Tensor:
    """A library result tensor as a torch.Tensor sharing its memory (freed
    by the library's deleter when torch lets it go)."""
    from .errors import check

    managed = ctypes.POINTER(n.DLManagedTensor)()
    try:
        check(n.lib.tezzeret_tensor_into_dlpack(handle, ctypes.byref(managed)))
    except BaseException:
        n.lib.tezzeret_tensor_free(handle)
        raise
    # A "dltensor" capsule, consumed at once by torch (which then calls the
    # library's deleter when the tensor's storage goes).
    return torch.utils.dlpack.from_dlpack(_capsule_new(ctypes.addressof(managed.contents), b"dltensor", None))
