"""benchmarks/gpu_model.py, the analytic H200 model of the Triton path: its bookkeeping against
the plan's own FLOP count, and each kernel feature moving the term it models. What the
constants predict is checked by the GPU run (gpu_check.py prints measured next to predicted),
not here. About 5 s (the meta plan)."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import pytest

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (the meta plan uses the Triton backend)", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_model as model  # noqa: E402

from bagnet_fast import flops  # noqa: E402

BATCH = 256


@pytest.fixture(scope="module")
def plan():
    return model.plan_for("bagnet33")


def by_name(units):
    return {u.name: u for u in units}


def test_flops_are_the_plans_own_count(plan):
    counted = {c.name: c.flops for c in flops.plan_unit_costs(plan, (BATCH, 3, 224, 224))}
    for unit in model.predict(plan, BATCH):
        assert unit.flops == counted[unit.name], unit.name


def test_every_feature_moves_its_term(plan):
    before = by_name(model.predict(plan, BATCH, features=model.BEFORE))
    now = by_name(model.predict(plan, BATCH, features=model.NOW))
    # The stem's reduction: 9 taps × 16 lanes = 144 for 27 before, one 32-wide step flattened.
    assert (before["stem"].gemms[0].k_padded, now["stem"].gemms[0].k_padded) == (144, 32)
    # conv3 + downsample in one GEMM: one launch fewer, and the residual (N·256·107·107 bf16 at
    # layer1.0 on the 217² input corner, 1.50 GB) neither written nor read.
    residual = BATCH * 256 * 107 * 107 * 2
    assert before["layer1.0"].launches - now["layer1.0"].launches == 1
    grouped_before = model.predict(plan, BATCH, features=replace(model.BEFORE, grouped_order=True))
    assert by_name(grouped_before)["layer1.0"].hbm_bytes - now["layer1.0"].hbm_bytes >= 2 * residual
    # Grouped order: layer4.0's conv3 (N = 2048, 16 column tiles) no longer streams its
    # activations 16 times.
    plain = model.predict(plan, BATCH, features=replace(model.NOW, grouped_order=False))
    assert by_name(plain)["layer4.0"].hbm_bytes > 3 * now["layer4.0"].hbm_bytes
    # The pipelined expansion loop: the fused (memory-bound) blocks get faster, nothing else.
    unpipelined = by_name(model.predict(plan, BATCH, features=replace(model.NOW, pipelined_pointwise=False)))
    assert unpipelined["layer1.1"].seconds > now["layer1.1"].seconds
    assert unpipelined["layer3.1"].seconds == now["layer3.1"].seconds  # P = 256: split, not fused
    for name, unit in now.items():
        assert unit.seconds <= before[name].seconds, name


def test_totals(plan):
    now = model.predict(plan, BATCH)
    before = model.predict(plan, BATCH, features=model.BEFORE)
    # GPU_REVIEW.md's own model put the kernels as written at 28.5-31 ms (≈ 8.5k img/s).
    assert 6_500 <= model.images_per_s(before, BATCH) <= 10_500
    assert model.images_per_s(now, BATCH) > 1.3 * model.images_per_s(before, BATCH)
    # The Triton launches of a BagNet-33 forward (tests/test_compile_budget.py) + the head's.
    assert sum(u.launches for u in now) == 39 + 1
    assert "predicted ms" in model.table(now, before)
