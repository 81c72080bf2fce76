"""No silent wrong answers: NaN/Inf propagate as in the reference; the cached plan never serves
stale weights (writes through .data, numpy views, replaced modules reusing freed memory,
attributes); sub-module modes and hooks are honoured; structures the plan cannot fold run the
reference; empty batches; torch.jit.trace, torch.compile(fullgraph=True) and torch.export."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import bagnet_fast
from bagnet_fast.ops import has_op
from conftest import FP32_RTOL, randomize_batchnorm, rel_err


def small_bagnet(seed=0):
    """A BagNet-17 with fewer blocks (2, 2, 3, 2): every kind of unit, built and folded fast."""
    torch.manual_seed(seed)
    model = bagnet_fast.BagNet(layers=(2, 2, 3, 2), strides=(2, 2, 2, 1), kernel3=(1, 1, 1, 0), num_classes=12)
    return randomize_batchnorm(model, seed).eval()


@pytest.fixture
def model():
    return small_bagnet()


def images(n=2, size=40, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def fast_and_reference(model, x, avg_pool=True):
    previous, model.avg_pool = model.avg_pool, avg_pool
    try:
        with torch.no_grad():
            return model(x), model.reference_forward(x)
    finally:
        model.avg_pool = previous


def assert_same(model, x, avg_pool=True):
    fast, reference = fast_and_reference(model, x, avg_pool)
    assert torch.equal(fast.isnan(), reference.isnan()), "NaN in different places"
    finite = reference.isfinite()
    assert torch.equal(fast.isfinite(), finite)
    if finite.any():
        assert rel_err(fast[finite], reference[finite]) <= FP32_RTOL


# --------------------------------------------------------------------------- NaN and Inf


BACKENDS = ["cpu", "torch", "cuda-twins"]


def _set_backend(model, backend, monkeypatch):
    if backend == "cuda-twins":  # the cuda backend's composition on CPU tensors (C++ twins)
        if not has_op("bias_residual_act", "CPU"):
            pytest.skip("bagnet_fast._C is not loaded")
        from bagnet_fast.executors.cuda_backend import CudaBackend

        plan = bagnet_fast.build_plan(model, "torch")
        plan.backend = CudaBackend()
        plan.backend.prepare(plan)
        monkeypatch.setattr(bagnet_fast.plan, "get_plan", lambda m: plan)
        return
    model.backend = backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("avg_pool", [True, False], ids=["logits", "patch-logits"])
def test_non_finite_inputs_propagate_as_in_the_reference(model, backend, value, avg_pool, monkeypatch):
    _set_backend(model, backend, monkeypatch)
    x = images(size=57)
    x[0, 0, 10, 10] = value
    fast, reference = fast_and_reference(model, x, avg_pool)
    assert reference.isnan().any() and not reference[1].isnan().any()  # only image 0 is touched
    assert torch.equal(fast.isnan(), reference.isnan())
    assert rel_err(fast[1], reference[1]) <= FP32_RTOL


@pytest.mark.parametrize("where", ["conv weight", "running_var", "fc weight"])
def test_non_finite_weights_propagate_as_in_the_reference(model, where):
    with torch.no_grad():
        if where == "conv weight":
            model.layer2[1].conv2.weight[3, 5] = float("nan")
        elif where == "running_var":
            model.layer3[0].bn1.running_var[7] = float("nan")
        else:
            model.fc.weight[4, 100] = float("nan")  # class 4 only
    assert_same(model, images())
    assert_same(model, images(), avg_pool=False)
    assert not bagnet_fast.get_plan(model).finite_weights


def test_nan_in_explanations_and_heatmaps(model):
    x = images(1, 45)
    x[0, 1, 20, 22] = float("nan")
    evidence = bagnet_fast.patch_logits(model, x)
    reference = fast_and_reference(model, x, avg_pool=False)[1]
    assert torch.equal(evidence.values.isnan(), reference.isnan()) and reference.isnan().any()
    heatmap = bagnet_fast.dense_heatmap(model, x, 3)
    assert heatmap.isnan().any() and not heatmap.isnan().all()


# --------------------------------------------------------------------------- freshness


def _stale_after(model, change):
    x = images()
    with torch.no_grad():
        model(x)  # build and cache the plan
        change()
    assert_same(model, x)


def test_plan_sees_writes_through_data(model):
    _stale_after(model, lambda: model.fc.weight.data.mul_(3))
    _stale_after(model, lambda: model.layer1[0].conv1.weight.data.mul_(3))
    _stale_after(model, lambda: model.layer2[1].bn2.running_mean.data.add_(0.5))
    source = small_bagnet(seed=1)
    _stale_after(model, lambda: [p.data.copy_(q) for p, q in zip(model.parameters(), source.parameters())])


def test_plan_sees_writes_through_numpy_views(model):
    def write():
        model.layer3[2].conv3.weight.detach().numpy()[:] *= 2
        model.bn1.running_var.numpy()[:] += 1

    _stale_after(model, write)


def test_replaced_modules_never_match_an_old_plan(model):
    """Two replacements between forwards: freed memory is reused for the new weights, which a key
    of storage addresses mistook for the old ones (3 of 40 trials)."""
    x = images()
    for trial in range(40):
        with torch.no_grad():
            model(x)
            model.fc = nn.Linear(2048, 12)
            model.fc = nn.Linear(2048, 12)
        assert_same(model, x)


@pytest.mark.parametrize("change", ["eps", "bn-replaced", "relu-replaced", "no-running-stats"])
def test_attributes_and_structures_the_plan_depends_on(model, change):
    x = images()
    with torch.no_grad():
        model(x)
    block = model.layer2[0]
    if change == "eps":
        block.bn2.eps = 10.0
    elif change == "bn-replaced":
        block.bn2 = nn.Identity()
    elif change == "relu-replaced":
        block.relu = nn.LeakyReLU(0.3)
    else:
        block.bn1 = nn.BatchNorm2d(block.bn1.num_features, track_running_stats=False).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_same(model, x)
    if change != "eps":
        assert any("running the reference modules" in str(w.message) for w in caught), [str(w.message) for w in caught]


def test_verify_mode_sees_partial_writes_the_samples_miss(model):
    """A write to one element between the sampled positions is seen only by the full check."""
    x = images()
    weight = model.layer4[1].conv2.weight
    with bagnet_fast.verify_plans():
        with torch.no_grad():
            model(x)
            weight.data.view(-1)[12345] += 1.0
        assert not bagnet_fast.plan_is_fresh(model)
        assert_same(model, x)
    with torch.no_grad():
        model(x)
        weight.data.view(-1)[12345] += 1.0
    bagnet_fast.refresh(model)  # the documented remedy without the full check
    assert_same(model, x)


def test_freshness_check_is_a_fraction_of_a_millisecond(model):
    """Not a speed goal (benchmarks measure speed): a guard that the per-forward check stays a
    small fixed cost, the reason it reads 8 values per tensor and not the weights."""
    import time

    with torch.no_grad():
        model(images())
    plan = bagnet_fast.get_plan(model)
    start = time.perf_counter()
    for _ in range(50):
        assert bagnet_fast.plan_is_fresh(model)
    assert (time.perf_counter() - start) / 50 < 5e-3


# --------------------------------------------------------------------------- modes and hooks


def test_sub_module_in_training_mode_uses_batch_statistics_like_the_reference(model):
    model.eval()
    model.layer3.train()
    x = images(4)
    reference = small_bagnet()
    reference.load_state_dict(model.state_dict())
    reference.eval()
    reference.layer3.train()
    with torch.no_grad():
        assert rel_err(model(x), reference.reference_forward(x)) <= FP32_RTOL
    # The running statistics moved as the reference's did (the training path's merged stem and
    # memory format round differently from the reference's, hence FP32_RTOL and not equality).
    for name in ("running_mean", "running_var"):
        assert rel_err(getattr(model.layer3[0].bn1, name), getattr(reference.layer3[0].bn1, name)) <= FP32_RTOL
        assert not torch.equal(getattr(model.layer3[0].bn1, name), getattr(small_bagnet().layer3[0].bn1, name))
    with pytest.raises(ValueError, match="training mode"):
        bagnet_fast.patch_logits(model, x)


def test_forward_hooks_and_pre_hooks_of_sub_modules_run(model):
    x = images()
    seen = []
    model.layer2[1].register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    model.layer1.register_forward_pre_hook(lambda module, inputs: (inputs[0] * 0,))
    with torch.no_grad():
        out = model(x)
        zeroed = model.reference_forward(torch.zeros_like(x))
    # The pre-hook's zeros reached layer1 (the rest of the network is the same computation, in
    # the training path's memory format: FP32_RTOL).
    assert len(seen) == 2 and rel_err(out, zeroed) <= FP32_RTOL
    with torch.no_grad():
        unhooked = small_bagnet().reference_forward(x)  # the same weights without the hooks
    assert rel_err(out, unhooked) > 100 * FP32_RTOL  # ... and changed the output


def test_global_hooks_are_honoured(model):
    calls = []
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    try:
        with torch.no_grad():
            model(images())
    finally:
        handle.remove()
    assert "Bottleneck" in calls and "BatchNorm2d" in calls


def test_captum_layer_attributions(model):
    captum = pytest.importorskip("captum.attr")
    x = images(1)
    activation = captum.LayerActivation(model, model.layer3[1]).attribute(x)
    assert activation.shape[1] == 1024
    attributions = captum.LayerIntegratedGradients(model, model.layer2).attribute(x, target=3, n_steps=4)
    assert attributions.shape[1] == 512


# --------------------------------------------------------------------------- shapes and tracing


def test_empty_batch(model):
    x = images(0, 40)
    fast, reference = fast_and_reference(model, x)
    assert fast.shape == reference.shape == (0, 12)
    patches, reference = fast_and_reference(model, x, avg_pool=False)
    assert patches.shape == reference.shape == (0, 3, 3, 12)
    assert bagnet_fast.patch_logits(model, x).values.shape == (0, 3, 3, 12)
    assert bagnet_fast.dense_heatmap(model, x, 1).shape == (0, 40, 40)


def test_jit_trace_records_the_reference(model):
    x = images()
    traced = torch.jit.trace(model, x)  # default check_trace: reruns under no_grad
    with torch.no_grad():
        assert rel_err(traced(images(seed=1)), model.reference_forward(images(seed=1))) <= FP32_RTOL


def test_torch_compile_fullgraph_follows_weight_changes(model):
    x = images()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        assert rel_err(compiled(x), model.reference_forward(x)) <= FP32_RTOL
        model.layer1[0].conv1.weight.mul_(2)  # in place: the compiled graph folds live weights
        assert rel_err(compiled(x), model.reference_forward(x)) <= FP32_RTOL


@pytest.mark.parametrize("how", ["accelerated", "no_grad"])
def test_torch_export_equals_the_fast_path(model, how):
    x = images()
    if how == "accelerated":
        target = bagnet_fast.accelerate(model)
        program = torch.export.export(target, (x,))
    else:
        target = model
        with torch.no_grad():
            program = torch.export.export(model, (x,))
    with torch.no_grad():
        exported, fast = program.module()(images(seed=2)), target(images(seed=2))
    assert rel_err(exported, fast) <= FP32_RTOL
    names = {name for name, _ in program.named_parameters()} | {name for name, _ in program.named_buffers()}
    assert "layer1.0.conv1.weight" in names and "layer1.0.bn1.running_var" in names
