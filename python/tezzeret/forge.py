"""The forge: a state directory, compiled blueprints, and what the forge
tells its host."""
from __future__ import annotations

import ctypes
import json
import logging
import os
import threading
import uuid
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from . import _native as n
from ._args import c_text
from ._closing import Closing
from .errors import InvalidArgumentError, check
from .guards import GuardTable
from .kernel import Kernel
from .network import Bus, Fleet
from .leyline import (
    BlueprintDescriptor,
    KernelArtifactError,
    KernelArtifactReady,
    KernelCatalogUpdate,
    KernelPrefetchRequest,
    MetricPoint,
    SystemHealth,
    TelemetryPacket,
    Timestamp,
)

log = logging.getLogger("tezzeret")

STRATEGIES = {"emergency": 0, "fast": 1, "standard": 2, "aggressive": 3}
DEVICES = {"auto": 0, "cpu": 1, "cuda": 2}
PRIORITIES = {"low": 1, "normal": 2, "high": 3, "critical": 4}
_LOG_LEVELS = {0: logging.DEBUG, 1: logging.INFO, 2: logging.WARNING, 3: logging.ERROR}

Descriptor = Union[BlueprintDescriptor, bytes]
DescriptorSource = Union[Iterable[Descriptor], Callable[[], Iterable[Descriptor]]]


@dataclass(frozen=True)
class RunSummary:
    """Counts of a run by outcome."""

    total: int
    ok: int
    cached: int
    failed: int
    refused: int


# Open forges, closed in a forked child without touching their threads.
_OPEN: "weakref.WeakSet[Forge]" = weakref.WeakSet()


def _forget_after_fork() -> None:
    for forge in list(_OPEN):
        forge._abandon()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


def _choice(table: Dict[str, int], value: str, what: str) -> int:
    try:
        return table[value]
    except KeyError:
        raise InvalidArgumentError(f"unknown {what} {value!r} (expected one of {', '.join(table)})") from None


def _ms(seconds: Optional[float], what: str) -> int:
    if seconds is None:
        return 0
    if seconds < 0:
        raise InvalidArgumentError(f"{what} must be >= 0 seconds, got {seconds}")
    return int(round(seconds * 1000))


class Forge(Closing):
    """An open forge over a state directory (exclusively locked; a second
    open of the same directory raises :class:`StateLockedError`).

    Use it as a context manager; it is also closed by ``close()``, when it
    is garbage-collected and at interpreter exit, and no callback runs after
    close returns. In a child process after ``fork`` it is unusable and
    left alone (its threads live only in the parent).

    ``descriptors`` is what to compile: Leyline ``BlueprintDescriptor``
    objects or bytes, or a callable returning them (called at open and at
    every refresh); ``None`` means the embedded default catalog. ``bus``
    joins the Oona bus and ``fleet`` a fleet's shared bucket.
    ``signing_key`` (a 32-byte ed25519 seed) signs artifacts and
    ``trusted_keys`` (32-byte public keys) verify them on use; with both,
    the signing key's public half must be among the trusted ones (else
    opening raises :class:`InvalidArgumentError`). The
    callbacks receive decoded messages and may be called on the forge's
    background thread; an exception raised in one is logged (logger
    ``tezzeret``) and never reaches the forge. Its methods may be called
    from several threads; ``close()`` abandons a compile running on another
    thread and waits for it, but must not race with a call another thread
    is about to start (as in C): stop starting calls first.
    """

    def __init__(
        self,
        state_dir: Union[str, "os.PathLike[str]"],
        *,
        strategy: str = "standard",
        device: str = "auto",
        allow_quarantine: bool = False,
        max_concurrency: int = 2,
        batch_size: int = 8,
        budget: Optional[float] = None,
        refresh_interval: float = 0.0,
        telemetry_interval: float = 10.0,
        signing_key: Optional[bytes] = None,
        trusted_keys: Sequence[bytes] = (),
        descriptors: Optional[DescriptorSource] = None,
        bus: Optional[Bus] = None,
        fleet: Optional[Fleet] = None,
        on_catalog_update: Optional[Callable[[KernelCatalogUpdate], None]] = None,
        on_telemetry: Optional[Callable[[TelemetryPacket], None]] = None,
        on_log: Optional[Callable[[int, str], None]] = None,
    ) -> None:
        self._handle = ctypes.POINTER(n.ForgeHandle)()
        self._lock = threading.Lock()
        self._closed = False
        # How deep each thread is in this forge's callbacks (a close from
        # there cannot run: the call running the callback holds the forge).
        self._inside = threading.local()
        config = n.Config()
        check(n.lib.tezzeret_config_init(ctypes.byref(config), ctypes.sizeof(n.Config)))
        self.state_dir = os.fspath(state_dir)
        config.state_dir = c_text(self.state_dir, "state_dir")
        config.strategy = _choice(STRATEGIES, strategy, "strategy")
        config.device = _choice(DEVICES, device, "device")
        config.flags = 1 if allow_quarantine else 0
        if max_concurrency < 1 or batch_size < 1:
            raise InvalidArgumentError("max_concurrency and batch_size must be >= 1")
        config.max_concurrency = max_concurrency
        config.batch_size = batch_size
        config.budget_ms = _ms(budget, "budget")
        config.refresh_interval_ms = _ms(refresh_interval, "refresh_interval")
        config.telemetry_interval_ms = _ms(telemetry_interval, "telemetry_interval")
        keep: List[Any] = []
        if signing_key is not None:
            if not isinstance(signing_key, (bytes, bytearray)) or len(signing_key) != 32:
                got = len(signing_key) if isinstance(signing_key, (bytes, bytearray)) else type(signing_key).__name__
                raise InvalidArgumentError(f"signing_key must be 32 bytes, got {got}")
            seed = (ctypes.c_uint8 * 32).from_buffer_copy(signing_key)
            keep.append(seed)
            config.signing_key = ctypes.cast(seed, n.c_uint8_p)
        if isinstance(trusted_keys, (bytes, bytearray, memoryview, str)):
            raise InvalidArgumentError("trusted_keys must be a sequence of 32-byte keys (a list), not one key")
        if trusted_keys:
            if any(not isinstance(k, (bytes, bytearray)) or len(k) != 32 for k in trusted_keys):
                raise InvalidArgumentError("every trusted key must be 32 bytes")
            joined = b"".join(trusted_keys)
            keys = (ctypes.c_uint8 * len(joined)).from_buffer_copy(joined)
            keep.append(keys)
            config.trusted_keys = ctypes.cast(keys, n.c_uint8_p)
            config.trusted_key_count = len(trusted_keys)
        if bus is not None and not isinstance(bus, Bus):
            raise InvalidArgumentError(f"bus must be a tezzeret.Bus, got {bus!r}")
        if fleet is not None and not isinstance(fleet, Fleet):
            raise InvalidArgumentError(f"fleet must be a tezzeret.Fleet, got {fleet!r}")
        if bus is not None:
            bus_config = bus._to_native(keep)
            keep.append(bus_config)
            config.bus = ctypes.pointer(bus_config)
        if fleet is not None:
            fleet_config = fleet._to_native(keep)
            keep.append(fleet_config)
            config.fleet = ctypes.pointer(fleet_config)
        self._callbacks = self._make_callbacks(descriptors, on_catalog_update, on_telemetry, on_log)
        check(n.lib.tezzeret_forge_open(ctypes.byref(config), ctypes.byref(self._callbacks), ctypes.byref(self._handle)))
        _OPEN.add(self)

    # --- callbacks -------------------------------------------------------

    def _make_callbacks(self, descriptors, on_catalog_update, on_telemetry, on_log) -> n.HostCallbacks:  # noqa: ANN001
        callbacks = n.HostCallbacks()
        check(n.lib.tezzeret_host_callbacks_init(ctypes.byref(callbacks), ctypes.sizeof(n.HostCallbacks)))

        inside = self._inside

        def guarded(name: str, body: Callable[[], Any], default: Any = None) -> Any:
            depth = getattr(inside, "depth", 0)
            inside.depth = depth + 1
            try:
                return body()
            except BaseException:  # noqa: BLE001 - a host callback must never unwind into the library
                log.exception("tezzeret: the %s callback raised; the forge goes on", name)
                return default
            finally:
                inside.depth = depth

        if descriptors is not None:
            source = descriptors

            def enumerate_(_user: int, sink: Any) -> int:
                def push() -> int:
                    items = source() if callable(source) else source
                    for item in items:
                        data = item.encode() if isinstance(item, BlueprintDescriptor) else bytes(item)
                        check(n.lib.tezzeret_descriptor_sink_push(sink, data, len(data)))
                    return 0

                return guarded("enumerate", push, -1)

            callbacks.enumerate = n.ENUMERATE_FN(enumerate_)
        if on_catalog_update is not None:
            callbacks.catalog_update = n.BYTES_FN(
                lambda _u, data, size: guarded(
                    "catalog_update", lambda: on_catalog_update(KernelCatalogUpdate.decode(ctypes.string_at(data, size)))
                )
            )
        if on_telemetry is not None:
            callbacks.telemetry = n.BYTES_FN(
                lambda _u, data, size: guarded("telemetry", lambda: on_telemetry(TelemetryPacket.decode(ctypes.string_at(data, size))))
            )

        def log_(_user: int, level: int, message: bytes) -> None:
            text = (message or b"").decode("utf-8", "replace")
            if on_log is not None:
                guarded("log", lambda: on_log(level, text))
            else:
                log.log(_LOG_LEVELS.get(level, logging.INFO), "%s", text)

        callbacks.log = n.LOG_FN(log_)
        return callbacks

    # --- life cycle --------------------------------------------------------

    def _live(self) -> "ctypes.POINTER(n.ForgeHandle)":
        if self._closed or not self._handle:
            raise InvalidArgumentError(f"the forge on {self.state_dir} is closed")
        return self._handle

    def _in_callback(self) -> bool:
        inside = getattr(self, "_inside", None)
        return inside is not None and getattr(inside, "depth", 0) > 0

    def close(self) -> None:
        """Closes the forge: abandons a running compile (queued jobs stay
        queued), publishes what the bus has queued, releases the state
        directory. Idempotent; no callback runs after it returns. Called
        from inside one of this forge's callbacks it raises
        :class:`InvalidArgumentError` and the forge stays open (the call
        running the callback holds it): close it after that call returns."""
        if self._in_callback():
            raise InvalidArgumentError(
                f"the forge on {self.state_dir} cannot be closed from inside one of its callbacks; close it after the call that runs the callback returns"
            )
        with self._lock:
            if self._closed:
                return
            self._closed = True
            handle, self._handle = self._handle, None
        if handle:
            n.lib.tezzeret_forge_close(handle)
        _OPEN.discard(self)

    def __del__(self) -> None:
        if self._in_callback():
            # Collected inside one of its own callbacks (on the forge's
            # background thread): another thread closes it, once the
            # callback has returned, and keeps it (and the callbacks the
            # library still calls) alive till then.
            threading.Thread(target=self.close, name="tezzeret-close", daemon=True).start()
            return
        super().__del__()

    def _abandon(self) -> None:
        """In a forked child: forget the handle without closing it."""
        self._closed = True
        self._handle = None

    @property
    def closed(self) -> bool:
        """Whether the forge is closed."""
        return self._closed

    # --- work ----------------------------------------------------------------

    def run(self) -> RunSummary:
        """Compiles everything queued (what is cached is reused)."""
        summary = n.RunSummary()
        summary.struct_size = ctypes.sizeof(n.RunSummary)
        check(n.lib.tezzeret_forge_run(self._live(), ctypes.byref(summary)))
        return RunSummary(summary.total, summary.ok, summary.cached, summary.failed, summary.refused)

    def submit(self, blueprint_id: str, priority: str = "normal") -> int:
        """Durably queues a blueprint's job (a queued one gets the new
        priority); returns its sequence number."""
        seq = ctypes.c_uint64()
        check(n.lib.tezzeret_forge_submit(self._live(), c_text(blueprint_id, "blueprint_id"), _choice(PRIORITIES, priority, "priority"), ctypes.byref(seq)))
        return seq.value

    def drain(self) -> Tuple[int, int]:
        """Runs the queue; returns (completed, failed)."""
        completed, failed = ctypes.c_uint32(), ctypes.c_uint32()
        check(n.lib.tezzeret_forge_drain(self._live(), ctypes.byref(completed), ctypes.byref(failed)))
        return completed.value, failed.value

    def compile_now(self, blueprint_id: str, budget: Optional[float] = None) -> None:
        """Compiles a blueprint at once, ahead of the queue (cached: at once
        done); ``budget`` in seconds abandons it if it runs longer."""
        if budget is None:
            check(n.lib.tezzeret_forge_compile_now(self._live(), c_text(blueprint_id, "blueprint_id")))
        else:
            check(n.lib.tezzeret_forge_compile_now_within(self._live(), c_text(blueprint_id, "blueprint_id"), max(_ms(budget, "budget"), 1)))

    def refresh(self) -> Tuple[int, int]:
        """Enumerates the descriptors again; returns (queued, removed)."""
        queued, removed = ctypes.c_uint32(), ctypes.c_uint32()
        check(n.lib.tezzeret_forge_refresh(self._live(), ctypes.byref(queued), ctypes.byref(removed)))
        return queued.value, removed.value

    # --- what it knows ---------------------------------------------------------

    def _buffer(self, function: Callable[..., Any], *args: Any) -> bytes:
        out = ctypes.POINTER(n.Buffer)()
        check(function(self._live(), *args, ctypes.byref(out)))
        return n.take_buffer(out)

    def catalog(self) -> List[Dict[str, Any]]:
        """The stored catalog: one dict per current artifact (blueprint_id,
        artifact_path, checksum, guard_digest, strategy, timings, …)."""
        return json.loads(self._buffer(n.lib.tezzeret_forge_catalog_json))["artifacts"]

    def prefetch(
        self, blueprint_id: str, request_id: Optional[str] = None, training_run_id: str = ""
    ) -> Union[KernelArtifactReady, KernelArtifactError]:
        """Whether a blueprint's kernel is ready: :class:`KernelArtifactReady`
        (path, checksum, guard digest, pre-warm latencies) or
        :class:`KernelArtifactError` with its reason."""
        request = KernelPrefetchRequest(request_id or uuid.uuid4().hex, blueprint_id, training_run_id, Timestamp.now())
        data = request.encode()
        kind = ctypes.c_uint32()
        answer = self._buffer(n.lib.tezzeret_forge_prefetch, data, len(data), ctypes.byref(kind))
        return KernelArtifactReady.decode(answer) if kind.value == 7 else KernelArtifactError.decode(answer)

    def health(self) -> SystemHealth:
        """A health snapshot (HEALTHY, DEGRADED in conservative mode, …)."""
        return SystemHealth.decode(self._buffer(n.lib.tezzeret_forge_health))

    def metrics(self) -> List[MetricPoint]:
        """Every metric now (``tezzeret.jobs.*``, ``tezzeret.cache.*``, …)."""
        return TelemetryPacket.decode(self._buffer(n.lib.tezzeret_forge_metrics)).metrics

    def prometheus(self) -> str:
        """The metrics in Prometheus text exposition format."""
        return self._buffer(n.lib.tezzeret_forge_metrics_prometheus).decode()

    def report_resources(self, gpu_utilisation_percent: Optional[float] = None, rss_bytes: Optional[int] = None) -> None:
        """Feeds the breakers readings of the host's own (both None: the
        forge reads NVML and /proc itself)."""
        if gpu_utilisation_percent is None and rss_bytes is None:
            check(n.lib.tezzeret_forge_report_resources(self._live(), None))
            return
        reading = n.ResourceReading(ctypes.sizeof(n.ResourceReading), -1.0 if gpu_utilisation_percent is None else gpu_utilisation_percent, rss_bytes or 0)
        check(n.lib.tezzeret_forge_report_resources(self._live(), ctypes.byref(reading)))

    def guard_table(self) -> GuardTable:
        """The forge's guard table, read-only (it may outlive the forge)."""
        handle = ctypes.POINTER(n.GuardTableHandle)()
        check(n.lib.tezzeret_forge_guard_table(self._live(), ctypes.byref(handle)))
        return GuardTable(_handle=handle)

    def load_kernel(self, blueprint_id: str) -> Kernel:
        """Loads a blueprint's current artifact for running on tensors."""
        handle = ctypes.POINTER(n.KernelHandle)()
        check(n.lib.tezzeret_forge_load_kernel(self._live(), c_text(blueprint_id, "blueprint_id"), ctypes.byref(handle)))
        return Kernel(handle, blueprint_id)


def keygen() -> Tuple[bytes, bytes]:
    """A new ed25519 key pair: (32-byte secret for ``signing_key``, 32-byte
    public key for ``trusted_keys``)."""
    secret, public = (ctypes.c_uint8 * 32)(), (ctypes.c_uint8 * 32)()
    check(n.lib.tezzeret_keygen(secret, public))
    return bytes(secret), bytes(public)


def validate_descriptor(descriptor: Descriptor) -> None:
    """Raises :class:`MalformedError` or :class:`InvalidArgumentError`
    naming the problem if the forge would refuse the descriptor."""
    data = descriptor.encode() if isinstance(descriptor, BlueprintDescriptor) else bytes(descriptor)
    check(n.lib.tezzeret_descriptor_validate(data, len(data)))

