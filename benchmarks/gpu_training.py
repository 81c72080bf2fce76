"""The training step of BagNet-33 on a GPU (issue 16's owed GPU numbers): forward + backward + SGD
step of the official modules (``reference_forward``) against bagnet_fast's training path, in
float32 (TF32 off: the official weights' precision) and under bf16 autocast, with stage and block
checkpointing; img/s and the peak of ``torch.cuda.max_memory_allocated`` per configuration, one
process, configurations alternating over rounds. Each fast configuration's first-step loss is
checked against the official one's in the same dtype. Results are written after every row.

    python benchmarks/gpu_training.py --out RESULTS_DIR [--batch 64] [--size 224] [--budget-s 40]
    python benchmarks/gpu_training.py --dry-run --out DIR     # CPU, BagNet-9, 2 images of 48 px
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bagnet_fast import timing, training  # noqa: E402

# (name, uses the official modules, autocast dtype or None, checkpointing recompute or None)
CONFIGS = (
    ("official fp32", True, None, None),
    ("fast fp32", False, None, None),
    ("official bf16 autocast", True, torch.bfloat16, None),
    ("fast bf16 autocast", False, torch.bfloat16, None),
    ("fast bf16 autocast + stage checkpointing", False, torch.bfloat16, "stage"),
    ("fast bf16 autocast + block checkpointing", False, torch.bfloat16, "block"),
)
# The loss of one step agrees with the official modules' within this (relative): fp32 rounds
# differently only in the merged stem (1e-4 in tests/test_training.py); bf16 autocast rounds
# every convolution (8 mantissa bits), so only a gross error trips it.
LOSS_BOUND = {None: 1e-4, torch.bfloat16: 5e-2}


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: torch.device):
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def measure(config, model_name: str, batch: int, size: int, steps: int, device: torch.device) -> dict:
    name, official, autocast_dtype, recompute = config
    model, forward = training.benchmark_model(model_name, official=official, recompute=recompute, device=device)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=generator).to(device)
    y = torch.randint(0, 10, (batch,), generator=generator).to(device)
    step = training.sgd_step(model, forward, x, y, autocast_dtype=autocast_dtype)

    _reset_peak(device)
    first_loss = float(step())  # also the warm-up (cuDNN's algorithm search)
    times = timing.measure(step, device, 0, steps)
    return {"config": name, "model": model_name, "batch": batch, "size": size, "seconds": times,
            "images_per_second": batch / statistics.median(times), "peak_allocated_mib": _peak_mib(device),
            "first_loss": first_loss, "autocast": str(autocast_dtype) if autocast_dtype else None,
            "recompute": recompute}


def summarize(rows) -> dict:
    summary = {}
    for config in dict.fromkeys(r["config"] for r in rows):
        mine = [r for r in rows if r["config"] == config]
        summary[config] = {"images_per_second": statistics.median(r["images_per_second"] for r in mine),
                           "peak_allocated_mib": mine[0]["peak_allocated_mib"], "first_loss": mine[0]["first_loss"]}
    for config, official, autocast_dtype, _ in CONFIGS:
        reference = "official bf16 autocast" if autocast_dtype else "official fp32"
        if official or config not in summary or reference not in summary:
            continue
        mine, base = summary[config], summary[reference]
        mine["speed_vs_official"] = mine["images_per_second"] / base["images_per_second"]
        if mine["peak_allocated_mib"] and base["peak_allocated_mib"]:
            mine["memory_vs_official"] = mine["peak_allocated_mib"] / base["peak_allocated_mib"]
        error = abs(mine["first_loss"] - base["first_loss"]) / abs(base["first_loss"])
        mine["loss_rel_error"] = error
        mine["loss_check"] = "ok" if error <= LOSS_BOUND[autocast_dtype] else f"FAILED (bound {LOSS_BOUND[autocast_dtype]})"
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="results directory (gpu_training.json is written there)")
    parser.add_argument("--model", default="bagnet33")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=40.0, help="no new row starts after this")
    parser.add_argument("--dry-run", action="store_true", help="CPU, BagNet-9, 2 images of 48 px (rehearsal)")
    args = parser.parse_args()
    if args.dry_run:
        device, args.model, args.batch, args.size, args.steps, args.rounds = torch.device("cpu"), "bagnet9", 2, 48, 1, 1
    elif not torch.cuda.is_available():
        parser.error("needs a CUDA device (or --dry-run)")
    else:
        device = torch.device("cuda")
        # The official weights' precision: fp32 without TF32 (the precision issue).
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gpu_training.json"
    result = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)", "rows": [],
              "skipped": []}
    start = time.perf_counter()
    for round_index in range(args.rounds):
        for config in CONFIGS:
            if time.perf_counter() - start > args.budget_s:
                result["skipped"].append(f"round {round_index + 1}: {config[0]} (budget)")
                continue
            try:
                row = measure(config, args.model, args.batch, args.size, args.steps, device)
            except Exception as error:  # noqa: BLE001  (an out-of-memory row must not lose the others)
                row = {"config": config[0], "error": f"{type(error).__name__}: {error}"}
            row["round"] = round_index + 1
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            result["summary"] = summarize([r for r in result["rows"] if "error" not in r])
            path.write_text(json.dumps(result, indent=1))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(json.dumps(result.get("summary", {}), indent=1))
    failed = [c for c, s in result.get("summary", {}).items() if str(s.get("loss_check", "ok")) != "ok"]
    return 1 if failed or any("error" in r for r in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
