"""The correctness checks the GPU check owes other issues, each self-describing (what, criterion,
measured values, passed) in the ``checks`` section of gpu_check.json/md. Run by
``gpu_check.py --phase extra``; on the CPU (``--dry-run``) they run on the CPU backends with
the same code, to catch errors before the one GPU run.

- issue 13: float32 exact under global TF32 flags, per backend; bf16 error on a dead-branch
  checkpoint with and without elimination;
- issue 11: NaN propagation per backend, and the cuda backend's cuBLASLt ReLU-epilogue probe;
- issue 17: the Triton fp32 modes (ieee, tf32x3, plain tf32) against float64 (the interpreter
  ignores input_precision: only a GPU can measure this).
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
from pathlib import Path
from typing import Callable, Dict, List

import torch

ROOT = Path(__file__).resolve().parents[1]
import bagnet_fast  # noqa: E402

FP32_RTOL = 1e-5  # the fp32 parity bound of the tests (DESIGN.md "Precision")


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (as tests/conftest.py)."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


@contextlib.contextmanager
def global_tf32_flags():
    """The three global settings that turn fp32 matmuls and convolutions into TF32 in PyTorch."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


@contextlib.contextmanager
def env(name: str, value: str):
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def _model(name: str, device, dtype, seed: int = 0):
    torch.manual_seed(seed)
    return getattr(bagnet_fast, name)().eval().to(device=device, dtype=dtype)


def _images(batch: int, size: int, device, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return ((torch.rand(batch, 3, size, size, generator=generator) - 0.45) / 0.225).to(device)


def _float64_logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return copy.deepcopy(model).to(torch.float64).reference_forward(x.double())


def on_backend(model, backend: str):
    fast = copy.deepcopy(model)
    fast.backend = backend
    return fast


def backends_for(device, dtype) -> List[str]:
    return [b for b, entry in bagnet_fast.backends(device, dtype).items() if entry["available"]]


def fp32_under_global_flags(device, image: int, model_name: str = "bagnet33") -> dict:
    model = _model(model_name, device, torch.float32)
    x = _images(2, image, device)
    expected = _float64_logits(model, x)
    per_backend = {}
    for backend in backends_for(device, torch.float32):
        fast = on_backend(model, backend)
        with torch.inference_mode():
            plain = fast(x)
            with global_tf32_flags():
                flagged = fast(x)
        per_backend[backend] = {"equal_with_and_without_flags": torch.equal(plain, flagged),
                                "rel_err_vs_float64": rel_err(flagged, expected),
                                "ran": bagnet_fast.get_plan(fast).backend.name}
    return {
        "name": "issue 13: float32 exact under global TF32 flags",
        "criterion": "with matmul.allow_tf32, cudnn.allow_tf32 and float32_matmul_precision('high') set, each "
                     f"backend's fp32 logits equal its logits without them and stay within {FP32_RTOL:g} relative "
                     "(max-norm) of float64; 2 images",
        "values": per_backend,
        "passed": bool(per_backend) and all(v["equal_with_and_without_flags"] and v["rel_err_vs_float64"] <= FP32_RTOL
                                            for v in per_backend.values()),
    }


def dead_branch_bf16(device, image: int, model_name: str = "bagnet33") -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_dead_branches import dead_pattern_model

    model = dead_pattern_model(model_name)
    x = _images(4, image, "cpu")
    expected = _float64_logits(model, x).to(device)
    lowp = model.to(device=device, dtype=torch.bfloat16)
    values = {}
    for backend in [b for b in backends_for(device, torch.bfloat16) if b != "torch"] or ["torch"]:
        for label, tolerance in (("eliminated", None), ("kept", 0.0)):
            kwargs = {} if tolerance is None else {"dead_branch_tolerance": tolerance}
            plan = bagnet_fast.build_plan(lowp, backend, **kwargs)
            with torch.inference_mode():
                out = plan.run(x.to(device=device, dtype=torch.bfloat16))
            values[f"{backend} {label}"] = {"rel_err_vs_float64": rel_err(out, expected),
                                            "blocks_eliminated": len(plan.eliminated)}
    return {
        "name": "issue 13: bf16 on a dead-branch checkpoint, with and without elimination",
        "criterion": "recorded, not judged: bf16 logits vs float64 on tests/test_dead_branches.py's dead_pattern_model "
                     "(4 images), dead blocks eliminated (default) and kept (dead_branch_tolerance=0.0)",
        "values": values,
        "passed": None,
    }


def nan_propagation(device, image: int, model_name: str = "bagnet33") -> dict:
    model = _model(model_name, device, torch.bfloat16)
    x = _images(2, image, device).to(torch.bfloat16)
    x[1, 0, image // 2, image // 3] = float("nan")  # one NaN pixel in the second image
    patch_model = copy.deepcopy(model)
    patch_model.avg_pool = False
    with torch.inference_mode():
        logits_ref, patches_ref = model.reference_forward(x), patch_model.reference_forward(x)
    values = {}
    for backend in backends_for(device, torch.bfloat16):
        fast = on_backend(model, backend)
        with torch.inference_mode():
            logits = fast(x)
            fast.avg_pool = False
            patches = fast(x)
        entry = {"ran": bagnet_fast.get_plan(fast).backend.name,
                 "logits_nan_where_reference_nan": torch.equal(logits.isnan(), logits_ref.isnan())}
        entry["patches_nan_where_reference_nan"] = torch.equal(patches.isnan(), patches_ref.isnan())
        entry["nan_patches"] = int(patches.isnan().any(-1).sum())  # > 0: the check is not vacuous
        values[backend] = entry
    if device.type == "cuda":
        from bagnet_fast.executors.cuda_backend import relu_epilogue_keeps_nan

        values["cuda relu_epilogue_keeps_nan"] = relu_epilogue_keeps_nan(device)
    return {
        "name": "issue 11: NaN propagation",
        "criterion": "one NaN pixel: each backend's bf16 logits (and patch logits) are NaN exactly where the "
                     "reference forward's are; relu_epilogue_keeps_nan is cuBLASLt's RELU_BIAS epilogue probe",
        "values": values,
        "passed": all(all(v for k, v in entry.items() if k.endswith("reference_nan"))
                      for entry in values.values() if isinstance(entry, dict)),
    }


def triton_fp32_modes(device, image: int, model_name: str = "bagnet33") -> dict:
    if device.type != "cuda" or "triton" not in backends_for(device, torch.float32):
        # The interpreter's dots are numpy fp32 whatever input_precision says.
        return {"name": "issue 17: Triton fp32 modes vs float64", "criterion": "needs the Triton backend on CUDA",
                "values": {}, "passed": None, "note": f"not measurable on {device.type}"}
    model = _model(model_name, device, torch.float32)
    x = _images(2, image, device)
    expected = _float64_logits(model, x)
    values = {}
    for mode, variables in (("ieee", {"BAGNET_FAST_FP32": "ieee"}), ("tf32x3", {"BAGNET_FAST_FP32": "tf32x3"}),
                            ("tf32", {"BAGNET_FAST_TF32": "1"})):
        fast = on_backend(model, "triton")
        with contextlib.ExitStack() as stack:
            for name, value in variables.items():
                stack.enter_context(env(name, value))
            with torch.inference_mode():
                values[mode] = rel_err(fast(x), expected)
    return {
        "name": "issue 17: Triton fp32 modes vs float64",
        "criterion": f"fp32 logits, 2 images: tf32x3 within {FP32_RTOL:g} relative of float64 (ieee is "
                     "the exact reference point, plain tf32 shown for scale: ~1e-3)",
        "values": {f"{mode} rel_err_vs_float64": err for mode, err in values.items()},
        "passed": values["tf32x3"] <= FP32_RTOL,
    }


CHECKS: Dict[str, Callable] = {
    "fp32_global_flags": fp32_under_global_flags,
    "dead_branch_bf16": dead_branch_bf16,
    "nan_propagation": nan_propagation,
    "triton_fp32_modes": triton_fp32_modes,
}
