"""Exceptions: one class per C ABI status code, under :class:`TezzeretError`."""
from __future__ import annotations

from typing import Dict, Type


class TezzeretError(Exception):
    """A call into the forge failed. ``code`` is the C ABI status code,
    ``message`` the library's message naming the problem."""

    code: int = -1

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InvalidArgumentError(TezzeretError, ValueError):
    """An argument was refused (a bad value, a guard mismatch, a closed forge)."""

    code = 1


class NullArgumentError(TezzeretError, ValueError):
    """A required argument was missing."""

    code = 2


class InvalidUtf8Error(TezzeretError, ValueError):
    """A string was not UTF-8."""

    code = 3


class MalformedError(TezzeretError, ValueError):
    """Bytes were not the Leyline message they should be."""

    code = 4


class AbiMismatchError(TezzeretError):
    """The loaded library speaks another C ABI than this package."""

    code = 5


class StateLockedError(TezzeretError):
    """The state directory is open in another forge (this or another process)."""

    code = 6


class NotFoundError(TezzeretError, LookupError):
    """An unknown blueprint, or a blueprint without a current artifact."""

    code = 7


class QuarantinedError(TezzeretError):
    """A quarantine-only blueprint while quarantine compilation is off."""

    code = 8


class CompileFailedError(TezzeretError):
    """Compilation or validation failed."""

    code = 9


class TezzeretIOError(TezzeretError, OSError):
    """An I/O error (disk full, permissions)."""

    code = 10


class CorruptError(TezzeretError):
    """Damaged state or an artifact that does not verify."""

    code = 11


class PoisonedError(TezzeretError):
    """An earlier internal error poisoned the forge: close it."""

    code = 12


class InternalError(TezzeretError):
    """A bug in the library, contained."""

    code = 13


class BudgetExceededError(TezzeretError, TimeoutError):
    """A compile ran past its time or memory budget."""

    code = 14


class UnsupportedError(TezzeretError):
    """Not supported here (e.g. CUDA asked for without a GPU)."""

    code = 15


BY_CODE: Dict[int, Type[TezzeretError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NullArgumentError,
        InvalidUtf8Error,
        MalformedError,
        AbiMismatchError,
        StateLockedError,
        NotFoundError,
        QuarantinedError,
        CompileFailedError,
        TezzeretIOError,
        CorruptError,
        PoisonedError,
        InternalError,
        BudgetExceededError,
        UnsupportedError,
    )
}


def error_for(code: int, message: str) -> TezzeretError:
    """The exception of a status code."""
    return BY_CODE.get(code, TezzeretError)(message, code)


def check(status) -> None:  # status: POINTER(Status) or None
    """Raises the exception a status carries and frees it; nothing for NULL."""
    if not status:
        return
    from ._native import lib

    try:
        code = lib.tezzeret_status_code(status)
        message = (lib.tezzeret_status_message(status) or b"").decode("utf-8", "replace")
    finally:
        lib.tezzeret_status_free(status)
    raise error_for(code, message)
