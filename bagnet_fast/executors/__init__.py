"""Backends that execute an inference plan, and the one registry that chooses between them.

Each backend module registers one :class:`BackendInfo`: its name, the device types and dtypes
it runs, an availability probe that says why not, its rank in the automatic choice per device
type, and whether its kernels compile at run time. :func:`select`, :func:`available`,
:func:`backends` and the run-time fallback read only these records. How to add a backend:
docs/design.md ("Adding a backend").

Built in (preference: cpu on CPUs; triton, cuda on GPUs; torch everywhere as the last resort):
- ``torch``: the pure-PyTorch composition of every unit (any device, any float dtype).
- ``cpu``: oneDNN convolutions with fused post-ops and our C++ ops (float32 on CPU).
- ``triton``: our Triton kernels (CUDA; CPU tensors under TRITON_INTERPRET=1 for testing).
- ``cuda``: cuDNN/cuBLAS(Lt) through ATen with our CUDA kernels between them.

A backend asked for by name that cannot run raises with the reason; the automatic choice takes
the first usable backend and warns, saying why, whenever that is not the preferred one. When
the chosen backend compiles kernels at run time and slower ones are usable, it is wrapped in a
:class:`FallbackBackend`: if its kernels fail to compile or launch on this device it warns and
hands over to the next one.
"""

from __future__ import annotations

import sys
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch

from .base import INTERFACE, Backend, downsample_input, on_device_of

__all__ = [
    "Backend", "BackendInfo", "FallbackBackend", "INTERFACE",
    "register_backend", "backend_info", "backend_names", "available", "select", "backends",
    "is_kernel_failure", "downsample_input", "on_device_of",
]

ANY = "*"


def _always_usable(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    return None


@dataclass(frozen=True)
class BackendInfo:
    """Everything the chooser knows about a backend."""

    name: str
    load: Callable[[], type]  # the Backend subclass; imported when first chosen (triton is heavy)
    summary: "str | Callable[[torch.device], str]"  # what it runs, one line (per device if callable)
    devices: Tuple[str, ...]  # device types it runs on; "*": any
    dtypes: Optional[Tuple[torch.dtype, ...]] = None  # None: any floating dtype
    # Rank in the automatic choice per device type (lower first; "*": any other device type).
    # A device type that is not listed never gets this backend automatically.
    preference: Mapping[str, int] = field(default_factory=dict)
    # (device, dtype) -> None when it can run, else the reason (extension missing, ...).
    probe: Callable[[torch.device, torch.dtype], Optional[str]] = _always_usable
    compiles_at_run_time: bool = False  # kernels may fail on first use: wrap in the fallback
    # dtype -> what to add to the "computes in ..., not dtype" reason (what the machine could do).
    dtype_note: Optional[Callable[[torch.dtype], str]] = None

    def rank(self, device_type: str) -> Optional[int]:
        return self.preference.get(device_type, self.preference.get(ANY))


_REGISTRY: Dict[str, BackendInfo] = {}


def register_backend(info: BackendInfo) -> BackendInfo:
    if info.name in _REGISTRY:
        raise ValueError(f"a backend named {info.name!r} is already registered")
    _REGISTRY[info.name] = info
    return info


def backend_info(name: str) -> BackendInfo:
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; choose from {sorted(_REGISTRY)} or None")
    return _REGISTRY[name]


def backend_names() -> Tuple[str, ...]:
    """The names ``backend=`` accepts."""
    return tuple(_REGISTRY)


def available(name: str, device: "str | torch.device", dtype: torch.dtype) -> Tuple[bool, str]:
    """(usable, reason) for backend ``name`` on ``device`` with ``dtype``."""
    info, device = backend_info(name), torch.device(device)
    if ANY not in info.devices and device.type not in info.devices:
        return False, f"the {name} backend runs on {'/'.join(info.devices)} tensors, not {device.type}"
    if info.dtypes is not None and dtype not in info.dtypes:
        names = "/".join(str(d).replace("torch.", "") for d in info.dtypes)
        note = info.dtype_note(dtype) if info.dtype_note is not None else ""
        return False, f"the {name} backend computes in {names}, not {dtype}" + (f" ({note})" if note else "")
    if not dtype.is_floating_point:
        return False, f"the {name} backend needs a floating dtype, not {dtype}"
    problem = info.probe(device, dtype)
    if problem:
        return False, problem
    return True, info.summary(device) if callable(info.summary) else info.summary


# Backends whose kernels failed to compile or launch in this process, per (backend, device
# type, dtype), with the error: the automatic choice skips them from then on.
_failed: Dict[Tuple[str, str, torch.dtype], str] = {}
_warned: set = set()


def _candidates(device_type: str) -> Sequence[str]:
    ranked = [(info.rank(device_type), name) for name, info in _REGISTRY.items()]
    return [name for rank, name in sorted((r, n) for r, n in ranked if r is not None)]


def select(name: Optional[str], device: "str | torch.device", dtype: torch.dtype) -> Backend:
    """The backend ``name`` (raises if unusable), or the fastest usable one when None."""
    device = torch.device(device)
    if name is not None:
        ok, reason = available(name, device, dtype)
        if not ok:
            raise RuntimeError(f"backend {name!r} is unavailable: {reason}")
        return backend_info(name).load()()
    usable, reasons = [], []
    for candidate in _candidates(device.type):
        ok, reason = available(candidate, device, dtype)
        if ok and (candidate, device.type, dtype) in _failed:
            ok, reason = False, "its kernels failed here earlier: " + _failed[(candidate, device.type, dtype)]
        if ok:
            usable.append(candidate)
        elif not usable:
            reasons.append(f"{candidate}: {reason}")
    if not usable:
        raise RuntimeError(f"no bagnet_fast backend can run on {device.type}/{dtype}: " + "; ".join(reasons))
    if reasons and (device.type, dtype) not in _warned:
        _warned.add((device.type, dtype))
        label = "the pure-PyTorch backend" if usable[0] == "torch" else f"the {usable[0]} backend"
        warnings.warn(f"bagnet_fast: using {label} on {device.type}/{dtype}: " + "; ".join(reasons), stacklevel=3)
    chosen = backend_info(usable[0])
    backend = chosen.load()()
    if chosen.compiles_at_run_time and len(usable) > 1:
        return FallbackBackend(backend, usable[1:], device, dtype)
    return backend


def backends(device: "str | torch.device" = "cpu", dtype: torch.dtype = torch.float32) -> Dict[str, Dict[str, object]]:
    """Which backends can run on ``device``/``dtype`` and why (not), in preference order."""
    device = torch.device(device)
    order = list(_candidates(device.type)) + [n for n in _REGISTRY if n not in _candidates(device.type)]
    report = {}
    for name in order:
        ok, reason = available(name, device, dtype)
        report[name] = {"available": ok, "reason": reason, "automatic": backend_info(name).rank(device.type) is not None}
    return report


def is_kernel_failure(error: BaseException) -> bool:
    """Whether ``error`` says a backend's kernels cannot compile or launch on this device (not
    that the inputs are wrong): triton's own errors (compilation, PTX assembly, out of shared
    memory or registers, autotuning), an MLIR pass failure in triton's compiler, or a CUDA binary
    built for other GPU architectures."""
    triton_errors = sys.modules.get("triton.errors")
    if triton_errors is not None and isinstance(error, getattr(triton_errors, "TritonError", ())):
        return True
    message = str(error)
    return isinstance(error, RuntimeError) and (
        "PassManager::run failed" in message or "no kernel image is available" in message
    )


class FallbackBackend(Backend):
    """Runs the preferred backend and, the first time its kernels fail to compile or launch on
    this device (:func:`is_kernel_failure`), warns with the error and hands that call and every
    later one to the next usable backend. Other errors (bad inputs) propagate unchanged. Every
    method of the backend interface (:data:`INTERFACE`) is forwarded; a backend asked for by
    name never falls back."""

    def __init__(self, backend: Backend, fallbacks: Sequence[str], device: torch.device, dtype: torch.dtype) -> None:
        self.current = backend
        self._fallbacks = list(fallbacks)
        self._where = (device.type, dtype)
        self._plan = None

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.current.name

    def prepare(self, plan) -> None:
        self._plan = weakref.ref(plan)
        self.current.prepare(plan)

    def _call(self, method: str, *args, **kwargs):
        while True:
            try:
                return getattr(self.current, method)(*args, **kwargs)
            except Exception as error:  # noqa: BLE001 - re-raised unless a kernel failure
                if not self._fallbacks or not is_kernel_failure(error):
                    raise
                self._fall_back(error)

    def _fall_back(self, error: BaseException) -> None:
        failed = self.current.name
        text = str(error).strip()
        summary = f"{type(error).__name__}: {text.splitlines()[0][:300] if text else ''}"
        _failed[(failed,) + self._where] = summary
        self.current = backend_info(self._fallbacks.pop(0)).load()()
        plan = self._plan() if self._plan is not None else None
        if plan is not None:
            self.current.prepare(plan)
        warnings.warn(
            f"bagnet_fast: the {failed} backend's kernels failed on {self._where[0]}/{self._where[1]} ({summary}); "
            f"using the {self.current.name} backend from now on (backend={failed!r} raises the error)",
            stacklevel=4,
        )

    def __repr__(self) -> str:
        return f"<bagnet_fast backend {self.name!r}, falling back to {self._fallbacks}>"


def _forwarder(method: str):
    def forward(self, *args, **kwargs):
        return self._call(method, *args, **kwargs)

    forward.__name__ = method
    forward.__doc__ = f"The current backend's ``{method}``."
    return forward


for _method in INTERFACE:
    if _method != "prepare":
        setattr(FallbackBackend, _method, _forwarder(_method))

# The built-in backends: importing a module registers it (adding a backend: one module, one line).
from . import cpu_backend, cuda_backend, torch_backend, triton_backend  # noqa: E402, F401
