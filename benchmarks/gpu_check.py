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
import datetime
import json
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


def device_limits(device: torch.device) -> dict:
    """bf16 GEMM TFLOP/s and copy GB/s (read + write), measured by the same code as
    ``python -m bagnet_fast bench`` (bagnet_fast.timing: the best GEMM up to 8192³, 1 GiB copies)."""
    peaks = _timing.measure_peaks(device, torch.bfloat16)
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


def implementations(name: str, batch: int, args, device: torch.device) -> List[dict]:
    """Every row of one (model, batch), most important first. Each row: impl name and a
    ``setup`` returning the function to time (built lazily so a skipped row costs nothing)."""
    size = args.image
    rows: List[dict] = []

    def images(dtype, channels_last=False):
        x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    if name == "resnet50":
        import torchvision

        def resnet(dtype, channels_last):
            def setup():
                model = torchvision.models.resnet50(weights=None).eval().to(device=device, dtype=dtype)
                if channels_last:
                    model = model.to(memory_format=torch.channels_last)
                x = images(dtype, channels_last)
                return lambda: model(x)

            return setup

        rows.append({"impl": "eager bf16 channels-last", "setup": resnet(torch.bfloat16, True)})
        rows.append({"impl": "eager fp32", "setup": resnet(torch.float32, False)})
        return rows

    def fast(dtype, backend):
        def setup():
            model = make_bagnet(name, device, dtype)
            model.backend = backend
            x = images(dtype)
            return lambda: model(x)

        return setup

    def graph(dtype):
        def setup():
            model = make_bagnet(name, device, dtype)
            x = images(dtype)
            runner = bagnet_fast.cuda_graph(model, x)
            return lambda: runner(x)

        return setup

    def reference(dtype, channels_last, compiled=False):
        def setup():
            model = make_bagnet(name, device, dtype, channels_last)
            x = images(dtype, channels_last)
            forward = torch.compile(model.reference_forward) if compiled else model.reference_forward
            return lambda: forward(x)

        return setup

    def backends_for(dtype):
        return [b for b, entry in bagnet_fast.backends(device, dtype).items() if entry["available"]]

    bf16 = torch.bfloat16
    for backend in backends_for(bf16):
        rows.append({"impl": f"{FAST} bf16 [{backend}]", "setup": fast(bf16, backend), "backend": backend})
    rows.append({"impl": "reference eager fp32 NCHW", "setup": reference(torch.float32, False)})
    rows.append({"impl": "reference eager bf16 channels-last", "setup": reference(bf16, True)})
    if not args.no_compile and (name == "bagnet33" or args.compile_all):
        rows.append({"impl": "reference torch.compile bf16 channels-last", "setup": reference(bf16, True, True),
                     "compile": True})
    if hasattr(bagnet_fast, "cuda_graph") and device.type == "cuda":
        rows.append({"impl": f"{FAST} bf16 cuda_graph [auto]", "setup": graph(bf16)})
    for backend in backends_for(torch.float32):
        rows.append({"impl": f"{FAST} fp32 [{backend}]", "setup": fast(torch.float32, backend), "backend": backend})
    if name == "bagnet33":
        for backend in [b for b in backends_for(bf16) if b != "torch"] or ["torch"]:
            rows.append({"impl": f"{PROFILE} bf16 [{backend}]", "profile": backend, "dtype": bf16})
        rows.append({"impl": "stem implementations bf16", "profile": "stem", "dtype": bf16})
    return rows


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
    return [{"name": "end to end", "seconds": result["seconds_end_to_end"]}] + units


GOAL_ROWS = (
    ("bagnet33", f"{FAST} bf16 [triton]"),
    ("bagnet33", f"{FAST} bf16 [cuda]"),
    ("resnet50", "eager bf16 channels-last"),
    ("bagnet33", "reference eager fp32 NCHW"),
    ("bagnet33", "reference eager bf16 channels-last"),
    ("bagnet33", "reference torch.compile bf16 channels-last"),
    ("bagnet33", f"{FAST} bf16 cuda_graph [auto]"),
)


def work_list(args, device: torch.device) -> List[tuple]:
    """(model, batch, row) in measuring order: the rows of the goal ratios at the goal batch
    first, then everything else at the goal batch, the unit profiles, then the smaller batches
    (largest first)."""
    batches = sorted(args.batches, reverse=True)
    goal = GOAL_BATCH if GOAL_BATCH in batches else batches[0]
    items = []
    for batch in batches:
        for name in ("bagnet33", "resnet50", *[m for m in args.models if m != "bagnet33"]):
            if name != "resnet50" and name not in args.models:
                continue
            for row in implementations(name, batch, args, device):
                if batch == goal and (name, row["impl"]) in GOAL_ROWS:
                    rank = GOAL_ROWS.index((name, row["impl"]))
                elif row.get("profile"):
                    if batch != goal:
                        continue
                    rank = len(GOAL_ROWS) + 0.5
                else:
                    rank = len(GOAL_ROWS) + (0 if batch == goal else 1 + batches.index(batch))
                items.append((rank, len(items), name, batch, row))
    return [(name, batch, row) for _, _, name, batch, row in sorted(items, key=lambda item: item[:2])]


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
        "| model | batch | implementation | img/s | ms/batch | first call s | TFLOP/s | note |",
        "|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for row in sorted(result["rows"], key=lambda r: (r["model"], r["batch"], r["order"])):
        ips = row.get("img_per_s")
        lines.append(
            f"| {row['model']} | {row['batch']} | {row['impl']} | "
            + (f"{ips:.1f} | {row['median_s'] * 1e3:.2f} | {row['first_call_s']:.2f} | " if ips else "– | – | – | ")
            + (f"{row['tflops']:.1f}" if row.get("tflops") else "–")
            + f" | {row.get('note', '')} |"
        )
    lines += ["", f"## Goals (BagNet-33 at batch {result['goals'].get('batch')}, fast = {result['goals'].get('fast_bagnet33_bf16')})", ""]
    for name, goal in result["goals"].items():
        if isinstance(goal, dict):
            value = goal["ratio"]
            shown = "not measured" if value is None else (f"{value:.1%}" if "fraction" in name else f"{value:.2f}×")
            verdict = "" if goal["met"] is None else (" ✅ met" if goal["met"] else " ❌ not met")
            lines.append(f"- {name}: {shown} (goal ≥ {goal['goal']}){verdict}")
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
    lines += ["| unit | kind | ms | TFLOP/s | GB/s | % of roofline | bound |", "|---|---|---:|---:|---:|---:|---|"]
    for unit in profile["units"]:
        if "kind" not in unit:  # the end-to-end time without the timer's synchronisations
            lines.append(f"| **{unit['name']}** | | {unit['seconds'] * 1e3:.2f} | | | | |")
            continue
        lines.append(f"| {unit['name']} | {unit['kind']} | {unit['seconds'] * 1e3:.2f} | {unit['tflops_per_s']:.1f} | "
                     f"{unit['gbytes_per_s']:.0f} | {unit['percent_of_roofline']:.0f} | {unit['bound']} |")
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


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="results folder (created)")
    parser.add_argument("--budget-s", type=float, default=300.0, help="start no measurement after this many seconds")
    parser.add_argument("--batches", default="1,32,256", help="comma-separated batch sizes")
    parser.add_argument("--models", default="bagnet9,bagnet17,bagnet33")
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--target-s", type=float, default=0.5, help="timed seconds per row (after warm-up)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile rows")
    parser.add_argument("--compile-all", action="store_true", help="torch.compile BagNet-9/17 too")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: a smoke test of this script")
    args = parser.parse_args(argv)
    args.min_repeats = 3
    args.batches = [int(b) for b in args.batches.split(",")]
    args.models = args.models.split(",")
    if args.dry_run:
        args.batches, args.image, args.target_s, args.no_compile, args.min_repeats = [2], 40, 0.0, True, 1
        args.budget_s = min(args.budget_s, 240.0)
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --dry-run for a CPU smoke test)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget_s)

    result = {"dry_run": args.dry_run, "image": args.image, "rows": [], "profiles": [], "skipped": 0, "limits": {},
              "environment": environment(device), "command": " ".join(sys.argv)}
    print(json.dumps({k: v for k, v in result["environment"].items() if k != "backends"}, default=str), flush=True)
    try:
        result["limits"] = device_limits(device)
    except Exception as error:  # noqa: BLE001 - reported, never fatal
        result["limits"] = {"error": repr(error)}
    print("limits:", result["limits"], flush=True)
    write_results(result, args.out)

    for order, (name, batch, row) in enumerate(work_list(args, device)):
        record = {"model": name, "batch": batch, "impl": row["impl"], "order": order}
        if budget.left() < (60 if row.get("compile") else 20 if row.get("profile") else 5):
            record["note"] = "skipped: time budget spent"
            result["skipped"] += 1
            (result["profiles"] if row.get("profile") else result["rows"]).append(record)
            continue
        if row.get("profile"):
            run_profile(record, name, batch, row, args, device, result)
            write_results(result, args.out)
            continue
        fn = None
        try:
            fn = row["setup"]()
            record.update(benchmark(fn, device, budget, args.target_s, args.min_repeats))
            record["img_per_s"] = batch / record["median_s"]
            gflop = GFLOP_PER_IMAGE_224.get(name)
            if gflop and args.image == 224:
                record["tflops"] = record["img_per_s"] * gflop / 1e3
        except Exception as error:  # noqa: BLE001 - one row's failure never stops the others
            record["note"] = "OOM" if is_oom(error) else f"error: {type(error).__name__}: {str(error)[:200]}"
            if not is_oom(error):
                traceback.print_exc()
        finally:
            del fn
            if device.type == "cuda":
                torch.cuda.empty_cache()
        result["rows"].append(record)
        print(f"{name:9s} b{batch:<4d} {row['impl']:45s} "
              + (f"{record['img_per_s']:9.1f} img/s  first {record['first_call_s']:.2f} s"
                 if record.get("img_per_s") else record.get("note", "")), flush=True)
        write_results(result, args.out)
    write_results(result, args.out)
    print(markdown(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
