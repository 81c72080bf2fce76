"""Command line: ``python -m bagnet_fast {bench,profile,heatmap,certify,precision,info}``."""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bagnet_fast", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    from . import bench, heatmap_cli, profile

    bench.add_arguments(commands.add_parser("bench", help="images/s: reference vs fast vs ResNet-50"))
    profile.add_arguments(commands.add_parser(
        "profile", help="per-layer/per-unit time, FLOPs, bytes and roofline: reference vs fast vs ResNet-50"))
    heatmap_cli.add_arguments(commands.add_parser(
        "heatmap", help="explain images: heatmaps, top patches, PNG overlays (resumable, torchrun)",
        description=heatmap_cli.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    from . import certify_cli

    certify_cli.add_arguments(commands.add_parser(
        "certify", help="certified accuracy under PatchGuard-family patch defences (resumable, torchrun)",
        description=certify_cli.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    from . import precision_cli

    precision_cli.add_arguments(commands.add_parser(
        "precision", help="the error of every precision mode against float64, per unit (your weights and images)",
        description=precision_cli.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    info = commands.add_parser("info", help="versions, the backends that can run here, a checkpoint's dead branches")
    info.add_argument("--weights", metavar="FILE", help="a checkpoint: list the blocks the plan eliminates as dead branches")
    info.add_argument("--dead-branch-tolerance", type=float, default=None, metavar="TAU",
                      help="the bound, relative to a block's largest input (default 2**-24)")
    info.add_argument("--json", metavar="FILE", help="also write the dead-branch report as JSON")
    args = parser.parse_args(argv)
    if args.command == "bench":
        return bench.main(args)
    if args.command == "profile":
        return profile.main(args)
    if args.command == "heatmap":
        return heatmap_cli.main(args)
    if args.command == "certify":
        return certify_cli.main(args)
    if args.command == "precision":
        return precision_cli.main(args)
    return _info(args)


def _info(args) -> int:
    import torch

    import bagnet_fast
    from bagnet_fast import _extension

    print(f"bagnet_fast {bagnet_fast.__version__}, torch {torch.__version__}")
    print(f"extension: {'loaded' if _extension.loaded() else 'missing: ' + str(_extension.load_error())}"
          f"{', with CUDA' if _extension.with_cuda() else ''}")
    from bagnet_fast.executors import cpu_memory

    setting = os.environ.get(cpu_memory.ENV, "keep")
    meaning = {"system": "large freed blocks returned to the system", "keep": "large freed blocks kept for reuse",
               "cache": "bagnet_fast's caching allocator"}.get(setting, "not a valid setting")
    print(f"cpu allocator: {setting} ({meaning} once the cpu backend runs; {cpu_memory.ENV}=keep|system|cache)")
    print("  for training: bagnet_fast.enable_cpu_caching_allocator() (README, Fine-tuning)")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for name, entry in bagnet_fast.backends(device).items():
            print(f"  {device:5s} {name:7s} {'yes' if entry['available'] else 'no ':4s} {entry['reason']}")
    # A bf16 model on a CPU: the cpu backend's bf16 plan needs bf16 units (AVX512-BF16 or AMX).
    bf16 = bagnet_fast.backends("cpu", torch.bfloat16)["cpu"]
    print(f"  cpu bfloat16 on the cpu backend: {'yes' if bf16['available'] else 'no, ' + bf16['reason']}")
    if args.weights:
        return _dead_branch_report(args)
    return 0


def _dead_branch_report(args) -> int:
    from bagnet_fast import dead_branches
    from bagnet_fast._io import write_json
    from bagnet_fast.accelerate import bagnet_from_state_dict
    from bagnet_fast.weights import load_checkpoint

    try:
        model = bagnet_from_state_dict(load_checkpoint(args.weights)).eval()
    except (OSError, ValueError, RuntimeError) as error:
        raise SystemExit(f"cannot load --weights {args.weights}: {error}")
    report = dead_branches(model, args.dead_branch_tolerance)
    tolerance = report[0].tolerance if report else args.dead_branch_tolerance
    print(f"dead branches of {args.weights} (BagNet-{model.patch_size}): a 1x1 block is eliminated when "
          f"|branch(x) - constant| <= gain * max|x| with gain <= {tolerance:.3g}")
    saved = 0
    for entry in report:
        print(f"  {entry.name:9s} gain {entry.gain:10.3e}  {'eliminated' if entry.eliminated else 'kept':10s} "
              f"{entry.flops_per_image_224 / 1e9:6.3f} GFLOP per 224x224 image")
        saved += entry.flops_per_image_224 if entry.eliminated else 0
    print(f"  saved: {saved / 1e9:.3f} GFLOP per 224x224 image")
    if args.json:
        write_json(args.json, {"weights": args.weights, "tolerance": tolerance, "saved_flops_per_image_224": saved,
                               "blocks": [entry.as_dict() for entry in report]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
