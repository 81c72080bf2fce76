"""The training step (forward + backward + SGD step) of BagNet-33: the official model's (the
reference modules, NCHW) against bagnet_fast's training path (channels-last, the default, and
NCHW), with gradient checkpointing (per stage, per block, elementwise) and with allocator
settings; images/s and memory, CPU. Each configuration
runs in its own process, rounds alternate the configurations. Two memory numbers:

- ``saved_for_backward_mib``: the bytes of the tensors autograd keeps for backward (one step,
  counted through torch.autograd.graph.saved_tensors_hooks, each storage once): the activation
  memory a training step holds at its peak, what the rewrites and checkpointing change.
- ``peak_step_memory_mib``: the process's peak resident memory minus its resident memory before
  the first step (model and batch are not counted; the optimizer's momentum, 64 MiB, is). A peak
  resident size includes what the allocator holds besides live tensors, so it is the coarser
  number.

    python benchmarks/training_speed.py --out benchmarks/results/<file>.json [--shapes 8x224,2x512]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# "+kept allocator": glibc keeps freed large blocks for reuse in that process (what the cpu
# backend's inference plan sets, bagnet_fast/executors/cpu_memory.py); "+caching allocator":
# bagnet_fast.enable_cpu_caching_allocator() (csrc/cpu/caching_allocator.cpp), to see what the
# allocator alone does. "+checkpointing": every stage recomputed in backward; "+block
# checkpointing": every block (recompute="block"); "+elementwise checkpointing": only the
# BatchNorms, ReLUs and sums (recompute="elementwise").
RECOMPUTE = {"checkpointing": "stage", "block checkpointing": "block", "elementwise checkpointing": "elementwise"}
ALLOCATORS = ("kept allocator", "caching allocator")
CONFIGS = ("official", "fast", "fast NCHW", "fast+checkpointing", "fast+block checkpointing",
           "fast+elementwise checkpointing", "official+kept allocator", "fast+kept allocator",
           "fast+checkpointing+kept allocator", "fast+elementwise checkpointing+kept allocator",
           "official+caching allocator", "fast+caching allocator", "fast+checkpointing+caching allocator",
           "fast+block checkpointing+caching allocator", "fast+elementwise checkpointing+caching allocator")


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def worker(config: str, batch: int, size: int, steps: int) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    import bagnet_fast
    from bagnet_fast import training

    parts = config.split("+")
    if "kept allocator" in parts:
        from bagnet_fast.executors import cpu_memory

        cpu_memory.keep_freed_memory()
    if "caching allocator" in parts:
        bagnet_fast.enable_cpu_caching_allocator()
    recompute = [RECOMPUTE[part] for part in parts[1:] if part in RECOMPUTE]
    model, forward = training.benchmark_model(
        "bagnet33", official=parts[0] == "official", channels_last=parts[0] == "fast",
        recompute=recompute[0] if recompute else None)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))
    step = training.sgd_step(model, forward, x, y)

    before = _rss_kib()
    step()  # warm-up: allocator, oneDNN primitives, optimizer state
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    extra = {}
    if "caching allocator" in parts:  # its counters after the steps (peak_live_bytes: live blocks >= 1 MiB)
        extra["caching_allocator"] = bagnet_fast.executors.cpu_memory.caching_allocator_stats()
    return {**extra, "config": config, "batch": batch, "size": size, "seconds": times,
            "images_per_second": batch / statistics.median(times),
            "peak_step_memory_mib": (peak - before) / 1024, "saved_for_backward_mib": sum(saved.values()) / 2**20,
            "threads": torch.get_num_threads()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="8x224,2x512", help="BATCHxSIZE,...")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated, from: " + ", ".join(CONFIGS))
    parser.add_argument("--out")
    parser.add_argument("--worker", nargs=4, metavar=("CONFIG", "BATCH", "SIZE", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        config, batch, size, steps = args.worker
        print(json.dumps(worker(config, int(batch), int(size), int(steps))))
        return 0
    configs = [c for c in args.configs.split(",") if c]
    unknown = set(configs) - set(CONFIGS)
    if unknown or "official" not in configs:
        parser.error(f"--configs: unknown {sorted(unknown)}" if unknown else "--configs must include official")
    if args.out and Path(args.out).exists():
        parser.error(f"{args.out} exists (choose a new file)")
    import torch

    result = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "cpu": _cpu(), "runs": []}
    for shape in args.shapes.split(","):
        batch, size = (int(v) for v in shape.split("x"))
        for _ in range(args.rounds):
            for config in configs:
                out = subprocess.run([sys.executable, __file__, "--worker", config, str(batch), str(size), str(args.steps)],
                                     capture_output=True, text=True, check=True)
                run = json.loads(out.stdout.strip().splitlines()[-1])
                result["runs"].append(run)
                print(f"{config:20s} b{batch} {size}px {run['images_per_second']:7.3f} img/s "
                      f"peak {run['peak_step_memory_mib']:8.0f} MiB, saved for backward "
                      f"{run['saved_for_backward_mib']:8.0f} MiB", flush=True)
        keys = ("images_per_second", "peak_step_memory_mib", "saved_for_backward_mib")
        summary = {c: {key: statistics.median(r[key] for r in result["runs"]
                                              if r["config"] == c and r["batch"] == batch and r["size"] == size)
                       for key in keys} for c in configs}
        official = summary["official"]
        for c in configs:
            if c == "official":
                continue
            summary[c]["speed_vs_official"] = summary[c]["images_per_second"] / official["images_per_second"]
            summary[c]["memory_vs_official"] = summary[c]["peak_step_memory_mib"] / official["peak_step_memory_mib"]
            summary[c]["saved_vs_official"] = summary[c]["saved_for_backward_mib"] / official["saved_for_backward_mib"]
        result.setdefault("summary", {})[shape] = summary
        print(json.dumps(summary, indent=1), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
        print("wrote", args.out)
    return 0


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
