"""How many distinct Triton compiles, autotuning keys and benchmarked configurations the fast
BagNets need on a GPU, counted on the CPU without compiling anything.

    python benchmarks/gpu_compile_count.py [--models bagnet33] [--dtypes bf16] [--batches 1,32,256]

The plan runs on ``meta`` tensors (no memory, no compute, any batch is free) with the Triton
backend, its launchers stubbed to record each launch instead of running it: the kernel, the
candidate tiles, the autotuner's key (its named arguments plus the dtypes of the tensor
arguments, as ``triton.autotune`` builds it) and the JIT's specialization of every run-time
argument, computed by triton's own ``native_specialize_impl`` (an int equal to 1 becomes a
constant, a multiple of 16 gets a divisibility hint, except the arguments a kernel lists in
``do_not_specialize``; pointers by dtype and 16-byte alignment). A compile is one (kernel,
specialization, constexprs, tile); the first call per process pays for each distinct one
(0.5-1.5 s each on the GPU machine, GPU_REVIEW.md) and the autotuner benchmarks every candidate
of every new key. tests/test_compile_budget.py holds these counts to a budget.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import bagnet_fast  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Launch:
    """One kernel launch of a forward, as the JIT and the autotuner see it."""

    kernel: str
    tiles: Tuple[object, ...]  # the candidate Tiles (one None for kernels with fixed tiles)
    tuning_key: Tuple[object, ...]  # the autotuner's cache key (empty: not autotuned)
    specialization: Tuple[Tuple[str, object], ...]  # (argument, JIT specialization) per run-time argument
    constexprs: Tuple[Tuple[str, object], ...]  # compile-time arguments besides the tile


def _unspecialized(kernel) -> Sequence:
    """The kernel's ``do_not_specialize`` list (a JITFunction attribute; the interpreter's
    InterpretedFunction keeps it in its keyword arguments)."""
    names = getattr(kernel, "do_not_specialize", None)
    if names is None:
        names = getattr(kernel, "kwargs", {}).get("do_not_specialize") or ()
    return tuple(names)


def specialize(value, specialized: bool) -> object:
    """What the JIT keys a compile on for one run-time argument."""
    if isinstance(value, torch.Tensor):
        # Meta tensors have no address: a view's storage offset gives its 16-byte alignment
        # (fresh allocations are aligned).
        aligned = (value.storage_offset() * value.element_size()) % 16 == 0
        return (str(value.dtype), "D" if aligned else "")
    if isinstance(value, float):
        return ("fp32", None)
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    return tuple(native_specialize_impl(BaseBackend, value, False, specialized, True))


def _record(kernel, tiles, key_names, args, constexprs) -> Launch:
    names = list(kernel.arg_names)
    positional = dict(zip(names, args))
    unspecialized = set(_unspecialized(kernel))
    spec = tuple(
        (name, specialize(value, name not in unspecialized and names.index(name) not in unspecialized))
        for name, value in positional.items()
    )
    everything = {**positional, **constexprs}
    key = tuple(everything[name] for name in key_names if name in everything)
    key += tuple(str(v.dtype) for v in positional.values() if isinstance(v, torch.Tensor))
    return Launch(kernel.__name__, tuple(tiles), key if len(tiles) > 1 else (), spec,
                  tuple(sorted((k, str(v)) for k, v in constexprs.items())))


@contextlib.contextmanager
def recording(autotune: bool = True) -> Iterator[List[Launch]]:
    """Inside the block, Triton launches are recorded, not run, and the GPU's candidate tiles
    are used even under TRITON_INTERPRET=1. ``autotune`` sets BAGNET_FAST_AUTOTUNE."""
    from bagnet_fast.ops import triton_ops, triton_tuning

    launches: List[Launch] = []

    def launch(kernel, tiles, key, grid, *args, reset=(), **constexprs):
        launches.append(_record(kernel, tiles, key, args, constexprs))

    def launch_fixed(kernel, grid, *args, **constexprs):
        launches.append(_record(kernel, (None,), (), args, constexprs))

    saved = (triton_ops._launch, triton_ops._launch_fixed, triton_tuning.interpreting,
             os.environ.get("BAGNET_FAST_AUTOTUNE"))
    triton_ops._launch, triton_ops._launch_fixed = launch, launch_fixed
    triton_tuning.interpreting = lambda: False
    os.environ["BAGNET_FAST_AUTOTUNE"] = "1" if autotune else "0"
    try:
        yield launches
    finally:
        triton_ops._launch, triton_ops._launch_fixed, triton_tuning.interpreting = saved[:3]
        if saved[3] is None:
            os.environ.pop("BAGNET_FAST_AUTOTUNE", None)
        else:
            os.environ["BAGNET_FAST_AUTOTUNE"] = saved[3]


@functools.lru_cache(maxsize=None)
def meta_plan(model_name: str, dtype: torch.dtype):
    """The plan of a randomly initialised model with the Triton backend, its weights on ``meta``
    in ``dtype`` (cached: a forward never changes it). Built in float32 on the CPU, the torch
    backend's plan (the Triton probe wants a GPU; a bfloat16 build takes 10 s here, float32 2 s)."""
    from bagnet_fast.executors.triton_backend import TritonBackend

    plan = bagnet_fast.build_plan(getattr(bagnet_fast, model_name)().eval(), "torch")

    def meta(t):
        return torch.empty_like(t, device="meta", dtype=dtype)

    for conv in plan.convolutions():
        conv.weight, conv.bias = meta(conv.weight), meta(conv.bias)
    plan.head.weight, plan.head.bias = meta(plan.head.weight), meta(plan.head.bias)
    plan.backend = TritonBackend()
    plan.backend.prepare(plan)
    return plan


def forward_launches(plan, batch: int, image: int = 224, autotune: bool = True, avg_pool: bool = True) -> List[Launch]:
    """The launches of one forward at ``batch`` (images image × image). ``_logits`` is the plan's
    forward without its precision context (autocast has no meta device)."""
    x = torch.empty(batch, 3, image, image, device="meta", dtype=plan.dtype)
    with recording(autotune) as launches, torch.inference_mode():
        plan._logits(x, None) if avg_pool else plan.walk(x)
    return launches


def compiles(launches: Iterable[Launch]) -> set:
    """The distinct compiles: every candidate of every launch (the autotuner compiles each)."""
    return {(l.kernel, l.specialization, l.constexprs, tile) for l in launches for tile in l.tiles}


def tuner_keys(launches: Iterable[Launch]) -> Dict[tuple, int]:
    """{(kernel, candidates, key): number of candidates} of the autotuned launches."""
    return {(l.kernel, l.tiles, l.tuning_key): len(l.tiles) for l in launches if l.tuning_key}


def count(models: Sequence[str], dtypes: Sequence[str], batches: Sequence[int], image: int = 224,
          autotune: bool = True) -> List[dict]:
    """One row per (model, dtype, batch) in that order, each with the compiles it adds to the
    ones before it (a process that runs them in this order), and a last row with the totals."""
    rows, seen_compiles, seen_keys = [], set(), set()
    for model in models:
        for dtype in dtypes:
            plan = meta_plan(model, DTYPES[dtype])
            for batch in batches:
                launches = forward_launches(plan, batch, image, autotune)
                mine, keys = compiles(launches), tuner_keys(launches)
                rows.append({
                    "model": model, "dtype": dtype, "batch": batch, "launches": len(launches),
                    "tuner_keys": len(keys), "configs_benchmarked": sum(keys.values()),
                    "compiles": len(mine), "new_compiles": len(mine - seen_compiles),
                    "new_tuner_keys": len(set(keys) - seen_keys),
                })
                seen_compiles |= mine
                seen_keys |= set(keys)
    rows.append({"model": "all", "dtype": "", "batch": "", "launches": sum(r["launches"] for r in rows),
                 "tuner_keys": len(seen_keys), "configs_benchmarked": "", "compiles": len(seen_compiles),
                 "new_compiles": "", "new_tuner_keys": ""})
    return rows


def table(rows: List[dict]) -> str:
    columns = ["model", "dtype", "batch", "launches", "tuner_keys", "new_tuner_keys", "configs_benchmarked",
               "compiles", "new_compiles"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="bagnet33")
    parser.add_argument("--dtypes", default="bf16")
    parser.add_argument("--batches", default="256,32,1")
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--no-autotune", action="store_true", help="count as BAGNET_FAST_AUTOTUNE=0 runs (the tests)")
    args = parser.parse_args(argv)
    rows = count(args.models.split(","), args.dtypes.split(","), [int(b) for b in args.batches.split(",")],
                 args.image, not args.no_autotune)
    print(table(rows))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # nothing runs; the interpreter needs no GPU to import
    sys.exit(main())
