"""Loading BagNet checkpoints: the authors' ImageNet weights and local files.

Reference checkpoints are plain state_dicts. Downstream ones are often saved from DataParallel
(``module.`` prefix) or wrapped in a dict (``{"state_dict": ...}``, ``{"model_state_dict": ...}``);
:func:`unwrap_state_dict` accepts all of these.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import urllib.parse
import warnings
from typing import Any, Dict, Mapping

import torch

__all__ = ["PRETRAINED_URLS", "load_pretrained", "load_checkpoint", "pretrained_path", "unwrap_state_dict"]

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
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")
_UNSUPPORTED_GLOBAL = re.compile(r"[Uu]nsupported (?:global: )?(GLOBAL [\w.]+)")
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,})\.[^-]*$")


def pretrained_path(name: str) -> str:
    """Where the authors' weights for ``name`` live in the torch.hub cache
    (``<TORCH_HOME>/hub/checkpoints/<file>``), whether or not the file exists yet."""
    if name not in PRETRAINED_URLS:
        raise ValueError(f"no pretrained weights for {name!r}; known: {sorted(PRETRAINED_URLS)}")
    url = PRETRAINED_URLS[name]
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urllib.parse.urlparse(url).path))


def expected_hash_prefix(name: str) -> str:
    """The sha256 prefix the published file name carries (torch.hub's convention)."""
    match = _HASH_IN_NAME.search(os.path.basename(PRETRAINED_URLS[name]))
    assert match is not None, PRETRAINED_URLS[name]
    return match.group(1)


def load_pretrained(name: str, progress: bool = True) -> Dict[str, torch.Tensor]:
    """The authors' ImageNet state_dict for ``name``.

    Downloaded once into the torch.hub cache. On *every* load (not only after a download) the
    file's sha256 is checked against the prefix in its published name, and it is read with
    ``weights_only=True``: a file planted in the cache can neither run code nor pass for the
    weights.
    """
    path = pretrained_path(name)
    url, prefix = PRETRAINED_URLS[name], expected_hash_prefix(name)
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            # Verifies the hash while downloading and only then moves the file into place.
            torch.hub.download_url_to_file(url, path, hash_prefix=prefix, progress=progress)
        except Exception as error:  # network errors come in many types; all need the same advice
            raise RuntimeError(
                f"could not download the pretrained {name} weights from {url} "
                f"({type(error).__name__}: {error}). Without internet access, download that file "
                f"elsewhere and either put it at {path} or pass weights=PATH to the builder."
            ) from error
    digest = file_sha256(path)
    if not digest.startswith(prefix):
        raise RuntimeError(
            f"{path} is not the published {name} checkpoint: its sha256 is {digest}, the file "
            f"name {os.path.basename(path)} promises {prefix}... Delete it (a partial download or "
            f"a different file) and load again, or pass weights=PATH for your own file."
        )
    return load_checkpoint(path)


def file_sha256(path: str) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_checkpoint(path: "str | os.PathLike[str]") -> Dict[str, torch.Tensor]:
    """A state_dict from a local checkpoint file (plain, DataParallel-prefixed or wrapped)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = _UNSUPPORTED_GLOBAL.search(str(error))
        if found is None:
            raise ValueError(f"could not read {path} as a PyTorch checkpoint (not a valid pickle)") from error
        # torch's own message suggests weights_only=False, which would run the file's code:
        # bagnet_fast never does that, so say what works instead.
        raise ValueError(
            f"{path} is not a checkpoint of tensors: it pickles Python objects ({found.group(1)}; "
            f"for example a whole model saved with torch.save(model)), and bagnet_fast only reads "
            f"checkpoints with weights_only=True, which never runs code from the file. Where the "
            f"file was made, save torch.save(model.state_dict(), path) instead."
        ) from error
    except Exception as error:
        raise ValueError(
            f"could not read {path} as a PyTorch checkpoint ({type(error).__name__}: {error})"
        ) from error
    return unwrap_state_dict(state, source=path)


def unwrap_state_dict(state: Any, source: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """The plain state_dict inside ``state``: unwraps {"state_dict": ...}-style dicts and strips
    a ``module.`` prefix (DataParallel / DistributedDataParallel). Entries that are not tensors
    (an epoch counter saved inside the state_dict, say) are dropped with a warning."""
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    while isinstance(state, Mapping) and not _looks_like_state_dict(state):
        inner = next((state[k] for k in _WRAPPER_KEYS if k in state), None)
        if inner is None:
            raise ValueError(
                f"{source} holds no state_dict: top-level keys {sorted(map(str, state))[:8]}, "
                f"none of them a tensor or one of {_WRAPPER_KEYS}"
            )
        state = inner.state_dict() if isinstance(inner, torch.nn.Module) else inner
    if not isinstance(state, Mapping):
        raise ValueError(f"{source} holds a {type(state).__name__}, not a state_dict")
    extra = {str(k): type(v).__name__ for k, v in state.items() if not isinstance(v, torch.Tensor)}
    if extra:
        warnings.warn(f"{source}: ignoring state_dict entries that are not tensors: {extra}", stacklevel=2)
        state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    prefix = "module."
    if state and all(key.startswith(prefix) for key in state):
        state = {key[len(prefix):]: value for key, value in state.items()}
    return dict(state)


def _looks_like_state_dict(state: Mapping) -> bool:
    """Tensors at the top level, and no wrapper key holding the real state_dict."""
    if not any(isinstance(v, torch.Tensor) for v in state.values()):
        return False
    return not any(isinstance(state.get(k), (Mapping, torch.nn.Module)) for k in _WRAPPER_KEYS)
