"""The drop-in models: architecture, state_dict, geometry, parity, training, plan caching."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import bagnet_fast
from bagnet_fast import PATCH_SIZES
from conftest import FP32_RTOL, VARIANTS, make_model, rel_err

# BAGNET_SPEC.md: parameters of each builder with 1000 classes.
PARAMETER_COUNTS = {"bagnet9": 15_688_744, "bagnet17": 16_213_032, "bagnet33": 18_310_184}


@pytest.mark.parametrize("name", VARIANTS)
def test_state_dict_matches_reference_layout(name):
    model = getattr(bagnet_fast, name)()
    state = model.state_dict()
    assert len(state) == 321
    assert sum(p.numel() for p in model.parameters()) == PARAMETER_COUNTS[name]
    assert state["conv1.weight"].shape == (64, 3, 1, 1)
    assert state["conv2.weight"].shape == (64, 64, 3, 3)
    assert model.bn1.momentum == 0.001
    assert state["layer4.0.downsample.0.weight"].shape == (2048, 1024, 1, 1)
    assert state["fc.weight"].shape == (1000, 2048)
    for stage in range(1, 5):
        assert f"layer{stage}.0.downsample.1.running_var" in state
        assert f"layer{stage}.1.downsample.0.weight" not in state
    assert model.patch_size == PATCH_SIZES[name]


def test_kernel_sizes_follow_kernel3():
    expected = {"bagnet9": (3, 3, 1, 1), "bagnet17": (3, 3, 3, 1), "bagnet33": (3, 3, 3, 3)}
    for name, kernels in expected.items():
        model = getattr(bagnet_fast, name)()
        for stage, kernel in zip((model.layer1, model.layer2, model.layer3, model.layer4), kernels):
            assert stage[0].conv2.kernel_size == (kernel, kernel)
            assert all(block.conv2.kernel_size == (1, 1) for block in stage[1:])


@pytest.mark.parametrize("name", VARIANTS)
def test_output_geometry(name, models):
    """H' = floor((S - q) / 8) + 1 (BAGNET_SPEC.md), per dimension."""
    model = copy.deepcopy(models[name])
    model.avg_pool = False
    q = PATCH_SIZES[name]
    for size in list(range(q, q + 20, 3)) + [64, 97]:
        with torch.no_grad():
            out = model(torch.randn(1, 3, size, q + 8))
        assert out.shape == (1, (size - q) // 8 + 1, 2, 1000)


@pytest.mark.parametrize("name", VARIANTS)
def test_input_extent_is_the_smallest_corner_with_the_same_map(name, models):
    plan = bagnet_fast.build_plan(models[name], "torch")
    q = PATCH_SIZES[name]
    for size in range(q, 301):
        rows, cols = plan.input_extent(size, q + 11)
        out = (size - q) // 8 + 1
        assert (rows, cols) == ((out - 1) * 8 + q, q + 8)
        assert plan.output_size(rows, cols) == plan.output_size(size, q + 11) == (out, 2)
        assert plan.output_size(rows - 1, cols - 1) == (out - 1, 1)  # one pixel less loses a patch
    assert plan.input_extent(224, 224) == (217, 217)
    assert plan.input_extent(q - 1, 40) == (q - 1, 40)  # smaller than a patch: left as it is


@pytest.mark.parametrize("name", VARIANTS)
def test_reference_ignores_pixels_outside_the_input_extent(name, models):
    """The premise of the crop, checked on the reference itself (float64, so that each patch
    logit is the same sum whatever the pixels it does not read)."""
    model = copy.deepcopy(models[name]).double()
    model.avg_pool = False
    plan = bagnet_fast.build_plan(models[name], "torch")
    height, width = (224, 235) if name == "bagnet33" else (PATCH_SIZES[name] + 21, 64)
    rows, cols = plan.input_extent(height, width)
    assert rows < height and cols < width
    x = torch.randn(1, 3, height, width, dtype=torch.float64)
    outside, edge = x.clone(), x.clone()
    outside[..., rows:, :] = torch.randn_like(outside[..., rows:, :])
    outside[..., :, cols:] = torch.randn_like(outside[..., :, cols:])
    edge[..., rows - 1, :cols] += 1.0  # the last row inside: some patch reads it
    with torch.no_grad():
        expected, moved, changed = (model.reference_forward(t) for t in (x, outside, edge))
    assert torch.equal(moved, expected)
    assert not torch.allclose(changed[:, -1], expected[:, -1])
    with torch.no_grad():  # and the plan, on the corner only, gives the reference's numbers
        stem_inputs = []
        hook = lambda unit, run, t: (stem_inputs.append(t.shape), run(t))[1]  # noqa: E731
        fast = bagnet_fast.build_plan(models[name]).patch_logits(x.float(), hook=hook)
    assert stem_inputs[0] == (1, 3, rows, cols)
    assert rel_err(fast, expected) <= FP32_RTOL


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("batch", [1, 3])
def test_fast_forward_matches_reference(name, batch, models):
    model = models[name]
    q = PATCH_SIZES[name]
    for height, width in [(q, q), (q + 7, q + 7), (64, 64), (97, 97), (64, 97), (q, 80)]:
        x = torch.randn(batch, 3, height, width)
        with torch.no_grad():
            expected = model.reference_forward(x)
            actual = model(x)
        assert actual.shape == (batch, 1000)
        assert rel_err(actual, expected) <= FP32_RTOL, (height, width)
    assert bagnet_fast.get_plan(model).backend.name == "cpu"


def test_single_pixel_maps_reach_onednn_with_contiguous_strides():
    # Images of exactly the patch size end in 1x1 maps. oneDNN's outputs carry channels-last
    # strides (C, 1, C, C), which torch 2.11's binary-post-op convolution rejects ("could not
    # create a memory"); the cpu backend passes the same memory with contiguous strides instead.
    from bagnet_fast.executors.cpu_backend import _canonical_single_pixel

    x = torch.randn(2, 8, 1, 1).as_strided((2, 8, 1, 1), (8, 1, 8, 8))
    y = _canonical_single_pixel(x)
    assert y.stride() == (8, 1, 1, 1) and y.data_ptr() == x.data_ptr() and torch.equal(y, x)
    z = torch.randn(2, 8, 3, 3).contiguous(memory_format=torch.channels_last)
    assert _canonical_single_pixel(z) is z


@pytest.mark.parametrize("name", VARIANTS)
def test_fast_forward_matches_reference_224(name, models):
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        expected = models[name].reference_forward(x)
        actual = models[name](x)
    assert rel_err(actual, expected) <= FP32_RTOL


def test_patch_logits_match_reference():
    model = make_model("bagnet17", avg_pool=False)
    x = torch.randn(2, 3, 57, 41)
    with torch.no_grad():
        expected = model.reference_forward(x)
        actual = model(x)
    assert actual.shape == expected.shape == (2, 6, 4, 1000)
    assert rel_err(actual, expected) <= FP32_RTOL
    # the image logits are the mean of the patch logits (the head is linear)
    model.avg_pool = True
    with torch.no_grad():
        pooled = model(x)
    assert rel_err(pooled, expected.mean(dim=(1, 2))) <= FP32_RTOL


def test_torch_backend_matches_reference():
    model = make_model("bagnet33")
    model.backend = "torch"
    x = torch.randn(2, 3, 50, 61)
    with torch.no_grad():
        assert rel_err(model(x), model.reference_forward(x)) <= FP32_RTOL
    assert bagnet_fast.get_plan(model).backend.name == "torch"


def test_float64_uses_torch_backend_exactly(monkeypatch):
    from bagnet_fast import executors

    monkeypatch.setattr(executors, "_warned", set())  # the warning is once per (device, dtype) and process
    model = make_model("bagnet9").double()
    x = torch.randn(1, 3, 40, 40, dtype=torch.float64)
    with pytest.warns(UserWarning, match="pure-PyTorch backend"), torch.no_grad():
        actual = model(x)
    with torch.no_grad():
        assert rel_err(actual, model.reference_forward(x)) <= 1e-12


def test_eval_with_autograd_takes_reference_path():
    """Saliency: an input that requires grad must get gradients, not a plan output."""
    model = make_model("bagnet9")
    x = torch.randn(1, 3, 33, 33, requires_grad=True)
    model(x)[0, 3].backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def _fast(model, x):
    with torch.no_grad():
        return model(x), model.reference_forward(x)


def test_plan_rebuilt_after_load_state_dict():
    model = make_model("bagnet9", seed=0)
    x = torch.randn(1, 3, 40, 40)
    first, _ = _fast(model, x)
    model.load_state_dict(make_model("bagnet9", seed=1).state_dict())
    actual, expected = _fast(model, x)
    assert rel_err(actual, expected) <= FP32_RTOL
    assert rel_err(actual, first) > 1e-2


def test_plan_rebuilt_after_optimizer_step():
    model = make_model("bagnet9")
    x = torch.randn(2, 3, 33, 33)
    _fast(model, x)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    model(x).logsumexp(1).sum().backward()
    optimizer.step()  # in place: only the version counters change
    model.eval()
    actual, expected = _fast(model, x)
    assert rel_err(actual, expected) <= FP32_RTOL


def test_plan_rebuilt_after_batchnorm_statistics_update():
    model = make_model("bagnet9")
    x = torch.randn(2, 3, 33, 33)
    _fast(model, x)
    model.train()
    with torch.no_grad():
        model(x * 3 + 1)  # updates running_mean/var in place
    model.eval()
    actual, expected = _fast(model, x)
    assert rel_err(actual, expected) <= FP32_RTOL


def test_plan_rebuilt_after_dtype_change():
    model = make_model("bagnet9")
    x = torch.randn(1, 3, 33, 33)
    _fast(model, x)
    model.double()
    actual, expected = _fast(model, x.double())
    assert actual.dtype == torch.float64
    assert rel_err(actual, expected) <= 1e-12


def test_plan_is_cached_while_weights_unchanged():
    model = make_model("bagnet9")
    x = torch.randn(1, 3, 33, 33)
    _fast(model, x)
    plan = bagnet_fast.get_plan(model)
    _fast(model, x)
    assert bagnet_fast.get_plan(model) is plan


def test_model_pickles_and_deepcopies_after_plan():
    model = make_model("bagnet9")
    x = torch.randn(1, 3, 33, 33)
    expected, _ = _fast(model, x)
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        actual, _ = _fast(clone, x)
        assert torch.allclose(actual, expected, rtol=0, atol=0)


def test_torch_compile_of_fast_model_is_not_required_but_ops_trace():
    """The plan's ops have fake kernels: torch.compile can trace the fast forward."""
    model = make_model("bagnet9")
    x = torch.randn(1, 3, 33, 33)
    compiled = torch.compile(model, backend="eager", fullgraph=False)
    with torch.no_grad():
        assert rel_err(compiled(x), model.reference_forward(x)) <= FP32_RTOL


def test_model_built_under_inference_mode():
    with torch.inference_mode():
        model = make_model("bagnet9")
        x = torch.randn(1, 3, 33, 33)
        assert rel_err(model(x), model.reference_forward(x)) <= FP32_RTOL


def test_bagnet9_strides_moved_up_exactly():
    """plan._move_strides_up: BagNet-9's layer3.0 (1x1 conv2, stride 2) runs at stride 1 and
    layer2.0's 3x3 conv2 and downsample at stride 4, so layer2's blocks compute a quarter of the
    pixels; geometry and outputs stay the reference's (odd map sizes included)."""
    from bagnet_fast import flops

    model = make_model("bagnet9")
    plan = bagnet_fast.get_plan(model)
    strides = {unit.name: unit.stride for unit in plan.units}
    assert strides["layer2.0"] == 4 and strides["layer3.0"] == 1 and plan.stride == 8 and plan.patch_size == 9
    assert [unit.jump for unit in plan.units if unit.name.startswith("layer2")] == [8, 8, 8, 8]
    costs = {c.name: c.flops for c in flops.plan_unit_costs(plan, (1, 3, 224, 224))}
    reference = {c.name: c.flops for c in flops.reference_layer_costs(model, (1, 3, 224, 224))}
    layer2 = sum(v for k, v in costs.items() if k.startswith("layer2.1"))
    assert layer2 < 0.3 * sum(v for k, v in reference.items() if k.startswith("layer2.1"))  # 27² vs 54² pixels
    for size in (9, 25, 41, 58, 67):  # maps of odd and even sizes at every stage
        x = torch.randn(2, 3, size, size + 5)
        with torch.no_grad():
            assert rel_err(model(x), model.reference_forward(x)) <= FP32_RTOL
    # Every block's output is the module's output at every subsample-th row and column.
    assert {u.name: u.subsample for u in plan.blocks if u.subsample > 1} == {f"layer2.{i}": 2 for i in range(4)}
    x, seen, handles = torch.randn(2, 3, 58, 63), {}, []
    for name, module in model.named_modules():
        if name.count(".") == 1 and name.startswith("layer"):
            handles.append(module.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o)))
    with torch.no_grad():
        model.reference_forward(x)
    for handle in handles:
        handle.remove()
    compared = []

    def compare(unit, run, value):
        out = run(value)
        if unit in plan.blocks:
            step = unit.subsample
            expected = seen[unit.name][..., ::step, ::step]
            # The plan runs on plan.input_extent, so its maps are the top-left corners of the
            # reference's (58 x 63 -> 57 x 57: layer1 is 27 x 27 of the reference's 27 x 30).
            rows, cols = out.shape[-2:]
            assert rows <= expected.shape[-2] and cols <= expected.shape[-1], unit.name
            assert rel_err(out, expected[..., :rows, :cols]) <= FP32_RTOL, unit.name
            compared.append(unit.name)
        return out

    with torch.no_grad():
        features = plan.walk(x, hook=compare)
    assert len(compared) == len(plan.blocks) == 16
    assert features.shape == seen["layer4.2"].shape  # the last map is the reference's, whole
