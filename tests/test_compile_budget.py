"""The Triton compiles and autotuning benchmarks a GPU run needs, counted on the CPU
(benchmarks/gpu_compile_count.py: the plan on meta tensors, launches recorded, not run) and held
to a budget: every distinct compile costs 0.5-1.5 s of the GPU machine's short slot and every
benchmarked candidate ~30-80 ms at batch 256 (GPU_REVIEW.md §1). About 5 s.

Measured when the budget was set (BagNet-33, bf16, batches 256, 32, 1 in one process): 187
compiles for all three models × bf16/fp32 × 3 batches before ``m_bucket`` left the JIT's
specialization, 69 after; BagNet-33 bf16 alone 46 + 30 + 46 before, 46 + 0 + 0 after. With the
grouped launch order, 64-wide K tiles, the stem's flattened taps and conv3 + downsample in one
GEMM: 77 for all, BagNet-33 bf16 37 + 0 + 8 = 45 (batch 1's pixel counts prune to the 32-row
tiles, which batch 256 never compiles).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_compile_count as counter  # noqa: E402

from bagnet_fast.ops import triton_ops, triton_tuning  # noqa: E402

# Distinct compiles of one BagNet-33 bf16 process running batches 256, 32 and 1 with autotuning
# (measured: see compile_rows), and what a later batch size may add: only kernels whose
# specialization really differs (a channel count or stride that is 1 or a multiple of 16).
BF16_COMPILE_BUDGET = 48
NEW_COMPILES_PER_EXTRA_BATCH = 8
# The tests' mode (BAGNET_FAST_AUTOTUNE=0): one tile per launch.
BF16_FIXED_TILE_COMPILE_BUDGET = 20


@pytest.fixture(scope="module")
def compile_rows():
    return counter.count(["bagnet33"], ["bf16"], [256, 32, 1])


def test_bagnet33_bf16_compiles_within_budget(compile_rows):
    b256, b32, b1, total = compile_rows
    # The stem; 3 per first block of a stage (conv1, conv2, conv3 + downsample in one GEMM); 1 per
    # fused block of stages 1-2 (2 + 3); 3 per split block of stages 3-4 (5 + 2), the last with
    # the head's mean in its epilogue.
    assert b256["launches"] == 1 + 4 * 3 + 5 + 7 * 3 == 39
    assert total["compiles"] <= BF16_COMPILE_BUDGET, counter.table(compile_rows)
    for row in (b32, b1):
        assert row["new_compiles"] <= NEW_COMPILES_PER_EXTRA_BATCH, counter.table(compile_rows)


def test_candidates_per_key_are_pruned(compile_rows):
    for row in compile_rows[:-1]:
        assert row["configs_benchmarked"] <= triton_tuning.MAX_CANDIDATES * row["tuner_keys"]


def test_fixed_tile_runs_compile_one_tile_per_shape():
    rows = counter.count(["bagnet33"], ["bf16"], [256, 1], autotune=False)
    assert rows[-1]["compiles"] <= BF16_FIXED_TILE_COMPILE_BUDGET, counter.table(rows)
    assert all(row["configs_benchmarked"] == 0 for row in rows[:-1])


def test_m_bucket_is_only_an_autotuning_key():
    for kernel in (triton_ops._conv_kernels._conv_bias_act_kernel,
                   triton_ops._bottleneck_kernels._pointwise_bottleneck_kernel):
        assert "m_bucket" in counter._unspecialized(kernel), kernel.__name__


def test_the_count_sees_a_specialised_argument(monkeypatch):
    """The counter can fail: with m_bucket specialised again, batch 1 compiles anew."""
    kernel = triton_ops._conv_kernels._conv_bias_act_kernel
    names = [n for n in counter._unspecialized(kernel) if n != "m_bucket"]
    monkeypatch.setattr(counter, "_unspecialized", lambda k: names if k is kernel else ())
    rows = counter.count(["bagnet33"], ["bf16"], [256, 1])
    assert rows[1]["new_compiles"] > NEW_COMPILES_PER_EXTRA_BATCH, counter.table(rows)


def test_specialization_follows_the_jit_rules():
    # triton's rules for ints (what the counter relies on): 1 is a constant, multiples of 16 get
    # a divisibility hint, others nothing; unspecialised arguments get neither.
    assert counter.specialize(1, True) == ("constexpr", 1)
    assert counter.specialize(2, True) == ("i32", "")
    assert counter.specialize(4096, True) == ("i32", "D")
    assert counter.specialize(4096, False)[1] is None and counter.specialize(1, False)[0] == "i32"
    assert counter.specialize(2**31, True)[0] == "i64"
    x = torch.empty(4, 8, device="meta", dtype=torch.bfloat16)
    assert counter.specialize(x, True) == ("torch.bfloat16", "D")
    assert counter.specialize(x[:, 1:], True) == ("torch.bfloat16", "")  # 2-byte offset: unaligned


def _compile_check():
    """benchmarks/gpu_compile_check.py, imported without its unsetting of TRITON_INTERPRET
    leaking into this process (the interpreter tests need it)."""
    import os

    saved = os.environ.get("TRITON_INTERPRET")
    try:
        import gpu_compile_check
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    return gpu_compile_check


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_the_sm90_compile_check_covers_every_conv_variant_the_plans_launch(dtype):
    """Every constexpr combination of the conv kernel that a BagNet-9/17/33 forward launches is
    compiled by the sm_90 check (BagNet-9's stride-4 conv, since the plan moves strides up, was
    once missing from it)."""
    check = _compile_check()
    keys = check.VARIANT_CONSTEXPRS
    checked = {tuple(str(consts[k]) for k in keys) for _, kernel, consts, _, _ in check.conv_jobs(dtype, quick=True)
               if kernel is triton_ops._conv_kernels._conv_bias_act_kernel}
    launched = set()
    for name in ("bagnet9", "bagnet17", "bagnet33"):
        plan = counter.meta_plan(name, counter.DTYPES[dtype])
        for launch in counter.forward_launches(plan, 32):
            consts = dict(launch.constexprs)
            if "KSIZE" in consts:
                launched.add(tuple(str(consts[k]) for k in keys))
    assert launched and launched <= checked, sorted(launched - checked)
