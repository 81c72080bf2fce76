"""The cpu backend's allocator setting (bagnet_fast/executors/cpu_memory.py) measured: the fast
path with freed large blocks kept for reuse (the default) against glibc's defaults
(BAGNET_FAST_CPU_MALLOC=system) and bagnet_fast's caching allocator (=cache), each in its own process (the setting is process-wide),
alternating, several rounds; and resident memory after forwards over many image sizes.

    python benchmarks/cpu_malloc_speed.py --out benchmarks/results/<file>.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ("keep", "system", "cache")
SWEEP = list(range(64, 300, 12)) + list(range(300, 64, -24))  # 40 sizes up and down, batch 2


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def worker(model_name: str, batch: int, size: int, calls: int, sweep: bool) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests"))
    import bagnet_fast
    from bagnet_fast.executors import cpu_memory
    from conftest import randomize_batchnorm

    torch.manual_seed(0)
    model = randomize_batchnorm(getattr(bagnet_fast, model_name)(), 0).eval()
    with torch.inference_mode():
        if sweep:
            for s in SWEEP:
                model(torch.randn(2, 3, s, s))
            return {"rss_mib_after_sweep": _rss_mib(), "allocator": cpu_memory.state()}
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
        model(x)
        model(x)
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return {"seconds": times, "images_per_second": batch / statistics.median(times), "allocator": cpu_memory.state()}


def _run(setting: str, *args) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", *map(str, args)], capture_output=True, text=True,
                         check=True, env=dict(os.environ, BAGNET_FAST_CPU_MALLOC=setting))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bagnet33")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--out")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        name, batch, size, calls, sweep = args.worker
        print(json.dumps(worker(name, int(batch), int(size), int(calls), sweep == "1")))
        return 0
    if args.out and Path(args.out).exists():
        raise SystemExit(f"{args.out} exists: choose another --out")
    import torch

    result = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
              "model": args.model, "size": args.size, "runs": [], "summary": {}}
    for batch in (int(b) for b in args.batches.split(",")):
        for _ in range(args.rounds):
            for setting in SETTINGS:
                run = dict(_run(setting, args.model, batch, args.size, args.calls, 0), setting=setting, batch=batch)
                result["runs"].append(run)
                print(f"b{batch} {setting:6s} {run['images_per_second']:6.2f} img/s  ({run['allocator']})", flush=True)
        rates = {s: statistics.median(r["images_per_second"] for r in result["runs"]
                                      if r["setting"] == s and r["batch"] == batch) for s in SETTINGS}
        result["summary"][f"b{batch}"] = dict(rates, speedup=rates["keep"] / rates["system"],
                                              cache_speedup=rates["cache"] / rates["system"])
    for setting in SETTINGS:
        run = _run(setting, args.model, 2, 0, 0, 1)
        result["summary"][f"rss_mib_after_sweep_{setting}"] = run["rss_mib_after_sweep"]
        print(f"sweep {setting:6s} resident {run['rss_mib_after_sweep']:.0f} MiB", flush=True)
    print(json.dumps(result["summary"], indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
        print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
