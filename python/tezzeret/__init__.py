"""Tezzeret, the compilation forge of Esper, for Python hosts.

Opens a forge over a state directory, compiles blueprint descriptors into
guarded, signed TorchScript kernels with the libtorch of the installed
``torch`` package, and runs them on ``torch.Tensor``s without copies::

    import torch, tezzeret

    with tezzeret.Forge("state", strategy="fast", device="cpu") as forge:
        forge.compile_now("BP016")
        kernel = forge.load_kernel("BP016")
        y = kernel.run(torch.randn(8, 32, 16, 16))
"""
from . import _native
from .errors import (
    AbiMismatchError,
    BudgetExceededError,
    CompileFailedError,
    CorruptError,
    InternalError,
    InvalidArgumentError,
    InvalidUtf8Error,
    MalformedError,
    NotFoundError,
    NullArgumentError,
    PoisonedError,
    QuarantinedError,
    StateLockedError,
    TezzeretError,
    TezzeretIOError,
    UnsupportedError,
    check as _check,
)
from .forge import Forge, RunSummary, keygen, validate_descriptor
from .guards import GuardEntry, GuardTable, GuardVerdict, guard_check
from .kernel import Kernel
from .network import Bus, Fleet, fetch_artifact
from .leyline import (
    BlueprintDescriptor,
    KernelArtifactError,
    KernelArtifactReady,
    KernelCatalogUpdate,
    MetricPoint,
    ParameterBounds,
    SystemHealth,
    TelemetryEvent,
    TelemetryPacket,
)

_check(_native.lib.tezzeret_check_abi(_native.ABI_MAJOR, _native.ABI_MINOR))

__version__ = _native.lib.tezzeret_version().decode()

__all__ = [
    "Forge",
    "Bus",
    "Fleet",
    "fetch_artifact",
    "RunSummary",
    "Kernel",
    "GuardTable",
    "GuardVerdict",
    "GuardEntry",
    "guard_check",
    "keygen",
    "validate_descriptor",
    "BlueprintDescriptor",
    "ParameterBounds",
    "KernelArtifactReady",
    "KernelArtifactError",
    "KernelCatalogUpdate",
    "MetricPoint",
    "SystemHealth",
    "TelemetryEvent",
    "TelemetryPacket",
    "TezzeretError",
    "InvalidArgumentError",
    "NullArgumentError",
    "InvalidUtf8Error",
    "MalformedError",
    "AbiMismatchError",
    "StateLockedError",
    "NotFoundError",
    "QuarantinedError",
    "CompileFailedError",
    "TezzeretIOError",
    "CorruptError",
    "PoisonedError",
    "InternalError",
    "BudgetExceededError",
    "UnsupportedError",
]
