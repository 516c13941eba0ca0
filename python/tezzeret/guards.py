"""Guard tables: which inputs each compiled blueprint accepts, checked
without locks from any thread or process."""
from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch

from . import _native as n
from ._args import c_text
from ._closing import Closing
from ._tensors import GuardScratch, Metas
from .errors import InvalidArgumentError, check

# Verdicts of a guard check.
MATCH = 0
VERDICTS = {
    0: "match",
    1: "unknown_blueprint",
    2: "unreadable",
    3: "input_count",
    4: "dtype",
    5: "rank",
    6: "shape",
    7: "stride",
    8: "invalid_argument",
}
_DTYPE_NAMES = ["float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"]


@dataclass(frozen=True)
class GuardVerdict:
    """The outcome of a guard check: ``result`` is ``"match"`` or the first
    precise mismatch (``"shape"``, ``"dtype"``, …) with the input and
    dimension, the expected and actual values; on a match ``checksum`` is
    the artifact's sha256 (hex)."""

    result: str
    input: int = 0
    dimension: int = 0
    expected: int = 0
    actual: int = 0
    checksum: str = ""

    @property
    def ok(self) -> bool:
        """Whether the inputs match."""
        return self.result == "match"


@dataclass(frozen=True)
class GuardInputSpec:
    """One input a blueprint accepts."""

    dtype: str
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]
    requires_grad: bool


@dataclass(frozen=True)
class GuardEntry:
    """A blueprint's guard slot."""

    blueprint_id: str
    checksum: str
    guard_digest: str
    device: str
    dynamic_batch: bool
    inputs: Tuple[GuardInputSpec, ...]


class GuardTable(Closing):
    """A read-only view of a state directory's guard table (``guards.tbl``).
    Its checks and lookups may run on many threads at once. Close it (or use
    ``with``) once no thread uses it any more: as in C, a close racing a
    check on another thread frees the mapping under it."""

    def __init__(self, path: str | None = None, *, _handle: "ctypes.POINTER(n.GuardTableHandle)" = None) -> None:
        if _handle is None:
            if path is None:
                raise InvalidArgumentError("GuardTable needs the path of a guard table")
            _handle = ctypes.POINTER(n.GuardTableHandle)()
            check(n.lib.tezzeret_guard_table_open(c_text(str(path), "path"), ctypes.byref(_handle)))
        self._handle = _handle
        self._address = ctypes.cast(_handle, ctypes.c_void_p).value
        self._local = threading.local()
        self._ids: Dict[str, bytes] = {}
        self._closing = threading.Lock()

    def _scratch(self) -> Tuple[GuardScratch, "n.GuardVerdict"]:
        local = self._local
        try:
            return local.scratch, local.verdict
        except AttributeError:
            local.scratch = GuardScratch()
            local.verdict = n.GuardVerdict()
            local.verdict.struct_size = ctypes.sizeof(n.GuardVerdict)
            return local.scratch, local.verdict

    def _id(self, blueprint_id: str) -> bytes:
        encoded = self._ids.get(blueprint_id)
        if encoded is None:
            if not isinstance(blueprint_id, str):
                raise InvalidArgumentError(f"blueprint_id must be a str, not {type(blueprint_id).__name__}")
            encoded = self._ids[blueprint_id] = c_text(blueprint_id, "blueprint_id")
        return encoded

    def _check(self, blueprint_id: str, tensors: Sequence[torch.Tensor], verdict: "Optional[n.GuardVerdict]") -> int:
        handle = self._handle
        if not handle:
            raise InvalidArgumentError("the guard table is closed")
        scratch, own_verdict = self._scratch()
        out = own_verdict if verdict is None else verdict
        if scratch.fill(tensors):
            return n.lib.tezzeret_guard_check(handle, self._id(blueprint_id), scratch.metas, len(tensors), out)
        metas = Metas(tensors)  # names what does not fit
        return n.lib.tezzeret_guard_check(handle, self._id(blueprint_id), metas.array, len(tensors), out)

    def _live(self) -> "ctypes.POINTER(n.GuardTableHandle)":
        if not self._handle:
            raise InvalidArgumentError("the guard table is closed")
        return self._handle

    def lookup(self, blueprint_id: str) -> GuardEntry:
        """The blueprint's slot; :class:`NotFoundError` if it has none."""
        entry = n.GuardEntry()
        entry.struct_size = ctypes.sizeof(n.GuardEntry)
        check(n.lib.tezzeret_guard_table_lookup(self._live(), c_text(blueprint_id, "blueprint_id"), ctypes.byref(entry)))
        inputs = tuple(
            GuardInputSpec(
                _DTYPE_NAMES[i.dtype] if i.dtype < len(_DTYPE_NAMES) else str(i.dtype),
                tuple(i.shape[: i.rank]),
                tuple(i.stride[: i.rank]),
                bool(i.requires_grad),
            )
            for i in entry.inputs[: entry.input_count]
        )
        return GuardEntry(
            entry.blueprint_id.decode(), entry.checksum.decode(), entry.guard_digest.decode(), entry.device.decode(), bool(entry.dynamic_batch), inputs
        )

    def check(self, blueprint_id: str, *tensors: torch.Tensor) -> GuardVerdict:
        """Checks tensors against the blueprint's guards (dtype, rank,
        shape, strides; any batch size where the blueprint allows it)."""
        _, verdict = self._scratch()
        result = self._check(blueprint_id, tensors, verdict)
        name = VERDICTS.get(result, str(result))
        if result == MATCH:
            return GuardVerdict(name, checksum=bytes(verdict.checksum).hex())
        return GuardVerdict(name, verdict.input, verdict.dimension, verdict.expected, verdict.actual)

    def matches(self, blueprint_id: str, *tensors: torch.Tensor) -> bool:
        """Whether tensors match the blueprint's guards (the fast path: no verdict object)."""
        scratch = getattr(self._local, "scratch", None)
        encoded = self._ids.get(blueprint_id)
        if self._address and scratch is not None and encoded is not None and scratch.fill(tensors):
            return n.guard_check_raw(self._address, encoded, scratch.metas_address, len(tensors), None) == MATCH
        return self._check(blueprint_id, tensors, None) == MATCH

    def close(self) -> None:
        """Releases the mapping (idempotent, also when two threads close
        it at once)."""
        with self._closing:
            handle, self._handle = self._handle, None
            self._address = None
            if handle:
                n.lib.tezzeret_guard_table_close(handle)


def guard_check(table: GuardTable, blueprint_id: str, tensors: Sequence[torch.Tensor]) -> GuardVerdict:
    """Checks tensors against a blueprint's guards (see :meth:`GuardTable.check`)."""
    return table.check(blueprint_id, *tensors)


__all__ = ["GuardTable", "GuardVerdict", "GuardEntry", "GuardInputSpec", "guard_check", "VERDICTS"]
