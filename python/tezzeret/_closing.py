"""What every handle-owning object shares: ``with`` closes it, and so does
garbage collection (quietly: at interpreter exit the world may be half gone)."""
from __future__ import annotations

from typing import TypeVar

T = TypeVar("T", bound="Closing")


class Closing:
    """A context manager whose exit and finaliser call ``close()``."""

    def close(self) -> None:  # pragma: no cover - every subclass has its own
        raise NotImplementedError

    def __enter__(self: T) -> T:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
