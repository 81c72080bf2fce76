"""Where OpenVINO's time goes against ours, stage by stage: OpenVINO's own per-node counters
(PERF_COUNT) on the exported reference graph next to bagnet_fast's per-unit times (the plan's walk
hook, bagnet_fast.profile.UnitTimer), both summed per stage (stem, layer1..4, head), same
process, same input, medians over rounds. OpenVINO's counters also split its time by kernel
(exec_type, e.g. brgconv_avx2_1x1, jit_avx2) and show the reorders between layouts.

    python benchmarks/peers_profile.py --model bagnet33 --batch 1 [--bf16] --out benchmarks/results/<file>.json
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import bagnet_fast  # noqa: E402
from bagnet_fast import peers, timing  # noqa: E402
from bagnet_fast.profile import UnitTimer  # noqa: E402
from conftest import randomize_batchnorm  # noqa: E402


def stage_of(name: str) -> str:
    """stem / layer1..4 / head of a plan unit or an ONNX node name (/model/layer2/layer2.0/...)."""
    found = re.search(r"layer(\d)", name)
    if found:
        return f"layer{found.group(1)}"
    return "head" if re.search(r"head|fc|Gemm|MatMul|ReduceMean|GlobalAveragePool|Flatten|logits", name) else "stem"


def openvino_profile(path: str, x: torch.Tensor, rounds: int, threads: int, precision: str = "f32"):
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(path), "CPU", {
        "INFERENCE_PRECISION_HINT": precision, "PERF_COUNT": "YES", "INFERENCE_NUM_THREADS": threads,
        "PERFORMANCE_HINT": "LATENCY"})  # one synchronous request: see bagnet_fast/peers.py
    request = compiled.create_infer_request()
    data = x.numpy()
    request.infer({0: data})  # warm-up
    per_stage, per_kernel, totals = defaultdict(list), defaultdict(list), []
    for _ in range(rounds):
        start = time.perf_counter()
        request.infer({0: data})
        totals.append(time.perf_counter() - start)
        stages, kernels = defaultdict(float), defaultdict(float)
        for info in request.get_profiling_info():
            seconds = info.real_time.total_seconds()
            stages[stage_of(info.node_name)] += seconds
            kernels[f"{info.node_type} [{info.exec_type}]"] += seconds
        for key, value in stages.items():
            per_stage[key].append(value)
        for key, value in kernels.items():
            per_kernel[key].append(value)
    return ({k: statistics.median(v) for k, v in per_stage.items()},
            {k: statistics.median(v) for k, v in per_kernel.items()}, statistics.median(totals))


def ours_profile(model, x: torch.Tensor, rounds: int):
    plan = bagnet_fast.get_plan(model)
    timer = UnitTimer(plan, torch.device("cpu"))
    with torch.inference_mode():
        timer.forward(x)  # warm-up: weights packed for these shapes
        totals = []
        with timer:
            for _ in range(rounds):
                start = time.perf_counter()
                timer.forward(x)
                totals.append(time.perf_counter() - start)
    per_stage = defaultdict(float)
    for label in timer.seconds:
        per_stage[stage_of(label)] += timer.median(label)
    return dict(per_stage), statistics.median(totals)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bagnet33")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--bf16", action="store_true", help="ours in bf16 (bf16 weights and images) against OpenVINO bf16")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if Path(args.out).exists():
        raise SystemExit(f"{args.out} exists: choose another --out (results are never overwritten)")
    problem = peers.why_not(f"openvino {'bf16' if args.bf16 else 'fp32'} (reference graph)")
    if problem:
        raise SystemExit(f"OpenVINO: {problem}")
    torch.manual_seed(0)
    model = randomize_batchnorm(getattr(bagnet_fast, args.model)(), 0).eval()
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    # Ours first: OpenVINO's worker threads keep spinning for a while after each request.
    ours = model.to(torch.bfloat16) if args.bf16 else model
    our_stages, our_total = ours_profile(ours, x.to(ours.conv1.weight.dtype), args.rounds)
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "reference.onnx")
        peers.export_onnx(model, tuple(x.shape), path)
        ov_stages, ov_kernels, ov_total = openvino_profile(path, x, args.rounds, threads, "bf16" if args.bf16 else "f32")
    stages = sorted(set(ov_stages) | set(our_stages), key=lambda s: ("stem", "layer1", "layer2", "layer3", "layer4", "head").index(s))
    table = {s: {"bagnet_fast_ms": 1e3 * our_stages.get(s, 0.0), "openvino_ms": 1e3 * ov_stages.get(s, 0.0)} for s in stages}
    result = {"model": args.model, "dtype": "bfloat16" if args.bf16 else "float32", "batch": args.batch, "size": args.size, "cpu": timing.cpu_name(), "threads": threads,
              "torch": torch.__version__, "versions": peers.versions(), "date": time.strftime("%Y-%m-%d %H:%M"),
              "command": " ".join(sys.argv), "stages": table,
              "total_ms": {"bagnet_fast (with per-unit syncs)": 1e3 * our_total, "openvino (with PERF_COUNT)": 1e3 * ov_total},
              "openvino_kernels_ms": {k: 1e3 * v for k, v in sorted(ov_kernels.items(), key=lambda kv: -kv[1])}}
    for stage, row in table.items():
        print(f"{stage:7s} bagnet_fast {row['bagnet_fast_ms']:8.1f} ms   openvino {row['openvino_ms']:8.1f} ms")
    print("openvino's kernels (ms):")
    for name, ms in list(result["openvino_kernels_ms"].items())[:12]:
        print(f"  {ms:8.1f}  {name}")
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
