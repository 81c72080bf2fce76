"""Dense heatmap speed: shift-and-stitch (bagnet_fast.dense_heatmap) vs evaluating every patch
separately (the authors' tool: cut out all H*W zero-padded q x q patches, run them in batches
of 1000), same device, same process.

    python benchmarks/heatmap_speedup.py --model bagnet33 --size 224 --sample-patches 5000 [--dtype bfloat16]

The per-patch method is timed on the reference forward (what the authors' tool runs) and on
bagnet_fast's plan (the same per-patch algorithm on our kernels). ``--sample-patches N`` times
the first N patches only and scales linearly to all H*W patches (every batch has the same shape,
so the cost per patch is constant); the JSON says which numbers are scaled. ``--count-flops``
also counts the FLOPs of both methods with torch.utils.flop_counter (torch backend).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import bagnet_fast
from bagnet_fast import heatmap_padding
from bagnet_fast.explain import dense_heatmap
from bagnet_fast.timing import measure, sync


def per_patch_seconds(forward, image, target, q, batch, sample, device):
    """Seconds to evaluate ``sample`` (or all) patches of ``image`` one by one, in batches."""
    top, bottom, left, right = heatmap_padding(q)
    padded = F.pad(image, (left, right, top, bottom))
    patches = padded.unfold(2, q, 1).unfold(3, q, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, q, q)
    total = patches.shape[0]
    count = total if sample is None else min(sample, total)
    forward(patches[:batch].contiguous())  # warm-up (plan, primitives)
    sync(device)
    start = time.perf_counter()
    for first in range(0, count, batch):
        chunk = patches[first : min(count, first + batch)].contiguous()
        forward(chunk)[:, target]
    sync(device)
    return time.perf_counter() - start, count, total


def count_flops(fn):
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bagnet33", choices=sorted(bagnet_fast.PATCH_SIZES))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed dense runs (after one warm-up)")
    parser.add_argument("--batch", type=int, default=1000, help="patches per batch (the authors' tool: 1000)")
    parser.add_argument("--sample-patches", type=int, default=None, help="time only the first N patches, scale to all")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="of the dense heatmap and the per-patch bagnet_fast run (the authors' per-patch "
                             "tool stays float32); bfloat16 also reports the heatmap's error against float32's")
    parser.add_argument("--count-flops", action="store_true")
    parser.add_argument("--out", default=None, help="JSON file to write (refuses to overwrite)")
    args = parser.parse_args(argv)
    if args.out and os.path.exists(args.out):
        raise SystemExit(f"{args.out} exists: choose another --out")
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = getattr(bagnet_fast, args.model)().to(device).eval()
    q = model.patch_size
    image = torch.randn(1, 3, args.size, args.size, device=device)
    target = 0
    dtype = getattr(torch, args.dtype)
    fast = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
    picture = image.to(dtype)
    result = {
        "model": args.model, "size": args.size, "device": str(device), "dtype": args.dtype,
        "torch": torch.__version__, "bagnet_fast": bagnet_fast.__version__, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": " ".join([os.path.basename(sys.argv[0])] + (argv if argv is not None else sys.argv[1:])),
    }
    with torch.inference_mode():
        heatmap = dense_heatmap(fast, picture, target)  # warm-up
        times = measure(lambda: dense_heatmap(fast, picture, target), device, 0, args.repeats)
        result["dense_seconds"] = statistics.median(times)
        result["dense_times"] = times
        print(f"dense heatmap (shift-and-stitch, {args.dtype}): {result['dense_seconds']:.2f} s "
              f"(median of {args.repeats})", flush=True)
        if dtype != torch.float32:
            exact = dense_heatmap(model, image, target).double()
            result["dense_max_rel_err_vs_float32"] = ((heatmap.double() - exact).abs().max() / exact.abs().max()).item()
            result["dense_backend"] = bagnet_fast.get_plan(fast).backend.name
            print(f"  max |bf16 - fp32| / max |fp32| of the heatmap: {result['dense_max_rel_err_vs_float32']:.2e} "
                  f"({result['dense_backend']} backend)", flush=True)
        inputs = {"reference": (model.reference_forward, image), "bagnet_fast": (fast, picture)}
        for name, (forward, images) in inputs.items():
            seconds, timed, total = per_patch_seconds(forward, images, target, q, args.batch, args.sample_patches, device)
            scaled = seconds * total / timed
            result[f"per_patch_{name}"] = {
                "seconds_timed": seconds, "patches_timed": timed, "patches_total": total,
                "seconds_all_patches": scaled, "scaled_from_sample": timed < total,
                "speedup_of_dense": scaled / result["dense_seconds"],
            }
            how = f"timed on {timed} of {total} patches, scaled" if timed < total else "all patches timed"
            print(f"per-patch, {name} forward: {scaled:.1f} s ({how}); speed-up of dense: "
                  f"{scaled / result['dense_seconds']:.1f}x", flush=True)
    if args.count_flops:
        model.backend = "torch"  # aten convolutions, which the flop counter sees
        with torch.inference_mode():
            result["dense_tflop"] = count_flops(lambda: dense_heatmap(model, image, target)) / 1e12
            patch = torch.zeros(1, 3, q, q, device=device)
            per_patch = count_flops(lambda: model.reference_forward(patch))
        result["per_patch_tflop"] = per_patch * args.size * args.size / 1e12
        print(f"FLOPs: dense {result['dense_tflop']:.2f} TFLOP, per-patch {result['per_patch_tflop']:.2f} TFLOP")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2)
        os.replace(tmp, args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
