"""FLOP and byte counting (bagnet_fast.flops): hand-computed layers, the totals of BAGNET_SPEC.md,
and torch.utils.flop_counter on real forwards."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import bagnet_fast
from bagnet_fast import flops

from conftest import make_model

# BAGNET_SPEC.md, "Builders": GFLOP at 224x224 (2 per multiply-add, torch.utils.flop_counter).
SPEC_GFLOP_224 = {"bagnet9": 31.86, "bagnet17": 31.31, "bagnet33": 32.52, "resnet50": 8.18}
IMAGE_224 = (1, 3, 224, 224)


def _by_name(costs):
    return {c.name: c for c in costs}


@pytest.fixture(scope="module")
def bagnet33_costs(models):
    return _by_name(flops.reference_layer_costs(models["bagnet33"], IMAGE_224))


@pytest.mark.parametrize("name", ["bagnet9", "bagnet17", "bagnet33"])
def test_reference_totals_match_spec(models, name):
    total_flops, _ = flops.total(flops.reference_layer_costs(models[name], IMAGE_224))
    assert round(total_flops / 1e9, 2) == SPEC_GFLOP_224[name]


def test_resnet50_total_matches_spec():
    torchvision = pytest.importorskip("torchvision")
    total_flops, _ = flops.total(flops.reference_layer_costs(torchvision.models.resnet50(), IMAGE_224))
    assert round(total_flops / 1e9, 2) == SPEC_GFLOP_224["resnet50"]


def test_hand_computed_layers(bagnet33_costs):
    # Stem conv2: 3x3 64->64 on 224x224 -> 222x222 (BAGNET_SPEC.md: 3.63 GFLOP).
    assert bagnet33_costs["conv2"].flops == 2 * 222 * 222 * 64 * 64 * 9
    assert bagnet33_costs["conv2"].output_shape == (1, 64, 222, 222)
    # layer4.0.conv2: 3x3 512->512, stride 1, 26x26 -> 24x24 (2.72 GFLOP).
    assert bagnet33_costs["layer4.0.conv2"].flops == 2 * 24 * 24 * 512 * 512 * 9
    # layer4.0.downsample: 1x1 1024->2048 at 26x26, before the crop (2.84 GFLOP).
    assert bagnet33_costs["layer4.0.downsample.0"].flops == 2 * 26 * 26 * 1024 * 2048
    # fc: 2048 -> 1000 on the pooled features.
    assert bagnet33_costs["fc"].flops == 2 * 2048 * 1000


def test_hand_computed_bytes(bagnet33_costs):
    # conv1 1x1 3->64 at 224x224, float32: input + output + weight, 4 bytes each.
    assert bagnet33_costs["conv1"].bytes == (3 * 224 * 224 + 64 * 224 * 224 + 64 * 3) * 4
    # bn1 on (1, 64, 222, 222): read + write, and weight, bias, running mean and var
    # (num_batches_tracked is an integer counter, not read by the eval forward).
    assert bagnet33_costs["bn1"].bytes == (2 * 64 * 222 * 222 + 4 * 64) * 4
    assert bagnet33_costs["bn1"].flops == 0
    # The blocks' ReLU module is called three times per block: one row per call.
    assert {"layer1.0.relu", "layer1.0.relu[2]", "layer1.0.relu[3]"} <= set(bagnet33_costs)


def test_stage_totals_match_spec(bagnet33_costs):
    # BAGNET_SPEC.md, "Where the work is": layer1 3.88, layer2 5.41, layer3 6.67, layer4 12.91.
    stages = flops.stage_totals(list(bagnet33_costs.values()))
    assert [round(stages[s]["flops"] / 1e9, 2) for s in ("layer1", "layer2", "layer3", "layer4")] == [
        3.88, 5.41, 6.67, 12.91]
    assert stages["layer4"]["output_hw"] == (24, 24)
    assert stages["stem"]["output_hw"] == (222, 222)


def test_bytes_scale_with_dtype(models):
    f32 = flops.reference_layer_costs(models["bagnet9"], (1, 3, 64, 64), torch.float32)
    bf16 = flops.reference_layer_costs(models["bagnet9"], (1, 3, 64, 64), torch.bfloat16)
    assert [c.flops for c in f32] == [c.flops for c in bf16]
    assert [c.bytes for c in f32] == [2 * c.bytes for c in bf16]


@pytest.mark.parametrize("name", ["bagnet9", "bagnet33"])
def test_reference_matches_flop_counter(models, name):
    """The meta-device count equals torch's FlopCounterMode on a real forward (and the model
    is left untouched by the counting)."""
    model = models[name]
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.reference_forward(x)
    assert flops.total(flops.reference_layer_costs(model, x.shape))[0] == counter.get_total_flops()
    assert model.fc.weight.device.type == "cpu"


@pytest.mark.parametrize("name", ["bagnet9", "bagnet17", "bagnet33"])
def test_plan_matches_flop_counter(name):
    """Plan unit FLOPs equal FlopCounterMode on the plan run by the pure-PyTorch backend (its
    convolutions and linear layers are exactly what the plan computes)."""
    model = make_model(name)
    plan = bagnet_fast.build_plan(model, "torch")
    x = torch.randn(1, 3, 71, 64)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        plan.run(x)
    costs = flops.plan_unit_costs(plan, x.shape)
    assert flops.total(costs)[0] == counter.get_total_flops()
    assert [c.name for c in costs][:3] == ["stem", "layer1.0", "layer1.1"]
    assert costs[-1].name == "head" and len(costs) == 18


def test_plan_units_hand_computed(models):
    plan = bagnet_fast.build_plan(models["bagnet33"], "torch")
    costs = _by_name(flops.plan_unit_costs(plan, IMAGE_224))
    # The plan reads the 217x217 corner its 24x24 patches depend on ((24 - 1) * 8 + 33).
    assert costs["stem"].input_shape == (1, 3, 217, 217)
    # Merged stem: one 3x3 conv 3->64 (the 1x1 3->64 and 3x3 64->64 of the reference in one).
    assert costs["stem"].flops == 2 * 215 * 215 * 64 * 3 * 9
    # layer4.1: fused 1x1 block 2048->512->512->2048 at 24x24; reads and writes x once.
    assert costs["layer4.1"].kind == "pointwise_bottleneck"
    assert costs["layer4.1"].flops == 2 * 24 * 24 * (2048 * 512 + 512 * 512 + 512 * 2048)
    weights = 2048 * 512 * 2 + 512 * 512 + 512 * 2 + 2048
    assert costs["layer4.1"].bytes == (2 * 2048 * 24 * 24 + weights) * 4
    # layer4.0's downsample reads only the 24x24 pixels the crop keeps (26x26 in the reference).
    # conv1 1x1 1024->512 at 26x26, conv2 3x3 512->512 -> 24x24, downsample, conv3 512->2048.
    layer4_0 = 2 * (26 * 26 * 1024 * 512 + 24 * 24 * (512 * 512 * 9 + 1024 * 2048 + 512 * 2048))
    assert costs["layer4.0"].flops == layer4_0
    assert costs["head"].flops == 2 * 2048 * 1000


def test_plan_patch_logits_head(models):
    plan = bagnet_fast.build_plan(models["bagnet9"], "torch")
    head = flops.plan_unit_costs(plan, (1, 3, 64, 64), avg_pool=False)[-1]
    assert head.kind == "patch_logits" and head.output_shape == (1, 7, 7, 1000)
    assert head.flops == 2 * 7 * 7 * 2048 * 1000


def test_intensity_and_stage_names():
    cost = flops.Cost("layer2.3.conv1", "Conv2d 1x1/1", (1, 512, 8, 8), (1, 128, 8, 8), 100, 50)
    assert cost.intensity == 2.0 and cost.stage == "layer2"
    assert [flops.stage_of(n) for n in ("conv1", "bn1", "maxpool", "fc", "avgpool", "head")] == [
        "stem", "stem", "stem", "head", "head", "head"]
