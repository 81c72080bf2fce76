"""BagNets through timm's registry and torch.hub."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import bagnet_fast
from bagnet_fast import weights
from conftest import make_model, rel_err

ROOT = Path(__file__).resolve().parents[1]
timm = pytest.importorskip("timm")


def test_timm_creates_bagnets_with_a_pretrained_cfg():
    import bagnet_fast.timm  # noqa: F401 - registers the models

    for name, q in bagnet_fast.PATCH_SIZES.items():
        assert timm.is_model(name)
        model = timm.create_model(name, num_classes=10)
        assert isinstance(model, bagnet_fast.BagNet) and model.patch_size == q
        assert model.get_classifier().out_features == 10 and model.num_classes == 10
    config = timm.data.resolve_data_config({}, model=model)
    assert config["input_size"] == (3, 224, 224) and config["crop_pct"] == 0.875
    assert config["mean"] == bagnet_fast.IMAGENET_MEAN and config["interpolation"] == "bilinear"
    assert model.pretrained_cfg["url"] == weights.PRETRAINED_URLS["bagnet33"]
    assert model.pretrained_cfg["classifier"] == "fc" and model.pretrained_cfg["first_conv"] == "conv1"
    transform = timm.data.create_transform(**config)
    assert transform is not None
    with pytest.raises(ValueError, match="drop_rate"):
        timm.create_model("bagnet9", drop_rate=0.2)


def test_timm_pretrained_goes_through_the_checked_loader(monkeypatch):
    import bagnet_fast.timm as registered

    source = make_model("bagnet17")
    loaded = []
    monkeypatch.setattr(registered, "load_pretrained", lambda name: loaded.append(name) or source.state_dict())
    model = timm.create_model("bagnet17", pretrained=True, num_classes=5)
    assert loaded == ["bagnet17"] and torch.equal(model.conv2.weight, source.conv2.weight)
    assert model.fc.out_features == 5  # a new classifier for 5 classes
    x = torch.randn(1, 3, 40, 40)
    model.eval()
    with torch.no_grad():
        assert rel_err(model(x), model.reference_forward(x)) <= 1e-5


def test_torch_hub_local():
    model = torch.hub.load(str(ROOT), "bagnet33", source="local", pretrained=False, num_classes=7)
    assert isinstance(model, bagnet_fast.BagNet) and model.patch_size == 33 and model.fc.out_features == 7
    for name, q in bagnet_fast.PATCH_SIZES.items():
        assert torch.hub.load(str(ROOT), name, source="local").patch_size == q
