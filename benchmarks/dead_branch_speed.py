"""Dead-branch elimination's speed: the fast path on a checkpoint with the official weights'
dead-branch pattern (tests/test_dead_branches.py: dead_pattern_model), with the five dead blocks
eliminated (the default) and with every block computed (dead_branch_tolerance=0), same process,
same input, alternating, several rounds. The FLOPs predict 1.15-1.2x at 224 (4.4 of ~29 GFLOP).

    python benchmarks/dead_branch_speed.py --batches 1,8 --out benchmarks/results/<file>.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import bagnet_fast  # noqa: E402
from bagnet_fast import flops, timing  # noqa: E402
from test_dead_branches import dead_pattern_model  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    model = dead_pattern_model("bagnet33")
    plans = {"eliminated": bagnet_fast.build_plan(model), "computed": bagnet_fast.build_plan(model, dead_branch_tolerance=0.0)}
    result = {"model": "bagnet33 (dead-branch pattern)", "size": args.size, "cpu": timing.cpu_name(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "command": " ".join(sys.argv), "eliminated_blocks": [d.name for d in plans["eliminated"].eliminated],
              "rows": []}
    for batch in (int(b) for b in args.batches.split(",")):
        x = torch.randn(batch, 3, args.size, args.size)
        times = {name: [] for name in plans}
        with torch.inference_mode():
            for plan in plans.values():
                plan.run(x)  # warm-up (packs weights for this shape)
            for _ in range(args.rounds):
                for name, plan in plans.items():
                    times[name] += timing.measure(lambda: plan.run(x), torch.device("cpu"), 0, args.repeats)
        row = {"batch": batch}
        for name, plan in plans.items():
            gflop = flops.total(flops.plan_unit_costs(plan, tuple(x.shape)))[0] / batch / 1e9
            row[name] = {"seconds": times[name], "images_per_second": batch / statistics.median(times[name]),
                         "gflop_per_image": gflop}
        row["speedup"] = row["eliminated"]["images_per_second"] / row["computed"]["images_per_second"]
        row["flop_ratio"] = row["computed"]["gflop_per_image"] / row["eliminated"]["gflop_per_image"]
        result["rows"].append(row)
        print(f"batch {batch}: eliminated {row['eliminated']['images_per_second']:.2f} img/s, computed "
              f"{row['computed']['images_per_second']:.2f} img/s: {row['speedup']:.2f}x (FLOPs {row['flop_ratio']:.2f}x)",
              flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
