"""Kernels: compiled artifacts loaded for running on torch tensors."""
from __future__ import annotations

import ctypes
import threading

import torch

from . import _native as n
from ._closing import Closing
from ._tensors import DLViews, from_managed
from .errors import InvalidArgumentError, check


class Kernel(Closing):
    """A blueprint's current artifact, loaded (hashed and, with trusted
    keys, signature-checked). ``run`` checks the inputs against the
    blueprint's guards and runs it; inputs are read in place and the result
    is a tensor that shares the library's memory (no copies either way).
    A kernel may outlive its forge; close it (or use ``with``) when done."""

    def __init__(self, handle: "ctypes.POINTER(n.KernelHandle)", blueprint_id: str) -> None:
        self._handle = handle
        self.blueprint_id = blueprint_id
        self._local = threading.local()

    def run(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Runs the kernel; a guard mismatch raises :class:`InvalidArgumentError`
        naming the input and dimension."""
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
        """Frees the kernel (idempotent)."""
        handle, self._handle = self._handle, None
        if handle:
            n.lib.tezzeret_kernel_free(handle)
