"""``python -m bagnet_fast profile``: where the time goes, against the device's limits.

For the reference BagNet (every leaf module: each conv, BatchNorm, ReLU, ...), the fast plan
(each unit: stem, every block — one fused ``pointwise_bottleneck`` or its convolutions — and
the head) and torchvision's ResNet-50 (every leaf module), one row per layer/unit with its time,
counted FLOPs and bytes (:mod:`bagnet_fast.flops`), arithmetic intensity, achieved rate and its
position under the roofline min(matmul peak, copy bandwidth x intensity) measured on the spot.

Per-stage totals of the reference BagNet and ResNet-50 (FLOPs, time, output size) test the
paper's remark that BagNets are slower "because of the reduced amount of downsampling".

Outputs (in --out): ``layers.csv``, ``profile.json``, ``roofline.png`` (needs matplotlib) and
``trace.json``, a torch.profiler Chrome trace (chrome://tracing or https://ui.perfetto.dev)
with one labelled range per layer/unit. On CUDA the same ranges are NVTX ranges, for Nsight
Systems (``nsys profile python -m bagnet_fast profile --device cuda``).

Each layer is timed by itself, the device synchronised before and after it: on a GPU this
removes the overlap of consecutive launches, so the per-layer sum exceeds the end-to-end time
(both are reported).
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import statistics
import time
from collections import defaultdict
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from . import bench as _bench
from . import flops as _flops
from . import timing as _timing
from ._io import check_new_outputs, matplotlib_figure, prepare_output_dir, save_png, write_atomically, write_json
from . import models as _models
from .executors import backend_names
from .plan import build_plan

__all__ = ["LayerTimer", "UnitTimer", "profile_network", "stage_comparison", "add_arguments", "main"]

CSV_COLUMNS = [
    "network", "name", "stage", "kind", "input_shape", "output_shape", "flops", "bytes", "intensity",
    "seconds", "tflops_per_s", "gbytes_per_s", "roofline_tflops_per_s", "percent_of_roofline", "bound",
]


class _Ranges:
    """Labelled ranges for torch.profiler (record_function) and, on CUDA, NVTX; each range is
    timed with the device synchronised at both ends."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: Dict[str, List[float]] = defaultdict(list)
        self.active = False  # ranges are recorded only inside ``with timer:``
        self._open: List[tuple] = []

    def __enter__(self):
        self.active = True
        self.new_pass()
        return self

    def __exit__(self, *exc) -> None:
        self.active = False

    def new_pass(self) -> None:
        """Called at the start of each forward pass (labels restart)."""

    def push(self, label: str) -> None:
        _timing.sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.nvtx.range_push(label)
        record = torch.profiler.record_function(label)
        record.__enter__()
        self._open.append((label, record, time.perf_counter()))

    def pop(self) -> None:
        _timing.sync(self.device)
        label, record, start = self._open.pop()
        self.seconds[label].append(time.perf_counter() - start)
        record.__exit__(None, None, None)
        if self.device.type == "cuda":
            torch.cuda.nvtx.range_pop()

    def median(self, label: str) -> float:
        return statistics.median(self.seconds[label])


class LayerTimer(_Ranges):
    """Forward pre/post hooks on every leaf module of ``model``: one range per call, labelled as
    in :func:`bagnet_fast.flops.reference_layer_costs` (``layer1.0.relu``, ``layer1.0.relu[2]``)."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        super().__init__(device)
        self.model = model
        self._calls: Dict[str, int] = {}
        self._handles: list = []

    def __enter__(self) -> "LayerTimer":
        for name, module in self.model.named_modules():
            if name and not list(module.children()):
                self._handles.append(module.register_forward_pre_hook(self._pre(name)))
                self._handles.append(module.register_forward_hook(lambda *_: self.pop()))
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        super().__exit__(*exc)

    def new_pass(self) -> None:
        self._calls.clear()

    def _pre(self, name: str) -> Callable:
        def hook(module, inputs):
            self._calls[name] = self._calls.get(name, 0) + 1
            self.push(name if self._calls[name] == 1 else f"{name}[{self._calls[name]}]")

        return hook


class UnitTimer(_Ranges):
    """The units of an inference plan timed through the plan's own walk hook: one range per
    unit, named as in :func:`bagnet_fast.flops.plan_unit_costs` (``stem``, ``layer1.0``, ...,
    ``head``). ``timer.forward`` runs the plan with the hook; with a hook the plan runs every
    unit on its own (the last block and the head's mean are not fused), as the FLOP rows count them."""

    def __init__(self, plan, device: torch.device) -> None:
        super().__init__(device)
        self.plan = plan

    def hook(self, unit, run, x):
        if not self.active:
            return run(x)
        self.push(unit.name)
        try:
            return run(x)
        finally:
            self.pop()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.plan.run(x, hook=self.hook)


def _roofline(flops: int, moved: int, seconds: float, peaks: dict) -> dict:
    """Achieved rates and the roofline bound min(peak, bandwidth x intensity) of one row."""
    intensity = flops / moved if moved else 0.0
    memory_roof = peaks["copy_bytes_per_s"] * intensity
    roof = min(peaks["matmul_flops_per_s"], memory_roof)
    seconds = max(seconds, 1e-9)  # a clock tick coarser than the layer must not divide by zero
    achieved, bandwidth = flops / seconds, moved / seconds
    return {
        "tflops_per_s": achieved / 1e12,
        "gbytes_per_s": bandwidth / 1e9,
        "roofline_tflops_per_s": roof / 1e12,
        # Rows without FLOPs (BatchNorm, ReLU, pooling) are judged against the bandwidth alone.
        "percent_of_roofline": 100 * (achieved / roof if flops else bandwidth / peaks["copy_bytes_per_s"]),
        "bound": "memory" if memory_roof < peaks["matmul_flops_per_s"] else "compute",
    }


def profile_network(network: str, forward: Callable, timer: _Ranges, costs: List[_flops.Cost],
                    x: torch.Tensor, warmup: int, repeats: int, peaks: dict,
                    timed_forward: Optional[Callable] = None) -> dict:
    """Per-layer medians over ``repeats`` timed passes (``timed_forward``, default ``forward``,
    inside the timer), and the end-to-end time of ``forward`` without the timer."""
    device = x.device
    end_to_end = statistics.median(_timing.measure(lambda: forward(x), device, warmup, repeats))
    timed_forward = timed_forward or forward
    for _ in range(repeats):
        with timer:
            timed_forward(x)
    rows = []
    for cost in costs:
        if cost.name not in timer.seconds:
            raise RuntimeError(f"{network}: {cost.name} was counted but never ran; the FLOP table and "
                               "the timed forward disagree")
        seconds = timer.median(cost.name)
        row = {"network": network, **cost.as_dict(), "seconds": seconds}
        row.update(_roofline(cost.flops, cost.bytes, seconds, peaks))
        rows.append(row)
    return {"rows": rows, "seconds_end_to_end": end_to_end}


def stage_table(rows: List[dict]) -> Dict[str, dict]:
    """Per stage: FLOPs, bytes, seconds (sum of its layers) and the output size (H, W)."""
    stages: Dict[str, dict] = {}
    for row in rows:
        entry = stages.setdefault(row["stage"], {"flops": 0, "bytes": 0, "seconds": 0.0, "output_hw": None})
        entry["flops"] += row["flops"]
        entry["bytes"] += row["bytes"]
        entry["seconds"] += row["seconds"]
        if len(row["output_shape"]) == 4:
            entry["output_hw"] = list(row["output_shape"][-2:])
    return stages


def stage_comparison(bagnet: Dict[str, dict], resnet: Dict[str, dict], model: str) -> dict:
    """BagNet vs ResNet-50 per stage, and sentences that state what the numbers show."""
    table = {}
    for stage in ("stem", "layer1", "layer2", "layer3", "layer4", "head"):
        b, r = bagnet.get(stage), resnet.get(stage)
        if b is None or r is None:
            continue
        table[stage] = {
            f"{model}_output_hw": b["output_hw"], "resnet50_output_hw": r["output_hw"],
            "positions_ratio": _positions(b) / _positions(r) if _positions(r) else None,
            "flops_ratio": b["flops"] / r["flops"] if r["flops"] else None,
            "seconds_ratio": b["seconds"] / r["seconds"] if r["seconds"] else None,
        }
    flops_b, flops_r = sum(s["flops"] for s in bagnet.values()), sum(s["flops"] for s in resnet.values())
    time_b, time_r = sum(s["seconds"] for s in bagnet.values()), sum(s["seconds"] for s in resnet.values())
    findings = [
        f"{model} needs {flops_b / flops_r:.2f}x the FLOPs of ResNet-50 and {time_b / time_r:.2f}x its time "
        f"(layer sums); achieved {flops_b / time_b / 1e12:.3f} vs {flops_r / time_r / 1e12:.3f} TFLOP/s.",
        f"The extra FLOPs explain a {flops_b / flops_r:.2f}x slowdown; the remaining "
        f"{(time_b / time_r) / (flops_b / flops_r):.2f}x is the difference in FLOP rate.",
    ]
    for stage, entry in table.items():
        if stage == "head" or entry["positions_ratio"] is None:
            continue
        findings.append(
            f"{stage}: {model} at {_hw(entry[f'{model}_output_hw'])} vs ResNet-50 at "
            f"{_hw(entry['resnet50_output_hw'])} ({entry['positions_ratio']:.1f}x the positions): "
            f"{entry['flops_ratio']:.1f}x the FLOPs, {entry['seconds_ratio']:.1f}x the time."
        )
    return {"stages": table, "flops_ratio": flops_b / flops_r, "seconds_ratio": time_b / time_r, "findings": findings}


def _positions(stage: dict) -> int:
    hw = stage["output_hw"]
    return hw[0] * hw[1] if hw else 0


def _hw(hw) -> str:
    return f"{hw[0]}x{hw[1]}" if hw else "?"


def write_csv(path: str, rows: List[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("x".join(map(str, v)) if isinstance(v, (tuple, list)) else v) for k, v in row.items()})

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            f.write(buffer.getvalue())

    write_atomically(path, write)


def plot_roofline(rows: List[dict], peaks: dict, title: str, path: str) -> bool:
    """Log-log roofline: achieved TFLOP/s against intensity, one colour per network; rows
    without FLOPs (BatchNorm, ReLU, pooling) cannot sit on it and are left out."""
    figure = matplotlib_figure((8, 5.5))
    if figure is None:
        return False
    ax = figure.add_subplot()
    points = [r for r in rows if r["flops"] > 0 and r["seconds"] > 0]
    intensities = [r["intensity"] for r in points] or [1.0]
    low, high = min(intensities) / 2, max(intensities) * 2
    peak, bandwidth = peaks["matmul_flops_per_s"] / 1e12, peaks["copy_bytes_per_s"] / 1e12
    ridge = peak / bandwidth
    xs = [low, min(max(ridge, low), high), high]
    ax.plot(xs, [min(peak, bandwidth * x) for x in xs], "k-", lw=1.5, label="roofline (measured best GEMM / copy)")
    for index, network in enumerate(dict.fromkeys(r["network"] for r in points)):
        mine = [r for r in points if r["network"] == network]
        ax.scatter([r["intensity"] for r in mine], [r["tflops_per_s"] for r in mine], s=18,
                   color=f"C{index}", label=network, alpha=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("achieved TFLOP/s")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    save_png(figure, path)
    return True


def _export_trace(path: str, runs: List[Callable[[], None]], device: torch.device) -> None:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        for run in runs:
            run()
    write_atomically(path, lambda tmp: prof.export_chrome_trace(tmp))


def _networks(args, device, dtype) -> List[dict]:
    """(name, forward, timer, costs) of each network profiled."""
    shape = (args.batch, 3, args.size, args.size)
    torch.manual_seed(0)
    model = getattr(_models, args.model)().to(device=device, dtype=dtype).eval()
    plan = build_plan(model, args.backend)
    units = UnitTimer(plan, device)
    networks = [
        {"name": f"{args.model} reference", "forward": model.reference_forward,
         "timer": LayerTimer(model, device), "costs": _flops.reference_layer_costs(model, shape, dtype)},
        {"name": f"{args.model} fast [{plan.backend.name}]", "forward": plan.run, "timed": units.forward,
         "timer": units, "costs": _flops.plan_unit_costs(plan, shape, dtype)},
    ]
    if args.resnet:
        try:
            import torchvision
        except ImportError:
            print("torchvision is not installed: no ResNet-50 comparison")
            return networks
        resnet = torchvision.models.resnet50().to(device=device, dtype=dtype).eval()
        networks.append({"name": "resnet50", "forward": resnet, "timer": LayerTimer(resnet, device),
                         "costs": _flops.reference_layer_costs(resnet, shape, dtype)})
    return networks


def run_profile(args, paths: Dict[str, str]) -> dict:
    device, dtype = _timing.resolve_device(args.device), _timing.DTYPES[args.dtype]
    peaks = _timing.measure_peaks(device, dtype)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device).to(dtype)
    rows, totals, stages = [], {}, {}
    networks = _networks(args, device, dtype)  # outside inference_mode: normal parameters
    with torch.inference_mode():
        for net in networks:
            result = profile_network(net["name"], net["forward"], net["timer"], net["costs"], x,
                                     args.warmup, args.repeats, peaks, net.get("timed"))
            rows += result["rows"]
            stages[net["name"]] = stage_table(result["rows"])
            flop, moved = _flops.total(net["costs"])
            totals[net["name"]] = {"flops": flop, "bytes": moved, "seconds_end_to_end": result["seconds_end_to_end"],
                                   "seconds_sum_of_layers": sum(r["seconds"] for r in result["rows"])}
            print(f"  {net['name']:28s} {result['seconds_end_to_end'] * 1e3:9.1f} ms end to end, "
                  f"{totals[net['name']]['seconds_sum_of_layers'] * 1e3:9.1f} ms sum of layers, "
                  f"{flop / 1e9:7.2f} GFLOP", flush=True)
        if args.trace:
            runs = [lambda net=net: _traced(net, x) for net in networks]
            _export_trace(paths["trace"], runs, device)
    comparison = None
    if "resnet50" in stages:
        comparison = stage_comparison(stages[f"{args.model} reference"], stages["resnet50"], args.model)
        for line in comparison["findings"]:
            print("  " + line)
    return {
        "model": args.model, "batch": args.batch, "size": args.size, "device": str(device),
        "device_name": _timing.device_name(device), "dtype": args.dtype, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "peaks": peaks,
        "totals": totals, "stages": stages, "downsampling": comparison, "rows": rows,
    }


def _traced(net: dict, x: torch.Tensor) -> None:
    with net["timer"]:
        net.get("timed", net["forward"])(x)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="bagnet33", choices=sorted(_models.PATCH_SIZES))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(_timing.DTYPES))
    parser.add_argument("--backend", default=None, choices=backend_names(),
                        help="backend of the fast plan (default: the automatic choice)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-resnet", dest="resnet", action="store_false", help="skip the ResNet-50 comparison")
    parser.add_argument("--no-trace", dest="trace", action="store_false", help="skip the torch.profiler trace")
    parser.add_argument("--out", default="profile-out",
                        help="folder for layers.csv, profile.json, roofline.png, trace.json")
    parser.add_argument("--overwrite", action="store_true", help="replace earlier outputs in --out")


def main(args) -> int:
    _bench.check_run_arguments(args)
    _timing.resolve_device(args.device)
    prepare_output_dir(args.out)
    paths = {name: os.path.join(args.out, file) for name, file in
             (("csv", "layers.csv"), ("json", "profile.json"), ("png", "roofline.png"), ("trace", "trace.json"))}
    check_new_outputs(list(paths.values()), args.overwrite)
    print(f"profile: {args.model}, batch {args.batch}, {args.size}x{args.size}, {args.device}, {args.dtype}, "
          f"{torch.get_num_threads()} threads")
    result = run_profile(args, paths)
    write_csv(paths["csv"], result["rows"])
    write_json(paths["json"], result)
    written = [paths["csv"], paths["json"]] + ([paths["trace"]] if args.trace else [])
    title = f"{args.model}, batch {args.batch}, {args.size}x{args.size}, {args.dtype}, {result['device_name']}"
    if plot_roofline(result["rows"], result["peaks"], title, paths["png"]):
        written.append(paths["png"])
    print("wrote " + ", ".join(written))
    return 0
