"""Heads for fine-tuning on BagNet features, and a wrapper that puts one on a backbone.

The backbone's ``forward_features`` gives the (N, 2048, H', W') feature map — from the fused plan
when the backbone is frozen (no autograd through it), through the training path otherwise — so a
new head trained on a frozen BagNet runs at inference speed on the backbone.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

__all__ = ["EvidenceAttentionHead", "BagNetWithHead"]


class EvidenceAttentionHead(nn.Module):
    """Sparse BagNet's head (Djoumessi et al., MIDL 2023; clinical validation 2025): a 1x1
    convolution gives every position's class evidence, gated attention pooling weighs the
    positions, and the prediction is the attention-weighted sum of the evidence.

    forward(features (N, C, H, W)) -> (prediction (N, K), evidence (N, K, H, W), weights (N, 1, H, W))
    with weights summing to 1 over the map: prediction = Σ_hw weights · evidence.
    """

    def __init__(self, in_channels: int = 2048, num_classes: int = 5, hidden: int = 256) -> None:
        super().__init__()
        self.evidence = nn.Conv2d(in_channels, num_classes, kernel_size=1)
        self.attention_tanh = nn.Linear(in_channels, hidden)
        self.attention_sigmoid = nn.Linear(in_channels, hidden)
        self.attention_out = nn.Linear(hidden, 1)

    def forward(self, features: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, _, height, width = features.shape
        evidence = self.evidence(features)  # (N, K, H, W)
        positions = features.flatten(2).transpose(1, 2)  # (N, H*W, C)
        gate = torch.tanh(self.attention_tanh(positions)) * torch.sigmoid(self.attention_sigmoid(positions))
        weights = torch.softmax(self.attention_out(gate).squeeze(-1), dim=1).view(n, 1, height, width)
        return (evidence * weights).sum(dim=(2, 3)), evidence, weights


class BagNetWithHead(nn.Module):
    """``head(backbone.forward_features(x))``: a BagNet with a head of any kind."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor):
        return self.head(self.backbone.forward_features(x))
