"""``python -m bagnet_fast bench``: images/s of the reference BagNet, the fast one and ResNet-50.

Each implementation runs in the same process on the same inputs: warm-up calls first (they
build the plan, JIT caches, oneDNN primitives), then ``repeats`` timed calls, device
synchronised inside the timing. Reports the median time per batch, the achieved rate from the
counted FLOPs and bytes (:mod:`bagnet_fast.flops`) and its fraction of the device's limits,
measured on the spot (a large matmul, a large copy), so that a number from one machine can be
read on another. Writes ``bench.json`` and, when matplotlib is installed, ``bench.png``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Dict, List, Optional

import torch

from . import flops as _flops
from . import models as _models
from ._io import check_new_outputs, matplotlib_figure, prepare_output_dir, save_png, write_json
from .executors import backends, select
from .plan import get_plan
from .timing import DTYPES, cpu_name, device_name, measure, measure_peaks, resolve_device

__all__ = ["run_bench", "add_arguments", "main"]

# Brendel & Bethge (2019), on their 2018 GPU: BagNet-33 155 img/s vs ResNet-50 570 img/s. It is
# the FLOP ratio (8.2 / 32.5 GFLOP = 0.25) at equal efficiency; the bench measures both here.
PAPER_IMAGES_PER_SECOND = {"bagnet33": 155.0, "resnet50": 570.0}
PEER_PAUSE_S = 1.0  # after each peer row (see _peer_implementations)

def _implementations(args, device, dtype) -> Dict[str, dict]:
    """name -> {"fn": images -> output, "costs": counted per-batch (FLOPs, bytes)}; the fast rows
    have "plan_costs" instead, a function giving "costs" and "backend" once the plan is built."""
    shape = (args.batch, 3, args.size, args.size)
    torch.manual_seed(0)
    model = getattr(_models, args.model)().to(device=device, dtype=dtype).eval()
    channels_last = getattr(_models, args.model)().to(device=device, dtype=dtype).eval()
    channels_last.load_state_dict(model.state_dict())
    channels_last = channels_last.to(memory_format=torch.channels_last)
    reference_cost = _flops.total(_flops.reference_layer_costs(model, shape, dtype))
    impls: Dict[str, dict] = {
        "reference eager NCHW": {"fn": model.reference_forward, "costs": reference_cost},
        "reference eager channels-last": {
            "fn": lambda x: channels_last.reference_forward(x.contiguous(memory_format=torch.channels_last)),
            "costs": reference_cost,
        },
    }
    # The peers before the fast rows: the cpu backend's first plan sets the process's allocator
    # (executors/cpu_memory.py), and OpenVINO beside that setting ran BagNet-33 at batch 8 at
    # 4.53 instead of 5.92 img/s (benchmarks/results/2026-12-02-s5-cpu-avx2-2core-peers/); the
    # rows before it run as each would alone. benchmarks/peers_speed.py runs each in its own process.
    if getattr(args, "peers", False):
        impls.update(_peer_implementations(model, shape, device, dtype, reference_cost))
    for backend in _fast_backends(args, device, dtype):
        fast = getattr(_models, args.model)().to(device=device, dtype=dtype).eval()
        fast.load_state_dict(model.state_dict())
        fast.backend = backend
        name = "bagnet_fast" if backend is None else f"bagnet_fast [{backend} backend]"
        # Costs and backend come from the plan, which the first call builds (and is timed doing).
        impls[name] = {"fn": fast, "plan_costs": lambda fast=fast: _fast_costs(fast, shape, dtype)}
    if args.compile:
        impls["reference torch.compile"] = {"fn": torch.compile(model.reference_forward), "costs": reference_cost}
    if args.resnet:
        impls.update(_resnet_implementations(shape, device, dtype))
    return impls


def _peer_implementations(model, shape, device, dtype, costs) -> Dict[str, dict]:
    """ONNX Runtime and OpenVINO on the reference graph (bagnet_fast.peers), on CPUs: in a float32
    bench all of them, in a bfloat16 bench OpenVINO bf16 (the float32 graph compiled with its
    bf16 inference hint, as an OpenVINO user runs bf16; it takes the bf16 images as float32)."""
    from . import peers

    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        print("--peers: the peers run on CPUs in float32 or bfloat16 only; no peer rows")
        return {}
    precision = str(dtype).replace("torch.", "")
    impls = {}
    for row in peers.peer_implementations(model, shape, only_precision=precision):
        if row["fn"] is None:
            print(f"--peers: {row['name']}: {row['note']}")
            continue
        fn = row["fn"] if dtype == torch.float32 else (lambda x, fn=row["fn"]: fn(x).to(dtype))
        # pause_s: OpenVINO's and ONNX Runtime's idle worker threads spin for several hundred ms
        # after a call and slowed the next row's first calls to a third of their speed.
        impls[row["name"]] = {"fn": fn, "costs": costs, "precision": row["precision"], "pause_s": PEER_PAUSE_S,
                              "setup_seconds": row["setup_seconds"], "note": row["note"]}
    return impls


def _fast_backends(args, device, dtype) -> List[Optional[str]]:
    """None (the automatic choice) and, with --all-backends, every other backend that can run
    here for real (the Triton interpreter is a test tool, not a benchmark)."""
    names: List[Optional[str]] = [None]
    if args.all_backends:
        automatic = select(None, device, dtype).name  # already the "bagnet_fast" row
        for name, entry in backends(device, dtype).items():
            if entry["available"] and name != automatic and not (name == "triton" and device.type == "cpu"):
                names.append(name)
    return names


def _fast_costs(model, shape, dtype) -> dict:
    plan = get_plan(model)
    return {"backend": plan.backend.name, "costs": _flops.total(_flops.plan_unit_costs(plan, shape, dtype))}


def _resnet_implementations(shape, device, dtype) -> Dict[str, dict]:
    try:
        import torchvision
    except ImportError:
        print("torchvision is not installed: no ResNet-50 rows")
        return {}
    resnet = torchvision.models.resnet50().to(device=device, dtype=dtype).eval()
    resnet_cl = torchvision.models.resnet50().to(device=device, dtype=dtype).eval()
    resnet_cl = resnet_cl.to(memory_format=torch.channels_last)
    costs = _flops.total(_flops.reference_layer_costs(resnet, shape, dtype))
    return {
        # Another network: its outputs are not compared with the BagNet reference's.
        "torchvision resnet50 eager NCHW": {"fn": resnet, "costs": costs, "other_network": True},
        "torchvision resnet50 eager channels-last": {
            "fn": lambda x: resnet_cl(x.contiguous(memory_format=torch.channels_last)), "costs": costs,
            "other_network": True},
    }


def _row(name, impl, times, batch, peaks) -> dict:
    seconds = statistics.median(times)
    flop, moved = impl["costs"]
    row = {
        "implementation": name,
        "seconds_per_batch": seconds,
        "images_per_second": batch / seconds,
        "times": times,
        "flops_per_image": flop / batch,
        "bytes_per_image": moved / batch,
        "tflops_per_s": flop / seconds / 1e12,
        "gbytes_per_s": moved / seconds / 1e9,
        "percent_of_matmul_peak": 100 * flop / seconds / peaks["matmul_flops_per_s"],
        "percent_of_copy_bandwidth": 100 * moved / seconds / peaks["copy_bytes_per_s"],
    }
    if "backend" in impl:
        row["backend"] = impl["backend"]
    return row


def _ratios(rows: List[dict], model: str) -> Dict[str, float]:
    """The comparisons that matter, from the measured rows (absent rows: absent ratios)."""
    rate = {r["implementation"]: r["images_per_second"] for r in rows}
    flop = {r["implementation"]: r["flops_per_image"] for r in rows}
    pairs = {
        "fast / reference eager NCHW": ("bagnet_fast", "reference eager NCHW"),
        "fast / reference eager channels-last": ("bagnet_fast", "reference eager channels-last"),
        "fast / reference torch.compile": ("bagnet_fast", "reference torch.compile"),
        f"{model} reference NCHW / resnet50 NCHW (paper, bagnet33: 155/570 = 0.27)": (
            "reference eager NCHW", "torchvision resnet50 eager NCHW"),
        f"{model} fast / resnet50 channels-last": ("bagnet_fast", "torchvision resnet50 eager channels-last"),
        "fast / onnxruntime": ("bagnet_fast", "onnxruntime (reference graph)"),
        "fast / openvino fp32": ("bagnet_fast", "openvino fp32 (reference graph)"),
        "fast / openvino bf16": ("bagnet_fast", "openvino bf16 (reference graph)"),
    }
    ratios = {label: rate[a] / rate[b] for label, (a, b) in pairs.items() if a in rate and b in rate}
    resnet = "torchvision resnet50 eager NCHW"
    if resnet in flop:
        # What the img/s ratio would be if both networks ran at the same FLOP rate.
        ratios[f"FLOP ratio resnet50 / {model} reference"] = flop[resnet] / flop["reference eager NCHW"]
    return ratios


def _final_peaks(before: dict, after: dict, rows: List[dict]) -> dict:
    """The GEMM peak of the percentages: the best of the candidate GEMMs measured before and after
    the rows (the machine is noisy; a peak measured while it was busy made rows read > 100 %).
    Should a row still beat it, the peak becomes that row's own FLOP rate, so no row reads more
    than 100 %, and ``peaks["exceeded_by"]`` names the rows that did. Percentages are recomputed."""
    peaks = dict(before)
    candidates = {name: max(rate, after["matmul_candidates"].get(name, 0.0))
                  for name, rate in before["matmul_candidates"].items()}
    source = max(candidates, key=candidates.get)
    peaks.update(matmul_candidates=candidates, matmul_source=source, matmul_flops_per_s=candidates[source],
                 copy_bytes_per_s=max(before["copy_bytes_per_s"], after["copy_bytes_per_s"]))
    above = [r for r in rows if r["tflops_per_s"] * 1e12 > peaks["matmul_flops_per_s"]]
    if above:
        fastest = max(above, key=lambda r: r["tflops_per_s"])
        peaks.update(matmul_flops_per_s=fastest["tflops_per_s"] * 1e12,
                     matmul_source=f"{fastest['implementation']} (faster than every candidate GEMM)",
                     exceeded_by=[r["implementation"] for r in above])
    for r in rows:
        r["percent_of_matmul_peak"] = 100 * r["tflops_per_s"] * 1e12 / peaks["matmul_flops_per_s"]
        r["percent_of_copy_bandwidth"] = 100 * r["gbytes_per_s"] * 1e9 / peaks["copy_bytes_per_s"]
    return peaks


def run_bench(args) -> dict:
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype]
    peaks = measure_peaks(device, dtype)
    print(f"  device limits: best GEMM {peaks['matmul_flops_per_s'] / 1e12:.3f} TFLOP/s ({args.dtype}, "
          f"{peaks['matmul_source']}), copy {peaks['copy_bytes_per_s'] / 1e9:.1f} GB/s", flush=True)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device).to(dtype)
    rows = []
    impls = _implementations(args, device, dtype)  # outside inference_mode: normal parameters
    with torch.inference_mode():
        expected = impls["reference eager NCHW"]["fn"](x).float()
        for name, impl in impls.items():
            fn = impl["fn"]
            # The first call builds the plan / compiles: users wait for it once, so report it.
            first = measure(lambda: fn(x), device, 0, 1)[0] if args.warmup > 0 else None
            times = measure(lambda: fn(x), device, max(args.warmup - 1, 0), args.repeats)
            if "plan_costs" in impl:
                impl.update(impl["plan_costs"]())
            rows.append(_row(name, impl, times, args.batch, peaks))
            rows[-1]["first_call_seconds"] = first
            # Every BagNet row checks itself against the reference on the same input.
            if not impl.get("other_network"):
                diff = (fn(x).float() - expected).abs().max().item()
                rows[-1]["max_abs_diff_vs_reference"] = diff
                # Relative to the largest reference logit: comparable across weights and dtypes.
                rows[-1]["max_rel_diff_vs_reference"] = diff / max(expected.abs().max().item(), 1e-30)
            for key in ("precision", "setup_seconds", "note"):
                if key in impl:
                    rows[-1][key] = impl[key]
            time.sleep(impl.get("pause_s", 0.0))
            r = rows[-1]
            print(f"  {name:45s} {r['images_per_second']:9.2f} img/s {r['tflops_per_s']:8.3f} TFLOP/s "
                  f"({r['percent_of_matmul_peak']:5.1f} % of GEMM peak) {r['gbytes_per_s']:7.1f} GB/s", flush=True)
    peaks = _final_peaks(peaks, measure_peaks(device, dtype), rows)
    return {
        "model": args.model, "batch": args.batch, "size": args.size, "device": str(device),
        "device_name": device_name(device), "dtype": args.dtype, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "cpu": cpu_name(), "date": time.strftime("%Y-%m-%d"),
        "peaks": peaks, "rows": rows, "ratios": _ratios(rows, args.model),
        "paper_images_per_second": PAPER_IMAGES_PER_SECOND,
    }


def plot_bench(result: dict, path: str) -> bool:
    rows = result["rows"]
    figure = matplotlib_figure((8, 0.5 * len(rows) + 1.5))
    if figure is None:
        return False
    ax = figure.add_subplot()
    names = [r["implementation"] for r in rows]
    rates = [r["images_per_second"] for r in rows]
    bars = ax.barh(names[::-1], rates[::-1], color=["C1" if n.startswith("bagnet_fast") else "C0" for n in names[::-1]])
    ax.bar_label(bars, labels=[f"{v:.1f}" for v in rates[::-1]], padding=3)
    ax.margins(x=0.12)  # room for the value labels
    ax.set_xlabel("images / s")
    ax.set_title(f"{result['model']}, batch {result['batch']}, {result['size']}x{result['size']}, "
                 f"{result['dtype']}, {result['device_name']}", fontsize=9)
    save_png(figure, path)
    return True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="bagnet33", choices=sorted(_models.PATCH_SIZES))
    # Batch 2 at 224 keeps every row in about a minute on a 2-core CPU; on a GPU use e.g. 64.
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="add torch.compile of the reference (slow first call)")
    parser.add_argument("--all-backends", action="store_true",
                        help="one bagnet_fast row per backend that can run here (default: the automatic choice)")
    parser.add_argument("--no-resnet", dest="resnet", action="store_false", help="skip torchvision ResNet-50")
    parser.add_argument("--peers", action="store_true",
                        help="add ONNX Runtime and OpenVINO on the reference graph (CPU; pip install bagnet_fast[peers])")
    parser.add_argument("--out", default="bench-out", help="folder for bench.json and bench.png")
    parser.add_argument("--overwrite", action="store_true", help="replace bench.json/bench.png in --out")


def check_run_arguments(args) -> None:
    """The checks shared by ``bench`` and ``profile``: exit with a message naming the option."""
    if args.batch < 1 or args.repeats < 1 or args.warmup < 0:
        raise SystemExit("--batch and --repeats must be >= 1, --warmup >= 0")
    if args.size < _models.PATCH_SIZES[args.model]:
        raise SystemExit(f"--size must be >= {_models.PATCH_SIZES[args.model]} for {args.model}")


def main(args) -> int:
    check_run_arguments(args)
    resolve_device(args.device)
    # Every check that can fail comes before the benchmark, not after it.
    prepare_output_dir(args.out)
    json_path, png_path = os.path.join(args.out, "bench.json"), os.path.join(args.out, "bench.png")
    check_new_outputs([json_path, png_path], args.overwrite)
    print(f"bench: {args.model}, batch {args.batch}, {args.size}x{args.size}, {args.device}, "
          f"{args.dtype}, {torch.get_num_threads()} threads")
    result = run_bench(args)
    for name, value in result["ratios"].items():
        print(f"  {name:45s} {value:8.2f}x")
    write_json(json_path, result)
    print(f"wrote {json_path}")
    if plot_bench(result, png_path):
        print(f"wrote {png_path}")
    return 0
