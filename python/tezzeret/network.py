"""How a forge joins the rest of Esper: the Oona bus (Redis Streams) and a
fleet sharing artifacts through an S3-compatible bucket."""
from __future__ import annotations

import ctypes
import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, List, Optional, Union

from . import _native as n
from ._args import c_text
from .errors import InvalidArgumentError, check

_BUS_NO_PREFETCH = 1
_BUS_NO_PUBLISH = 2
_FLEET_READ_ONLY = 1
_FLEET_LEASES_ON_BUS = 2


# The longest time given in seconds (a year): larger ones are mistakes.
_MAX_SECONDS = 365 * 24 * 3600


def _seconds(seconds: float, what: str) -> float:
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise InvalidArgumentError(f"{what} must be a number of seconds, got {seconds!r}")
    return seconds


# The shortest bus window the library takes (below it, live consumers
# would take each other's requests).
_MIN_WINDOW = 0.01


def _window_ms(seconds: float, what: str) -> int:
    seconds = _seconds(seconds, what)
    if not (math.isfinite(seconds) and _MIN_WINDOW <= seconds <= _MAX_SECONDS):
        raise InvalidArgumentError(f"{what} must be at least {_MIN_WINDOW} and at most {_MAX_SECONDS} seconds, got {seconds}")
    return int(round(seconds * 1000))


def _secret(value: Any) -> bytes:
    """The bus secret as bytes: bytes as they are, text as UTF-8 (the
    shape of an environment variable)."""
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise InvalidArgumentError(f"secret must be bytes or str, got {type(value).__name__}")


def _fleet_ms(seconds: float, what: str) -> int:
    """A fleet time in ms; the library checks its range and names it."""
    seconds = _seconds(seconds, what)
    if not (math.isfinite(seconds) and seconds >= 0):
        raise InvalidArgumentError(f"{what} must be a finite, non-negative number of seconds, got {seconds}")
    # Beyond any range the library takes, yet within its field.
    return int(round(min(seconds, 2**53) * 1000))


def _flag(value: bool, what: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgumentError(f"{what} must be True or False, got {value!r}")
    return value


def _text(value: Optional[str], keep: List[Any], what: str) -> Optional[bytes]:
    if value is None:
        return None
    encoded = c_text(value, what)
    keep.append(encoded)
    return encoded


def _redacted_url(url: str) -> str:
    """``url`` with any credentials (up to the last ``@``) and query cut."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    else:
        scheme += sep
    at = rest.rfind("@")
    credentials, address = ("…", rest[at:]) if at >= 0 else ("", rest)
    before, question, _ = address.partition("?")
    return f"{scheme}{credentials}{before}{'?…' if question else ''}"


def _repr(config: Any, secrets: tuple = (), urls: tuple = ()) -> str:
    """A dataclass's repr with its secrets hidden and its URLs redacted."""
    parts = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if value is not None and field.name in secrets:
            shown = "'…'"
        elif isinstance(value, str) and field.name in urls:
            shown = repr(_redacted_url(value))
        else:
            shown = repr(value)
        parts.append(f"{field.name}={shown}")
    return f"{type(config).__name__}({', '.join(parts)})"


@dataclass(frozen=True, repr=False)
class Bus:
    """The Oona bus to join: prefetch requests answered from the forge's
    catalog, catalog updates and telemetry published. ``secret`` signs and
    checks entries (HMAC-SHA256; bytes, or text taken as UTF-8); ``None``
    leaves them unsigned. ``freshness``, ``message_ttl`` and
    ``claim_idle`` are in seconds, from 0.01 to a year. ``redis_url`` is
    ``redis://…`` or ``unix://…`` (TLS is not built in)."""

    redis_url: str
    group: str = "tezzeret"
    consumer: Optional[str] = None
    secret: Optional[bytes] = None
    freshness: float = 60.0
    message_ttl: float = 900.0
    claim_idle: float = 30.0
    prefetch: bool = True
    publish: bool = True

    def _to_native(self, keep: List[Any]) -> n.BusConfig:
        config = n.BusConfig()
        check(n.lib.tezzeret_bus_config_init(ctypes.byref(config), ctypes.sizeof(n.BusConfig)))
        config.redis_url = _text(self.redis_url, keep, "redis_url")
        config.group = _text(self.group, keep, "group")
        config.consumer = _text(self.consumer, keep, "consumer")
        if self.secret is not None:
            raw = _secret(self.secret)
            secret = (ctypes.c_uint8 * len(raw)).from_buffer_copy(raw)
            keep.append(secret)
            config.secret = ctypes.cast(secret, n.c_uint8_p)
            config.secret_len = len(raw)
        config.freshness_ms = _window_ms(self.freshness, "freshness")
        config.message_ttl_ms = _window_ms(self.message_ttl, "message_ttl")
        config.claim_idle_ms = _window_ms(self.claim_idle, "claim_idle")
        prefetch, publish = _flag(self.prefetch, "prefetch"), _flag(self.publish, "publish")
        config.flags = (0 if prefetch else _BUS_NO_PREFETCH) | (0 if publish else _BUS_NO_PUBLISH)
        return config

    def __repr__(self) -> str:
        return _repr(self, secrets=("secret",), urls=("redis_url",))


@dataclass(frozen=True, repr=False)
class Fleet:
    """The fleet's S3-compatible bucket: artifacts other hosts compiled are
    fetched and verified before compiling, what this forge compiles is
    published, and each blueprint compiles once for the fleet (leases).
    The forge needs ``trusted_keys`` (and a ``signing_key`` unless
    ``read_only``; a read-only forge without one only fetches: a blueprint
    the bucket lacks fails with ``signature_invalid``). Credentials left
    ``None`` come from the ``AWS_*`` environment variables (both or
    neither); ``prefix`` holds ASCII letters, digits, ``-``,
    ``_``, ``.`` and ``/`` only. ``member_index`` is this host's index in
    its fleet (0, 1, 2…, e.g. a scheduler's rank): hosts starting together
    then begin in evenly spread places; with ``None`` each starts at a
    random place. ``lease_redis`` (``redis://host:port/db`` or
    ``unix://path``) keeps the fleet's leases in that Redis instead of the
    bucket: a claim then costs one Redis round trip, and publications are
    announced there, so that waiting hosts ask the bucket only for
    artifacts; every host of the fleet must use the same one.
    ``leases_on_bus=True`` does the same with the forge's bus's Redis (the
    forge needs a ``bus``; not with ``lease_redis``). Times are in
    seconds, each at most a day: ``lease_ttl`` at least 0.1,
    ``request_timeout`` and ``retry_interval`` at least 0.01,
    ``lease_wait`` at least 0 (compile at once rather than wait for
    another host); keep ``request_timeout`` under a third of
    ``lease_ttl`` (a lease is renewed only while it outlives one
    request). A forge needs ``bucket``;
    :func:`fetch_artifact` takes the reference's when it is ``None``."""

    bucket: Optional[str]
    endpoint: Optional[str] = None
    prefix: str = ""
    region: Optional[str] = None
    access_key_id: Optional[str] = None
    secret_access_key: Optional[str] = None
    read_only: bool = False
    lease_ttl: float = 30.0
    lease_wait: float = 60.0
    request_timeout: float = 5.0
    retry_interval: float = 2.0
    member_index: Optional[int] = None
    lease_redis: Optional[str] = None
    leases_on_bus: bool = False

    def _to_native(self, keep: List[Any]) -> n.FleetConfig:
        config = n.FleetConfig()
        check(n.lib.tezzeret_fleet_config_init(ctypes.byref(config), ctypes.sizeof(n.FleetConfig)))
        config.bucket = _text(self.bucket, keep, "bucket")
        config.endpoint = _text(self.endpoint, keep, "endpoint")
        config.prefix = _text(self.prefix, keep, "prefix")
        config.region = _text(self.region, keep, "region")
        config.access_key_id = _text(self.access_key_id, keep, "access_key_id")
        config.secret_access_key = _text(self.secret_access_key, keep, "secret_access_key")
        config.lease_ttl_ms = _fleet_ms(self.lease_ttl, "lease_ttl")
        config.lease_wait_ms = _fleet_ms(self.lease_wait, "lease_wait")
        config.request_timeout_ms = _fleet_ms(self.request_timeout, "request_timeout")
        config.retry_interval_ms = _fleet_ms(self.retry_interval, "retry_interval")
        config.flags = (_FLEET_READ_ONLY if _flag(self.read_only, "read_only") else 0) | (
            _FLEET_LEASES_ON_BUS if _flag(self.leases_on_bus, "leases_on_bus") else 0)
        index = self.member_index
        if index is not None and (isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= 0xFFFF_FFFF):
            raise InvalidArgumentError(f"member_index must be an index from 0 to 4294967295, got {index!r}")
        config.member_index = -1 if self.member_index is None else self.member_index
        config.lease_redis_url = _text(self.lease_redis, keep, "lease_redis")
        return config

    def __repr__(self) -> str:
        return _repr(self, secrets=("secret_access_key",), urls=("endpoint", "lease_redis"))


def fetch_artifact(reference: str, path: Union[str, "os.PathLike[str]"], *, fleet: Optional[Fleet] = None,
                   expected_sha256: Optional[str] = None) -> None:
    """Fetches the artifact an ``s3://`` reference names (as catalog updates
    and prefetch answers carry once it is published) and writes it durably
    at ``path``, replacing any file there: what a consumer on another host,
    with no forge of its own, does. Its bytes must hash to the sha256 in
    the reference and, when given, to ``expected_sha256`` (the
    announcement's ``checksum``); nothing is written otherwise
    (:class:`CorruptError`). ``fleet`` says how to reach the store
    (endpoint, region, credentials, request timeout; its bucket must be the
    reference's); ``None`` takes them all from the ``AWS_*`` environment
    variables. ``path`` must be a regular file or not exist (a symbolic
    link, device or FIFO there is refused, not replaced). Raises
    :class:`InvalidArgumentError` for a malformed reference or checksum or
    such a path, :class:`NotFoundError` when the bucket lacks
    it, :class:`BudgetExceededError` over 1 GiB and
    :class:`TezzeretIOError` when the store or the file system fails."""
    if fleet is not None and not isinstance(fleet, Fleet):
        raise InvalidArgumentError(f"fleet must be a tezzeret.Fleet, got {fleet!r}")
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidArgumentError(f"path must be a str or os.PathLike, got {path!r}")
    keep: List[Any] = []
    config = None if fleet is None else ctypes.byref(fleet._to_native(keep))
    checksum = None if expected_sha256 is None else c_text(expected_sha256, "expected_sha256")
    check(n.lib.tezzeret_fleet_fetch_artifact(config, c_text(reference, "reference"), checksum,
                                              c_text(os.fspath(path), "path")))
