"""bagnet_fast against what a CPU user would run instead: ONNX Runtime and OpenVINO on the
exported reference graph (bagnet_fast.peers), BagNet-9/17/33, same input, alternating call by call
over several rounds (the 2-core machine is noisy: a slow stretch hits every implementation
alike), the median per implementation, and per pair the median of the per-round ratios with a
distribution-free 95 % interval (bagnet_fast.timing.paired_ratio). Random weights with
non-trivial BatchNorm statistics (tests/conftest.py: randomize_batchnorm), so no block is dead.

The reference and each peer run in a worker process of their own, driven call by call from the
main process, which runs bagnet_fast: each implementation runs as a user would run it alone. One
process for all would not: bagnet_fast's cpu backend sets the process's allocator
(bagnet_fast/executors/cpu_memory.py), which sped up the reference and slowed OpenVINO in the
same process (results/2026-12-02-s5-cpu-avx2-2core-peers/peers-224-one-process-*.json: OpenVINO
BagNet-33 batch 8 5.92 img/s beside bagnet_fast with glibc's defaults, 4.53 beside it with the
setting). A pause of PAUSE_S between calls lets the previous implementation's threads stop
spinning: OpenVINO's idle workers spin for several hundred ms and, with 0.05 s or 0.3 s pauses,
bagnet_fast ran at a third to a half of its speed in the call after an OpenVINO call.

    python benchmarks/peers_speed.py --models bagnet9,bagnet17,bagnet33 --batches 1,2,8 [--bf16] \\
        --out benchmarks/results/<file>.json
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import bagnet_fast  # noqa: E402
from bagnet_fast import peers, timing  # noqa: E402
from bagnet_fast.plan import get_plan  # noqa: E402
from conftest import randomize_batchnorm  # noqa: E402
from test_dead_branches import dead_pattern_model  # noqa: E402


PAUSE_S = 1.0  # between calls: OpenVINO's (TBB) and OpenMP workers spin for a while after their work


def timed_call(fn, x, warm_calls: int) -> float:
    """Seconds of one call of fn(x) after ``warm_calls`` untimed ones (--warm-calls)."""
    for _ in range(warm_calls):
        fn(x)
    start = time.perf_counter()
    fn(x)
    return time.perf_counter() - start


def make_case(name: str, batch: int, size: int, weights: str = "random"):
    """weights "random": random convolutions, non-trivial BatchNorm statistics, no dead block;
    "dead-pattern": BagNet-33 with the official weights' five dead blocks and one near-dead
    (tests/test_dead_branches.py: dead_pattern_model), which the plan eliminates and the peers,
    like the reference, compute."""
    if weights == "dead-pattern":
        model = dead_pattern_model(name)
    else:
        torch.manual_seed(0)
        model = randomize_batchnorm(getattr(bagnet_fast, name)(), 0).eval()
    return model, torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def worker(conn, implementation: str, name: str, batch: int, size: int, onnx_path: str, threads: int,
           weights: str = "random") -> None:
    """Builds ``implementation`` (the reference or a peer); each message n runs n untimed calls
    and answers with the seconds of one more call, "stop" ends it. The first message it sends:
    (logits, precision/setup notes)."""
    torch.set_num_threads(threads)
    model, x = make_case(name, batch, size, weights)
    notes = {}
    if implementation == "reference eager NCHW":
        fn = model.reference_forward
    elif implementation == "reference eager bf16 NCHW":
        # PyTorch's own bf16 (model.to(torch.bfloat16), bf16 images): the error yardstick of the
        # fast bf16 plan, and what a PyTorch user would try first.
        model = model.to(torch.bfloat16)
        fn = lambda images: model.reference_forward(images.bfloat16()).float()  # noqa: E731
    else:
        peer = peers.peer_runner(implementation, model, tuple(x.shape), threads, onnx_path)
        fn = peer["fn"]
        notes = {key: peer[key] for key in ("precision", "setup_seconds", "note")}
    with torch.inference_mode():
        conn.send((fn(x).numpy(), notes))
        fn(x)  # warm-up
        while True:
            message = conn.recv()
            if message == "stop":
                break
            conn.send(timed_call(fn, x, message))


def measure_case(name, batch, size, rounds, folder, bf16=False, warm_calls=0, weights="random"):
    model, x = make_case(name, batch, size, weights)
    threads = torch.get_num_threads()
    onnx_path = str(Path(folder) / f"{name}-{batch}x{size}.onnx")
    peers.export_onnx(model, tuple(x.shape), onnx_path)  # once, before any plan (no allocator setting yet)
    context = multiprocessing.get_context("spawn")
    others = ["reference eager NCHW"] + (["reference eager bf16 NCHW"] if bf16 else [])
    for peer in peers.PEERS:
        problem = peers.why_not(peer)
        if problem:
            print(f"  {peer}: not run: {problem}", flush=True)
        else:
            others.append(peer)
    workers, outputs, notes = {}, {}, {}
    for implementation in others:
        ours, theirs = context.Pipe()
        process = context.Process(target=worker, args=(theirs, implementation, name, batch, size, onnx_path, threads, weights))
        process.start()
        workers[implementation] = (ours, process)
    for implementation, (conn, _) in workers.items():
        outputs[implementation], notes[implementation] = conn.recv()

    # bagnet_fast's rows run in this process: fp32, and with --bf16 the same weights in bf16 on
    # bf16 images (the cpu backend's bf16 plan where the CPU has bf16 units).
    ours = {"bagnet_fast": (model, x)}
    if bf16:
        ours["bagnet_fast bf16"] = (copy.deepcopy(model).to(torch.bfloat16), x.bfloat16())
    backends_ran = {}

    times = {implementation: [] for implementation in [*ours, *others]}
    with torch.inference_mode():
        for implementation, (fast, images) in ours.items():
            outputs[implementation] = fast(images).float().numpy()
            fast(images)  # warm-up
            backends_ran[implementation] = get_plan(fast).backend.name
        for _ in range(rounds):
            for implementation in times:
                time.sleep(PAUSE_S)
                if implementation in ours:
                    times[implementation].append(timed_call(*ours[implementation], warm_calls))
                else:
                    conn = workers[implementation][0]
                    conn.send(warm_calls)
                    times[implementation].append(conn.recv())
    for conn, process in workers.values():
        conn.send("stop")
        process.join()
    expected = torch.from_numpy(outputs["reference eager NCHW"])
    scale = expected.abs().max().item()
    rows = {}
    for impl, t in times.items():
        output = torch.from_numpy(outputs[impl])
        rows[impl] = {"seconds": t, "images_per_second": batch / statistics.median(t),
                      "max_abs_diff_vs_reference": (output - expected).abs().max().item(),
                      "max_rel_diff_vs_reference": (output - expected).abs().max().item() / scale,
                      "top1_agreement_vs_reference": (output.argmax(1) == expected.argmax(1)).float().mean().item(),
                      **notes.get(impl, {})}
        if impl in backends_ran:
            rows[impl]["backend"] = backends_ran[impl]
    fast = rows["bagnet_fast"]["images_per_second"]
    ratios = {f"fast / {impl}": fast / row["images_per_second"] for impl, row in rows.items() if impl not in ours}
    paired = {f"fast / {impl}": timing.paired_ratio(times[impl], times["bagnet_fast"]) for impl in others}
    if bf16:
        fast16 = rows["bagnet_fast bf16"]["images_per_second"]
        theirs = [impl for impl in ("reference eager bf16 NCHW", "openvino bf16 (reference graph)", "bagnet_fast") if impl in rows]
        ratios.update({f"fast bf16 / {impl}": fast16 / rows[impl]["images_per_second"] for impl in theirs})
        paired.update({f"fast bf16 / {impl}": timing.paired_ratio(times[impl], times["bagnet_fast bf16"]) for impl in theirs})
    # ratios: of the medians; paired_ratios: the median of per-round ratios with its 95 % interval
    return {"model": name, "batch": batch, "size": size, "rows": rows, "ratios": ratios, "paired_ratios": paired}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="bagnet9,bagnet17,bagnet33")
    parser.add_argument("--batches", default="1,2,8")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--bf16", action="store_true",
                        help="add bagnet_fast in bf16 and the reference modules in bf16 (OpenVINO bf16 runs whenever the CPU has bf16 units)")
    parser.add_argument("--warm-calls", type=int, default=0,
                        help="untimed calls before the timed one in each turn: 0 times a call after the "
                             "pause, with caches holding the previous implementation's data; 1 or more "
                             "times back-to-back calls, as a loop over batches runs them")
    parser.add_argument("--weights", default="random", choices=("random", "dead-pattern"),
                        help="dead-pattern: BagNet-33 with the official weights' dead blocks (see make_case)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.weights == "dead-pattern" and args.models != "bagnet33":
        parser.error("--weights dead-pattern is the official BagNet-33 weights' pattern: use --models bagnet33")
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"{out} exists: choose another --out (results are never overwritten)")
    result = {"weights": args.weights, "warm_calls": args.warm_calls, "cpu": timing.cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "versions": peers.versions(), "date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(sys.argv),
              "cases": []}
    folder = str(out.parent / (out.stem + "-onnx-tmp"))
    Path(folder).mkdir(parents=True, exist_ok=True)
    try:
        for name in args.models.split(","):
            for batch in (int(b) for b in args.batches.split(",")):
                case = measure_case(name, batch, args.size, args.rounds, folder, args.bf16, args.warm_calls, args.weights)
                result["cases"].append(case)
                rates = ", ".join(f"{impl} {row['images_per_second']:.2f}" for impl, row in case["rows"].items())
                print(f"{name} b{batch}: {rates} img/s", flush=True)
                for key, ratio in case["ratios"].items():
                    pair = case["paired_ratios"][key]
                    interval = (f"[{pair['low']:.2f}, {pair['high']:.2f}]" if pair["low"] is not None
                                else "(too few rounds for a 95 % interval)")
                    print(f"  {key}: {ratio:.2f}x of medians; per round {pair['median']:.2f}x {interval}", flush=True)
                out.write_text(json.dumps(result, indent=1))  # after every case: nothing lost on a crash
    finally:
        for path in Path(folder).glob("*.onnx"):
            path.unlink()
        Path(folder).rmdir()
    print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
