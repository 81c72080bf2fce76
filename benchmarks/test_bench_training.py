"""The training step of BagNet-33 (forward + backward + SGD step, float32, 10 classes): the
official model's modules (``reference_forward``, NCHW) against bagnet_fast's training path
(merged stem, channels-last), with gradient checkpointing of every stage, of every block, and with the
elementwise checkpointing (only BatchNorm/ReLU/sums recomputed). The allocators (glibc's kept
blocks, bagnet_fast's caching allocator) are process-wide, so they are compared by
benchmarks/training_speed.py, one process per configuration. One benchmark
group per batch (batch 1 runs as 2: training BatchNorm needs 2 values per channel). FLOPs in extra_info are the reference forward's counted FLOPs x 3 (backward ~ 2x
forward, the usual estimate; the training path does fewer); img/s is the comparable number.
Memory is measured by benchmarks/training_speed.py (one process per configuration).
"""

from __future__ import annotations

import pytest
import torch

from bagnet_fast import flops, training

CONFIGS = ("official", "fast", "fast-checkpointing", "fast-block-checkpointing", "fast-elementwise-checkpointing")


@pytest.mark.parametrize("config", CONFIGS)
def test_training_step(run_timed, images, settings, config, batch):
    if "float32" not in settings.dtypes:
        pytest.skip("the training step runs in float32 (autocast is the user's choice)")
    recompute = "elementwise" if "elementwise" in config else "block" if "block" in config else "stage"
    model, forward = training.benchmark_model(
        "bagnet33", official=config == "official", device=settings.device,
        recompute=recompute if config.endswith("checkpointing") else None)
    # BatchNorm in training mode needs 2 values per channel; at small sizes the last maps are 1x1.
    batch = max(batch, 2)
    x = images(batch, "float32")
    y = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(0)).to(settings.device)
    step = training.sgd_step(model, forward, x, y)

    flop, moved = flops.total(flops.reference_layer_costs(model, x.shape, x.dtype))
    run_timed(step, images=batch, flops=3 * flop, bytes=3 * moved, group=f"train bagnet33 float32 b{batch}",
              extra={"network": "bagnet33", "implementation": config, "dtype": "float32", "batch": batch,
                     "size": settings.size}, autograd=True)
