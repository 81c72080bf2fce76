"""An analytic performance model of the fast BagNet's Triton path on an H200: per plan unit at
a batch, the GEMMs it launches, their FLOPs, HBM bytes, tile efficiency and launches, and from
them a PREDICTED time per unit and img/s. Predictions, not measurements: the GPU check
(benchmarks/gpu_check.py) prints every unit's measured time next to the prediction, so the first
run shows at once which assumption below was wrong.

    python benchmarks/gpu_model.py [--model bagnet33] [--batch 256] [--image 224]

Per GEMM (M pixels × K reduction × N channels, tile BLOCK_M × BLOCK_N × BLOCK_K):
- tile efficiency = M / (BLOCK_M·⌈M/BLOCK_M⌉) · N / (BLOCK_N·⌈N/BLOCK_N⌉) · K / K_padded, where
  K_padded pads each tap's channels to BLOCK_K (the stem: 9 taps × 16 = 144 lanes for 27) unless
  the taps are flattened (⌈27/32⌉·32 = 32);
- compute s = 2·M·N·K / (PEAK · MAINLOOP_EFFICIENCY[BLOCK_K] · tile efficiency);
- memory s = bytes / (BANDWIDTH · BANDWIDTH_EFFICIENCY), bytes = the activations read once per
  column tile in plain launch order (the grid's row tile fastest: an activation matrix larger
  than the L2 is streamed again for every column tile) or once in grouped order, the weights,
  the output, the residual;
- time = max(compute, memory) + LAUNCH_S per launch.
A fused pointwise bottleneck is one kernel over x (read once, written once) whose three GEMMs
run back to back: compute at the same efficiencies, memory at POINTWISE_BANDWIDTH_EFFICIENCY.

The constants are GPU_REVIEW.md's (§3.2: 790 TFLOP/s bf16, 4.3 TB/s, 45-60 % of peak for the
GEMMs, 60-70 % of bandwidth, the fused pointwise kernel at 0.6× that bandwidth as written); which
kernel features are on is ``Features`` (``BEFORE``: the kernels up to commit a8f5abc; ``NOW``:
this tree).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# H200 SXM, bf16 dense: the sustained tensor-core rate of GPU_REVIEW.md (the spec sheet's 989 at
# boost clock is not sustained under load) and the HBM3e bandwidth reachable by copies (spec 4.8).
PEAK_FLOPS = 790e12
BANDWIDTH = 4.3e12
L2_BYTES = 50e6  # of the 60 MB L2, what one stream's working set can count on
# Fraction of PEAK a pipelined wgmma main loop reaches per reduction step width: a 32-wide step
# feeds each wgmma 2 k-slices of 16 and pays the loop's barriers per FLOP twice (GPU_REVIEW.md
# S2: 45 % for the 32-wide tiles as written, 60 % for 128×128×64).
MAINLOOP_EFFICIENCY = {16: 0.30, 32: 0.45, 64: 0.60}
BANDWIDTH_EFFICIENCY = 0.65
# The fused pointwise kernel: 0.6 × 0.65 as written (each wgmma of the expansion waited for at
# once, the residual load synchronous); with the expansion pipelined one chunk ahead, assumed
# 0.8 × 0.65.
POINTWISE_BANDWIDTH_EFFICIENCY = {False: 0.39, True: 0.52}
LAUNCH_S = 4e-6  # per launch at batch 256: the ramp-up and tail of a grid, not the CPU's launch cost
BLOCK_M = 128
BLOCK_N = 128


@dataclass(frozen=True)
class Features:
    """Which of issue 17's kernel changes the modelled kernels have."""

    grouped_order: bool  # GROUP_M swizzle: activations read from HBM once, not once per column tile
    block_k: int  # the bf16 conv tiles' reduction step
    fused_downsample: bool  # conv3 + downsample as one GEMM: the residual never goes to HBM
    flat_stem: bool  # the stem reduces over 27 lanes, not 9 taps × 16
    pipelined_pointwise: bool  # the fused kernel's expansion loop pipelined by hand
    fused_planes: int = 128  # widest P the fused pointwise kernel runs (stage 3 is P = 256)


BEFORE = Features(grouped_order=False, block_k=32, fused_downsample=False, flat_stem=False,
                  pipelined_pointwise=False)
NOW = Features(grouped_order=True, block_k=64, fused_downsample=True, flat_stem=True, pipelined_pointwise=True)


@dataclass
class Gemm:
    name: str
    m: int  # output pixels
    n: int  # output channels
    k: int  # useful reduction lanes
    k_padded: int  # reduction lanes the MMA runs
    block_k: int
    a_bytes: int  # the activation operand, read once
    out_bytes: int
    extra_bytes: int = 0  # weights, residual

    @property
    def flops(self) -> int:
        return 2 * self.m * self.n * self.k

    @property
    def block_n(self) -> int:
        return min(BLOCK_N, 1 << max(4, math.ceil(math.log2(self.n))))

    @property
    def tile_efficiency(self) -> float:
        m_eff = self.m / (BLOCK_M * math.ceil(self.m / BLOCK_M))
        n_eff = self.n / (self.block_n * math.ceil(self.n / self.block_n))
        return m_eff * n_eff * self.k / self.k_padded

    def hbm_bytes(self, grouped: bool) -> int:
        column_tiles = math.ceil(self.n / self.block_n)
        rereads = 1 if grouped or self.a_bytes <= L2_BYTES else column_tiles
        return self.a_bytes * rereads + self.out_bytes + self.extra_bytes

    def compute_s(self) -> float:
        return self.flops / (PEAK_FLOPS * MAINLOOP_EFFICIENCY[self.block_k] * self.tile_efficiency)


@dataclass
class UnitPrediction:
    name: str
    kind: str
    gemms: List[Gemm] = field(default_factory=list)
    flops: int = 0
    hbm_bytes: int = 0
    launches: int = 0
    seconds: float = 0.0
    bound: str = ""
    tile_efficiency: Optional[float] = None  # the worst of its GEMMs'

    def as_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "gflop": self.flops / 1e9, "hbm_gb": self.hbm_bytes / 1e9,
                "launches": self.launches, "predicted_ms": self.seconds * 1e3, "bound": self.bound,
                "tile_efficiency": self.tile_efficiency}


def _conv_gemm(name, conv, n, h, w, itemsize, block_k, flat=False, residual_bytes=0):
    """The implicit GEMM of a plan conv on (n, Cin, h, w) and its output (h, w)."""
    cout, cin, k, _ = conv.weight.shape
    ho, wo = (h - k) // conv.stride + 1, (w - k) // conv.stride + 1
    if flat:
        step = 32  # FLAT_TAPS: one 32-wide step per 27 lanes
        k_padded = math.ceil(cin * k * k / step) * step
    else:
        step = min(block_k, max(16, 1 << math.ceil(math.log2(cin))))  # the fit to small Cin
        k_padded = k * k * math.ceil(cin / step) * step
    # A k×k conv gathers overlapping windows: its activation traffic is the input map once
    # (neighbouring output pixels share their taps through L1/L2), not M·K elements.
    gemm = Gemm(name, n * ho * wo, cout, cin * k * k, k_padded, step, n * cin * h * w * itemsize,
                n * cout * ho * wo * itemsize, conv.weight.numel() * itemsize + residual_bytes)
    return gemm, ho, wo


def predict(plan, batch: int = 256, image: int = 224, features: Features = NOW, itemsize: int = 2) -> List[UnitPrediction]:
    """Predicted cost of every unit of ``plan`` (geometry only: the weights may be on meta) and
    the head, for batch × 3 × image × image in a 16-bit dtype on the Triton backend."""
    n, (h, w) = batch, plan.input_extent(image, image)  # the corner the plan reads (217 at 224)
    units = []
    for unit in plan.units:
        pred = UnitPrediction(unit.name, unit.kind)
        bk = features.block_k
        if unit.kind == "stem_conv_bias_relu":
            gemm, h, w = _conv_gemm("stem", unit.conv, n, h, w, itemsize, bk, flat=features.flat_stem)
            pred.gemms = [gemm]
        elif unit.kind == "pointwise_bottleneck" and unit.conv1.weight.shape[0] <= features.fused_planes:
            # One kernel: x (m × C) read once and written once, the three GEMMs (C -> P -> P -> C)
            # on chip; its pixel tiles are 64 rows (POINTWISE_TILES) and P is a power of two.
            c, p = unit.in_channels, unit.conv1.weight.shape[0]
            m = n * h * w
            pred.flops = 2 * m * (c * p + p * p + p * c)
            pred.tile_efficiency = m / (64 * math.ceil(m / 64))
            pred.hbm_bytes = (2 * m * c + sum(conv.weight.numel() for conv in unit.convolutions())) * itemsize
            compute = pred.flops / (PEAK_FLOPS * MAINLOOP_EFFICIENCY[64] * pred.tile_efficiency)
            memory = pred.hbm_bytes / (BANDWIDTH * POINTWISE_BANDWIDTH_EFFICIENCY[features.pipelined_pointwise])
            pred.launches = 1
            pred.seconds, pred.bound = max(compute, memory) + LAUNCH_S, "compute" if compute >= memory else "memory"
            units.append(pred)
            continue
        else:
            g1, h1, w1 = _conv_gemm(f"{unit.name} conv1", unit.conv1, n, h, w, itemsize, bk)
            g2, h2, w2 = _conv_gemm(f"{unit.name} conv2", unit.conv2, n, h1, w1, itemsize, bk)
            residual = n * unit.out_channels * h2 * w2 * itemsize
            pred.gemms = [g1, g2]
            if unit.downsample is not None:
                # The downsample reads the block input subsampled to (h2, w2) pixels.
                xs_bytes = n * unit.in_channels * h2 * w2 * itemsize
                g3, _, _ = _conv_gemm(f"{unit.name} conv3", unit.conv3, n, h2, w2, itemsize, bk)
                if features.fused_downsample:  # one GEMM over K = P + Cin; no residual traffic
                    g3.k += unit.in_channels
                    g3.k_padded += math.ceil(unit.in_channels / g3.block_k) * g3.block_k
                    g3.a_bytes += xs_bytes
                    g3.extra_bytes += unit.downsample.weight.numel() * itemsize
                    g3.name += " + downsample"
                    pred.gemms.append(g3)
                else:  # the downsample's output is written, then read as conv3's residual
                    gd = Gemm(f"{unit.name} downsample", n * h2 * w2, unit.out_channels, unit.in_channels,
                              math.ceil(unit.in_channels / bk) * bk, bk, xs_bytes, residual,
                              unit.downsample.weight.numel() * itemsize)
                    g3.extra_bytes += residual
                    pred.gemms += [gd, g3]
            else:  # a split pointwise block: the cropped input is the residual
                g3, _, _ = _conv_gemm(f"{unit.name} conv3", unit.conv3, n, h2, w2, itemsize, bk,
                                      residual_bytes=n * unit.in_channels * h2 * w2 * itemsize)
                pred.gemms.append(g3)
            h, w = h2, w2
        compute = sum(g.compute_s() for g in pred.gemms)
        memory = sum(g.hbm_bytes(features.grouped_order) for g in pred.gemms) / (BANDWIDTH * BANDWIDTH_EFFICIENCY)
        pred.flops = sum(g.flops for g in pred.gemms)
        pred.hbm_bytes = sum(g.hbm_bytes(features.grouped_order) for g in pred.gemms)
        pred.launches = len(pred.gemms)
        pred.tile_efficiency = min(g.tile_efficiency for g in pred.gemms)
        # Per GEMM the slower of its two limits: the units' GEMMs run one after the other.
        pred.seconds = sum(max(g.compute_s(), g.hbm_bytes(features.grouped_order) / (BANDWIDTH * BANDWIDTH_EFFICIENCY))
                           for g in pred.gemms) + LAUNCH_S * pred.launches
        pred.bound = "compute" if compute >= memory else "memory"
        units.append(pred)
    classes, channels = plan.fc_weight.shape
    head = UnitPrediction("head", "spatial_mean_linear", flops=2 * n * channels * classes,
                          hbm_bytes=(channels * classes + n * classes) * itemsize, launches=1)
    head.seconds, head.bound = head.hbm_bytes / (BANDWIDTH * BANDWIDTH_EFFICIENCY) + LAUNCH_S, "memory"
    units.append(head)
    return units


def images_per_s(units: List[UnitPrediction], batch: int) -> float:
    return batch / sum(u.seconds for u in units)


def plan_for(model_name: str = "bagnet33"):
    """A plan's geometry without weights worth keeping: the compile counter's meta plan."""
    import torch

    import gpu_compile_count

    return gpu_compile_count.meta_plan(model_name, torch.bfloat16)


def table(units: List[UnitPrediction], other: Optional[List[UnitPrediction]] = None) -> str:
    head = "| unit | kind | GFLOP | HBM GB | launches | min tile eff. | bound | predicted ms |"
    lines = [head + (" before ms |" if other else ""), "|---|---|---:|---:|---:|---:|---|---:|" + ("---:|" if other else "")]
    before: Dict[str, UnitPrediction] = {u.name: u for u in other or []}
    for u in units:
        d = u.as_dict()
        eff = "–" if d["tile_efficiency"] is None else f"{d['tile_efficiency']:.2f}"
        lines.append(f"| {u.name} | {u.kind} | {d['gflop']:.0f} | {d['hbm_gb']:.2f} | {u.launches} | {eff} | {u.bound} | "
                     f"{d['predicted_ms']:.2f} |" + (f" {before[u.name].seconds * 1e3:.2f} |" if u.name in before else ""))
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bagnet33")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--image", type=int, default=224)
    args = parser.parse_args(argv)
    plan = plan_for(args.model)
    now, before = (predict(plan, args.batch, args.image, f) for f in (NOW, BEFORE))
    print(f"PREDICTED (not measured): {args.model} bf16, Triton backend, batch {args.batch}, {args.image} px, H200\n")
    print(table(now, before))
    for label, units in (("these kernels", now), ("kernels before issue 17 (a8f5abc)", before),
                         ("these + stage-3 fused (P = 256, not built)", predict(plan, args.batch, args.image,
                                                                               replace(NOW, fused_planes=256)))):
        total = sum(u.seconds for u in units)
        print(f"\n{label}: {total * 1e3:.1f} ms per batch, {images_per_s(units, args.batch):,.0f} img/s, "
              f"{sum(u.launches for u in units)} launches")
    return 0


if __name__ == "__main__":
    sys.exit(main())
