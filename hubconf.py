"""torch.hub entry points: ``torch.hub.load(repo_or_dir, "bagnet33", source="local"|"github",
pretrained=False, **kwargs)`` returns bagnet_fast's BagNet-33 (same for bagnet9, bagnet17).
``pretrained=True`` loads the authors' ImageNet weights (sha256-checked on every load)."""

import os
import sys

dependencies = ["torch", "numpy"]

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # this checkout's bagnet_fast

from bagnet_fast.models import bagnet9, bagnet17, bagnet33  # noqa: E402, F401
