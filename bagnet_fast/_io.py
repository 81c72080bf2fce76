"""File output shared by the CLIs: results are written atomically."""

from __future__ import annotations

import os
from typing import Callable

__all__ = ["write_atomically"]


def write_atomically(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp_path)`` then rename: a crash never leaves a half-written result behind."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
