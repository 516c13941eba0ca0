"""Arguments as the C library takes them."""
from __future__ import annotations

from .errors import InvalidArgumentError


def c_text(value: str, what: str) -> bytes:
    """``value`` as a C string. A NUL inside it would end the string
    there, so that the library saw less than was given: refused instead."""
    if not isinstance(value, str):
        raise InvalidArgumentError(f"{what} must be a string, got {value!r}")
    if "\0" in value:
        raise InvalidArgumentError(f"{what} contains a NUL character")
    try:
        return value.encode()
    except UnicodeEncodeError as e:
        raise InvalidArgumentError(f"{what} is not valid UTF-8 ({e.reason} at {e.start})") from None
