"""Certification benchmarks: each defence of bagnet_fast.certify on ImageNet-sized evidence maps
(BagNet-17 at 224: 26 x 26 x 1000, window 6 for a 32 px patch), the true class raised so that
the images are certified (the analysis runs to the last window), on the benchmark device.

"images" in extra_info are maps; "bytes" counts one read of the float32 maps (the screening
pass), so GB/s says how close a defence runs to reading its input once. No FLOPs are counted
(sums and comparisons, not arithmetic-bound). ``benchmarks/certify_speed.py`` times the same
maps against the per-image loops.
"""

from __future__ import annotations

import pytest
import torch

from bagnet_fast import certify as cf

MAPS_PER_BATCH = 12  # one CPU chunk of 26 x 26 x 1000 maps

# name: (call, logit scale). CBN's tanh(0.05 x - 1) needs logits in the tens to vary.
DEFENCES = {
    "masking": (lambda x, y: cf.masking(x, y, 6), 1.0),
    "masking-clip-threshold": (lambda x, y: cf.masking(x, y, 6, clip=2.0, threshold=0.2), 1.0),
    "cbn": (lambda x, y: cf.clipping(x, y, 6), 60.0),
    "cbn-sound": (lambda x, y: cf.clipping(x, y, 6, sound=True), 60.0),
    "detection": (lambda x, y: cf.detection(x, y, 6, 0.5), 1.0),
}


@pytest.fixture(scope="module")
def evidence_maps(settings):
    cache = {}

    def get(count: int, scale: float):
        if (count, scale) not in cache:
            generator = torch.Generator().manual_seed(0)
            maps = torch.randn(count, 26, 26, 1000, generator=generator)
            labels = torch.randint(0, 1000, (count,), generator=generator)
            maps[torch.arange(count), :, :, labels] += 2.0
            cache[(count, scale)] = ((maps * scale).to(settings.device), labels.to(settings.device))
        return cache[(count, scale)]

    return get


@pytest.mark.parametrize("defence", sorted(DEFENCES))
def test_certify(defence, batch, evidence_maps, run_timed):
    function, scale = DEFENCES[defence]
    maps, labels = evidence_maps(MAPS_PER_BATCH * batch, scale)
    run_timed(function, (maps, labels), images=maps.shape[0], flops=0, bytes=maps.numel() * 4,
              group=f"certify-{defence}", extra={"defence": defence, "window": 6})
