"""Certification speed: bagnet_fast.certify's batched defences against the per-image loop oracle
of tests/test_certify.py (and, with --patchguard, the authors' own utils/defense_utils.py), on
the same maps in the same run; then images/s of certification end to end (uint8 images ->
preprocess -> patch_logits -> defence) on a BagNet.

    python benchmarks/certify_speed.py --maps 1000 --oracle-maps 100 --out results.json
    python benchmarks/certify_speed.py --patchguard ~/src/PatchGuard   # + the reference (needs scipy)

Maps: N of 26 x 26 x 1000 float32 (BagNet-17 at 224 px, ImageNet classes), standard normal
logits with the label's class raised by --boost (default 2; detection 10; CBN's maps scaled by
60) so that every image is certified: the oracle and the reference then run every window, their
worst case and the common case of a good model. Window 6 (a 32 px patch). The batched functions run on all N maps; the loops on the first
--oracle-maps (their cost per certified map is the same for every map: the JSON says how many
were timed). Every looped map's prediction and code is compared with the batched result.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

import bagnet_fast
from bagnet_fast import certify as cf
from bagnet_fast._io import check_new_outputs, write_json
from bagnet_fast.timing import cpu_name

ROOT = Path(__file__).resolve().parents[1]


def _oracles():
    """The oracle lives with the tests (one definition for both): tests/test_certify.py."""
    sys.path.insert(0, str(ROOT / "tests"))
    import test_certify

    return test_certify


def make_maps(count: int, seed: int, boost: float):
    """(count, 26, 26, 1000) float32 maps and labels, generated in the same order for any chunking."""
    rng = np.random.default_rng(seed)
    maps = rng.standard_normal((count, 26, 26, 1000), dtype=np.float32)
    labels = rng.integers(0, 1000, count)
    maps[np.arange(count), :, :, labels] += np.float32(boost)
    return maps, labels


DEFENCES = {
    # name: (batched call, oracle call, PatchGuard's (prediction, certification) calls)
    "masking": (lambda x, y, w: cf.masking(x, y, w),
                lambda o, m, y, w: o.oracle_masking(m, y, (w, w)),
                ("masking_defense", {"window_shape": None}, "provable_masking", {"window_shape": None})),
    "cbn": (lambda x, y, w: cf.clipping(x, y, w),
            lambda o, m, y, w: o.oracle_clipping(m, y, (w, w)),
            ("clipping_defense", {}, "provable_clipping", {"window_shape": None})),
    "detection": (lambda x, y, w: cf.detection(x, y, w, 0.5),
                  lambda o, m, y, w: o.oracle_detection(m, y, (w, w), 0.5),
                  ("pg2_detection", {"tau": 0.5, "window_shape": None}, "pg2_detection_provable",
                   {"tau": 0.5, "window_shape": None})),
}


def _reference_call(module, name, options, window):
    function = getattr(module, name)
    options = {k: ([window, window] if k == "window_shape" else v) for k, v in options.items()}
    return lambda m, *label: function(m, *label, **options)


def bench_defence(name, maps, labels, window, loops, reference, log):
    batched, oracle, (pred_name, pred_opts, cert_name, cert_opts) = DEFENCES[name]
    logits = torch.from_numpy(maps)
    batched(logits[:8], labels[:8], window)  # warm-up
    start = time.perf_counter()
    result = batched(logits, labels, window)
    batched_s = time.perf_counter() - start
    prediction, codes = result.prediction.numpy(), result.certified.numpy()
    row = {"maps": len(maps), "batched_seconds": batched_s, "batched_s_per_map": batched_s / len(maps),
           "codes": {str(c): int((codes == c).sum()) for c in range(3)}}
    log(f"{name}: batched {batched_s / len(maps) * 1e3:.3f} ms/map on {len(maps)} maps, codes {row['codes']}")
    oracles = _oracles()
    start, mismatches = time.perf_counter(), 0
    for n in range(loops):
        p, c = oracle(oracles, maps[n], int(labels[n]), window)
        mismatches += int(p != prediction[n] or c != codes[n])
    oracle_s = time.perf_counter() - start
    row.update(oracle_maps=loops, oracle_seconds=oracle_s, oracle_s_per_map=oracle_s / loops,
               oracle_mismatches=mismatches, speedup_vs_oracle=(oracle_s / loops) / (batched_s / len(maps)))
    log(f"{name}: oracle {oracle_s / loops:.4f} s/map on {loops} maps ({mismatches} differ): "
        f"{row['speedup_vs_oracle']:.0f}x")
    if reference is not None:
        predict = _reference_call(reference, pred_name, pred_opts, window)
        certify = _reference_call(reference, cert_name, cert_opts, window)
        start, differ = time.perf_counter(), 0
        for n in range(loops):
            p, c = predict(maps[n]), certify(maps[n], int(labels[n]))
            differ += int(p != prediction[n] or c != codes[n])
        ref_s = time.perf_counter() - start
        row.update(reference_seconds=ref_s, reference_s_per_map=ref_s / loops, reference_differences=differ,
                   speedup_vs_reference=(ref_s / loops) / (batched_s / len(maps)))
        log(f"{name}: PatchGuard's code {ref_s / loops:.4f} s/map ({differ} differ): {row['speedup_vs_reference']:.0f}x")
    return row


def bench_end_to_end(model_name, batch, batches, patch, log):
    """images/s of uint8 images -> preprocess -> patch_logits -> masking (window of ``patch`` px)."""
    torch.manual_seed(0)
    model = getattr(bagnet_fast, model_name)().eval()
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 224, 224, 3), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 1000, (batch,), generator=generator)
    window = cf.window_size(patch, model.patch_size)

    def forward():
        return bagnet_fast.patch_logits(model, bagnet_fast.preprocess(images, layout="NHWC")).values

    with torch.inference_mode():
        cf.masking(forward(), labels, window)  # warm-up: plan, primitives
        forward_s, certify_s = [], []
        for _ in range(batches):
            start = time.perf_counter()
            logits = forward()
            middle = time.perf_counter()
            cf.masking(logits, labels, window)
            forward_s.append(middle - start)
            certify_s.append(time.perf_counter() - middle)
    total = sum(forward_s) + sum(certify_s)
    row = {"model": model_name, "batch": batch, "batches": batches, "size": 224, "patch": patch, "window": window,
           "weights": "random-init (speed only)", "images_per_s": batch * batches / total,
           "forward_seconds_per_image": sum(forward_s) / (batch * batches),
           "certify_seconds_per_image": sum(certify_s) / (batch * batches)}
    log(f"end to end ({model_name}, batch {batch}, 224 px, masking {patch} px): {row['images_per_s']:.2f} img/s "
        f"(forward {row['forward_seconds_per_image'] * 1e3:.1f} ms/img, certify {row['certify_seconds_per_image'] * 1e3:.2f} ms/img)")
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--maps", type=int, default=1000)
    parser.add_argument("--oracle-maps", type=int, default=1000, help="maps timed with the loops (default all)")
    parser.add_argument("--defences", default="masking,cbn,detection")
    parser.add_argument("--boost", type=float, default=2.0,
                        help="added to the label's logits for masking and CBN (2: all certified)")
    parser.add_argument("--detection-boost", type=float, default=10.0,
                        help="the same for detection (10: confident enough to certify at tau 0.5)")
    parser.add_argument("--window", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--patchguard", default=None, metavar="DIR",
                        help="a checkout of inspire-group/PatchGuard: also time its utils/defense_utils.py")
    parser.add_argument("--end-to-end", default="bagnet17", help="model for the images/s measurement ('' to skip)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default torch's; the loops are single-threaded numpy)")
    parser.add_argument("--out", default=None, help="JSON file to write (refuses to overwrite)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.out:
        check_new_outputs([args.out], overwrite=False)
    reference = None
    if args.patchguard:
        sys.path.insert(0, os.path.abspath(args.patchguard))
        reference = importlib.import_module("utils.defense_utils")
    np.seterr(all="ignore")  # the reference divides 0 by 0 on purpose (NaN > T is false)
    lines = []

    def log(message):
        print(message, flush=True)
        lines.append(message)

    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu_name(), "machine": platform.machine(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "numpy": np.__version__,
        "bagnet_fast": bagnet_fast.__version__, "load_average_before": os.getloadavg(),
        "command": " ".join(["benchmarks/certify_speed.py"] + (argv if argv is not None else sys.argv[1:])),
        "maps": {"count": args.maps, "shape": [26, 26, 1000], "dtype": "float32", "seed": args.seed,
                 "window": args.window},
        "patchguard": None if reference is None else os.path.abspath(args.patchguard),
    }
    loops = min(args.oracle_maps, args.maps)
    result["defences"] = {}
    for name in filter(None, args.defences.split(",")):
        boost = args.detection_boost if name == "detection" else args.boost
        maps, labels = make_maps(args.maps, args.seed, boost)
        if name == "cbn":  # tanh(0.05 x - 1) needs logits in the tens to vary: scaled by 60
            maps *= np.float32(60.0)
        result["defences"][name] = bench_defence(name, maps, labels, args.window, loops, reference, log)
        result["defences"][name]["boost"] = boost
        result["defences"][name]["scale"] = 60.0 if name == "cbn" else 1.0
        del maps
    if args.end_to_end:
        result["end_to_end"] = bench_end_to_end(args.end_to_end, args.batch, args.batches, 32, log)
    result["load_average_after"] = os.getloadavg()
    result["log"] = lines
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        write_json(args.out, result)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
