"""Precision: float32 stays exact float32 whatever the caller set globally, and a report of what
each reduced-precision mode costs on a user's own weights and images.

Why: the official BagNet-33 weights lose ImageNet top-1 under TF32 (66.70 -> 64.23) and fp16
autocast (-> 57.96) (berenslab/bagnetsv2, 2025; docs/bagnet.md). PyTorch's global knobs —
``torch.backends.cuda.matmul.allow_tf32`` / ``fp32_precision``, ``torch.backends.cudnn.allow_tf32``
(on by default for convolutions), ``torch.set_float32_matmul_precision("high"/"medium")``, and
oneDNN's ``torch.backends.mkldnn.{matmul,conv}.fp32_precision`` ("bf16"/"tf32" on CPUs that have
them) — would each silently run the fast path's float32 GEMMs and convolutions in reduced
precision. The plan runs every float32 forward inside :func:`exact_fp32`, which sets them to
"ieee" and restores them after (about 20 us). Reduced precision only through bagnet_fast's own
settings: ``BAGNET_FAST_TF32=1`` (TF32 dots and convolutions on GPUs), or a bfloat16/float16
model. Under a caller's ``torch.autocast`` the fast path keeps the model's dtype (autocast does
not reach it); the reference path (training, gradients) follows autocast as PyTorch does.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

__all__ = ["exact_fp32", "fast_path_precision", "tf32_requested", "Mode", "available_modes", "precision_report",
           "format_report", "plot_report"]


def tf32_requested() -> bool:
    """Whether the user asked bagnet_fast for TF32 (``BAGNET_FAST_TF32=1``)."""
    return os.environ.get("BAGNET_FAST_TF32") == "1"


def _knobs():
    backends = torch.backends
    return (backends.cuda.matmul, backends.cudnn.conv, backends.mkldnn.matmul, backends.mkldnn.conv)


@contextlib.contextmanager
def exact_fp32(enabled: bool = True) -> Iterator[None]:
    """float32 GEMMs and convolutions in exact float32 (IEEE) inside the block, whatever the
    global TF32/bf16 settings; restored on exit. Not thread-safe against other threads changing
    the same settings at the same time (they are process-wide in PyTorch)."""
    if not enabled or tf32_requested():
        yield
        return
    knobs = _knobs()
    previous = [knob.fp32_precision for knob in knobs]
    if all(value == "ieee" for value in previous):
        yield
        return
    for knob in knobs:
        knob.fp32_precision = "ieee"
    try:
        yield
    finally:
        for knob, value in zip(knobs, previous):
            knob.fp32_precision = value


@contextlib.contextmanager
def fast_path_precision(dtype: torch.dtype, device_type: str) -> Iterator[None]:
    """The fast path's numerics: the model's own dtype (a caller's autocast switched off for the
    block) and, for float32, :func:`exact_fp32`."""
    with torch.autocast(device_type, enabled=False), exact_fp32(dtype == torch.float32):
        yield


# --------------------------------------------------------------------------- the report


@dataclass
class Mode:
    """One way of running the model: its name, how, and what it was measured to cost."""

    name: str
    path: str  # "fast" (the plan) or "reference" (the modules)
    dtype: torch.dtype
    eliminate: bool = True  # fast path: dead branches eliminated (default tolerance)
    tf32: bool = False
    autocast: bool = False  # reference path under torch.autocast(dtype)


def available_modes(device: torch.device) -> Tuple[List[Mode], Dict[str, str]]:
    """(modes the device can run, {mode family: why not} for the others)."""
    modes = [Mode("reference fp32", "reference", torch.float32),
             Mode("fast fp32", "fast", torch.float32), Mode("fast fp32, dead branches kept", "fast", torch.float32, False)]
    skipped = {}
    if device.type == "cuda":
        modes += [Mode("reference tf32", "reference", torch.float32, tf32=True),
                  Mode("fast tf32", "fast", torch.float32, tf32=True)]
    else:
        skipped["tf32"] = "TF32 exists on NVIDIA GPUs only"
    for dtype, short in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        if device.type == "cpu" and dtype == torch.float16:
            skipped["fp16"] = "no float16 kernels worth measuring on CPUs (a 2048^2 fp16 GEMM took 70 s here)"
            continue
        modes += [Mode(f"fast {short}", "fast", dtype), Mode(f"fast {short}, dead branches kept", "fast", dtype, False),
                  Mode(f"reference {short} autocast", "reference", dtype, autocast=True),  # the model stays fp32
                  Mode(f"reference {short}", "reference", dtype)]
    return modes, skipped


def _weights_dtype(mode: Mode) -> torch.dtype:
    return torch.float32 if mode.autocast else mode.dtype


@contextlib.contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    """TF32 on for the block (the caller's global flags, or bagnet_fast's BAGNET_FAST_TF32)."""
    if not enabled:
        yield
        return
    knobs = (torch.backends.cuda.matmul, torch.backends.cudnn.conv)
    previous = [k.fp32_precision for k in knobs]
    old_env = os.environ.get("BAGNET_FAST_TF32")
    os.environ["BAGNET_FAST_TF32"] = "1"
    for k in knobs:
        k.fp32_precision = "tf32"
    try:
        yield
    finally:
        for k, v in zip(knobs, previous):
            k.fp32_precision = v
        if old_env is None:
            os.environ.pop("BAGNET_FAST_TF32", None)
        else:
            os.environ["BAGNET_FAST_TF32"] = old_env


def _unit_outputs(model, x: torch.Tensor, mode: Optional[Mode], plans: Optional[Dict] = None
                  ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """(logits, {unit name: output}) of one mode; mode None: the float64 oracle (reference
    modules in float64). Block outputs are recorded by forward hooks on the modules for the
    reference path and by the plan's walk hook for the fast path, each as (output, subsample):
    the plan's output is the module's at every subsample-th row and column (``BlockUnit.subsample``)."""
    from .plan import build_plan

    outputs: Dict[str, torch.Tensor] = {}
    if mode is None or mode.path == "reference":
        handles = []
        for s in range(1, 5):
            for i, block in enumerate(getattr(model, f"layer{s}")):
                handles.append(block.register_forward_hook(
                    lambda module, inputs, output, name=f"layer{s}.{i}": outputs.__setitem__(name, (output.double(), 1))))
        try:
            autocast = mode is not None and mode.autocast
            with torch.autocast(x.device.type, dtype=mode.dtype if autocast else None, enabled=autocast), \
                    _tf32(mode is not None and mode.tf32):
                logits = model.reference_forward(x)
        finally:
            for handle in handles:
                handle.remove()
        return logits.double(), outputs

    def record(unit, run, value):
        out = run(value)
        outputs[getattr(unit, "name", "head")] = (out.double(), getattr(unit, "subsample", 1))
        return out

    from .dead_branches import DEFAULT_TOLERANCE

    with _tf32(mode.tf32):
        plans = {} if plans is None else plans
        if mode.name not in plans:
            plans[mode.name] = build_plan(model, None, dead_branch_tolerance=DEFAULT_TOLERANCE if mode.eliminate else 0.0)
        logits = plans[mode.name].run(x, hook=record)
    outputs.pop("head", None)
    return logits.double(), outputs


def _errors(actual: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """Per image: max |actual - exact| / max |exact| (over everything but the batch)."""
    diff = (actual - exact).abs().flatten(1).amax(1)
    return diff / exact.abs().flatten(1).amax(1).clamp_min(1e-30)


@torch.no_grad()
def precision_report(model, images: torch.Tensor, labels: Optional[torch.Tensor] = None, *,
                     modes: Optional[Sequence[Mode]] = None, batch_size: int = 8, progress: bool = False) -> Dict:
    """What each precision mode costs on ``model`` and ``images`` (N, 3, H, W) float32 (normalised),
    against a float64 evaluation of the reference modules: per mode the max and mean relative logit
    error (per image: max |l - l64| / max |l64|), top-1 and top-5 agreement with float64, accuracy
    when ``labels`` (N,) are given, and the relative error of each block's output (the unit where
    it jumps). The model is not modified (each mode runs on a copy)."""
    import copy

    device = images.device
    if modes is None:
        modes, skipped = available_modes(device)
    else:
        skipped = {}
    base = copy.deepcopy(model).float().eval().requires_grad_(False)
    exact_model = copy.deepcopy(base).double()
    copies = {}
    for mode in modes:
        if _weights_dtype(mode) not in copies:
            copies[_weights_dtype(mode)] = copy.deepcopy(base).to(_weights_dtype(mode))
    rows = {mode.name: {"errors": [], "top1": 0, "top5": 0, "correct": 0, "units": {}} for mode in modes}
    exact_correct, seen, plans = 0, 0, {}
    batches = range(0, len(images), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="precision", unit="batch")
    for start in batches:
        x = images[start : start + batch_size]
        exact, exact_units = _unit_outputs(exact_model, x.double(), None)
        top1, top5 = exact.argmax(1), exact.topk(min(5, exact.shape[1]), dim=1).indices
        if labels is not None:
            exact_correct += int((top1.cpu() == labels[start : start + batch_size].cpu()).sum())
        for mode in modes:
            key = _weights_dtype(mode)
            logits, units = _unit_outputs(copies[key], x.to(key), mode, plans)
            row = rows[mode.name]
            row["errors"].append(_errors(logits, exact).cpu())
            row["top1"] += int((logits.argmax(1) == top1).sum())
            row["top5"] += int((top5 == logits.argmax(1, keepdim=True)).any(1).sum())
            if labels is not None:
                row["correct"] += int((logits.argmax(1).cpu() == labels[start : start + batch_size].cpu()).sum())
            for name, (out, step) in units.items():
                if name in exact_units:
                    # The plan's maps are the top-left corners of the reference's (it runs on
                    # plan.input_extent: the pixels past it reach no output).
                    exact_map = exact_units[name][0][..., ::step, ::step][..., : out.shape[-2], : out.shape[-1]]
                    error = float(_errors(out, exact_map).max())
                    row["units"][name] = max(row["units"].get(name, 0.0), error)
        seen += len(x)
    report = {"images": seen, "device": str(device), "skipped": skipped, "modes": []}
    if labels is not None:
        report["float64_accuracy"] = exact_correct / seen
    for mode in modes:
        row = rows[mode.name]
        errors = torch.cat(row["errors"])
        entry = {"mode": mode.name, "path": mode.path, "dtype": str(mode.dtype).replace("torch.", ""),
                 "dead_branches_eliminated": mode.eliminate if mode.path == "fast" else None,
                 "max_relative_error": float(errors.max()), "mean_relative_error": float(errors.mean()),
                 "top1_agreement": row["top1"] / seen, "top5_agreement": row["top5"] / seen,
                 "unit_errors": row["units"]}
        if row["units"]:
            names = list(row["units"])
            jumps = [row["units"][b] / max(row["units"][a], 1e-30) for a, b in zip(names, names[1:])]
            entry["largest_jump"] = names[1 + jumps.index(max(jumps))] if jumps else names[0]
        if labels is not None:
            entry["accuracy"] = row["correct"] / seen
        report["modes"].append(entry)
    return report


def format_report(report: Dict) -> str:
    lines = [f"{'mode':38s} {'max rel err':>12s} {'mean rel err':>12s} {'top-1 agr':>9s} {'top-5 agr':>9s}"
             + ("  accuracy" if "float64_accuracy" in report else "") + "  error jumps at"]
    for m in report["modes"]:
        line = (f"{m['mode']:38s} {m['max_relative_error']:12.3e} {m['mean_relative_error']:12.3e} "
                f"{m['top1_agreement']:9.3f} {m['top5_agreement']:9.3f}")
        if "accuracy" in m:
            line += f"  {m['accuracy']:8.3f}"
        lines.append(line + f"  {m.get('largest_jump', '-')}")
    for family, why in report["skipped"].items():
        lines.append(f"(no {family} modes: {why})")
    return "\n".join(lines)


def plot_report(report: Dict, path: str) -> bool:
    """Relative error after each block, one line per mode (log scale)."""
    from ._io import matplotlib_figure, save_png

    figure = matplotlib_figure((9, 5))
    if figure is None:
        return False
    ax = figure.add_subplot()
    for index, m in enumerate(report["modes"]):
        units = m["unit_errors"]
        if units:
            ax.plot(list(units), [max(v, 1e-18) for v in units.values()], marker="o", ms=3,
                    label=m["mode"], color=f"C{index % 10}")
    ax.set_yscale("log")
    ax.set_ylabel("max relative error of the block output vs float64")
    ax.tick_params(axis="x", rotation=70, labelsize=7)
    ax.legend(fontsize=7)
    ax.set_title(f"error per unit, {report['images']} images, {report['device']}", fontsize=9)
    save_png(figure, path)
    return True
