"""``python -m bagnet_fast bench``: images/s of the reference BagNet, the fast one and ResNet-50.

Each implementation runs in the same process on the same inputs: warm-up calls first (they
build the plan, JIT caches, oneDNN primitives), then ``repeats`` timed calls, device
synchronised inside the timing. Reports the median time per batch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Callable, Dict, List

import torch

from . import models as _models

__all__ = ["measure", "run_bench", "add_arguments"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> List[float]:
    """Seconds per call of ``fn`` for ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _implementations(args, device) -> Dict[str, Callable[[torch.Tensor], object]]:
    torch.manual_seed(0)
    model = getattr(_models, args.model)().to(device).eval()
    channels_last = getattr(_models, args.model)().to(device).eval()
    channels_last.load_state_dict(model.state_dict())
    channels_last = channels_last.to(memory_format=torch.channels_last)
    impls: Dict[str, Callable[[torch.Tensor], object]] = {
        "reference eager NCHW": model.reference_forward,
        "reference eager channels-last": lambda x: channels_last.reference_forward(
            x.contiguous(memory_format=torch.channels_last)
        ),
        "bagnet_fast": model,
    }
    if args.compile:
        compiled = torch.compile(model.reference_forward)
        impls["reference torch.compile"] = compiled
    if args.resnet:
        try:
            import torchvision
        except ImportError:
            print("torchvision is not installed: no ResNet-50 row")
        else:
            resnet = torchvision.models.resnet50().to(device).eval()
            resnet_cl = torchvision.models.resnet50().to(device).eval().to(memory_format=torch.channels_last)
            impls["torchvision resnet50 eager NCHW"] = resnet
            impls["torchvision resnet50 eager channels-last"] = lambda x: resnet_cl(
                x.contiguous(memory_format=torch.channels_last)
            )
    return impls


def run_bench(args) -> dict:
    device = torch.device(args.device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    rows = []
    impls = _implementations(args, device)
    with torch.inference_mode():
        for name, fn in impls.items():
            times = measure(lambda: fn(x), device, args.warmup, args.repeats)
            seconds = statistics.median(times)
            rows.append({"implementation": name, "seconds_per_batch": seconds,
                         "images_per_second": args.batch / seconds, "times": times})
            print(f"  {name:45s} {args.batch / seconds:8.2f} img/s", flush=True)
    by_name = {r["implementation"]: r["images_per_second"] for r in rows}
    ratios = {"fast / reference eager NCHW": by_name["bagnet_fast"] / by_name["reference eager NCHW"]}
    if "reference torch.compile" in by_name:
        ratios["fast / reference torch.compile"] = by_name["bagnet_fast"] / by_name["reference torch.compile"]
    if "torchvision resnet50 eager channels-last" in by_name:
        ratios["fast / resnet50 channels-last"] = by_name["bagnet_fast"] / by_name["torchvision resnet50 eager channels-last"]
    return {
        "model": args.model, "batch": args.batch, "size": args.size, "device": str(device),
        "dtype": "float32", "threads": torch.get_num_threads(), "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d"),
        "rows": rows, "ratios": ratios,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="bagnet33", choices=sorted(_models.PATCH_SIZES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="add torch.compile of the reference (slow first call)")
    parser.add_argument("--no-resnet", dest="resnet", action="store_false", help="skip torchvision ResNet-50")
    parser.add_argument("--out", default="bench-out", help="folder for bench.json")


def main(args) -> int:
    if args.batch < 1 or args.repeats < 1 or args.warmup < 0:
        raise SystemExit("--batch and --repeats must be >= 1, --warmup >= 0")
    print(f"bench: {args.model}, batch {args.batch}, {args.size}x{args.size}, {args.device}, "
          f"float32, {torch.get_num_threads()} threads")
    result = run_bench(args)
    for name, value in result["ratios"].items():
        print(f"  {name:45s} {value:8.2f}x")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, path)
    print(f"wrote {path}")
    return 0
