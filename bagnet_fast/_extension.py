"""Loads the compiled extension ``bagnet_fast._C`` (operators torch.ops.bagnet_fast.*).

``import bagnet_fast`` works without it; the pure-PyTorch backend is used then and
:func:`bagnet_fast.backends` says why the others are unavailable.
"""

from __future__ import annotations

from typing import Optional

_module = None
_error: Optional[str] = None

try:
    from . import _C as _module  # noqa: F401  (registers the operators)
except ImportError as error:  # not built, or built against another torch
    _error = f"{type(error).__name__}: {error}"


def loaded() -> bool:
    return _module is not None


def module():
    """The extension module (raises if it is not loaded)."""
    if _module is None:
        raise RuntimeError(f"the C++ extension bagnet_fast._C is not loaded ({_error})")
    return _module


def load_error() -> Optional[str]:
    """Why the extension could not be imported (None when it was)."""
    return _error


def with_cuda() -> bool:
    """Whether the extension was compiled with its CUDA sources."""
    return _module is not None and bool(getattr(_module, "with_cuda", 0))
