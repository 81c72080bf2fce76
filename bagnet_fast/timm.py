"""BagNets in timm: ``import bagnet_fast.timm`` registers ``bagnet9``, ``bagnet17`` and
``bagnet33`` with timm's model registry (timm installed), each with a pretrained_cfg (the authors'
weights' URL, the ImageNet mean/std, 224 input, crop_pct 0.875, classifier ``fc``), so that

    model = timm.create_model("bagnet33", pretrained=True, num_classes=10)
    config = timm.data.resolve_data_config({}, model=model)

work, and timm's own train.py / validate.py can use them (``--model bagnet33`` after this module
is imported, e.g. through ``python -c "import bagnet_fast.timm, runpy; runpy.run_path('train.py')"``
or one import line in the script). Pretrained weights go through bagnet_fast's loader (sha256
checked on every load, weights_only); with num_classes != 1000 the classifier is left new.
"""

from __future__ import annotations

from typing import Any, Dict

import timm
from timm.models import generate_default_cfgs, register_model

from . import models as _models
from .preprocessing import IMAGENET_MEAN, IMAGENET_STD
from .weights import PRETRAINED_URLS, load_pretrained

__all__ = ["bagnet9", "bagnet17", "bagnet33"]


def _cfg(name: str) -> Dict[str, Any]:
    return {
        "url": PRETRAINED_URLS[name], "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        "crop_pct": 0.875, "interpolation": "bilinear", "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
        "first_conv": "conv1", "classifier": "fc", "license": "mit",
        "paper_ids": "arXiv:1904.00760", "paper_name": "Approximating CNNs with Bag-of-local-Features models",
    }


default_cfgs = generate_default_cfgs({name: _cfg(name) for name in _models.PATCH_SIZES})

# timm's create_model passes these; BagNets have no such options.
_TIMM_ONLY = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")
_UNSUPPORTED = {"drop_rate": 0.0, "drop_path_rate": 0.0, "in_chans": 3, "global_pool": "avg"}


def _create(name: str, pretrained: bool, kwargs: Dict[str, Any]):
    for key in _TIMM_ONLY:
        kwargs.pop(key, None)
    for key, neutral in _UNSUPPORTED.items():
        value = kwargs.pop(key, neutral)
        if value not in (neutral, None) and not (key == "global_pool" and value == ""):
            raise ValueError(f"{name}: {key}={value!r} is not supported by BagNets (only {neutral!r})")
    num_classes = kwargs.pop("num_classes", 1000)
    model = getattr(_models, name)(**kwargs)
    if pretrained:
        state = load_pretrained(name)
        model.load_state_dict(state)
    if num_classes != 1000:
        model.reset_classifier(num_classes)
    model.pretrained_cfg = model.default_cfg = dict(default_cfgs[name].default.to_dict(), num_classes=num_classes)
    model.num_classes = num_classes
    return model


@register_model
def bagnet9(pretrained: bool = False, **kwargs: Any):
    """BagNet-9 (patch size 9), bagnet_fast's implementation."""
    return _create("bagnet9", pretrained, kwargs)


@register_model
def bagnet17(pretrained: bool = False, **kwargs: Any):
    """BagNet-17 (patch size 17), bagnet_fast's implementation."""
    return _create("bagnet17", pretrained, kwargs)


@register_model
def bagnet33(pretrained: bool = False, **kwargs: Any):
    """BagNet-33 (patch size 33), bagnet_fast's implementation."""
    return _create("bagnet33", pretrained, kwargs)


assert timm.is_model("bagnet33")
