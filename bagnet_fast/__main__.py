"""Command line: ``python -m bagnet_fast {bench,profile,heatmap,certify,info}``."""

from __future__ import annotations

import argparse
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
    commands.add_parser("info", help="versions and which backends can run here")
    args = parser.parse_args(argv)
    if args.command == "bench":
        return bench.main(args)
    if args.command == "profile":
        return profile.main(args)
    if args.command == "heatmap":
        return heatmap_cli.main(args)
    if args.command == "certify":
        return certify_cli.main(args)
    return _info()


def _info() -> int:
    import torch

    import bagnet_fast
    from bagnet_fast import _extension

    print(f"bagnet_fast {bagnet_fast.__version__}, torch {torch.__version__}")
    print(f"extension: {'loaded' if _extension.loaded() else 'missing: ' + str(_extension.load_error())}"
          f"{', with CUDA' if _extension.with_cuda() else ''}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for name, entry in bagnet_fast.backends(device).items():
            print(f"  {device:5s} {name:7s} {'yes' if entry['available'] else 'no ':4s} {entry['reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
