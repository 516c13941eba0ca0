"""Kernels: compiled artifacts loaded for running on torch tensors."""
from __future__ import annotations

import ctypes
import threading

import torch

from . import _native as n
from ._closing import Closing
from ._tensors import FAST_RUN, DLViews, from_managed
from .errors import InvalidArgumentError, check

#: Whether kernel runs on CPU tensors take the compiled hot path (the
#: extension module built into the wheel); otherwise ctypes serves them.
FAST_PATH = FAST_RUN is not None
_fast_run = FAST_RUN
_STATUS = ctypes.POINTER(n.Status)


class Kernel(Closing):
    """A blueprint's current artifact, loaded (hashed and, with trusted
    keys, signature-checked). ``run`` checks the inputs against the
    blueprint's guards and runs it; inputs are read in place and the result
    is a tensor that shares the library's memory (no copies either way).
    A kernel may outlive its forge and may run on many threads at once;
    close it (or use ``with``) once no thread uses it any more: as in C, a
    close racing a run on another thread frees the kernel under it."""

    def __init__(self, handle: "ctypes.POINTER(n.KernelHandle)", blueprint_id: str) -> None:
        self._handle = handle
        self._address = ctypes.cast(handle, ctypes.c_void_p).value or 0
        self.blueprint_id = blueprint_id
        self._local = threading.local()
        self._closing = threading.Lock()

    def run(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Runs the kernel; a guard mismatch raises :class:`InvalidArgumentError`
        naming the input and dimension."""
        if _fast_run is not None:
            # CPU tensors of known dtypes: described and run in C; anything
            # else (None) takes the ctypes path below, which handles or names it.
            out = _fast_run(self._address, *inputs)
            if out is not None:
                if type(out) is int:
                    check(ctypes.cast(out, _STATUS))
                return out
        if not self._handle:
            raise InvalidArgumentError(f"kernel {self.blueprint_id} is closed")
        try:
            views, managed = self._local.scratch
        except AttributeError:
            views, managed = self._local.scratch = (DLViews(), ctypes.c_void_p())
        views.fill(inputs)
        # The inputs stay referenced (by `inputs`) until the run returned.
        check(n.lib.tezzeret_kernel_run_dlpack(self._handle, views.array, len(inputs), ctypes.byref(managed)))
        return from_managed(managed.value)

    __call__ = run

    def close(self) -> None:
        """Frees the kernel (idempotent, also when two threads close it at
        once)."""
        with self._closing:
            handle, self._handle = self._handle, None
            self._address = 0
            if handle:
                n.lib.tezzeret_kernel_free(handle)
