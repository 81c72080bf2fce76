"""bagnet_fast: BagNets (Brendel & Bethge, ICLR 2019) that compute the same function, faster.

Drop-in: ``from bagnet_fast import bagnet33`` instead of ``from bagnets.pytorchnet import
bagnet33`` gives the same modules, state_dict and outputs; in eval mode without autograd the
forward runs a fused inference plan (C++/oneDNN on CPU, Triton/CUDA on GPUs).
"""

from . import certify
from .accelerate import accelerate, bagnet_from_state_dict
from .dead_branches import dead_branches
from .executors import backends
from .executors.cpu_memory import enable_caching_allocator as enable_cpu_caching_allocator
from .executors.cpu_memory import keep_freed_memory as keep_freed_cpu_memory
from .explain import dense_heatmap, mask_patches, masking_experiment, patch_features, patch_logits, top_patches
from .graphs import cuda_graph
from .models import PATCH_SIZES, BagNet, Bottleneck, bagnet9, bagnet17, bagnet33
from .precision import precision_report
from .plan import build_plan, get_plan, plan_is_fresh, receptive_field, refresh, verify_plans
from .preprocessing import IMAGENET_MEAN, IMAGENET_STD, heatmap_padding, preprocess

__version__ = "0.1.0"

__all__ = [
    "BagNet",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Bottleneck",
    "PATCH_SIZES",
    "accelerate",
    "backends",
    "bagnet9",
    "bagnet17",
    "bagnet33",
    "bagnet_from_state_dict",
    "build_plan",
    "certify",
    "cuda_graph",
    "dead_branches",
    "dense_heatmap",
    "enable_cpu_caching_allocator",
    "get_plan",
    "heatmap_padding",
    "keep_freed_cpu_memory",
    "mask_patches",
    "masking_experiment",
    "patch_features",
    "patch_logits",
    "plan_is_fresh",
    "precision_report",
    "preprocess",
    "receptive_field",
    "refresh",
    "top_patches",
    "verify_plans",
]
