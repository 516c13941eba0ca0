"""The Leyline (``esper.leyline.v1``) messages the forge exchanges, as
Python dataclasses, with a small protobuf wire codec (no dependency)."""
from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

from .errors import InvalidArgumentError

# Wire types.
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


def _fields(data: bytes) -> Iterator[Tuple[int, int, object]]:
    """Yields (field number, wire type, value) of a message's bytes."""
    view, pos, end = memoryview(data), 0, len(data)

    def varint() -> int:
        nonlocal pos
        shift = result = 0
        while True:
            if pos >= end:
                raise ValueError("truncated varint")
            byte = view[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result
            shift += 7
            if shift > 63:
                raise ValueError("varint too long")

    while pos < end:
        key = varint()
        number, kind = key >> 3, key & 7
        if kind == _VARINT:
            yield number, kind, varint()
        elif kind == _I64:
            if pos + 8 > end:
                raise ValueError("truncated fixed64")
            yield number, kind, bytes(view[pos : pos + 8])
            pos += 8
        elif kind == _LEN:
            size = varint()
            if pos + size > end:
                raise ValueError("truncated length-delimited field")
            yield number, kind, bytes(view[pos : pos + size])
            pos += size
        elif kind == _I32:
            if pos + 4 > end:
                raise ValueError("truncated fixed32")
            yield number, kind, bytes(view[pos : pos + 4])
            pos += 4
        else:
            raise ValueError(f"unknown wire type {kind}")


def _text(value: object) -> str:
    return bytes(value).decode("utf-8")  # type: ignore[arg-type]


def _double(value: object) -> float:
    return struct.unpack("<d", value)[0]  # type: ignore[arg-type]


def _float(value: object) -> float:
    return struct.unpack("<f", value)[0]  # type: ignore[arg-type]


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _string_map(entries: List[bytes]) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for entry in entries:
        key = value = ""
        for number, _, v in _fields(entry):
            if number == 1:
                key = _text(v)
            elif number == 2:
                value = _text(v)
        out[key] = value
    return out


def _put_varint(out: bytearray, value: int) -> None:
    value &= (1 << 64) - 1
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return


def _put_key(out: bytearray, number: int, kind: int) -> None:
    _put_varint(out, (number << 3) | kind)


def _put_bytes(out: bytearray, number: int, value: bytes) -> None:
    if value:
        _put_key(out, number, _LEN)
        _put_varint(out, len(value))
        out += value


def _put_text(out: bytearray, number: int, value: str) -> None:
    _put_bytes(out, number, value.encode("utf-8"))


@dataclass(frozen=True)
class Timestamp:
    """``google.protobuf.Timestamp``."""

    seconds: int = 0
    nanos: int = 0

    @staticmethod
    def now() -> "Timestamp":
        ns = time.time_ns()
        return Timestamp(ns // 1_000_000_000, ns % 1_000_000_000)

    def encode(self) -> bytes:
        out = bytearray()
        if self.seconds:
            _put_key(out, 1, _VARINT)
            _put_varint(out, self.seconds)
        if self.nanos:
            _put_key(out, 2, _VARINT)
            _put_varint(out, self.nanos)
        return bytes(out)

    @staticmethod
    def decode(data: bytes) -> "Timestamp":
        seconds = nanos = 0
        for number, _, value in _fields(data):
            if number == 1:
                seconds = _signed(value)  # type: ignore[arg-type]
            elif number == 2:
                nanos = _signed(value)  # type: ignore[arg-type]
        return Timestamp(seconds, nanos)


@dataclass(frozen=True)
class ParameterBounds:
    """``BlueprintParameterBounds``: inclusive bounds of a parameter."""

    min_value: float
    max_value: float

    def encode(self) -> bytes:
        out = bytearray()
        for number, value in ((1, self.min_value), (2, self.max_value)):
            if value:
                _put_key(out, number, _I64)
                out += struct.pack("<d", value)
        return bytes(out)


# BlueprintTier names and numbers.
TIERS = {"UNSPECIFIED": 0, "SAFE": 1, "EXPERIMENTAL": 2, "HIGH_RISK": 3}


@dataclass(frozen=True)
class BlueprintDescriptor:
    """``BlueprintDescriptor``: what a host asks the forge to compile."""

    blueprint_id: str
    name: str
    tier: str = "SAFE"
    allowed_parameters: Dict[str, ParameterBounds] = field(default_factory=dict)
    risk: float = 0.0
    stage: int = 0
    quarantine_only: bool = False
    approval_required: bool = False
    description: str = ""

    def encode(self) -> bytes:
        if self.tier not in TIERS:
            raise InvalidArgumentError(f"unknown tier {self.tier!r} (expected one of {sorted(TIERS)})")
        out = bytearray()
        _put_text(out, 1, self.blueprint_id)
        _put_text(out, 2, self.name)
        if TIERS[self.tier]:
            _put_key(out, 3, _VARINT)
            _put_varint(out, TIERS[self.tier])
        for name, bounds in sorted(self.allowed_parameters.items()):
            entry = bytearray()
            _put_text(entry, 1, name)
            entry_value = bounds.encode()
            _put_key(entry, 2, _LEN)
            _put_varint(entry, len(entry_value))
            entry += entry_value
            _put_bytes(out, 4, bytes(entry))
        if self.risk:
            _put_key(out, 5, _I32)
            out += struct.pack("<f", self.risk)
        if self.stage:
            _put_key(out, 6, _VARINT)
            _put_varint(out, self.stage)
        for number, flag in ((7, self.quarantine_only), (8, self.approval_required)):
            if flag:
                _put_key(out, number, _VARINT)
                _put_varint(out, 1)
        _put_text(out, 9, self.description)
        return bytes(out)


@dataclass(frozen=True)
class KernelPrefetchRequest:
    """``KernelPrefetchRequest``."""

    request_id: str
    blueprint_id: str
    training_run_id: str = ""
    issued_at: Optional[Timestamp] = None

    def encode(self) -> bytes:
        out = bytearray()
        _put_text(out, 1, self.request_id)
        _put_text(out, 2, self.blueprint_id)
        _put_text(out, 3, self.training_run_id)
        if self.issued_at is not None:
            stamp = self.issued_at.encode()
            _put_key(out, 4, _LEN)
            _put_varint(out, len(stamp))
            out += stamp
        return bytes(out)


@dataclass(frozen=True)
class KernelArtifactReady:
    """``KernelArtifactReady``: the kernel is ready."""

    request_id: str = ""
    blueprint_id: str = ""
    artifact_ref: str = ""
    checksum: str = ""
    guard_digest: str = ""
    prewarm_p50_ms: float = 0.0
    prewarm_p95_ms: float = 0.0

    @staticmethod
    def decode(data: bytes) -> "KernelArtifactReady":
        values: Dict[str, object] = {}
        names = {1: "request_id", 2: "blueprint_id", 3: "artifact_ref", 4: "checksum", 5: "guard_digest"}
        for number, _, value in _fields(data):
            if number in names:
                values[names[number]] = _text(value)
            elif number == 6:
                values["prewarm_p50_ms"] = _float(value)
            elif number == 7:
                values["prewarm_p95_ms"] = _float(value)
        return KernelArtifactReady(**values)  # type: ignore[arg-type]


@dataclass(frozen=True)
class KernelArtifactError:
    """``KernelArtifactError``: it is not (``reason``: ``missing_artifact``,
    ``artifact_not_found``, ``checksum_mismatch``, ``signature_invalid``)."""

    request_id: str = ""
    blueprint_id: str = ""
    reason: str = ""

    @staticmethod
    def decode(data: bytes) -> "KernelArtifactError":
        values = {1: "", 2: "", 3: ""}
        for number, _, value in _fields(data):
            if number in values:
                values[number] = _text(value)
        return KernelArtifactError(values[1], values[2], values[3])


@dataclass(frozen=True)
class KernelCatalogUpdate:
    """``KernelCatalogUpdate``: an artifact became current and durable."""

    blueprint_id: str = ""
    artifact_ref: str = ""
    checksum: str = ""
    guard_digest: str = ""
    compile_ms: float = 0.0
    prewarm_ms: float = 0.0

    @staticmethod
    def decode(data: bytes) -> "KernelCatalogUpdate":
        values: Dict[str, object] = {}
        names = {1: "blueprint_id", 2: "artifact_ref", 3: "checksum", 4: "guard_digest"}
        for number, _, value in _fields(data):
            if number in names:
                values[names[number]] = _text(value)
            elif number == 5:
                values["compile_ms"] = _float(value)
            elif number == 6:
                values["prewarm_ms"] = _float(value)
        return KernelCatalogUpdate(**values)  # type: ignore[arg-type]


@dataclass(frozen=True)
class MetricPoint:
    """``MetricPoint``: one sample."""

    name: str = ""
    value: float = 0.0
    unit: str = ""
    attributes: Dict[str, str] = field(default_factory=dict)

    @staticmethod
    def decode(data: bytes) -> "MetricPoint":
        name = unit = ""
        value = 0.0
        attributes: List[bytes] = []
        for number, _, v in _fields(data):
            if number == 1:
                name = _text(v)
            elif number == 2:
                value = _double(v)
            elif number == 3:
                unit = _text(v)
            elif number == 4:
                attributes.append(v)  # type: ignore[arg-type]
        return MetricPoint(name, value, unit, _string_map(attributes))


LEVELS = {0: "UNSPECIFIED", 1: "INFO", 2: "WARNING", 3: "ERROR", 4: "CRITICAL"}
HEALTH = {0: "UNSPECIFIED", 1: "HEALTHY", 2: "DEGRADED", 3: "UNHEALTHY", 4: "CRITICAL"}


@dataclass(frozen=True)
class TelemetryEvent:
    """``TelemetryEvent``, e.g. ``tezzeret.compile_failed`` with ``reason``."""

    event_id: str = ""
    description: str = ""
    level: str = "UNSPECIFIED"
    attributes: Dict[str, str] = field(default_factory=dict)

    @staticmethod
    def decode(data: bytes) -> "TelemetryEvent":
        event_id = description = ""
        level = 0
        attributes: List[bytes] = []
        for number, _, v in _fields(data):
            if number == 1:
                event_id = _text(v)
            elif number == 2:
                description = _text(v)
            elif number == 3:
                level = v  # type: ignore[assignment]
            elif number == 4:
                attributes.append(v)  # type: ignore[arg-type]
        return TelemetryEvent(event_id, description, LEVELS.get(level, str(level)), _string_map(attributes))


@dataclass(frozen=True)
class SystemHealth:
    """``SystemHealth``: ``status`` (HEALTHY, DEGRADED, UNHEALTHY), a
    summary and named indicators."""

    status: str = "UNSPECIFIED"
    summary: str = ""
    indicators: Dict[str, str] = field(default_factory=dict)

    @staticmethod
    def decode(data: bytes) -> "SystemHealth":
        status = 0
        summary = ""
        indicators: List[bytes] = []
        for number, _, v in _fields(data):
            if number == 1:
                status = v  # type: ignore[assignment]
            elif number == 2:
                summary = _text(v)
            elif number == 3:
                indicators.append(v)  # type: ignore[arg-type]
        return SystemHealth(HEALTH.get(status, str(status)), summary, _string_map(indicators))


@dataclass(frozen=True)
class TelemetryPacket:
    """``TelemetryPacket``: metrics, events and a health snapshot."""

    packet_id: str = ""
    timestamp: Optional[Timestamp] = None
    source_subsystem: str = ""
    level: str = "UNSPECIFIED"
    metrics: List[MetricPoint] = field(default_factory=list)
    events: List[TelemetryEvent] = field(default_factory=list)
    system_health: Optional[SystemHealth] = None

    @staticmethod
    def decode(data: bytes) -> "TelemetryPacket":
        values: Dict[str, object] = {"metrics": [], "events": []}
        for number, _, v in _fields(data):
            if number == 1:
                values["packet_id"] = _text(v)
            elif number == 2:
                values["timestamp"] = Timestamp.decode(v)  # type: ignore[arg-type]
            elif number == 3:
                values["source_subsystem"] = _text(v)
            elif number == 4:
                values["level"] = LEVELS.get(v, str(v))  # type: ignore[arg-type]
            elif number == 10:
                values["metrics"].append(MetricPoint.decode(v))  # type: ignore[union-attr, arg-type]
            elif number == 20:
                values["events"].append(TelemetryEvent.decode(v))  # type: ignore[union-attr, arg-type]
            elif number == 40:
                values["system_health"] = SystemHealth.decode(v)  # type: ignore[arg-type]
        return TelemetryPacket(**values)  # type: ignore[arg-type]
