"""The GPU check's measurements: img/s of the BagNets (fast, reference, torch.compile) and
torchvision ResNet-50, the device's measured bf16 matmul peak and copy bandwidth, the goal
ratios of issues 3 and 4, and a unit profile of the fast BagNet-33 per CUDA backend (each unit's
time against its roofline: where the time goes, for the next optimisation), as tables printed and
written to ``OUT/gpu_check.md`` and ``OUT/gpu_check.json`` (rewritten after every measurement, so
a run cut short keeps what it has).

Run it through the whole check on a GPU machine, from the repository root:

    bash benchmarks/gpu_check.sh RESULTS_DIR      # build, CUDA tests, then this script

or alone: ``python benchmarks/gpu_check.py --out DIR [--budget-s 300]``. ``--dry-run`` runs every
step on the CPU with tiny shapes (tests/test_gpu_models.py does, to catch errors before the
one GPU run); its numbers mean nothing and are labelled as such.

Measurements are done in priority order (the issue-3 goals at batch 256 first) and skipped, with
the reason recorded, once ``--budget-s`` is spent; an OOM or an error in one row never stops the
others. Timing: CUDA events around each call after warm-up calls (the first call builds the plan,
autotunes the Triton kernels or compiles, and is reported separately as ``first_call_s``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, List, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import bagnet_fast  # noqa: E402
from bagnet_fast import timing as _timing  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_checks  # noqa: E402
import gpu_model  # noqa: E402

# Counted FLOPs per 224×224 image (multiply-adds × 2): the reference BagNet-33 and ResNet-50.
GFLOP_PER_IMAGE_224 = {"bagnet33": 32.52, "resnet50": 8.18}
GOAL_BATCH = 256
FAST = "fast"
PROFILE = "unit profile"  # pseudo-rows: per-unit time of the fast plan, after the goal batch's rows


class Budget:
    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, repeats: int) -> List[float]:
    """Seconds per call, one CUDA-event pair per call (wall clock on CPU)."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def benchmark(fn: Callable[[], object], device: torch.device, budget: Budget, target_s: float,
              min_repeats: int = 3) -> dict:
    """First call (plan build / autotune / compile), one more warm-up, then enough repeats to
    fill about target_s (min_repeats to 50)."""
    with torch.inference_mode():
        t0 = time.perf_counter()
        fn()
        sync(device)
        first = time.perf_counter() - t0
        warm = time_calls(fn, device, 1)[0]
        repeats = int(max(min_repeats, min(50, target_s / max(warm, 1e-6))))
        if budget.left() < repeats * warm + 1:
            repeats = min_repeats
        times = time_calls(fn, device, repeats)
    return {"first_call_s": first, "median_s": statistics.median(times), "min_s": min(times), "repeats": repeats}


def is_oom(error: BaseException) -> bool:
    return isinstance(error, getattr(torch.cuda, "OutOfMemoryError", ())) or "out of memory" in str(error).lower()


# --------------------------------------------------------------------------- environment


def run_text(command: List[str]) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as error:  # noqa: BLE001 - reported, never fatal
        return f"unavailable ({type(error).__name__})"


def environment(device: torch.device) -> dict:
    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "device": str(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "git_commit": run_text(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]),
        "host_cpu": platform.processor() or platform.machine(),
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:
        info["torchvision"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            sm_count=props.multi_processor_count,
            capability=f"{props.major}.{props.minor}",
            driver=(run_text(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]).splitlines()
                    or ["unknown"])[0],
        )
    else:
        info.update(gpu=None, driver=None)
    info["backends"] = {
        str(dtype).replace("torch.", ""): bagnet_fast.backends(device, dtype)
        for dtype in (torch.float32, torch.bfloat16)
    }
    return info


def device_limits(device: torch.device, budget_s: float = 0.5) -> dict:
    """bf16 GEMM TFLOP/s and copy GB/s (read + write), measured by the same code as
    ``python -m bagnet_fast bench`` (bagnet_fast.timing: the best GEMM up to 8192³, 1 GiB copies)."""
    peaks = _timing.measure_peaks(device, torch.bfloat16, budget_s)
    return {
        "peaks": peaks,  # as bagnet_fast.profile's roofline takes them
        "matmul": peaks["matmul_source"],
        "bf16_matmul_tflops": peaks["matmul_flops_per_s"] / 1e12,
        "copy_bytes": int(peaks["copy_mib"] * 2**21),  # read + write
        "copy_gbps": peaks["copy_bytes_per_s"] / 1e9,
    }


# --------------------------------------------------------------------------- implementations


def make_bagnet(name: str, device: torch.device, dtype: torch.dtype, channels_last: bool = False):
    model = getattr(bagnet_fast, name)().eval()
    model = model.to(device=device, dtype=dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def images(batch: int, size: int, device: torch.device, dtype: torch.dtype, channels_last: bool = False):
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def resnet_row(dtype: torch.dtype, channels_last: bool):
    def setup(batch, args, device):
        import torchvision

        model = torchvision.models.resnet50(weights=None).eval().to(device=device, dtype=dtype)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        x = images(batch, args.image, device, dtype, channels_last)
        return (lambda: model(x)), None

    return setup


def reference_row(name: str, dtype: torch.dtype, channels_last: bool, compiled: bool = False):
    def setup(batch, args, device):
        model = make_bagnet(name, device, dtype, channels_last)
        x = images(batch, args.image, device, dtype, channels_last)
        forward = torch.compile(model.reference_forward) if compiled else model.reference_forward
        return (lambda: forward(x)), None

    return setup


def fast_row(name: str, dtype: torch.dtype, backend: Optional[str], graph: bool = False):
    """The fast model on ``backend`` (None: the automatic choice), optionally as a CUDA graph;
    returns (timed function, self-check) where the self-check compares one output with the
    torch backend's in the same dtype at this batch and names the backend that really ran."""
    def setup(batch, args, device):
        model = make_bagnet(name, device, dtype)
        if backend is not None:
            model.backend = backend
        x = images(batch, args.image, device, dtype)
        fn = bagnet_fast.cuda_graph(model, x) if graph else model
        timed = (lambda: fn(x))

        def check() -> dict:
            with torch.inference_mode():
                out = fn(x).float()
                torch_model = copy.deepcopy(model)
                torch_model.backend = "torch"
                expected = torch_model(x).float()
            error = (out - expected).abs().max().item()
            return {"backend_ran": bagnet_fast.get_plan(model).backend.name,
                    "max_abs_err_vs_torch": error,
                    "rel_err_vs_torch": error / max(expected.abs().max().item(), 1e-30),
                    "nan_in_output": bool(out.isnan().any())}

        return timed, check

    return setup


def row(phase: str, model: str, batch: int, impl: str, setup=None, **extra) -> dict:
    return {"phase": phase, "model": model, "batch": batch, "impl": impl, "setup": setup, **extra}


def work_list(args, device: torch.device) -> List[dict]:
    """Every row, in measuring order, by phase (gpu_check.sh runs each phase in its own process,
    so a device fault in the never-run Triton rows cannot lose the baselines):
    baselines, triton (fast bf16 at the goal batch and its unit profile), cuda (the same on the
    cuda backend, the stem three ways), extra (CUDA graphs at batch 32 and 1, fp32 rows, the
    owed checks, the other models), compile (torch.compile)."""
    bf16, fp32 = torch.bfloat16, torch.float32
    m33 = args.main_model  # BagNet-33; BagNet-9 in a dry run (the same units, a third of the time)
    goal = args.goal_batch
    small = [b for b in args.small_batches if b != goal]
    rows = [
        row("baselines", "resnet50", goal, "eager bf16 channels-last", resnet_row(bf16, True)),
        row("baselines", m33, goal, "reference eager fp32 NCHW", reference_row(m33, fp32, False)),
        row("baselines", m33, goal, "reference eager bf16 channels-last", reference_row(m33, bf16, True)),
    ]
    # A dry run stands the torch backend in for the cuda backend (the cpu backend is fp32 only).
    cuda = "torch" if args.dry_run else "cuda"
    for phase, backend in (("triton", "triton"), ("cuda", cuda)):
        rows += [row(phase, m33, goal, f"{FAST} bf16 [{backend}]", fast_row(m33, bf16, backend), backend=backend),
                 row(phase, m33, goal, f"{PROFILE} bf16 [{backend}]", profile=backend, dtype=bf16, backend=backend)]
    rows.append(row("cuda", m33, goal, "stem implementations bf16", profile="stem", dtype=bf16))
    for batch in small:
        rows.append(row("extra", m33, batch, f"{FAST} bf16 cuda_graph [auto]",
                        fast_row(m33, bf16, None, graph=True), graph=True))
    rows += [
        row("extra", m33, goal, f"{FAST} fp32 [triton] ieee", fast_row(m33, fp32, "triton"),
            backend="triton", fp32_mode="ieee"),
        row("extra", m33, goal, f"{FAST} fp32 [triton] tf32x3", fast_row(m33, fp32, "triton"),
            backend="triton", fp32_mode="tf32x3"),
        row("extra", m33, goal, f"{FAST} fp32 [{cuda}]", fast_row(m33, fp32, cuda), backend=cuda),
        row("extra", "resnet50", goal, "eager fp32", resnet_row(fp32, False)),
    ]
    rows += [row("extra", m33, goal, f"check {name}", check=name) for name in gpu_checks.CHECKS]
    for name in (m for m in args.models if m != m33):
        rows.append(row("extra", name, goal, f"{FAST} bf16 [auto]", fast_row(name, bf16, None)))
    if not args.no_compile:
        rows.append(row("compile", m33, goal, "reference torch.compile bf16 channels-last",
                        reference_row(m33, bf16, True, compiled=True), compile=True))
    # Rows whose backend cannot run here are recorded as skipped with the reason, not dropped.
    for r in rows:
        dtype = r.get("dtype") or (fp32 if " fp32" in r["impl"] else bf16)
        if r.get("backend"):
            entry = bagnet_fast.backends(device, dtype)[r["backend"]]
            if not entry["available"]:
                r["unavailable"] = entry["reason"]
        if r.get("graph") and device.type != "cuda":
            r["unavailable"] = "CUDA graphs need a CUDA device"
        if args.dry_run and r.get("backend") == "triton":
            r["unavailable"] = "the Triton interpreter is not timed in a dry run (tests/test_triton_*.py run it)"
    return [r for r in rows if args.phase in ("all", r["phase"])]


def stem_implementations(batch: int, args, device: torch.device, dtype: torch.dtype, budget: Budget) -> List[dict]:
    """The merged stem (3 -> 64, 3x3, bias, ReLU) of BagNet-33 each way the backends run it: the
    cuda backend's direct kernel (its default) against cuDNN + bias_residual_act
    (BAGNET_FAST_CUDA_STEM=cudnn), and the Triton implicit GEMM. Decides the cuda backend's
    default (executors.cuda_backend.CudaBackend.stem_conv_bias_relu)."""
    model = make_bagnet("bagnet33", device, dtype)
    stem = bagnet_fast.build_plan(model, "torch").stem.conv
    x = torch.randn(batch, 3, args.image, args.image, device=device, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    ops = torch.ops.bagnet_fast
    ways = {}
    if bagnet_fast.ops.has_op("stem_conv_bias_relu", "CUDA" if device.type == "cuda" else "CPU"):
        ways["direct kernel (stem_conv_bias_relu)"] = lambda: ops.stem_conv_bias_relu(x, stem.weight, stem.bias)
    if device.type == "cuda" and bagnet_fast.ops.has_op("bias_residual_act", "CUDA"):
        def cudnn_then_epilogue():
            y = torch.ops.aten.cudnn_convolution(x, stem.weight, [0, 0], [1, 1], [1, 1], 1, False, False, False)
            return ops.bias_residual_act(y, stem.bias, None, True)

        ways["cuDNN + bias_residual_act"] = cudnn_then_epilogue
    if bagnet_fast.backends(device, dtype)["triton"]["available"]:
        from bagnet_fast.ops import triton_ops

        ways["Triton conv_bias_act"] = lambda: triton_ops.conv_bias_act(x, stem.weight, stem.bias, 1)
    if not ways:
        ways["torch conv2d + relu (no fused implementation here)"] = lambda: torch.relu(
            torch.nn.functional.conv2d(x, stem.weight, stem.bias))
    out_pixels = batch * (args.image - 2) ** 2
    moved = (x.numel() + out_pixels * 64) * x.element_size()
    results = []
    for way, fn in ways.items():
        entry = {"name": way}
        try:
            entry.update(benchmark(fn, device, budget, 0.2, args.min_repeats))
            entry["gbytes_per_s"] = moved / entry["median_s"] / 1e9
            entry["tflops_per_s"] = 2 * 27 * 64 * out_pixels / entry["median_s"] / 1e12
        except Exception as error:  # noqa: BLE001 - one way's failure never stops the others
            entry["note"] = f"error: {type(error).__name__}: {str(error)[:200]}"
        results.append(entry)
    return results


def unit_profile(name: str, batch: int, args, device: torch.device, backend: str, dtype: torch.dtype,
                 peaks: dict) -> List[dict]:
    """Where the fast plan's time goes: each unit's median time (synchronised ranges, the rows of
    ``python -m bagnet_fast profile``) with its counted FLOPs and bytes against the roofline of
    the measured device limits."""
    from bagnet_fast import flops as _flops
    from bagnet_fast import profile as _profile

    model = make_bagnet(name, device, dtype)
    plan = bagnet_fast.build_plan(model, backend)
    x = torch.randn(batch, 3, args.image, args.image, device=device, dtype=dtype)
    with torch.inference_mode():
        timer = _profile.UnitTimer(plan, device)
        result = _profile.profile_network(
            f"{name} {FAST} [{backend}]", plan.run, timer,
            _flops.plan_unit_costs(plan, tuple(x.shape), dtype), x, warmup=2, repeats=args.min_repeats, peaks=peaks,
            timed_forward=timer.forward)
    keep = ("name", "kind", "seconds", "tflops_per_s", "gbytes_per_s", "percent_of_roofline", "bound")
    units = [{key: row[key] for key in keep} for row in result["rows"]]
    # benchmarks/gpu_model.py's prediction for the Triton path in 16-bit (the other backends'
    # kernels are not modelled: shown for scale only).
    predicted = {u.name: u for u in gpu_model.predict(plan, batch, args.image)}
    for unit in units:
        if unit["name"] in predicted:
            unit["predicted_s"] = predicted[unit["name"]].seconds
            unit["predicted_bound"] = predicted[unit["name"]].bound
    return [{"name": "end to end", "seconds": result["seconds_end_to_end"],
             "predicted_s": sum(u.seconds for u in predicted.values())}] + units


# --------------------------------------------------------------------------- results


def goal_ratios(rows: List[dict], limits: dict, image: int) -> dict:
    def ips(model: str, impl: str, batch: int = GOAL_BATCH) -> Optional[float]:
        for row in rows:
            if row["model"] == model and row["impl"] == impl and row["batch"] == batch:
                return row.get("img_per_s")
        return None

    batches = {row["batch"] for row in rows}
    batch = GOAL_BATCH if GOAL_BATCH in batches else max(batches, default=GOAL_BATCH)
    fast_rows = [r for r in rows if r["model"] == "bagnet33" and r["batch"] == batch
                 and r["impl"].startswith(f"{FAST} bf16") and r.get("img_per_s")]
    best = max(fast_rows, key=lambda r: r["img_per_s"], default=None)
    auto = next((r for r in fast_rows if r["impl"] == f"{FAST} bf16 [triton]"), best)
    goals = {"batch": batch, "fast_bagnet33_bf16": None if best is None else best["impl"]}
    if best is None:
        return goals
    fast_ips = best["img_per_s"]

    def ratio(name: str, other: Optional[float], goal: float) -> None:
        value = None if not other else fast_ips / other
        goals[name] = {"ratio": value, "goal": goal, "met": None if value is None else value >= goal}

    ratio("vs resnet50 eager bf16 channels-last", ips("resnet50", "eager bf16 channels-last", batch), 1.0)
    ratio("vs reference eager fp32 NCHW", ips("bagnet33", "reference eager fp32 NCHW", batch), 5.0)
    ratio("vs reference torch.compile bf16", ips("bagnet33", "reference torch.compile bf16 channels-last", batch), 1.5)
    peak = limits.get("bf16_matmul_tflops")
    if peak and image == 224:
        fraction = fast_ips * GFLOP_PER_IMAGE_224["bagnet33"] * 1e9 / (peak * 1e12)
        goals["fraction of bf16 matmul peak"] = {"ratio": fraction, "goal": 0.25, "met": fraction >= 0.25}
    else:
        goals["fraction of bf16 matmul peak"] = {"ratio": None, "goal": 0.25, "met": None,
                                                 "note": "counted FLOPs are for 224×224 images"}
    if auto is not None and auto is not best:
        goals["triton backend alone img/s"] = auto["img_per_s"]
    accurate = ips("bagnet33", f"{FAST} fp32 [triton] tf32x3", batch)
    ref_fp32 = ips("bagnet33", "reference eager fp32 NCHW", batch)
    goals["issue 17: fp32 tf32x3 vs reference eager fp32 NCHW"] = {
        "ratio": accurate / ref_fp32 if accurate and ref_fp32 else None, "goal": 2.0,
        "met": (accurate / ref_fp32 >= 2.0) if accurate and ref_fp32 else None,
    }
    cuda_ips = ips("bagnet33", f"{FAST} bf16 [cuda]", batch)
    ref_bf16 = ips("bagnet33", "reference eager bf16 channels-last", batch)
    goals["issue 4: cuda backend vs reference eager bf16 channels-last"] = {
        "ratio": cuda_ips / ref_bf16 if cuda_ips and ref_bf16 else None,
        "goal": 2.0,
        "met": (cuda_ips / ref_bf16 >= 2.0) if cuda_ips and ref_bf16 else None,
    }
    return goals


def markdown(result: dict) -> str:
    env, limits = result["environment"], result["limits"]
    lines = [
        f"# GPU check: {env.get('gpu') or env['device']}" + (" (DRY RUN on CPU: numbers meaningless)" if result["dry_run"] else ""),
        "",
        f"{env['date_utc']} UTC · driver {env.get('driver')} · torch {env['torch']} (CUDA {env['cuda_runtime']}, "
        f"cuDNN {env['cudnn']}) · triton {env['triton']} · torchvision {env['torchvision']} · python {env['python']} · "
        f"commit {env['git_commit']} · images {result['image']}×{result['image']} · cudnn.allow_tf32={env['cudnn_allow_tf32']}",
        "",
        f"Device limits: bf16 matmul {limits.get('bf16_matmul_tflops', float('nan')):.1f} TFLOP/s "
        f"({limits.get('matmul')}), copy {limits.get('copy_gbps', float('nan')):.0f} GB/s (read + write).",
        "",
        "| phase | model | batch | implementation | img/s | ms/batch | first call s | TFLOP/s | ran | "
        "rel. err vs torch | note |",
        "|---|---|---:|---|---:|---:|---:|---:|---|---:|---|",
    ]
    for row in sorted(result["rows"], key=lambda r: (r["model"], r["batch"], r["order"])):
        ips = row.get("img_per_s")
        err = row.get("rel_err_vs_torch")
        lines.append(
            f"| {row.get('phase', '')} | {row['model']} | {row['batch']} | {row['impl']} | "
            + (f"{ips:.1f} | {row['median_s'] * 1e3:.2f} | {row['first_call_s']:.2f} | " if ips else "– | – | – | ")
            + (f"{row['tflops']:.1f}" if row.get("tflops") else "–")
            + f" | {row.get('backend_ran', '')} | " + ("" if err is None else f"{err:.2e}")
            + f" | {row.get('note', '')} |"
        )
    lines += ["", f"## Goals (BagNet-33 at batch {result['goals'].get('batch')}, fast = {result['goals'].get('fast_bagnet33_bf16')})", ""]
    for name, goal in result["goals"].items():
        if isinstance(goal, dict):
            value = goal["ratio"]
            shown = "not measured" if value is None else (f"{value:.1%}" if "fraction" in name else f"{value:.2f}×")
            verdict = "" if goal["met"] is None else (" ✅ met" if goal["met"] else " ❌ not met")
            lines.append(f"- {name}: {shown} (goal ≥ {goal['goal']}){verdict}")
    lines += ["", "## Checks", ""]
    for check in result.get("checks", []):
        verdict = {True: "✅ passed", False: "❌ FAILED", None: "recorded"}[check.get("passed")]
        lines += [f"- **{check['name']}**: {verdict}{' (' + check['note'] + ')' if check.get('note') else ''}. "
                  f"Criterion: {check.get('criterion', '')}",
                  f"  values: `{json.dumps(check.get('values', {}), default=str)}`"]
    for profile in result.get("profiles", []):
        lines += profile_markdown(profile)
    lines += ["", f"Stopped early: {result['skipped']} rows skipped for the time budget." if result["skipped"] else ""]
    return "\n".join(lines) + "\n"


def profile_markdown(profile: dict) -> List[str]:
    lines = ["", f"## {profile['model']} {profile['impl']}, batch {profile['batch']}", ""]
    if "stem" in profile:
        lines += ["| implementation | ms | GB/s | TFLOP/s | note |", "|---|---:|---:|---:|---|"]
        for way in profile["stem"]:
            lines.append(f"| {way['name']} | " + (
                f"{way['median_s'] * 1e3:.3f} | {way['gbytes_per_s']:.0f} | {way['tflops_per_s']:.1f} | |"
                if "median_s" in way else f"– | – | – | {way.get('note', '')} |"))
        return lines
    if "units" not in profile:
        return lines + [f"Not measured: {profile.get('note', '')}"]
    lines += ["Predicted: benchmarks/gpu_model.py's H200 model of the Triton kernels (a prediction, for the "
              "Triton rows; other backends for scale).", "",
              "| unit | kind | ms | predicted ms | measured / predicted | TFLOP/s | GB/s | % of roofline | bound | "
              "predicted bound |", "|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for unit in profile["units"]:
        predicted = unit.get("predicted_s")
        shown = f"{predicted * 1e3:.2f} | {unit['seconds'] / predicted:.2f}" if predicted else "– | –"
        if "kind" not in unit:  # the end-to-end time without the timer's synchronisations
            lines.append(f"| **{unit['name']}** | | {unit['seconds'] * 1e3:.2f} | {shown} | | | | | |")
            continue
        lines.append(f"| {unit['name']} | {unit['kind']} | {unit['seconds'] * 1e3:.2f} | {shown} | "
                     f"{unit['tflops_per_s']:.1f} | {unit['gbytes_per_s']:.0f} | {unit['percent_of_roofline']:.0f} | "
                     f"{unit['bound']} | {unit.get('predicted_bound', '')} |")
    return lines


def write_results(result: dict, out: Path) -> None:
    result["goals"] = goal_ratios(result["rows"], result["limits"], result["image"])
    try:
        from bagnet_fast.ops import triton_ops

        result["triton_autotuned"] = triton_ops.autotuned_configs()
    except Exception:  # noqa: BLE001 - triton missing or not importable here
        result["triton_autotuned"] = {}
    for name, text in (("gpu_check.json", json.dumps(result, indent=1, default=str)), ("gpu_check.md", markdown(result))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out / name)


def run_profile(record: dict, name: str, batch: int, row: dict, args, device: torch.device, result: dict) -> None:
    """One unit profile into result["profiles"]; an error or OOM is recorded, never raised."""
    peaks = result["limits"].get("peaks")
    try:
        if row["profile"] == "stem":
            record["stem"] = stem_implementations(batch, args, device, row["dtype"], Budget(30))
        elif not peaks:
            raise RuntimeError("no device limits measured: no roofline")
        else:
            record["units"] = unit_profile(name, batch, args, device, row["profile"], row["dtype"], peaks)
    except Exception as error:  # noqa: BLE001 - one row's failure never stops the others
        record["note"] = "OOM" if is_oom(error) else f"error: {type(error).__name__}: {str(error)[:200]}"
        if not is_oom(error):
            traceback.print_exc()
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result["profiles"].append(record)
    done = "units" in record or "stem" in record
    print(f"{name:9s} b{batch:<4d} {row['impl']:45s} " + ("done" if done else record["note"]), flush=True)


def load_previous(out: Path) -> Optional[dict]:
    """The results of earlier phases (gpu_check.sh runs one process per phase into one folder)."""
    try:
        return json.loads((out / "gpu_check.json").read_text())
    except (OSError, ValueError):
        return None


def failed_rows(previous: Optional[dict]) -> set:
    """(model, batch, impl) of the rows, profiles and checks an earlier run did not finish."""
    done = set()
    for entry in (previous or {}).get("rows", []) + (previous or {}).get("profiles", []):
        if entry.get("img_per_s") or "units" in entry or "stem" in entry:
            done.add((entry["model"], entry["batch"], entry["impl"]))
    for check in (previous or {}).get("checks", []):
        if "error" not in check:
            done.add((check.get("model"), check.get("batch"), check.get("impl")))
    return done


@contextlib.contextmanager
def fp32_mode(mode: Optional[str]):
    """BAGNET_FAST_FP32 for one row (read by bagnet_fast.ops.triton_tuning at every call)."""
    if mode is None:
        yield
        return
    with gpu_checks.env("BAGNET_FAST_FP32", mode):
        yield


def run_row(entry: dict, record: dict, args, device: torch.device, budget: Budget, result: dict) -> None:
    """Time one row, then check its output (fast rows) and record what ran; never raises."""
    fn = check = None
    try:
        with fp32_mode(entry.get("fp32_mode")):
            fn, check = entry["setup"](entry["batch"], args, device)
            record.update(benchmark(fn, device, budget, args.target_s, args.min_repeats))
            record["img_per_s"] = entry["batch"] / record["median_s"]
            gflop = GFLOP_PER_IMAGE_224.get(entry["model"])
            if gflop and args.image == 224:
                record["tflops"] = record["img_per_s"] * gflop / 1e3
            if check is not None:
                record.update(check())
                if record["backend_ran"] != entry.get("backend", record["backend_ran"]):
                    record["note"] = f"ran on {record['backend_ran']}, not {entry['backend']}"
        if entry.get("backend") == "triton" or entry.get("graph"):
            from bagnet_fast.ops import triton_ops

            record["autotune_picks"] = {str(k): str(v) for k, v in triton_ops.autotuned_configs().items()}
    except Exception as error:  # noqa: BLE001 - one row's failure never stops the others
        record["note"] = "OOM" if is_oom(error) else f"error: {type(error).__name__}: {str(error)[:200]}"
        if not is_oom(error):
            traceback.print_exc()
    finally:
        del fn, check
        if device.type == "cuda":
            torch.cuda.empty_cache()


def run_check(entry: dict, args, device: torch.device) -> dict:
    image = args.image if args.dry_run else args.check_image
    model = args.main_model
    try:
        check = gpu_checks.CHECKS[entry["check"]](device, image, model)
    except Exception as error:  # noqa: BLE001 - recorded
        traceback.print_exc()
        check = {"name": entry["check"], "error": f"{type(error).__name__}: {str(error)[:300]}", "passed": False}
    return dict(check, impl=entry["impl"], batch=entry["batch"], image=image, model=model)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="results folder (created)")
    parser.add_argument("--phase", default="all", choices=("all", "baselines", "triton", "cuda", "extra", "compile"),
                        help="the rows of one phase, merged into OUT/gpu_check.json (gpu_check.sh: one process each)")
    parser.add_argument("--rerun-failed", action="store_true",
                        help="only the rows OUT/gpu_check.json has no result for (the follow-up command)")
    parser.add_argument("--only", default=None, help="only rows whose implementation contains this text")
    parser.add_argument("--budget-s", type=float, default=300.0, help="start no measurement after this many seconds")
    parser.add_argument("--goal-batch", type=int, default=GOAL_BATCH)
    parser.add_argument("--small-batches", default="32,1", help="CUDA-graph rows")
    parser.add_argument("--models", default="bagnet9,bagnet17,bagnet33")
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--check-image", type=int, default=96, help="image size of the checks (2-4 images)")
    parser.add_argument("--target-s", type=float, default=0.5, help="timed seconds per row (after warm-up)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile rows")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: a smoke test of this script")
    args = parser.parse_args(argv)
    args.min_repeats = 3
    args.small_batches = [int(b) for b in args.small_batches.split(",") if b]
    args.models = args.models.split(",")
    if args.dry_run:
        # BagNet-9 for every row and check, 2 images of 40 px: about a minute on 2 CPU cores.
        args.goal_batch, args.small_batches, args.image, args.target_s, args.min_repeats = 2, [1], 40, 0.0, 1
        args.models, args.no_compile = ["bagnet9"], True
        args.budget_s = min(args.budget_s, 240.0)
    args.main_model = args.models[-1] if args.dry_run else "bagnet33"
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --dry-run for a CPU smoke test)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget_s)

    previous = load_previous(args.out) if (args.phase != "all" or args.rerun_failed) else None
    done = failed_rows(previous) if args.rerun_failed else set()
    result = previous or {"dry_run": args.dry_run, "image": args.image, "rows": [], "profiles": [], "checks": [],
                          "skipped": 0, "limits": {}, "environment": environment(device)}
    result.setdefault("checks", [])
    result.setdefault("commands", []).append(" ".join(sys.argv))
    if args.rerun_failed:  # the reruns replace the failed entries
        for key in ("rows", "profiles"):
            result[key] = [e for e in result[key] if (e["model"], e["batch"], e["impl"]) in done]
        result["checks"] = [c for c in result["checks"] if "error" not in c]
    print(json.dumps({k: v for k, v in result["environment"].items() if k != "backends"}, default=str), flush=True)
    if not result["limits"].get("peaks") and args.phase in ("all", "baselines", "triton", "cuda"):
        try:  # the roofline of the unit profiles; 0.5 s per candidate on a GPU, 0.05 s in a dry run
            result["limits"] = device_limits(device, 0.05 if args.dry_run else 0.5)
        except Exception as error:  # noqa: BLE001 - reported, never fatal
            result["limits"] = {"error": repr(error)}
        print("limits:", result["limits"], flush=True)
    write_results(result, args.out)

    order = max((r.get("order", 0) for r in result["rows"] + result["profiles"]), default=-1) + 1
    for entry in work_list(args, device):
        name, batch, impl = entry["model"], entry["batch"], entry["impl"]
        if (name, batch, impl) in done or (args.only and args.only not in impl):
            continue
        record = {"phase": entry["phase"], "model": name, "batch": batch, "impl": impl, "order": order}
        order += 1
        if entry.get("check"):
            if budget.left() < 10:
                result["checks"].append({"name": entry["check"], "impl": impl, "batch": batch, "model": name,
                                         "passed": None, "error": "skipped: time budget spent"})
                continue
            result["checks"].append(run_check(entry, args, device))
            print(f"{impl:45s} passed={result['checks'][-1].get('passed')}", flush=True)
            write_results(result, args.out)
            continue
        target = result["profiles"] if entry.get("profile") else result["rows"]
        if entry.get("unavailable"):
            record["note"] = f"skipped: {entry['unavailable']}"
            target.append(record)
        elif budget.left() < (60 if entry.get("compile") else 20 if entry.get("profile") else 5):
            record["note"] = "skipped: time budget spent"
            result["skipped"] += 1
            target.append(record)
        elif entry.get("profile"):
            run_profile(record, name, batch, entry, args, device, result)
        else:
            run_row(entry, record, args, device, budget, result)
            target.append(record)
            print(f"{name:9s} b{batch:<4d} {impl:45s} "
                  + (f"{record['img_per_s']:9.1f} img/s  first {record['first_call_s']:.2f} s"
                     f"  ran {record.get('backend_ran', '-')}  err {record.get('rel_err_vs_torch', '-')}"
                     if record.get("img_per_s") else record.get("note", "")), flush=True)
        write_results(result, args.out)
    write_results(result, args.out)
    print(markdown(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
