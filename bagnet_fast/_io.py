"""Output helpers shared by the CLIs: atomic writes, output folders checked before any work,
clean-up of temporaries that killed runs left, JSON, and optional matplotlib figures."""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path
from typing import Callable, Iterable, List, Optional

__all__ = [
    "write_atomically",
    "write_json",
    "prepare_output_dir",
    "check_new_outputs",
    "clean_stale_temporaries",
    "matplotlib_figure",
    "save_png",
]

_HOST = socket.gethostname()
# name.tmp.<host>.<pid>: the host and process that write it, so that a later run can tell a
# temporary of a killed process from one that another live process (a torchrun rank, maybe on
# another host sharing the folder) is still writing.
_TEMPORARY = re.compile(r"\.tmp\.(?P<host>[^/]+)\.(?P<pid>\d+)$")


def _temporary_name(path: str) -> str:
    return f"{path}.tmp.{_HOST}.{os.getpid()}"


def write_atomically(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp_path)`` then rename: a crash never leaves a half-written result behind (an
    exception or Ctrl-C removes the temporary; a killed process's is removed by
    :func:`clean_stale_temporaries` at the next run)."""
    tmp = _temporary_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, data) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)

    write_atomically(str(path), write)


def prepare_output_dir(path: "str | os.PathLike[str]", option: str = "--out") -> Path:
    """Create the output folder (and parents) and check that it can be written, before any
    work: a one-line ``SystemExit`` naming ``option`` otherwise."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"{option} {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SystemExit(f"{option} {out}: cannot create the folder ({error.strerror or error})")
    if not os.access(out, os.W_OK | os.X_OK):
        raise SystemExit(f"{option} {out}: the folder is not writable")
    return out


def check_new_outputs(paths: Iterable[str], overwrite: bool) -> None:
    """Refuse to replace earlier results unless asked (they may be the only record of a run)."""
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not overwrite:
        raise SystemExit(f"{', '.join(existing)} exist(s): pass --overwrite or choose another --out")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale_temporaries(folder: "str | os.PathLike[str]") -> List[Path]:
    """Remove the temporaries under ``folder`` that a killed process of this host left (its pid
    is gone); others' are left alone. Returns what was removed."""
    removed = []
    for path in Path(folder).rglob("*.tmp.*"):
        match = _TEMPORARY.search(path.name)
        if match and match["host"] == _HOST and not _pid_alive(int(match["pid"])) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def matplotlib_figure(figsize) -> Optional[object]:
    """A matplotlib Figure without pyplot's global state, or None (with a note) if matplotlib is
    missing: plots are optional (pip install matplotlib)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib is not installed: no PNG written (pip install matplotlib)")
        return None
    return Figure(figsize=figsize, layout="constrained")


def save_png(figure, path: str, dpi: int = 120) -> None:
    write_atomically(str(path), lambda tmp: figure.savefig(tmp, format="png", dpi=dpi))
