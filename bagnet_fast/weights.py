"""Loading BagNet checkpoints: the authors' ImageNet weights and local files.

Reference checkpoints are plain state_dicts. Downstream ones are often saved from DataParallel
(``module.`` prefix) or wrapped in a dict (``{"state_dict": ...}``, ``{"model_state_dict": ...}``);
:func:`unwrap_state_dict` accepts all of these.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping

import torch

__all__ = ["PRETRAINED_URLS", "load_pretrained", "load_checkpoint", "unwrap_state_dict"]

_WEIGHTS_FOLDER = (
    "https://bitbucket.org/wielandbrendel/bag-of-feature-pretrained-models/raw/"
    "249e8fa82c0913623a807d9d35eeab9da7dcc2a8/"
)
# File names carry the first 8 hex digits of their sha256 (torch.hub's check_hash convention).
PRETRAINED_URLS = {
    "bagnet9": _WEIGHTS_FOLDER + "bagnet8-34f4ccd2.pth.tar",
    "bagnet17": _WEIGHTS_FOLDER + "bagnet16-105524de.pth.tar",
    "bagnet33": _WEIGHTS_FOLDER + "bagnet32-2ddd53ed.pth.tar",
}
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")


def load_pretrained(name: str, progress: bool = True) -> Dict[str, torch.Tensor]:
    """The authors' ImageNet state_dict for ``name``, downloaded once into the torch.hub cache
    with its sha256 prefix checked."""
    if name not in PRETRAINED_URLS:
        raise ValueError(f"no pretrained weights for {name!r}; known: {sorted(PRETRAINED_URLS)}")
    url = PRETRAINED_URLS[name]
    try:
        state = torch.hub.load_state_dict_from_url(
            url, map_location="cpu", progress=progress, check_hash=True
        )
    except Exception as error:  # network errors come in many types; all need the same advice
        cache = os.path.join(torch.hub.get_dir(), "checkpoints")
        raise RuntimeError(
            f"could not load the pretrained {name} weights from {url} ({error}). "
            f"Without internet access, download that file elsewhere and either put it in {cache} "
            f"or pass weights=PATH to the builder."
        ) from error
    return unwrap_state_dict(state)


def load_checkpoint(path: "str | os.PathLike[str]") -> Dict[str, torch.Tensor]:
    """A state_dict from a local checkpoint file (plain, DataParallel-prefixed or wrapped)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(
            f"could not read {path} as a PyTorch checkpoint ({type(error).__name__}: {error})"
        ) from error
    return unwrap_state_dict(state, source=path)


def unwrap_state_dict(state: Any, source: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """The plain state_dict inside ``state``: unwraps {"state_dict": ...}-style dicts and strips
    a ``module.`` prefix (DataParallel / DistributedDataParallel)."""
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    while isinstance(state, Mapping) and not _looks_like_state_dict(state):
        inner = next((state[k] for k in _WRAPPER_KEYS if k in state), None)
        if inner is None:
            raise ValueError(
                f"{source} holds no state_dict: top-level keys {sorted(map(str, state))[:8]}, "
                f"expected tensors or one of {_WRAPPER_KEYS}"
            )
        state = inner.state_dict() if isinstance(inner, torch.nn.Module) else inner
    if not isinstance(state, Mapping):
        raise ValueError(f"{source} holds a {type(state).__name__}, not a state_dict")
    prefix = "module."
    if state and all(key.startswith(prefix) for key in state):
        state = {key[len(prefix):]: value for key, value in state.items()}
    return dict(state)


def _looks_like_state_dict(state: Mapping) -> bool:
    return len(state) > 0 and all(isinstance(v, torch.Tensor) for v in state.values())
